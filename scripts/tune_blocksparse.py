"""Block-sparse attention on the GPU: where the time goes (kernels against the call) and which tiles to use.

    PYTHONPATH=src python scripts/tune_blocksparse.py --out DIR [--quick] [--host]

bf16, random layouts of 128-blocks (``benchmarks.sparse.make_layout``), B * N = 16384 tokens. Per case: the
call's wall time (``do_bench``) and its CUDA-graph time for ours and flex, the kernels of one forward+backward
(torch.profiler, microseconds per call), then the forward, dK/dV and dQ tiles swept through
``configs.override``. Writes ``DIR/tune_blocksparse.json``; the chosen tiles go into
``ops/fmha/_triton/configs.py`` (block-sparse entries) and the numbers into ``benchmarks/NOTES.md``.

``--host`` adds each provider's host time per call (``host_ms``: the Python call alone, timed over 50 calls
without a sync; the GPU queue keeps the launches waiting) and, for ours, the Python functions that take it
(cProfile and torch.profiler's host-side table, 20 forward+backward calls, ``DIR/host_profile_*.txt``): where a
call's wall time exceeds its kernels'. ``host_parts_ms`` splits ours: the API forward and backward without
autograd, the backward through the engine alone, and the engine's floor (a Function without kernels).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch
import triton.testing

from triformers import _triton
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


def _host_ms(fn, n: int = 50) -> float:
    """Host milliseconds per call of ``fn``: ``n`` calls timed without waiting for the GPU (a sync after)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return host


def _host_profile(fn, path: Path, calls: int = 20) -> None:
    """cProfile of ``calls`` calls of ``fn`` (sorted by own time) into ``path``, then the host side of the same
    calls as torch's profiler sees it (self CPU time per op and CUDA API call: allocations, kernel launches,
    the autograd engine's nodes), which Python's profiler cannot attribute."""
    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as tp:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    table = tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
    path.write_text(buf.getvalue() + f"\n== torch.profiler, host side of {calls} calls (self CPU time)\n" + table)


class _Floor(torch.autograd.Function):
    """The autograd engine's own cost on these inputs: one output and three gradients, no kernels but the
    allocations."""

    @staticmethod
    def forward(ctx, q, k, v):
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, g):
        return torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)


def _host_parts(q, k, v, layout) -> dict:
    """Host ms per call of the pieces of our forward+backward: the API forward and backward without autograd
    (``fw_api``, ``bw_api``: ``memory_efficient_attention_forward`` / ``_backward``), the backward through the
    autograd engine alone (``bw_engine``, a retained graph), and the engine's floor on the same inputs
    (``engine_floor``: a Function without kernels); then the whole forward+backward with tensors handed to
    Triton's C launcher as addresses (``fwbw_raw_args``, ``_triton.RAW_POINTERS``) and as tensors through
    Triton's own launch wrapper (``fwbw_tensor_args``), in alternating rounds."""
    mask = fmha.attn_bias.BlockSparseMask(layout, BLOCK)
    with torch.no_grad():
        out, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, mask, op=fmha.triton.FwOp)
    g = torch.randn_like(out)
    out_g = fmha.memory_efficient_attention(q, k, v, mask, op=(fmha.triton.FwOp, fmha.triton.BwOp))

    def fw_api():
        with torch.no_grad():
            fmha.memory_efficient_attention_forward(q, k, v, mask, op=fmha.triton.FwOp)

    def bw_api():
        fmha.memory_efficient_attention_backward(g, out, lse, q, k, v, mask, op=fmha.triton.BwOp)

    def bw_engine():
        torch.autograd.grad(out_g, (q, k, v), g, retain_graph=True)

    def engine_floor():
        torch.autograd.grad(_Floor.apply(q, k, v), (q, k, v), g)

    parts = {name: _host_ms(fn) for name, fn in
             (("fw_api", fw_api), ("bw_api", bw_api), ("bw_engine", bw_engine), ("engine_floor", engine_floor))}
    fwbw = _provider("triformers", q, k, v, layout, "fwbw", BLOCK)
    def raw_pointers(on: bool) -> None:
        _triton.RAW_POINTERS = on
        _triton._compiled.clear()  # launch entries are rebuilt with the setting (no recompilation)
        _triton._by_dyn_key.clear()

    rounds = {"fwbw_raw_args": [], "fwbw_tensor_args": []}
    for _ in range(3):
        for name, raw in (("fwbw_raw_args", True), ("fwbw_tensor_args", False)):
            raw_pointers(raw)
            rounds[name].append(_host_ms(fwbw))
    raw_pointers(True)
    parts.update({name: min(ts) for name, ts in rounds.items()})
    with warnings.catch_warnings(record=True) as caught:  # any call that waits for the GPU
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fwbw()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    parts["syncs_per_fwbw"] = sum("synchroniz" in str(w.message) for w in caught)
    return parts


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


def run(shapes, sparsities, sweep: bool, host_dir: Path | None = None) -> list[dict]:
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
                    if host_dir is not None:
                        rec[f"{name}_{mode}_host_ms"] = _host_ms(fn)
                        if name == "triformers" and mode == "fwbw" and s == sparsities[-1]:
                            _host_profile(fn, host_dir / f"host_profile_N{N}_D{D}.txt")
            if host_dir is not None:
                rec["host_parts_ms"] = _host_parts(q, k, v, layout)
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
    if "triformers_fw_host_ms" in r:
        print("   host ms/call: " + "; ".join(f"{p} {m} {r[f'{p}_{m}_host_ms']:.3f}" for p in ("triformers", "flex")
                                             for m in ("fw", "fwbw")), flush=True)
    if "host_parts_ms" in r:
        print("   host ms/call, ours in parts: " + "; ".join(f"{n} {t:.3f}" for n, t in r["host_parts_ms"].items()
                                                        if n != "syncs_per_fwbw")
              + f"; syncs per fw+bw {r['host_parts_ms']['syncs_per_fwbw']}",
              flush=True)
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
    ap.add_argument("--host", action="store_true", help="host time per call and a cProfile of ours")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 1
    shapes = SHAPES[:1] if args.quick else SHAPES
    records = run(shapes, SPARSITIES, sweep=not args.quick, host_dir=Path(args.out) if args.host else None)
    out = Path(args.out) / "tune_blocksparse.json"
    out.write_text(json.dumps({"env": env_info(), "records": records}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
