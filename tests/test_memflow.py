"""MemFlow mode (KV memory bank) of the streaming generator, on a tiny random-weight Wan (fp32, CPU).

The reference is a plain diffusers forward of the whole sequence (clean history at timestep 0, the current block at
its sigma) in which every self-attention layer builds its own mask from the released bank rule, transcribed here
with the released token counters (G, L, the pending ``k_new``) rather than the library's frame-level form: the bank
of block i is simulated from the keys of the earlier frames that this very forward computes (a frame's keys depend
only on earlier frames), a slot's saliency is the full mean of the [text x frame] score matrix, and a frame that is
both in the bank and in the sink / window gets weight 2 (an additive log 2 in the mask), as the released
concatenation ``[sink | bank | local]`` repeats it. A routed block reads the sink, its route frames and its nearest
frames, or with ``route_layout="memflow"`` no separate sink: the frames that the released cache holds in the
route's slots, from a transcription of the released slot arithmetic (``_released_perturbed_reads``). With a prompt
switch the sequence also holds the re-encoded copies of the frames the released re-cache rewrites (at their
absolute RoPE positions, under the new prompt), and the transcribed counters run the re-cache's own bank steps
with a zeroed cross-attention cache. No kvpo code runs in the reference.
"""
import copy
import math

import pytest
import torch

from _assertions import assert_close_to_truth

pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

from kvpo_kernels.cache import GroupKVCache  # noqa: E402
from kvpo_kernels.integrations.diffusers import StreamingConfig, StreamingWanGenerator  # noqa: E402
from kvpo_kernels.routing import chr_routes  # noqa: E402
from test_diffusers_adapter import LATENT, TINY, _model  # noqa: E402
from test_prompt_segments import _PerFrameCrossAttention  # noqa: E402

TOKENS = LATENT["latent_height"] // 2 * (LATENT["latent_width"] // 2)


def _config(rule="rollout", bank=3, interval=3, layout="sink"):
    # LongLive geometry (cache 21) with MemFlow's m_nearest_frames = 3 (the nearest frames are the block itself).
    return StreamingConfig(nearest_frames=3, memory_bank_frames=bank, bank_record_interval=interval,
                           bank_rule=rule, route_layout=layout, **LATENT)


# ------------------------------------------------------------------------------------------ independent reference
def _rotate(x, cos, sin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    return out


def _released_banks(config, num_blocks, saliency, frozen_from=None, switch_block=None):
    """Bank read by each block (lists of frames), one per sequence: the released counters, in frame units, and the
    bank read by the re-cache at ``switch_block`` (None without a switch).

    ``saliency(frames, segment) -> [len(frames)]`` scores against prompt segment ``segment`` (0 before the switch,
    1 from it on); None: the cross-attention cache is zeroed (every score 0). Per block i: the q_bank write /
    compress of the first step, then the read ``bank[:min(local_end_bank - [i % ri == 0], S)]``, then the update
    of the commit when it runs with update_bank (every block for "inference", record blocks for "rollout"). At the
    switch (``recache_after_switch``): the re-cache forward's q_bank step with the zeroed cache, its read
    ``bank[:min(local_end_bank, S)]`` (is_recache), no update; then block i's first step, still zeroed."""
    f, size, ri = config.frames_per_block, config.memory_bank_frames, config.bank_record_interval
    state = dict(slots=[], g=0, l=0, pending=None)
    reads, recache_read = [], None

    def step(segment):  # _apply_cache_updates_before
        slots, l = state["slots"], state["l"]
        if l >= 1:
            if l <= size:
                state["slots"] = slots[:l - 1] + [state["pending"]] + slots[l:]
            else:
                scores = torch.zeros(len(slots)) if segment is None else saliency(slots, segment)
                keep = torch.topk(scores, size - 1).indices.tolist()
                state["slots"] = [slots[k] for k in keep] + [state["pending"]]

    for i in range(num_blocks):
        end_bank = ((i + 1) - 1) // ri + 1
        if i == switch_block:
            step(None)
            recache_read = list(state["slots"][:min(state["l"] + end_bank - state["g"], size)])
        step(None if i == switch_block else int(switch_block is not None and i > switch_block))
        local_end_bank = state["l"] + end_bank - state["g"]
        reads.append(list(state["slots"][:min(local_end_bank - (i % ri == 0), size)]))
        recording = frozen_from is None or i < frozen_from  # the replay: update_bank=False from the fork on
        if recording and (config.bank_rule == "inference" or i % ri == 0):
            state.update(pending=i * f, g=end_bank, l=local_end_bank)
    return reads, recache_read


def _frame_counts(config, num_frames, banks, routes_by_block):
    """float64 [F, F]: how many times a query of frame i reads frame j (0 = masked). A routed block reads the sink,
    its route frames and its nearest frames, or, with route_layout "memflow", no separate sink."""
    f = config.frames_per_block
    counts = torch.zeros(num_frames, num_frames, dtype=torch.float64)
    for i in range(num_frames):
        block, start = i // f, i // f * f
        route = routes_by_block.get(block)
        sink = 0 if route is not None and config.route_layout == "memflow" else config.sink_frames
        reach = config.window_frames - sink if route is None else config.nearest_frames
        for j in range(num_frames):
            own = start <= j < start + f
            local = j < min(sink, start) or max(sink, start - (reach - f)) <= j < start
            counts[i, j] = own + local + (route is not None and j in route)
        for j in banks[block]:
            counts[i, j] += 1
    return counts


def _recache_written(config, switch):
    """Frames the released re-cache at frame ``switch`` writes (``recache_after_switch``: the last
    ``min(local_attn_size, s)`` frames; the write protects the sink unless the forward starts at frame 0)."""
    first = switch - min(config.window_frames, switch)
    return list(range(first if first == 0 else max(config.sink_frames, first), switch))


def _switch_counts(config, num_frames, switch, banks, recache_read, routes_by_block):
    """float64 [E, E] over the entries ``[frames 0..F-1 | re-encoded copies of the written frames]``: how many
    times a query entry reads a key entry. A frame before the switch reads the committed (old prompt) frames; a
    copy reads what the released re-cache forward's ``k_cat`` holds, ``[old sink | bank | the newest window - sink
    copies]`` (all copies when the re-cache starts at frame 0); a frame after the switch reads the copies where
    they exist (a routed block: sink, route and nearest frames). Bank slots always name the committed frames (the
    released bank holds copies of the keys)."""
    f, sink, local = config.frames_per_block, config.sink_frames, config.window_frames - config.sink_frames
    written = _recache_written(config, switch)
    entries = [(j, 0) for j in range(num_frames)] + [(j, 1) for j in written]
    index = {entry: n for n, entry in enumerate(entries)}
    counts = torch.zeros(len(entries), len(entries), dtype=torch.float64)
    for n, (i, version) in enumerate(entries):
        if version:
            keys = [(j, 1) for j in written] if written[0] == 0 else \
                [(j, 0) for j in range(sink)] + [(j, 1) for j in written if j >= switch - local]
            keys += [(j, 0) for j in recache_read]
        else:
            start, route = i // f * f, routes_by_block.get(i // f)
            reach = local if route is None else config.nearest_frames
            window = [j for j in range(start) if j < sink or start - (reach - f) <= j] + list(route or [])
            keys = [(j, 0) for j in range(start, start + f)] + [(j, 0) for j in banks[i // f]]
            keys += [(j, int(i >= switch and j in written)) for j in window]
        for key in keys:
            counts[n, index[key]] += 1
    return counts


class _ReferenceSelfAttention:
    """One layer: its bank simulated from this forward's own keys and text keys, then masked attention.

    With a ``switch`` frame the sequence is ``[frames 0..F-1 | re-encoded copies]`` (:func:`_switch_counts`) and
    the context holds the two prompt segments (``lengths`` tokens each)."""

    def __init__(self, config, cross_attn, text, routes_by_block, frozen_from, switch=None, lengths=None):
        self.config, self.cross, self.text, self.routes = config, cross_attn, text, routes_by_block
        self.frozen_from, self.switch, self.lengths = frozen_from, switch, lengths
        self.inner = WanAttnProcessor()
        self.banks = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        keys = _rotate(attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1)), *rotary_emb)
        text_q = self.cross.norm_k(self.cross.to_k(self.text[0])).unflatten(2, (attn.heads, -1))
        text_qs = [text_q] if self.switch is None else text_q.split(self.lengths, dim=1)
        frame_keys = keys.unflatten(1, (-1, TOKENS))  # [B, entries, T, H, D]; entry j < F is frame j
        num_frames = frame_keys.shape[1] - (0 if self.switch is None else
                                            len(_recache_written(self.config, self.switch)))
        f = self.config.frames_per_block
        masks, self.banks = [], []
        for b in range(hidden_states.shape[0]):
            def saliency(frames, segment, b=b):
                # the released compress_kv_bank: scores [H, L_text, n T] averaged over text, heads and tokens
                k = frame_keys[b, frames].flatten(0, 1)  # [n T, H, D]
                scores = torch.einsum("lhd,shd->hls", text_qs[segment][b], k) / math.sqrt(k.shape[-1])
                return scores.mean(1).mean(0).view(len(frames), TOKENS).mean(1)
            switch_block = None if self.switch is None else self.switch // f
            banks, recache_read = _released_banks(self.config, num_frames // f, saliency, self.frozen_from,
                                                  switch_block)
            self.banks.append(banks)
            counts = _frame_counts(self.config, num_frames, banks, self.routes) if self.switch is None else \
                _switch_counts(self.config, num_frames, self.switch, banks, recache_read, self.routes)
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


class _PositionedRope(torch.nn.Module):
    """diffusers' RoPE of a video whose frames sit at the given absolute positions (re-encoded copies repeat one)."""

    def __init__(self, rope, positions):
        super().__init__()
        self.rope, self.positions = rope, positions

    def forward(self, hidden_states):
        b, c, _, h, w = hidden_states.shape
        length = max(self.positions) + 1
        cos, sin = self.rope(hidden_states.new_empty(b, c, length, h, w))
        tokens = cos.shape[1] // length
        index = (torch.tensor(self.positions)[:, None] * tokens + torch.arange(tokens)).reshape(-1)
        return cos[:, index], sin[:, index]


def _reference_switch_x0(model, config, history, x_t, sigma, prompts, switch, routes_by_block=None):
    """Like :func:`_reference_x0` for a block after a prompt switch at frame ``switch`` (prompts: the two
    segments): one forward of ``[history | x_t | re-encoded copies of the re-cache's frames]``, each frame
    cross-attending to its own segment (a copy: the new one), the copies at timestep 0 (context_noise)."""
    start = history.shape[2]
    written = _recache_written(config, switch)
    video = torch.cat([history, x_t, history[:, :, written]], dim=2)
    timesteps = torch.zeros(video.shape[0], video.shape[2])
    timesteps[:, start:start + x_t.shape[2]] = (1000 * sigma).view(-1, 1)
    frame_prompt = [int(j >= switch) for j in range(start + x_t.shape[2])] + [1] * len(written)
    positions = list(range(start + x_t.shape[2])) + written
    lengths = [p.shape[1] for p in prompts]
    out, banks = [], None
    for dtype in (torch.float64, torch.float32):
        reference = copy.deepcopy(model).to(dtype)
        reference.rope = _PositionedRope(reference.rope, positions)
        text = [None]
        reference.condition_embedder.register_forward_hook(lambda module, args, output: text.__setitem__(0, output[2]))
        processors = [_ReferenceSelfAttention(config, block.attn2, text, routes_by_block or {}, None, switch, lengths)
                      for block in reference.blocks]
        for block, processor in zip(reference.blocks, processors):
            block.attn1.set_processor(processor)
            block.attn2.set_processor(_PerFrameCrossAttention(frame_prompt, lengths))
        timestep = timesteps.repeat_interleave(TOKENS, 1).to(dtype)
        context = torch.cat(prompts, dim=1).to(dtype)
        v = reference(video.to(dtype), timestep, context, return_dict=False)[0][:, :, start:start + x_t.shape[2]]
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


@pytest.mark.parametrize("switch_block,blocks", [(3, 6), (6, 10)])
def test_streaming_memflow_switch_equals_masked_full_forward(switch_block, blocks):
    """A prompt switch (re-cache) before the bank is full (frame 9: the re-cache starts at frame 0 and rewrites the
    sink) and once it is full and evicting (frame 18: frames 6..17, in two forwards): x0 and the banks (in slot
    order) equal the transcription, block by block from the switch through a compress after it; a routed block
    right after the switch reads re-encoded frames that no unrouted block reads (6..8 at the second switch)."""
    config = _config("rollout", 2, 2)
    model = _model(12)
    gen = StreamingWanGenerator(model, config, backend="torch")
    clean, _ = _inputs(config, 2, blocks, seed=6)
    prompts = [torch.randn(2, 5, TINY["text_dim"]), torch.randn(2, 7, TINY["text_dim"])]
    switch = switch_block * 3
    cache = gen.new_cache(2)
    for index in range(blocks):
        segment = int(index >= switch_block)
        if index == switch_block:
            assert gen.recache(cache, clean[:, :, :switch], prompts[1]) == _recache_written(config, switch)
        if index >= switch_block:
            x_t = torch.randn_like(_block(clean, config, index))
            sigma = torch.rand(2) * 0.9 + 0.05
            got = gen.predict_x0(cache, index, x_t, sigma, prompts[1])
            (truth, baseline), banks = _reference_switch_x0(model, config, clean[:, :, :index * 3], x_t, sigma,
                                                            prompts, switch)
            assert_close_to_truth(f"x0 of block {index} (switch at block {switch_block})", got, truth, baseline)
            for layer in range(TINY["num_layers"]):
                for b in range(2):
                    assert cache.bank_frames(b, layer) == banks[layer][b][index], (index, layer, b)
        if index == switch_block:
            route = [4, 6, 7, 8, 10, 12] if switch > 12 else [3, 4, 6, 7]
            got = gen.predict_x0(cache, index, x_t, sigma, prompts[1], routes=[route, route])
            (truth, baseline), _ = _reference_switch_x0(model, config, clean[:, :, :index * 3], x_t, sigma, prompts,
                                                        switch, {index: route})
            assert_close_to_truth(f"routed x0 of block {index} (switch at block {switch_block})", got, truth,
                                  baseline)
        gen.commit_block(cache, index, _block(clean, config, index), prompts[segment],
                         before_switch=index + 1 == switch_block)
    assert all(len(cache.bank_frames(b, layer)) == 2 for b in range(2) for layer in range(TINY["num_layers"]))


@pytest.mark.parametrize("size,kept", [(3, [0, 1]), (4, [2, 3, 0])])
def test_switch_bank_step_keeps_the_released_tied_slots(size, kept):
    """Before a switch the released compress scores every slot 0 (zeroed cross-attention cache) and keeps the slots
    ``torch.topk`` returns for the tie, in its order (on the CPU: the lowest two of 3; [2, 3, 0] of 4), then the
    new frame; the re-cache's own step (same zeros) then changes nothing. A scored step before the switch is
    refused."""
    config = _config("rollout", size, 1)
    assert torch.topk(torch.zeros(size), size - 1).indices.tolist() == kept  # the released call, on the CPU
    gen = StreamingWanGenerator(_model(5), config, backend="torch")
    clean, prompt = _inputs(config, 2, size + 3, seed=3)
    cache = gen.new_cache(2)
    for index in range(size + 1):  # records frames 0, 3, ..., then a scored compress at block `size`
        gen.commit_block(cache, index, _block(clean, config, index), prompt)
    before = [[cache.bank_frames(b, layer) for layer in range(TINY["num_layers"])] for b in range(2)]
    with pytest.raises(ValueError, match="before_switch"):
        gen.recache(cache, clean[:, :, :(size + 1) * 3], prompt)
    frame = (size + 1) * 3
    gen.commit_block(cache, size + 1, _block(clean, config, size + 1), prompt, before_switch=True)
    for b in range(2):
        for layer in range(TINY["num_layers"]):
            assert cache.bank_frames(b, layer) == [before[b][layer][k] for k in kept] + [frame]
    after = [[cache.bank_frames(b, layer) for layer in range(TINY["num_layers"])] for b in range(2)]
    gen.recache(cache, clean[:, :, :frame + 3], torch.randn(1, 6, TINY["text_dim"]))
    assert [[cache.bank_frames(b, layer) for layer in range(TINY["num_layers"])] for b in range(2)] == after


def test_generate_with_a_switch_is_the_manual_loop_with_the_bank():
    config = _config("rollout", 2, 2)
    gen = StreamingWanGenerator(_model(6), config, backend="torch")
    prompts = [torch.randn(1, 5, TINY["text_dim"]), torch.randn(1, 4, TINY["text_dim"])]
    noise = torch.randn(1, TINY["in_channels"], 24, LATENT["latent_height"], LATENT["latent_width"])
    torch.manual_seed(5)
    video = gen.generate(noise, prompts, switch_frames=[18])
    torch.manual_seed(5)
    cache, out = gen.new_cache(1), []
    for i in range(8):
        if i == 6:
            gen.recache(cache, torch.cat(out, dim=2), prompts[1])
        out.append(gen.generate_block(cache, i, noise[:, :, 3 * i:3 * i + 3], prompts[i // 6],
                                      before_switch=i == 5).x0)
    assert torch.equal(video, torch.cat(out, dim=2))
    inference = StreamingWanGenerator(_model(6), _config("inference", 2, 2), backend="torch")
    with pytest.raises(ValueError, match="bank_rule"):
        inference.generate(noise, prompts, switch_frames=[18])


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


def test_bank_slots_are_copies_and_evicted_frames_free_their_blocks():
    """A bank slot is a block of its own (the released ``kv_bank`` holds copies): frame 9, evicted from the window,
    lives on only as the copy in slot 1; the sequence holds S slot blocks + 1 pending block (the released
    ``k_new``), all released with the cache."""
    config = _config("rollout", 3, 3)
    gen = StreamingWanGenerator(_model(2), config, backend="torch")
    clean, prompt = _inputs(config, 1, 13, seed=1)
    cache = gen.new_cache(1)
    for index in range(9):
        gen.commit_block(cache, index, _block(clean, config, index), prompt)
    assert 9 not in cache.frames(0) and cache.bank_frames(0, 0) == [0, 9, 18]
    _, counts = cache.bank_block_table()
    assert int(counts[0]) == 3 + 3 + 6  # sink + bank + window (one table: the slot ids are the same in every layer)
    used = sum(1 for count in cache._pool.refcount if count)
    assert used == len(cache.frames(0)) + 3 + 1  # the resident frames, 3 slot blocks, the pending block
    slots = cache.bank_blocks(0)[0]
    assert not set(slots) & set(cache._maps[0].values()) and all(cache._pool.refcount[b] == 1 for b in slots)
    k, v = cache.layer(0)
    for slot, frame in ((0, 0), (2, 18)):  # still resident: the copy is bitwise the frame's block
        assert torch.equal(k[slots[slot]], k[cache._maps[0][frame]]) and torch.equal(v[slots[slot]],
                                                                                      v[cache._maps[0][frame]])
    del k, v
    memory = cache.memory_bytes()
    assert memory["total"] == used * memory["block"]
    for index in range(9, 13):  # compressions: copies within the slot blocks, no new block
        gen.commit_block(cache, index, _block(clean, config, index), prompt)
        assert sum(1 for count in cache._pool.refcount if count) == len(cache.frames(0)) + 3 + 1
    held = {b for frame_map in cache._maps for b in frame_map.values()} | cache._bank_set(0)
    assert {b for b, count in enumerate(cache._pool.refcount) if count} == held
    cache.release()
    assert not any(cache._pool.refcount)


def test_bank_record_copies_each_layers_kept_frames_and_rejects_bad_steps():
    """Cache level, 2 layers, 2 sequences, S = 2: the full bank's step keeps per layer and sequence the slot its
    scores rank first (layer 0: slot 1, layer 1: slot 0), then the pending frame; each layer's plane of the slot
    blocks holds that layer's frames' K/V bitwise, whichever frames the other layer keeps. Bad steps raise before
    any change."""
    cache = GroupKVCache(2, 2, 1, 4, batch_size=2, nearest_frames=3)
    written = {}  # (frame, layer) -> (k, v) [B, tokens, 1, 4] of the frame
    for block in range(3):
        ids = cache.append_frames()
        for layer in range(2):
            k, v = torch.randn(2, 3 * 2, 1, 4), torch.randn(2, 3 * 2, 1, 4)
            cache.write(layer, ids, k, v)
            for offset in range(3):
                written[3 * block + offset, layer] = (k[:, 2 * offset:2 * offset + 2], v[:, 2 * offset:2 * offset + 2])
        if block < 2:
            cache.bank_record(3 * block, block, 2)
    with pytest.raises(ValueError, match="scores"):
        cache.bank_record(6, 2, 2, torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="frame 30 is neither resident"):
        cache.bank_record(30, 2, 2)
    assert cache.bank_last == (3, 1) and [cache.bank_frames(b, layer) for b in range(2) for layer in range(2)] == \
        [[0, 3]] * 4
    scores = torch.tensor([[0.0, 1.0], [1.0, 0.0]])[:, None].expand(2, 2, 2)  # [layers, B, slots]
    cache.bank_record(6, 2, 2, scores)
    assert [cache.bank_frames(b, layer) for b in range(2) for layer in range(2)] == [[3, 6], [0, 6]] * 2
    assert len(cache._bank_set(0) | cache._bank_set(1)) == 2 * (2 + 1)
    for layer in range(2):
        k_pool, v_pool = cache.layer(layer)
        for b in range(2):
            for slot, frame in enumerate(cache.bank_frames(b, layer)):
                block = cache.bank_blocks(layer)[b][slot]
                assert torch.equal(k_pool[block], written[frame, layer][0][b]), (layer, b, slot)
                assert torch.equal(v_pool[block], written[frame, layer][1][b]), (layer, b, slot)
    fresh = GroupKVCache(1, 2, 1, 4, nearest_frames=3)
    fresh.append_frames()
    with pytest.raises(ValueError, match="slot 1: the bank holds 0 of 2 slots"):
        fresh.bank_record(0, 1, 2)


@pytest.mark.parametrize("rule,fork_block,written", [("inference", 3, [1]), ("rollout", 5, [0, 1])])
def test_fork_shares_the_bank_and_a_branch_copies_on_its_first_bank_step(rule, fork_block, written):
    """A fork allocates nothing (slot and pending blocks shared by refcount); a branch's first bank step after it
    ("inference", fork 3: a new frame overwrites slot 1 of a bank not yet full; "rollout", fork 5: the full bank
    compresses, with the shared pending block) writes private copies of the slots it changes: its sibling's and
    the parent's banks keep their blocks and their bytes; the branch's slots hold, per layer, the kept slots' K/V
    and the pending frame's, bitwise."""
    config = _config(rule, 2, 2)
    gen = StreamingWanGenerator(_model(4), config, backend="torch")
    clean, prompt = _inputs(config, 1, fork_block + 1, seed=9)
    cache = gen.new_cache(1)
    for index in range(fork_block):
        gen.commit_block(cache, index, _block(clean, config, index), prompt)
    used = sum(1 for count in cache._pool.refcount if count)
    branch, sibling = cache.fork(1), cache.fork(1)
    assert sum(1 for count in cache._pool.refcount if count) == used  # nothing allocated, nothing copied
    layers = range(TINY["num_layers"])
    shared = cache._bank_set(0)
    assert branch._bank_set(0) == sibling._bank_set(0) == shared and len(shared) == 2 + 1
    assert all(cache._pool.refcount[b] == 3 for b in shared)

    def snapshot(holder):
        ids = holder.bank_blocks(0)[0]
        planes = [(holder.layer(layer)[0][ids].clone(), holder.layer(layer)[1][ids].clone()) for layer in layers]
        return ids, [holder.bank_frames(0, layer) for layer in layers], planes

    before = snapshot(sibling)
    gen.commit_block(branch, fork_block, _block(clean, config, fork_block), prompt)
    for holder in (sibling, cache):
        ids, frames, planes = snapshot(holder)
        assert ids == before[0] and frames == before[1]
        assert all(torch.equal(a, b) for got, want in zip(planes, before[2]) for a, b in zip(got, want))
    new_ids = branch.bank_blocks(0)[0]
    assert [j for j, block in enumerate(new_ids) if block != before[0][j]] == written
    assert all(branch._pool.refcount[new_ids[j]] == 1 and new_ids[j] not in shared for j in written)
    recorded = branch.bank_last[0]
    assert (branch._bank_pending[0] in shared) == (recorded != fork_block * 3)  # a new record: a new pending copy
    for layer in layers:
        k = branch.layer(layer)[0]
        for slot, frame in enumerate(branch.bank_frames(0, layer)):
            source = branch._bank_pending[0] if frame == recorded else before[0][before[1][layer].index(frame)]
            assert torch.equal(k[new_ids[slot]], k[source]), (layer, slot)
            if frame == recorded and frame in branch._maps[0]:  # the pending copy is the frame as committed
                assert torch.equal(k[source], k[branch._maps[0][frame]])


def test_group_rollout_holds_at_most_s_plus_one_bank_blocks_per_sequence(tmp_path, monkeypatch):
    """More layers (8) than bank slots (S = 3), a record every block, 30 blocks, an early fork: every sequence holds
    at most its resident frames + S + 1 blocks (S slot blocks + the pending block, the released per-layer copies)
    at every commit, whichever frames its layers keep; the pool that group_pool_blocks sizes is never exceeded and
    never grows, through the rollout (bank term (G + 2) (S + 1)) and an 8-block replay (each replayed commit of the
    full bank copies the G branches' S slots, which the per-block snapshots keep: S + 1 + (W - 1) G S)."""
    import dataclasses

    from _trainer_setup import FAST
    from kvpo_kernels.cache import _BlockPool
    from kvpo_kernels.trainer.config import load_config
    from kvpo_kernels.trainer.loop import Trainer
    from kvpo_kernels.trainer.rollout import group_pool_blocks, group_rollout, replay_energies

    config = load_config("tiny", overrides=FAST + [f"run.output_dir={tmp_path}", "streaming.memory_bank_frames=3",
                                                   "streaming.bank_record_interval=1", "model.num_layers=8",
                                                   "rollout.num_blocks=30", "rollout.fork_min=6",
                                                   "rollout.fork_max=6"])
    trainer = Trainer(config)
    cfg, size = trainer.generator.config, 3
    grows, peak, worst = [], [0], [0]
    real_grow, real_allocate, real_evict = _BlockPool.grow, _BlockPool.allocate, GroupKVCache.evict

    def allocate(pool, count):
        ids = real_allocate(pool, count)
        peak[0] = max(peak[0], pool.num_blocks - len(pool.free))
        return ids

    def evict(cache):
        for b, frame_map in enumerate(cache._maps):
            held = set(frame_map.values()) | cache._bank_set(b)
            worst[0] = max(worst[0], len(held) - len(frame_map))
        return real_evict(cache)

    monkeypatch.setattr(_BlockPool, "grow", lambda pool, extra: (grows.append(extra), real_grow(pool, extra))[1])
    monkeypatch.setattr(_BlockPool, "allocate", allocate)
    monkeypatch.setattr(GroupKVCache, "evict", evict)
    ro = group_rollout(trainer.generator, trainer.prompts[:1], prompt_id=0, num_blocks=30, fork_block=6,
                       perturbed_blocks=1, num_branches=3, num_routed=2, latent_shape=trainer.latent_shape,
                       rng=torch.Generator().manual_seed(0), policy_window_frames=8)
    assert worst[0] <= size + 1, f"a sequence held {worst[0]} bank blocks besides its resident frames"
    replay_energies(trainer.generator, ro, grad_steps=1)
    assert len(grows) == 1 and peak[0] <= grows[0], (grows, peak)
    without = dataclasses.replace(cfg, memory_bank_frames=0)
    assert group_pool_blocks(cfg, 3, 24, 1, False) - group_pool_blocks(without, 3, 24, 1, False) == (3 + 2) * 4
    assert group_pool_blocks(cfg, 3, 24, 8, False) == cfg.cache_frames + 3 * 8 + (size + 1) + (8 - 1) * 3 * size


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
    # the group's commit below (3 frames and, copied on write, 2 bank slots + 1 pending block per sequence),
    # while the predictions' graphs hold views
    group.reserve(blocks_before + 3 * 3 + 3 * (2 + 1))
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


# ------------------------------------------------------------------ routed blocks in the released MemFlow layout
def _released_cache_step(slots, global_end, local_end, start, f, sink, capacity):
    """One forward of the block at frame ``start`` on the released cache, transcribed in frame units with frame
    labels for the K/V (models/memflow/wan/modules/causal_model.py l. 347-458): returns ``temp_k``'s labels and its
    ``local_end_index``; the commit stores them (``_apply_cache_updates``: the same roll and insert)."""
    temp = list(slots)
    current_end = start + f
    if current_end > global_end and f + local_end > capacity:  # roll_and_insert
        evicted = f + local_end - capacity
        rolled = local_end - evicted - sink
        new_local_end = local_end + current_end - global_end - evicted
        temp[sink:sink + rolled] = temp[sink + evicted:sink + evicted + rolled]
    else:  # direct_insert
        new_local_end = local_end + current_end - global_end
    temp[new_local_end - f:new_local_end] = range(start, start + f)
    return temp, new_local_end


def _released_perturbed_reads(start, selected, f=3, sink=3, capacity=33, m=3):
    """``(older, nearest)`` frame labels that the released ``_build_perturbed_local_window`` (l. 190-228) reads in
    the block at ``start`` for the plan's ``selected_older_frame_indices``, after blocks 0 .. start - f were
    committed; ``nearest`` without the block's own frames."""
    slots, global_end, local_end = [None] * capacity, 0, 0
    for block_start in range(0, start + 1, f):
        temp, new_local_end = _released_cache_step(slots, global_end, local_end, block_start, f, sink, capacity)
        if block_start < start:  # committed
            slots, global_end, local_end = temp, block_start + f, new_local_end
    nearest_start = max(0, new_local_end - m)
    older = [temp[j] for j in selected if j + 1 <= nearest_start and j + 1 <= len(temp)]
    return older, temp[nearest_start:new_local_end - f]


def _released_memflow_plan(fork_frame, num_branches, base_seed, sample_idx, seed_context, f=3, window=12, m=3,
                           capacity=33):
    """The released MemFlow ``plan_perturbation`` pool and ``_build_dispersed_branch_plans``
    (pipeline/diversity_sampling.py l. 67-83, 105-114, 311-357) for a given fork: (pool size, branch slot lists)."""
    pool = max(min(fork_frame, capacity) - m, 0)
    n_to_select = min(window - m, pool)
    master_rng = torch.Generator()
    master_rng.manual_seed(base_seed + sample_idx * 97 + 1 + seed_context)
    master_perm = torch.randperm(pool, generator=master_rng).tolist()
    shift = max(1, pool // num_branches)
    return pool, [sorted(master_perm[((k * shift) % pool + i) % pool] for i in range(n_to_select))
                  for k in range(num_branches)]


def _released_eligible_forks(total_frames=147, chunk_size=21, min_new_frame=18, within=7, P=5, f=3, window=12,
                             m=3, capacity=33):
    """The released MemFlow plan's eligible fork frames (diversity_sampling.py l. 72-89, chunks l. 360-380)."""
    chunks, current = [], 0
    while current < total_frames:
        end = min(current + (chunk_size if not chunks else min_new_frame), total_frames)
        chunks.append((current, end - current))
        current = end
    eligible = []
    for start_frame, new_frames in chunks[:within]:
        for bi in range(new_frames // f):
            abs_frame = start_frame + bi * f
            pool = max(min(abs_frame, capacity) - m, 0)
            if abs_frame >= window and bi + P <= new_frames // f and pool >= window - m:
                eligible.append(abs_frame)
    return eligible


def _memflow_cache(**geometry):
    geometry = {**dict(frames_per_block=3, sink_frames=3, window_frames=12, nearest_frames=3, cache_frames=33),
                **geometry}
    return GroupKVCache(1, 2, 1, 4, route_layout="memflow", device="meta", **geometry)


@pytest.mark.parametrize("fork_frame", _released_eligible_forks())
def test_memflow_route_slots_read_the_released_frames(fork_frame):
    """Released geometry (P = 5, cache 33, sink 3, window 12, m 3): at each perturbed block the frames that
    route_frames gives for every pool slot are the ones the transcribed released cache holds in those slots, and
    each is resident in our cache (so the block table builds). Forks 21 and 24 start before the cache rolls (it
    rolls at frame 33, inside their perturbed window); from fork 39 on it rolls at every block."""
    cache = _memflow_cache()
    pool = cache.route_pool(fork_frame, 5)
    assert pool == list(range(min(fork_frame, 33) - 3))
    for p in range(5):
        start = fork_frame + 3 * p
        while cache.num_frames < start:
            cache.append_frames()
            cache.evict()
        older, nearest = _released_perturbed_reads(start, pool)
        assert len(older) == len(pool) and nearest == []  # no pool slot is ever skipped; m = 3: only the block
        assert cache.route_frames(start, pool) == older, (start, older)
        assert cache.visible_frames(start, pool) == sorted(older)
        assert set(older) <= set(cache.frames(0)), sorted(set(older) - set(cache.frames(0)))
        cache.block_table(start, [pool])
    # pinned examples: slot 3 reads frame 3 + max(0, s + 3 - 33), the sink slots 0..2 always frames 0..2
    assert cache.route_frames(fork_frame + 12, [0, 2, 3]) == [0, 2, 3 + max(0, fork_frame + 15 - 33)]


def test_memflow_route_frames_before_and_after_the_cache_rolls():
    """Fork 21: blocks 21..30 read slot = frame, block 33 reads the non-sink slots 3 frames later; fork 39: every
    block reads them 3 frames later than the one before (the same slot names another frame at each block)."""
    cache = _memflow_cache()
    route = [0, 2, 3, 10, 17]
    assert [cache.route_frames(s, route) for s in (21, 30, 33)] == [route, route, [0, 2, 6, 13, 20]]
    assert [cache.route_frames(s, [1, 3, 29]) for s in (39, 42, 51)] == [[1, 12, 38], [1, 15, 41], [1, 24, 50]]
    sink_layout = GroupKVCache(1, 2, 1, 4, nearest_frames=3, cache_frames=33, device="meta")
    assert sink_layout.route_frames(33, route) == route  # the default layout's routes are absolute frames
    with pytest.raises(ValueError, match="slot 30"):
        cache.route_frames(39, [30])  # slots 30..32 hold the block itself
    assert cache.visible_frames(21, [18, 20]) == [18, 20]  # outside the plan's pool [0, 18), still older slots
    with pytest.raises(ValueError, match="slot 21"):
        cache.visible_frames(21, [21])  # before the roll the block sits at slots 21..23
    with pytest.raises(ValueError, match="repeats"):
        cache.visible_frames(39, [4, 4])
    with pytest.raises(TypeError, match="entry"):
        cache.route_frames(39, [1.0])


@pytest.mark.parametrize("sample_idx,seed_context", [(0, 0), (3, 1_000_003), (7, 5 * 1_000_003)])
def test_memflow_routes_are_the_released_plans_draw_for_draw(sample_idx, seed_context):
    """memflow1.3b: the eligible forks, pool sizes and the chr routes over route_pool equal the released MemFlow
    plan (its dispersed branch plans are LongLive's over the slot pool [0, pool)) for the same seed."""
    from kvpo_kernels.trainer.config import load_config

    config = load_config("memflow1.3b")
    streaming, rollout = config.streaming, config.rollout
    forks = [3 * block for block in config.fork_blocks()]
    assert forks == _released_eligible_forks() == [21, 24, 39, 42, 57, 60, 75, 78, 93, 96, 111, 114]
    cache = _memflow_cache()
    for fork in forks:
        size, plans = _released_memflow_plan(fork, 8, 42, sample_idx, seed_context)
        assert streaming.route_pool_size(fork // 3, 5) == size == len(cache.route_pool(fork, 5))
        seed = 42 + sample_idx * 97 + 1 + seed_context
        ours = chr_routes(cache.route_pool(fork, 5), rollout.num_branches, config.num_routed(),
                          generator=torch.Generator().manual_seed(seed))
        assert ours == plans, fork
    assert config.num_routed() == 9


@pytest.mark.parametrize("fork,perturbed", [(5, 3), (8, 2)])
def test_memflow_routed_branches_equal_the_masked_full_forward(fork, perturbed):
    """route_layout "memflow" (cache 21): two routed branches and the anchor, batched, over P perturbed blocks
    (committed routed, as released), each equal to the masked full-sequence forward in which the perturbed blocks
    read [bank | the transcribed released slot frames | the block]. Fork 5 (frame 15): the cache rolls at frame 21,
    the last perturbed block; fork 8 (frame 24): it has rolled, every block reads other frames."""
    config = _config("rollout", 2, 2, layout="memflow")
    model = _model(6)
    gen = StreamingWanGenerator(model, config, backend="torch")
    assert gen.num_routed == 9
    prefix, prompt = _inputs(config, 1, fork, seed=3)
    cache = gen.new_cache(1)
    for index in range(fork):
        gen.commit_block(cache, index, _block(prefix, config, index), prompt)
    pool = gen.route_pool(cache, fork, perturbed)
    assert pool == list(range(min(3 * fork, 21) - 3))
    routes = chr_routes(pool, 2, gen.num_routed, generator=torch.Generator().manual_seed(fork))
    group = cache.fork(3)
    torch.manual_seed(fork)
    chunk = torch.randn(3, TINY["in_channels"], 3 * perturbed, LATENT["latent_height"], LATENT["latent_width"])
    read = [{} for _ in routes]  # per branch: block -> the frames the released code reads
    for index in range(fork, fork + perturbed):
        for k, route in enumerate(routes):
            older, nearest = _released_perturbed_reads(3 * index, route, capacity=21)
            assert nearest == [] and len(older) == 9
            read[k][index] = older
        x_t = torch.randn(3, TINY["in_channels"], 3, LATENT["latent_height"], LATENT["latent_width"])
        sigma = torch.tensor([0.8, 0.5, 0.3])
        with torch.no_grad():  # no graph holding pool views while the commits below grow the pool
            got = gen.predict_x0(group, index, x_t, sigma, prompt, routes=routes + [None])
        (table, counts), bank = group.bank_block_table(3 * index, routes + [None]), group.bank_blocks(0)
        assert table[0, :counts[0]].tolist() == bank[0] + [group._maps[0][j] for j in sorted(read[0][index])]
        assert table[2, :3].tolist() == [group._maps[2][j] for j in range(3)]  # the anchor: [sink | bank | local]
        for k in range(3):
            history = torch.cat([prefix, chunk[k:k + 1, :, :3 * (index - fork)]], dim=2)
            (truth, baseline), _ = _reference_x0(model, config, history, x_t[k:k + 1], sigma[k:k + 1], prompt,
                                                 read[k] if k < 2 else None)
            assert_close_to_truth(f"x0 of sequence {k}, block {index}", got[k:k + 1], truth, baseline)
        gen.commit_block(group, index, chunk[:, :, 3 * (index - fork):3 * (index - fork + 1)], prompt,
                         routes=routes + [None])
    last = fork + perturbed - 1
    assert any(frame != slot for slot, frame in zip(routes[0], read[0][last]))  # the cache has rolled


def test_memflow_layout_validation():
    with pytest.raises(ValueError, match="route_layout"):
        StreamingConfig(route_layout="longlive")
    with pytest.raises(ValueError, match="route_layout 'memflow' needs sink_frames"):
        GroupKVCache(1, 2, 1, 4, sink_frames=0, route_layout="memflow", device="meta")
    gen = StreamingWanGenerator(_model(0), _config(layout="memflow"), backend="torch")
    other = StreamingWanGenerator(_model(0), _config(), backend="torch")
    clean, prompt = _inputs(gen.config, 1, 1, seed=0)
    with pytest.raises(ValueError, match="route_layout"):
        gen.predict_x0(other.new_cache(1), 0, clean, 0.5, prompt)
    from kvpo_kernels.trainer.config import load_config
    with pytest.raises(ValueError, match="streaming.route_layout"):
        load_config("tiny", overrides=["streaming.route_layout=memflow2"])
    with pytest.raises(ValueError, match="streaming.route_layout: 'memflow' needs streaming.sink_frames"):
        load_config("tiny", overrides=["streaming.route_layout=memflow", "streaming.sink_frames=0"])


def test_memflow_off_by_default_and_bad_config():
    assert StreamingConfig().memory_bank_frames == 0
    for bad in (dict(memory_bank_frames=-1), dict(bank_record_interval=0), dict(memory_bank_frames=True),
                dict(bank_rule="fifo")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            StreamingConfig(**bad)


def test_memflow_preset_is_longlive_plus_the_bank():
    """memflow1.3b = wan1.3b + the released differences that are geometry (docs/memflow.md lists every value)."""
    from kvpo_kernels.trainer.config import config_differences, load_config

    memflow, longlive = load_config("memflow1.3b"), load_config("wan1.3b")
    assert config_differences(longlive.to_dict(), memflow.to_dict()) == {
        "streaming.nearest_frames": (4, 3), "streaming.memory_bank_frames": (0, 3),
        "model.causal_checkpoint_key": (None, "generator"), "streaming.route_layout": ("sink", "memflow"),
        "replay.branch_backward_chunk_size": (0, 4),
        "run.output_dir": ("runs/wan1.3b", "runs/memflow1.3b")}
    assert memflow.streaming.bank_record_interval == 3 and memflow.streaming.bank_rule == "rollout"
    assert memflow.num_routed() == 12 - 3 == 9 and longlive.num_routed() == 12 - 3 - 4  # released n_random


def test_memflow_preset_takes_the_released_four_segment_prompts():
    """configs/train_kvpo_memflow.yaml l. 36-44: 4 segments, switches 39, 75, 111 aligned to the 21 / 18 chunks,
    global sink. The preset's geometry (on the tiny transformer's latent grid, one step) generates through the
    last switch with them: each re-cache rewrites the 12 frames before the switch, never the sink."""
    from kvpo_kernels.trainer.config import chunk_layout, load_config
    from kvpo_kernels.trainer.rollout import align_switch_frames, parse_prompt_line

    preset = load_config("memflow1.3b")
    texts, switches = parse_prompt_line("a fox runs || 39 || it stops || 75 || it looks up || 111 || it sleeps")
    chunks = chunk_layout(147, preset.rollout.streaming_chunk_size, preset.rollout.streaming_min_new_frame)
    assert preset.rollout.align_switch_to_chunk and align_switch_frames(switches, chunks) == [39, 75, 111]
    names = ("frames_per_block", "sink_frames", "window_frames", "nearest_frames", "cache_frames",
             "memory_bank_frames", "bank_record_interval", "bank_rule")
    config = StreamingConfig(timesteps=(1000,), **{n: getattr(preset.streaming, n) for n in names}, **LATENT)
    gen = StreamingWanGenerator(_model(7), config, backend="torch")
    cache, rewritten = gen.new_cache(1), []
    real_rewrite = cache.rewrite_frames
    cache.rewrite_frames = lambda frames: (rewritten.append(list(frames)), real_rewrite(frames))[1]
    prompts = [torch.randn(1, 5, TINY["text_dim"]) for _ in texts]
    noise = torch.randn(1, TINY["in_channels"], 114, LATENT["latent_height"], LATENT["latent_width"])
    video = gen.generate(noise, prompts, switch_frames=[39, 75, 111], cache=cache)
    assert torch.isfinite(video).all() and video.shape == noise.shape
    # per switch: the 9 newest frames (the local window), then the 3 before them; the sink (0..2) never
    assert rewritten == [frames for s in (39, 75, 111)
                         for frames in (list(range(s - 9, s)), list(range(s - 12, s - 9)))]


def test_trainer_steps_with_the_bank_and_never_grows_the_pool(tmp_path, monkeypatch):
    """kvpo-train's rollout and replay run in MemFlow mode (tiny model) with the released route layout (routes of
    cache slots, num_routed = window - nearest), with one prompt and with prompt switches (before the fork, at the
    fork, after it; the bank full from block 5 on); the pool is sized up front incl. the bank and the re-caches;
    the trainer trains on a two-segment entry."""
    from _trainer_setup import FAST
    from kvpo_kernels.cache import _BlockPool
    from kvpo_kernels.trainer.config import load_config
    from kvpo_kernels.trainer.loop import Trainer
    from kvpo_kernels.trainer.rollout import PromptEntry, group_rollout, replay_energies

    config = load_config("tiny", overrides=FAST + [f"run.output_dir={tmp_path}", "streaming.memory_bank_frames=2",
                                                   "streaming.bank_record_interval=2", "streaming.route_layout=memflow",
                                                   "rollout.num_routed=2"])
    trainer = Trainer(config, prompt_entries=[PromptEntry((0, 2), (6,)), PromptEntry((1,))])
    assert trainer.generator.config.memory_bank_frames == 2 and trainer.generator.config.route_layout == "memflow"
    assert trainer.generator.num_routed == 5 - 2  # tiny: window 5, nearest 2 (the trainer routes 2: pool 3 at fork 5)
    assert trainer.prompt_entries[0].switch_frames == (7,)
    grows, real_grow = [], _BlockPool.grow
    monkeypatch.setattr(_BlockPool, "grow", lambda pool, extra: (grows.append(extra), real_grow(pool, extra))[1])
    segments = [trainer.prompts[i:i + 1] for i in range(3)]
    for switches in ([], [3, 7], [6]):
        grows.clear()
        prompt = segments[:len(switches) + 1] if switches else segments[0]
        ro = group_rollout(trainer.generator, prompt, prompt_id=0, num_blocks=9, fork_block=6, perturbed_blocks=1,
                           num_branches=3, num_routed=2, latent_shape=trainer.latent_shape,
                           rng=torch.Generator().manual_seed(0), segment_ids=list(range(len(switches) + 1)),
                           switch_frames=switches, chunks=trainer.chunks)
        assert len(ro.prefix_cache.bank_frames(0, 0)) == 2
        assert all(set(route) <= set(range(6 - 2)) for route in ro.routes)  # slots of the pool [0, min(6, 8) - 2)
        energies = replay_energies(trainer.generator, ro, grad_steps=1)
        assert len(grows) == 1, f"switches {switches}: the pool grew after it was made: {grows}"
        assert torch.isfinite(energies).all()
    records = trainer.train(steps=2)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_triton_backend_reads_the_bank_table():
    """The Triton kernel (interpreted on CPU) reads the bank table, repeated bank blocks included, as the torch
    path does (which the reference pins above)."""
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
