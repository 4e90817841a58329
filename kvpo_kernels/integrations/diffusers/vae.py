"""The Wan VAE (diffusers ``AutoencoderKLWan``) as the latent -> pixel decoder of rewards and sample videos."""
from __future__ import annotations

import os
import torch


def load_wan_vae(path: str, *, dtype: torch.dtype = torch.float32):
    """``AutoencoderKLWan`` from a diffusers Wan folder (its ``vae/``) or a VAE folder; local files only, eval mode,
    no grad, on the CPU (a :class:`WanLatentDecoder` moves it)."""
    from diffusers import AutoencoderKLWan

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.vae / model.pretrained: no folder at {path!r}")
    subfolder = "vae" if os.path.isdir(os.path.join(path, "vae")) else None
    vae = AutoencoderKLWan.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype, local_files_only=True)
    return vae.eval().requires_grad_(False)


class WanLatentDecoder:
    """Normalised Wan latents ``[N, z_dim, F, H, W]`` -> video ``[N, 3, 1 + 4 (F - 1), 8 H, 8 W]`` float32 in
    [-1, 1], on ``device``, decoding ``batch_size`` samples at a time (the VAE's activations dominate its memory).

    Un-normalisation as diffusers' ``WanPipeline``: ``z = latents * latents_std + latents_mean`` per channel (the
    pipeline divides by ``1 / std``). With ``offload`` the VAE waits on the CPU between calls.
    """

    def __init__(self, vae, *, device, batch_size: int = 1, offload: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"reward.batch_size must be a positive int, got {batch_size!r}")
        self.vae, self.device, self.batch_size, self.offload = vae, torch.device(device), batch_size, offload
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)
        self.vae.to(torch.device("cpu") if offload else self.device)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 5 or latents.shape[1] != self.mean.shape[1]:
            raise ValueError(f"latents must be [N, {self.mean.shape[1]}, F, H, W], got {list(latents.shape)}")
        dtype = next(self.vae.parameters()).dtype
        self.vae.to(self.device)
        try:
            out = []
            for chunk in latents.split(self.batch_size):
                z = chunk.to(self.device, torch.float32) * self.std.to(self.device) + self.mean.to(self.device)
                out.append(self.vae.decode(z.to(dtype), return_dict=False)[0].float().clamp(-1, 1))
            return torch.cat(out)
        finally:
            if self.offload:
                self.vae.to("cpu")

