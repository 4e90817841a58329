"""Loading Self-Forcing / LongLive checkpoints (original Wan names) into diffusers' ``WanTransformer3DModel``."""
from __future__ import annotations

import os
import re
from typing import Optional

import torch


# Original Wan (Self-Forcing / LongLive CausalWanModel) names -> diffusers WanTransformer3DModel names, learnt from
# diffusers' scripts/convert_wan_to_diffusers.py. The original block applies norm1, norm3 (the affine cross-attention
# norm), norm2 (no parameters) in that order; diffusers renames them norm1, norm2, norm3.
_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
_IN_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
# Wrappers that training frameworks put around the generator (FSDP, activation checkpointing, DDP, the
# Self-Forcing WanDiffusionWrapper's `model.`, a trainer's `generator.`).
_WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_PREFIXES = ("module.", "generator.", "model.", "diffusion_model.")


def _strip(key: str) -> str:
    for fragment in _WRAPPER_FRAGMENTS:
        key = key.replace(fragment, "")
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def convert_causal_wan_state_dict(state_dict: dict) -> dict:
    """Rename a causal-Wan state dict (original Wan names, optionally wrapped) to ``WanTransformer3DModel`` names.

    Raises ``ValueError`` listing the keys it cannot map (LoRA adapters must be merged first; image-conditioning
    weights are not part of the T2V model).
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    out, unknown = {}, []
    for raw_key, tensor in state_dict.items():
        key = _strip(raw_key)
        new = None
        if key in ("head.modulation",):
            new = "scale_shift_table"
        elif key.rsplit(".", 1)[0] in _TOP_LEVEL and key.rsplit(".", 1)[-1] in ("weight", "bias"):
            module, leaf = key.rsplit(".", 1)
            new = f"{_TOP_LEVEL[module]}.{leaf}"
        elif re.fullmatch(r"blocks\.\d+\.modulation", key):
            new = key.replace(".modulation", ".scale_shift_table")
        else:
            match = _BLOCK_KEY.match(key)
            if match and match.group(2) in _IN_BLOCK:
                new = f"blocks.{match.group(1)}.{_IN_BLOCK[match.group(2)]}.{match.group(3)}"
        if new is None:
            unknown.append(raw_key)
        elif new in out:
            raise ValueError(f"state_dict: two keys map to {new!r} (one is {raw_key!r}); pass one generator's "
                             f"weights only")
        else:
            out[new] = tensor
    if unknown:
        hint = " (LoRA adapter weights: merge them into the base weights first)" if any(
            "lora" in k for k in unknown) else ""
        raise ValueError(f"state_dict: {len(unknown)} keys are not causal-Wan T2V weights{hint}: {unknown[:8]}")
    return out


def _read_checkpoint(path: str, key: Optional[str]) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no checkpoint file at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        obj = load_file(path)
    else:
        try:  # memory-mapped: a 1.3B generator's several copies (EMA, optimizer) are not all read
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"path: {path!r} holds a {type(obj).__name__}, not a state dict")
    if key is not None:
        if key not in obj:
            raise KeyError(f"key: {key!r} not in checkpoint; it has {sorted(obj)[:8]}")
        obj = obj[key]
    elif not all(isinstance(v, torch.Tensor) for v in obj.values()):
        # Self-Forcing / LongLive training checkpoints: {"generator": sd, "generator_ema": sd, ...}; EMA first,
        # as their inference scripts use it.
        for candidate in ("generator_ema", "generator", "model", "state_dict", "module"):
            if isinstance(obj.get(candidate), dict):
                obj = obj[candidate]
                break
        else:
            raise ValueError(f"path: cannot find the generator's state dict in {path!r} (top-level keys "
                             f"{sorted(obj)[:8]}); pass key=")
    return obj


def load_causal_wan_weights(transformer, path: str, *, key: Optional[str] = None, strict: bool = True):
    """Load a Self-Forcing / LongLive causal-Wan checkpoint from a local file into ``transformer``.

    ``path``: ``.pt``/``.pth`` (``torch.load``, weights only) or ``.safetensors``; a training checkpoint's
    sub-dict is chosen by ``key`` (default: ``generator_ema``, else ``generator``, ``model``, ``state_dict``).
    Keys are renamed by :func:`convert_causal_wan_state_dict` and loaded with ``load_state_dict(strict=strict)``;
    returns its ``(missing_keys, unexpected_keys)``. Nothing is downloaded.
    """
    converted = convert_causal_wan_state_dict(_read_checkpoint(os.fspath(path), key))
    expected = transformer.state_dict()
    for name, tensor in converted.items():
        if name in expected and tuple(expected[name].shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint: {name} has shape {tuple(tensor.shape)}, the transformer expects "
                             f"{tuple(expected[name].shape)} (wrong model config?)")
    result = transformer.load_state_dict(converted, strict=strict)
    return result.missing_keys, result.unexpected_keys


def require_extra(module: str, feature: str):
    """Import optional dependency ``module`` for ``feature``, or raise an ImportError naming the ``models`` extra.

    The kernels and the synthetic trainer work without peft / transformers / imageio; LoRA, text encoding, the
    learned rewards and sample videos need them.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{feature} needs the optional package {module.split('.')[0]!r}: "
                          f"pip install 'kvpo_kernels[models]'") from error


def causal_wan_module_name(module: str) -> Optional[str]:
    """The diffusers name of an original-Wan module path (``blocks.3.self_attn.q`` -> ``blocks.3.attn1.to_q``), or
    None when it is not a causal-Wan T2V module."""
    if module in _TOP_LEVEL:
        return _TOP_LEVEL[module]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if match and match.group(2) in _IN_BLOCK:
        return f"blocks.{match.group(1)}.{_IN_BLOCK[match.group(2)]}"
    return None
