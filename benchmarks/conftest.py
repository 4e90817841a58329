"""Shared pytest-benchmark fixtures for every op's benchmark file (helpers without pytest state: benchlib.py).

Usage in ``benchmarks/bench_<op>.py``::

    def test_fwd_cuda(benchmark, record, cuda_synchronize):
        fn = lambda: op(x, backend="cuda")
        benchmark.pedantic(cuda_synchronize(fn, x.device), rounds=5, warmup_rounds=1)
        record(benchmark, bytes_moved=2 * x.nbytes, peer_group="fwd-8x4", provider="cuda", device=x.device)

- ``cuda_synchronize(fn, device)`` (a fixture; the plain function is ``sync``) wraps ``fn`` so that the timed call
  waits for the GPU (pytest-benchmark times wall clock). On CPU it returns ``fn`` unchanged.
- ``record(benchmark, *, bytes_moved=None, flops=None, peer_group=None, provider=None, seconds=None, **extra)``
  writes the device name, median time, GB/s and/or TFLOP/s into ``benchmark.extra_info``. ``seconds`` (per-call
  times measured by the benchmark itself, e.g. with CUDA events) replaces pytest-benchmark's wall-clock rounds as
  the source of the median. With ``peer_group``, the median is also stored under (peer_group, provider) in the
  session-wide ``peers`` table, and ``speedup_vs_<other>`` = other's median / this median is written for every peer
  of the group measured before it (and back into those peers' ``extra_info``).
- ``benchlib.paired_rounds(benchmark, fn, peers, rounds)`` times ``fn`` with pytest-benchmark and, before each of its
  rounds, every peer once (untimed by pytest-benchmark, timed here): the ratios of one round share the machine's
  load, so ``speedup_vs_<peer>_min/median/max`` over the rounds stay meaningful on a busy 2-core machine.
- ``pinned_threads`` (fixture) runs a CPU benchmark with ``KVPO_BENCH_THREADS`` torch threads (default 1), the same
  for ours and the peers; ``record`` writes the count per row (``threads``).
- Tests marked ``@pytest.mark.gpu`` are skipped when torch sees no CUDA device, except in the dry rehearsal of
  gpu_check.sh (``KVPO_GPU_CHECK_DRY=1``), where they run on CPU at tiny sizes (``dry_run()``; rows say
  ``dry: true``). GPU stages select them with ``-m gpu``, so no CPU case spends a GPU stage's time.
- Benchmarks that never finished a timed round (a stage's timeout landed first) are dropped before
  pytest-benchmark saves: otherwise its JSON writer fails (``min() arg is an empty sequence``) and the whole
  stage's results are lost.
- The saved JSON's ``machine_info`` gains ``kvpo``: library version, git commit, torch / CUDA / cuDNN / Triton /
  Python versions, GPU name or CPU model, and the date.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Dict, Optional, Sequence, Tuple

import pytest
import torch

from benchlib import device_name, drop_unfinished, dry_run, median, run_info, sync


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` (pytest's default pattern is ``test_*.py``); explicit paths are collected by pytest."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or dry_run():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Runs before pytest-benchmark's own sessionfinish wrapper, which writes the JSON."""
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is not None:
        for bench in drop_unfinished(bench_session.benchmarks):
            print(f"\n[benchmarks] dropped {bench.fullname}: no timed round finished", file=sys.stderr)
    yield


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["kvpo"] = run_info()


@pytest.fixture
def cuda_synchronize() -> Callable[[Callable[[], object], torch.device | str], Callable[[], object]]:
    """The ``sync`` helper as a fixture: ``benchmark(cuda_synchronize(fn, device))``."""
    return sync


@pytest.fixture
def pinned_threads():
    """Every CPU benchmark runs with the same torch thread count for ours and the peers (KVPO_BENCH_THREADS,
    default 1): on a shared 2-core machine a second OpenMP thread competes with other work and the ratio of two
    providers then measures the neighbours, not the code."""
    threads = int(os.environ.get("KVPO_BENCH_THREADS", "1"))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield threads
    torch.set_num_threads(previous)


# (peer_group, provider) -> (median seconds, the benchmark fixture's extra_info dict)
_PEERS: Dict[Tuple[str, str], Tuple[float, dict]] = {}


@pytest.fixture(scope="session")
def peers() -> Dict[Tuple[str, str], Tuple[float, dict]]:
    """The session-wide table of medians that ``record`` fills (read it to compute extra ratios)."""
    return _PEERS


def _record(benchmark, *, bytes_moved: Optional[float] = None, flops: Optional[float] = None,
            peer_group: Optional[str] = None, provider: Optional[str] = None, device: torch.device | str = "cpu",
            seconds: Optional[Sequence[float]] = None, **extra) -> None:
    if seconds is not None:
        mid = median(seconds)
    else:
        stats = benchmark.stats.stats if hasattr(benchmark.stats, "stats") else benchmark.stats
        mid = float(stats.median)
    info = benchmark.extra_info
    info["device"] = device_name(device)
    info["threads"] = torch.get_num_threads()
    info["median_ms"] = mid * 1e3
    if dry_run():
        info["dry"] = True
    if bytes_moved is not None:
        info["bytes"] = int(bytes_moved)
        info["GB/s"] = bytes_moved / mid / 1e9
    if flops is not None:
        info["TFLOP/s"] = flops / mid / 1e12
    info.update(extra)
    if peer_group is not None:
        if provider is None:
            raise ValueError("record: peer_group needs a provider name")
        info["peer_group"], info["provider"] = peer_group, provider
        for (group, other), (other_median, other_info) in _PEERS.items():
            if group != peer_group or other == provider:
                continue
            info[f"speedup_vs_{other}"] = other_median / mid
            other_info[f"speedup_vs_{provider}"] = mid / other_median
        _PEERS[(peer_group, provider)] = (mid, info)


@pytest.fixture
def record():
    """``record(benchmark, bytes_moved=..., flops=..., peer_group=..., provider=..., device=..., **extra)``."""
    return _record


def _interrupt(signum, frame):
    signal.alarm(15)  # SIGALRM's default action ends the process if the interrupted run hangs on its way out
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session", autouse=True)
def save_results_on_timeout():
    """gpu_check.sh stops each stage with ``timeout`` (SIGINT, or SIGTERM from a plain ``timeout``), and
    pytest-benchmark writes its JSON only when the session ends: as a KeyboardInterrupt, the signal ends the session
    normally and the finished cases are saved."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    yield
    signal.signal(signal.SIGTERM, previous)
