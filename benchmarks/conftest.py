"""Shared pytest-benchmark fixtures for every op's benchmark file.

Usage in ``benchmarks/bench_<op>.py``::

    def test_fwd_cuda(benchmark, record, cuda_synchronize):
        fn = lambda: op(x, backend="cuda")
        benchmark(cuda_synchronize(fn, x.device))
        record(benchmark, bytes_moved=2 * x.nbytes, peer_group="fwd-8x4", provider="cuda", device=x.device)

- ``cuda_synchronize(fn, device)`` (a fixture; the plain function is ``sync``) wraps ``fn`` so that the timed call
  waits for the GPU (pytest-benchmark times wall clock, so an unsynchronised CUDA launch would only time the
  launch). On CPU it returns ``fn`` unchanged.
- ``record(benchmark, *, bytes_moved=None, flops=None, peer_group=None, provider=None, **extra)`` writes the device
  name, median time, GB/s and/or TFLOP/s (from the median) into ``benchmark.extra_info``. With ``peer_group``, the
  median is also stored under (peer_group, provider) in the session-wide ``peers`` table, and the ratio
  ``speedup_vs_<other>`` = other's median / this median is written for every peer of the group measured before it
  (and back into those peers' ``extra_info``), so one run compares providers side by side. Put the provider you
  compare against first in the file, or read the ratios from either side.
- ``device_name(device)`` is the GPU name, or the CPU model with its core count for CPU tensors.
- Files are collected as ``bench_*.py`` (see ``pytest_collect_file``); tests marked ``@pytest.mark.gpu`` are skipped
  when torch sees no CUDA device, so ``pytest benchmarks --benchmark-only`` runs on any machine.
"""
from __future__ import annotations

import os
import platform
import signal
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` (pytest's default pattern is ``test_*.py``); explicit paths are collected by pytest."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def sync(fn: Callable[[], object], device: torch.device | str) -> Callable[[], object]:
    """``fn`` then ``torch.cuda.synchronize`` when ``device`` is a CUDA device (time the work, not the launch)."""
    device = torch.device(device)
    if device.type != "cuda":
        return fn

    def timed():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return timed


@pytest.fixture
def cuda_synchronize() -> Callable[[Callable[[], object], torch.device | str], Callable[[], object]]:
    """The ``sync`` helper as a fixture: ``benchmark(cuda_synchronize(fn, device))``."""
    return sync


# (peer_group, provider) -> (median seconds, the benchmark fixture's extra_info dict)
_PEERS: Dict[Tuple[str, str], Tuple[float, dict]] = {}


@pytest.fixture(scope="session")
def peers() -> Dict[Tuple[str, str], Tuple[float, dict]]:
    """The session-wide table of medians that ``record`` fills (read it to compute extra ratios)."""
    return _PEERS


def _record(benchmark, *, bytes_moved: Optional[float] = None, flops: Optional[float] = None,
            peer_group: Optional[str] = None, provider: Optional[str] = None, device: torch.device | str = "cpu",
            **extra) -> None:
    stats = benchmark.stats.stats if hasattr(benchmark.stats, "stats") else benchmark.stats
    median = float(stats.median)
    info = benchmark.extra_info
    info["device"] = device_name(device)
    info["torch"] = torch.__version__
    info["median_ms"] = median * 1e3
    if bytes_moved is not None:
        info["bytes"] = int(bytes_moved)
        info["GB/s"] = bytes_moved / median / 1e9
    if flops is not None:
        info["TFLOP/s"] = flops / median / 1e12
    info.update(extra)
    if peer_group is not None:
        if provider is None:
            raise ValueError("record: peer_group needs a provider name")
        info["peer_group"], info["provider"] = peer_group, provider
        for (group, other), (other_median, other_info) in _PEERS.items():
            if group != peer_group or other == provider:
                continue
            info[f"speedup_vs_{other}"] = other_median / median
            other_info[f"speedup_vs_{provider}"] = median / other_median
        _PEERS[(peer_group, provider)] = (median, info)


def _interrupt(signum, frame):
    signal.alarm(15)  # SIGALRM's default action ends the process if the interrupted run hangs on its way out
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session", autouse=True)
def save_results_on_timeout():
    """gpu_check.sh stops each benchmark stage with ``timeout`` (SIGTERM), and pytest-benchmark writes its JSON only
    when the session ends: as a KeyboardInterrupt, SIGTERM ends the session normally and the finished cases are saved."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def record():
    """``record(benchmark, bytes_moved=..., flops=..., peer_group=..., provider=..., device=..., **extra)``."""
    return _record
