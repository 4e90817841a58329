"""routed_attention basics: B sequences over their own routed blocks of one shared paged KV pool, with a backward.

    python examples/routed_attention_basics.py          # tiny geometry, seconds on a CPU
    python examples/routed_attention_basics.py --real   # the KVPO geometry (1560-token frames, 8 branches); a GPU

Shows: the pool and the block table, GQA (more query heads than KV heads), each sequence's own new chunk
(k_new / v_new), the log-sum-exp output, the backward, and a pool block shared by several sequences receiving the
sum of their gradients. Runs on "cuda" when available, else on the CPU (torch backend).
"""
import argparse

import torch

import kvpo_kernels
from kvpo_kernels import reference

# name: (B sequences, Lq queries, Hq query heads, Hkv kv heads, D head dim, S tokens per block, N pool blocks,
#        M routed blocks per sequence, Ln new tokens per sequence)
GEOMETRIES = {
    "tiny": (3, 5, 4, 2, 16, 7, 6, 4, 3),
    # KVPO on Wan2.1-1.3B: 8 branches, each reading 12 routed 1560-token frames + its own 3-frame chunk.
    "real": (8, 4680, 12, 12, 128, 1560, 18, 12, 3 * 1560),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="the KVPO geometry instead of the tiny one")
    args = parser.parse_args(argv)
    B, Lq, Hq, Hkv, D, S, N, M, Ln = GEOMETRIES["real" if args.real else "tiny"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)

    q = torch.randn(B, Lq, Hq, D, device=device, dtype=dtype, requires_grad=True)       # [B, Lq, Hq, D]
    k_cache = torch.randn(N, S, Hkv, D, device=device, dtype=dtype, requires_grad=True)  # pool [N, S, Hkv, D]
    v_cache = torch.randn_like(k_cache, requires_grad=True)
    # [B, M] int32: the pool blocks each sequence reads, in this order. Every row starts with block 0 (shared by
    # all B sequences, so its gradient is their sum), then M - 1 distinct others.
    rows = [torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(N - 1)[:M - 1]]) for _ in range(B)]
    block_table = torch.stack(rows).to(device=device, dtype=torch.int32)
    block_counts = torch.full((B,), M, dtype=torch.int32, device=device)  # [B] valid entries of each row
    block_counts[-1] = 2                                                  # the last sequence reads 2 blocks only
    k_new = torch.randn(B, Ln, Hkv, D, device=device, dtype=dtype, requires_grad=True)  # own chunk [B, Ln, Hkv, D]
    v_new = torch.randn_like(k_new, requires_grad=True)

    out, lse = kvpo_kernels.routed_attention(q, k_cache, v_cache, block_table, block_counts, k_new=k_new,
                                             v_new=v_new, return_lse=True)
    print(f"device {device}, dtype {dtype}: out {list(out.shape)} (= q's), lse {list(lse.shape)} {lse.dtype}")
    out.float().square().mean().backward()
    print(f"grads: q {list(q.grad.shape)}, k_new {list(k_new.grad.shape)}, k_cache {list(k_cache.grad.shape)}")
    unread = sorted(set(range(N)) - {int(b) for r, n in zip(block_table.tolist(), block_counts.tolist())
                                          for b in r[:n]})
    print(f"pool block 0 (read by all {B} sequences) |grad| = {k_cache.grad[0].float().abs().sum():.4g}; "
          f"unread blocks {unread} have zero gradient: "
          f"{all(bool((k_cache.grad[b] == 0).all()) for b in unread)}")

    if not args.real:  # float64 scores of the real geometry would need ~80 GB
        # The executable spec (kvpo_kernels/reference.py: gather, concatenate, softmax) in float64 is the truth.
        ref = reference.routed_attention(q.double(), k_cache.double(), v_cache.double(), block_table, block_counts,
                                         k_new.double(), v_new.double())
        print(f"max |out - float64 reference| = {(out.double() - ref).abs().max():.2e}")


if __name__ == "__main__":
    main()
