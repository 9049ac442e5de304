#!/usr/bin/env bash
# Split-K decoding variants side by side on one GPU:   scripts/gpu_splitk_ab.sh OUTDIR NAME=DIR:KINDS ...
#   For each variant (DIR: a checkout holding src/, scripts/ and tests/, e.g. `.` or a branch exported with
#   `git archive BRANCH src scripts tests | tar -x -C .ab/NAME`, its commit in .ab/NAME/COMMIT; KINDS: tune_splitk.py's cache kinds, e.g.
#   half,int4) runs that tree's split-K GPU tests, then its `scripts/tune_splitk.py --quick` over KINDS (CUDA
#   graph timing; give `half` to every variant so that each has its bf16 time from the same run). Writes
#   OUTDIR/NAME.log and OUTDIR/NAME.json (two files per variant: four variants fit the 8 files a run returns)
#   and prints, per variant, kind and case, the fastest time and its fraction of a device copy.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_splitk_ab.sh OUTDIR NAME=DIR:KINDS ...}
shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
for spec in "$@"; do
    name=${spec%%=*}; rest=${spec#*=}; dir=${rest%%:*}; kinds=${rest#*:}
    log="$OUT/$name.log"
    (cd "$dir" && { cat COMMIT 2>/dev/null; PYTHONPATH=src python3 -m pytest -m gpu -q -p no:cacheprovider \
        tests/ops/fmha/test_triton_splitk_gpu.py; }) >"$log" 2>&1
    echo "$name tests: $(tail -n 1 "$log")"
    (cd "$dir" && PYTHONPATH=src python3 scripts/tune_splitk.py --quick --kinds "$kinds" --out "$OUT/$name.json") \
        >>"$log" 2>&1 || echo "$name: tune_splitk failed (see $log)"
done
echo
echo "== fastest per variant, kind and case (us, fraction of a copy, BLOCK_N/warps/stages[i: interleaved]); the launch table's entry =="
python3 - "$OUT" "$@" <<'PY'
import json, os, sys

out, specs = sys.argv[1], sys.argv[2:]
for spec in specs:
    name = spec.split("=", 1)[0]
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        print(f"{name}: no results")
        continue
    records = json.load(open(path))["records"]
    best, table = {}, {}
    for r in records:
        key = (r["kind"], r["B"], r["L"])
        if r["correct"] and r["ms"] < best.get(key, {"ms": float("inf")})["ms"]:
            best[key] = r
        if r.get("table") and r["heuristic_split"]:
            table[key] = r
    for (kind, B, L), r in sorted(best.items()):
        cfg = f"{r['block_n']}/{r['num_warps']}/{r['num_stages']}{'i' if r['int4_interleaved'] else ''}"
        own = table.get((kind, B, L))
        own = f"table {own['ms'] * 1e3:7.1f} us" if own and own["correct"] else "table -"
        print(f"{name:10s} {kind:5s} B={B:4d} L={L:6d} {r['ms'] * 1e3:7.1f} us {r['copy_fraction']:.2f} "
              f"({cfg}); {own}")
PY
