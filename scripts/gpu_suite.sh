#!/usr/bin/env bash
# GPU check of the drop-in, sparse, profiler and LRA parts, with the kernels they touch:
#   scripts/gpu_suite.sh OUTDIR [tests|lra|sparse|profile|all]...
#   tests    the `gpu` tests of the FlashAttention kernels (block-sparse masks included), split-K, drop-in
#            (diffusers), xFormers' API claims, profiler and checkpointing -> gpu_tests.log
#   lra      python -m triformers.benchmarks.lra --preset gpu -> lra/lra.json, lra.png, lra.log
#   sparse   python -m triformers.benchmarks.sparse -> sparse.json, sparse.png, sparse.log
#   profile  examples/profile_microGPT.py on CUDA (trace, memory snapshot, module table with MFU) -> profile/
# diffusers is not on every GPU machine: wheels in .whl/ are installed into /tmp/site first when present.
# Prints a short table last. Run from the repository root on a CUDA machine.
set -u
OUT=${1:?usage: scripts/gpu_suite.sh OUTDIR [tests|lra|sparse|profile|all]...}
shift
STEPS=" ${*:-all} "
has() { [[ "$STEPS" == *" $1 "* || "$STEPS" == *" all "* ]]; }
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRIFORMERS_COMMIT=${TRIFORMERS_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
summary=()
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"
pids=()
if has lra; then  # small models: trains beside the tests; its tokens/s are then indicative only
    mkdir -p "$OUT/lra"
    timeout "${LRA_TIMEOUT:-400}" $PY -m triformers.benchmarks.lra --preset gpu --out "$OUT/lra" --no-progress \
        ${LRA_ARGS:-} >"$OUT/lra.log" 2>&1 &
    pids+=($!)
fi
if has tests; then
    TESTS=${SUITE_TESTS:-"tests/ops/fmha/test_block_sparse_mask_gpu.py tests/ops/fmha/test_triton_gpu.py
        tests/ops/fmha/test_triton_splitk_gpu.py tests/dropin tests/api tests/profiler/test_profiler_gpu.py
        tests/test_checkpoint.py tests/sparse/test_sparse_gpu.py"}
    EXISTING=""
    for t in $TESTS; do [ -e "$t" ] && EXISTING="$EXISTING $t"; done
    TRIFORMERS_CHECK_LAUNCH_KEYS=1 timeout "${TEST_TIMEOUT:-360}" $PY -m pytest -q -m gpu -n "${JOBS:-6}" \
        -p no:cacheprovider -W ignore::DeprecationWarning $EXISTING >"$OUT/gpu_tests.log" 2>&1
    summary+=("gpu tests: exit $? ($(tail -1 "$OUT/gpu_tests.log"))")
    grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -30
fi
for p in "${pids[@]}"; do wait "$p"; summary+=("lra: exit $?"); done
[ -f "$OUT/lra.log" ] && grep -E "accuracy|wrote|Error" "$OUT/lra.log" | tail -n 12
if has sparse; then
    timeout "${SPARSE_TIMEOUT:-300}" $PY -m triformers.benchmarks.sparse --out "$OUT" ${SPARSE_ARGS:-} \
        >"$OUT/sparse.log" 2>&1
    summary+=("sparse benchmark: exit $?")
    tail -n 25 "$OUT/sparse.log"
fi
if has profile; then
    timeout "${PROFILE_TIMEOUT:-120}" $PY examples/profile_microGPT.py --out "$OUT/profile" --device cuda --bf16 \
        --emb 768 --heads 12 --layers 12 --block-size 1024 --batch 8 --schedule default >"$OUT/profile.log" 2>&1
    summary+=("profiler: exit $?")
    tail -n 30 "$OUT/profile.log"
fi
echo
echo "== summary =="
for s in "${summary[@]}"; do echo "$s"; done
