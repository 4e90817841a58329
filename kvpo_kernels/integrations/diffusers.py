"""Streaming (block-causal) rollouts of a diffusers ``WanTransformer3DModel`` over a :class:`GroupKVCache`.

Three pieces:

- :class:`RoutedWanAttnProcessor`: the self-attention processor. Inside a streaming forward it applies RoPE at the
  block's absolute frame offset (so positions match a full-sequence forward), optionally writes the block's RoPE'd
  K/V into the group cache, and attends through :func:`kvpo_kernels.routed_attention`: the cached history through
  each sequence's row of one batched block table, then the block's own K/V as ``k_new``/``v_new``. Outside a
  streaming forward it behaves exactly like diffusers' ``WanAttnProcessor``. Cross-attention is left unchanged.
- :class:`StreamingWanGenerator`: the few-step block-by-block sampler of the distilled causal Wan generators
  (Self-Forcing / LongLive): per block, per step, predict x0 (flow matching ``x0 = x_t - sigma * v``) and re-noise
  to the next sigma; then one forward on the clean block at timestep 0 writes its K/V into the cache. All sequences
  of a cache (a group's branches and the anchor) run batched in one forward, each with its own route.
- :func:`load_causal_wan_weights`: maps Self-Forcing / LongLive checkpoints (original Wan names, ``.pt`` or
  safetensors) onto ``WanTransformer3DModel``.

Plugging into your own transformer (a KVPO group: rollout to frame 21, fork, 8 routed branches + the anchor)::

    from kvpo_kernels.integrations.diffusers import (StreamingConfig, StreamingWanGenerator, WAN_T2V_1_3B_CONFIG,
                                                     load_causal_wan_weights)
    from kvpo_kernels.routing import chr_routes

    transformer = WanTransformer3DModel(**WAN_T2V_1_3B_CONFIG).to("cuda", torch.bfloat16)
    load_causal_wan_weights(transformer, "longlive_base.pt")          # local file, original Wan key names
    gen = StreamingWanGenerator(transformer, StreamingConfig())        # LongLive geometry, 60 x 104 latents
    cache = gen.new_cache(1)
    for i in range(7):                                                 # blocks 0..6 = frames 0..20
        gen.generate_block(cache, i, noise[i], prompt_embeds)
    routes = chr_routes(gen.route_pool(cache, 7), 8, gen.num_routed)   # 8 routes of 5 frames among 6..19
    group = cache.fork(9)                                              # shares the history: no K/V copy
    out = gen.generate_block(group, 7, group_noise, prompt_embeds, routes=routes + [None])  # one batched forward
    x0 = gen.predict_x0(cache.fork(8), 7, out.x_t[k, :8], gen.sigmas[k], prompt_embeds, routes=routes)  # has grad

``cache`` is untouched by the group (a snapshot), so replays fork it again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import numbers
import os
import re
from typing import NamedTuple, Optional, Sequence

import torch

from .. import routed_attention
from ..cache import GroupKVCache

__all__ = ["StreamingConfig", "StreamingWanGenerator", "BlockRollout", "RoutedWanAttnProcessor",
           "install_routed_attention", "convert_causal_wan_state_dict", "load_causal_wan_weights",
           "WAN_T2V_1_3B_CONFIG"]

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

    def __post_init__(self):
        for name in ("frames_per_block", "sink_frames", "window_frames", "nearest_frames", "cache_frames",
                     "latent_height", "latent_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"StreamingConfig.{name} must be an int, got {value!r}")
            if value < (0 if name == "sink_frames" else 1):
                raise ValueError(f"StreamingConfig.{name} must be positive, got {value}")
        self.timesteps = tuple(self.timesteps)
        if not self.timesteps or any(not 0 < float(t) <= 1000 for t in self.timesteps):
            raise ValueError(f"StreamingConfig.timesteps must be a non-empty sequence in (0, 1000], "
                             f"got {self.timesteps}")
        if not float(self.shift) > 0:
            raise ValueError(f"StreamingConfig.shift must be > 0, got {self.shift}")

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


# --------------------------------------------------------------------------------------------------- processor
@dataclasses.dataclass
class _BlockContext:
    """What the self-attention layers need during one streaming forward (same for every layer)."""

    cache: GroupKVCache
    block_table: torch.Tensor         # int32 [B, M]
    block_counts: torch.Tensor        # int32 [B]
    rotary: tuple                     # (cos, sin), each [1, f * S, 1, D] float32, at the block's frame offset
    write_ids: Optional[torch.Tensor]  # int64 [B, f] blocks to fill with this block's K/V, or None (read only)
    backend: str                      # routed_attention backend


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
        # The cache builds the tables from resident blocks only, so the per-call host check of block ids (a
        # device sync in each of the model's layers) is skipped.
        out = routed_attention(query, k_cache, v_cache, context.block_table, context.block_counts,
                               key, value, backend=context.backend, check_block_ids=False)
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


# --------------------------------------------------------------------------------------------------- generator
class StreamingWanGenerator:
    """Block-by-block few-step sampler of a causal Wan generator over a :class:`GroupKVCache`.

    ``block_index`` ``i`` covers latent frames ``[i * f, (i + 1) * f)`` (``f = config.frames_per_block``); the
    cache's batch holds the sequences (a group's branches + anchor) that run batched in one forward; ``routes``
    (one entry per sequence: a list of older frames, or None for the default window) say which history each reads.

    Args:
        transformer: a ``diffusers.WanTransformer3DModel`` (patch_size[0] must be 1: one pool block = one frame).
        config: window geometry and sampler.
        backend: routed_attention backend (``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``, ``"cpu"``).
    """

    def __init__(self, transformer, config: StreamingConfig = StreamingConfig(), *, backend: str = "auto"):
        from diffusers import WanTransformer3DModel

        if not isinstance(transformer, WanTransformer3DModel):
            raise TypeError(f"transformer must be a diffusers.WanTransformer3DModel, got {type(transformer).__name__}")
        if not isinstance(config, StreamingConfig):
            raise TypeError(f"config must be a StreamingConfig, got {type(config).__name__}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        patch = tuple(transformer.config.patch_size)
        if patch[0] != 1:
            raise ValueError(f"transformer: temporal patch size must be 1 (one cache block per latent frame), "
                             f"got patch_size {patch}")
        if config.latent_height % patch[1] or config.latent_width % patch[2]:
            raise ValueError(f"config: latent_height x latent_width ({config.latent_height} x {config.latent_width})"
                             f" must be divisible by the spatial patch size {patch[1:]}")
        # Validates the window geometry once, with the cache's own error messages.
        GroupKVCache(1, 1, 1, 1, frames_per_block=config.frames_per_block, sink_frames=config.sink_frames,
                     window_frames=config.window_frames, nearest_frames=config.nearest_frames,
                     cache_frames=config.cache_frames, device="meta")
        self.transformer = transformer
        self.config = dataclasses.replace(config)  # a copy: the default instance is shared between generators
        self.backend = backend
        self._state = install_routed_attention(transformer)
        self.sigmas = config.sigmas()

    # ------------------------------------------------------------------------------------------------- helpers
    @property
    def frame_tokens(self) -> int:
        _, ph, pw = self.transformer.config.patch_size
        return (self.config.latent_height // ph) * (self.config.latent_width // pw)

    @property
    def num_routed(self) -> int:
        """Routed frames per branch, ``window - sink - nearest`` (LongLive: 5)."""
        c = self.config
        return max(0, c.window_frames - c.sink_frames - c.nearest_frames)

    def new_cache(self, batch_size: int, *, reserve_blocks: Optional[int] = None,
                  dtype: Optional[torch.dtype] = None) -> GroupKVCache:
        """An empty cache for ``batch_size`` sequences on the transformer's device.

        ``dtype``: of the stored K/V, default the self-attention weights' dtype (pass the autocast dtype when the
        weights are fp32 under autocast). ``reserve_blocks``: pool blocks allocated now (default
        ``batch_size * cache_frames``, a rollout's steady state; see :meth:`GroupKVCache.reserve` for groups).
        """
        weight = self.transformer.blocks[0].attn1.to_k.weight
        c = self.transformer.config
        if reserve_blocks is None:
            reserve_blocks = batch_size * self.config.cache_frames if weight.device.type != "meta" else 0
        return GroupKVCache(c.num_layers, self.frame_tokens, c.num_attention_heads, c.attention_head_dim,
                            batch_size=batch_size, frames_per_block=self.config.frames_per_block,
                            sink_frames=self.config.sink_frames, window_frames=self.config.window_frames,
                            nearest_frames=self.config.nearest_frames, cache_frames=self.config.cache_frames,
                            dtype=weight.dtype if dtype is None else dtype, device=weight.device,
                            reserve_blocks=reserve_blocks)

    def route_pool(self, cache: GroupKVCache, block_index: int, perturbed_blocks: int = 1) -> list[int]:
        """Frames a route may use when forking at ``block_index`` (see :meth:`GroupKVCache.route_pool`)."""
        return cache.route_pool(self._start(block_index), perturbed_blocks)

    def _start(self, block_index) -> int:
        if isinstance(block_index, bool) or not isinstance(block_index, numbers.Integral):
            raise TypeError(f"block_index must be an int, got {block_index!r}")
        if block_index < 0:
            raise ValueError(f"block_index must be >= 0, got {block_index}")
        return int(block_index) * self.config.frames_per_block

    def _check_block(self, cache, name: str, x: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        if not isinstance(cache, GroupKVCache):
            raise TypeError(f"cache must be a GroupKVCache (from new_cache), got {type(cache).__name__}")
        if not isinstance(x, torch.Tensor) or not isinstance(prompt_embeds, torch.Tensor):
            raise TypeError(f"{name} and prompt_embeds must be tensors")
        c = self.transformer.config
        expected = (cache.batch_size, c.in_channels, self.config.frames_per_block, self.config.latent_height,
                    self.config.latent_width)
        if tuple(x.shape) != expected:
            raise ValueError(f"{name} must have shape [B, C, f, H, W] = {list(expected)} (batch of the cache, "
                             f"config.frames_per_block, config.latent_height/width), got {list(x.shape)}")
        if cache.frame_tokens != self.frame_tokens or cache.num_layers != c.num_layers:
            raise ValueError(f"cache: built for {cache.frame_tokens} tokens/frame and {cache.num_layers} layers, "
                             f"this generator needs {self.frame_tokens} and {c.num_layers}")
        if cache.device != x.device:
            raise ValueError(f"{name} is on {x.device} but the cache is on {cache.device}")
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] not in (1, cache.batch_size) \
                or prompt_embeds.shape[2] != c.text_dim:
            raise ValueError(f"prompt_embeds must have shape [B or 1, L, text_dim={c.text_dim}], "
                             f"got {list(prompt_embeds.shape)}")
        return prompt_embeds.expand(cache.batch_size, -1, -1)

    def _sigma(self, sigma, batch: int, device) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
        if sigma.dim() > 1 or (sigma.dim() == 1 and sigma.shape[0] not in (1, batch)):
            raise ValueError(f"sigma must be a float, a scalar tensor or a [B={batch}] tensor, "
                             f"got shape {list(sigma.shape)}")
        return sigma.reshape(-1).expand(batch)

    def _forward(self, cache: GroupKVCache, start: int, x: torch.Tensor, sigma: torch.Tensor,
                 prompt_embeds: torch.Tensor, tables, write_ids) -> torch.Tensor:
        """Velocity ``v [B, C, f, H, W]`` of one block, attending to the cache (and writing it with write_ids)."""
        table, counts = tables
        _, ph, pw = self.transformer.config.patch_size
        rotary = _block_rotary(self.transformer.rope, start, x.shape[2], x.shape[3] // ph, x.shape[4] // pw)
        rotary = tuple(r.to(x.device) for r in rotary)
        transformer = self.transformer
        if _installed_state(transformer) is not self._state:
            raise RuntimeError("the transformer's self-attention processors were replaced after this generator "
                               "installed its own (set_attn_processor?): build a new StreamingWanGenerator")
        context = _BlockContext(cache, table, counts, rotary, write_ids, self.backend)
        patched = transformer.gradient_checkpointing and torch.is_grad_enabled()
        if patched:
            # A checkpointed block recomputes during backward, after this call returned: bind its context there
            # too, so the recomputation reads the same cache view.
            outer = transformer._gradient_checkpointing_func

            def bound(block, *args):
                def run(*inner):
                    with self._state.bind(context):
                        return block(*inner)
                return outer(run, *args)

            transformer._gradient_checkpointing_func = bound
        dtype = transformer.patch_embedding.weight.dtype
        try:
            with self._state.bind(context):
                return transformer(x.to(dtype), sigma * 1000.0, prompt_embeds.to(dtype), return_dict=False)[0]
        finally:
            if patched:
                transformer._gradient_checkpointing_func = outer

    # ---------------------------------------------------------------------------------------------- public API
    def predict_x0(self, cache: GroupKVCache, block_index: int, x_t: torch.Tensor, sigma, prompt_embeds,
                   *, routes: Optional[Sequence] = None) -> torch.Tensor:
        """``x0 = x_t - sigma * v(x_t, 1000 * sigma)`` for block ``block_index`` of every sequence of ``cache``.

        x_t: ``[B, C, f, H, W]``; sigma: float, scalar or ``[B]``; prompt_embeds: ``[B or 1, L, text_dim]``;
        routes: None or one entry per sequence (list of older frames, or None for the default window).
        Differentiable w.r.t. the transformer's parameters (and x_t, prompt_embeds); reads the cache, never
        writes it. Returns ``[B, C, f, H, W]`` in x_t's dtype.
        """
        start = self._start(block_index)
        prompt_embeds = self._check_block(cache, "x_t", x_t, prompt_embeds)
        sigma = self._sigma(sigma, x_t.shape[0], x_t.device)
        tables = cache.block_table(start, routes, device=x_t.device)
        v = self._forward(cache, start, x_t, sigma, prompt_embeds, tables, None)
        return (x_t.float() - sigma.view(-1, 1, 1, 1, 1) * v.float()).to(x_t.dtype)

    @torch.no_grad()
    def commit_block(self, cache: GroupKVCache, block_index: int, x0: torch.Tensor, prompt_embeds, *,
                     routes: Optional[Sequence] = None) -> None:
        """One forward of the clean block ``x0 [B, C, f, H, W]`` at timestep 0 that writes its K/V into the cache
        (the block must be the cache's next one), then evicts the frames no later block can read."""
        start = self._start(block_index)
        prompt_embeds = self._check_block(cache, "x0", x0, prompt_embeds)
        if cache.num_frames != start:
            raise ValueError(f"block_index {block_index}: the cache holds frames up to {cache.num_frames}, so the "
                             f"next block to commit starts at frame {cache.num_frames}, not {start}")
        # The table (built before the new blocks exist) also validates the routes before anything is allocated.
        tables = cache.block_table(start, routes, device=x0.device)
        write_ids = cache.append_frames(self.config.frames_per_block)
        try:
            self._forward(cache, start, x0, self._sigma(0.0, x0.shape[0], x0.device), prompt_embeds, tables,
                          write_ids)
        finally:
            cache.evict()

    @torch.no_grad()
    def generate_block(self, cache: GroupKVCache, block_index: int, noise: torch.Tensor, prompt_embeds, *,
                       step_noise: Optional[Sequence[torch.Tensor]] = None, routes: Optional[Sequence] = None,
                       commit: bool = True) -> BlockRollout:
        """The few-step sampler for one block: ``x_t0 = noise``; per step ``k``: ``x0_k = predict_x0(x_tk,
        sigma_k)``, ``x_t(k+1) = (1 - s_(k+1)) x0_k + s_(k+1) step_noise[k]`` (``K - 1`` tensors like noise;
        fresh ``randn`` when None); commits the final clean block when ``commit``. Runs without grad."""
        steps = len(self.sigmas)
        if step_noise is not None:
            step_noise = list(step_noise)
            if len(step_noise) != steps - 1:
                raise ValueError(f"step_noise must hold K - 1 = {steps - 1} tensors (one per re-noising), "
                                 f"got {len(step_noise)}")
            for k, eps in enumerate(step_noise):
                if not isinstance(eps, torch.Tensor) or eps.shape != noise.shape:
                    raise ValueError(f"step_noise[{k}] must be a tensor of noise's shape {list(noise.shape)}")
        sigmas = self.sigmas.to(noise.device)
        x_t, inputs, preds = noise, [], []
        for k in range(steps):
            inputs.append(x_t)
            x0 = self.predict_x0(cache, block_index, x_t, sigmas[k], prompt_embeds, routes=routes)
            preds.append(x0)
            if k + 1 < steps:
                eps = torch.randn_like(noise) if step_noise is None else step_noise[k].to(noise)
                x_t = ((1 - sigmas[k + 1]) * x0.float() + sigmas[k + 1] * eps.float()).to(noise.dtype)
        if commit:
            self.commit_block(cache, block_index, preds[-1], prompt_embeds, routes=routes)
        return BlockRollout(preds[-1], torch.stack(inputs), torch.stack(preds), self.sigmas.clone())

    @torch.no_grad()
    def generate(self, noise: torch.Tensor, prompt_embeds: torch.Tensor, *, cache: Optional[GroupKVCache] = None,
                 progress: bool = False) -> torch.Tensor:
        """Sample ``noise [B, C, F, H, W]`` (F a multiple of frames_per_block) block by block into clean latents
        ``[B, C, F, H, W]``, starting at the cache's next block (a new cache when None)."""
        if not isinstance(noise, torch.Tensor) or noise.dim() != 5:
            raise ValueError(f"noise must be a [B, C, F, H, W] tensor, got "
                             f"{list(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
        f = self.config.frames_per_block
        if noise.shape[2] % f:
            raise ValueError(f"noise: F = {noise.shape[2]} frames is not a multiple of frames_per_block = {f}")
        cache = self.new_cache(noise.shape[0]) if cache is None else cache
        if not isinstance(cache, GroupKVCache):
            raise TypeError(f"cache must be a GroupKVCache, got {type(cache).__name__}")
        if cache.num_frames % f:
            raise ValueError(f"cache: holds {cache.num_frames} frames, not a whole number of blocks")
        first = cache.num_frames // f
        blocks = range(noise.shape[2] // f)
        if progress:
            from tqdm.auto import tqdm
            blocks = tqdm(blocks, desc="blocks")
        out = [self.generate_block(cache, first + i, noise[:, :, i * f:(i + 1) * f], prompt_embeds).x0
               for i in blocks]
        return torch.cat(out, dim=2)


# ------------------------------------------------------------------------------------------------------ weights
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

