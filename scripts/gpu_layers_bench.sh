#!/usr/bin/env bash
# Host overhead per call, then the layer benchmark (no tests): scripts/gpu_layers_bench.sh OUTDIR
set -u
OUT=${1:?usage: scripts/gpu_layers_bench.sh OUTDIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/liger_kernel-*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
$PY scripts/host_overhead.py --out "$OUT/host.json" >"$OUT/host.log" 2>&1
echo "host overhead: exit $?"
TRITON_PRINT_AUTOTUNING=1 timeout "${BENCH_TIMEOUT:-450}" $PY -m triformers.benchmarks.layers \
    --out "$OUT/layers.json" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
echo "benchmark: exit $?"
grep -v "^{" "$OUT/host.log" | head -30
[ -f "$OUT/layers.json" ] && $PY -m triformers.benchmarks.layers --summary "$OUT/layers.json" | tail -48
