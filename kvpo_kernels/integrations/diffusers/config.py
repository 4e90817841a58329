"""Geometry of a streaming rollout (:class:`StreamingConfig`), the causal Wan2.1-T2V-1.3B transformer config and
the per-block sample record (:class:`BlockRollout`)."""
from __future__ import annotations

import dataclasses
import numbers
from typing import NamedTuple

import torch


# diffusers config of the causal Wan2.1-T2V-1.3B behind Self-Forcing / LongLive / MemFlow.
WAN_T2V_1_3B_CONFIG = {
    "patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
}


@dataclasses.dataclass
class StreamingConfig:
    """Geometry and sampler of a streaming rollout (defaults: LongLive on Wan2.1-T2V-1.3B at 480x832)."""

    frames_per_block: int = 3       # latent frames per block
    sink_frames: int = 3            # first frames, always visible
    window_frames: int = 12         # frames a block sees in total, incl. sink and itself (LongLive: 12)
    nearest_frames: int = 4         # with routing: the most recent frames incl. the current block (LongLive: 4)
    timesteps: tuple = (1000, 750, 500, 250)
    shift: float = 5.0              # sigma warp: s' = shift*s / (1 + (shift-1)*s), s = t/1000
    # without routing a block sees: sink frames + the most recent (window_frames - sink_frames) frames incl. itself.
    # with a route R (absolute frame indices of older frames): sink + R + the nearest_frames most recent incl. itself.
    cache_frames: int = 21          # frames kept resident incl. the block being written (LongLive-KVPO: 21, so a
    #                                 fork at frame >= 21 routes over 14 older frames); window_frames is the minimum
    latent_height: int = 60         # latent grid of one frame: tokens per frame = (h / 2) * (w / 2) = 1560
    latent_width: int = 104
    context_noise: int = 0          # timestep of the forward that commits a clean block (and re-encodes the window
    #                                 at a prompt switch); a commit feeds (1 - c) x0 + c eps, c = context_noise/1000.
    #                                 Released: 0, with context_noise_grid (below).
    context_noise_grid: bool = False  # c as the released training pipelines' add_noise has it: the sigma of the
    #                                 nearest of their scheduler's 1000 shifted training timesteps, which has no
    #                                 t = 0 (smallest sigma 0.00498 at shift 5): context_noise 0 still feeds
    #                                 0.995 x0 + 0.005 eps. False: c = context_noise / 1000 (0: x0 itself, as the
    #                                 released inference pipelines commit)
    memory_bank_frames: int = 0     # MemFlow's KV memory bank (released bank_size: 3); 0 = off (LongLive)
    bank_record_interval: int = 3   # MemFlow: the bank gains a slot every this many blocks (record_interval: 3)
    bank_rule: str = "rollout"      # MemFlow: which released update rule ("rollout": streaming_training.py, the
    #                                 one KVPO's rollouts run; "inference": causal_inference.py); see memflow.py
    route_layout: str = "sink"      # what a routed block reads: "sink" (ours / LongLive): [sink | bank | route |
    #                                 nearest], a route = absolute frames; "memflow" (released MemFlow KVPO): [bank |
    #                                 route | nearest], a route = cache slots, window - nearest of them (GroupKVCache)

    def __post_init__(self):
        for name in ("frames_per_block", "sink_frames", "window_frames", "nearest_frames", "cache_frames",
                     "latent_height", "latent_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"StreamingConfig.{name} must be an int, got {value!r}")
            if value < (0 if name == "sink_frames" else 1):
                raise ValueError(f"StreamingConfig.{name} must be positive, got {value}")
        for name, minimum in (("memory_bank_frames", 0), ("bank_record_interval", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                raise ValueError(f"StreamingConfig.{name} must be an int >= {minimum}, got {value!r}")
        if self.bank_rule not in ("rollout", "inference"):
            raise ValueError(f"StreamingConfig.bank_rule must be 'rollout' or 'inference', got {self.bank_rule!r}")
        if self.route_layout not in ("sink", "memflow"):
            raise ValueError(f"StreamingConfig.route_layout must be 'sink' or 'memflow', got {self.route_layout!r}")
        if not isinstance(self.context_noise_grid, bool):
            raise TypeError(f"StreamingConfig.context_noise_grid must be a bool, got {self.context_noise_grid!r}")
        if isinstance(self.context_noise, bool) or not isinstance(self.context_noise, numbers.Integral) \
                or not 0 <= self.context_noise < 1000:
            raise ValueError(f"StreamingConfig.context_noise must be an int timestep in [0, 1000), "
                             f"got {self.context_noise!r}")
        self.timesteps = tuple(self.timesteps)
        if not self.timesteps or any(not 0 < float(t) <= 1000 for t in self.timesteps):
            raise ValueError(f"StreamingConfig.timesteps must be a non-empty sequence in (0, 1000], "
                             f"got {self.timesteps}")
        if not float(self.shift) > 0:
            raise ValueError(f"StreamingConfig.shift must be > 0, got {self.shift}")

    @property
    def context_timestep_sigma(self) -> float:
        """``context_noise / 1000``: the commit and re-cache forwards run at timestep ``context_noise``."""
        return self.context_noise / 1000.0

    @property
    def context_sigma(self) -> float:
        """Noise level c of a commit's input ``(1 - c) x0 + c eps`` (the model sees timestep context_noise).

        ``context_noise / 1000``, or with ``context_noise_grid`` the released training scheduler's lookup
        (``utils/scheduler.py`` FlowMatchScheduler ``add_noise`` l. 159-175, built with ``sigma_min=0,
        extra_one_step=True`` and ``set_timesteps(1000, training=True)`` in ``utils/wan_wrapper.py`` l. 248-251):
        sigmas ``linspace(1, 0, 1001)[:-1]`` warped by the shift, timesteps ``1000 sigma``, and the sigma of the
        timestep nearest to context_noise (float64 here, float32 there: ~1e-8 apart).
        """
        if not self.context_noise_grid:
            return self.context_timestep_sigma
        shift = float(self.shift)
        grid = [shift * s / (1 + (shift - 1) * s) for s in ((1000 - i) / 1000 for i in range(1000))]
        return min(grid, key=lambda sigma: abs(1000 * sigma - self.context_noise))

    def recache_frames(self, start_frame: int) -> list[int]:
        """Frames re-encoded under the new prompt at a switch before ``start_frame``: the ``window_frames -
        sink_frames`` most recent non-sink frames (an unrouted block's window; LongLive's local budget). The sink
        is global: it keeps the first prompt's K/V."""
        return list(range(max(self.sink_frames, start_frame - (self.window_frames - self.sink_frames)), start_frame))

    def sigmas(self) -> torch.Tensor:
        """``[K]`` float32: ``s' = shift * s / (1 + (shift - 1) * s)`` with ``s = t / 1000``."""
        s = torch.tensor([float(t) / 1000.0 for t in self.timesteps], dtype=torch.float64)
        return (self.shift * s / (1 + (self.shift - 1) * s)).float()


class BlockRollout(NamedTuple):
    """One sampled block. ``x0 [B, C, f, H, W]`` the final clean block; ``x_t [K, B, C, f, H, W]`` the input of
    each step; ``x0_pred [K, B, C, f, H, W]`` each step's prediction (``x0_pred[-1] is x0``); ``sigmas [K]``."""

    x0: torch.Tensor
    x_t: torch.Tensor
    x0_pred: torch.Tensor
    sigmas: torch.Tensor
