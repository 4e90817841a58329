"""Streaming Wan adapter on a tiny random-weight diffusers WanTransformer3DModel (fp32, CPU).

The references are plain diffusers forwards of the whole sequence (WanAttnProcessor, no kvpo code) under the
equivalent block-causal mask, with per-token timesteps (clean history at 0, the current block at its sigma): that is
what a streaming block must compute. The truth runs in float64, the baseline in fp32 (the flash-attention rule).
"""
import copy

import pytest
import torch

from _assertions import assert_close_to_truth
from kvpo_kernels.cache import GroupKVCache
from kvpo_kernels.routing import chr_routes

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

from kvpo_kernels.integrations.diffusers import (  # noqa: E402
    WAN_T2V_1_3B_CONFIG, BlockRollout, StreamingConfig, StreamingWanGenerator, convert_causal_wan_state_dict,
    load_causal_wan_weights)

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2)
LATENT = dict(latent_height=4, latent_width=6)  # 2 x 3 patches: 6 tokens per frame (no symmetric h/w mix-up)
GEOMETRIES = {
    "longlive": StreamingConfig(**LATENT),  # f 3, sink 3, window 12, nearest 4, cache 21
    "small": StreamingConfig(frames_per_block=2, sink_frames=1, window_frames=5, nearest_frames=3, cache_frames=9,
                             timesteps=(1000, 500), **LATENT),
}


def _model(seed=0):
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**TINY)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every weight count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


# ------------------------------------------------------------------------------------------ independent reference
def _allowed(num_frames, config, routes_by_block=None):
    """bool [F, F]: may a query of frame i read frame j (each block: sink + window or route + itself)."""
    f, sink = config.frames_per_block, config.sink_frames
    allowed = torch.zeros(num_frames, num_frames, dtype=torch.bool)
    for i in range(num_frames):
        start = i // f * f
        route = (routes_by_block or {}).get(i // f)
        reach = config.window_frames - sink if route is None else config.nearest_frames
        for j in range(num_frames):
            own = start <= j < start + f
            in_sink = j < min(sink, start)
            recent = start - (reach - f) <= j < start
            routed = route is not None and j in route
            allowed[i, j] = own or in_sink or recent or routed
    return allowed


class _MaskedSelfAttention:
    def __init__(self, mask):
        self.mask, self.inner = mask, WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, None, self.mask, rotary_emb)


def _masked_forward(model, video, frame_timesteps, prompt, allowed, dtype):
    """Plain diffusers forward of the whole video under the frame mask ``allowed``, per-frame timesteps [B, F]."""
    reference = copy.deepcopy(model).to(dtype)
    tokens = video.shape[3] // 2 * (video.shape[4] // 2)
    mask = allowed.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)[None, None]
    for block in reference.blocks:
        block.attn1.set_processor(_MaskedSelfAttention(mask))
    # Timesteps stay fp32 in low precision, as the generator passes them (bf16 cannot hold 900).
    timestep = frame_timesteps.repeat_interleave(tokens, 1).to(torch.float64 if dtype == torch.float64 else
                                                               torch.float32)
    return reference(video.to(dtype), timestep, prompt.to(dtype), return_dict=False)[0]


def _reference_x0(model, config, history, x_t, sigma, prompt, routes_by_block=None):
    """x0 of the block after `history` [B, C, s, H, W] (clean, timestep 0), as (truth fp64, baseline fp32)."""
    video = torch.cat([history, x_t], dim=2)
    frames, start = video.shape[2], history.shape[2]
    timesteps = torch.zeros(video.shape[0], frames)
    timesteps[:, start:] = (1000 * sigma).view(-1, 1)
    allowed = _allowed(frames, config, routes_by_block)
    out = []
    for dtype in (torch.float64, torch.float32):
        v = _masked_forward(model, video, timesteps, prompt, allowed, dtype)[:, :, start:]
        out.append(x_t.to(dtype) - sigma.to(dtype).view(-1, 1, 1, 1, 1) * v)
    return out


def _inputs(config, batch, blocks):
    c = TINY["in_channels"]
    clean = torch.randn(batch, c, blocks * config.frames_per_block, config.latent_height, config.latent_width)
    prompt = torch.randn(batch, 5, TINY["text_dim"])
    return clean, prompt


def _block(x, config, index):
    f = config.frames_per_block
    return x[:, :, index * f:(index + 1) * f]


def _committed_history(config, seed, batch, blocks):
    """A tiny model, its generator and a cache holding ``blocks`` clean blocks: (model, gen, clean, prompt, cache)."""
    model = _model(seed)
    gen = StreamingWanGenerator(model, config, backend="torch")
    clean, prompt = _inputs(config, batch, blocks)
    cache = gen.new_cache(batch)
    for index in range(blocks):
        gen.commit_block(cache, index, _block(clean, config, index), prompt)
    return model, gen, clean, prompt, cache


# ------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_streaming_equals_full_forward_under_block_causal_mask(geometry):
    config = GEOMETRIES[geometry]
    model = _model()
    gen = StreamingWanGenerator(model, config, backend="torch")
    blocks = 8 if geometry == "longlive" else 7  # long enough for the window to slide and frames to be evicted
    clean, prompt = _inputs(config, 2, blocks)
    cache = gen.new_cache(2)
    for index in range(blocks):
        x_t = torch.randn_like(_block(clean, config, index))
        sigma = torch.rand(2) * 0.9 + 0.05
        if index in (0, 1, blocks // 2 + 1, blocks - 1):
            got = gen.predict_x0(cache, index, x_t, sigma, prompt)
            truth, baseline = _reference_x0(model, config, clean[:, :, :index * config.frames_per_block], x_t,
                                            sigma, prompt)
            assert_close_to_truth(f"x0 of block {index}", got, truth, baseline)
        gen.commit_block(cache, index, _block(clean, config, index), prompt)
    assert cache.num_frames == blocks * config.frames_per_block
    assert len(cache.frames(0)) <= config.cache_frames - config.frames_per_block


def test_routed_branch_equals_explicitly_gathered_history():
    config = GEOMETRIES["longlive"]
    model, gen, clean, prompt, cache = _committed_history(config, 1, 1, 7)
    pool = gen.route_pool(cache, 7)
    assert pool == list(range(6, 20))
    routes = chr_routes(pool, 3, gen.num_routed, generator=torch.Generator().manual_seed(torch.initial_seed()))
    group = cache.fork(4)
    x_t = torch.randn(1, 4, 3, 4, 6).expand(4, -1, -1, -1, -1).contiguous()
    sigma = torch.full((4,), 0.8)
    got = gen.predict_x0(group, 7, x_t, sigma, prompt, routes=[None] + routes)
    for b, route in enumerate([None] + routes):
        truth, baseline = _reference_x0(model, config, clean[:, :, :21], x_t[b:b + 1], sigma[b:b + 1], prompt,
                                        routes_by_block=None if route is None else {7: route})
        assert_close_to_truth(f"branch {b} (route {route})", got[b:b + 1], truth, baseline)
    # Different routes really change the prediction (the test can fail).
    assert (got[1] - got[2]).abs().max() > 1e-3


def test_input_gradient_matches_full_forward():
    """d x0 / d x_t through routed_attention's backward (q, k_new, v_new) equals that of the masked forward."""
    config = GEOMETRIES["small"]
    model, gen, clean, prompt, cache = _committed_history(config, 2, 2, 4)
    x_t = torch.randn(2, 4, 2, 4, 6, requires_grad=True)
    sigma = torch.tensor([0.7, 0.4])
    weight = torch.randn(2, 4, 2, 4, 6)
    (grad,) = torch.autograd.grad((gen.predict_x0(cache, 4, x_t, sigma, prompt) * weight).sum(), x_t)
    grads = []
    for dtype in (torch.float64, torch.float32):
        x_ref = x_t.detach().to(dtype).requires_grad_()
        video = torch.cat([clean.to(dtype), x_ref], dim=2)
        timesteps = torch.zeros(2, 10)
        timesteps[:, 8:] = 1000 * sigma.view(-1, 1)
        v = _masked_forward(model, video, timesteps, prompt, _allowed(10, config), dtype)[:, :, 8:]
        x0 = x_ref - sigma.to(dtype).view(-1, 1, 1, 1, 1) * v
        grads.append(torch.autograd.grad((x0 * weight.to(dtype)).sum(), x_ref)[0])
    assert_close_to_truth("d x0 / d x_t", grad, *grads)


def test_parameter_gradients_with_and_without_checkpointing():
    config = GEOMETRIES["small"]
    model, gen, clean, prompt, cache = _committed_history(config, 3, 2, 3)
    x_t = torch.randn(2, 4, 2, 4, 6)

    def param_grads():
        model.zero_grad()
        x0 = gen.predict_x0(cache, 3, x_t, 0.6, prompt)
        x0.square().sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = param_grads()
    assert "blocks.0.attn1.to_k.weight" in plain and "blocks.1.attn1.to_q.weight" in plain
    assert all(torch.isfinite(g).all() for g in plain.values())
    assert plain["blocks.0.attn1.to_k.weight"].abs().max() > 0
    model.enable_gradient_checkpointing()
    # Another streaming forward in between: checkpointed recomputation must still read the first call's view.
    x0 = gen.predict_x0(cache, 3, x_t, 0.6, prompt)
    gen.predict_x0(cache, 1, _block(clean, config, 1), 0.3, prompt)
    model.zero_grad()
    x0.square().sum().backward()
    for name, g in plain.items():
        assert_close_to_truth(f"checkpointed grad {name}", dict(model.named_parameters())[name].grad, g)
    model.disable_gradient_checkpointing()


def test_batched_group_equals_branches_one_by_one():
    config = GEOMETRIES["longlive"]
    model, gen, clean, prompt, cache = _committed_history(config, 4, 1, 7)
    routes = [None] + chr_routes(gen.route_pool(cache, 7), 3, 5, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(4, 4, 3, 4, 6)
    step_noise = [torch.randn_like(noise) for _ in range(len(gen.sigmas) - 1)]
    group = cache.fork(4)
    batched = gen.generate_block(group, 7, noise, prompt, step_noise=step_noise, routes=routes)
    next_noise = torch.randn(4, 4, 3, 4, 6)
    batched_next = gen.predict_x0(group, 8, next_noise, 0.9, prompt)
    for b, route in enumerate(routes):
        single = cache.select([0])
        one = gen.generate_block(single, 7, noise[b:b + 1], prompt, step_noise=[e[b:b + 1] for e in step_noise],
                                 routes=[route])
        for field in BlockRollout._fields:
            assert_close_to_truth(f"branch {b} {field}", getattr(batched, field)[..., b:b + 1, :, :, :, :]
                                  if field in ("x_t", "x0_pred") else
                                  getattr(batched, field)[b:b + 1] if field == "x0" else batched.sigmas,
                                  getattr(one, field))
        # The next block reads this branch's private frames 21..23 (not its siblings').
        assert_close_to_truth(f"branch {b} next block", batched_next[b:b + 1],
                              gen.predict_x0(single, 8, next_noise[b:b + 1], 0.9, prompt))
    # The rollout cache was not touched by the group (a snapshot) and branches really differ.
    assert cache.num_frames == 21 and group.num_frames == 24
    assert (batched.x0[1] - batched.x0[2]).abs().max() > 1e-3


def test_generate_block_sampler_and_generate():
    config = GEOMETRIES["longlive"]
    gen = StreamingWanGenerator(_model(5), config, backend="torch")
    assert torch.allclose(gen.sigmas, torch.tensor([1.0, 0.9375, 5 / 6, 0.625]))
    _, prompt = _inputs(config, 2, 1)
    noise = torch.randn(2, 4, 3, 4, 6)
    step_noise = [torch.randn_like(noise) for _ in range(3)]
    cache = gen.new_cache(2)
    roll = gen.generate_block(cache, 0, noise, prompt, step_noise=step_noise, commit=False)
    assert roll.x_t.shape == (4, 2, 4, 3, 4, 6) and roll.x0_pred.shape == (4, 2, 4, 3, 4, 6)
    assert torch.equal(roll.x_t[0], noise) and torch.equal(roll.x0, roll.x0_pred[-1])
    for k in range(3):
        s = gen.sigmas[k + 1]
        assert torch.allclose(roll.x_t[k + 1], (1 - s) * roll.x0_pred[k] + s * step_noise[k], atol=1e-6)
        assert_close_to_truth(f"step {k}", roll.x0_pred[k], gen.predict_x0(cache, 0, roll.x_t[k], gen.sigmas[k],
                                                                        prompt))
    assert cache.num_frames == 0 and not roll.x0.requires_grad
    bare = gen.new_cache(2, reserve_blocks=0)  # block 0 attends to itself only; the pool is (almost) empty
    assert_close_to_truth("block 0 on a bare cache", gen.predict_x0(bare, 0, noise, 1.0, prompt), roll.x0_pred[0])
    gen.generate_block(cache, 0, noise, prompt, step_noise=step_noise)
    assert cache.num_frames == 3
    # generate() == generate_block() block by block with the same random stream.
    video_noise = torch.randn(2, 4, 9, 4, 6)
    torch.manual_seed(11)
    video = gen.generate(video_noise, prompt)
    torch.manual_seed(11)
    manual_cache = gen.new_cache(2)
    manual = [gen.generate_block(manual_cache, i, video_noise[:, :, 3 * i:3 * i + 3], prompt).x0 for i in range(3)]
    assert torch.equal(video, torch.cat(manual, dim=2))


def test_processor_outside_streaming_is_diffusers_own():
    model = _model(6)
    x = torch.randn(2, 4, 3, 4, 6)
    t = torch.tensor([500.0, 20.0])
    prompt = torch.randn(2, 5, 32)
    before = model(x, t, prompt, return_dict=False)[0]
    gen = StreamingWanGenerator(model, GEOMETRIES["longlive"], backend="torch")
    assert torch.equal(model(x, t, prompt, return_dict=False)[0], before)
    # A second generator on the same transformer shares the processors; both keep working.
    other = StreamingWanGenerator(model, GEOMETRIES["longlive"], backend="torch")
    first = gen.predict_x0(gen.new_cache(2), 0, x, 0.5, prompt)
    assert torch.equal(other.predict_x0(other.new_cache(2), 0, x, 0.5, prompt), first)
    # Replacing the processors behind the generators' back is detected, not silently wrong.
    model.set_attn_processor(WanAttnProcessor())
    assert torch.equal(model(x, t, prompt, return_dict=False)[0], before)
    with pytest.raises(RuntimeError, match="processors were replaced"):
        gen.predict_x0(gen.new_cache(2), 0, x, 0.5, prompt)


def _to_original_names(state_dict):
    """diffusers -> original Wan names, written out by hand (the loader's mapping is not used here)."""
    table = [("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
             ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
             ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
             ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
             ("condition_embedder.time_proj", "time_projection.1"), ("proj_out", "head.head"),
             ("attn1.to_out.0", "self_attn.o"), ("attn2.to_out.0", "cross_attn.o"),
             ("attn1.to_", "self_attn."), ("attn2.to_", "cross_attn."), ("attn1.", "self_attn."),
             ("attn2.", "cross_attn."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("norm2", "norm3")]
    out = {}
    for key, value in state_dict.items():
        if key == "scale_shift_table":
            out["head.modulation"] = value
            continue
        new = key.replace("scale_shift_table", "modulation")
        for old, replacement in table:
            if old in new:
                new = new.replace(old, replacement)
                if not old.startswith("attn"):
                    break
        out[new] = value
    assert "blocks.1.self_attn.q.weight" in out and "blocks.0.norm3.weight" in out and "blocks.0.modulation" in out
    return out


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_load_causal_wan_weights(tmp_path, fmt):
    source, target = _model(7), _model(8)
    original = _to_original_names(source.state_dict())
    if fmt == "pt":
        other = {key: torch.randn_like(value) for key, value in original.items()}
        path = tmp_path / "self_forcing.pt"
        torch.save({"generator": {"model." + k: v for k, v in other.items()},
                    "generator_ema": {"model." + k: v for k, v in original.items()}, "step": 100}, path)
    else:
        from safetensors.torch import save_file
        path = tmp_path / "longlive.safetensors"
        save_file({"generator.model." + k: v.contiguous() for k, v in original.items()}, str(path))
    missing, unexpected = load_causal_wan_weights(target, path)
    assert missing == [] and unexpected == []
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    if fmt == "pt":  # an explicit key picks the non-EMA weights
        load_causal_wan_weights(target, path, key="generator")
        assert not torch.equal(target.state_dict()["proj_out.weight"], source.state_dict()["proj_out.weight"])


def test_weight_loading_rejects_foreign_checkpoints(tmp_path):
    model = _model(9)
    original = _to_original_names(model.state_dict())
    with pytest.raises(ValueError, match="LoRA"):
        convert_causal_wan_state_dict({**original, "blocks.0.self_attn.q.lora_A.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not causal-Wan"):
        convert_causal_wan_state_dict({"encoder.conv1.weight": torch.zeros(1)})
    bad = dict(original)
    bad["head.head.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="proj_out.weight has shape"):
        load_causal_wan_weights(model, tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="path"):
        load_causal_wan_weights(model, tmp_path / "missing.pt")
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}, "step": 3}, tmp_path / "opt.pt")
    with pytest.raises(ValueError, match="key="):
        load_causal_wan_weights(model, tmp_path / "opt.pt")


def test_bad_arguments():
    config = GEOMETRIES["longlive"]
    model = _model(10)
    with pytest.raises(TypeError, match="transformer"):
        StreamingWanGenerator(torch.nn.Linear(2, 2), config)
    with pytest.raises(ValueError, match="temporal patch"):
        StreamingWanGenerator(WanTransformer3DModel(**{**TINY, "patch_size": (2, 2, 2)}), config)
    with pytest.raises(ValueError, match="window_frames"):
        StreamingWanGenerator(model, StreamingConfig(window_frames=4, **LATENT))
    with pytest.raises(ValueError, match="timesteps"):
        StreamingConfig(timesteps=())
    with pytest.raises(TypeError, match="frames_per_block"):
        StreamingConfig(frames_per_block=2.5)
    gen = StreamingWanGenerator(model, config, backend="torch")
    cache = gen.new_cache(2)
    prompt = torch.randn(2, 5, 32)
    x = torch.randn(2, 4, 3, 4, 6)
    with pytest.raises(ValueError, match="x_t must have shape"):
        gen.predict_x0(cache, 0, x[:1], 1.0, prompt)
    with pytest.raises(ValueError, match="x_t must have shape"):
        gen.predict_x0(cache, 0, torch.randn(2, 4, 2, 4, 6), 1.0, prompt)
    with pytest.raises(ValueError, match="prompt_embeds"):
        gen.predict_x0(cache, 0, x, 1.0, torch.randn(3, 5, 32))
    with pytest.raises(ValueError, match="sigma"):
        gen.predict_x0(cache, 0, x, torch.ones(3), prompt)
    with pytest.raises(ValueError, match="block_index"):
        gen.predict_x0(cache, -1, x, 1.0, prompt)
    with pytest.raises(TypeError, match="block_index"):
        gen.predict_x0(cache, 1.0, x, 1.0, prompt)
    with pytest.raises(TypeError, match="cache"):
        gen.predict_x0(None, 0, x, 1.0, prompt)
    with pytest.raises(ValueError, match="not in the cache"):
        gen.predict_x0(cache, 2, x, 1.0, prompt)  # blocks 0 and 1 were never committed
    with pytest.raises(ValueError, match="next block to commit"):
        gen.commit_block(cache, 1, x, prompt)
    with pytest.raises(ValueError, match="step_noise"):
        gen.generate_block(cache, 0, x, prompt, step_noise=[x])
    with pytest.raises(ValueError, match="one entry per sequence"):
        gen.generate_block(cache, 0, x, prompt, routes=[None])
    with pytest.raises(ValueError, match="multiple of frames_per_block"):
        gen.generate(torch.randn(2, 4, 4, 4, 6), prompt)
    with pytest.raises(ValueError, match="tokens/frame"):
        gen.predict_x0(GroupKVCache(2, 7, 2, 16, batch_size=2), 0, x, 1.0, prompt)
    assert cache.num_frames == 0  # nothing above wrote the cache



def _check_group_against_reference(device, dtype):
    """A routed group (anchor + 3 branches) in one forward on ``device``/``dtype`` with the default backend
    (Triton on CUDA, the torch reference on CPU): x0 and d x0 / d x_t against the masked full forward."""
    config = StreamingConfig(latent_height=6, latent_width=10)  # 15 tokens per frame: an odd block size
    model = _model(12)
    gen = StreamingWanGenerator(copy.deepcopy(model).to(device, dtype), config)
    clean, prompt = _inputs(config, 1, 7)
    cache = gen.new_cache(1)
    for index in range(7):
        gen.commit_block(cache, index, _block(clean, config, index).to(device), prompt.to(device))
    routes = [None] + chr_routes(gen.route_pool(cache, 7), 3, 5, generator=torch.Generator().manual_seed(2))
    group = cache.fork(4)
    x_t = torch.randn(4, 4, 3, 6, 10)
    sigma = torch.tensor([0.9, 0.8, 0.7, 0.6])
    weight = torch.randn_like(x_t)
    x_dev = x_t.to(device, dtype).requires_grad_()
    got = gen.predict_x0(group, 7, x_dev, sigma.to(device), prompt.to(device), routes=routes)
    assert got.dtype == dtype
    (grad,) = torch.autograd.grad((got.double() * weight.to(device)).sum(), x_dev)
    factor = 2.0 if dtype == torch.float32 else 3.0
    for b, route in enumerate(routes):
        results = []
        for ref_dtype in (torch.float64, dtype):
            x_ref = x_t[b:b + 1].to(ref_dtype).requires_grad_()
            video = torch.cat([clean.to(ref_dtype), x_ref], dim=2)
            timesteps = torch.zeros(1, 24)
            timesteps[:, 21:] = 1000 * sigma[b]
            allowed = _allowed(24, config, None if route is None else {7: route})
            v = _masked_forward(model, video, timesteps, prompt, allowed, ref_dtype)[:, :, 21:]
            x0 = x_ref - sigma[b].to(ref_dtype) * v
            results.append((x0, torch.autograd.grad((x0.double() * weight[b:b + 1]).sum(), x_ref)[0]))
        (truth, truth_grad), (baseline, baseline_grad) = results
        assert_close_to_truth(f"x0 branch {b}", got[b:b + 1].cpu(), truth, baseline, factor=factor)
        assert_close_to_truth(f"dx_t branch {b}", grad[b:b + 1].cpu(), truth_grad, baseline_grad, factor=factor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_in_model_dtype_matches_reference(dtype):
    _check_group_against_reference("cpu", dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_group_matches_reference(dtype, monkeypatch):
    # cuDNN convolutions (the patch embedding) use TF32 for fp32 by default (torch.backends.cudnn.allow_tf32): a
    # ~1e-3 relative error that the fp32 baseline (exact fp32, on the CPU) does not have. The kernels under test
    # (Triton, input_precision "ieee" for fp32) and cuBLAS (TF32 off by default) are plain fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    _check_group_against_reference("cuda", dtype)


def test_module_docstring_group_flow():
    """The flow the module docstring (and the README) shows, on the tiny model."""
    config = StreamingConfig(**LATENT)
    gen = StreamingWanGenerator(_model(13), config)
    prompt_embeds = torch.randn(1, 5, 32)
    noise = torch.randn(8, 1, 4, 3, 4, 6)
    cache = gen.new_cache(1)
    for i in range(7):
        gen.generate_block(cache, i, noise[i], prompt_embeds)
    routes = chr_routes(gen.route_pool(cache, 7), 8, gen.num_routed)
    assert all(len(r) == 5 and set(r) <= set(range(6, 20)) for r in routes)
    group = cache.fork(9)
    pool_blocks = cache._pool.num_blocks
    out = gen.generate_block(group, 7, noise[7].expand(9, -1, -1, -1, -1), prompt_embeds, routes=routes + [None],
                             step_noise=[torch.randn(1, 4, 3, 4, 6).expand(9, -1, -1, -1, -1)] * 3)
    x0 = gen.predict_x0(cache.fork(8), 7, out.x_t[2, :8], gen.sigmas[2], prompt_embeds, routes=routes)
    assert x0.requires_grad
    assert_close_to_truth("replayed step 2", x0.detach(), out.x0_pred[2, :8])
    assert cache.num_frames == 21 and group.num_frames == 24 and cache._pool.num_blocks >= pool_blocks


def test_wan_1_3b_config_and_key_mapping_round_trip():
    with torch.device("meta"):
        model = WanTransformer3DModel(**WAN_T2V_1_3B_CONFIG)
    params = sum(p.numel() for p in model.parameters())
    assert 1.2e9 < params < 1.5e9
    names = model.state_dict()
    original = _to_original_names(names)
    converted = convert_causal_wan_state_dict({"model." + k: v for k, v in original.items()})
    assert set(converted) == set(names)
    assert all(converted[k] is names[k] for k in names)
    # The default StreamingConfig is LongLive on 480 x 832 video: 1560 tokens per frame, 14-frame route pools.
    gen = StreamingWanGenerator(model, StreamingConfig())
    cache = gen.new_cache(1)
    assert cache.frame_tokens == 1560 and cache.num_layers == 30 and gen.num_routed == 5
    for _ in range(7):
        cache.append_frames()
        cache.evict()
    assert gen.route_pool(cache, 7) == list(range(6, 20))
