"""The benchmark helpers that decide what a GPU run reports (benchmarks/benchlib.py, summarize.py, the peers'
layouts), on CPU: a wrong helper would falsify every number the first GPU run publishes."""
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import benchlib  # noqa: E402
import bench_routed_attention as bra  # noqa: E402
import summarize  # noqa: E402


def test_cross_check_reports_every_tensor_and_fails_above_tolerance():
    want = [torch.ones(4, 3), torch.full((2,), 2.0)]
    errors = benchlib.cross_check([w * (1 + 1e-3) for w in want], want, ["out", "dq"], tolerance=1e-2)
    assert errors.keys() == {"err_out", "err_dq"} and all(abs(e - 1e-3) < 1e-6 for e in errors.values())
    with pytest.raises(AssertionError, match="dq: relative error"):
        benchlib.cross_check([want[0], want[1] * 1.1], want, ["out", "dq"], tolerance=1e-2)
    with pytest.raises(AssertionError, match="out: relative error inf"):
        benchlib.cross_check([torch.full((4, 3), float("nan"))], want[:1], ["out"], tolerance=1e-2)
    with pytest.raises(AssertionError, match="shape"):
        benchlib.cross_check([torch.ones(3, 4)], want[:1], ["out"], tolerance=1e-2)
    with pytest.raises(ValueError, match="names"):
        benchlib.cross_check(want, want, ["out"], tolerance=1e-2)


def test_ratio_spread_pairs_rounds():
    spread = benchlib.ratio_spread([1.0, 2.0, 4.0], [3.0, 2.0, 4.0])
    assert spread == {"min": 1.0, "median": 1.0, "max": 3.0}
    with pytest.raises(ValueError, match="paired"):
        benchlib.ratio_spread([1.0], [1.0, 2.0])


def test_event_times_on_cpu_counts_calls_and_flushes():
    calls, flushes = [], []
    per_call, launch = benchlib.event_times(lambda: calls.append(1), torch.device("cpu"), rounds=3, calls=4,
                                            flush=lambda: flushes.append(1))
    assert len(per_call) == 3 and launch >= 0
    assert len(calls) == 5 + 3 * 4 and len(flushes) == 3 * 4  # 5 launch-latency calls, then the rounds


def test_every_provider_agrees_with_gather_sdpa_on_cpu():
    """The shared grad_out and the cross-check: ours, and the flat-pool peers that run on CPU (flex's block mask),
    match gather+SDPA forward and backward; a provider fed a wrong route fails the check."""
    w = bra.make_workload("LongLive", device="cpu", dtype=torch.float32, **bra.TINY)
    for provider, direction in (("routed", "fwd+bwd"), ("flex", "fwd")):
        errors = bra.check_against_reference(w, direction, bra.step_fn(bra.PROVIDERS[provider], w, direction)())
        assert max(errors.values()) < 1e-5, (provider, errors)
    wrong = bra.step_fn(lambda v: bra.routed_attention(v.q, v.k_cache, v.v_cache, v.block_table.flip(0), None,
                                                       v.k_new, v.v_new), w, "fwd+bwd")()
    with pytest.raises(AssertionError, match="cross-check failed"):
        bra.check_against_reference(w, "fwd+bwd", wrong)


def test_magi_ranges_select_the_routed_blocks_and_the_own_chunk():
    w = bra.make_workload("G8", device="cpu", dtype=torch.float32, **bra.TINY)
    q_ranges, k_ranges = bra.magi_ranges(w)
    branches, q_len = w.q.shape[:2]
    k_flat, _ = bra._flat_pool_and_chunks(w)
    mask = torch.zeros(branches * q_len, k_flat.shape[0], dtype=torch.bool)
    for (q0, q1), (k0, k1) in zip(q_ranges.tolist(), k_ranges.tolist()):
        mask[q0:q1, k0:k1] = True
    k_gathered, _ = bra.gather(w)
    for b in range(branches):
        rows = mask[b * q_len:(b + 1) * q_len]
        assert bool((rows == rows[:1]).all())  # every query of a branch sees the same keys
        assert torch.equal(k_flat[rows[0]], k_gathered[b])  # ... exactly the gather's keys, in its order


def _fake_results(tmp_path):
    def bench(group, provider, median, **extra):
        return {"group": group, "name": f"test[{provider}]", "stats": {"median": median},
                "extra_info": dict(provider=provider, threads=1, median_ms=median * 1e3, **extra)}
    data = {"machine_info": {"kvpo": {"kvpo_kernels": "0.1.0", "git_commit": "abc123", "device": "CPU X"}},
            "datetime": "2026-12-01", "benchmarks": [
                bench("velocity_energy fwd cpu", "cpu", 0.001, **{"speedup_vs_eager": 10.0,
                      "speedup_vs_eager_min": 8.0, "speedup_vs_eager_median": 9.0, "speedup_vs_eager_max": 11.0}),
                bench("velocity_energy fwd cpu", "eager", 0.01, speedup_vs_cpu=0.1),
                bench("routed_attention G8 fwd", "routed", 0.002, err_out=3e-3, **{"speedup_vs_gather+sdpa_flash": 2.0,
                      "speedup_vs_routed_tma": 1.1})]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    return path


def test_summarize_headlines_our_speedups_per_family(tmp_path):
    rows, run = summarize.load(_fake_results(tmp_path))
    assert list(summarize.families(rows)) == ["velocity_energy", "routed_attention"]
    assert summarize.speedups(rows[0]) == [("eager", 9.0, 8.0, 11.0)]  # paired-round median and spread
    assert summarize.speedups(rows[2]) == [("gather+sdpa_flash", 2.0, None, None)]  # ours vs ours is no headline
    report = summarize.markdown(rows, run, note="shared machine")
    assert "abc123" in report and "Note: shared machine" in report and "higher is better" in report
    assert "9.00x vs eager [8.00-11.00]" in report and "include the per-branch K/V gather" in report
    short = summarize.short_summary(rows, run)
    assert len(short.splitlines()) == 5 and "err<=0.003" in short
    assert len(summarize.short_summary(rows * 200, run, limit=500)) <= 500
    summarize.plot(rows, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 10_000
