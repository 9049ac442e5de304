#!/usr/bin/env bash
# Long Range Arena at the paper's schedule, in jobs of a few minutes:   scripts/gpu_lra.sh OUTDIR [SECONDS] [ARGS...]
#   Trains `--preset paper --tasks pathfinder32` (or what ARGS say: they are passed to the benchmark after the
#   defaults) through torch.compile for SECONDS (default 420) of training, resuming from and saving to
#   lra_checkpoints/ (one checkpoint per task and attention), then packs that folder into OUTDIR/lra_checkpoints.tgz
#   for the next job. The benchmark exits 0 when every (task, attention) has finished (OUTDIR/lra.json holds all
#   records; finished ones are re-read from their checkpoints, not trained again) and 3 when it stopped at the
#   time limit. Unpack the tar in the checkout and run again until it exits 0. Prints the log's last lines.
#   CONCURRENT=dense,blocksparse,...: one process per attention on the same GPU at once (logs OUTDIR/lra_NAME.log);
#   when all have finished, one more pass collects their records into OUTDIR/lra.json. Their tokens/s are then
#   measured while sharing the GPU, not alone.
# Run from the repository root on a CUDA machine (src/ goes on PYTHONPATH).
set -u
OUT=${1:?usage: scripts/gpu_lra.sh OUTDIR [SECONDS] [ARGS...]}
SECONDS_LIMIT=${2:-420}
shift $(( $# >= 2 ? 2 : 1 ))
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRIFORMERS_COMMIT=${TRIFORMERS_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
ls -l lra_checkpoints 2>/dev/null | tee "$OUT/checkpoints_before.txt"
LRA=($PY -m triformers.benchmarks.lra --preset paper --tasks pathfinder32 --compile --checkpoint-dir lra_checkpoints
     --no-progress)
if [ -n "${CONCURRENT:-}" ]; then
    pids=()
    for name in ${CONCURRENT//,/ }; do
        "${LRA[@]}" --time-limit "$SECONDS_LIMIT" --out "$OUT/lra_$name" "$@" --attentions "$name" \
            >"$OUT/lra_$name.log" 2>&1 &
        pids+=($!)
    done
    rc=0
    for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
    for name in ${CONCURRENT//,/ }; do echo "== $name"; tail -3 "$OUT/lra_$name.log"; done
    if [ "$rc" = 0 ]; then  # all finished: their records from the checkpoints, in one file
        "${LRA[@]}" --out "$OUT/lra" "$@" --attentions "$CONCURRENT" >"$OUT/lra.log" 2>&1
        rc=$?
    fi
else
    "${LRA[@]}" --time-limit "$SECONDS_LIMIT" --out "$OUT/lra" "$@" >"$OUT/lra.log" 2>&1
    rc=$?
fi
tar czf "$OUT/lra_checkpoints.tgz" lra_checkpoints 2>/dev/null
tail -25 "$OUT/lra.log" 2>/dev/null
echo "lra: exit $rc (0 = all finished, 3 = stopped at the time limit: unpack $OUT/lra_checkpoints.tgz and run again)"
exit $rc
