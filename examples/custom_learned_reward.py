"""Wrap an image or video scorer (HPSv2 / HPSv3 / VideoAlign style) as a KVPO reward.

A pixel reward declares ``input = "pixels"``: the trainer decodes each group's videos once (the Wan VAE of
``model.vae`` / ``model.pretrained``) and hands every pixel component ``video [N, 3, T, H, W]`` in [-1, 1] with the
prompt index of each sample; it returns ``[N, len(names)]`` scores, higher is better. Load the scorer once, in eval
mode, without grad, on the device (``ModelOnDevice`` also moves it off between calls when ``model.offload`` is set).

Runs as is, offline, on the tiny preset with a toy scorer (colourfulness) and the synthetic linear decoder:

    python examples/custom_learned_reward.py --steps 3

For a real scorer, replace ``toy_scorer`` by a function calling it, e.g. for an HPS-style image scorer
``lambda images, prompts: hps_model.score(images, prompts)`` (its own API: images in [0, 1], one prompt each),
and pass the run's VAE decoder (``Trainer(...).decoder`` is built from the config) instead of the linear one.
A VideoAlign-style scorer that returns several heads per clip: a ``VideoScorerReward`` with
``names = ("vq", "mq", "ta")`` (a reward passed from Python weighs each component 1: ``Trainer.component_weights``).
"""
import argparse
from typing import Callable, Sequence

import torch

from kvpo_kernels.trainer import load_config
from kvpo_kernels.trainer.learned_rewards import sample_frames
from kvpo_kernels.trainer.loop import Trainer
from kvpo_kernels.trainer.rewards import CombinedReward, LinearDecoder


class FrameScorerReward:
    """An image scorer on ``num_frames`` evenly spaced frames per clip, averaged: ``score_images(images [M, 3, H, W]
    in [0, 1], prompts: M strings) -> [M]``."""

    input = "pixels"

    def __init__(self, score_images: Callable, prompts: Sequence[str], *, name: str = "hps", num_frames: int = 4):
        self.score_images, self.prompts, self.num_frames = score_images, list(prompts), num_frames
        self.names = (name,)

    @torch.no_grad()
    def __call__(self, video: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        frames = sample_frames(video, self.num_frames)                 # [N, F, 3, H, W] in [-1, 1]
        n, f = frames.shape[:2]
        texts = [self.prompts[i] for i in prompt_ids.tolist() for _ in range(f)]
        scores = self.score_images(((frames.flatten(0, 1) + 1) / 2).clamp(0, 1), texts)
        return torch.as_tensor(scores, dtype=torch.float32).view(n, f).mean(1, keepdim=True)


class VideoScorerReward:
    """A clip scorer with several heads: ``score_videos(video [N, 3, T, H, W] in [0, 1], prompts) -> [N, heads]``."""

    input = "pixels"

    def __init__(self, score_videos: Callable, prompts: Sequence[str], names=("vq", "mq", "ta")):
        self.score_videos, self.prompts, self.names = score_videos, list(prompts), tuple(names)

    @torch.no_grad()
    def __call__(self, video: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        texts = [self.prompts[i] for i in prompt_ids.tolist()]
        return torch.as_tensor(self.score_videos(((video + 1) / 2).clamp(0, 1), texts), dtype=torch.float32)


def toy_scorer(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Colourfulness: the spread of the channels per pixel (stands in for a learned model)."""
    return images.std(dim=1).mean(dim=(1, 2))


def main(steps: int = 3, output_dir: str = "runs/custom_reward") -> list:
    config = load_config("tiny", overrides=[f"run.output_dir={output_dir}", "run.resume=false", "run.plot=false"])
    prompts = [f"prompt {i}" for i in range(config.rollout.num_prompts)]
    reward = CombinedReward([FrameScorerReward(toy_scorer, prompts, name="colourful")],
                            decoder=LinearDecoder(config.model.latent_channels, config.run.seed))
    records = Trainer(config, reward_fn=reward).train(steps=steps)
    print(f"reward: first {records[0]['reward_mean']:.4f}, last {records[-1]['reward_mean']:.4f}")
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output-dir", default="runs/custom_reward")
    args = parser.parse_args()
    main(args.steps, args.output_dir)
