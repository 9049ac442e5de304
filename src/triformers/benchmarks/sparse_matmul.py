"""Block-sparse matmuls and the 2:4 linear against dense, one run (the matmul half of the sparse benchmark).

    python -m triformers.benchmarks.sparse_matmul [--out benchmarks/results/h200/sparse_matmul.json]

Block-sparse products of :class:`~triformers.sparse.BlockSparseTensor` (random layouts, one per head) at sparsities
50/75/90/95 %: ``sdd`` (``masked_matmul``: dense ``[M, K] @ [K, N]`` kept at the layout), ``dsd`` (``S @ D``) and
``dds`` (``D @ S``), by our Triton kernels (``triformers``), the torch path (``torch``) and a dense ``torch.matmul``
of the same operands (``dense``). CUDA defaults: B·H = 16 (one batch, 16 heads), M = N = 4096, K = 64, blocks of 64,
float16; the CPU runs tiny sizes. Then ``F.linear`` with a 2:4 weight (``ops.sp24.sparsify24``, pre-sparsified as in
inference) against the dense weight. Each provider's output is checked before it is timed against a float32 matmul
of the same inputs (``max_rel_err``); the providers of a case are timed in interleaved rounds (``ms`` is the median,
``ms_rounds`` lists the rounds). TFLOP/s count the work each provider does (the sparse ones: stored blocks only;
dense: everything); ``speedup`` = dense ms / provider ms. On CUDA each provider is also timed replaying a CUDA graph
of it (``graph_ms``, ``graph_speedup``): the GPU time alone, without the host time of the Python calls, which at
these sizes (tens of microseconds) can exceed the kernels' own.

``matmul_records(args)`` and ``sp24_records(args)`` return the records (``python -m triformers.benchmarks.sparse``
calls them with its own arguments; missing attributes take the defaults of :func:`defaults`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from triformers.benchmarks._harness import do_bench, env_info, rounds_of, write_results

DEFAULT_OUT = "benchmarks/results/h200/sparse_matmul.json"
SPARSITIES = (0.5, 0.75, 0.9, 0.95)
OPS = ("sdd", "dsd", "dds")
PROVIDERS = ("triformers", "torch", "dense")
# (tokens, in_features, out_features): the LLaMA-7B MLP and attention projections at 16k tokens
SP24_SHAPES = ((16384, 4096, 11008), (16384, 11008, 4096), (16384, 4096, 4096))
ROUNDS = 5  # interleaved timing rounds per case on CUDA
CHECK_TOL = 2e-2  # relative max error vs the dense reference; fp16 rounding of K = 64 sums gives ~1e-3


def defaults(cuda: bool) -> dict:
    """The sizes run on CUDA, and tiny ones for the CPU."""
    if cuda:
        return dict(heads=16, seq=4096, head_dim=64, block=64, dtype="float16", sparsities=SPARSITIES, ops=OPS,
                    providers=PROVIDERS, sp24_shapes=SP24_SHAPES, rounds=ROUNDS)
    return dict(heads=2, seq=512, head_dim=64, block=32, dtype="float32", sparsities=SPARSITIES, ops=OPS,
                providers=("torch", "dense"), sp24_shapes=((256, 256, 256),), rounds=3)


def _opts(args) -> dict:
    opts = defaults(torch.cuda.is_available())
    for key in opts:
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    return opts


@contextmanager
def _backend(provider: str):
    """Force the sparse backend of ``provider`` (``TRIFORMERS_SPARSE_BACKEND``) while timing it."""
    old = os.environ.get("TRIFORMERS_SPARSE_BACKEND")
    os.environ["TRIFORMERS_SPARSE_BACKEND"] = "triton" if provider == "triformers" else "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRIFORMERS_SPARSE_BACKEND", None)
        else:
            os.environ["TRIFORMERS_SPARSE_BACKEND"] = old


def random_layout(heads: int, blocks: int, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """``[heads, blocks, blocks]`` 0/1 with exactly ``round((1 - sparsity)·blocks²)`` ones per head."""
    keep = max(1, round((1.0 - sparsity) * blocks * blocks))
    scores = torch.rand(heads, blocks * blocks, generator=generator)
    layout = torch.zeros(heads, blocks * blocks, dtype=torch.long)
    layout.scatter_(1, scores.topk(keep, dim=1).indices, 1)
    return layout.view(heads, blocks, blocks)


def _bench_graph(fn) -> float | None:
    """Milliseconds of ``fn`` replayed from a CUDA graph (None off CUDA)."""
    if not torch.cuda.is_available():
        return None
    import triton.testing

    with torch.cuda.stream(torch.cuda.Stream()):  # graphs are captured off the default stream
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6))


def _case(op: str, sparsity: float, o: dict, device: str, gen: torch.Generator):
    """The callables of each provider for one case, the dense reference output and the work done."""
    from triformers.sparse import BlockSparseTensor, masked_matmul

    dtype = getattr(torch, o["dtype"])
    H, S, D, bs = o["heads"], o["seq"], o["head_dim"], o["block"]
    layout = random_layout(H, S // bs, sparsity, gen).to(device)
    nnz = int(layout.sum())
    values = torch.randn(1, nnz, bs, bs, device=device, dtype=dtype) / bs**0.5
    sparse = BlockSparseTensor(values, layout)
    dense_s = sparse.to_dense()
    keep = None  # sdd's outputs are compared at the layout's blocks: the dense product and reference masked by them
    if op == "sdd":
        keep = layout.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[None].to(dtype)  # [1, H, S, S]
        a = torch.randn(1, H, S, D, device=device, dtype=dtype)
        b = torch.randn(1, H, D, S, device=device, dtype=dtype)
        sparse_fn, dense_fn = (lambda: masked_matmul(a, b, sparse)), (lambda: torch.matmul(a, b))
        ref_fn = lambda: torch.matmul(a.float(), b.float())  # noqa: E731
    elif op == "dsd":
        d = torch.randn(1, H, S, D, device=device, dtype=dtype)
        sparse_fn, dense_fn = (lambda: sparse @ d), (lambda: torch.matmul(dense_s, d))
        ref_fn = lambda: torch.matmul(dense_s.float(), d.float())  # noqa: E731
    else:
        d = torch.randn(1, H, D, S, device=device, dtype=dtype)
        sparse_fn, dense_fn = (lambda: d @ sparse), (lambda: torch.matmul(d, dense_s))
        ref_fn = lambda: torch.matmul(d.float(), dense_s.float())  # noqa: E731
    flops_sparse, flops_dense = 2.0 * nnz * bs * bs * D, 2.0 * H * S * S * D
    return sparse_fn, dense_fn, ref_fn, keep, nnz, flops_sparse, flops_dense


def matmul_records(args) -> list[dict]:
    """Records ``{op, sparsity, provider, ms, tflops, speedup, max_rel_err, shape fields}`` of sdd/dsd/dds."""
    o = _opts(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    records = []
    for op in o["ops"]:
        for sparsity in o["sparsities"]:
            sparse_fn, dense_fn, ref_fn, keep, nnz, f_sparse, f_dense = _case(op, sparsity, o, device, gen)
            shape = dict(batch=1, heads=o["heads"], M=o["seq"], N=o["seq"], K=o["head_dim"], block=o["block"],
                         dtype=o["dtype"], nnz_blocks=nnz)
            # float32 from the same fp16/bf16 inputs: every provider's rounding shows
            want = ref_fn() if keep is None else ref_fn() * keep
            times, fns, recs = {}, {}, {}
            for provider in o["providers"]:
                rec = recs[provider] = dict(op=op, sparsity=sparsity, provider=provider, **shape)
                try:
                    if provider == "dense":
                        fn, flops = dense_fn, f_dense
                        err = _rel_err(fn() if keep is None else fn() * keep, want)
                    else:
                        fn, flops = sparse_fn, f_sparse
                        with _backend(provider):
                            out = fn()
                            err = _rel_err(out.to_dense() if op == "sdd" else out, want)
                    if err > CHECK_TOL:
                        raise AssertionError(f"max relative error {err:.3g} vs the dense reference")
                    rec.update(max_rel_err=err, flops=flops)
                    fns[provider] = fn
                except Exception as e:  # a failing provider becomes an error record; the others still run
                    rec["error"] = f"{type(e).__name__}: {e}"
            for provider, rounds in rounds_of(fns, o["rounds"], context=_backend).items():
                rec = recs[provider]
                if isinstance(rounds, str):
                    rec["error"] = rounds
                    continue
                ms = statistics.median(rounds)
                times[provider] = ms
                rec.update(ms=ms, tflops=rec["flops"] / ms / 1e9, ms_rounds=[round(t, 5) for t in rounds])
                with _backend(provider):
                    graph_ms = _bench_graph(fns[provider])
                if graph_ms is not None:
                    times[provider + "_graph"] = graph_ms
                    rec["graph_ms"] = graph_ms
            for rec in recs.values():
                rec.pop("flops", None)
                records.append(rec)
            for rec in records[-len(o["providers"]):]:
                if "ms" in rec and "dense" in times:
                    rec["speedup"] = times["dense"] / rec["ms"]
                if "graph_ms" in rec and "dense_graph" in times:
                    rec["graph_speedup"] = times["dense_graph"] / rec["graph_ms"]
    return records


def sp24_records(args) -> list[dict]:
    """Records of ``F.linear`` with a dense weight (``dense``) and a 2:4 weight (``triformers``)."""
    from triformers.ops.sp24 import sparsify24

    o = _opts(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, o["dtype"])
    records = []
    for tokens, fin, fout in o["sp24_shapes"]:
        x = torch.randn(tokens, fin, device=device, dtype=dtype)
        w = torch.randn(fout, fin, device=device, dtype=dtype) / fin**0.5
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            w24 = sparsify24(w)
            F.linear(x, w24)
        fallback = [str(c.message) for c in caught if "sp24" in str(c.message)]
        want = F.linear(x.float(), w24.to_dense().float())  # float32, like the matmuls' reference
        flops = 2.0 * tokens * fin * fout
        shape = dict(op="linear24", tokens=tokens, in_features=fin, out_features=fout, dtype=o["dtype"])
        providers = (("triformers", lambda x=x, w=w24: F.linear(x, w)), ("dense", lambda x=x, w=w: F.linear(x, w)))
        for provider, fn in providers:
            rec = dict(provider=provider, sparsity=0.5, **shape)
            if provider == "triformers":
                rec["max_rel_err"] = _rel_err(fn(), want)
                if fallback:
                    rec["note"] = fallback[0]
            ms = do_bench(fn)
            rec.update(ms=ms, tflops=flops / ms / 1e9)
            graph_ms = _bench_graph(fn)
            if graph_ms is not None:
                rec["graph_ms"] = graph_ms
            records.append(rec)
        records[-2]["speedup"] = records[-1]["ms"] / records[-2]["ms"]
        records[-1]["speedup"] = 1.0
        if "graph_ms" in records[-1]:
            records[-2]["graph_speedup"] = records[-1]["graph_ms"] / records[-2]["graph_ms"]
            records[-1]["graph_speedup"] = 1.0
    return records


def run(args) -> list[dict]:
    """All records: the block-sparse matmuls, then the 2:4 linear."""
    return matmul_records(args) + sp24_records(args)


def _csv(kind):
    return lambda s: tuple(kind(v) for v in s.split(","))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m triformers.benchmarks.sparse_matmul",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"JSON path (default {DEFAULT_OUT}); the PNG goes beside it")
    ap.add_argument("--heads", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--head-dim", dest="head_dim", type=int)
    ap.add_argument("--block", type=int)
    ap.add_argument("--dtype")
    ap.add_argument("--sparsities", type=_csv(float))
    ap.add_argument("--ops", type=_csv(str))
    ap.add_argument("--providers", type=_csv(str))
    ap.add_argument("--rounds", type=int, help=f"interleaved timing rounds per case (default {ROUNDS} on CUDA)")
    ap.add_argument("--no-sp24", action="store_true", help="skip the 2:4 linear")
    args = ap.parse_args(argv)
    records = matmul_records(args) + ([] if args.no_sp24 else sp24_records(args))
    doc = write_results(args.out, records, env_info())
    for r in records:
        what = f"{r['op']:8s} sparsity={r['sparsity']:.2f} {r['provider']:10s}"
        graph = ""
        if "graph_ms" in r:
            graph = f"  graph {r['graph_ms']:.3f} ms  x{r.get('graph_speedup', float('nan')):.2f}"
        print(what, f"{r['ms']:.3f} ms  x{r.get('speedup', float('nan')):.2f}{graph}" if "ms" in r else r.get("error"))
    try:
        from triformers.benchmarks._plot import plot

        plot(doc, Path(args.out).with_suffix(".png"), title="block-sparse and 2:4 matmuls")
    except ImportError:  # matplotlib is an optional extra
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
