"""Building the trained model: the WanTransformer3DModel (pretrained, causal checkpoint or random init), its dtype
cast that keeps diffusers' float32 modules, and the device it runs on."""
from __future__ import annotations

import torch

from .config import TrainConfig
from .distributed import DistInfo

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_transformer(config: TrainConfig):
    """The WanTransformer3DModel: pretrained (``model.pretrained``) or a random one of the configured geometry."""
    from diffusers import WanTransformer3DModel

    model_config = config.model
    dtype = DTYPES[model_config.dtype]
    if model_config.pretrained is not None:
        model = WanTransformer3DModel.from_pretrained(model_config.pretrained, subfolder=model_config.subfolder,
                                                      torch_dtype=dtype)
    else:
        model = random_transformer(config)
        if model_config.causal_checkpoint is not None:
            from ..integrations.diffusers import load_causal_wan_weights

            load_causal_wan_weights(model, model_config.causal_checkpoint, key=model_config.causal_checkpoint_key)
        # (float32 is the construction dtype: no cast, which diffusers would warn about)
        if dtype != torch.float32:
            cast_keeping_fp32_modules(model, dtype)
    if model_config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def cast_keeping_fp32_modules(model, dtype: torch.dtype) -> None:
    """Cast ``model`` to ``dtype`` in place as ``from_pretrained(torch_dtype=dtype)`` does: the modules diffusers keeps
    in float32 (``_keep_in_fp32_modules``: for Wan the RoPE tables, time embedder, modulation tables and norms) keep
    their dtype. ``model.to(dtype)`` would round the float32 RoPE cos/sin to bf16 (up to 2e-3 error in every rotation)
    and the timestep embedding and modulation, unlike diffusers' own bf16 loading (``model.pretrained``), which the
    random / causal-checkpoint model now matches. (The first parameter, the fp32 ``scale_shift_table``, then makes
    the rollout latents fp32; the transformer itself computes in bf16.)"""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and not keep.intersection(name.split(".")):
                tensor.data = tensor.data.to(dtype)


def random_transformer(config: TrainConfig):
    """A randomly initialised Wan transformer of the ``model`` section's geometry, seeded by ``run.seed`` (the
    global RNG is forked, not advanced)."""
    from diffusers import WanTransformer3DModel

    model_config = config.model
    frames = config.rollout.num_blocks * config.streaming.frames_per_block
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=model_config.num_attention_heads,
            attention_head_dim=model_config.attention_head_dim, in_channels=model_config.latent_channels,
            out_channels=model_config.latent_channels, text_dim=model_config.text_dim,
            freq_dim=model_config.freq_dim, ffn_dim=model_config.ffn_dim, num_layers=model_config.num_layers,
            rope_max_seq_len=max(1024, 2 * frames))
    return model


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """``run.device`` -> a torch device: ``auto`` is this rank's GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and info.world_size > 1:
        return torch.device(f"cuda:{info.local_rank}")
    return torch.device(name)
