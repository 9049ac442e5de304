"""Block-sparse attention on the GPU: where the time goes (kernels against the call) and which tiles to use.

    PYTHONPATH=src python scripts/tune_blocksparse.py --out DIR [--quick]

bf16, random layouts of 128-blocks (``benchmarks.sparse.make_layout``), B * N = 16384 tokens. Per case: the
call's wall time (``do_bench``) and its CUDA-graph time for ours and flex, the kernels of one forward+backward
(torch.profiler, microseconds per call), then the forward, dK/dV and dQ tiles swept through
``configs.override``. Writes ``DIR/tune_blocksparse.json``; the chosen tiles go into
``ops/fmha/_triton/configs.py`` (block-sparse entries) and the numbers into ``benchmarks/NOTES.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton.testing

from triformers.benchmarks._harness import env_info, kernel_us
from triformers.benchmarks.sparse import BLOCK, _provider, make_layout
from triformers.ops import fmha
from triformers.ops.fmha._triton import configs
from triformers.ops.fmha._triton.configs import Config

SHAPES = [(4, 4096, 16, 128), (4, 4096, 32, 64), (1, 16384, 16, 128)]
SPARSITIES = [0.75, 0.9, 0.95]
FWD = [Config(64, 64, 4, 3), Config(128, 64, 8, 3), Config(128, 128, 8, 2), Config(64, 128, 4, 2),
       Config(64, 128, 8, 3), Config(128, 64, 4, 2), Config(128, 32, 8, 3)]
BWD = [Config(32, 128, 8, 3), Config(64, 128, 8, 3), Config(64, 128, 8, 2), Config(128, 128, 8, 2),
       Config(32, 64, 8, 3), Config(64, 64, 4, 2), Config(16, 128, 8, 3)]
DQ = [Config(128, 64, 8, 3), Config(64, 64, 4, 2), Config(128, 128, 8, 2), Config(64, 128, 8, 2)]


def _bench(fn) -> float:
    fn()
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def _graph_ms(fn) -> float | str:
    """Median ms of replaying ``fn`` captured in a CUDA graph, or why it cannot be captured."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return _bench(g.replay)
    except Exception as e:  # a host sync or an allocation the capture refuses
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def _sweep(direction: str, cands, fn) -> list[dict]:
    rows = []
    for cfg in cands:
        with configs.override(direction, cfg):
            try:
                ms = _bench(fn)
            except Exception as e:  # out of resources on this GPU
                rows.append(dict(cfg=cfg.__dict__, error=str(e).splitlines()[0][:120]))
                continue
        rows.append(dict(cfg=cfg.__dict__, ms=ms))
    return rows


def run(shapes, sparsities, sweep: bool) -> list[dict]:
    records = []
    for B, N, H, D in shapes:
        gen = torch.Generator(device="cuda").manual_seed(N + D)
        q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
                   for _ in range(3))
        nb = N // BLOCK
        for s in sparsities:
            layout = make_layout("random", H, nb, s).cuda()
            nnz = int(layout.sum())
            rec = dict(B=B, N=N, H=H, D=D, sparsity=s, nnz_blocks=nnz)
            for name in ("triformers", "flex"):
                for mode in ("fw", "fwbw"):
                    fn = _provider(name, q, k, v, layout, mode, BLOCK)
                    rec[f"{name}_{mode}_ms"] = _bench(fn)
                    rec[f"{name}_{mode}_graph_ms"] = _graph_ms(fn) if mode == "fw" else None
            rec["kernels_fwbw_us"] = kernel_us(_provider("triformers", q, k, v, layout, "fwbw", BLOCK))
            if sweep and s in (0.75, 0.9):
                mask = fmha.attn_bias.BlockSparseMask(layout, BLOCK)
                with torch.no_grad():
                    out, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, mask,
                                                                                     op=fmha.triton.FwOp)
                g = torch.randn_like(out)

                def fw(q=q, k=k, v=v, mask=mask):
                    return fmha.memory_efficient_attention_forward(q, k, v, mask, op=fmha.triton.FwOp)

                def bw(g=g, out=out, lse=lse, q=q, k=k, v=v, mask=mask):
                    return fmha.memory_efficient_attention_backward(g, out, lse, q, k, v, mask, op=fmha.triton.BwOp)

                rec["sweep_fwd"] = _sweep("fwd", FWD, fw)
                rec["sweep_bwd"] = _sweep("bwd", BWD, bw)
                torch.use_deterministic_algorithms(True)  # a separate dQ kernel
                try:
                    rec["sweep_dq_deterministic"] = _sweep("dq", DQ, bw)
                finally:
                    torch.use_deterministic_algorithms(False)
            records.append(rec)
            _print(rec)
        torch.cuda.empty_cache()
    return records


def _best(rows):
    ok = [r for r in rows if "ms" in r]
    return min(ok, key=lambda r: r["ms"]) if ok else None


def _print(r: dict) -> None:
    head = f"B={r['B']} N={r['N']:5d} H={r['H']} D={r['D']:3d} s={r['sparsity']:.2f} nnz={r['nnz_blocks']:6d}"
    ours_f, flex_f, ours_b, flex_b = (r[f"{p}_{m}_ms"] for m in ("fw", "fwbw") for p in ("triformers", "flex"))
    g = r["triformers_fw_graph_ms"]
    gs = f"{g:.3f}" if isinstance(g, float) else "n/a"
    print(f"{head} fw {ours_f:.3f} (graph {gs}) flex {flex_f:.3f} = {flex_f / ours_f:.2f}x | "
          f"fwbw {ours_b:.3f} flex {flex_b:.3f} = {flex_b / ours_b:.2f}x", flush=True)
    top = list(r["kernels_fwbw_us"].items())[:5]
    print("   kernels (us/call): " + "; ".join(f"{n[:60]} {t:.0f}" for n, t in top), flush=True)
    for key in ("sweep_fwd", "sweep_bwd", "sweep_dq_deterministic"):
        if key in r:
            b = _best(r[key])
            cur = r[key][0]
            if b is not None and "ms" in cur:
                print(f"   {key}: table {tuple(cur['cfg'].values())} {cur['ms']:.3f} ms, best "
                      f"{tuple(b['cfg'].values())} {b['ms']:.3f} ms", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true", help="one shape, no sweep")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 1
    shapes = SHAPES[:1] if args.quick else SHAPES
    records = run(shapes, SPARSITIES, sweep=not args.quick)
    out = Path(args.out) / "tune_blocksparse.json"
    out.write_text(json.dumps({"env": env_info(), "records": records}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
