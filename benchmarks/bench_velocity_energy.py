"""velocity_energy benchmarks: our backends against torch eager and torch.compile, measured side by side.

    pytest benchmarks/bench_velocity_energy.py --benchmark-only

CPU (any machine): fp32 16 x 4 x 299,520, forward: the C++ ``cpu`` backend vs eager vs torch.compile (Inductor's fused
CPU loop). GPU (skipped without CUDA): the three ANCHORS.md sizes in bf16, forward and forward+backward, ``triton``
and ``cuda`` vs eager vs torch.compile, plus a device-to-device copy of the same bytes (the bandwidth ceiling).

GB/s counts the bytes that must move: forward reads pred and target once; forward+backward reads pred and target
and writes both gradients (4 tensors). The backward cannot start before grad_E exists, so it reads pred and target
again: ``traffic_GB/s`` (fwd+bwd rows) counts the 6 tensors that really cross the memory bus. Every row's
``extra_info`` holds ``speedup_vs_<peer>`` for the peers measured in the same run (see benchmarks/conftest.py) and,
on a GPU, ``copy_fraction`` = GB/s / the copy's GB/s.
"""
from __future__ import annotations

import functools

import pytest
import torch

import kvpo_kernels
from kvpo_kernels import reference
from kvpo_kernels._backends import machine_unavailable

GPU_SIZES = [(8, 4, 299_520), (16, 4, 2_096_640), (16, 8, 2_096_640)]  # ANCHORS.md: G x T x elements
CPU_SIZE = (16, 4, 299_520)


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


def _skip_if_unavailable(provider):
    if provider in ("cpu", "cuda", "triton"):
        why = machine_unavailable(provider)
        if why is not None:
            pytest.skip(why)


def _run(benchmark, fn, warmup=3):
    for _ in range(warmup):  # compile / autotune / first-touch outside the timing
        fn()
    benchmark(fn)


# ---------------------------------------------------------------------------------------------- CPU

@pytest.mark.parametrize("provider", ["eager", "compile", "cpu"])
def test_cpu_forward(benchmark, record, provider):
    _skip_if_unavailable(provider)
    pred, target = _inputs(CPU_SIZE, torch.float32, "cpu")
    energy = _energy_fn(provider)
    benchmark.group = f"velocity_energy fwd cpu fp32 {'x'.join(map(str, CPU_SIZE))}"
    _run(benchmark, lambda: energy(pred, target), warmup=2)
    record(benchmark, bytes_moved=2 * pred.nbytes, peer_group=benchmark.group, provider=provider, device="cpu",
           threads=torch.get_num_threads())


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


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["copy", "eager", "compile", "triton", "cuda"])
def test_gpu(benchmark, record, peers, cuda_synchronize, provider, mode, shape):
    _skip_if_unavailable(provider)
    dtype, device = torch.bfloat16, torch.device("cuda")
    group = f"velocity_energy {mode} bf16 {'x'.join(map(str, shape))}"
    benchmark.group = group
    pred, target = _inputs(shape, dtype, device, requires_grad=(mode == "fwd+bwd" and provider != "copy"))
    tensors_moved = 2 if mode == "fwd" else 4
    bytes_moved = tensors_moved * pred.numel() * pred.element_size()
    if provider == "copy":
        # Read + write of the same number of bytes as the op moves: the device's practical ceiling.
        src = torch.empty(bytes_moved // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    else:
        energy = _energy_fn(provider)
        if mode == "fwd":
            fn = lambda: energy(pred, target)  # noqa: E731
        else:
            grad = torch.randn(shape[:2], device=device)
            fn = lambda: torch.autograd.grad(energy(pred, target), (pred, target), grad)  # noqa: E731
    _run(benchmark, cuda_synchronize(fn, device))
    record(benchmark, bytes_moved=bytes_moved, peer_group=group, provider=provider, device=device)
    if mode == "fwd+bwd" and provider != "copy":
        # The backward needs grad_E, so it re-reads pred and target: 6 tensors really move, not 4.
        benchmark.extra_info["traffic_GB/s"] = benchmark.extra_info["GB/s"] * 6 / 4
    _fill_copy_fractions(peers, group)
