#!/usr/bin/env bash
# GPU check of the inference half:   scripts/gpu_inference.sh OUTDIR [tests|tune|bench|llama|all]...
#   tests  the inference `gpu` tests (KV-cache biases, split-K, partial/merge, rope_padded, Llama) -> gpu_tests.log
#   tune   scripts/tune_splitk.py: split-K configurations and the crossover with the FlashAttention kernel
#          -> tune_splitk.json, tune.log
#   bench  python -m triformers.benchmarks.decode -> decode.json, decode.png, bench.log
#   llama  the Llama example's tokens/s at B = 1 and B = 64 (Llama-3-8B shapes, random weights)
#          -> llama_b1.json, llama_b64.json, llama.log
# Prints a short table last. Run from the repository root on a CUDA machine (src/ goes on PYTHONPATH).
set -u
OUT=${1:?usage: scripts/gpu_inference.sh OUTDIR [tests|tune|bench|llama|all]...}
shift
STEPS=" ${*:-all} "
has() { [[ "$STEPS" == *" $1 "* || "$STEPS" == *" all "* ]]; }
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRIFORMERS_COMMIT=${TRIFORMERS_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
summary=()
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"
if has tests; then
    TESTS=${INFERENCE_TESTS:-"tests/ops/fmha/test_kv_biases_gpu.py tests/ops/fmha/test_triton_splitk_gpu.py
        tests/ops/fmha/test_partial_merge_gpu.py tests/ops/test_rope_padded_gpu.py
        tests/examples/test_llama_inference_gpu.py tests/ops/test_tree_attention_gpu.py
        tests/ops/fmha/test_triton_gpu.py tests/test_launch.py"}
    EXISTING=""
    for t in $TESTS; do [ -f "$t" ] && EXISTING="$EXISTING $t"; done
    TRIFORMERS_CHECK_LAUNCH_KEYS=1 timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -m gpu -n "${JOBS:-4}" \
        -p no:cacheprovider -W ignore::DeprecationWarning $EXISTING >"$OUT/gpu_tests.log" 2>&1
    summary+=("gpu tests: exit $? ($(tail -1 "$OUT/gpu_tests.log"))")
    grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -30
fi
if has tune; then
    timeout "${TUNE_TIMEOUT:-240}" $PY scripts/tune_splitk.py --out "$OUT/tune_splitk.json" ${TUNE_ARGS:-} \
        >"$OUT/tune.log" 2>&1
    summary+=("tune: exit $?")
    timeout "${CROSSOVER_TIMEOUT:-90}" $PY scripts/tune_splitk.py --crossover --out "$OUT/crossover.json" \
        >"$OUT/crossover.log" 2>&1
    summary+=("crossover: exit $?")
    tail -n 30 "$OUT/tune.log"
    tail -n 12 "$OUT/crossover.log"
fi
if has bench; then
    timeout "${BENCH_TIMEOUT:-420}" $PY -m triformers.benchmarks.decode --out "$OUT" ${BENCH_ARGS:-} \
        >"$OUT/bench.log" 2>&1
    summary+=("decode benchmark: exit $?")
    [ -f "$OUT/decode.json" ] && $PY -m triformers.benchmarks.decode --summary "$OUT/decode.json" | tail -n 12
fi
if has llama; then
    for B in 1 64; do
        timeout "${LLAMA_TIMEOUT:-150}" $PY examples/llama_inference/generate.py --preset llama3-8b --batch "$B" \
            --out "$OUT/llama_b$B.json" ${LLAMA_ARGS:-} >>"$OUT/llama.log" 2>&1
        summary+=("llama B=$B: exit $?")
    done
    tail -n 20 "$OUT/llama.log"
fi
echo
echo "== summary =="
for s in "${summary[@]}"; do echo "$s"; done
