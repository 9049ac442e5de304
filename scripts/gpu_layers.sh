#!/usr/bin/env bash
# GPU check of the fused layers and ops: their `gpu` tests, then the layer benchmark.
#   scripts/gpu_layers.sh OUTDIR
# Writes OUTDIR/gpu_tests.log, OUTDIR/bench.log (with the autotuner's choices), OUTDIR/layers.json and
# OUTDIR/layers.png, and prints a short table last. Run from the repository root on a CUDA machine; the
# package need not be installed (src/ goes on PYTHONPATH). A Liger-Kernel wheel in .whl/ is installed
# into /tmp/site first, as the benchmark's `liger` peer.
set -u
OUT=${1:?usage: scripts/gpu_layers.sh OUTDIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/liger_kernel-*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
TESTS="tests/triton tests/components/test_activations.py tests/ops/test_rmsnorm.py tests/ops/test_swiglu.py
       tests/ops/test_indexing.py tests/ops/test_unbind.py"
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n ${JOBS:-8}"
# Autotuning every odd test shape would take minutes; the tests check the default configs, the benchmark
# checks the autotuned ones (each provider's output is compared with the reference before timing).
TRIFORMERS_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -m gpu $XDIST -p no:cacheprovider \
    -W ignore::DeprecationWarning $TESTS >"$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -1 "$OUT/gpu_tests.log"))"
TRITON_PRINT_AUTOTUNING=1 timeout "${BENCH_TIMEOUT:-400}" $PY -m triformers.benchmarks.layers \
    --out "$OUT/layers.json" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
echo "benchmark: exit $?"
grep -E "FAILED|Error" "$OUT/gpu_tests.log" | head -20
[ -f "$OUT/layers.json" ] && $PY -m triformers.benchmarks.layers --summary "$OUT/layers.json"
