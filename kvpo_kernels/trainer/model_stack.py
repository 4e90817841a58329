"""The real model stack around the trained transformer: its LoRA adapter, the text prompts, the VAE decoder, the
planned memory (from meta tensors) and the start-up checks that refuse a run which cannot work."""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Tuple

import torch

from .config import TrainConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# A random-initialised model above this size is no training run (the 1.3B preset without weights), nor is one on
# the CPU: kvpo-train refuses both before building anything.
REAL_MODEL_PARAMS = 100_000_000
GIB = 1024 ** 3


def add_configured_lora(transformer, config: TrainConfig) -> Optional[list]:
    """The ``model.lora_*`` adapter on ``transformer`` (and ``model.lora_checkpoint`` loaded into it); returns its
    parameters (the only trainable ones), or None when ``model.lora_rank`` is 0 / null."""
    m = config.model
    if not m.lora_rank:
        return None
    from ..integrations.diffusers.lora import add_lora, load_causal_wan_lora

    params = add_lora(transformer, m.lora_rank, m.lora_alpha, m.lora_dropout, m.lora_targets)
    if m.lora_checkpoint is not None:
        load_causal_wan_lora(transformer, m.lora_checkpoint)
    return params


def _component_path(config: TrainConfig, explicit: Optional[str], subfolder: str) -> Optional[str]:
    """``explicit``, else ``model.pretrained`` when it is a local folder holding ``subfolder``, else None."""
    if explicit is not None:
        return explicit
    pretrained = config.model.pretrained
    if pretrained is not None and os.path.isdir(os.path.join(pretrained, subfolder)):
        return pretrained
    return None


def load_prompts(config: TrainConfig, device) -> Tuple[Optional[torch.Tensor], List[str]]:
    """``(embeds [P, L, D] float32 or None, texts)`` from ``rollout.prompts_file``: a ``.txt`` file (one prompt a
    line) is encoded by the UMT5 encoder of ``model.text_encoder`` / ``model.pretrained`` to ``rollout.prompt_length``
    tokens and cached in ``run.output_dir/prompt_cache``; a ``.pt`` file holds the embeddings (no texts)."""
    path = config.rollout.prompts_file
    if path is None or not path.endswith(".txt"):
        return None, []
    from ..integrations.diffusers.text import cached_prompt_embeds, read_prompts_file

    texts = read_prompts_file(path)
    encoder = _component_path(config, config.model.text_encoder, "text_encoder")
    if encoder is None:
        raise ValueError("rollout.prompts_file: a .txt prompts file needs the UMT5 text encoder: set "
                         "model.text_encoder (or model.pretrained to a Wan folder with text_encoder/ and tokenizer/)")
    dtype = torch.bfloat16 if config.model.dtype == "bfloat16" and torch.device(device).type == "cuda" else torch.float32
    embeds = cached_prompt_embeds(texts, encoder, os.path.join(config.run.output_dir, "prompt_cache"), device=device,
                                  dtype=dtype, max_length=config.rollout.prompt_length)
    return embeds, texts


def build_decoder(config: TrainConfig, device):
    """The Wan VAE decoder (``model.vae``, or ``model.pretrained``'s ``vae/``), or None when there is none."""
    path = _component_path(config, config.model.vae, "vae")
    if path is None:
        return None
    from ..integrations.diffusers.vae import WanLatentDecoder, load_wan_vae

    return WanLatentDecoder(load_wan_vae(path), device=device, batch_size=config.reward.batch_size,
                            offload=config.model.offload)


@dataclasses.dataclass
class MemoryPlan:
    """Planned memory of a run (bytes), from meta tensors: no weight is allocated to compute it."""

    params: int                 # parameter count of the transformer (LoRA included)
    trainable: int              # trainable parameter count (the LoRA adapter when on)
    weights_bytes: int          # the model's weights at model.dtype
    optimizer_bytes: int        # AdamW moments (+ fp32 master weights for a bf16/fp16 model), fp32
    copies_bytes: int           # old policy, reference policy and EMA copies of the trainable weights
    kv_pool_bytes: int          # one group's KV pool (prefix window + every block the branches write)
    activation_bytes: int       # estimate: the replay's saved activations of one gradient step

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.optimizer_bytes + self.copies_bytes + self.kv_pool_bytes +
                self.activation_bytes)

    def format(self) -> str:
        return (f"planned memory: {self.params / 1e6:.2f}M params ({self.weights_bytes / GIB:.2f} GiB), "
                f"{self.trainable / 1e6:.2f}M trainable, optimizer {self.optimizer_bytes / GIB:.2f} GiB, "
                f"old/ref/EMA copies {self.copies_bytes / GIB:.2f} GiB, KV pool per group "
                f"{self.kv_pool_bytes / GIB:.2f} GiB, activations ~{self.activation_bytes / GIB:.2f} GiB (estimate); "
                f"total ~{self.total_bytes / GIB:.2f} GiB")


def _meta_model(config: TrainConfig):
    """The configured transformer (a pretrained folder's config, else the model section's geometry) + LoRA on the
    meta device."""
    from diffusers import WanTransformer3DModel

    from .loop import _random_transformer as random_transformer  # (moves to .model with the trainer split)

    m = config.model
    with torch.device("meta"):
        if m.pretrained is not None:
            model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(m.pretrained,
                                                                                        subfolder=m.subfolder))
        else:
            model = random_transformer(config)
        if config.model.lora_rank:
            from ..integrations.diffusers.lora import add_lora

            m = config.model
            add_lora(model, m.lora_rank, m.lora_alpha, m.lora_dropout, m.lora_targets)
    return model


def plan_memory(config: TrainConfig) -> MemoryPlan:
    """The :class:`MemoryPlan` of ``config`` (the model geometry of its ``model`` section, built on the meta
    device). The activation figure is an estimate: per replayed block forward ``G * f * h/2 * w/2`` tokens keep
    ~``12 * dim + 2 * ffn_dim`` values per layer (norms, q/k/v, attention output, modulation, MLP hidden); with
    gradient checkpointing one layer's worth plus each layer's input; with rematerialisation one forward's worth."""
    m, r, s = config.model, config.rollout, config.streaming
    model = _meta_model(config)
    geometry = model.config
    params = sum(p.numel() for p in model.parameters())
    if m.lora_rank:
        trainable = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    elif m.trainable:
        trainable = sum(p.numel() for n, p in model.named_parameters() if any(k in n for k in m.trainable))
    else:
        trainable = params
    width, low_precision = DTYPE_BYTES[m.dtype], m.dtype != "float32"
    optimizer = trainable * 4 * (3 if low_precision else 2)
    copies = trainable * width * (1 + (config.objective.beta != 0))
    copies += trainable * 4 * (config.optim.ema_decay > 0)
    dim, layers = geometry.num_attention_heads * geometry.attention_head_dim, geometry.num_layers
    tokens_per_frame = (r.latent_height // 2) * (r.latent_width // 2)
    f = s.frames_per_block
    frames = s.cache_frames + (r.num_branches + 1) * f * (r.num_blocks - r.fork_min)
    kv_pool = frames * tokens_per_frame * 2 * dim * layers * width
    tokens = r.num_branches * f * tokens_per_frame
    per_layer = tokens * (12 * dim + 2 * geometry.ffn_dim) * width
    one_forward = per_layer + tokens * dim * width * layers if m.gradient_checkpointing else per_layer * layers
    replayed = r.perturbed_blocks if config.replay.blocks == "perturbed" else r.num_blocks - r.fork_min
    forwards = 1 if config.replay.rematerialize else replayed * config.replay.grad_steps
    return MemoryPlan(params, trainable, params * width, optimizer, copies, kv_pool, one_forward * forwards)


def check_startup(config: TrainConfig, device: torch.device, plan: MemoryPlan) -> None:
    """Refuse (ValueError listing everything missing) a run of a real-size model without weights, without text
    prompts, or on the CPU, before anything is built."""
    if plan.params < REAL_MODEL_PARAMS:
        return
    m, missing = config.model, []
    if m.pretrained is None and m.causal_checkpoint is None:
        missing.append("weights: set model.pretrained (a diffusers Wan folder) or model.causal_checkpoint "
                       "(Self-Forcing / LongLive .pt); without them this is a random model")
    if config.rollout.prompts_file is None:
        missing.append("prompts: set rollout.prompts_file (a .txt file, one prompt a line, or UMT5 embeddings .pt)")
    if device.type != "cuda":
        missing.append(f"a GPU: run.device resolves to {device}, a {plan.params / 1e9:.2f}B-parameter model needs "
                       "CUDA")
    if missing:
        raise ValueError(f"kvpo-train: refusing to start a {plan.params / 1e9:.2f}B-parameter run; missing:\n  - " +
                         "\n  - ".join(missing))
