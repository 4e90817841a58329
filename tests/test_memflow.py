"""MemFlow mode (KV memory bank) of the streaming generator, on a tiny random-weight Wan (fp32, CPU).

The reference is a plain diffusers forward of the whole sequence (clean history at timestep 0, the current block at
its sigma) in which every self-attention layer builds its own mask from the released bank rule, transcribed here
with the released token counters (G, L, the pending ``k_new``) rather than the library's frame-level form: the bank
of block i is simulated from the keys of the earlier frames that this very forward computes (a frame's keys depend
only on earlier frames), a slot's saliency is the full mean of the [text x frame] score matrix, and a frame that is
both in the bank and in the sink / window gets weight 2 (an additive log 2 in the mask), as the released
concatenation ``[sink | bank | local]`` repeats it. No kvpo code runs in the reference.
"""
import copy
import math

import pytest
import torch

from _assertions import assert_close_to_truth

pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

from kvpo_kernels.integrations.diffusers import StreamingConfig, StreamingWanGenerator  # noqa: E402
from kvpo_kernels.routing import chr_routes  # noqa: E402
from test_diffusers_adapter import LATENT, TINY, _model  # noqa: E402

TOKENS = LATENT["latent_height"] // 2 * (LATENT["latent_width"] // 2)


def _config(rule="rollout", bank=3, interval=3):
    # LongLive geometry with MemFlow's m_nearest_frames = 3 (the nearest frames are the block itself).
    return StreamingConfig(nearest_frames=3, memory_bank_frames=bank, bank_record_interval=interval,
                           bank_rule=rule, **LATENT)


# ------------------------------------------------------------------------------------------ independent reference
def _rotate(x, cos, sin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    return out


def _released_banks(config, num_blocks, saliency, frozen_from=None):
    """Bank read by each block (lists of frames), one per sequence: the released counters, in frame units.

    ``saliency(b, frames) -> [len(frames)]`` scores. Per block i: the q_bank write / compress of the first step,
    then the read ``bank[:min(local_end_bank - [i % ri == 0], S)]``, then the update of the commit when it runs with
    update_bank (every block for "inference", record blocks for "rollout")."""
    f, size, ri = config.frames_per_block, config.memory_bank_frames, config.bank_record_interval
    slots, g, l, pending, reads = [], 0, 0, None, []
    for i in range(num_blocks):
        if l >= 1:
            if l <= size:
                slots = slots[:l - 1] + [pending] + slots[l:]
            else:
                keep = torch.topk(saliency(slots), size - 1).indices.tolist()
                slots = [slots[k] for k in keep] + [pending]
        end_bank = ((i + 1) - 1) // ri + 1
        local_end_bank = l + end_bank - g
        reads.append(list(slots[:min(local_end_bank - (i % ri == 0), size)]))
        recording = frozen_from is None or i < frozen_from  # the replay: update_bank=False from the fork on
        if recording and (config.bank_rule == "inference" or i % ri == 0):
            pending, g, l = i * f, end_bank, local_end_bank
    return reads


def _frame_counts(config, num_frames, banks, routes_by_block):
    """float64 [F, F]: how many times a query of frame i reads frame j (0 = masked)."""
    f, sink = config.frames_per_block, config.sink_frames
    counts = torch.zeros(num_frames, num_frames, dtype=torch.float64)
    for i in range(num_frames):
        block, start = i // f, i // f * f
        route = routes_by_block.get(block)
        reach = config.window_frames - sink if route is None else config.nearest_frames
        for j in range(num_frames):
            own = start <= j < start + f
            local = j < min(sink, start) or max(sink, start - (reach - f)) <= j < start
            counts[i, j] = own + local + (route is not None and j in route)
        for j in banks[block]:
            counts[i, j] += 1
    return counts


class _ReferenceSelfAttention:
    """One layer: its bank simulated from this forward's own keys and text keys, then masked attention."""

    def __init__(self, config, cross_attn, text, routes_by_block, frozen_from):
        self.config, self.cross, self.text, self.routes = config, cross_attn, text, routes_by_block
        self.frozen_from = frozen_from
        self.inner = WanAttnProcessor()
        self.banks = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        keys = _rotate(attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1)), *rotary_emb)
        text_q = self.cross.norm_k(self.cross.to_k(self.text[0])).unflatten(2, (attn.heads, -1))
        num_frames = hidden_states.shape[1] // TOKENS
        frame_keys = keys.unflatten(1, (num_frames, TOKENS))  # [B, F, T, H, D]
        masks, self.banks = [], []
        for b in range(hidden_states.shape[0]):
            def saliency(frames, b=b):
                # the released compress_kv_bank: scores [H, L_text, n T] averaged over text, heads and tokens
                k = frame_keys[b, frames].flatten(0, 1)  # [n T, H, D]
                scores = torch.einsum("lhd,shd->hls", text_q[b], k) / math.sqrt(k.shape[-1])
                return scores.mean(1).mean(0).view(len(frames), TOKENS).mean(1)
            banks = _released_banks(self.config, num_frames // self.config.frames_per_block, saliency,
                                    self.frozen_from)
            self.banks.append(banks)
            counts = _frame_counts(self.config, num_frames, banks, self.routes)
            masks.append(counts.log().repeat_interleave(TOKENS, 0).repeat_interleave(TOKENS, 1))
        mask = torch.stack(masks)[:, None].to(hidden_states.dtype)
        return self.inner(attn, hidden_states, None, mask, rotary_emb)


def _reference_x0(model, config, history, x_t, sigma, prompt, routes_by_block=None, frozen_from=None):
    """x0 of the block after ``history`` (truth fp64, baseline fp32) and the fp64 run's banks [layer][b][block]."""
    video = torch.cat([history, x_t], dim=2)
    start = history.shape[2]
    timesteps = torch.zeros(video.shape[0], video.shape[2])
    timesteps[:, start:] = (1000 * sigma).view(-1, 1)
    out, banks = [], None
    for dtype in (torch.float64, torch.float32):
        reference = copy.deepcopy(model).to(dtype)
        text = [None]
        reference.condition_embedder.register_forward_hook(lambda module, args, output: text.__setitem__(0, output[2]))
        processors = [_ReferenceSelfAttention(config, block.attn2, text, routes_by_block or {}, frozen_from)
                      for block in reference.blocks]
        for block, processor in zip(reference.blocks, processors):
            block.attn1.set_processor(processor)
        timestep = timesteps.repeat_interleave(TOKENS, 1).to(torch.float64 if dtype == torch.float64 else
                                                             torch.float32)
        v = reference(video.to(dtype), timestep, prompt.to(dtype), return_dict=False)[0][:, :, start:]
        out.append(x_t.to(dtype) - sigma.to(dtype).view(-1, 1, 1, 1, 1) * v)
        banks = banks or [p.banks for p in processors]
    return out, banks


def _inputs(config, batch, blocks, seed):
    torch.manual_seed(seed)
    clean = torch.randn(batch, TINY["in_channels"], blocks * config.frames_per_block, config.latent_height,
                        config.latent_width)
    return clean, torch.randn(batch, 5, TINY["text_dim"])


def _block(x, config, index):
    f = config.frames_per_block
    return x[:, :, index * f:(index + 1) * f]


# ------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("rule,bank,interval,blocks", [("rollout", 2, 2, 9), ("inference", 2, 2, 8),
                                                       ("rollout", 3, 3, 13)])
def test_streaming_memflow_equals_masked_full_forward(rule, bank, interval, blocks):
    """Block by block until the bank has been recorded, filled and evicted from: x0 and the bank's frames."""
    config = _config(rule, bank, interval)
    model = _model(11)
    gen = StreamingWanGenerator(model, config, backend="torch")
    clean, prompt = _inputs(config, 2, blocks, seed=5)
    cache = gen.new_cache(2)
    first_full = bank * interval + 1  # the first block that reads a bank after an eviction
    checked = sorted({0, 1, interval, first_full - 1, first_full, blocks - 1})
    for index in range(blocks):
        if index in checked:
            x_t = torch.randn_like(_block(clean, config, index))
            sigma = torch.rand(2) * 0.9 + 0.05
            got = gen.predict_x0(cache, index, x_t, sigma, prompt)
            (truth, baseline), banks = _reference_x0(model, config, clean[:, :, :index * 3], x_t, sigma, prompt)
            assert_close_to_truth(f"x0 of block {index}", got, truth, baseline)
            for layer in range(TINY["num_layers"]):
                for b in range(2):
                    assert sorted(cache.bank_frames(b, layer)) == sorted(banks[layer][b][index]), (index, layer, b)
        gen.commit_block(cache, index, _block(clean, config, index), prompt)
    # The bank was full and has evicted: it no longer holds the first frames recorded.
    final = [cache.bank_frames(b, layer) for b in range(2) for layer in range(TINY["num_layers"])]
    assert all(len(frames) == bank for frames in final)
    recorded = [r * 3 for r in range(0, blocks, 1 if rule == "inference" else interval)]
    assert any(frames != recorded[:bank] for frames in final)


def test_replay_commits_record_no_bank_frame():
    """record_bank=False (the trainer's replay) equals the released forwards with update_bank=False from the fork:
    the bank steps repeat with the snapshot's last recorded frame."""
    config = _config("rollout", 2, 2)
    model = _model(3)
    gen = StreamingWanGenerator(model, config, backend="torch")
    blocks, fork = 9, 5
    clean, prompt = _inputs(config, 2, blocks, seed=2)
    cache = gen.new_cache(2)
    for index in range(blocks):
        if index > fork:
            x_t = torch.randn_like(_block(clean, config, index))
            sigma = torch.rand(2) * 0.9 + 0.05
            got = gen.predict_x0(cache, index, x_t, sigma, prompt)
            (truth, baseline), banks = _reference_x0(model, config, clean[:, :, :index * 3], x_t, sigma, prompt,
                                                     frozen_from=fork)
            assert_close_to_truth(f"replayed x0 of block {index}", got, truth, baseline)
            assert sorted(cache.bank_frames(1, 1)) == sorted(banks[1][1][index])
        gen.commit_block(cache, index, _block(clean, config, index), prompt, record_bank=index < fork)
    assert 6 * 3 not in cache.bank_frames(0, 0) and 8 * 3 not in cache.bank_frames(0, 0)


def test_bank_frames_outlive_the_local_window_without_copies():
    """A bank frame evicted from the window stays in the pool through the bank's reference; released with it."""
    config = _config("rollout", 3, 3)
    gen = StreamingWanGenerator(_model(2), config, backend="torch")
    clean, prompt = _inputs(config, 1, 13, seed=1)
    cache = gen.new_cache(1)
    for index in range(9):
        gen.commit_block(cache, index, _block(clean, config, index), prompt)
    assert 9 not in cache.frames(0) and cache.bank_frames(0, 0) == [0, 9, 18]
    tables = cache.bank_block_tables()
    assert len(tables) == TINY["num_layers"] and int(tables[0][1][0]) == 3 + 3 + 6  # sink + bank + window
    used = sum(1 for count in cache._pool.refcount if count)
    assert used == len(cache.frames(0)) + 1  # frame 9 is held by the bank only (0: sink, 18: window)
    block_9 = cache.bank_blocks(0)[0][1]
    assert cache._pool.refcount[block_9] == 1  # one reference for the sequence, whichever layers name it
    memory = cache.memory_bytes()
    assert memory["total"] == used * memory["block"]
    for index in range(9, 13):  # compressions: the dropped slots' blocks return to the pool
        gen.commit_block(cache, index, _block(clean, config, index), prompt)
    held = {b for frame_map in cache._maps for b in frame_map.values()} | cache._bank_set(0)
    assert {b for b, count in enumerate(cache._pool.refcount) if count} == held
    cache.release()
    assert not any(cache._pool.refcount)


def test_group_fork_shares_the_bank_and_routes_only_the_local_part():
    """A fork copies nothing (the bank blocks are the parent's); a routed branch reads [sink | bank | route |
    nearest] (checked against the reference), and the batched group equals the branches one by one."""
    config = _config("rollout", 2, 2)
    model = _model(4)
    gen = StreamingWanGenerator(model, config, backend="torch")
    blocks = 7
    clean, prompt = _inputs(config, 1, blocks + 1, seed=9)
    cache = gen.new_cache(1)
    for index in range(blocks):
        gen.commit_block(cache, index, _block(clean, config, index), prompt)
    blocks_before = cache._pool.num_blocks
    used_before = sum(1 for count in cache._pool.refcount if count)
    group = cache.fork(3)
    # Every reference is accounted for: one per sequence mapping a block, one per sequence whose bank names it.
    expected = [0] * cache._pool.num_blocks
    for holder in (cache, group):
        for sequence, frame_map in enumerate(holder._maps):
            for block in list(frame_map.values()) + list(holder._bank_set(sequence)):
                expected[block] += 1
    assert cache._pool.refcount == expected
    assert sum(1 for count in cache._pool.refcount if count) == used_before and cache._pool.num_blocks == blocks_before
    assert group.bank_blocks(1) == [cache.bank_blocks(1)[0]] * 3
    assert group.memory_bytes()["private"] == 0
    group.reserve(blocks_before + 3 * 3)  # the group's commit below, while the predictions' graphs hold views
    routes = chr_routes(gen.route_pool(cache, blocks), 2, gen.num_routed, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    x_t = torch.randn(3, TINY["in_channels"], 3, LATENT["latent_height"], LATENT["latent_width"])
    sigma = torch.tensor([0.7, 0.7, 0.7])
    got = gen.predict_x0(group, blocks, x_t, sigma, prompt, routes=routes + [None])
    history = clean[:, :, :blocks * 3]
    for k, route in enumerate(routes + [None]):
        (truth, baseline), _ = _reference_x0(model, config, history, x_t[k:k + 1], sigma[k:k + 1], prompt,
                                             None if route is None else {blocks: route})
        assert_close_to_truth(f"x0 of branch {k}", got[k:k + 1], truth, baseline)
        alone = gen.predict_x0(cache.fork(1), blocks, x_t[k:k + 1], sigma[k:k + 1], prompt,
                               routes=[route])
        torch.testing.assert_close(got[k:k + 1], alone, rtol=1e-5, atol=1e-5)
    parent_banks = [cache.bank_blocks(layer) for layer in range(TINY["num_layers"])]
    gen.commit_block(group, blocks, x_t, prompt, routes=routes + [None])
    # The parent (a snapshot) keeps its frames and bank; the branches' bank update is their own.
    assert cache.num_frames == blocks * 3
    assert [cache.bank_blocks(layer) for layer in range(TINY["num_layers"])] == parent_banks


def test_memflow_off_by_default_and_bad_config():
    assert StreamingConfig().memory_bank_frames == 0
    for bad in (dict(memory_bank_frames=-1), dict(bank_record_interval=0), dict(memory_bank_frames=True),
                dict(bank_rule="fifo")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            StreamingConfig(**bad)
    config = _config()
    gen = StreamingWanGenerator(_model(0), config, backend="torch")
    clean, prompt = _inputs(config, 1, 2, seed=0)
    with pytest.raises(ValueError, match="switch_frames"):
        gen.generate(clean, [prompt, prompt], switch_frames=[3])


def test_memflow_preset_is_longlive_plus_the_bank():
    """memflow1.3b = wan1.3b + the released differences that are geometry (docs/memflow.md lists every value)."""
    from kvpo_kernels.trainer.config import config_differences, load_config

    memflow, longlive = load_config("memflow1.3b"), load_config("wan1.3b")
    assert config_differences(longlive.to_dict(), memflow.to_dict()) == {
        "streaming.nearest_frames": (4, 3), "streaming.memory_bank_frames": (0, 3),
        "model.causal_checkpoint_key": (None, "generator"),
        "run.output_dir": ("runs/wan1.3b", "runs/memflow1.3b")}
    assert memflow.streaming.bank_record_interval == 3 and memflow.streaming.bank_rule == "rollout"
    assert memflow.num_routed() == 12 - 3 - 3


def test_trainer_steps_with_the_bank_and_never_grows_the_pool(tmp_path, monkeypatch):
    """kvpo-train's rollout and replay run in MemFlow mode (tiny model); the pool is sized up front incl. the bank."""
    from _trainer_setup import FAST
    from kvpo_kernels.cache import _BlockPool
    from kvpo_kernels.trainer.config import load_config
    from kvpo_kernels.trainer.loop import Trainer
    from kvpo_kernels.trainer.rollout import group_rollout, replay_energies

    config = load_config("tiny", overrides=FAST + [f"run.output_dir={tmp_path}", "streaming.memory_bank_frames=2",
                                                   "streaming.bank_record_interval=2"])
    trainer = Trainer(config)
    assert trainer.generator.config.memory_bank_frames == 2
    grows, real_grow = [], _BlockPool.grow
    monkeypatch.setattr(_BlockPool, "grow", lambda pool, extra: (grows.append(extra), real_grow(pool, extra))[1])
    ro = group_rollout(trainer.generator, trainer.prompts[:1], prompt_id=0, num_blocks=8, fork_block=6,
                       perturbed_blocks=1, num_branches=3, num_routed=2, latent_shape=trainer.latent_shape,
                       rng=torch.Generator().manual_seed(0))
    assert ro.prefix_cache.bank_frames(0, 0) and len(ro.prefix_cache.bank_frames(0, 0)) == 2
    energies = replay_energies(trainer.generator, ro, num_blocks=2, grad_steps=1)
    assert len(grows) == 1, f"the pool grew after it was made: {grows}"
    assert torch.isfinite(energies).all()
    records = trainer.train(steps=2)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_triton_backend_reads_the_per_layer_bank_tables():
    """The Triton kernel (interpreted on CPU) reads the per-layer tables, repeated bank blocks included, as the
    torch path does (which the reference pins above)."""
    config = _config("rollout", 2, 2)
    model = _model(11)
    triton, torch_path = (StreamingWanGenerator(model, config, backend=name) for name in ("triton", "torch"))
    clean, prompt = _inputs(config, 2, 6, seed=5)
    caches = triton.new_cache(2), torch_path.new_cache(2)
    for index in range(6):
        x_t = torch.randn_like(_block(clean, config, index))
        with torch.no_grad():
            got, want = (gen.predict_x0(cache, index, x_t, 0.5, prompt)
                         for gen, cache in zip((triton, torch_path), caches))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for gen, cache in zip((triton, torch_path), caches):
            gen.commit_block(cache, index, _block(clean, config, index), prompt)
    assert caches[0].bank_frames(0, 0) == caches[1].bank_frames(0, 0) and len(caches[0].bank_frames(0, 0)) == 2
