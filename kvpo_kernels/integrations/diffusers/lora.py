"""LoRA adapters on ``WanTransformer3DModel`` through peft, as diffusers models take them (``add_adapter``).

- :func:`add_lora`: a peft ``LoraConfig`` on every Linear of every transformer block (or the chosen ones); only the
  adapter weights require grad. ``lora_B`` starts at zero, so the adapted model first computes the base model.
- :func:`load_causal_wan_lora`: LongLive's released ``lora.pt`` (a peft state dict of ``CausalWanModel`` names,
  possibly under ``generator_lora``) mapped to diffusers names and loaded into the adapter.
- :func:`save_lora_adapter`: the adapter as ``pytorch_lora_weights.safetensors`` in the format of diffusers'
  ``WanPipeline.load_lora_weights`` / ``WanTransformer3DModel.load_lora_adapter`` (``transformer.`` prefix, with
  rank/alpha metadata). :func:`merged_state_dict` / :func:`save_merged`: base + scale * B @ A, the plain model's
  names.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Optional, Sequence

import torch

from .weights import _strip, causal_wan_module_name, require_extra

ADAPTER = "default"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# A peft LoRA parameter: module path, then lora_A / lora_B, optionally the adapter name, then weight (or bias).
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.(?P<leaf>weight|bias)$")
_PEFT_PREFIX = "base_model.model."


def block_linear_names(transformer) -> list:
    """Module names, relative to a block, of every ``nn.Linear`` in the transformer's blocks (``attn1.to_q``, ...)."""
    names = []
    for name, module in transformer.blocks[0].named_modules():
        # with an adapter on, a target's own Linear is its ``base_layer`` and its lora_A / lora_B are Linears too
        if isinstance(module, torch.nn.Linear) and ".lora_" not in f".{name}":
            names.append(name.replace(".base_layer", ""))
    return names


def lora_target_pattern(transformer, targets: Optional[Sequence[str]] = None) -> str:
    """peft ``target_modules`` regex (full match) for ``targets`` (block-relative names, default: every Linear of
    every transformer block). Raises ValueError naming ``model.lora_targets`` for a name that is no block Linear."""
    linears = block_linear_names(transformer)
    if targets is None:
        targets = linears
    targets = list(targets)
    unknown = [t for t in targets if t not in linears]
    if not targets or unknown:
        raise ValueError(f"model.lora_targets: {unknown or targets} are not Linear layers of a transformer block; "
                         f"known: {linears}")
    return r"^blocks\.\d+\.(" + "|".join(re.escape(t) for t in targets) + r")$"


def add_lora(transformer, rank: int, alpha: Optional[float] = None, dropout: float = 0.0,
             targets: Optional[Sequence[str]] = None) -> list:
    """Add a peft LoRA adapter (``lora_alpha / r`` scaling) to ``transformer`` in place; freeze everything else.

    Returns the adapter parameters (the only ones with ``requires_grad``), in ``named_parameters`` order.
    """
    peft = require_extra("peft", "LoRA (model.lora_rank)")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"model.lora_rank must be a positive int (0 or null: no LoRA), got {rank!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"model.lora_dropout must be in [0, 1), got {dropout!r}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"model.lora_alpha must be > 0, got {alpha!r}")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=float(dropout),
                             target_modules=lora_target_pattern(transformer, targets), init_lora_weights=True)
    transformer.requires_grad_(False)
    transformer.add_adapter(config, adapter_name=ADAPTER)
    params = []
    for name, param in transformer.named_parameters():
        param.requires_grad_(".lora_" in name)
        if param.requires_grad:
            params.append(param)
    return params


def lora_state_dict(transformer) -> Dict[str, torch.Tensor]:
    """The adapter's tensors, peft names without the adapter name (``blocks.0.attn1.to_q.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(transformer, adapter_name=ADAPTER).items()}


def convert_causal_wan_lora_state_dict(state_dict: dict) -> Dict[str, torch.Tensor]:
    """Rename a peft LoRA state dict of ``CausalWanModel`` names (``base_model.model.blocks.0.self_attn.q.lora_A
    .weight``, optionally wrapped or with an adapter name) to the adapter names of ``WanTransformer3DModel``
    (``blocks.0.attn1.to_q.lora_A.weight``). Raises ValueError listing the keys it cannot map."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    out, unknown = {}, []
    for raw_key, tensor in state_dict.items():
        key = _strip(raw_key.replace(_PEFT_PREFIX, ""))
        match = _LORA_KEY.match(key)
        module = causal_wan_module_name(_strip(match.group("module"))) if match else None
        if module is None:
            unknown.append(raw_key)
            continue
        new = f"{module}.{match.group('part')}.{match.group('leaf')}"
        if new in out:
            raise ValueError(f"state_dict: two keys map to {new!r} (one is {raw_key!r}); pass one adapter only")
        out[new] = tensor
    if unknown:
        raise ValueError(f"state_dict: {len(unknown)} keys are not LoRA weights of causal-Wan modules: {unknown[:8]}")
    return out


def _read_lora(path: str, key: Optional[str]) -> dict:
    """The LoRA state dict in ``path`` (.pt or .safetensors): under ``key``, else under ``generator_lora`` (LongLive's
    training checkpoints) when present, else the whole file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.lora_checkpoint: no file at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        obj = load_file(path)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if key is None and isinstance(obj, dict) and isinstance(obj.get("generator_lora"), dict):
        key = "generator_lora"
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            raise KeyError(f"model.lora_checkpoint: no {key!r} entry in {path!r}")
        obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"model.lora_checkpoint: {path!r} holds no LoRA state dict (nor a 'generator_lora' entry)")
    return obj


def load_lora_weights_into(transformer, state_dict: Dict[str, torch.Tensor], where: str) -> None:
    """Copy adapter tensors (names as :func:`lora_state_dict`) into the transformer's adapter; every adapter tensor
    must be given with its shape (a rank or target mismatch raises ValueError naming ``where``)."""
    expected = lora_state_dict(transformer)
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise ValueError(f"{where}: adapter keys differ from the model's LoRA (check model.lora_targets); missing "
                         f"{missing[:4]}, unexpected {extra[:4]}")
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{where}: {name} has shape {tuple(tensor.shape)}, the adapter expects "
                             f"{tuple(expected[name].shape)} (wrong model.lora_rank?)")
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(transformer, state_dict, adapter_name=ADAPTER)


def load_causal_wan_lora(transformer, path: str, *, key: Optional[str] = None) -> None:
    """Load an adapter file into ``transformer``'s LoRA (added first by :func:`add_lora` with the file's rank):
    LongLive's ``lora.pt`` (CausalWanModel names, ``generator_lora`` sub-dict), or an adapter saved by
    :func:`save_lora_adapter` (diffusers names, ``transformer.`` prefix)."""
    path = os.fspath(path)
    state = _read_lora(path, key)
    if all(k.startswith("transformer.") for k in state):
        converted = {k[len("transformer."):]: v for k, v in state.items()}
    else:
        converted = convert_causal_wan_lora_state_dict(state)
    load_lora_weights_into(transformer, converted, "model.lora_checkpoint")


def save_lora_adapter(transformer, directory: str) -> str:
    """Write the adapter as ``directory/pytorch_lora_weights.safetensors`` (diffusers' LoRA format: ``transformer.``
    prefix, peft config as metadata) so that ``WanPipeline.load_lora_weights(directory)`` loads it. Returns the path."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    config = transformer.peft_config[ADAPTER].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    WanLoraLoaderMixin.save_lora_weights(directory, transformer_lora_layers=lora_state_dict(transformer),
                                         weight_name=LORA_WEIGHTS_NAME, transformer_lora_adapter_metadata=config)
    return os.path.join(directory, LORA_WEIGHTS_NAME)


def merged_state_dict(transformer) -> Dict[str, torch.Tensor]:
    """The plain ``WanTransformer3DModel`` state dict with the adapter merged (``W + alpha / r * B @ A``)."""
    from peft.tuners.lora import LoraLayer

    merged = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            base = module.get_base_layer()
            merged[f"{name}.weight"] = (base.weight + module.get_delta_weight(ADAPTER)).detach()
            if base.bias is not None:
                merged[f"{name}.bias"] = base.bias.detach()
    out = {}
    for key, tensor in transformer.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        out[plain] = merged.get(plain, tensor)
    return out


def save_merged(transformer, path: str) -> str:
    """:func:`merged_state_dict` as a safetensors file (loads into a plain ``WanTransformer3DModel``)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in merged_state_dict(transformer).items()}, path)
    return path
