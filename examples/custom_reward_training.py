"""Train the tiny preset with your own reward: any callable following ``kvpo_kernels.trainer.RewardFn``.

    python examples/custom_reward_training.py                   # 3 steps of the tiny preset, ~seconds on a CPU
    python examples/custom_reward_training.py --steps 150       # the preset's full run (reward should rise)
    python examples/custom_reward_training.py --output runs/mine

A reward receives latents ``[N, C, F, H, W]`` (N samples: the group's branches then the anchor, last) and their
prompt indices ``[N]`` int64, and returns ``[N, len(names)]`` scores, higher is better. The trainer calls it on the
perturbed chunk ("local") and on the whole video ("global"). A learned reward (HPSv3, VideoAlign) decodes the
latents with the VAE first; see ``kvpo_kernels/trainer/rewards.py``.
"""
import argparse
import tempfile

import torch

from kvpo_kernels.trainer import RewardFn, Trainer, load_config


class ContrastReward:
    """Two components: the spread of the latents (contrast) and minus their mean absolute temporal change."""

    names = ("contrast", "steadiness")

    def __call__(self, latents: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        x = latents.float()                                          # [N, C, F, H, W]
        contrast = x.flatten(1).std(dim=1)                           # [N]
        change = (x[:, :, 1:] - x[:, :, :-1]).abs().flatten(1).mean(dim=1) if x.shape[2] > 1 else contrast * 0
        return torch.stack([contrast, -change], dim=1)              # [N, 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (the tiny preset's default is 150)")
    parser.add_argument("--output", help="run directory (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    reward = ContrastReward()
    print(f"ContrastReward follows RewardFn: {isinstance(reward, RewardFn)}")  # runtime-checkable protocol

    with tempfile.TemporaryDirectory() as scratch:
        config = load_config("tiny", overrides=[f"run.steps={args.steps}", f"run.output_dir={args.output or scratch}",
                                                "run.progress=false", "run.plot=false", "run.resume=false"])
        records = Trainer(config, reward_fn=reward).train()
    for record in records:
        if record["skipped"]:  # a non-finite loss: the step left the weights as they were
            print(f"step {record['step']}: skipped")
        else:
            print(f"step {record['step']}: reward {record['reward_mean']:.4f}, loss {record['loss']:.4g}")


if __name__ == "__main__":
    main()
