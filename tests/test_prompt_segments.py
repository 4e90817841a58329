"""Multi-prompt streaming (LongLive's interactive mode): prompt switches with the KV re-cache, on a tiny random Wan.

The reference is one plain diffusers forward of the whole sequence under the equivalent frame mask, with per-token
timesteps and a cross-attention in which every frame reads its own segment's prompt (no kvpo code). At a switch at
frame s, the re-encoded window W = [max(sink, s - (window - sink)), s) attends to the sink and to all of W under
the new prompt (LongLive's re-cache forward); the sink keeps the first prompt (global sink).
"""
import copy

import pytest
import torch

from _assertions import assert_close_to_truth

pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

from kvpo_kernels.integrations.diffusers import StreamingConfig, StreamingWanGenerator  # noqa: E402
from test_diffusers_adapter import LATENT, TINY, _MaskedSelfAttention, _model  # noqa: E402

CONFIG = StreamingConfig(**LATENT)  # f 3, sink 3, window 12, nearest 4, cache 21
TOKENS = LATENT["latent_height"] // 2 * (LATENT["latent_width"] // 2)


class _PerFrameCrossAttention:
    """Cross-attention where the queries of frame i read prompt ``frame_prompt[i]`` of the concatenated context."""

    def __init__(self, frame_prompt, prompt_lengths):
        self.frame_prompt, self.lengths, self.inner = frame_prompt, prompt_lengths, WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        out = torch.empty_like(hidden_states)
        offsets = [0]
        for length in self.lengths:
            offsets.append(offsets[-1] + length)
        for p in set(self.frame_prompt):
            frames = torch.tensor([i for i, q in enumerate(self.frame_prompt) if q == p])
            tokens = (frames[:, None] * TOKENS + torch.arange(TOKENS)).reshape(-1)
            context = encoder_hidden_states[:, offsets[p]:offsets[p + 1]]
            out[:, tokens] = self.inner(attn, hidden_states[:, tokens], context)
        return out


def _reference(model, video, frame_timesteps, prompts, frame_prompt, allowed, dtype):
    reference = copy.deepcopy(model).to(dtype)
    mask = allowed.repeat_interleave(TOKENS, 0).repeat_interleave(TOKENS, 1)[None, None]
    for block in reference.blocks:
        block.attn1.set_processor(_MaskedSelfAttention(mask))
        block.attn2.set_processor(_PerFrameCrossAttention(frame_prompt, [p.shape[1] for p in prompts]))
    timestep = frame_timesteps.repeat_interleave(TOKENS, 1).to(torch.float64 if dtype == torch.float64 else
                                                               torch.float32)
    context = torch.cat(prompts, dim=1).to(dtype)
    return reference(video.to(dtype), timestep, context, return_dict=False)[0]


def _switch_mask(num_frames, switch):
    """Frames 0..num_frames-1: sink = block 0 (own block), re-encoded window W, then blocks from `switch` on."""
    f, sink = CONFIG.frames_per_block, CONFIG.sink_frames
    window = set(CONFIG.recache_frames(switch))
    allowed = torch.zeros(num_frames, num_frames, dtype=torch.bool)
    for i in range(num_frames):
        start = i // f * f
        for j in range(num_frames):
            if i < sink:
                allowed[i, j] = j < sink
            elif i < switch:
                allowed[i, j] = j < sink or j in window
            else:
                recent = start - (CONFIG.window_frames - sink - f) <= j < start + f
                allowed[i, j] = j < sink or recent
    return allowed


def test_switch_with_recache_equals_masked_forward_with_per_frame_prompts():
    model = _model(7)
    gen = StreamingWanGenerator(model, CONFIG, backend="torch")
    switch, blocks = 12, 6
    torch.manual_seed(3)
    clean = torch.randn(2, TINY["in_channels"], blocks * 3, LATENT["latent_height"], LATENT["latent_width"])
    prompts = [torch.randn(2, 5, TINY["text_dim"]), torch.randn(2, 7, TINY["text_dim"])]
    cache = gen.new_cache(2)
    for index in range(switch // 3):
        gen.commit_block(cache, index, clean[:, :, 3 * index:3 * index + 3], prompts[0])
    assert gen.recache(cache, clean[:, :, :switch], prompts[1]) == list(range(3, 12))
    for index in range(switch // 3, blocks):
        start = 3 * index
        x_t, sigma = torch.randn_like(clean[:, :, :3]), torch.rand(2) * 0.9 + 0.05
        got = gen.predict_x0(cache, index, x_t, sigma, prompts[1])
        # The reference keeps the frames the block can reach: sink, the re-encoded window, the blocks since.
        keep = list(range(3)) + CONFIG.recache_frames(switch) + list(range(switch, start))
        video = torch.cat([clean[:, :, keep], x_t], dim=2)
        n = video.shape[2]
        timesteps = torch.zeros(2, n)
        timesteps[:, n - 3:] = (1000 * sigma).view(-1, 1)
        frame_prompt = [0] * 3 + [1] * (n - 3)
        # Positions: the kept frames are contiguous from frame 0 in this geometry, so no re-indexing is needed.
        assert keep == list(range(len(keep)))
        allowed = _switch_mask(n, switch)
        truth, baseline = [x_t.to(d) - sigma.to(d).view(-1, 1, 1, 1, 1) *
                           _reference(model, video, timesteps, prompts, frame_prompt, allowed, d)[:, :, n - 3:]
                           for d in (torch.float64, torch.float32)]
        assert_close_to_truth(f"x0 of block {index} after the switch", got, truth, baseline)
        gen.commit_block(cache, index, clean[:, :, start:start + 3], prompts[1])


def test_recache_is_a_fresh_encode_copy_free_and_batched():
    """The re-cached window depends only on the sink and the frames' latents under the new prompt (the old K/V do
    not leak in), the snapshot before the switch keeps its K/V, the sink is untouched, and a batch of sequences
    re-encodes as each one alone."""
    model = _model(8)
    gen = StreamingWanGenerator(model, CONFIG, backend="torch")
    torch.manual_seed(4)
    clean = torch.randn(1, 4, 15, 4, 6)
    other = clean.clone()
    other[:, :, 3:] = torch.randn_like(other[:, :, 3:])      # same sink, other history
    old_prompt, new_prompt = torch.randn(1, 5, 32), torch.randn(1, 6, 32)
    caches = []
    for history, prompt in ((clean, old_prompt), (other, torch.randn(1, 5, 32))):
        cache = gen.new_cache(1)
        gen.commit_block(cache, 0, clean[:, :, :3], old_prompt)
        for index in range(1, 5):
            gen.commit_block(cache, index, history[:, :, 3 * index:3 * index + 3], prompt)
        caches.append(cache)
    snapshot = caches[0].select([0])
    last = TINY["num_layers"] - 1  # layer 0's keys see no prompt yet
    before = {f: caches[0].layer(last)[0][caches[0]._maps[0][f]].clone() for f in caches[0].frames()}
    sink_ids = [caches[0]._maps[0][f] for f in range(3)]
    for cache in caches:
        gen.recache(cache, clean, new_prompt)           # both re-encode `clean` frames 6..14 under new_prompt
    frames = CONFIG.recache_frames(15)
    assert frames == list(range(6, 15))
    for layer in range(TINY["num_layers"]):
        for f in frames:
            for pool in (0, 1):
                a = caches[0].layer(layer)[pool][caches[0]._maps[0][f]]
                b = caches[1].layer(layer)[pool][caches[1]._maps[0][f]]
                assert torch.equal(a, b), (layer, f)
    assert [caches[0]._maps[0][f] for f in range(3)] == sink_ids
    for f, value in before.items():  # the snapshot still maps the old blocks, bitwise unchanged
        assert torch.equal(snapshot.layer(last)[0][snapshot._maps[0][f]], value)
        if f in frames:
            assert snapshot._maps[0][f] != caches[0]._maps[0][f]
            assert not torch.equal(caches[0].layer(last)[0][caches[0]._maps[0][f]], value)
    # Batched: two sequences with their own histories in one forward == each alone.
    group = gen.new_cache(2)
    gen.commit_block(group, 0, clean[:, :, :3].expand(2, -1, -1, -1, -1), old_prompt)
    both = torch.cat([clean, other], dim=0)
    for index in range(1, 5):
        gen.commit_block(group, index, both[:, :, 3 * index:3 * index + 3], old_prompt)
    singles = []
    for b in range(2):
        single = gen.new_cache(1)
        for index in range(5):
            gen.commit_block(single, index, both[b:b + 1, :, 3 * index:3 * index + 3], old_prompt)
        gen.recache(single, both[b:b + 1], new_prompt)
        singles.append(single)
    gen.recache(group, both, new_prompt)
    x_t = torch.randn(2, 4, 3, 4, 6)
    got = gen.predict_x0(group, 5, x_t, 0.7, new_prompt)
    for b in range(2):
        assert_close_to_truth(f"sequence {b}", got[b:b + 1], gen.predict_x0(singles[b], 5, x_t[b:b + 1], 0.7,
                                                                         new_prompt))


def test_generate_with_switches_is_the_manual_loop():
    gen = StreamingWanGenerator(_model(9), CONFIG, backend="torch")
    prompts = [torch.randn(1, 5, 32), torch.randn(1, 5, 32), torch.randn(1, 4, 32)]
    noise = torch.randn(1, 4, 18, 4, 6)
    torch.manual_seed(5)
    video = gen.generate(noise, prompts, switch_frames=[6, 12])
    torch.manual_seed(5)
    cache, out = gen.new_cache(1), []
    for i in range(6):
        if i in (2, 4):
            gen.recache(cache, torch.cat(out, dim=2), prompts[i // 2])
        out.append(gen.generate_block(cache, i, noise[:, :, 3 * i:3 * i + 3], prompts[i // 2]).x0)
    assert torch.equal(video, torch.cat(out, dim=2))
    with pytest.raises(ValueError, match="switch_frames"):
        gen.generate(noise, prompts, switch_frames=[6])
    with pytest.raises(ValueError, match="switch_frames"):
        gen.generate(noise, prompts, switch_frames=[7, 12])
    with pytest.raises(ValueError, match="history"):
        gen.recache(cache, torch.randn(1, 4, 2, 4, 6), prompts[0])


@pytest.mark.parametrize("context_noise, grid", [(100, False), (0, True)])
def test_context_noise_commit(context_noise, grid):
    """The commit forward sees (1 - c) x0 + c eps at timestep context_noise: c = context_noise / 1000, or with the
    released grid (context_noise_grid) 0.00498 at context_noise 0, which then still adds noise."""
    config = StreamingConfig(context_noise=context_noise, context_noise_grid=grid, **LATENT)
    model = _model(10)
    gen, plain = StreamingWanGenerator(model, config, backend="torch"), StreamingWanGenerator(model, CONFIG,
                                                                                             backend="torch")
    x0, eps, prompt = torch.randn(1, 4, 3, 4, 6), torch.randn(1, 4, 3, 4, 6), torch.randn(1, 5, 32)
    a, b = gen.new_cache(1), plain.new_cache(1)
    gen.commit_block(a, 0, x0, prompt, commit_noise=eps)
    # The same K/V as a plain commit of the noised input run at that timestep: compare the next block's x0.
    c = 0.1 if not grid else 5 * 0.001 / 1.004
    x_t = torch.randn(1, 4, 3, 4, 6)
    plain._forward(b, 0, ((1 - c) * x0 + c * eps), plain._sigma(context_noise / 1000, 1, x0.device), prompt,
                   b.block_table(0, None), b.append_frames(3))
    after = gen.predict_x0(a, 1, x_t, 0.8, prompt)
    assert_close_to_truth("x0 after a noisy commit", after, plain.predict_x0(b, 1, x_t, 0.8, prompt))
    clean = plain.new_cache(1)
    plain.commit_block(clean, 0, x0, prompt)
    assert not torch.allclose(after, plain.predict_x0(clean, 1, x_t, 0.8, prompt))
    with pytest.raises(ValueError, match="context_noise"):
        StreamingConfig(context_noise=1000)


def _released_add_noise_sigma(timestep: int, shift: float) -> float:
    """Transcription of the released training scheduler's add_noise lookup (KVPO ``utils/scheduler.py`` l. 108-175
    with ``FlowMatchScheduler(shift, sigma_min=0.0, extra_one_step=True).set_timesteps(1000, training=True)``)."""
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * 1000
    return float(sigmas[torch.argmin((timesteps - timestep).abs())])


@pytest.mark.parametrize("shift", [5.0, 3.0])
def test_context_noise_grid_is_the_released_scheduler_lookup(shift):
    for timestep in (0, 1, 7, 100, 250, 999):
        config = StreamingConfig(context_noise=timestep, context_noise_grid=True, shift=shift, **LATENT)
        assert abs(config.context_sigma - _released_add_noise_sigma(timestep, shift)) < 1e-6
        assert config.context_timestep_sigma == timestep / 1000
    assert abs(StreamingConfig(context_noise_grid=True, **LATENT).context_sigma - 5 * 0.001 / 1.004) < 1e-12
    with pytest.raises(TypeError, match="context_noise_grid"):
        StreamingConfig(context_noise_grid=1, **LATENT)


def test_rewrite_frames_and_frames_table_errors():
    gen = StreamingWanGenerator(_model(11), CONFIG, backend="torch")
    cache = gen.new_cache(2)
    gen.commit_block(cache, 0, torch.randn(2, 4, 3, 4, 6), torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="not in the cache"):
        cache.rewrite_frames([2, 3])
    with pytest.raises(ValueError, match="distinct"):
        cache.rewrite_frames([1, 1])
    with pytest.raises(ValueError, match="not in the cache"):
        cache.frames_table([5])
    table, counts = cache.frames_table([])
    assert table.shape == (2, 1) and counts.tolist() == [0, 0]
    old = cache._maps[1][2]
    new = cache.rewrite_frames([2])
    assert new.shape == (2, 1) and cache._maps[1][2] == int(new[1, 0]) != old
