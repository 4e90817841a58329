"""Every script in examples/ runs (its default, CPU-sized variant) in a fresh interpreter and says what it shows."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# Regular expressions each example's output must match: the shapes it promises and the checks it makes.
EXPECTED = {
    "routed_attention_basics.py": [r"lse \[3, 4, 5\] torch\.float32", r"have zero gradient: True",
                                   r"max \|out - float64 reference\| = [0-9.]+e-0[5-9]"],
    "velocity_energy_basics.py": [r"E \[4, 4\] torch\.float32", r"bitwise repeatable: True",
                                  r"float64 reference\| = [0-9.]+e-0[6-9]"],
    "streaming_wan_group.py": [r"out\.x_t \[4, 9, 4, 3, 4, 6\]", r"x0 \[8, 4, 3, 4, 6\]",
                               r"(\d+) of \1 parameter tensors got a gradient"],
    "custom_reward_training.py": [r"follows RewardFn: True", r"step 3: reward -?[0-9.]+, loss"],
}


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_every_named_example_exists():
    missing = set(EXPECTED) - {p.name for p in EXAMPLES}
    assert not missing, f"examples/ lacks {sorted(missing)}"


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script):
    result = _run(script)
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    for pattern in EXPECTED.get(script.name, []):
        assert re.search(pattern, result.stdout), f"{script.name}: no {pattern!r} in its output:\n{result.stdout}"
    assert result.stdout.strip(), f"{script.name} printed nothing"


def test_every_example_says_how_to_run_it():
    """Each example opens with a docstring that shows its command line (argparse's --help prints it too)."""
    for script in EXAMPLES:
        docstring = script.read_text().split('"""')[1]
        assert f"python examples/{script.name}" in docstring, f"{script.name}: no usage line in its docstring"
