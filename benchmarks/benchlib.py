"""Benchmark helpers without pytest state (the fixtures in conftest.py wrap them; tests import them directly).

- ``dry_run()`` / ``bench_device()``: gpu_check.sh's CPU rehearsal (``KVPO_GPU_CHECK_DRY=1``) runs the GPU cases
  on CPU at tiny sizes.
- ``drop_unfinished(benchmarks)``: the pytest-benchmark entries with no timed round, removed before saving.
- ``run_info()``: library version, git commit, torch / CUDA / cuDNN / Triton / Python, device, CPU, date, load.
- ``sync(fn, device)``: ``fn`` then ``torch.cuda.synchronize`` on a CUDA device.
- ``event_times`` / ``l2_flusher``: per-call device time of back-to-back calls (CUDA events), an L2 flush
  between rounds, and the launch latency as its own number.
- ``paired_rounds`` / ``ratio_spread``: ours timed by pytest-benchmark with every peer run right before each
  round, so each round's ratio shares the machine's load; min / median / max of the per-round ratios.
- ``cross_check``: relative errors of one provider's outputs against another's; raises above the tolerance.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parent.parent


def dry_run() -> bool:
    """True in gpu_check.sh's CPU rehearsal: GPU benchmark cases run on CPU at tiny sizes."""
    return os.environ.get("KVPO_GPU_CHECK_DRY", "0") == "1"


def bench_device() -> torch.device:
    """The device a GPU-marked case runs on: CUDA, or the CPU in a dry run."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def drop_unfinished(benchmarks: List) -> List:
    """Remove (in place) the pytest-benchmark entries with no timed round; return the removed ones."""
    unfinished = [bench for bench in benchmarks if not bench]
    benchmarks[:] = [bench for bench in benchmarks if bench]
    return unfinished


def _git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        # Results files being rewritten by this very run do not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!benchmarks/results"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return done.stdout.strip() + ("+dirty" if dirty else "") if done.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def run_info() -> Dict[str, str]:
    """Versions and machine of this run (the results file says what produced it)."""
    import kvpo_kernels

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"kvpo_kernels": kvpo_kernels.__version__, "git_commit": _git_commit(), "torch": torch.__version__,
            "cuda": str(torch.version.cuda), "cudnn": str(cudnn), "triton": triton_version,
            "python": platform.python_version(), "device": device_name(bench_device()),
            "cpu": cpu_model(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dry_run": str(dry_run()), "host": platform.node(),
            "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def cpu_model() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


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


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def ratio_spread(ours: Sequence[float], peer: Sequence[float]) -> Dict[str, float]:
    """min / median / max over rounds of peer time / our time (paired by round)."""
    if len(ours) != len(peer) or not ours:
        raise ValueError(f"ratio_spread: need paired rounds, got {len(ours)} and {len(peer)}")
    ratios = [p / o for o, p in zip(ours, peer)]
    return {"min": min(ratios), "median": median(ratios), "max": max(ratios)}


def event_times(fn: Callable[[], object], device: torch.device, rounds: int, calls: int,
                flush: Optional[Callable[[], object]] = None) -> Tuple[List[float], float]:
    """Per-call seconds of ``fn``, one value per round (the mean of ``calls`` calls), and its launch latency.

    On a GPU each call is timed with its own pair of CUDA events and preceded by ``flush()`` (an L2 flush, queued
    outside the events, as ``triton.testing.do_bench`` does): the calls stay back to back on the device, so the
    time is the kernel's, not Python's dispatch or a sync, and every call reads from HBM, not from the L2 that a
    38 MB case would otherwise sit in. On CPU, ``perf_counter`` around the calls. The launch latency is the median
    host time to issue one call with the device idle (a separate number: back-to-back timing hides it, a training
    step that launches once per layer does not)."""
    cuda = device.type == "cuda"
    launches = []
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        launches.append(time.perf_counter() - start)
    per_call = []
    for _ in range(rounds):
        if not cuda:
            start = time.perf_counter()
            for _ in range(calls):
                if flush is not None:
                    flush()
                fn()
            per_call.append((time.perf_counter() - start) / calls)
            continue
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
        for begin, end in events:
            if flush is not None:
                flush()
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        per_call.append(sum(begin.elapsed_time(end) for begin, end in events) * 1e-3 / calls)
    return per_call, median(launches)


def l2_flusher(device: torch.device) -> Optional[Callable[[], object]]:
    """A function that evicts the GPU's L2 (writes a buffer of twice its size), or None on CPU."""
    if device.type != "cuda":
        return None
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
    buffer = torch.empty(2 * l2_bytes, dtype=torch.uint8, device=device)
    return lambda: buffer.zero_()


def cross_check(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], names: Iterable[str],
                tolerance: float) -> Dict[str, float]:
    """Relative error ||a - e|| / ||e|| (float64 Frobenius norms) per named tensor, e.g. ``{"err_out": 3e-3}``.

    Raises ``AssertionError`` naming every tensor above ``tolerance`` (or with a NaN/inf where the expected tensor
    is finite, or a shape mismatch). A benchmark that compares two providers must first agree with the other one:
    a fast wrong answer is not a speedup.
    """
    names = list(names)
    if not (len(names) == len(actual) == len(expected)):
        raise ValueError(f"cross_check: {len(names)} names for {len(actual)} and {len(expected)} tensors")
    errors, bad = {}, []
    for name, got, want in zip(names, actual, expected):
        if got.shape != want.shape:
            bad.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            continue
        got64, want64 = got.detach().double(), want.detach().double()
        scale = float(want64.norm())
        err = float((got64 - want64).norm()) / max(scale, 1e-30)
        if err != err:  # NaN
            err = float("inf")
        errors[f"err_{name}"] = err
        if not err <= tolerance:
            bad.append(f"{name}: relative error {err:.3g} > {tolerance:.3g}")
    if bad:
        raise AssertionError("cross-check failed: " + "; ".join(bad))
    return errors




def paired_rounds(benchmark, fn: Callable[[], object], peer_fns: Dict[str, Callable[[], object]], rounds: int,
                  warmup: int = 1) -> Dict[str, float]:
    """Time ``fn`` for ``rounds`` rounds with pytest-benchmark; before each round run every peer once, timed here,
    in a rotating order. Returns ``{"speedup_vs_<peer>_min|median|max": ...}`` from the per-round ratios."""
    peer_times: Dict[str, List[float]] = {name: [] for name in peer_fns}
    order = list(peer_fns)
    for _ in range(warmup):
        fn()
        for peer in peer_fns.values():
            peer()

    def setup():
        order.append(order.pop(0))  # rotate, so no peer always runs right before ours
        for name in order:
            start = time.perf_counter()
            peer_fns[name]()
            peer_times[name].append(time.perf_counter() - start)

    benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=0)
    ours = list(benchmark.stats.stats.data)
    spread = {}
    for name, times in peer_times.items():
        for key, value in ratio_spread(ours, times).items():
            spread[f"speedup_vs_{name}_{key}"] = value
    return spread
