#!/usr/bin/env bash
# The one prepared GPU check (H100/H200, torch + triton + nvcc + cmake + pybind11 already installed).
# Builds the extension for sm_90, runs the GPU tests, a memcheck pass on small shapes, and the benchmarks; writes
# everything under $OUT (default benchmarks/results/local). Budget: under 6 minutes. Each stage has its own timeout
# so one hang cannot eat the lease, and a failing stage does not stop the later ones (the exit code reports it).
#
#   device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=420)
#   optional wheels (diffusers for the adapter tests and the group-rollout benchmark): see the device README;
#   anything under .whl/ is installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 KVPO_CUDA_ARCHS=${KVPO_CUDA_ARCHS:-90}
PY=${PYTHON:-python3}
status=0
stage() { echo "=== $1 ($(date +%T))"; }

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
{ KVPO_REQUIRE_EXTENSION=1 timeout 240 $PY -m pip install -q --no-build-isolation --no-deps -e . \
    || KVPO_REQUIRE_EXTENSION=1 timeout 240 $PY setup.py -q build_ext --inplace
  $PY -c "import kvpo_kernels as k; print(k.describe_backends())"
} > "$OUT/build.log" 2>&1 || status=1
tail -n 15 "$OUT/build.log"

stage "GPU tests"
timeout 150 $PY -m pytest tests -m gpu -q -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 25
[ "${PIPESTATUS[0]}" = 0 ] || status=1

stage "compute-sanitizer memcheck (small shapes)"
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
  $PY -m pytest tests -m "gpu and sanitizer" -q -x -p no:cacheprovider 2>&1 | tee "$OUT/memcheck.log" | tail -n 8
[ "${PIPESTATUS[0]}" = 0 ] || status=1

stage "benchmarks"
timeout 200 $PY -m pytest benchmarks --benchmark-only -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" \
  --benchmark-min-rounds=5 --benchmark-max-time=0.5 --benchmark-warmup=on 2>&1 | tail -n 40
[ "${PIPESTATUS[0]}" = 0 ] || status=1
[ -f "$OUT/bench.json" ] && $PY benchmarks/summarize.py "$OUT/bench.json" --markdown "$OUT/bench.md" --plot "$OUT/bench.png" \
  && cat "$OUT/bench.md"

stage "done, status $status"
exit $status
