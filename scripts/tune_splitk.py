"""Tune the split-K decoding kernel (``fmha.triton_splitk``) on a GPU, or compile its candidates without one.

    PYTHONPATH=src python scripts/tune_splitk.py --out tune_splitk.json [--quick] [--kinds half,paged,int4,fp8]
    PYTHONPATH=src python scripts/tune_splitk.py --crossover --out crossover.json
    PYTHONPATH=src python scripts/tune_splitk.py --compile-only 90 [--sass]  # no GPU needed

Sweep (bf16, Hq=32, Hkv=8, D=128, one query per sequence, the decoding benchmark's (B, L) cases): for every
cache kind and candidate (BLOCK_N, num_warps, num_stages, split_k) it first checks the output against a float32
reference over the (dequantized) cache, then times it with ``triton.testing.do_bench_cudagraph`` (GPU time of
a captured call, as a decoding step replayed from a CUDA graph; ``--eager``: ``do_bench``, host time included
where the GPU outruns it); it prints the fastest per
case with its bandwidth (cache bytes / time) and fraction of a device copy of as many bytes, and the one
configuration per cache kind closest to the best on every case (the entry for ``CONFIGS`` in
``ops/fmha/_triton/splitk_launch.py``), with how far the split heuristic is from the best split.

``--crossover`` times split-K against ``fmha.triton.FwOp`` for Mq in 1..64 queries per sequence (causal from
the bottom right) at a few (B, L), and prints the largest Mq at which split-K wins everywhere: the value for
``SPLITK_MAX_Q`` in ``ops/fmha/dispatch.py``.

``--compile-only ARCH`` compiles every candidate for ``sm_ARCH`` with Triton's bundled ptxas and prints registers,
spills and shared memory (what a candidate costs before any GPU time is spent).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

if "--compile-only" in sys.argv:  # real JIT functions, launched through kernel[grid] (which compiles here)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRIFORMERS_FAST_LAUNCH"] = "0"

import torch  # noqa: E402

from triformers.ops.fmha import attn_bias as ab  # noqa: E402
from triformers.ops.fmha import quantize  # noqa: E402
from triformers.ops.fmha import triton_splitk as sk  # noqa: E402
from triformers.ops.fmha._triton.splitk_launch import config_for  # noqa: E402
from triformers.ops.fmha.common import Inputs  # noqa: E402

HQ, HKV, D = 32, 8, 128
CASES = [(1, 131072), (4, 32768), (16, 8192), (64, 2048), (256, 512)]
KINDS = ("half", "paged", "int4", "fp8")
PAGE_SIZE = 256
CANDIDATES = [(bn, w, s) for bn in (32, 64, 128) for w in (2, 4, 8) for s in (1, 2, 3, 4)]
QUICK = [(64, 4, 2), (64, 8, 2), (128, 4, 2), (128, 8, 2), (32, 4, 3)]
SPLIT_FACTORS = (1.0,)  # split_k candidates: the heuristic's value times these (--splits 0.5,1,2)
CROSSOVER_Q = (1, 2, 4, 8, 16, 32, 64)
CROSSOVER_CASES = [(1, 32768), (8, 8192), (64, 2048)]


def make_case(kind: str, B: int, L: int, Mq: int = 1, device="cuda", dtype=torch.bfloat16):
    """``(inputs, float32 reference, cache bytes read)`` of a decoding step; K/V ``[B, L, Hkv, 1, D]`` expanded
    over the Hq / Hkv query heads (paged: shuffled pages of PAGE_SIZE in one pool, with a KV-cache bias)."""
    g = torch.Generator(device=device).manual_seed(B * 7 + L)
    q = torch.randn(B, Mq, HKV, HQ // HKV, D, device=device, dtype=dtype, generator=g)
    kb, vb = (torch.randn(B, L, HKV, 1, D, device=device, dtype=dtype, generator=g) for _ in range(2))
    shape = (B, L, HKV, HQ // HKV)
    bias = ab.LowerTriangularFromBottomRightMask() if Mq > 1 else None
    if kind == "int4":
        kq, vq = quantize.quantize_kv_int4(kb), quantize.quantize_kv_int4(vb)
        kb, vb = (quantize.dequantize_kv_int4(x, 1, dtype) for x in (kq, vq))
        inp = Inputs(q, kq.expand(*shape, -1), vq.expand(*shape, -1), bias)
        nbytes = 2 * kq.numel() * 4
    elif kind == "fp8":
        (kq, ks), (vq, vs) = quantize.quantize_kv_fp8(kb), quantize.quantize_kv_fp8(vb)
        kb, vb = quantize.dequantize_kv_fp8(kq, ks, dtype), quantize.dequantize_kv_fp8(vq, vs, dtype)
        inp = sk.InputsFp8(
            q,
            kq.expand(*shape, -1),
            vq.expand(*shape, -1),
            bias,
            k_fp8_scale_shift=ks.expand(shape),
            v_fp8_scale_shift=vs.expand(shape),
        )
        nbytes = 2 * (kq.numel() + ks.numel()) * 4
    elif kind == "paged":
        pages = B * L // PAGE_SIZE
        perm = torch.randperm(pages, device=device, generator=g)
        pools = []
        for x in (kb, vb):
            pool = torch.empty_like(x).view(pages, PAGE_SIZE, HKV, 1, D)
            pool[perm] = x.reshape(pages, PAGE_SIZE, HKV, 1, D)
            pools.append(pool.view(1, B * L, HKV, 1, D).expand(1, B * L, *shape[2:], D))
        paged = ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
            [Mq] * B, [L] * B, perm.view(B, L // PAGE_SIZE).to(torch.int32), PAGE_SIZE, device=device
        )
        inp = Inputs(q.reshape(1, B * Mq, HKV, HQ // HKV, D), *pools, paged)
        nbytes = 2 * kb.numel() * kb.element_size()
    else:
        inp = Inputs(q, kb.expand(*shape, D), vb.expand(*shape, D), bias)
        nbytes = 2 * kb.numel() * kb.element_size()
    ref = _reference(q, kb, vb)
    return inp, ref, nbytes


def _reference(q, kb, vb):
    """float32 attention ``[B, Mq, Hkv, g, D]`` over the logical cache, bottom-right causal when Mq > 1."""
    s = torch.einsum("bmghd,bngd->bghmn", q.float(), kb[:, :, :, 0].float()) * D**-0.5
    Mq, L = q.shape[1], kb.shape[1]
    i, j = torch.arange(Mq, device=q.device)[:, None], torch.arange(L, device=q.device)[None, :]
    s = s.masked_fill(j > i + L - Mq, -math.inf)
    return torch.einsum("bghmn,bngd->bmghd", s.softmax(-1), vb[:, :, :, 0].float())


def _error(out, ref) -> float:
    """Largest error relative to the largest reference value."""
    return float((out.reshape(ref.shape).float() - ref).abs().max() / (ref.abs().max() + 1e-3))


def _close(out, ref) -> bool:
    return _error(out, ref) <= 2e-2


EAGER = False  # --eager: time with do_bench instead of a CUDA graph


def _time(fn) -> float:
    """Milliseconds per call of ``fn``."""
    import triton.testing

    return triton.testing.do_bench(fn) if EAGER else triton.testing.do_bench_cudagraph(fn)


def _copy_ms(nbytes: int) -> float:
    """A device copy of ``nbytes``, timed eagerly: captured in a CUDA graph, torch's copy becomes a memcpy node,
    which ran at two thirds of the eager copy's bandwidth on an H200."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")


def _heuristic_split(inp) -> int:
    bias = inp.attn_bias
    B = inp.query.shape[0] if bias is None else len(bias.q_seqinfo.seqstart_py) - 1
    L = inp.key.shape[1] if bias is None else bias.k_seqinfo.padding
    Mq = inp.query.shape[1] if bias is None else bias.q_seqinfo.max_seqlen
    return sk.FwOp.get_split_k(B, HKV, 1, L, HQ // HKV * Mq)


def _split_candidates(inp, factors=SPLIT_FACTORS) -> list:
    """None (the operator's own split: the heuristic's, sized for fewer programs per SM where the compiled
    kernel leaves room for fewer) and the heuristic's split times each factor other than 1."""
    base = _heuristic_split(inp)
    return [None, *sorted({max(1, min(128, round(base * f))) for f in factors if f != 1.0})]


def sweep(kinds, quick: bool, factors=SPLIT_FACTORS) -> list[dict]:
    records = []
    for kind in kinds:
        variants = (False, True) if kind == "int4" else (None,)  # int4: unpacked or interleaved products
        for B, L in CASES:
            inp, ref, nbytes = make_case(kind, B, L)
            copy_ms = _copy_ms(nbytes)
            err = _error(sk.FwOp.apply(inp, False)[0], ref)
            if err > 2e-2:  # reported, and the sweep goes on: every candidate is checked the same way below
                print(f"{kind} B={B} L={L}: the default launch is off by {err:.3g} of max |ref|", flush=True)
            table = config_for(kind, D, 16)  # first the launch table's own entry, as users get it
            for bn, w, st in [(None, None, None), *(QUICK if quick else CANDIDATES)]:
                for interleaved in variants if bn else (None,):
                    for split in _split_candidates(inp, factors):
                        if bn is None:
                            op = sk.FwOp.get_operator(split)
                            bn_, w_, st_, il = table.block_n, table.num_warps, table.num_stages, table.int4_interleaved
                        else:
                            op = sk.FwOp.get_operator(split, block_n=bn, num_warps=w, num_stages=st,
                                                      int4_interleaved=interleaved)
                            bn_, w_, st_, il = bn, w, st, interleaved
                        rec = dict(kind=kind, B=B, L=L, block_n=bn_, num_warps=w_, num_stages=st_,
                                   int4_interleaved=bool(il), split_k=split or "auto", heuristic_split=split is None,
                                   table=bn is None, maxnreg=table.maxnreg if bn is None else None)
                        try:
                            ok = _close(op.apply(inp, False)[0], ref)
                            ms = _time(lambda op=op, inp=inp: op.apply(inp, False)) if ok else math.inf
                        except Exception as e:  # out of shared memory or registers on this GPU
                            ok, ms, rec["error"] = False, math.inf, str(e).splitlines()[0][:200]
                        rec.update(
                            correct=ok,
                            ms=ms,
                            gbps=nbytes / ms / 1e6 if ok else 0.0,
                            copy_fraction=copy_ms / (2 * ms) if ok else 0.0,  # nbytes / ms against 2 nbytes / copy_ms
                        )
                        records.append(rec)
            case = [r for r in records if r["kind"] == kind and (r["B"], r["L"]) == (B, L)]
            best = min(case, key=lambda r: r["ms"])
            own = next(r for r in case if r["table"] and r["heuristic_split"])
            print(
                f"{kind:5s} B={B:4d} L={L:6d}: best BLOCK_N={best['block_n']} warps={best['num_warps']} "
                f"stages={best['num_stages']} interleaved={best['int4_interleaved']} split={best['split_k']} "
                f"{best['ms'] * 1e3:.1f} us {best['gbps']:.0f} GB/s = {best['copy_fraction']:.2f} of a copy; "
                f"the table's entry {own['ms'] * 1e3:.1f} us",
                flush=True,
            )
    return records


def table_entries(records: list[dict]) -> dict:
    """Per kind, the (BLOCK_N, warps, stages) whose time (with the heuristic split) is closest to each case's
    best, by the worst ratio over the cases."""
    out = {}
    for kind in sorted({r["kind"] for r in records}):
        rows = [r for r in records if r["kind"] == kind]
        best = {}
        for r in rows:
            key = (r["B"], r["L"])
            best[key] = min(best.get(key, math.inf), r["ms"])
        worst = {}
        for r in rows:
            if r["heuristic_split"] and not r.get("table"):  # candidates only: the table's entry is one of them
                cfg = (r["block_n"], r["num_warps"], r["num_stages"], r["int4_interleaved"])
                worst[cfg] = max(worst.get(cfg, 0.0), r["ms"] / best[(r["B"], r["L"])])
        cfg, ratio = min(worst.items(), key=lambda kv: kv[1])
        out[kind] = dict(block_n=cfg[0], num_warps=cfg[1], num_stages=cfg[2], int4_interleaved=cfg[3],
                         worst_ratio_to_best=ratio)
        print(
            f"CONFIGS[({kind!r}, 128, 16)] = Config{cfg}  # within {ratio:.2f}x of the best on every case "
            "(heuristic split)"
        )
    return out


def crossover() -> list[dict]:
    from triformers.ops.fmha import triton as triton_op

    rows = []
    for B, L in CROSSOVER_CASES:
        for Mq in CROSSOVER_Q:
            inp, ref, _ = make_case("half", B, L, Mq)
            times = {}
            for name, op in (("splitk", sk.FwOp), ("triton", triton_op.FwOp)):
                assert _close(op.apply(inp, False)[0], ref), f"{name} wrong at B={B} L={L} Mq={Mq}"
                times[name] = _time(lambda op=op, inp=inp: op.apply(inp, False))
            rows.append(dict(B=B, L=L, Mq=Mq, splitk_ms=times["splitk"], triton_ms=times["triton"]))
            print(
                f"B={B:3d} L={L:6d} Mq={Mq:3d}: split-K {times['splitk'] * 1e3:8.1f} us, "
                f"fmha.triton {times['triton'] * 1e3:8.1f} us",
                flush=True,
            )
    wins = [q for q in CROSSOVER_Q if all(r["splitk_ms"] <= r["triton_ms"] for r in rows if r["Mq"] == q)]
    largest = max([q for q in wins if all(w in wins for w in CROSSOVER_Q if w <= q)], default=0)
    print(f"SPLITK_MAX_Q = {largest}  # split-K at least as fast as fmha.triton for every Mq <= {largest}")
    return rows


def _compile(kernel, args, kwargs, arch: int, label: str, sass: bool = False) -> None:
    """Compiles one launch for sm_ARCH with the specialisation Triton's JIT would give these arguments (16-byte
    divisibility of pointers and ints decides vectorised loads, hence registers) and prints ptxas's report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    from triformers._triton import programs_per_sm, triton_specialization

    sys.path.insert(0, os.path.dirname(__file__))
    from compile_check import _ptxas_report, sass_loop_counts

    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        value = args[i] if i < len(args) else kwargs[p.name]
        spec = ("constexpr", value) if p.is_constexpr else triton_specialization(value)
        if spec[0] == "constexpr":
            signature[p.name], constexprs[p.name] = "constexpr", spec[1]
        else:
            signature[p.name] = spec[0]
            if spec[1]:
                attrs[(i,)] = CUDABackend.parse_attr(spec[1])
    options = {"num_warps": kwargs["num_warps"], "num_stages": kwargs["num_stages"]}
    t0 = time.time()
    try:
        c = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options
        )
        report = f"{_ptxas_report(c.asm['ptx'], arch)} shared={c.metadata.shared}"
        regs = re.search(r"regs=(\d+)", report)
        if regs:  # programs an SM holds at once (the split-K launch sizes its split for min(this, 4))
            report += f" per_sm={programs_per_sm(int(regs[1]), c.metadata.shared, kwargs['num_warps'])}"
        if sass:  # the main loop: instructions per thread, warp-instructions per key, commonest opcodes
            ops = sass_loop_counts(c.asm["cubin"])
            n = sum(ops.values())
            top = ", ".join(f"{op} {k}" for op, k in sorted(ops.items(), key=lambda x: -x[1])[:6])
            report += f" loop={n} ({n * kwargs['num_warps'] / kwargs['BLOCK_N']:.1f} warp-instr/key: {top})"
    except Exception as e:  # reported: a candidate this compiler refuses
        report = "FAIL " + " / ".join(str(e).strip().splitlines()[-6:])[:600]
    print(f"{kernel.__name__} {label:24s} {options} {report} ({time.time() - t0:.1f}s)", flush=True)


def compile_only(arch: int, kinds=KINDS, sass: bool = False) -> None:
    """Compiles the usual candidates of every cache kind for sm_ARCH on this machine (no launch); ``sass``: also
    count the SASS instructions of the kernel's main key loop."""
    from triton.runtime.jit import JITFunction

    from triformers._triton import _AVAILABLE

    _AVAILABLE["triton"] = True
    label = [""]
    JITFunction.__getitem__ = lambda self, grid: (
        lambda *a, **kw: _compile(self, a, kw, arch, label[0], sass) if self.__name__ == "splitk_fwd" else None
    )
    for kind in kinds:
        inp, _, _ = make_case(kind, 4, 1024, device="cpu")
        for bn, w, st in QUICK:
            label[0] = f"{kind} BLOCK_N={bn}"
            sk.FwOp.get_operator(2, block_n=bn, num_warps=w, num_stages=st).apply(inp, False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the records as JSON here")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"cache kinds among {KINDS}")
    ap.add_argument("--quick", action="store_true", help=f"only the {len(QUICK)} usual candidates")
    ap.add_argument("--crossover", action="store_true", help="split-K vs fmha.triton over Mq")
    ap.add_argument("--splits", default="1", help="split counts to try, as factors of the heuristic's (0.5,1,2)")
    ap.add_argument("--eager", action="store_true", help="time with do_bench (host time included), not a graph")
    ap.add_argument("--compile-only", type=int, metavar="ARCH", help="compile for sm_ARCH, no GPU")
    ap.add_argument("--sass", action="store_true", help="with --compile-only: SASS instructions of the main loop")
    args = ap.parse_args(argv)
    global EAGER
    EAGER = args.eager
    if args.compile_only:
        compile_only(args.compile_only, args.kinds.split(","), args.sass)
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (or --compile-only ARCH)", file=sys.stderr)
        return 2
    t0 = time.time()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shapes=dict(Hq=HQ, Hkv=HKV, D=D))
    import triton

    result["triton"] = triton.__version__
    if args.crossover:
        result["crossover"] = crossover()
    else:
        factors = tuple(float(f) for f in args.splits.split(","))
        result["records"] = sweep(args.kinds.split(","), args.quick, factors)
        result["table"] = table_entries(result["records"])
    result["seconds"] = time.time() - t0
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
