"""How far the fused layers' "all vs torch eager" geomean can go, from a committed benchmark run.

    PYTHONPATH=src python scripts/layers_headroom.py [benchmarks/results/h100/layers.json]

Replaces triformers' time in every memory-bound record by a bound and recomputes the acceptance geomean with
``triformers.benchmarks.layers.summary``: the record's bytes (``_bytes``) at the bandwidth of the copy that
moves as many bytes as its forward, and, for the N = 1024 fw+bw records (host-bound: their kernels take a
fraction of the host time of any Python autograd Function), no faster than torch eager. The GEMM records
keep their measured times (cuBLAS-bound).
"""

from __future__ import annotations

import copy
import json
import sys

from triformers.benchmarks.layers import MEMORY_OPS, _bytes, summary


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/h100/layers.json"
    doc = json.load(open(path))
    env = doc["env"]
    same = {int(k): v for k, v in env["copy_gbps_at_bytes"].items()}
    eager = {(r["op"], r["N"], r["mode"]): r["ms"] for r in doc["records"]
             if r["provider"] == "torch_eager" and "ms" in r}  # fmt: skip
    bound = copy.deepcopy(doc)
    for r in bound["records"]:
        if r["provider"] != "triformers" or "ms" not in r or r["op"] not in MEMORY_OPS:
            continue
        gbps = same.get(_bytes(r["op"], r["M"], r["N"], "fw"), env["copy_gbps"])
        ms = _bytes(r["op"], r["M"], r["N"], r["mode"]) / (gbps * 1e6)
        if r["mode"] == "fwbw" and r["N"] == 1024:
            ms = max(ms, eager[r["op"], r["N"], r["mode"]])
        print(f"{r['op']:>17} N={r['N']:>5} {r['mode']:>4}: {r['ms']:.4f} ms measured, bound {ms:.4f} ms, "
              f"eager {eager[r['op'], r['N'], r['mode']]:.4f} ms")
        r["ms"] = ms
    print(f"{path} (commit {env.get('commit')}): all vs torch eager {summary(doc)['all_vs_torch_eager']:.3f} "
          f"measured, {summary(bound)['all_vs_torch_eager']:.3f} with the bounds")


if __name__ == "__main__":
    main()
