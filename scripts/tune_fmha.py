"""Sweep launch configurations of the attention kernels on the GPU and print the fastest per key.

    PYTHONPATH=src python scripts/tune_fmha.py [--out OUTDIR] [--dims 64,128] [--quick]

bf16, B * N = 16384 tokens, H = 2048 / D, causal and not. The chosen entries go into
``src/triformers/ops/fmha/_triton/configs.py`` and the numbers into ``benchmarks/NOTES.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.testing

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha._triton import configs
from triformers.ops.fmha._triton.configs import Config

# Spill-free candidates per (direction, D), from compiling every configuration for sm90 on the CPU and
# reading ptxas's register report (see configs.py); spilling ones are not worth GPU time.
_SPILL_FREE = {
    ("fwd", 64): [(64, 64, 4), (64, 128, 8), (128, 32, 8), (128, 64, 8), (128, 128, 8)],
    ("fwd", 128): [(64, 64, 4), (64, 64, 8), (128, 32, 8), (128, 64, 8), (128, 128, 8)],
    ("bwd", 64): [(16, 128, 8), (32, 64, 8), (32, 128, 8), (64, 64, 8), (64, 128, 8)],
    ("bwd", 128): [(16, 64, 8), (32, 64, 8)],
    ("dq", 64): [(64, 64, 8), (128, 32, 8), (128, 64, 8)],
    ("dq", 128): [(64, 32, 8), (64, 64, 8), (128, 16, 8), (128, 32, 8)],
}


# ``--wide``: the backward also with spilling tiles. Compiling shows that 128-key dK/dV tiles spill at D = 128
# (100-1000 bytes per thread), but the H100 measured them faster than the spill-free small tiles (NOTES).
_WIDE = {
    "bwd": [Config(bm, bn, 8, s) for bm in (32, 64) for bn in (64, 128) for s in (2, 3)]
    + [Config(64, 64, 4, 2), Config(64, 128, 4, 2), Config(128, 128, 8, 2)],
    "dq": [Config(128, 32, 8, 2), Config(128, 64, 8, 2), Config(128, 64, 8, 3), Config(64, 64, 4, 2),
           Config(64, 64, 8, 2), Config(64, 128, 8, 2)],
}
WIDE = False


def _candidates(direction: str, d: int, quick: bool):
    if WIDE and direction in _WIDE:
        return _WIDE[direction]
    stages = {"fwd": (2, 3, 4), "bwd": (1, 2, 3), "dq": (1, 2, 3)}[direction]
    if quick:
        stages = stages[:2] if direction == "fwd" else stages[1:2]
    return [Config(bm, bn, w, s) for bm, bn, w in _SPILL_FREE[(direction, d)] for s in stages]


def sweep(dims, ns, quick: bool, directions=("fwd", "bwd"), causals=(False, True)) -> list[dict]:
    rows = []
    for d in dims:
        h = 2048 // d
        for n in ns:
            b = 16384 // n
            for causal in causals:
                q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                bias = ab.LowerTriangularMask() if causal else None
                flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
                with torch.no_grad():
                    out, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, bias,
                                                                                     op=fmha.triton.FwOp)
                g = torch.randn_like(out)
                for direction in directions:
                    best = None
                    for cfg in _candidates(direction, d, quick):
                        with configs.override(direction, cfg):
                            if direction == "fwd":
                                def fn(q=q, k=k, v=v, bias=bias):
                                    return fmha.memory_efficient_attention_forward(q, k, v, bias, op=fmha.triton.FwOp)
                                mult = 1.0
                            else:
                                def fn(q=q, k=k, v=v, bias=bias, g=g, out=out, lse=lse):
                                    return fmha.memory_efficient_attention_backward(g, out, lse, q, k, v, bias,
                                                                                    op=fmha.triton.BwOp)
                                mult = 2.5
                            try:
                                fn()
                                ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
                            except Exception as e:  # out of resources on this GPU
                                rows.append(dict(direction=direction, D=d, N=n, causal=causal, cfg=cfg.__dict__,
                                                 error=str(e).splitlines()[0][:120]))
                                continue
                        tf = flops * mult / (ms * 1e-3) / 1e12
                        rows.append(dict(direction=direction, D=d, N=n, causal=causal, cfg=cfg.__dict__, ms=ms,
                                         tflops=tf))
                        print(f"  {direction} D={d} N={n} causal={int(causal)} {cfg}: {tf:.0f} TFLOP/s", flush=True)
                        if best is None or ms < best[0]:
                            best = (ms, tf, cfg)
                    print(f"{direction} D={d} N={n} causal={int(causal)}: best {best[2]} {best[1]:.0f} TFLOP/s "
                          f"({best[0]:.3f} ms)", flush=True)
                    if direction == "bwd":
                        # the deterministic backward: dK/dV kernel without atomics + a separate dQ kernel
                        torch.use_deterministic_algorithms(True)
                        try:
                            with configs.override("bwd", best[2]):
                                bestq = None
                                for cfg in _candidates("dq", d, quick):
                                    with configs.override("dq", cfg):
                                        try:
                                            fn()
                                            ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
                                        except Exception:
                                            continue
                                    print(f"  dq {cfg}: {flops * 2.5 / (ms * 1e-3) / 1e12:.0f} TFLOP/s", flush=True)
                                    if bestq is None or ms < bestq[0]:
                                        bestq = (ms, cfg)
                        finally:
                            torch.use_deterministic_algorithms(False)
                        tf = flops * 2.5 / (bestq[0] * 1e-3) / 1e12
                        rows.append(dict(direction="bwd_deterministic", D=d, N=n, causal=causal,
                                         cfg=bestq[1].__dict__, ms=bestq[0], tflops=tf))
                        print(f"bwd_deterministic D={d} N={n} causal={int(causal)}: best dq {bestq[1]} "
                              f"{tf:.0f} TFLOP/s ({bestq[0]:.3f} ms)", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--ns", default="4096")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--wide", action="store_true", help="backward: spilling tiles too")
    ap.add_argument("--directions", default="fwd,bwd")
    ap.add_argument("--causal", default="0,1")
    args = ap.parse_args(argv)
    global WIDE
    WIDE = args.wide
    rows = sweep([int(x) for x in args.dims.split(",")], [int(x) for x in args.ns.split(",")], args.quick,
                 tuple(args.directions.split(",")), tuple(bool(int(c)) for c in args.causal.split(",")))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "tune_fmha.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows},
                                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
