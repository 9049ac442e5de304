#!/usr/bin/env bash
# GPU tests and benchmarks in one go, for a machine with a CUDA GPU: writes logs and JSON into OUTDIR and
# prints a short table last.   usage: scripts/gpu_check.sh OUTDIR [tests|bench|tune|all]...
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR [tests|bench|tune|all]...}
shift
steps=${*:-all}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}src PYTHONUNBUFFERED=1
export TRIFORMERS_COMMIT=${TRIFORMERS_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
summary=()
has() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$out/gpu.txt"
if has tests; then
  # TRIFORMERS_CHECK_LAUNCH_KEYS=1: every launch that skips the argument key verifies the launcher's dyn_key
  TRIFORMERS_CHECK_LAUNCH_KEYS=1 python3 -m pytest -m gpu -q -n 8 -p no:cacheprovider \
    tests/ops/fmha/test_triton_gpu.py tests/test_launch.py ${GPU_TEST_EXTRA:-} \
    2>&1 | tee "$out/gpu_tests.log" | tail -n 30
  summary+=("gpu tests: $(tail -n 1 "$out/gpu_tests.log")")
fi
if has tune; then
  python3 scripts/tune_fmha.py --out "$out" ${TUNE_ARGS:-} 2>&1 | tee "$out/tune.log" | grep best
  summary+=("tuning: $(grep -c best "$out/tune.log") keys swept")
fi
if has bench; then
  python3 -m triformers.benchmarks.fmha --out "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log" | tail -n 60
  summary+=("benchmark: $(grep -c TFLOP "$out/bench.log") records")
fi
echo
echo "== summary =="
for s in "${summary[@]}"; do echo "$s"; done
