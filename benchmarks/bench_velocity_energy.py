"""velocity_energy benchmarks: our backends against torch eager and torch.compile, measured side by side.

    pytest benchmarks/bench_velocity_energy.py --benchmark-only

CPU (any machine, not ``gpu``-marked): fp32 16 x 4 x 299,520, forward: the C++ ``cpu`` backend vs eager vs
torch.compile (Inductor's fused CPU loop), all with the same pinned thread count (KVPO_BENCH_THREADS, default 1).
Our row times the peers right before each of its rounds (benchlib.paired_rounds): ``speedup_vs_<peer>_min/median/
max`` are the spread of the per-round ratios, which a loaded machine moves far less than separate medians.

GPU (``gpu``-marked; gpu_check.sh runs ``-m gpu``): the three ANCHORS.md sizes in bf16, forward and
forward+backward, ``triton`` and ``cuda`` first, then a device-to-device copy of the same bytes (the bandwidth
ceiling), eager, and torch.compile last (its Inductor compiles are the slow part). The op moves ~0.1-1 GB in
~0.03-0.3 ms, so wall-clock rounds would time Python dispatch and the sync: ``median_ms`` and GB/s are CUDA-event
times of CALLS back-to-back calls per round over ROUNDS rounds, with the L2 cache flushed before each round (the
small case would otherwise sit in the 50 MB L2). ``launch_us`` (host time to issue one call on an idle device) is
its own column; ``wall_ms`` is pytest-benchmark's synchronised wall clock of one call.

GB/s counts the bytes that must move: forward reads pred and target once; forward+backward reads pred and target
and writes both gradients (4 tensors). The backward cannot start before grad_E exists, so it reads pred and target
again: ``traffic_GB/s`` (fwd+bwd rows) counts the 6 tensors that really cross the memory bus. ``copy_fraction`` =
GB/s / the copy's GB/s.
"""
from __future__ import annotations

import functools

import pytest
import torch

import kvpo_kernels
from kvpo_kernels import reference
from kvpo_kernels._backends import machine_unavailable

from benchlib import bench_device, dry_run, event_times, l2_flusher, paired_rounds  # noqa: E402

GPU_SIZES = [(8, 4, 299_520), (16, 4, 2_096_640), (16, 8, 2_096_640)]  # ANCHORS.md: G x T x elements
DRY_SIZES = [(2, 3, 4_099)]  # the dry run's stand-in (CPU, fp32): one size exercises every code path
CPU_SIZE = (16, 4, 299_520)
ROUNDS, CALLS = 10, 20
# The dry run (no CUDA) stands the C++ cpu backend in for ours, so its rows exercise the ratio and copy-fraction code.
OURS = ("cpu",) if dry_run() and not torch.cuda.is_available() else ("triton", "cuda")
PEERS = ("copy", "eager", "compile")


def _inputs(shape, dtype, device, requires_grad=False):
    pred = torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
    target = torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
    return pred, target


@functools.lru_cache(maxsize=None)
def _compiled():
    """One torch.compile of the reference (what a user gets from compiling the obvious PyTorch code)."""
    return torch.compile(reference.velocity_energy)


def _energy_fn(provider):
    if provider == "eager":
        return reference.velocity_energy
    if provider == "compile":
        return _compiled()
    return lambda pred, target: kvpo_kernels.velocity_energy(pred, target, backend=provider)


def _unavailable(provider, device: torch.device):
    if provider in ("cpu", "cuda", "triton"):
        why = machine_unavailable(provider)
        if why is None and provider != "cpu" and device.type != "cuda":
            why = f"the {provider} backend needs CUDA tensors"
        return why
    if provider == "compile" and dry_run():
        return "dry run: a cold CPU Inductor compile (~10 s) says nothing about the GPU stage"
    return None


# ---------------------------------------------------------------------------------------------- CPU

def _cpu_fns(pred, target):
    return {provider: functools.partial(_energy_fn(provider), pred, target) for provider in ("cpu", "compile", "eager")}


@pytest.mark.parametrize("provider", ["cpu", "compile", "eager"])  # ours first
def test_cpu_forward(benchmark, record, pinned_threads, provider):
    why = _unavailable(provider, torch.device("cpu"))
    if why is not None:
        pytest.skip(why)
    pred, target = _inputs(CPU_SIZE, torch.float32, "cpu")
    fns = _cpu_fns(pred, target)
    benchmark.group = f"velocity_energy fwd cpu fp32 {'x'.join(map(str, CPU_SIZE))}"
    if provider == "cpu":
        spread = paired_rounds(benchmark, fns["cpu"], {"compile": fns["compile"], "eager": fns["eager"]},
                               rounds=30, warmup=2)
    else:
        for _ in range(2):  # compile / first touch outside the timing
            fns[provider]()
        benchmark.pedantic(fns[provider], rounds=30, warmup_rounds=0)
        spread = {}
    record(benchmark, bytes_moved=2 * pred.nbytes, peer_group=benchmark.group, provider=provider, device="cpu",
           **spread)


# ---------------------------------------------------------------------------------------------- GPU

def _fill_copy_fractions(peers, group):
    """copy_fraction = GB/s over the copy's GB/s for every provider of the group measured so far (any order)."""
    copy = peers.get((group, "copy"))
    if copy is None:
        return
    for (other_group, provider), (_, info) in peers.items():
        if other_group != group or provider == "copy":
            continue
        info["copy_fraction"] = info["GB/s"] / copy[1]["GB/s"]
        if "traffic_GB/s" in info:
            info["traffic_copy_fraction"] = info["traffic_GB/s"] / copy[1]["GB/s"]


def _gpu_call(provider, mode, shape, dtype, device):
    """(one call, bytes it must move)."""
    pred, target = _inputs(shape, dtype, device, requires_grad=(mode == "fwd+bwd" and provider != "copy"))
    bytes_moved = (2 if mode == "fwd" else 4) * pred.numel() * pred.element_size()
    if provider == "copy":
        # Read + write of the same number of bytes as the op moves: the device's practical ceiling.
        src = torch.empty(bytes_moved // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return (lambda: dst.copy_(src)), bytes_moved
    energy = _energy_fn(provider)
    if mode == "fwd":
        return (lambda: energy(pred, target)), bytes_moved
    grad = torch.randn(shape[:2], device=device, dtype=torch.float32)
    return (lambda: torch.autograd.grad(energy(pred, target), (pred, target), grad)), bytes_moved


def _gpu_cases(providers):
    sizes = DRY_SIZES if dry_run() else GPU_SIZES
    cases = [(p, m, s) for p in providers for m in ("fwd", "fwd+bwd") for s in sizes]
    return {"argvalues": cases, "ids": [f"{p}-{m}-{'x'.join(map(str, s))}" for p, m, s in cases]}


# Two functions, so gpu_check.sh can run ours, then the group rollout, then the peers (compile's builds last).
@pytest.mark.gpu
@pytest.mark.parametrize("provider,mode,shape", **_gpu_cases(OURS))
def test_gpu_ours(benchmark, record, peers, cuda_synchronize, pinned_threads, provider, mode, shape):
    _gpu_case(benchmark, record, peers, cuda_synchronize, provider, mode, shape)


@pytest.mark.gpu
@pytest.mark.parametrize("provider,mode,shape", **_gpu_cases(PEERS))
def test_gpu_peers(benchmark, record, peers, cuda_synchronize, pinned_threads, provider, mode, shape):
    _gpu_case(benchmark, record, peers, cuda_synchronize, provider, mode, shape)


def _gpu_case(benchmark, record, peers, cuda_synchronize, provider, mode, shape):
    device = bench_device()
    why = _unavailable(provider, device)
    if why is not None:
        pytest.skip(why)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    group = f"velocity_energy {mode} {str(dtype).split('.')[-1]} {'x'.join(map(str, shape))}"
    benchmark.group = group
    fn, bytes_moved = _gpu_call(provider, mode, shape, dtype, device)
    for _ in range(3):  # compile / autotune / first touch outside the timing
        fn()
    seconds, launch = event_times(fn, device, ROUNDS, CALLS, flush=l2_flusher(device))
    benchmark.pedantic(cuda_synchronize(fn, device), rounds=3, warmup_rounds=0)
    wall_ms = benchmark.stats.stats.median * 1e3
    record(benchmark, bytes_moved=bytes_moved, peer_group=group, provider=provider, device=device, seconds=seconds,
           launch_us=launch * 1e6, wall_ms=wall_ms, rounds=ROUNDS, calls_per_round=CALLS,
           min_ms=min(seconds) * 1e3, max_ms=max(seconds) * 1e3)
    if mode == "fwd+bwd" and provider != "copy":
        # The backward needs grad_E, so it re-reads pred and target: 6 tensors really move, not 4.
        benchmark.extra_info["traffic_GB/s"] = benchmark.extra_info["GB/s"] * 6 / 4
    _fill_copy_fractions(peers, group)
