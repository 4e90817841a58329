"""Group KV cache: a paged pool of frame-sized K/V blocks shared by the branches of a KVPO group.

Layout. One pool per transformer layer, stored as two tensors ``k, v [num_layers, N, S, H, D]``: block ``n`` of
layer ``l`` holds the RoPE'd keys (values) of one latent frame (``S`` tokens, e.g. 1560), so ``k[l]`` is exactly
the ``k_cache [N, S, Hkv, D]`` argument of :func:`kvpo_kernels.routed_attention`. A block id means the same frame in
every layer. Each sequence (branch) of a cache maps absolute frame indices to block ids.

Sharing. Blocks carry reference counts (one per sequence that maps them, over every cache built on the same pool).
:meth:`GroupKVCache.fork` gives a new cache whose sequences map the parent's blocks (no copy of K/V); frames written
after the fork go to fresh private blocks of the sequence that wrote them. The parent stays valid and unchanged, so
it doubles as a snapshot: restoring is just keeping it. A block returns to the free list when its count drops to 0.

Memory bank (MemFlow, :meth:`GroupKVCache.bank_record`). Each sequence owns ``S`` bank *slot blocks* and one
*pending* block (the released per-layer ``kv_bank`` and ``k_new``: copies of K/V, not references to frames), pool
blocks like any other: refcounted, shared after a fork, copied on write before a sequence changes a shared one.
Layer ``l``'s plane of slot block ``j`` holds the frame that layer ``l`` keeps in slot ``j`` (layers keep different
frames), so a sequence holds ``S + 1`` bank blocks whatever its layers keep, and evicting a frame from the window
frees its block even when a slot holds that frame.

Windows (the streaming generators' geometry, LongLive numbers in brackets). A block of ``frames_per_block`` [3]
frames starting at frame ``s`` sees, besides its own frames (passed to the kernel as ``k_new``/``v_new``):

- without a route: the sink frames ``[0, sink_frames)`` [3] and the most recent
  ``window_frames - sink_frames - frames_per_block`` [12 - 3 - 3 = 6] frames before ``s``;
- with a route ``R`` (absolute frame indices): the sink, ``R``, and the ``nearest_frames - frames_per_block``
  [4 - 3 = 1] frames right before ``s``.

The cache keeps the sink plus the most recent ``cache_frames - sink_frames - frames_per_block`` [21 - 3 - 3 = 15]
history frames resident (``cache_frames`` counts the block being written, as the streaming generators' KV caches
do), and evicts a frame as soon as it leaves every sequence's reach (:meth:`GroupKVCache.evict`). Routes are drawn
from :meth:`GroupKVCache.route_pool` [frames 6..19, 14 frames, for a fork at frame >= 21].

Route layouts (``route_layout``). ``"sink"`` (above; LongLive, and ours for MemFlow by default): a route is a list
of absolute frames, read with the sink. ``"memflow"`` (the released MemFlow KVPO): a routed block reads no separate
sink, only the route and the ``nearest_frames`` most recent frames (incl. itself); a route is a list of **slots** of
the released rolling KV cache of ``cache_frames`` frames, and the frame a slot holds moves on as the cache rolls
(:meth:`GroupKVCache.route_frames`), so the same route reads other frames at each perturbed block.
"""
from __future__ import annotations

import numbers
import weakref
from typing import Optional, Sequence

import torch


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class _BlockPool:
    """Storage shared by a cache and all its forks: ``k, v [num_layers, N, S, H, D]``, refcounts, free list."""

    def __init__(self, num_layers: int, frame_tokens: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, reserve_blocks: int):
        self.shape = (num_layers, 0, frame_tokens, num_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.k = torch.empty(self.shape, dtype=dtype, device=device)
        self.v = torch.empty(self.shape, dtype=dtype, device=device)
        self.refcount: list[int] = []
        self.free: list[int] = []
        # The K/V views handed out by GroupKVCache.layer(): growing replaces k / v, and a view of the old tensors
        # would go on reading the old pool (not the blocks written after the growth), so growth refuses while one
        # is alive (held by a caller, or saved for a backward).
        self.views: "weakref.WeakSet[torch.Tensor]" = weakref.WeakSet()
        # At least one block, so that a padded table entry (block 0) always names real memory.
        self.grow(max(1, reserve_blocks))

    @property
    def num_blocks(self) -> int:
        return len(self.refcount)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in all layers, keys and values."""
        num_layers, _, tokens, heads, dim = self.shape
        return 2 * num_layers * tokens * heads * dim * torch.empty((), dtype=self.dtype).element_size()

    def grow(self, extra: int) -> None:
        # Growing copies the pool once (amortised by doubling); it never happens inside a forward, because blocks
        # are allocated before the forward that writes them and tables are built after.
        old = self.num_blocks
        if len(self.views):
            raise RuntimeError(f"GroupKVCache: the pool must grow by {extra} blocks while {len(self.views)} K/V "
                               "view(s) from layer() are alive, which would keep reading the old pool; reserve() the "
                               "blocks before taking views (or drop the views first)")
        new_k = torch.empty((self.shape[0], old + extra) + self.shape[2:], dtype=self.dtype, device=self.device)
        new_v = torch.empty_like(new_k)
        if old and self.device.type != "meta":
            new_k[:, :old].copy_(self.k)
            new_v[:, :old].copy_(self.v)
        self.k, self.v = new_k, new_v
        self.refcount.extend([0] * extra)
        # Lowest ids first: pop() takes from the end.
        self.free.extend(range(old + extra - 1, old - 1, -1))

    def copy_blocks(self, layer: int, src: Sequence[int], dst: Sequence[int]) -> None:
        """Layer ``layer``'s K/V of block ``dst[i]`` := that of block ``src[i]`` (exact copies). The sources are
        gathered first, so ``dst`` may overwrite blocks that ``src`` reads (a bank compress within its slots)."""
        if not dst or self.device.type == "meta":
            return
        src_ids = torch.tensor(list(src), dtype=torch.long, device=self.device)
        dst_ids = torch.tensor(list(dst), dtype=torch.long, device=self.device)
        for store in (self.k, self.v):
            store[layer].index_copy_(0, dst_ids, store[layer].index_select(0, src_ids))

    def allocate(self, count: int) -> list[int]:
        if count > len(self.free):
            self.grow(max(count - len(self.free), self.num_blocks))
        ids = [self.free.pop() for _ in range(count)]
        for block in ids:
            self.refcount[block] = 1
        return ids

    def incref(self, block: int) -> None:
        self.refcount[block] += 1

    def decref(self, block: int) -> None:
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.free.append(block)


class GroupKVCache:
    """Paged K/V history of ``batch_size`` sequences (a group's branches), shared block-wise after a fork.

    Args:
        num_layers: transformer layers (one pool each).
        frame_tokens: ``S``, tokens per latent frame (one block), e.g. 1560.
        num_heads, head_dim: ``Hkv`` and ``D`` of the stored keys/values.
        batch_size: number of sequences.
        frames_per_block, sink_frames, window_frames, nearest_frames, cache_frames: the window geometry (module
            docstring); ``cache_frames >= window_frames``, ``window_frames >= sink_frames + frames_per_block``,
            ``nearest_frames >= frames_per_block``.
        route_layout: ``"sink"`` or ``"memflow"`` (module docstring); ``"memflow"`` needs ``sink_frames >= 1``.
        dtype, device: of the stored K/V (the transformer's).
        reserve_blocks: blocks to allocate up front (the pool grows by doubling when full).
    """

    def __init__(self, num_layers: int, frame_tokens: int, num_heads: int, head_dim: int, *, batch_size: int = 1,
                 frames_per_block: int = 3, sink_frames: int = 3, window_frames: int = 12, nearest_frames: int = 4,
                 cache_frames: int = 21, route_layout: str = "sink", dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", reserve_blocks: int = 0):
        for name, value, minimum in (("num_layers", num_layers, 1), ("frame_tokens", frame_tokens, 1),
                                     ("num_heads", num_heads, 1), ("head_dim", head_dim, 1),
                                     ("batch_size", batch_size, 1), ("frames_per_block", frames_per_block, 1),
                                     ("sink_frames", sink_frames, 0), ("window_frames", window_frames, 1),
                                     ("nearest_frames", nearest_frames, 1), ("cache_frames", cache_frames, 1),
                                     ("reserve_blocks", reserve_blocks, 0)):
            _check_int(name, value, minimum)
        if window_frames < sink_frames + frames_per_block:
            raise ValueError(f"window_frames ({window_frames}) must cover sink_frames ({sink_frames}) + "
                             f"frames_per_block ({frames_per_block})")
        if nearest_frames < frames_per_block:
            raise ValueError(f"nearest_frames ({nearest_frames}) counts the current block, so it must be >= "
                             f"frames_per_block ({frames_per_block})")
        if cache_frames < window_frames:
            raise ValueError(f"cache_frames ({cache_frames}) must be >= window_frames ({window_frames}): the cache "
                             f"must hold every frame of a window")
        if route_layout not in ("sink", "memflow"):
            raise ValueError(f"route_layout must be 'sink' or 'memflow', got {route_layout!r}")
        if route_layout == "memflow" and sink_frames < 1:
            # released causal_model.py l. 480: the perturbed window is built only when the cache has a sink
            raise ValueError("route_layout 'memflow' needs sink_frames >= 1 (the released MemFlow routes only with "
                             "a sink)")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.frames_per_block, self.sink_frames = int(frames_per_block), int(sink_frames)
        self.window_frames, self.nearest_frames = int(window_frames), int(nearest_frames)
        self.cache_frames = int(cache_frames)
        self.route_layout = route_layout
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self._pool = _BlockPool(num_layers, frame_tokens, num_heads, head_dim, dtype, device, reserve_blocks)
        self._maps: list[dict[int, int]] = [{} for _ in range(batch_size)]
        # MemFlow's memory bank (empty unless bank_record() is used), per sequence: its slot blocks (the same ids in
        # every layer), its pending block (None before the first record) and, per layer, the frame each slot holds.
        # A sequence holds one reference to each of these blocks (module docstring).
        self._bank_slots: list[list[int]] = [[] for _ in range(batch_size)]
        self._bank_pending: list[Optional[int]] = [None] * batch_size
        self._bank_frames: list[list[list[int]]] = [[[] for _ in range(num_layers)] for _ in range(batch_size)]
        self.bank_last: Optional[tuple[int, int]] = None  # (frame, slot) of the latest bank_record()
        self.bank_scored = False  # whether that bank_record() compressed a full bank with scores (not all 0)
        self.num_frames = 0  # frames written so far = the first frame of the next block

    # ----------------------------------------------------------------------------------------------- structure
    def _spawn(self, indices: list[int]) -> "GroupKVCache":
        """A new cache whose sequence j maps (shares) this cache's sequence ``indices[j]``: frames and bank."""
        child = object.__new__(GroupKVCache)
        child.__dict__.update({key: value for key, value in self.__dict__.items()
                               if key not in ("_maps", "_bank_slots", "_bank_pending", "_bank_frames",
                                              "_appended")})
        child._maps = [dict(self._maps[i]) for i in indices]
        child._bank_slots = [list(self._bank_slots[i]) for i in indices]
        child._bank_pending = [self._bank_pending[i] for i in indices]
        child._bank_frames = [[list(frames) for frames in self._bank_frames[i]] for i in indices]
        for sequence, frame_map in enumerate(child._maps):
            for block in list(frame_map.values()) + list(child._bank_set(sequence)):
                self._pool.incref(block)
        return child

    def _bank_set(self, sequence: int) -> set[int]:
        """A sequence's bank blocks: its slot blocks and its pending block (one reference each)."""
        pending = self._bank_pending[sequence]
        return set(self._bank_slots[sequence]) | (set() if pending is None else {pending})

    def __repr__(self) -> str:
        mem = self.memory_bytes()
        return (f"GroupKVCache(batch_size={self.batch_size}, num_frames={self.num_frames}, "
                f"frames_per_block={self.frames_per_block}, sink={self.sink_frames}, window={self.window_frames}, "
                f"nearest={self.nearest_frames}, cache_frames={self.cache_frames}, layers={self.num_layers}, "
                f"frame_tokens={self.frame_tokens}, shared={mem['shared'] / 2**20:.1f} MiB, "
                f"private={mem['private'] / 2**20:.1f} MiB, pool={mem['pool'] / 2**20:.1f} MiB, "
                f"{self.dtype}, {self.device})")

    @property
    def batch_size(self) -> int:
        return len(self._maps)

    @property
    def num_layers(self) -> int:
        return self._pool.shape[0]

    @property
    def frame_tokens(self) -> int:
        return self._pool.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self._pool.dtype

    @property
    def device(self) -> torch.device:
        return self._pool.device

    def fork(self, num_branches: int) -> "GroupKVCache":
        """A new cache whose sequences share this cache's blocks, without copying K/V.

        With ``batch_size == 1`` the new cache has ``num_branches`` sequences, each mapping sequence 0's history.
        In general it has ``batch_size * num_branches`` sequences, sequence ``j`` mapping sequence
        ``j // num_branches`` (``repeat_interleave`` order: the branches of one prompt are adjacent). This cache
        stays valid and unchanged (a snapshot); frames either writes later are private to the writer.
        """
        _check_int("num_branches", num_branches, 1)
        return self._spawn([j // num_branches for j in range(self.batch_size * num_branches)])

    def select(self, indices: Sequence[int]) -> "GroupKVCache":
        """A new cache holding sequences ``indices`` of this one (any order, repeats allowed), sharing their blocks."""
        indices = list(indices)
        if not indices:
            raise ValueError("indices must name at least one sequence")
        for index in indices:
            _check_int("indices", index, 0)
            if index >= self.batch_size:
                raise ValueError(f"indices: sequence {index} out of range for batch_size {self.batch_size}")
        return self._spawn(indices)

    def reserve(self, num_blocks: int) -> None:
        """Make the shared pool hold at least ``num_blocks`` blocks (free or used), growing it now in one step.

        The pool otherwise doubles when full, copying every block once (with old and new pool alive at the same
        time). Before forking a rollout into a group, reserve what the group will write: ``len(self.frames()) +
        batch_size * num_branches * frames_per_block * blocks_to_generate`` at most, fewer once eviction starts.
        """
        _check_int("num_blocks", num_blocks, 0)
        if num_blocks > self._pool.num_blocks:
            self._pool.grow(num_blocks - self._pool.num_blocks)

    def release(self) -> None:
        """Drop this cache's references (its private blocks return to the pool); the cache becomes empty."""
        for frame_map in self._maps:
            for block in frame_map.values():
                self._pool.decref(block)
            frame_map.clear()
        for sequence in range(len(getattr(self, "_bank_slots", ()))):
            for block in self._bank_set(sequence):
                self._pool.decref(block)
            self._bank_slots[sequence].clear()
            self._bank_pending[sequence] = None
            for frames in self._bank_frames[sequence]:
                frames.clear()

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown: the pool may already be gone
            pass

    def frames(self, sequence: int = 0) -> list[int]:
        """Sorted resident frames of one sequence."""
        return sorted(self._maps[sequence])

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_cache, v_cache)``, each ``[N, S, Hkv, D]``: layer ``index``'s pool, as routed_attention reads it.

        Views, no copy: while one is alive the pool cannot grow (RuntimeError from the allocation that would need
        it), so a view never reads a stale pool; reserve() the blocks up front."""
        self._check_layer(index)
        views = self._pool.k[index], self._pool.v[index]
        self._pool.views.update(views)
        return views

    def _check_layer(self, index) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {index!r}")

    # -------------------------------------------------------------------------------------------------- windows
    def _local_first(self, start: int, routed: bool) -> int:
        reach = self.nearest_frames if routed else self.window_frames - self.sink_frames
        return max(self.sink_frames, start - (reach - self.frames_per_block))

    def route_pool(self, start_frame: Optional[int] = None, perturbed_blocks: int = 1) -> list[int]:
        """Frames a route may use for the ``perturbed_blocks`` blocks starting at ``start_frame`` (default: the next).

        The frames older than the first block's nearest frames that stay resident while the last perturbed block
        is generated: ``[max(sink, s + (P - 1) f - (cache_frames - sink - f)), s - (nearest - f))``.
        LongLive (sink 3, nearest 4, f 3, cache 21), fork at frame 21, P = 1: frames 6..19 (14 frames).
        The released plan (KVPO ``diversity_sampling.py`` plan_perturbation) uses
        ``[max(sink, s + (P - 1) f - (cache - sink)), s - nearest)``, one block earlier: its cache size does not
        count the block being written. Ours keeps every pool frame resident through the last perturbed block
        (docs/recipe.md, "The route pool: our choice").

        ``route_layout="memflow"``: cache slots, the released MemFlow plan's pool ``[0, min(s, cache_frames) -
        nearest_frames)`` (``models/memflow/pipeline/diversity_sampling.py`` l. 67-83; the same for any P): every
        history slot at a fork in a full cache (30 at the released geometry), the oldest ``s - 3`` before.
        """
        start = self.num_frames if start_frame is None else _check_int("start_frame", start_frame, 0)
        _check_int("perturbed_blocks", perturbed_blocks, 1)
        if self.route_layout == "memflow":
            return list(range(max(0, min(start, self.cache_frames) - self.nearest_frames)))
        f = self.frames_per_block
        last_start = start + (perturbed_blocks - 1) * f
        first = max(self.sink_frames, last_start - (self.cache_frames - self.sink_frames - f))
        return list(range(first, self._local_first(start, routed=True)))

    def _slot_frame(self, slot: int, start: int) -> int:
        """The frame that slot ``slot`` of the released MemFlow cache holds while the block at ``start`` runs."""
        roll = max(0, start + self.frames_per_block - self.cache_frames)
        return slot if slot < self.sink_frames else slot + roll

    def route_frames(self, start_frame: int, route: Sequence[int]) -> list[int]:
        """The absolute frames (in ``route``'s order) that ``route`` names for the block at ``start_frame``.

        ``route_layout="sink"``: the route itself (absolute frames). ``"memflow"``: the route lists slots of the
        released MemFlow KV cache (a branch plan's ``selected_older_frame_indices``, passed unchanged to every
        perturbed block), and this is the frame each slot holds when the block reads it. Released
        (``Richard-Zhang-AI/KVPO``, ``models/memflow``): the cache holds C = ``cache_frames`` frames
        (``pipeline/streaming_training.py`` l. 53: local_attn_size + slice_last_frames = 12 + 21 = 33). The block
        at frame s (f frames) first writes its own K/V into a clone ``temp_k`` of it (``wan/modules/
        causal_model.py`` l. 366-458): while ``s + f <= C`` at slots ``[s, s + f)`` (slot = frame); from then on
        each block rolls the non-sink slots left by f (l. 370-399) and sits at ``[C - f, C)``. So with ``L =
        min(s + f, C)`` (``local_end_index``), slot j holds frame j if ``j < sink``, else ``j + max(0, s + f -
        C)``. ``_build_perturbed_local_window`` (l. 190-228, called at l. 491) reads ``[bank | slots | nearest]``
        (l. 503): nearest = slots ``[L - m, L)`` (the block itself when m = f), and every route slot j with
        ``j + 1 <= L - m`` (l. 215), without LongLive's remap to absolute frames. Here a slot outside
        ``[0, L - m)`` raises ValueError (released: skipped); the plan's pool :meth:`route_pool` never names one,
        as ``min(s0, C) - m <= L - m`` at every perturbed block s >= s0. Every frame it names is resident in this
        cache (oldest: ``s - (C - sink - f)``, the first frame this cache keeps).
        """
        start = _check_int("start_frame", start_frame, 0)
        route = route.tolist() if isinstance(route, torch.Tensor) else list(route)
        for entry in route:
            if isinstance(entry, bool) or not isinstance(entry, numbers.Integral):
                raise TypeError(f"routes: entry {entry!r} is not an int")
        if self.route_layout == "sink":
            return [int(frame) for frame in route]
        end = min(start + self.frames_per_block, self.cache_frames) - self.nearest_frames
        for slot in route:
            if not 0 <= slot < end:
                raise ValueError(f"routes: slot {slot} is not an older cache slot for the block at frame {start}: "
                                 f"route_layout 'memflow' reads slots in [0, {end}) (before the nearest frames)")
        return [self._slot_frame(int(slot), start) for slot in route]

    def visible_frames(self, start_frame: int, route: Optional[Sequence[int]] = None) -> list[int]:
        """History frames (sorted) that the block starting at ``start_frame`` reads, with or without a route."""
        start = _check_int("start_frame", start_frame, 0)
        sink = set(range(min(self.sink_frames, start)))
        if route is None:
            return sorted(sink | set(range(self._local_first(start, routed=False), start)))
        if self.route_layout == "memflow":
            frames = self.route_frames(start, route)
            if len(set(frames)) != len(frames):
                raise ValueError(f"routes: a route repeats a slot: {list(route)}")
            end = min(start + self.frames_per_block, self.cache_frames)
            # the nearest history frames: released slots [L - m, L) without the block's own f
            nearest = [self._slot_frame(slot, start) for slot in range(max(0, end - self.nearest_frames),
                                                                        end - self.frames_per_block)]
            return sorted(frames + nearest)
        first_nearest = self._local_first(start, routed=True)
        route = route.tolist() if isinstance(route, torch.Tensor) else list(route)
        for frame in route:
            if isinstance(frame, bool) or not isinstance(frame, numbers.Integral):
                raise TypeError(f"routes: frame {frame!r} is not an int")
            if not self.sink_frames <= frame < first_nearest:
                raise ValueError(f"routes: frame {frame} is not an older frame for the block at frame {start}: "
                                 f"routed frames lie in [{self.sink_frames}, {first_nearest}) (after the sink, "
                                 f"before the nearest frames)")
        if len(set(route)) != len(route):
            raise ValueError(f"routes: a route repeats a frame: {route}")
        return sorted(sink | set(int(f) for f in route) | set(range(first_nearest, start)))

    def block_table(self, start_frame: Optional[int] = None, routes: Optional[Sequence] = None, *,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched block table for all sequences, ready for :func:`kvpo_kernels.routed_attention`.

        ``routes``: None (every sequence sees its default window) or one entry per sequence: a list of absolute
        older frames (a routed branch; cache slots with ``route_layout="memflow"``, see :meth:`route_frames`) or
        None (an unperturbed sequence, e.g. the anchor). Returns
        ``block_table int32 [B, M]`` (row b: the block ids of sequence b's visible history frames in frame order,
        padded with block 0) and ``block_counts int32 [B]``, on ``device`` (default: the cache's).
        Raises ``ValueError`` if a visible frame is not resident in that sequence (evicted or never written).
        """
        start = self.num_frames if start_frame is None else _check_int("start_frame", start_frame, 0)
        return self._padded_table(self._block_rows(start, routes), device)

    def _block_rows(self, start: int, routes: Optional[Sequence]) -> list[list[int]]:
        """Per sequence, the block ids of the history frames the block at ``start`` reads (:meth:`block_table`)."""
        if routes is not None:
            routes = list(routes)
            if len(routes) != self.batch_size:
                raise ValueError(f"routes must have one entry per sequence ({self.batch_size}), got {len(routes)}")
        rows = []
        for b, frame_map in enumerate(self._maps):
            frames = self.visible_frames(start, None if routes is None else routes[b])
            missing = [f for f in frames if f not in frame_map]
            if missing:
                raise ValueError(f"frames {missing} of sequence {b} are not in the cache (evicted or not written "
                                 f"yet; resident: {sorted(frame_map)}); block at frame {start}")
            rows.append([frame_map[f] for f in frames])
        return rows

    def _table_device(self, device: torch.device | str | None) -> torch.device:
        """Where tables and block ids go: ``device``, default the cache's; the CPU for a meta cache."""
        target = self.device if device is None else torch.device(device)
        return torch.device("cpu") if target.type == "meta" else target

    def _padded_table(self, rows: list[list[int]], device: torch.device | str | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(block_table int32 [B, max(1, longest row)], block_counts int32 [B])``: ``rows`` padded with block 0."""
        target = self._table_device(device)
        width = max(1, max(len(row) for row in rows))
        return (torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.int32, device=target),
                torch.tensor([len(row) for row in rows], dtype=torch.int32, device=target))

    def _check_resident(self, frames: Sequence[int]) -> None:
        for b, frame_map in enumerate(self._maps):
            missing = [f for f in frames if f not in frame_map]
            if missing:
                raise ValueError(f"frames {missing} of sequence {b} are not in the cache (resident: "
                                 f"{sorted(frame_map)})")

    def frames_table(self, frames: Sequence[int], *, device: torch.device | str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(block_table int32 [B, max(1, len(frames))], block_counts int32 [B])``: the blocks of the given frames
        (in the given order) in every sequence, e.g. the sink that a prompt switch's re-encode reads."""
        return self._padded_table(self._frame_rows(frames), device)

    def _frame_rows(self, frames: Sequence[int]) -> list[list[int]]:
        frames = [int(f) for f in frames]
        self._check_resident(frames)
        return [[frame_map[f] for f in frames] for frame_map in self._maps]

    def rewrite_frames(self, frames: Sequence[int]) -> torch.Tensor:
        """Give resident ``frames`` fresh private blocks in every sequence (for a re-encode) and drop this cache's
        references to the old ones, which stay valid for any snapshot that maps them (no K/V copy).

        Returns the new block ids ``int64 [B, len(frames)]`` that :meth:`write` fills (like append_frames' ids,
        they are this cache's latest write targets).
        """
        frames = [int(f) for f in frames]
        if not frames or len(set(frames)) != len(frames):
            raise ValueError(f"frames must name distinct frames, got {frames}")
        self._check_resident(frames)
        ids = []
        for frame_map in self._maps:
            row = self._pool.allocate(len(frames))
            for frame, block in zip(frames, row):
                self._pool.decref(frame_map[frame])
                frame_map[frame] = block
            ids.append(row)
        rewritten = torch.tensor(ids, dtype=torch.int64, device=self._table_device(None))
        self._appended = (rewritten, [block for row in ids for block in row])
        return rewritten

    # ------------------------------------------------------------------------------------- memory bank (MemFlow)
    def bank_frames(self, sequence: int = 0, layer: int = 0) -> list[int]:
        """Frames in the memory bank of one sequence and layer, in slot order (MemFlow; empty otherwise)."""
        self._check_layer(layer)
        return list(self._bank_frames[sequence][layer])

    def bank_blocks(self, layer: int) -> list[list[int]]:
        """Block ids of every sequence's bank slots: ``[B][slots]`` (same count per sequence). The ids are the same
        in every layer; ``layer``'s plane of each holds the frame :meth:`bank_frames` reports for that layer."""
        self._check_layer(layer)
        return [list(slots) for slots in self._bank_slots]

    def bank_record(self, frame: int, slot: int, capacity: int, scores: Optional[torch.Tensor] = None) -> None:
        """One MemFlow bank step of every sequence: ``frame`` becomes the pending frame, then goes to slot ``slot``.

        A ``frame`` other than the current pending one (the released commit with ``update_bank``) must be resident:
        its K/V (every layer) are copied into the sequence's pending block. The pending frame itself (the released
        steps without ``update_bank``: the replay, the blocks between two records) keeps its pending block as it
        is, the K/V as recorded (a re-cache since does not change it: the released ``k_new`` is a copy).
        ``slot < capacity``: the pending K/V are copied into slot block ``slot`` (opened when it is the next slot),
        every layer. ``slot >= capacity`` (bank full): per sequence and layer the slots become the ``capacity - 1``
        slots of highest ``scores [num_layers, B, capacity]`` (its text saliency; None: every slot scores 0, the
        released compress with a zeroed cross-attention cache), followed by the pending frame: an exact indexed
        copy within the sequence's slot blocks, per layer. As the released ``compress_kv_bank``, the kept slots go
        in ``torch.topk``'s order (descending score), and ties go as torch's CPU topk orders them, which this runs
        on whatever the scores' device (3 slots, all 0: slots 0 and 1 are kept). A sequence writes only blocks it
        holds alone: a shared (forked) slot or pending block is first replaced by a private one (copy on write). A
        step that repeats the last one on a bank not full (same frame and slot) changes nothing: the slot holds the
        pending copy already.
        """
        frame = _check_int("frame", frame, 0)
        slot, capacity = _check_int("slot", slot, 0), _check_int("capacity", capacity, 1)
        full = slot >= capacity
        if full and scores is not None and (not isinstance(scores, torch.Tensor)
                                            or tuple(scores.shape) != (self.num_layers, self.batch_size, capacity)):
            raise ValueError(f"scores must be None or a [num_layers, B, capacity] = "
                             f"{[self.num_layers, self.batch_size, capacity]} tensor when the bank is full")
        held = len(self._bank_slots[0])
        if (full and held != capacity) or (not full and slot > held):
            raise ValueError(f"slot {slot}: the bank holds {held} of {capacity} slots, so the next slot is "
                             f"{min(held, capacity)}")
        pending = self.bank_last[0] if self.bank_last is not None else None
        if frame != pending:
            self._bank_pend(frame)
        if full:
            values = (torch.zeros(self.num_layers, self.batch_size, capacity) if scores is None
                      else scores.detach().float().cpu())
            self._bank_compress(torch.topk(values, capacity - 1, dim=-1).indices.tolist(), frame)
        elif (frame, slot) != self.bank_last:  # else the step repeats the last one: the slot holds pending already
            self._bank_write(slot, frame)
        self.bank_last = (frame, slot)
        self.bank_scored = full and scores is not None

    def _private(self, block: Optional[int]) -> int:
        """``block`` if this sequence holds it alone, else a fresh block (the reference to ``block`` dropped): the
        block a bank write may overwrite whole."""
        if block is not None and self._pool.refcount[block] == 1:
            return block
        if block is not None:
            self._pool.decref(block)
        return self._pool.allocate(1)[0]

    def _bank_pend(self, frame: int) -> None:
        """Copy resident ``frame``'s K/V (every layer) into each sequence's pending block."""
        missing = [b for b, frame_map in enumerate(self._maps) if frame not in frame_map]
        if missing:
            raise ValueError(f"frame {frame} is neither resident in sequences {missing} nor the bank's pending frame "
                             f"{self.bank_last[0] if self.bank_last else None} (resident: {self.frames(missing[0])})")
        self._bank_pending = [self._private(block) for block in self._bank_pending]
        sources = [frame_map[frame] for frame_map in self._maps]
        for layer in range(self.num_layers):
            self._pool.copy_blocks(layer, sources, self._bank_pending)

    def _bank_write(self, slot: int, frame: int) -> None:
        """Copy each sequence's pending block into its slot block ``slot`` (opened if new), every layer."""
        targets = []
        for b, slots in enumerate(self._bank_slots):
            if slot == len(slots):
                slots.append(self._pool.allocate(1)[0])
                for frames in self._bank_frames[b]:
                    frames.append(frame)
            else:
                slots[slot] = self._private(slots[slot])
                for frames in self._bank_frames[b]:
                    frames[slot] = frame
            targets.append(slots[slot])
        for layer in range(self.num_layers):
            self._pool.copy_blocks(layer, self._bank_pending, targets)

    def _bank_compress(self, order: list, frame: int) -> None:
        """The full bank's step: per sequence b and layer l, slots := old slots ``order[l][b]``, then the pending
        block (``order [num_layers][B][capacity - 1]``), gathered from the old slot blocks into private ones."""
        old = [list(slots) for slots in self._bank_slots]
        new = [[block if self._pool.refcount[block] == 1 else self._pool.allocate(1)[0] for block in slots]
               for slots in old]
        for layer in range(self.num_layers):
            sources = [block for b, slots in enumerate(old)
                       for block in [slots[i] for i in order[layer][b]] + [self._bank_pending[b]]]
            self._pool.copy_blocks(layer, sources, [block for slots in new for block in slots])
            for b, frames in enumerate(self._bank_frames):
                frames[layer][:] = [frames[layer][i] for i in order[layer][b]] + [frame]
        for slots_old, slots_new in zip(old, new):
            for before, after in zip(slots_old, slots_new):
                if before != after:
                    self._pool.decref(before)
        self._bank_slots = new

    def bank_block_table(self, start_frame: Optional[int] = None, routes: Optional[Sequence] = None, *,
                         device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`block_table` with the bank's slot blocks after the sink, ``[sink | bank | local or route +
        nearest]`` (MemFlow), or first in a routed row of ``route_layout="memflow"``, ``[bank | route frames |
        nearest]``. The slot block ids are the same in every layer (each layer's plane holds its own frames), so
        one table serves every layer. A bank frame that is also in the window is read twice (its slot copy and its
        block), as the released attention concatenates both."""
        start = self.num_frames if start_frame is None else _check_int("start_frame", start_frame, 0)
        routes = None if routes is None else list(routes)
        history = self._block_rows(start, routes)  # validates the routes first
        sink = min(self.sink_frames, start)
        heads = [0 if self.route_layout == "memflow" and routes is not None and routes[b] is not None else sink
                 for b in range(self.batch_size)]
        rows = [row[:head] + slots + row[head:] for row, head, slots in zip(history, heads, self._bank_slots)]
        return self._padded_table(rows, device)

    def bank_frames_table(self, frames: Sequence[int], *, device: torch.device | str | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`frames_table` of the given resident ``frames`` (sorted) with the bank's slot blocks after those of
        them in the sink, ``[sink | bank | rest]`` (what a MemFlow re-cache at a prompt switch reads, the released
        ``k_cat`` of its forward)."""
        frames = sorted(int(f) for f in frames)
        sink = sum(1 for f in frames if f < self.sink_frames)
        rows = [row[:sink] + slots + row[sink:] for row, slots in zip(self._frame_rows(frames), self._bank_slots)]
        return self._padded_table(rows, device)

    # ------------------------------------------------------------------------------------------ writing, eviction
    def append_frames(self, num_frames: Optional[int] = None) -> torch.Tensor:
        """Allocate private blocks for the next ``num_frames`` (default frames_per_block) frames of every sequence.

        Returns the block ids ``int64 [B, num_frames]`` (on the cache's device) that :meth:`write` fills, layer by
        layer. Advances :attr:`num_frames`. Call :meth:`evict` after the forward that reads the old window.
        """
        count = self.frames_per_block if num_frames is None else _check_int("num_frames", num_frames, 1)
        ids = [self._pool.allocate(count) for _ in self._maps]
        for frame_map, row in zip(self._maps, ids):
            for offset, block in enumerate(row):
                frame_map[self.num_frames + offset] = block
        self.num_frames += count
        appended = torch.tensor(ids, dtype=torch.int64, device=self._table_device(None))
        self._appended = (appended, [block for row in ids for block in row])  # write()'s check needs no sync
        return appended

    def _check_writable(self, block_ids: torch.Tensor) -> None:
        """Each block must be one of this cache's latest append_frames() blocks, still mapped by it and by nothing
        else (refcount 1): a write to a shared block would change a fork's history or a snapshot, one to an id
        kept from an earlier append (evicted since, perhaps reallocated) another frame."""
        appended = getattr(self, "_appended", None)
        latest = set(appended[1]) if appended is not None else set()
        ids = appended[1] if appended is not None and block_ids is appended[0] else block_ids.reshape(-1).tolist()
        owned = {block for frame_map in self._maps for block in frame_map.values()}
        for block in ids:
            if block not in latest or block not in owned:
                raise ValueError(f"block_ids: block {block} is not a block of this cache's latest append_frames() "
                                 "(evicted, released, from an earlier append or another cache)")
            if self._pool.refcount[block] != 1:
                raise ValueError(f"block_ids: block {block} is shared by {self._pool.refcount[block]} sequences "
                                 "(a fork or snapshot maps it); writes go only to blocks this cache holds alone")

    def write(self, layer: int, block_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v [B, f * S, Hkv, D]`` (RoPE'd) of layer ``layer`` into blocks ``block_ids [B, f]``.

        ``block_ids`` must be live blocks that only this cache maps (refcount 1), as :meth:`append_frames` returns
        them; anything else raises (ValueError). Passing append_frames()'s own tensor avoids a device sync."""
        self._check_layer(layer)
        batch, frames = block_ids.shape
        expected = (batch, frames * self.frame_tokens) + tuple(self._pool.shape[3:])
        for name, tensor in (("k", k), ("v", v)):
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")
        self._check_writable(block_ids)
        if self.device.type == "meta":
            return
        flat = block_ids.reshape(-1).to(self.device)
        shape = (batch * frames,) + tuple(self._pool.shape[2:])
        self._pool.k[layer].index_copy_(0, flat, k.detach().reshape(shape).to(self.dtype))
        self._pool.v[layer].index_copy_(0, flat, v.detach().reshape(shape).to(self.dtype))

    def evict(self) -> list[int]:
        """Drop frames no future block can read (older than the resident window, not sink); returns them."""
        first_kept = self.num_frames - (self.cache_frames - self.sink_frames - self.frames_per_block)
        dropped = set()
        for frame_map in self._maps:
            for frame in [f for f in frame_map if self.sink_frames <= f < first_kept]:
                self._pool.decref(frame_map.pop(frame))
                dropped.add(frame)
        return sorted(dropped)

    # ------------------------------------------------------------------------------------------------ accounting
    def memory_bytes(self) -> dict:
        """K/V bytes (all layers, keys and values) that this cache's sequences hold.

        ``shared``: blocks also mapped by another sequence (of this cache or of a cache forked from the same pool);
        ``private``: blocks mapped by exactly one sequence; ``total = shared + private`` (each block counted once);
        ``per_layer``: ``total / num_layers``; ``per_sequence_private``: private bytes of each sequence;
        ``pool``: bytes allocated by the pool (incl. free blocks and blocks of other caches); ``block``: one frame.
        MemFlow bank blocks (slots and pending, copies) count too: private, or shared after a fork.
        """
        block_bytes = self._pool.block_bytes
        blocks = set()
        per_sequence = []
        for sequence, frame_map in enumerate(self._maps):
            held = set(frame_map.values()) | self._bank_set(sequence)
            blocks.update(held)
            per_sequence.append(sum(block_bytes for b in held if self._pool.refcount[b] == 1))
        shared = sum(block_bytes for b in blocks if self._pool.refcount[b] > 1)
        private = sum(per_sequence)
        return {"shared": shared, "private": private, "total": shared + private,
                "per_layer": (shared + private) // self.num_layers, "per_sequence_private": per_sequence,
                "pool": self._pool.num_blocks * block_bytes, "block": block_bytes}
