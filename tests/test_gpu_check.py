"""benchmarks/gpu_check.sh and the benchmark plumbing it relies on, on a CPU-only machine.

- the dry run (KVPO_GPU_CHECK_DRY=1) goes through every stage with the stages cut short, leaves the files a GPU run
  returns (<= 8, directly under $OUT, names the device tool accepts), prints a short output, and its budgets sum
  to <= 5.5 minutes;
- GPU stages select ``-m gpu``: no CPU case is collected there, and ours come first in each file;
- a benchmark cut before its first timed round does not lose the stage's JSON.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXPECTED_FILES = {"setup.log", "tests.log", "bench.log", "bench_attention.json", "bench_autotune.json",
                  "bench_energy.json", "bench.md", "bench.png"}
STAGES = ("probe", "build", "imports", "memcheck", "tests", "attention", "autotune", "energy", "summary")


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}
    env.pop("TRITON_INTERPRET", None)  # the script's own processes decide (tests/conftest.py sets it for CPU)
    return env


def test_dry_run_goes_through_every_stage_and_keeps_the_file_limits(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=_env(KVPO_GPU_CHECK_DRY="1", OUT=str(out), KVPO_GPU_CHECK_BUDGET_SCALE="3",
                 KVPO_GPU_CHECK_TESTS="tests/test_velocity_energy.py",
                 KVPO_GPU_CHECK_ATTENTION_K="G8-fwd-routed or G8-fwd-gather+sdpa_flash",
                 KVPO_GPU_CHECK_AUTOTUNE_K="not bwd", KVPO_GPU_CHECK_ENERGY_K="fwd-2x3",
                 KVPO_GPU_CHECK_ENERGY_FILES="benchmarks/bench_velocity_energy.py"))
    stdout = done.stdout
    assert done.returncode in (0, 1), stdout + done.stderr
    budget = int(re.search(r"budget (\d+)s over", stdout).group(1))
    assert budget <= 330, stdout
    positions = [stdout.find(f"=== {stage} (") for stage in STAGES]
    assert -1 not in positions and positions == sorted(positions), stdout
    assert "=== done, status" in stdout
    assert len(stdout) < 12_000
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == EXPECTED_FILES, stdout
    for name in ("bench_attention.json", "bench_autotune.json", "bench_energy.json"):
        data = json.loads((out / name).read_text())
        assert data["benchmarks"], name
        info = data["machine_info"]["kvpo"]
        assert {"kvpo_kernels", "git_commit", "cudnn", "python", "triton", "device", "date"} <= set(info)
    rows = json.loads((out / "bench_attention.json").read_text())["benchmarks"]
    ours = [row for row in rows if row["extra_info"]["provider"] == "routed"]
    assert ours and "err_out" in ours[0]["extra_info"] and "speedup_vs_gather+sdpa_flash" in ours[0]["extra_info"]
    assert "routed_attention" in (out / "bench.md").read_text()
    assert "python" in (out / "setup.log").read_text()


def test_gpu_marker_keeps_cpu_cases_out_of_gpu_stages():
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-m", "gpu",
                           "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=_env())
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert ids, done.stdout + done.stderr
    assert not [i for i in ids if "cpu" in i.split("::")[1]], ids  # test_cpu_forward, cpu_smoke, tiny-cpu
    attention = [i for i in ids if "bench_routed_attention" in i]
    energy = [i for i in ids if "bench_velocity_energy" in i]
    first_peer = next(n for n, i in enumerate(attention) if "-routed]" not in i and "-routed_tma]" not in i)
    assert all("-routed" in i for i in attention[:first_peer]) and first_peer >= 6
    assert all(i.split("[")[1].startswith(("triton", "cuda")) for i in energy[:len(energy) * 2 // 5])


_CUT_BENCH = textwrap.dedent('''
    import os, signal

    def test_finished(benchmark):
        benchmark.pedantic(lambda: sum(range(100)), rounds=3)

    def test_cut_before_first_round(benchmark):
        # the stage's timeout lands during the warm-up round: no timed round exists when the session ends
        benchmark.pedantic(lambda: os.kill(os.getpid(), signal.SIGTERM), rounds=3, warmup_rounds=1)
''')


def test_benchmark_cut_before_its_first_round_does_not_lose_the_json(tmp_path):
    for name in ("conftest.py", "benchlib.py"):
        (tmp_path / name).write_text((REPO / "benchmarks" / name).read_text())
    (tmp_path / "bench_cut.py").write_text(_CUT_BENCH)
    result = tmp_path / "out.json"
    done = subprocess.run([sys.executable, "-m", "pytest", "bench_cut.py", "-p", "no:cacheprovider",
                           "--benchmark-only", f"--benchmark-json={result}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=_env())
    assert result.exists() and result.stat().st_size, done.stdout[-3000:] + done.stderr[-3000:]
    names = [bench["name"] for bench in json.loads(result.read_text())["benchmarks"]]
    assert names == ["test_finished"]
    assert "dropped" in done.stderr and "test_cut_before_first_round" in done.stderr


@pytest.mark.parametrize("flag", ["--markdown", "--plot"])
def test_summarize_on_a_missing_file_is_one_clear_error(tmp_path, flag):
    done = subprocess.run([sys.executable, "benchmarks/summarize.py", str(tmp_path / "none.json"), flag,
                           str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 2 and "no such results file" in done.stderr
