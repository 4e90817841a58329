#!/usr/bin/env bash
# The one prepared GPU check (H100/H200; Python 3.12, torch + CUDA, Triton, nvcc, cmake and pybind11 already there).
# Stages, each under its own timeout (SIGINT first, so pytest prints where it was and pytest-benchmark still saves
# what finished; SIGKILL a few seconds later), budgets summing to <= 330 s (5.5 min) with the kill grace included:
#   probe      device, driver, torch / CUDA / cuDNN / Triton / Python versions
#   wheels     carried .whl/*.whl into /tmp/site (optional)
#   build      the extension for sm_$KVPO_CUDA_ARCHS, then import checks (describe_backends, _C built with CUDA)
#   memcheck   the small `gpu and sanitizer` tests under compute-sanitizer memcheck (first: small and telling)
#   tests      the other GPU tests, verbose, one line per test, per-test timeout when pytest-timeout is installed
#   attention  routed_attention benchmarks, KVPO_TRITON_AUTOTUNE=0 (one untimed config per kernel: the time saved
#              goes to FlexAttention, which runs last)
#   autotune   the A/B of ours (block-table vs TMA forward) on G8 with KVPO_TRITON_AUTOTUNE=1, configs printed
#   energy     velocity_energy (CUDA events, L2 flushed) and the group rollout
#   summary    bench.md, bench.png and a short printed summary
# A failing stage does not stop the later ones; the exit status says whether any failed. GPU stages run only
# `-m gpu` cases (no CPU case spends GPU time). What comes back, directly under $OUT (8 files, the device tool's
# limit; the last step checks it):
#   setup.log tests.log bench.log bench_attention.json bench_autotune.json bench_energy.json bench.md bench.png
#
#   device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=420)
#   dry run (CPU, no CUDA, any machine; < 6 min):  KVPO_GPU_CHECK_DRY=1 OUT=$(mktemp -d) bash benchmarks/gpu_check.sh
#     (on a loaded machine add KVPO_GPU_CHECK_BUDGET_SCALE=2: the budgets are sized for the GPU machine)
#     every stage runs as far as it can without CUDA: no build (an editable install would re-point the Python
#     environment), GPU tests collected and skipped, GPU benchmark cases on CPU at tiny sizes, real JSON, summary,
#     plot and file-limit checks.
#   stage cuts (the quick test uses them): KVPO_GPU_CHECK_TESTS (pytest paths for memcheck/tests, default `tests`),
#     KVPO_GPU_CHECK_ATTENTION_K / _AUTOTUNE_K / _ENERGY_K (extra -k expressions), KVPO_GPU_CHECK_ENERGY_FILES.
#   .whl/ (optional): wheels carried as the device README says, e.g. diffusers for the adapter and trainer GPU
#   tests and the group-rollout benchmark, flash-attn / magi-attention for those peers; without them they skip:
#     echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
DRY=${KVPO_GPU_CHECK_DRY:-0}
export PYTHONUNBUFFERED=1 KVPO_CUDA_ARCHS=${KVPO_CUDA_ARCHS:-90} KVPO_GPU_CHECK_DRY=$DRY
[ "$DRY" = 1 ] || export TRITON_INTERPRET=0
PY=${PYTHON:-python3}
TESTS=${KVPO_GPU_CHECK_TESTS:-tests}
SETUP_LOG=$OUT/setup.log TESTS_LOG=$OUT/tests.log BENCH_LOG=$OUT/bench.log
: >"$SETUP_LOG"; : >"$TESTS_LOG"; : >"$BENCH_LOG"

# Budgets in seconds; GRACE = the SIGINT-to-SIGKILL wait of a step (longer for pytest, which must write its JSON).
declare -A BUDGET=([probe]=10 [wheels]=10 [build]=50 [imports]=15 [memcheck]=30 [tests]=70 [attention]=50
                   [autotune]=20 [energy]=30 [summary]=10)
# KVPO_GPU_CHECK_BUDGET_SCALE (an integer, default 1) stretches every budget for a dry run on a loaded CPU machine,
# where one `import torch` can take 10 s.
declare -A GRACE=([memcheck]=5 [tests]=5 [attention]=5 [autotune]=5 [energy]=5)
SCALE=${KVPO_GPU_CHECK_BUDGET_SCALE:-1}
total=0; for s in "${!BUDGET[@]}"; do total=$((total + BUDGET[$s] + ${GRACE[$s]:-2})); done
echo "gpu_check: dry=$DRY out=$OUT budget ${total}s over ${#BUDGET[@]} steps (x$SCALE) ($(date -u +%FT%TZ))"
[ "$total" -le 330 ] || { echo "gpu_check: step budgets sum to ${total}s > 330s"; exit 2; }

status=0
# step NAME LOG CMD...: CMD under its budget, output appended to LOG; a failure or timeout is reported, not fatal.
step() {
  local name=$1 log=$2; shift 2
  local budget=$((BUDGET[$name] * SCALE))
  echo "=== $name (budget ${budget}s, $(date +%T))" | tee -a "$log"
  # bash -c runs the exported step functions too; timeout signals the whole process group.
  timeout -s INT -k "${GRACE[$name]:-2}" "$budget" bash -c '"$@"' bash "$@" >>"$log" 2>&1
  local rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "!!! $name: cut at its ${budget}s budget" | tee -a "$log"; fi
  if [ "$rc" != 0 ]; then echo "!!! $name: exit $rc (see $(basename "$log"))"; status=1; fi
  return "$rc"
}

probe() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  $PY - <<'EOF'
import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "not installed"
cuda = torch.cuda.is_available()
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None, "| triton", tv)
print("device", torch.cuda.get_device_name() if cuda else "none (CPU only)",
      "| capability", torch.cuda.get_device_capability() if cuda else None)
EOF
}

wheels() {
  if [ "$DRY" = 1 ]; then echo "DRY: would install:" .whl/*.whl; return 0; fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

build() {
  if [ "$DRY" = 1 ]; then echo "DRY: build skipped (an editable install would re-point this Python)"; return 0; fi
  KVPO_REQUIRE_EXTENSION=1 $PY -m pip install -q --no-build-isolation --no-deps -e . \
    || KVPO_REQUIRE_EXTENSION=1 $PY setup.py -q build_ext --inplace
}

imports() {
  # The cuda-backend tests skip when the CUDA kernels are missing: make that a failed step, not a quiet skip (a dry
  # run only reports it: this machine has no nvcc build).
  $PY - <<'EOF'
import os
import kvpo_kernels
print(kvpo_kernels.describe_backends())
import kvpo_kernels._C as c
print("kvpo_kernels._C built with CUDA:", c.built_with_cuda)
assert c.built_with_cuda or os.environ["DRY"] == "1", "kvpo_kernels._C was built without CUDA"
EOF
}

export -f probe wheels build imports
export PY DRY

# pytest flags: verbose (the log shows which test was running when a budget ran out), per-test timeouts where
# pytest-timeout is installed (it is on the GPU machine).
PYTEST=($PY -m pytest -v -p no:cacheprovider -o console_output_style=classic)
per_test() { if $PY -c "import pytest_timeout" 2>/dev/null; then echo "--timeout=$1"; fi; }
$PY -c "import pytest_timeout" 2>/dev/null || echo "gpu_check: pytest-timeout missing: no per-test timeouts"

step probe "$SETUP_LOG" probe; tail -n 3 "$SETUP_LOG"
if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels "$SETUP_LOG" wheels && [ "$DRY" != 1 ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step build "$SETUP_LOG" build
step imports "$SETUP_LOG" imports
tail -n 4 "$SETUP_LOG"

# Correctness first, with autotuning off (KVPO_TRITON_AUTOTUNE=0: the first fitting config, untimed; the configs
# the autotuner may pick are tested by tests/test_routed_attention_configs.py, which forces each). Sanitizer tests
# first: without PyTorch's caching allocator every tensor is its own cudaMalloc, so memcheck sees a read past a
# small tensor's end (inside a cached 2 MiB segment it would pass unnoticed).
SANITIZER=()
if [ "$DRY" != 1 ]; then
  if command -v compute-sanitizer >/dev/null; then
    SANITIZER=(compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20)
  else
    echo "!!! compute-sanitizer not found: the sanitizer tests run without memcheck" | tee -a "$TESTS_LOG"; status=1
  fi
fi
PYTORCH_NO_CUDA_MEMORY_CACHING=1 KVPO_TRITON_AUTOTUNE=0 step memcheck "$TESTS_LOG" \
  "${SANITIZER[@]}" "${PYTEST[@]}" $TESTS -m "gpu and sanitizer" $(per_test 25)
KVPO_TRITON_AUTOTUNE=0 step tests "$TESTS_LOG" "${PYTEST[@]}" $TESTS -m "gpu and not sanitizer" $(per_test 20)
grep -E "^(FAILED|ERROR)|passed|failed|no tests ran" "$TESTS_LOG" | tail -n 12

BENCH=(--benchmark-only --benchmark-disable-gc -m gpu $(per_test 45))
kexpr() { [ -n "$1" ] && echo "-k" && echo "$1"; }
mapfile -t K_ATTENTION < <(kexpr "${KVPO_GPU_CHECK_ATTENTION_K:-}")
AUTOTUNE_K="G8 and (fwd-routed or bwd-routed)${KVPO_GPU_CHECK_AUTOTUNE_K:+ and ($KVPO_GPU_CHECK_AUTOTUNE_K)}"
mapfile -t K_AUTOTUNE < <(kexpr "$AUTOTUNE_K")
mapfile -t K_ENERGY < <(kexpr "${KVPO_GPU_CHECK_ENERGY_K:-}")
KVPO_TRITON_AUTOTUNE=0 step attention "$BENCH_LOG" "${PYTEST[@]}" benchmarks/bench_routed_attention.py \
  "${BENCH[@]}" "${K_ATTENTION[@]}" --benchmark-json="$OUT/bench_attention.json"
KVPO_TRITON_AUTOTUNE=1 step autotune "$BENCH_LOG" "${PYTEST[@]}" benchmarks/bench_routed_attention.py \
  "${BENCH[@]}" "${K_AUTOTUNE[@]}" --benchmark-json="$OUT/bench_autotune.json"
grep -h "^\[autotune\]" "$BENCH_LOG" | tail -n 8
# Our velocity_energy rows, then the rollout, then the peers (torch.compile's Inductor builds last).
ENERGY_FILES=${KVPO_GPU_CHECK_ENERGY_FILES:-benchmarks/bench_velocity_energy.py::test_gpu_ours \
  benchmarks/bench_group_rollout.py benchmarks/bench_velocity_energy.py::test_gpu_peers}
step energy "$BENCH_LOG" "${PYTEST[@]}" $ENERGY_FILES "${BENCH[@]}" "${K_ENERGY[@]}" \
  --benchmark-json="$OUT/bench_energy.json"
grep -E "^(FAILED|ERROR)|passed|failed|dropped" "$BENCH_LOG" | tail -n 12

results=()
for f in "$OUT"/bench_attention.json "$OUT"/bench_autotune.json "$OUT"/bench_energy.json; do
  [ -s "$f" ] && results+=("$f")
done
if [ ${#results[@]} -gt 0 ]; then
  step summary "$BENCH_LOG" $PY benchmarks/summarize.py "${results[@]}" --markdown "$OUT/bench.md" \
    --plot "$OUT/bench.png" --short
  sed -n '/^=== summary/,$p' "$BENCH_LOG" | tail -n +2 | head -c 5000
else
  echo "!!! no benchmark results to summarise"; status=1
fi

echo "=== results ($(date +%T))"
files=$(find "$OUT" -type f | wc -l)
deep=$(find "$OUT" -mindepth 4 | wc -l)
odd=$(find "$OUT" -mindepth 1 -name '*[!A-Za-z0-9._-]*' | wc -l)
ls -l "$OUT" | tail -n +2
if [ "$files" -gt 8 ] || [ "$deep" -gt 0 ] || [ "$odd" -gt 0 ]; then
  echo "!!! $OUT breaks the device tool's limits: $files files (max 8), $deep too deep, $odd odd names"; status=1
fi
echo "=== done, status $status"
exit $status
