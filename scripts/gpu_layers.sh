#!/usr/bin/env bash
# GPU check of the fused layers and ops:   scripts/gpu_layers.sh OUTDIR [tests|host|bench|all]...
#   tests  their `gpu` tests                          -> OUTDIR/gpu_tests.log
#   host   host time per call (scripts/host_overhead.py) -> OUTDIR/host.json, host.log
#   bench  the layer benchmark, with the autotuner's choices in its log -> OUTDIR/layers.json, .png, bench.log
# Prints a short table last. Run from the repository root on a CUDA machine; the package need not be
# installed (src/ goes on PYTHONPATH). A Liger-Kernel wheel in .whl/ is installed into /tmp/site first, as
# the benchmark's `liger` peer.
set -u
OUT=${1:?usage: scripts/gpu_layers.sh OUTDIR [tests|host|bench|all]...}
shift
STEPS=" ${*:-all} "
has() { [[ "$STEPS" == *" $1 "* || "$STEPS" == *" all "* ]]; }
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/liger_kernel-*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if has tests; then
    TESTS="tests/triton tests/components/test_activations.py tests/ops/test_rmsnorm.py tests/ops/test_swiglu.py
           tests/ops/test_indexing.py tests/ops/test_unbind.py tests/test_launch.py"
    XDIST=""
    $PY -c "import xdist" 2>/dev/null && XDIST="-n ${JOBS:-8}"
    # Autotuning every odd test shape would take minutes; the tests check the default configs, the benchmark
    # checks the autotuned ones (each provider's output is compared with the reference before timing).
    # TRIFORMERS_CHECK_LAUNCH_KEYS=1: every launch that skips the argument key verifies the caller's dyn_key.
    TRIFORMERS_CHECK_LAUNCH_KEYS=1 TRIFORMERS_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -m gpu $XDIST -p no:cacheprovider \
        -W ignore::DeprecationWarning $TESTS >"$OUT/gpu_tests.log" 2>&1
    echo "gpu tests: exit $? ($(tail -1 "$OUT/gpu_tests.log"))"
    grep -E "FAILED|Error" "$OUT/gpu_tests.log" | head -20
fi
if has host; then
    $PY scripts/host_overhead.py --out "$OUT/host.json" >"$OUT/host.log" 2>&1
    echo "host overhead: exit $?"
    grep -v "^{" "$OUT/host.log" | head -30
fi
if has bench; then
    TRITON_PRINT_AUTOTUNING=1 timeout "${BENCH_TIMEOUT:-450}" $PY -m triformers.benchmarks.layers \
        --out "$OUT/layers.json" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
    echo "benchmark: exit $?"
    [ -f "$OUT/layers.json" ] && $PY -m triformers.benchmarks.layers --summary "$OUT/layers.json" | tail -48
fi
