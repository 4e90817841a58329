"""One KVPO group rollout: G = 8 routed branches + the anchor, batched over a shared KV cache vs one after another
with a copied KV cache (what the public KVPO code does: snapshot the KV state at the fork, restore a copy for each
branch, run the branch alone).

Both start from the same pre-fork cache (the prefix is generated once, outside the timing) and generate the same
chunk: P = 1 routed block, then one unperturbed block, 4 denoising steps + 1 commit forward per block.

- ``batched``: ``cache.fork(9)`` (no K/V copy) and one forward of 9 sequences per step, each with its own route.
- ``sequential``: per branch, a deep copy of the pre-fork cache (all K/V), then the branch's blocks at batch 1.

extra_info records the K/V bytes (all layers, keys and values) from the cache's own accounting:
``kv_bytes_batched`` = prefix + 9 x one branch's chunk frames (the prefix shared, never copied);
``kv_bytes_copied`` = 9 x (prefix + one branch's chunk frames), what 9 copied caches hold side by side, and
``kv_memory_ratio`` = copied / batched; ``kv_bytes_sequential_peak`` = snapshot + one working copy (the sequential
way's footprint, paid in time instead: it copies ``kv_bytes_copied_per_rollout`` = 9 x prefix per rollout); on CUDA
``peak_extra_bytes`` is the measured allocator peak of one rollout. The time ratio is ``speedup_vs_sequential`` in
the batched row; on CPU the sequential rollout runs right before each batched round, and
``speedup_vs_sequential_min/median/max`` is the spread of the per-round ratios. Both run with the same pinned thread
count (KVPO_BENCH_THREADS, default 1). Geometries: the tiny trainer model on CPU (always), and 8 layers of the
Wan2.1-T2V-1.3B geometry (12 x 128 heads, 1560 tokens per frame, bf16, LongLive windows) on a GPU.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

from kvpo_kernels.integrations.diffusers import (WAN_T2V_1_3B_CONFIG, StreamingConfig,  # noqa: E402
                                                 StreamingWanGenerator)
from kvpo_kernels.routing import chr_routes  # noqa: E402

from benchlib import dry_run, paired_rounds  # noqa: E402

BRANCHES, FORK_BLOCK, PERTURBED, CHUNK_BLOCKS = 8, 7, 1, 2

GEOMETRIES = {
    # The trainer's tiny model, with LongLive's window geometry (3-frame blocks, sink 3, window 12, nearest 4,
    # 21 resident frames) on an 8 x 8 latent grid (16 tokens per frame).
    "tiny-cpu": dict(device="cpu", dtype=torch.float32, prompt_len=8, height=8, width=8,
                     model=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2)),
    # 8 of the 30 layers of Wan2.1-T2V-1.3B at 480 x 832 (1560 tokens per frame).
    "wan1.3b-8layers-gpu": dict(device="cuda", dtype=torch.bfloat16, prompt_len=64, height=60, width=104,
                                model=dict(WAN_T2V_1_3B_CONFIG, num_layers=8)),
}

_SETUPS = {}


def _setup(name):
    """(generator, pre-fork caches, routes, per-block noise, prompt embeds), built once per geometry.

    Two identical pre-fork caches: one the batched rollout forks, one that the sequential rollout copies (its own
    compact pool, as a saved KV state would be)."""
    if name in _SETUPS:
        return _SETUPS[name]
    from diffusers import WanTransformer3DModel

    # gpu_check.sh's dry run (no CUDA) rehearses the GPU case with the tiny model on CPU.
    geo = GEOMETRIES["tiny-cpu" if dry_run() and not torch.cuda.is_available() else name]
    device, dtype = torch.device(geo["device"]), geo["dtype"]
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**geo["model"], rope_max_seq_len=1024)
    model = model.to(dtype=dtype).eval().requires_grad_(False)
    gen = StreamingWanGenerator(model, StreamingConfig(latent_height=geo["height"], latent_width=geo["width"]))
    f, channels = gen.config.frames_per_block, model.config.in_channels
    steps = len(gen.sigmas)
    rng = torch.Generator().manual_seed(0)
    shape = (1, channels, f, geo["height"], geo["width"])
    noise = [[torch.randn(shape, generator=rng).to(device, dtype) for _ in range(steps)]
             for _ in range(FORK_BLOCK + CHUNK_BLOCKS)]
    prompt = torch.randn(1, geo["prompt_len"], model.config.text_dim, generator=rng).to(device, dtype)
    caches = {}
    for provider in PROVIDERS:
        cache = caches[provider] = gen.new_cache(1)
        with torch.no_grad():
            for block in range(FORK_BLOCK):
                gen.generate_block(cache, block, noise[block][0], prompt, step_noise=noise[block][1:])
    routes = chr_routes(gen.route_pool(caches["batched"], FORK_BLOCK, PERTURBED), BRANCHES, gen.num_routed,
                        generator=torch.Generator().manual_seed(1))
    _SETUPS[name] = (gen, caches, routes + [None], noise, prompt)
    return _SETUPS[name]


def _chunk(gen, cache, routes, noise, prompt):
    batch = cache.batch_size
    out = []
    for block in range(FORK_BLOCK, FORK_BLOCK + CHUNK_BLOCKS):
        n = [t.expand(batch, -1, -1, -1, -1) for t in noise[block]]
        out.append(gen.generate_block(cache, block, n[0], prompt.expand(batch, -1, -1), step_noise=n[1:],
                                      routes=routes if block < FORK_BLOCK + PERTURBED else None).x0)
    return torch.cat(out, dim=2), cache


def batched_rollout(gen, prefix, routes, noise, prompt):
    group = prefix.fork(len(routes))
    x0, group = _chunk(gen, group, routes, noise, prompt)
    group.release()
    return x0


def sequential_rollout(gen, prefix, routes, noise, prompt):
    outs = []
    for route in routes:
        branch = copy.deepcopy(prefix)  # restore a full copy of the saved KV state
        x0, branch = _chunk(gen, branch, [route], noise, prompt)
        outs.append(x0)
        branch.release()
    return torch.cat(outs)


PROVIDERS = {"batched": batched_rollout, "sequential": sequential_rollout}  # ours first (a cut stage keeps it)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("geometry", [
    "tiny-cpu", pytest.param("wan1.3b-8layers-gpu", marks=pytest.mark.gpu)])
def test_group_rollout(benchmark, record, cuda_synchronize, pinned_threads, geometry, provider):
    gen, caches, routes, noise, prompt = _setup(geometry)
    prefix = caches[provider]
    device = prefix.device
    fn = PROVIDERS[provider]
    x0 = fn(gen, prefix, routes, noise, prompt)  # warm-up (the shared pool grows once)
    if provider == "batched":  # the batched rollout must give the same videos as the sequential one
        want = sequential_rollout(gen, caches["sequential"], routes, noise, prompt)
        rel = float((x0.float() - want.float()).norm() / want.float().norm())
        assert rel < (1e-4 if x0.dtype == torch.float32 else 5e-2), f"batched vs sequential: relative error {rel:.3g}"
    peak = None
    if device.type == "cuda":
        # The allocator peak over the timed rounds is one rollout's (each frees what it made; the pool grew in the
        # warm-up), so no extra rollout is spent on it: a GPU rollout of this geometry is ~10 forwards of 9 x 4680
        # tokens through 8 layers (~1-2 s), and this file shares a 50 s stage of gpu_check.sh.
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    benchmark.group = f"group_rollout {geometry}"
    rollout = cuda_synchronize(lambda: fn(gen, prefix, routes, noise, prompt), device)
    spread = {}
    if device.type == "cuda":
        benchmark.pedantic(rollout, rounds=2, iterations=1, warmup_rounds=0)
    elif provider == "batched":
        # The sequential rollout runs right before each batched round: each round's ratio shares the machine's load.
        sequential = lambda: sequential_rollout(gen, caches["sequential"], routes, noise, prompt)  # noqa: E731
        spread = paired_rounds(benchmark, rollout, {"sequential": sequential}, rounds=7, warmup=0)
    else:
        benchmark.pedantic(rollout, rounds=7, iterations=1, warmup_rounds=0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    memory = prefix.memory_bytes()
    prefix_bytes, sequences = memory["total"], len(routes)
    private_one = CHUNK_BLOCKS * gen.config.frames_per_block * memory["block"]
    kv_batched = prefix_bytes + sequences * private_one
    kv_copied = sequences * (prefix_bytes + private_one)
    record(benchmark, peer_group=f"group-rollout-{geometry}", provider=provider, device=device,
           branches=BRANCHES, sequences=sequences, chunk_blocks=CHUNK_BLOCKS, perturbed_blocks=PERTURBED,
           prefix_frames=FORK_BLOCK * gen.config.frames_per_block, tokens_per_frame=gen.frame_tokens,
           layers=gen.transformer.config.num_layers, kv_bytes_prefix=prefix_bytes, kv_bytes_batched=kv_batched,
           kv_bytes_copied=kv_copied, kv_memory_ratio=kv_copied / kv_batched,
           kv_bytes_sequential_peak=2 * prefix_bytes + private_one,
           kv_bytes_copied_per_rollout=sequences * prefix_bytes if provider == "sequential" else 0,
           peak_extra_bytes=peak, **spread)
