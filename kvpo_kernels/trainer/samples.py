"""Sample videos: the anchor, the best and the worst branch of one fixed eval group, side by side in one mp4.

The group is the first prompt rolled out with fixed noise and routes (seeded by ``run.seed``, the same at every
call), forking at ``rollout.fork_min``, so successive files show what training changed, not what the noise did.
Frames come from the Wan VAE when the run has one, else from the synthetic reward's linear decoder (upsampled 8x).
"""
from __future__ import annotations

import os
from typing import Dict, Sequence

import torch

from .rewards import LinearDecoder
from .rollout import group_rollout

SAMPLE_SEED_OFFSET = 1_000_003   # the eval group's RNG stream, apart from the training groups'
FPS = 16


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """``[3, T, H, W]`` in [-1, 1] -> ``[T, H, W, 3]`` uint8."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu()


def write_mp4(path: str, videos: Sequence[torch.Tensor], fps: int = FPS) -> str:
    """Write ``videos`` (each ``[3, T, H, W]`` in [-1, 1], same T and H) side by side as an H.264 mp4."""
    from ..integrations.diffusers.weights import require_extra

    imageio = require_extra("imageio", "sample videos (run.sample_every)")
    require_extra("imageio_ffmpeg", "sample videos (run.sample_every)")
    frames = to_uint8_frames(torch.cat(list(videos), dim=-1)).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # macro_block_size 2: yuv420p needs even sizes; the default (16) would rescale the frames.
    imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", macro_block_size=2)
    return path


def decode_for_video(trainer, latents: torch.Tensor) -> torch.Tensor:
    """Latents ``[N, C, F, H, W]`` -> ``[N, 3, T, H', W']`` in [-1, 1] with the run's VAE, or the linear decoder."""
    if trainer.decoder is not None:
        return trainer.decoder(latents)
    video = LinearDecoder(latents.shape[1], trainer.config.run.seed)(latents)
    return video.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)


@torch.no_grad()
def write_samples(trainer, step: int) -> Dict[str, float]:
    """Roll out the fixed eval group with the policy, write ``run.output_dir/samples/step_{step:06d}.mp4``
    (anchor | best | worst branch by the weighted whole-video reward) and return their rewards."""
    cfg = trainer.config
    r = cfg.rollout
    rng = torch.Generator().manual_seed(cfg.run.seed + SAMPLE_SEED_OFFSET)
    rollout = group_rollout(trainer.generator, trainer.prompts[:1], prompt_id=0, num_blocks=r.num_blocks,
                            fork_block=r.fork_min, perturbed_blocks=r.perturbed_blocks, num_branches=r.num_branches,
                            num_routed=cfg.num_routed(), latent_shape=trainer.latent_shape, rng=rng,
                            sampler=r.sampler)
    latents = rollout.video()
    ids = torch.zeros(latents.shape[0], dtype=torch.long)
    reward = (trainer.reward_fn(latents, ids).double() * trainer.component_weights).sum(1)
    best, worst = int(reward[:-1].argmax()), int(reward[:-1].argmin())
    chosen = latents[[latents.shape[0] - 1, best, worst]]
    path = os.path.join(cfg.run.output_dir, "samples", f"step_{step:06d}.mp4")
    write_mp4(path, list(decode_for_video(trainer, chosen)))
    return {"sample_reward_anchor": float(reward[-1]), "sample_reward_best": float(reward[best]),
            "sample_reward_worst": float(reward[worst])}
