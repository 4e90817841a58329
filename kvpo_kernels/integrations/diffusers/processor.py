"""The routed self-attention processor for diffusers' ``WanTransformer3DModel`` and the RoPE tables of a block at
its absolute frame offset."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch

from ... import routed_attention
from ...cache import GroupKVCache


@dataclasses.dataclass
class _BlockContext:
    """What the self-attention layers need during one streaming forward (same for every layer)."""

    cache: GroupKVCache
    block_table: torch.Tensor         # int32 [B, M]
    block_counts: torch.Tensor        # int32 [B]
    rotary: tuple                     # (cos, sin), each [1, f * S, 1, D] float32, at the block's frame offset
    write_ids: Optional[torch.Tensor]  # int64 [B, f] blocks to fill with this block's K/V, or None (read only)
    backend: str                      # routed_attention backend
    attend_self: bool = True          # False: the queries read only the table (the block's own K/V are still
    #                                   written): MemFlow's re-cache of the frames outside the local window


class _StreamingState:
    """Shared by the processors of one transformer: the context of the streaming forward in progress, if any."""

    def __init__(self):
        self.context: Optional[_BlockContext] = None

    @contextlib.contextmanager
    def bind(self, context: _BlockContext):
        previous, self.context = self.context, context
        try:
            yield
        finally:
            self.context = previous


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # diffusers' WanAttnProcessor rotation on interleaved pairs (x[2i], x[2i+1]), in the frequencies' float32.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class RoutedWanAttnProcessor:
    """Self-attention of one ``WanTransformerBlock`` over the group KV cache (see the module docstring).

    Within a streaming forward: ``hidden_states [B, f * S, dim]`` are the tokens of one block of ``f`` frames;
    queries/keys get RoPE at the block's absolute frame offset; with ``write_ids`` the RoPE'd keys and the values
    are stored in the cache (detached); sequence ``b`` then attends to its table row's cached frames followed by
    its own block (``k_new``/``v_new``), unmasked. Gradients flow to q, k_new, v_new (hence to the weights), not to
    the cache. Outside a streaming forward: diffusers' ``WanAttnProcessor``, unchanged.
    """

    def __init__(self, layer_index: int, state: _StreamingState):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.layer_index = layer_index
        self.state = state
        self._default = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        context = self.state.context
        if context is None:
            return self._default(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        query = _apply_rotary(query, *context.rotary)
        key = _apply_rotary(key, *context.rotary)
        out_dtype = query.dtype
        if query.dtype != context.cache.dtype:
            # e.g. fp32 weights under bf16 autocast: the kernel wants one dtype, the cache's.
            query, key, value = (t.to(context.cache.dtype) for t in (query, key, value))
        if context.write_ids is not None:
            context.cache.write(self.layer_index, context.write_ids, key, value)
        k_cache, v_cache = context.cache.layer(self.layer_index)
        table, counts = context.block_table, context.block_counts
        # The cache builds the tables from resident blocks only, so the per-call host check of block ids (a
        # device sync in each of the model's layers) is skipped.
        own_key, own_value = (key, value) if context.attend_self else (None, None)
        out = routed_attention(query, k_cache, v_cache, table, counts, own_key, own_value, backend=context.backend,
                               check_block_ids=False)
        out = out.flatten(2, 3).to(out_dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _installed_state(transformer) -> Optional[_StreamingState]:
    """The state shared by the transformer's routed processors, or None unless every self-attention has one."""
    processors = [block.attn1.processor for block in transformer.blocks]
    if processors and all(isinstance(p, RoutedWanAttnProcessor) and p.state is processors[0].state and
                          p.layer_index == i for i, p in enumerate(processors)):
        return processors[0].state
    return None


def install_routed_attention(transformer) -> _StreamingState:
    """Put a :class:`RoutedWanAttnProcessor` on every self-attention (``blocks[i].attn1``) of ``transformer``.

    Returns the state the processors share (the installed one when they are already there, so several generators
    can drive one transformer). Cross-attention processors are not touched; outside a streaming forward the model
    computes exactly what it did before.
    """
    state = _installed_state(transformer)
    if state is None:
        state = _StreamingState()
        for index, block in enumerate(transformer.blocks):
            block.attn1.set_processor(RoutedWanAttnProcessor(index, state))
    return state


def _block_rotary(rope, start_frame: int, frames: int, height: int, width: int):
    """``(cos, sin)`` ``[1, frames * height * width, 1, D]`` of diffusers' WanRotaryPosEmbed for the frames
    ``[start_frame, start_frame + frames)`` of a longer video (its forward always starts at frame 0)."""
    if start_frame + frames > rope.max_seq_len:
        raise ValueError(f"block_index: frames up to {start_frame + frames} exceed the transformer's "
                         f"rope_max_seq_len ({rope.max_seq_len})")
    split = [rope.t_dim, rope.h_dim, rope.w_dim]
    tables = []
    for freqs in (rope.freqs_cos, rope.freqs_sin):
        t, h, w = freqs.split(split, dim=1)
        t = t[start_frame:start_frame + frames].view(frames, 1, 1, -1).expand(frames, height, width, -1)
        h = h[:height].view(1, height, 1, -1).expand(frames, height, width, -1)
        w = w[:width].view(1, 1, width, -1).expand(frames, height, width, -1)
        tables.append(torch.cat([t, h, w], dim=-1).reshape(1, frames * height * width, 1, -1))
    return tuple(tables)
