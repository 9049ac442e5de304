#!/usr/bin/env bash
# Long Range Arena at the paper's schedule, in jobs of a few minutes:   scripts/gpu_lra.sh OUTDIR [SECONDS] [ARGS...]
#   Trains `--preset paper --tasks pathfinder32` (or what ARGS say: they are passed to the benchmark after the
#   defaults) through torch.compile for SECONDS (default 420), resuming from and saving to lra_checkpoints/ (one
#   checkpoint per task and attention), then writes each checkpoint gzipped to OUTDIR/ck/ for the next job
#   (`gunzip -c OUTDIR/ck/X.pt.gz > lra_checkpoints/X.pt`). The benchmark exits 0 when every (task, attention)
#   has finished (OUTDIR/lra.json holds all records; finished ones are re-read from their checkpoints, not
#   trained again) and 3 when it stopped at the time limit: run again until it exits 0.
#   CONCURRENT=dense,blocksparse,...: one process per attention on the same GPU at once; when all have
#   finished, one more pass collects their records into OUTDIR/lra.json. On a machine of several GPUs the
#   processes take them in turn (CUDA_VISIBLE_DEVICES); where two share one, their tokens/s are measured while
#   sharing it, not alone: collect the records in a last job alone with `--retime 300` (ARGS), which measures
#   each finished run's tokens/s again. OUTDIR gets at most 8 files: lra.json/.png/.log, gpu.txt, ck/*.pt.gz.
# Run from the repository root on a CUDA machine (src/ goes on PYTHONPATH).
set -u
OUT=${1:?usage: scripts/gpu_lra.sh OUTDIR [SECONDS] [ARGS...]}
SECONDS_LIMIT=${2:-420}
shift $(( $# >= 2 ? 2 : 1 ))
mkdir -p "$OUT/ck"
RUNS=$(mktemp -d)  # per-attention outputs and logs of CONCURRENT jobs
PY=${PYTHON:-python3}
export PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRIFORMERS_COMMIT=${TRIFORMERS_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
ls -l lra_checkpoints 2>/dev/null
LRA=($PY -m triformers.benchmarks.lra --preset paper --tasks pathfinder32 --compile --checkpoint-dir lra_checkpoints
     --no-progress)
if [ -n "${CONCURRENT:-}" ]; then
    pids=()
    gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
    i=0
    for name in ${CONCURRENT//,/ }; do
        CUDA_VISIBLE_DEVICES=$(( i % (gpus > 0 ? gpus : 1) )) "${LRA[@]}" --time-limit "$SECONDS_LIMIT" \
            --out "$RUNS/$name" "$@" --attentions "$name" >"$RUNS/$name.log" 2>&1 &
        pids+=($!)
        i=$((i + 1))
    done
    rc=0
    for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
    for name in ${CONCURRENT//,/ }; do echo "== $name"; tail -4 "$RUNS/$name.log"; done | tee "$OUT/lra.log"
    if [ "$rc" = 0 ]; then  # all finished: their records from the checkpoints, in one file
        "${LRA[@]}" --out "$OUT" "$@" --attentions "$CONCURRENT" >>"$OUT/lra.log" 2>&1
        rc=$?
    fi
else
    "${LRA[@]}" --time-limit "$SECONDS_LIMIT" --out "$OUT" "$@" >"$OUT/lra.log" 2>&1
    rc=$?
fi
for f in lra_checkpoints/*.pt; do [ -e "$f" ] && gzip -1 -c "$f" >"$OUT/ck/$(basename "$f").gz"; done
rm -rf "$RUNS"
tail -12 "$OUT/lra.log"
echo "lra: exit $rc (0 = all finished, 3 = stopped at the time limit: unpack $OUT/ck into lra_checkpoints/, run again)"
exit $rc
