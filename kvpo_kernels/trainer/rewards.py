"""Rewards: a protocol, built-in synthetic rewards (no download), and how to wrap a learned one.

A reward scores samples. It receives latents ``[N, C, F, H, W]`` (N samples, F latent frames) and the prompt index
of each sample (``[N]`` int64, into the trainer's prompt list) and returns ``[N, C_r]``: one score per sample and
reward component (higher is better). The trainer calls it twice per group: on the perturbed chunk ("local") and on
the whole video ("global"), with the anchor as the last sample.

Learned rewards score pixels: a component with ``input = "pixels"`` receives the VAE-decoded video instead
(``[N, 3, T, H, W]`` in [-1, 1], decoded once per group for all such components). Built in: ``{name: clip, path:
LOCAL_CLIP_FOLDER}`` (:class:`~kvpo_kernels.trainer.learned_rewards.ClipScoreReward`). Wrapping HPSv2 / HPSv3 /
VideoAlign-style scorers: ``examples/custom_learned_reward.py`` (a runnable example); VideoAlign's several heads
(visual quality, motion quality, text alignment) become several components (``names = ("vq", "mq", "ta")``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from .errors import InputTypeError, InputValueError


@runtime_checkable
class RewardFn(Protocol):
    """``reward(latents [N, C, F, H, W], prompt_ids [N] int64) -> scores [N, len(names)]`` (higher is better)."""

    names: Tuple[str, ...]

    def __call__(self, latents: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor: ...


class LinearDecoder:
    """A fixed random linear "VAE": latent channels -> RGB per pixel, ``rgb = tanh(W z + b)``, seeded.

    Deterministic and cheap; stands in for a real decoder so that rewards look at colours, not raw latents.
    """

    def __init__(self, latent_channels: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(3, latent_channels, generator=gen) / latent_channels ** 0.5  # [3, C]
        self.bias = 0.1 * torch.randn(3, generator=gen)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """latents ``[N, C, F, H, W]`` -> video ``[N, 3, F, H, W]`` in (-1, 1), float32."""
        z = latents.float()
        rgb = torch.einsum("oc,ncfhw->nofhw", self.weight.to(z.device), z) + self.bias.to(z.device).view(1, 3, 1, 1, 1)
        return torch.tanh(rgb)


class BrightnessReward:
    """``-|mean brightness of the decoded video - target|``: a colour/brightness target, monotone in the latents.

    The brightness is the mean of the decoded RGB over channels, frames and pixels, in (-1, 1). A small change of
    the model's output bias moves it smoothly, which makes it a dependable signal for checking that training works.
    """

    names = ("brightness",)

    def __init__(self, latent_channels: int, target: float = 0.5, seed: int = 0):
        self.decoder = LinearDecoder(latent_channels, seed)
        self.target = target

    def __call__(self, latents: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        brightness = self.decoder(latents).mean(dim=(1, 2, 3, 4))
        return -(brightness - self.target).abs().unsqueeze(1)


class TemporalSmoothnessReward:
    """``-mean_f mean |x[f + 1] - x[f]|`` of the decoded video: penalises flicker between consecutive frames."""

    names = ("smoothness",)

    def __init__(self, latent_channels: int, seed: int = 0):
        self.decoder = LinearDecoder(latent_channels, seed)

    def __call__(self, latents: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        video = self.decoder(latents)
        if video.shape[2] < 2:
            return video.new_zeros(video.shape[0], 1)
        return -(video[:, :, 1:] - video[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4)).unsqueeze(1)


class CombinedReward:
    """Several rewards side by side: their components concatenated, in order.

    A component with ``input = "pixels"`` (see :mod:`~kvpo_kernels.trainer.learned_rewards`) scores the video that
    ``decoder`` (latents ``[N, C, F, H, W]`` -> ``[N, 3, T, H', W']`` in [-1, 1]) decodes, once per call and shared
    by every pixel component; the others score latents.
    """

    def __init__(self, rewards: Sequence[RewardFn], decoder=None):
        self.rewards = list(rewards)
        self.names = tuple(name for reward in self.rewards for name in reward.names)
        self.decoder = decoder
        pixel = [reward.names for reward in self.rewards if getattr(reward, "input", "latents") == "pixels"]
        if pixel and decoder is None:
            raise ValueError(f"reward.components: {pixel} score pixels and need a VAE (model.vae, or model.pretrained "
                             "with a vae/ folder)")
        self.needs_pixels = bool(pixel)

    def _score(self, latents: torch.Tensor, video, prompt_ids: torch.Tensor) -> torch.Tensor:
        scores = [check_scores(reward(video if getattr(reward, "input", "latents") == "pixels" else latents,
                                      prompt_ids), reward, len(prompt_ids))
                  for reward in self.rewards]
        return torch.cat(scores, dim=1)

    def __call__(self, latents: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        return self._score(latents, self.decoder(latents) if self.needs_pixels else None, prompt_ids)


def check_scores(scores, reward_fn, rows: int) -> torch.Tensor:
    """A reward's output checked to be a ``[rows, len(names)]`` tensor; returned as float64 on the CPU."""
    expected = (rows, len(reward_fn.names))
    if not isinstance(scores, torch.Tensor):
        raise InputTypeError(f"reward_fn: must return a tensor {list(expected)} (samples x names), got a "
                             f"{type(scores).__name__}")
    if tuple(scores.shape) != expected:
        raise InputValueError(f"reward_fn: must return [samples, len(names)] = {list(expected)} "
                              f"(names={tuple(reward_fn.names)}), got {list(scores.shape)}")
    return scores.double().cpu()


BUILTIN_REWARDS = {"brightness": BrightnessReward, "smoothness": TemporalSmoothnessReward}
LEARNED_REWARDS = ("clip",)   # {name: clip, weight, path: local CLIP folder, num_frames: 4}


def build_reward(specs: List[Dict], latent_channels: int, seed: int, *, decoder=None,
                 prompts: Optional[Sequence[str]] = None, device="cpu", offload: bool = False) -> CombinedReward:
    """Rewards from config entries ``{"name": "brightness", "weight": 1.0, ...kwargs}`` (weights read elsewhere).

    decoder: the latent -> pixel decoder of the pixel rewards (the Wan VAE); prompts: the prompt texts; device /
    offload: where the reward models run and whether they wait on the CPU between calls.
    """
    rewards = []
    for spec in specs:
        kwargs = {key: value for key, value in spec.items() if key not in ("name", "weight")}
        name = spec.get("name")
        if name == "clip":
            from .learned_rewards import ClipScoreReward

            if "path" not in kwargs:
                raise ValueError("reward.components clip: needs path: a local CLIP folder (save_pretrained layout)")
            rewards.append(ClipScoreReward(kwargs.pop("path"), prompts or [], device=device, offload=offload,
                                           **kwargs))
        elif name in BUILTIN_REWARDS:
            rewards.append(BUILTIN_REWARDS[name](latent_channels, seed=seed, **kwargs))
        else:
            raise ValueError(f"reward.components: unknown reward {name!r}; built-in: "
                             f"{sorted(BUILTIN_REWARDS) + list(LEARNED_REWARDS)} (for another learned reward, "
                             "build the Trainer in Python with reward_fn=...)")
    return CombinedReward(rewards, decoder)
