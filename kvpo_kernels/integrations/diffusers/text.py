"""Text prompts for a Wan generator: a prompts file, the UMT5 text encoder of a local diffusers Wan folder, and an
on-disk cache of the embeddings.

The embeddings follow diffusers' ``WanPipeline._get_t5_prompt_embeds``: the cleaned prompt is tokenized to
``max_length`` (512 for Wan2.1) with padding and truncation, the encoder runs with the attention mask, and every
position past the prompt's own tokens is set to exactly zero (the pipeline trims each sequence to its length and
pads it back with zeros), so padding carries no signal into the cross-attention.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
from typing import List, Sequence, Tuple

import torch

from .weights import require_extra

WAN_TEXT_LENGTH = 512


def read_prompts_file(path: str) -> List[str]:
    """Prompts of a text file: one per non-empty line (surrounding whitespace removed)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"rollout.prompts_file: no file at {path!r}")
    with open(path, encoding="utf-8") as handle:
        prompts = [line.strip() for line in handle if line.strip()]
    if not prompts:
        raise ValueError(f"rollout.prompts_file: {path!r} holds no prompt (one per line)")
    return prompts


def text_encoder_paths(path: str) -> Tuple[str, str]:
    """``(encoder_dir, tokenizer_dir)`` of a diffusers Wan folder (``text_encoder/`` + ``tokenizer/``) or of a
    folder holding both the UMT5 encoder and its tokenizer."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.text_encoder / model.pretrained: no folder at {path!r}")
    if os.path.isdir(os.path.join(path, "text_encoder")):
        return os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer")
    return path, path


def encoder_identity(path: str, max_length: int) -> str:
    """A key of the encoder's identity: its folder, its config and the size/mtime of its weight files."""
    encoder_dir, tokenizer_dir = text_encoder_paths(path)
    parts = [os.path.abspath(encoder_dir), os.path.abspath(tokenizer_dir), str(max_length)]
    for directory in (encoder_dir, tokenizer_dir):
        for name in sorted(os.listdir(directory)):
            stat = os.stat(os.path.join(directory, name))
            parts.append(f"{name}:{stat.st_size}:{int(stat.st_mtime)}")
    with open(os.path.join(encoder_dir, "config.json")) as handle:
        parts.append(json.dumps(json.load(handle), sort_keys=True))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def load_text_encoder(path: str, device, dtype: torch.dtype):
    """``(tokenizer, UMT5EncoderModel)`` from local files only (eval mode, no grad)."""
    transformers = require_extra("transformers", "text prompts (rollout.prompts_file as .txt)")
    encoder_dir, tokenizer_dir = text_encoder_paths(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    encoder = transformers.UMT5EncoderModel.from_pretrained(encoder_dir, local_files_only=True, dtype=dtype)
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(prompts: Sequence[str], tokenizer, encoder, *, max_length: int = WAN_TEXT_LENGTH,
                   batch_size: int = 8) -> torch.Tensor:
    """``[P, max_length, d_model]`` float32 CPU embeddings, masked and zero-padded as Wan's pipeline does."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    device = next(encoder.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = [prompt_clean(p) for p in prompts[start:start + batch_size]]
        tokens = tokenizer(batch, padding="max_length", max_length=max_length, truncation=True,
                           add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        hidden = encoder(tokens.input_ids.to(device), mask).last_hidden_state.float()
        # Zero past each prompt's length (the pipeline's trim + zero pad: the masked positions' outputs are not 0).
        out.append((hidden * mask.gt(0).unsqueeze(-1)).cpu())
    return torch.cat(out)


def cached_prompt_embeds(prompts: Sequence[str], encoder_path: str, cache_dir: str, *, device, dtype: torch.dtype,
                         max_length: int = WAN_TEXT_LENGTH) -> torch.Tensor:
    """The embeddings of ``prompts`` (``[P, max_length, d_model]`` float32, CPU), read from ``cache_dir`` when this
    prompt list was encoded there by this encoder, else encoded once and written; the encoder is freed after."""
    key = hashlib.sha256(json.dumps([list(prompts), encoder_identity(encoder_path, max_length)]).encode())
    path = os.path.join(cache_dir, f"prompts-{key.hexdigest()[:16]}.pt")
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)["embeds"]
    tokenizer, encoder = load_text_encoder(encoder_path, device, dtype)
    embeds = encode_prompts(prompts, tokenizer, encoder, max_length=max_length)
    del tokenizer, encoder
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"   # ranks of a multi-process run may all write it: same content, atomic replace
    torch.save({"prompts": list(prompts), "embeds": embeds}, tmp)
    os.replace(tmp, path)
    return embeds
