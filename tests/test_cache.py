"""GroupKVCache: sharing without copies, private blocks after a fork, windows and tables, eviction, memory."""
import pytest
import torch

from kvpo_kernels.cache import GroupKVCache

# LongLive on Wan2.1-T2V-1.3B: 30 layers, 12 heads x 128, 1560 tokens per latent frame, bf16.
LONGLIVE = dict(frames_per_block=3, sink_frames=3, window_frames=12, nearest_frames=4, cache_frames=21)


def _small(batch_size=1, **geometry):
    geometry = {**LONGLIVE, **geometry}
    return GroupKVCache(2, 5, 2, 4, batch_size=batch_size, dtype=torch.float32, **geometry)


def _fill(cache, frames):
    """Write `frames` frames per sequence; frame f of sequence b holds the value 1000 * b + f + layer / 10."""
    start = cache.num_frames
    ids = cache.append_frames(frames)
    batch = cache.batch_size
    for layer in range(cache.num_layers):
        value = (1000 * torch.arange(batch).view(batch, 1) + torch.arange(start, start + frames) + layer / 10)
        k = value.view(batch, frames, 1, 1, 1).expand(batch, frames, 5, 2, 4).reshape(batch, frames * 5, 2, 4)
        cache.write(layer, ids, k.float(), -k.float())
    return ids


def _frame_value(cache, sequence, frame, layer=0):
    k, v = cache.layer(layer)
    block = cache._maps[sequence][frame]
    assert torch.equal(v[block], -k[block])
    return float(k[block].unique().item())


def test_fork_shares_blocks_without_copy_and_parent_is_a_snapshot():
    cache = _small()
    for _ in range(3):
        _fill(cache, 3)
        cache.evict()
    pool_blocks, k_ptr = cache._pool.num_blocks, cache.layer(0)[0].data_ptr()
    group = cache.fork(9)
    assert group.batch_size == 9 and group.num_frames == 9
    assert cache._pool.num_blocks == pool_blocks and cache.layer(0)[0].data_ptr() == k_ptr  # no K/V copy
    assert all(group._maps[b] == cache._maps[0] for b in range(9))
    assert all(cache._pool.refcount[block] == 10 for block in cache._maps[0].values())
    before = {f: _frame_value(cache, 0, f) for f in cache.frames(0)}
    # Branches write private blocks: the parent and the other branches do not see them.
    ids = _fill(group, 3)
    assert len(set(ids.flatten().tolist())) == 27 and not set(ids.flatten().tolist()) & set(cache._maps[0].values())
    for b in range(9):
        assert _frame_value(group, b, 10) == 1000 * b + 10
    assert cache.num_frames == 9 and cache.frames(0) == sorted(before)
    assert {f: _frame_value(cache, 0, f) for f in cache.frames(0)} == before
    group.release()
    assert all(cache._pool.refcount[block] == 1 for block in cache._maps[0].values())
    assert len(cache._pool.free) == cache._pool.num_blocks - len(cache._maps[0])


def test_fork_of_a_batch_repeats_each_sequence_and_select():
    cache = _small(batch_size=2)
    _fill(cache, 3)
    group = cache.fork(3)
    assert group.batch_size == 6
    assert [_frame_value(group, b, 1) for b in range(6)] == [1, 1, 1, 1001, 1001, 1001]
    picked = group.select([4, 0])
    assert [_frame_value(picked, b, 2) for b in range(2)] == [1002, 2]
    with pytest.raises(ValueError, match="indices"):
        group.select([6])
    with pytest.raises(ValueError, match="num_branches"):
        cache.fork(0)


def test_windows_tables_and_routes_longlive():
    cache = _small(batch_size=1)
    for _ in range(7):  # frames 0..20 written
        _fill(cache, 3)
        cache.evict()
    # Resident: sink 0..2 and the 15 most recent history frames 6..20 (cache_frames 21 includes the next block).
    assert cache.frames(0) == [0, 1, 2] + list(range(6, 21))
    assert cache.route_pool() == list(range(6, 20))  # 14 frames, as the KVPO paper's LongLive setting
    assert cache.visible_frames(21) == [0, 1, 2] + list(range(15, 21))  # window 12 = 3 sink + 6 + the block's 3
    assert cache.visible_frames(21, [6, 9, 11, 12, 19]) == [0, 1, 2, 6, 9, 11, 12, 19, 20]
    group = cache.fork(9)
    routes = [None] + [sorted(6 + (k + 3 * i) % 14 for i in range(5)) for k in range(8)]
    table, counts = group.block_table(21, routes)
    assert table.dtype == torch.int32 and counts.dtype == torch.int32 and table.shape == (9, 9)
    assert counts.tolist() == [9] * 9
    frame_of = {block: frame for frame, block in cache._maps[0].items()}
    assert [frame_of[i] for i in table[0].tolist()] == [0, 1, 2] + list(range(15, 21))
    assert [frame_of[i] for i in table[4].tolist()] == [0, 1, 2, 7, 9, 12, 15, 18, 20]
    # Early blocks see only what exists: no history for block 0, the sink for block 1.
    fresh = _small()
    assert fresh.block_table(0)[1].tolist() == [0]
    _fill(fresh, 3)
    assert fresh.visible_frames(3) == [0, 1, 2]


@pytest.mark.parametrize("route, match", [([2, 7], "older frame"), ([19, 20], "older frame"), ([7, 7], "repeats"),
                                          ([7.0], "int")])
def test_bad_routes_are_rejected(route, match):
    cache = _small()
    for _ in range(7):
        _fill(cache, 3)
        cache.evict()
    with pytest.raises((ValueError, TypeError), match=match):
        cache.block_table(21, [route])


def test_tables_reject_evicted_frames_and_wrong_route_count():
    cache = _small()
    for _ in range(8):
        _fill(cache, 3)
        cache.evict()
    assert 6 not in cache.frames(0)
    with pytest.raises(ValueError, match="not in the cache"):
        cache.block_table(24, [[6]])  # 6 is an older frame for the block at 24, but it has been evicted
    with pytest.raises(ValueError, match="one entry per sequence"):
        cache.block_table(24, [None, None])


def test_eviction_reuses_blocks_for_long_streams():
    cache = _small(batch_size=2, cache_frames=12)
    for block in range(40):
        _fill(cache, 3)
        dropped = cache.evict()
        if block >= 3:
            assert dropped == list(range(3 * block - 6, 3 * block - 3))
        # Resident: 3 sink + 6 history frames per sequence, whatever the video length.
        assert all(len(cache.frames(b)) == min(3 * (block + 1), 9) for b in range(2))
    assert cache._pool.num_blocks <= 2 * (12 + 3)  # the pool stops growing: evicted blocks are reused
    assert _frame_value(cache, 1, 119) == 1119 and _frame_value(cache, 0, 1) == 1


def test_memory_longlive_group_is_at_most_1_25x_a_single_rollout():
    """8 branches + anchor forked at frame 21 of a LongLive rollout (meta tensors: real sizes, no memory)."""
    single = GroupKVCache(30, 1560, 12, 128, dtype=torch.bfloat16, device="meta", **LONGLIVE)
    for _ in range(7):
        single.append_frames(3)
        single.evict()
    frame_bytes = 30 * 2 * 1560 * 12 * 128 * 2
    one = single.memory_bytes()
    assert one["block"] == frame_bytes and one["total"] == 18 * frame_bytes and one["shared"] == 0
    group = single.fork(9)
    routes = [None] + [sorted(6 + (k + 3 * i) % 14 for i in range(5)) for k in range(8)]
    table, counts = group.block_table(21, routes)  # the one batched table of the perturbed block's forwards
    mem = group.memory_bytes()
    overhead = table.numel() * table.element_size() + counts.numel() * counts.element_size()
    assert mem["total"] + overhead <= 1.25 * one["total"]
    assert mem["shared"] == 18 * frame_bytes and mem["private"] == 0
    assert mem["pool"] == one["pool"]  # the fork allocated nothing
    # What the public KVPO code holds instead: one gathered copy of the 12-frame window per branch, plus a
    # saved copy of the rollout's cache to restore.
    assert 9 * 12 * frame_bytes + one["total"] > 6 * mem["total"]
    # Committing the perturbed block adds each sequence's own 3 frames (private), and evicts frames 6..8.
    group.append_frames(3)
    assert group.evict() == [6, 7, 8]
    after = group.memory_bytes()
    assert after["private"] == 9 * 3 * frame_bytes and after["per_sequence_private"] == [3 * frame_bytes] * 9
    assert after["shared"] == 15 * frame_bytes and after["total"] == (15 + 27) * frame_bytes
    assert single.frames(0)[3:6] == [6, 7, 8]  # the single rollout (a snapshot) still holds the evicted frames
    single.release()
    assert group.memory_bytes() == after


def test_write_checks_shapes_and_meta_pool_grows():
    cache = _small()
    ids = cache.append_frames()
    with pytest.raises(ValueError, match="k must have shape"):
        cache.write(0, ids, torch.randn(1, 14, 2, 4), torch.randn(1, 15, 2, 4))
    big = GroupKVCache(30, 1560, 12, 128, batch_size=16, dtype=torch.bfloat16, device="meta")
    big.append_frames(3)
    assert big.memory_bytes()["total"] == 48 * 30 * 2 * 1560 * 12 * 128 * 2


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(frame_tokens=2.5), TypeError, "frame_tokens"),
    (dict(window_frames=5), ValueError, "window_frames"),
    (dict(nearest_frames=2), ValueError, "nearest_frames"),
    (dict(cache_frames=11), ValueError, "cache_frames"),
    (dict(sink_frames=-1), ValueError, "sink_frames"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
])
def test_constructor_rejects_bad_geometry(kwargs, error, match):
    args = dict(num_layers=2, frame_tokens=5, num_heads=2, head_dim=4, **LONGLIVE)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        GroupKVCache(**args)


def test_empty_cache_has_a_real_block_for_padding_and_a_repr():
    cache = GroupKVCache(2, 5, 2, 4, batch_size=3)
    table, counts = cache.block_table(0)
    assert table.tolist() == [[0]] * 3 and counts.tolist() == [0] * 3 and cache._pool.num_blocks >= 1
    assert "batch_size=3" in repr(cache) and "frame_tokens=5" in repr(cache)


def _k(cache, rows, frames=1):
    return torch.full((rows, frames * cache.frame_tokens, 2, 4), 9.0)


def test_write_goes_only_to_live_blocks_this_cache_holds_alone():
    """Issue 9 case 8: after a fork, neither the parent's nor a child's write may reach a shared block (the parent's
    would leak into every child, a child's would overwrite the snapshot); stale ids after evict() and ids of
    another cache are refused; the layer index is range-checked."""
    parent = _small()
    ids = _fill(parent, 1)
    children = parent.fork(3)
    with pytest.raises(ValueError, match="block_ids: block .* is shared by 4 sequences"):
        parent.write(0, ids, _k(parent, 1), _k(parent, 1))
    with pytest.raises(ValueError, match="not a block of this cache's latest append_frames"):  # the parent's
        children.write(0, ids.expand(3, 1).contiguous(), _k(parent, 3), _k(parent, 3))
    assert _frame_value(parent, 0, 0) == 0.0 and _frame_value(children, 2, 0) == 0.0  # nothing leaked
    own = children.append_frames(1)  # private to each child: fine
    children.write(1, own, _k(parent, 3), _k(parent, 3))
    other = _small()
    with pytest.raises(ValueError, match="not a block of this cache"):
        other.write(0, own[:1], _k(parent, 1), _k(parent, 1))

    cache = _small()
    kept = _fill(cache, 3)  # frames 0-2 (sink)
    stale = _fill(cache, 3)  # frames 3-5: evicted below, their blocks reused by later frames
    for _ in range(7):
        latest = _fill(cache, 3)
        cache.evict()
    assert 3 not in cache.frames() and set(stale.view(-1).tolist()) & set(cache._maps[0].values())
    for ids in (stale, kept):  # an earlier append's ids: evicted-and-reused, or live but not the latest frames
        with pytest.raises(ValueError, match="not a block of this cache's latest append_frames"):
            cache.write(0, ids, _k(cache, 1, 3), _k(cache, 1, 3))
    cache.write(0, latest.clone(), _k(cache, 1, 3), _k(cache, 1, 3))  # any tensor of the right ids is fine
    for layer in (-1, 2, True, 1.0):
        with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\)"):
            cache.write(layer, latest, _k(cache, 1, 3), _k(cache, 1, 3))
        with pytest.raises(ValueError, match="layer must be"):
            cache.layer(layer)


def test_layer_views_never_read_a_stale_pool():
    """Issue 9 case 8: a view from layer() taken before the pool grows would read the old pool afterwards; growth
    refuses while a view is alive, and works once it is dropped."""
    cache = GroupKVCache(2, 5, 2, 4, batch_size=1, reserve_blocks=2, **LONGLIVE)
    _fill(cache, 2)
    k_view, v_view = cache.layer(0)
    with pytest.raises(RuntimeError, match="pool must grow .* view"):
        cache.append_frames(3)
    del k_view, v_view
    _fill(cache, 3)
    assert _frame_value(cache, 0, 4) == 4.0
