"""Import cost of the package against ``import torch``: median of 5 fresh interpreters each (issue 13: <= 1.3x).

    PYTHONPATH=$PWD python3 benchmarks/measure_import_time.py

A plain script, not a timed test (a loaded CI machine would make such a test flaky). Each run is a new process
that times only the import statement, so interpreter start-up is excluded and the OS file cache is warm after the
first run of each kind (one untimed warm-up run each).
"""
import statistics
import subprocess
import sys

RUNS = 5
TIMER = "import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"


def import_seconds(module: str) -> float:
    done = subprocess.run([sys.executable, "-c", TIMER.format(module=module)], capture_output=True, text=True,
                          check=True)
    return float(done.stdout.strip().splitlines()[-1])


def median_import_seconds(module: str) -> float:
    import_seconds(module)  # warm-up: fills the file cache
    return statistics.median(import_seconds(module) for _ in range(RUNS))


def main() -> None:
    torch_s = median_import_seconds("torch")
    package_s = median_import_seconds("kvpo_kernels")
    print(f"import torch:        {torch_s:.3f} s (median of {RUNS})")
    print(f"import kvpo_kernels: {package_s:.3f} s (median of {RUNS}, torch included)")
    print(f"ratio:               {package_s / torch_s:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
