"""Learned rewards on decoded pixels: the built-in CLIP score, and the pattern to wrap any image/video scorer.

A pixel reward declares ``input = "pixels"``; it then receives the decoded video ``[N, 3, T, H, W]`` float32 in
[-1, 1] (decoded once per group by the Wan VAE and shared by every pixel component, see
:class:`~kvpo_kernels.trainer.rewards.CombinedReward`) instead of latents, plus the prompt index of each sample.
Reward models are loaded once, in eval mode, without grad, on the device; with ``offload`` they wait on the CPU
between calls. Wrapping HPSv2/HPSv3/VideoAlign: ``examples/custom_learned_reward.py``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..integrations.diffusers.weights import require_extra


def sample_frames(video: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``num_frames`` frames spread evenly over ``video [N, 3, T, H, W]`` (first and last included) ->
    ``[N, num_frames', 3, H, W]`` with ``num_frames' = min(num_frames, T)``."""
    count = min(num_frames, video.shape[2])
    index = torch.linspace(0, video.shape[2] - 1, count).round().long().to(video.device)
    return video.index_select(2, index).transpose(1, 2)


class ModelOnDevice:
    """A frozen model that lives on ``device`` while used and, with ``offload``, on the CPU in between."""

    def __init__(self, model, device, offload: bool):
        self.model, self.device, self.offload = model.eval().requires_grad_(False), torch.device(device), offload
        self.model.to("cpu" if offload else self.device)

    def __enter__(self):
        self.model.to(self.device)
        return self.model

    def __exit__(self, *exc):
        if self.offload:
            self.model.to("cpu")


class ClipScoreReward:
    """CLIP prompt-image similarity: cosine of CLIP's image and text embeddings per sampled frame, averaged.

    path: a local ``CLIPModel`` + ``CLIPProcessor`` folder (``save_pretrained`` layout); prompts: the text of each
    prompt index; num_frames: frames scored per clip (evenly spaced).
    """

    names = ("clip",)
    input = "pixels"

    def __init__(self, path: str, prompts: Sequence[str], *, device="cpu", num_frames: int = 4,
                 offload: bool = False):
        transformers = require_extra("transformers", "the CLIP reward")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"reward.components clip: num_frames must be a positive int, got {num_frames!r}")
        if not prompts:
            raise ValueError("reward.components clip: needs prompt texts (rollout.prompts_file as a .txt file)")
        self.processor = transformers.CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.model = ModelOnDevice(transformers.CLIPModel.from_pretrained(path, local_files_only=True), device,
                                   offload)
        self.prompts, self.num_frames = list(prompts), num_frames

    @torch.no_grad()
    def __call__(self, video: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        frames = sample_frames(video, self.num_frames)                     # [N, F, 3, H, W] in [-1, 1]
        n, f = frames.shape[:2]
        images = list(((frames.flatten(0, 1) + 1) / 2).clamp(0, 1).float().cpu())
        texts = [self.prompts[i] for i in prompt_ids.tolist()]
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True, do_rescale=False)
        with self.model as model:
            inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
            image = model.get_image_features(pixel_values=inputs["pixel_values"])
            text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image = _embedding(image).float().view(n, f, -1)
        text = _embedding(text).float().view(n, 1, -1)
        similarity = torch.nn.functional.cosine_similarity(image, text, dim=-1)   # [N, F]
        return similarity.mean(dim=1, keepdim=True).cpu()


def _embedding(output) -> torch.Tensor:
    # transformers 5 returns a model output (pooler_output = the projected embedding); older versions a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output
