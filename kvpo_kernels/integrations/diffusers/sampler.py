"""The block-by-block few-step sampler of a causal Wan generator over a group KV cache."""
from __future__ import annotations

import dataclasses
import numbers
from typing import Optional, Sequence

import torch

from ...cache import GroupKVCache
from .config import BlockRollout, StreamingConfig
from .memflow import bank_record_slot, bank_saliency
from .processor import _BlockContext, _block_rotary, _installed_state, install_routed_attention


class StreamingWanGenerator:
    """Block-by-block few-step sampler of a causal Wan generator over a :class:`GroupKVCache`.

    ``block_index`` ``i`` covers latent frames ``[i * f, (i + 1) * f)`` (``f = config.frames_per_block``); the
    cache's batch holds the sequences (a group's branches + anchor) that run batched in one forward; ``routes``
    (one entry per sequence: a list of older frames, or None for the default window) say which history each reads
    (with ``config.route_layout="memflow"`` a route lists cache slots: :meth:`GroupKVCache.route_frames`).

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
                     cache_frames=config.cache_frames, route_layout=config.route_layout, device="meta")
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
        """Routed frames per branch: ``window - sink - nearest`` (LongLive: 5), or with ``route_layout="memflow"``
        ``window - nearest`` (released ``n_random = local_attn_size - m_nearest_frames``: 9), no separate sink."""
        c = self.config
        sink = 0 if c.route_layout == "memflow" else c.sink_frames
        return max(0, c.window_frames - sink - c.nearest_frames)

    def new_cache(self, batch_size: int, *, reserve_blocks: Optional[int] = None,
                  dtype: Optional[torch.dtype] = None) -> GroupKVCache:
        """An empty cache for ``batch_size`` sequences on the transformer's device.

        ``dtype``: of the stored K/V, default the self-attention weights' dtype (pass the autocast dtype when the
        weights are fp32 under autocast). ``reserve_blocks``: pool blocks allocated now (default
        ``batch_size * (cache_frames + memory_bank_frames + 1)`` with MemFlow's bank, else ``batch_size *
        cache_frames``: a rollout's steady state; see
        :meth:`GroupKVCache.reserve` for groups).
        """
        weight = self.transformer.blocks[0].attn1.to_k.weight
        c = self.transformer.config
        if reserve_blocks is None:
            # a sequence holds at most cache_frames resident frames plus (MemFlow) its bank slots and pending block
            bank = self.config.memory_bank_frames
            steady = self.config.cache_frames + (bank + 1 if bank else 0)
            reserve_blocks = batch_size * steady if weight.device.type != "meta" else 0
        return GroupKVCache(c.num_layers, self.frame_tokens, c.num_attention_heads, c.attention_head_dim,
                            batch_size=batch_size, frames_per_block=self.config.frames_per_block,
                            sink_frames=self.config.sink_frames, window_frames=self.config.window_frames,
                            nearest_frames=self.config.nearest_frames, cache_frames=self.config.cache_frames,
                            route_layout=self.config.route_layout, dtype=weight.dtype if dtype is None else dtype,
                            device=weight.device, reserve_blocks=reserve_blocks)

    def route_pool(self, cache: GroupKVCache, block_index: int, perturbed_blocks: int = 1) -> list[int]:
        """Frames (``route_layout="memflow"``: cache slots) a route may use when forking at ``block_index`` (see
        :meth:`GroupKVCache.route_pool`)."""
        return cache.route_pool(self._start(block_index), perturbed_blocks)

    def _start(self, block_index) -> int:
        if isinstance(block_index, bool) or not isinstance(block_index, numbers.Integral):
            raise TypeError(f"block_index must be an int, got {block_index!r}")
        if block_index < 0:
            raise ValueError(f"block_index must be >= 0, got {block_index}")
        return int(block_index) * self.config.frames_per_block

    def _check_block(self, cache, name: str, x: torch.Tensor, prompt_embeds: torch.Tensor,
                     frames: Optional[int] = None) -> torch.Tensor:
        if not isinstance(cache, GroupKVCache):
            raise TypeError(f"cache must be a GroupKVCache (from new_cache), got {type(cache).__name__}")
        if not isinstance(x, torch.Tensor) or not isinstance(prompt_embeds, torch.Tensor):
            raise TypeError(f"{name} and prompt_embeds must be tensors")
        c = self.transformer.config
        frames = self.config.frames_per_block if frames is None else frames
        expected = (cache.batch_size, c.in_channels, frames, self.config.latent_height, self.config.latent_width)
        if tuple(x.shape) != expected:
            raise ValueError(f"{name} must have shape [B, C, F, H, W] = {list(expected)} (batch of the cache, "
                             f"{frames} frames, config.latent_height/width), got {list(x.shape)}")
        if cache.frame_tokens != self.frame_tokens or cache.num_layers != c.num_layers:
            raise ValueError(f"cache: built for {cache.frame_tokens} tokens/frame and {cache.num_layers} layers, "
                             f"this generator needs {self.frame_tokens} and {c.num_layers}")
        if cache.route_layout != self.config.route_layout:
            raise ValueError(f"cache: built with route_layout {cache.route_layout!r}, this generator's "
                             f"config.route_layout is {self.config.route_layout!r} (use new_cache)")
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
                 prompt_embeds: torch.Tensor, table, write_ids, attend_self: bool = True) -> torch.Tensor:
        """Velocity ``v [B, C, f, H, W]`` of one block, attending to the cache (and writing it with write_ids).
        ``table``: the ``(block_table, block_counts)`` every layer reads; ``attend_self=False``: the queries read
        the table only, not the block's own K/V."""
        block_table, block_counts = table
        _, ph, pw = self.transformer.config.patch_size
        rotary = _block_rotary(self.transformer.rope, start, x.shape[2], x.shape[3] // ph, x.shape[4] // pw)
        rotary = tuple(r.to(x.device) for r in rotary)
        transformer = self.transformer
        if _installed_state(transformer) is not self._state:
            raise RuntimeError("the transformer's self-attention processors were replaced after this generator "
                               "installed its own (set_attn_processor?): build a new StreamingWanGenerator")
        context = _BlockContext(cache, block_table, block_counts, rotary, write_ids, self.backend,
                                attend_self=attend_self)
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

    def _history_table(self, cache: GroupKVCache, start: int, routes, device):
        """What block ``start`` reads (every layer): its history, and (MemFlow) the bank."""
        if self.config.memory_bank_frames:
            return cache.bank_block_table(start, routes, device=device)
        return cache.block_table(start, routes, device=device)

    def _record_bank(self, cache: GroupKVCache, block_index: int, prompt_embeds: Optional[torch.Tensor],
                     record: bool) -> None:
        """MemFlow's bank update after committing block ``block_index`` (what the released code does at the next
        block's first step): the recorded frame goes to its slot, or, past the last slot, replaces the least
        text-salient one (the rule: ``memflow.py``). ``record=False``: the bank step repeats with the frame
        recorded last, as the released replay's forwards (``update_bank=False``, ``q_bank`` at each block) do.
        ``prompt_embeds=None``: every slot scores 0 (the step after a prompt switch, which zeroed the
        cross-attention cache that the released scores read)."""
        if not record and cache.bank_last is None:
            return
        frame, slot = bank_record_slot(self.config, block_index) if record else cache.bank_last
        full = slot >= self.config.memory_bank_frames
        scores = bank_saliency(self.transformer, cache, prompt_embeds) if full and prompt_embeds is not None \
            else None
        cache.bank_record(frame, slot, self.config.memory_bank_frames, scores)

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
        table = self._history_table(cache, start, routes, x_t.device)
        v = self._forward(cache, start, x_t, sigma, prompt_embeds, table, None)
        return (x_t.float() - sigma.view(-1, 1, 1, 1, 1) * v.float()).to(x_t.dtype)

    def _context_input(self, x0: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        """What a commit feeds the model: ``(1 - c) x0 + c noise`` with ``c = config.context_sigma`` (x0 at 0)."""
        c = self.config.context_sigma
        if c == 0:
            return x0
        if noise is None:
            noise = torch.randn_like(x0)
        elif not isinstance(noise, torch.Tensor) or noise.shape != x0.shape:
            raise ValueError(f"commit_noise must be a tensor of x0's shape {list(x0.shape)}")
        return ((1 - c) * x0.float() + c * noise.to(x0.device).float()).to(x0.dtype)

    @torch.no_grad()
    def commit_block(self, cache: GroupKVCache, block_index: int, x0: torch.Tensor, prompt_embeds, *,
                     routes: Optional[Sequence] = None, commit_noise: Optional[torch.Tensor] = None,
                     record_bank: bool = True, before_switch: bool = False) -> None:
        """One forward of the clean block ``x0 [B, C, f, H, W]`` at timestep ``config.context_noise`` that writes
        its K/V into the cache (the block must be the cache's next one), then evicts the frames no later block can
        read. With ``config.context_sigma`` c > 0 the input is ``(1 - c) x0 + c commit_noise`` (fresh ``randn``
        when None).
        MemFlow: then the bank update; ``record_bank=False`` records no new frame (the released KVPO replay);
        ``before_switch``: a prompt switch's :meth:`recache` comes next, so a full bank's step scores every slot 0
        (released: the step runs after the switch zeroed the cross-attention cache; see ``memflow.py``)."""
        start = self._start(block_index)
        prompt_embeds = self._check_block(cache, "x0", x0, prompt_embeds)
        if cache.num_frames != start:
            raise ValueError(f"block_index {block_index}: the cache holds frames up to {cache.num_frames}, so the "
                             f"next block to commit starts at frame {cache.num_frames}, not {start}")
        x_in = self._context_input(x0, commit_noise)
        # The table (built before the new blocks exist) also validates the routes before anything is allocated.
        table = self._history_table(cache, start, routes, x0.device)
        write_ids = cache.append_frames(self.config.frames_per_block)
        try:
            self._forward(cache, start, x_in, self._sigma(self.config.context_timestep_sigma, x0.shape[0], x0.device),
                          prompt_embeds, table, write_ids)
            if self.config.memory_bank_frames:
                self._record_bank(cache, block_index, None if before_switch else prompt_embeds, record_bank)
        finally:
            cache.evict()

    @torch.no_grad()
    def recache(self, cache: GroupKVCache, history: torch.Tensor, prompt_embeds) -> list[int]:
        """LongLive's KV re-cache at a prompt switch: re-encode the retained window under the new prompt.

        The frames ``config.recache_frames(cache.num_frames)`` (the most recent ``window - sink`` non-sink frames)
        run through ONE forward at timestep ``context_noise`` with cross-attention on ``prompt_embeds``
        ``[B or 1, L, text_dim]``; their queries attend to the sink (global sink: never re-encoded, it keeps the
        first prompt's K/V) and to all re-encoded frames, as LongLive's re-cache forward does. ``history``
        ``[B, C, T, H, W]``: the clean latents of the last ``T >= len(frames)`` frames before ``cache.num_frames``
        (per sequence: a group's branches each re-encode their own video). The new K/V go to fresh blocks
        (:meth:`GroupKVCache.rewrite_frames`): every sequence of the batch in one forward, no copy, and snapshots
        taken before (e.g. a pre-fork cache) keep the old K/V. Returns the re-encoded frames.

        MemFlow (``config.memory_bank_frames``): the released re-cache instead (:meth:`_recache_with_bank`): the
        last ``min(window_frames, s)`` frames, those after the sink unless they reach frame 0, read the bank too;
        returns them. The block before the switch must be committed with ``before_switch=True``.
        """
        if not isinstance(cache, GroupKVCache):
            raise TypeError(f"cache must be a GroupKVCache (from new_cache), got {type(cache).__name__}")
        bank = bool(self.config.memory_bank_frames)
        if bank:
            self._check_bank_switch(cache)
        start = cache.num_frames
        frames = self._bank_recache_frames(start) if bank else self.config.recache_frames(start)
        if not frames:
            return frames
        if not isinstance(history, torch.Tensor) or history.dim() != 5 or history.shape[2] < len(frames):
            raise ValueError(f"history must be [B, C, T, H, W] with T >= {len(frames)} (the re-encoded frames "
                             f"{frames[0]}..{frames[-1]}), got "
                             f"{list(history.shape) if isinstance(history, torch.Tensor) else type(history).__name__}")
        x = history[:, :, history.shape[2] - len(frames):]
        prompt_embeds = self._check_block(cache, "history", x, prompt_embeds, frames=len(frames))
        if bank:
            self._recache_with_bank(cache, frames, x, prompt_embeds)
            return frames
        table = cache.frames_table(range(min(self.config.sink_frames, start)), device=x.device)
        write_ids = cache.rewrite_frames(frames)
        self._forward(cache, frames[0], x, self._sigma(self.config.context_timestep_sigma, x.shape[0], x.device),
                      prompt_embeds, table, write_ids)
        return frames

    def _check_bank_switch(self, cache: Optional[GroupKVCache] = None) -> None:
        """Prompt switches with MemFlow's bank: the released ones (``bank_rule="rollout"``), after a commit made
        with ``before_switch=True`` (or a bank that was not full)."""
        if self.config.bank_rule != "rollout":
            raise ValueError(f"config.bank_rule: prompt switches with the memory bank follow the released rollouts "
                             f"(config.bank_rule 'rollout'); the released pipeline of bank_rule "
                             f"{self.config.bank_rule!r} (causal_inference.py) has none")
        if cache is not None and cache.bank_scored:
            raise ValueError("cache: the memory bank's last step scored its slots against the old prompt; commit "
                             "the block before a prompt switch with before_switch=True (released: that step runs "
                             "after the switch zeroed the cross-attention cache, so every slot scores 0)")

    def _bank_recache_frames(self, start: int) -> list[int]:
        """Frames MemFlow's re-cache rewrites before ``start``: of the released ``min(local_attn_size, s)`` last
        frames (``window_frames``), all when they reach back to frame 0 (the released forward then starts at 0
        and writes the sink too), else those after the sink (its write protects the sink)."""
        first = start - min(self.config.window_frames, start)
        return list(range(first if first == 0 else max(self.config.sink_frames, first), start))

    def _recache_with_bank(self, cache: GroupKVCache, frames: list[int], x: torch.Tensor,
                           prompt_embeds: torch.Tensor) -> None:
        """MemFlow's re-cache (``diversity_sampling.recache_after_switch``, rule in ``memflow.py``): the queries of
        ``frames`` (latents ``x [B, C, len(frames), H, W]``) read ``[sink | bank | the newest window - sink
        re-encoded frames]``, the released forward's ``k_cat`` (its local part: the last ``window - sink`` frames
        it wrote). So the newest go first, reading the sink and bank and themselves; the older ones, whose keys no
        query reads, then read those without themselves (``attend_self=False``). From frame 0 (s <= window) the
        sink is re-encoded too: one forward of all frames reading the bank and themselves."""
        c = self.config
        sigma = self._sigma(c.context_timestep_sigma, x.shape[0], x.device)
        start, local = frames[-1] + 1, c.window_frames - c.sink_frames
        near = frames if frames[0] == 0 else [f for f in frames if f >= start - local]
        older = frames[:len(frames) - len(near)]
        sink = [] if frames[0] == 0 else list(range(min(c.sink_frames, start)))
        table = cache.bank_frames_table(sink, device=x.device)
        self._forward(cache, near[0], x[:, :, len(older):], sigma, prompt_embeds, table,
                      cache.rewrite_frames(near))
        if older:
            table = cache.bank_frames_table(sink + near, device=x.device)
            self._forward(cache, older[0], x[:, :, :len(older)], sigma, prompt_embeds, table,
                          cache.rewrite_frames(older), attend_self=False)

    @torch.no_grad()
    def generate_block(self, cache: GroupKVCache, block_index: int, noise: torch.Tensor, prompt_embeds, *,
                       step_noise: Optional[Sequence[torch.Tensor]] = None, routes: Optional[Sequence] = None,
                       commit: bool = True, commit_noise: Optional[torch.Tensor] = None,
                       before_switch: bool = False) -> BlockRollout:
        """The few-step sampler for one block: ``x_t0 = noise``; per step ``k``: ``x0_k = predict_x0(x_tk,
        sigma_k)``, ``x_t(k+1) = (1 - s_(k+1)) x0_k + s_(k+1) step_noise[k]`` (``K - 1`` tensors like noise;
        fresh ``randn`` when None); commits the final clean block when ``commit`` (see :meth:`commit_block` for
        commit_noise and before_switch). Runs without grad."""
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
            self.commit_block(cache, block_index, preds[-1], prompt_embeds, routes=routes, commit_noise=commit_noise,
                              before_switch=before_switch)
        return BlockRollout(preds[-1], torch.stack(inputs), torch.stack(preds), self.sigmas.clone())

    @torch.no_grad()
    def generate(self, noise: torch.Tensor, prompt_embeds, *, switch_frames: Sequence[int] = (),
                 cache: Optional[GroupKVCache] = None, progress: bool = False) -> torch.Tensor:
        """Sample ``noise [B, C, F, H, W]`` (F a multiple of frames_per_block) block by block into clean latents
        ``[B, C, F, H, W]``, starting at the cache's next block (a new cache when None).

        Multi-prompt (LongLive's interactive mode): ``prompt_embeds`` a list of S ``[B or 1, L, text_dim]``
        segments and ``switch_frames`` their S - 1 absolute start frames (increasing block starts inside this
        call); at each switch the window is re-encoded under the new segment (:meth:`recache`), then the blocks
        from there on cross-attend to it. A single tensor is one segment. MemFlow: the block before each switch
        commits with ``before_switch=True`` (the released bank step at a switch, ``memflow.py``).
        """
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
        segments = [prompt_embeds] if isinstance(prompt_embeds, torch.Tensor) else list(prompt_embeds)
        switches = [int(s) for s in switch_frames]
        if len(segments) != len(switches) + 1:
            raise ValueError(f"switch_frames: {len(segments)} prompt segments need {len(segments) - 1} switch "
                             f"frames, got {switches}")
        if switches and self.config.memory_bank_frames:
            self._check_bank_switch()
        end = cache.num_frames + noise.shape[2]
        if any(s % f or not cache.num_frames < s < end for s in switches) or switches != sorted(set(switches)):
            raise ValueError(f"switch_frames must be increasing block starts (multiples of {f}) inside the "
                             f"generated frames ({cache.num_frames}, {end}), got {switches}")
        blocks = range(noise.shape[2] // f)
        if progress:
            from tqdm.auto import tqdm
            blocks = tqdm(blocks, desc="blocks")
        out, segment = [], 0
        for i in blocks:
            if (first + i) * f in switches:
                segment += 1
                self.recache(cache, torch.cat(out, dim=2), segments[segment])
            out.append(self.generate_block(cache, first + i, noise[:, :, i * f:(i + 1) * f], segments[segment],
                                           before_switch=(first + i + 1) * f in switches).x0)
        return torch.cat(out, dim=2)
