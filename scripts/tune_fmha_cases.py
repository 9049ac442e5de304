"""Sweep the attention kernels' launch configurations on the benchmark's masked cases (GPU).

    PYTHONPATH=src python scripts/tune_fmha_cases.py [--cases bias,window,varlen] [--out OUTDIR]

For each case of ``triformers.benchmarks.fmha`` (same tensors), times the Triton forward per forward
configuration, then the forward + backward per dK/dV configuration (dQ from the table), then per dQ
configuration with the best dK/dV one. Prints TFLOP/s (the benchmark's FLOP count) and writes
``tune_fmha_cases.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton.testing

from triformers.benchmarks import fmha as bench
from triformers.ops import fmha
from triformers.ops.fmha._triton import configs
from triformers.ops.fmha._triton.configs import Config

FWD = [Config(64, 64, 4, 2), Config(64, 64, 4, 3), Config(128, 64, 8, 2), Config(128, 64, 8, 3),
       Config(128, 32, 8, 3), Config(64, 128, 8, 2), Config(128, 64, 4, 3), Config(64, 64, 4, 4), Config(128, 64, 8, 4)]
BWD = [Config(64, 128, 8, 3), Config(32, 128, 8, 3), Config(64, 64, 4, 2), Config(64, 64, 8, 3), Config(32, 64, 8, 3)]
DQ = [Config(128, 64, 8, 3), Config(64, 64, 4, 2), Config(128, 32, 8, 2)]


def _time(fn) -> float:
    fn()
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def sweep(names: list[str]) -> list[dict]:
    rows = []
    op = fmha.TritonFlashAttentionOp
    for c in bench.cases(set(names), quick=False):
        if c.case == "varlen" and c.D != 128:
            continue
        inp = bench.Inputs(c, requires_grad=True)
        leaves = inp.leaves()
        g = torch.randn_like(inp.q)
        flops = c.fw_flops()

        def fw(inp=inp):
            return bench._triformers(inp, op)

        def fwbw(inp=inp, leaves=leaves, g=g):
            return torch.autograd.grad(bench._triformers(inp, op), leaves, g)

        label = f"{c.case} D={c.D}"
        for direction, cands, fn, mult in (("fwd", FWD, fw, 1.0), ("bwd", BWD, fwbw, 3.5)):
            best = None
            for cfg in cands:
                try:
                    with configs.override(direction, cfg):
                        ms = _time(fn)
                except Exception as e:  # out of shared memory on this GPU
                    print(f"  {label} {direction} {cfg}: {type(e).__name__}", flush=True)
                    continue
                tf = mult * flops / (ms * 1e-3) / 1e12
                rows.append(dict(case=c.case, D=c.D, direction=direction, cfg=cfg.__dict__, ms=ms, tflops=tf))
                print(f"  {label} {direction} {cfg}: {tf:.0f} TFLOP/s ({ms:.3f} ms)", flush=True)
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            print(f"{label} {direction}: best {best[1]}", flush=True)
            if direction == "bwd":
                for cfg in DQ:
                    try:
                        with configs.override("bwd", best[1]), configs.override("dq", cfg):
                            ms = _time(fwbw)
                    except Exception as e:
                        print(f"  {label} dq {cfg}: {type(e).__name__}", flush=True)
                        continue
                    tf = 3.5 * flops / (ms * 1e-3) / 1e12
                    rows.append(dict(case=c.case, D=c.D, direction="dq", bwd=best[1].__dict__, cfg=cfg.__dict__,
                                     ms=ms, tflops=tf))
                    print(f"  {label} dq {cfg} (dK/dV {best[1]}): {tf:.0f} TFLOP/s ({ms:.3f} ms)", flush=True)
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="bias,window,varlen")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    rows = sweep(args.cases.split(","))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    doc = {"gpu": torch.cuda.get_device_name(), "rows": rows}
    (Path(args.out) / "tune_fmha_cases.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
