#!/usr/bin/env bash
# The one prepared GPU check (H100/H200 with torch, triton, nvcc, cmake and pybind11 already installed).
# Builds the extension for sm_90, runs the GPU tests, a compute-sanitizer memcheck pass on small shapes, and the
# benchmarks; writes everything under $OUT (default benchmarks/results/local). Each stage has its own timeout and
# they add up to under 6 minutes, so one hang cannot eat the lease; a failing stage does not stop the later ones
# (the exit status reports it); a benchmark stage cut by its timeout still saves the cases it finished. What comes back (8 files at most): device.txt, build.log, gpu_tests.log,
# memcheck.log, bench_attention.json, bench_energy.json, bench.md, bench.png.
#
#   device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=420)
#   .whl/ (optional): wheels carried as the device README says, e.g. diffusers for the adapter and trainer GPU
#   tests and the group-rollout benchmark; without them those files skip. The device image lacks only diffusers
#   and importlib_metadata of diffusers' requirements; prepare them here (ignored by git) with:
#     echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 KVPO_CUDA_ARCHS=${KVPO_CUDA_ARCHS:-90}
PY=${PYTHON:-python3}
status=0
stage() { echo "=== $1 ($(date +%T))"; }
PYTEST=($PY -m pytest -q -p no:cacheprovider)

stage "device"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"

if compgen -G ".whl/*.whl" >/dev/null; then
  stage "carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

stage "build (sm_$KVPO_CUDA_ARCHS)"
{ KVPO_REQUIRE_EXTENSION=1 timeout 70 bash -c "$PY -m pip install -q --no-build-isolation --no-deps -e . \
    || $PY setup.py -q build_ext --inplace"
  $PY -c "import kvpo_kernels as k; print(k.describe_backends())"
  # The cuda-backend tests skip when the CUDA kernels are missing: make that a failed stage, not a quiet skip.
  $PY -c "import kvpo_kernels._C as c; assert c.built_with_cuda, 'kvpo_kernels._C was built without CUDA'"
} > "$OUT/build.log" 2>&1 || status=1
tail -n 15 "$OUT/build.log"

# Correctness first, with autotuning off (KVPO_TRITON_AUTOTUNE=0 compiles only the first config that fits): the
# tests check numerics, not speed, and compiling every candidate would not fit the budget.
stage "GPU tests"
KVPO_TRITON_AUTOTUNE=0 timeout 100 "${PYTEST[@]}" tests -m gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 25
[ "${PIPESTATUS[0]}" = 0 ] || status=1

stage "compute-sanitizer memcheck (small shapes)"
# Without PyTorch's caching allocator every tensor is its own cudaMalloc, so memcheck sees a read past a small
# tensor's end (inside a cached 2 MiB segment it would pass unnoticed).
PYTORCH_NO_CUDA_MEMORY_CACHING=1 KVPO_TRITON_AUTOTUNE=0 timeout 40 \
  compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
  "${PYTEST[@]}" tests -m "gpu and sanitizer" -x 2>&1 | tee "$OUT/memcheck.log" | tail -n 8
[ "${PIPESTATUS[0]}" = 0 ] || status=1

BENCH=(--benchmark-only --benchmark-min-rounds=3 --benchmark-max-time=0.25 --benchmark-warmup=on)
stage "benchmarks: routed_attention (autotuned) vs gather+SDPA flash/cuDNN, FlexAttention"
timeout 90 "${PYTEST[@]}" benchmarks/bench_routed_attention.py "${BENCH[@]}" \
  --benchmark-json="$OUT/bench_attention.json" 2>&1 | tail -n 5
[ "${PIPESTATUS[0]}" = 0 ] || status=1
stage "benchmarks: velocity_energy vs eager/compile, group rollout"
timeout 50 "${PYTEST[@]}" benchmarks/bench_velocity_energy.py benchmarks/bench_group_rollout.py "${BENCH[@]}" \
  --benchmark-json="$OUT/bench_energy.json" 2>&1 | tail -n 5
[ "${PIPESTATUS[0]}" = 0 ] || status=1

results=()
for f in "$OUT/bench_attention.json" "$OUT/bench_energy.json"; do [ -f "$f" ] && results+=("$f"); done
if [ ${#results[@]} -gt 0 ]; then
  $PY benchmarks/summarize.py "${results[@]}" --markdown "$OUT/bench.md" --plot "$OUT/bench.png" && cat "$OUT/bench.md"
fi

stage "done, status $status"
exit $status
