"""velocity_energy basics: the trajectory velocity energy of G branches x K denoising steps, and its gradient.

    python examples/velocity_energy_basics.py          # tiny latents, instant on a CPU
    python examples/velocity_energy_basics.py --real   # one 3-frame Wan block (16 x 3 x 60 x 104) per branch/step

E[b, t] = weight[b, t] * mean_j (pred[b, t, j] - target[b, t, j])^2, fp32, deterministic (no atomics), read in one
pass; pred/target may have any trailing dims and strides. Runs on "cuda" when available, else on the CPU.
"""
import argparse

import torch

import kvpo_kernels
from kvpo_kernels import reference

# name: (G branches, K denoising steps, one latent block's shape (C, f, H, W))
GEOMETRIES = {
    "tiny": (4, 4, (4, 1, 8, 8)),
    "real": (8, 4, (16, 3, 60, 104)),  # one 3-frame Wan block: 299,520 elements per (branch, step)
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="the Wan2.1 block geometry instead of the tiny one")
    args = parser.parse_args(argv)
    G, K, block = GEOMETRIES["real" if args.real else "tiny"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)

    # pred: the policy's replayed x0 predictions; target: the rollout's, [G, K, C, f, H, W].
    pred = torch.randn(G, K, *block, device=device, dtype=dtype, requires_grad=True)
    target = torch.randn_like(pred)
    weight = torch.ones(K, device=device)                      # [K] per-step weights (KVPO: all steps weigh 1)

    energy = kvpo_kernels.velocity_energy(pred, target, weight)  # fp32 [G, K]
    print(f"device {device}, dtype {dtype}: E {list(energy.shape)} {energy.dtype}")
    log_likelihood = -energy.sum(dim=1) / 2                    # [G] branch log-likelihood (tau = 1 for all steps)
    torch.log_softmax(log_likelihood, dim=0)[0].backward()    # e.g. the Gibbs log-probability of branch 0
    print(f"grad pred {list(pred.grad.shape)} {pred.grad.dtype}")

    again = kvpo_kernels.velocity_energy(pred.detach(), target, weight)
    print(f"bitwise repeatable: {torch.equal(energy.detach(), again)}")
    truth = reference.velocity_energy(pred.detach().double(), target.double(), weight.double())
    print(f"max relative |E - float64 reference| = {((energy.double() - truth).abs() / truth).max():.2e}")


if __name__ == "__main__":
    main()
