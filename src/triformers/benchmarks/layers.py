"""Fused-layer benchmark: triformers against torch eager, torch.compile and Liger-Kernel, bf16, one run.

    python -m triformers.benchmarks.layers [--out benchmarks/results/h100/layers.json] [--ops rmsnorm,...]
    triformers bench layers [ARGS]

Memory-bound ops at M = 16384 rows x N in {1024, 4096, 8192}: rmsnorm, layernorm, softmax, silu_mul,
dropout_bias_act (p = 0.1, gelu); GEMM ops: the SwiGLU MLP (8192 tokens, D = 4096, H = 11008, no biases)
and FusedLinear + gelu (8192 x 4096 x 4096, bias). Modes ``fw`` (forward of inputs that require grad,
as in training) and ``fwbw`` (forward + backward of a random output gradient). Every provider's output
and gradients are checked against a float32 reference before it is timed; a failure, or a peer without
the op, becomes an ``error`` record. Units: GB/s from the fewest bytes each op must move (formulas in
``_bytes``), TFLOP/s for the GEMM ops. Providers are timed in interleaved rounds (:func:`run`). The JSON
also records the measured device-to-device copy bandwidth, of a 2 GiB copy and of copies moving as many
bytes as each memory-bound forward (its reference: a kernel cannot beat a copy of its own traffic); the
plot and the README table (:func:`markdown_summary`) are generated from the JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from triformers.benchmarks._harness import do_bench, env_info, load_results, write_results
from triformers.benchmarks._layers_summary import (  # noqa: F401  (re-exported)
    GEMM_OPS,
    MEMORY_OPS,
    PROVIDERS,
    REPORTED,
    TARGETS,
    _bytes,
    markdown_summary,
    plot,
    summary,
)

ROWS, WIDTHS = 16384, (1024, 4096, 8192)
SWIGLU = dict(tokens=8192, dim=4096, hidden=11008)
LINEAR = dict(tokens=8192, in_features=4096, out_features=4096)
P_DROP, EPS = 0.1, 1e-6
CHECK_TOL = 2e-2  # relative L2 error vs the float32 reference; bf16 rounding gives ~4e-3
DEFAULT_OUT = "benchmarks/results/h100/layers.json"
ROUNDS = 5  # interleaved timing rounds per case and mode (see run)
REP_MS = 40  # do_bench repetition time per provider and round


def _flops(op: str, mode: str) -> int:
    if op == "swiglu_mlp":
        fw = 6 * SWIGLU["tokens"] * SWIGLU["dim"] * SWIGLU["hidden"]  # x[w1;w2]ᵀ (2·T·D·2H) + g w3ᵀ (2·T·H·D)
    else:
        fw = 2 * LINEAR["tokens"] * LINEAR["in_features"] * LINEAR["out_features"]
    return fw if mode == "fw" else 3 * fw  # backward: two GEMMs per forward GEMM


def _rand(*shape, scale=1.0, shift=0.0, device="cuda", dtype=torch.bfloat16):
    return (torch.randn(*shape, device=device) * scale + shift).to(dtype).requires_grad_()


def _liger(name: str):
    import liger_kernel.ops as lk  # Liger-Kernel 0.8.5 (pure-Python wheel)

    return getattr(lk, name)


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False, fullgraph=True)


def _memory_case(op: str, M: int, N: int, device: str):
    """(inputs, {provider: fn(*inputs) or error string}, float32 reference fn)."""
    from triformers.ops.rmsnorm import rms_norm, rms_norm_reference
    from triformers.ops.swiglu import silu_mul, silu_mul_reference
    from triformers.triton import dropout, layer_norm, softmax
    from triformers.triton.layer_norm import layer_norm_reference
    from triformers.triton.softmax import softmax_reference

    if op == "rmsnorm":
        inputs = [_rand(M, N, device=device), _rand(N, scale=0.1, shift=1.0, device=device)]
        ref = lambda x, w: rms_norm_reference(x, w, EPS)  # noqa: E731
        providers = {
            "triformers": lambda x, w: rms_norm(x, w, EPS),
            "torch_eager": lambda x, w: F.rms_norm(x, (N,), w, EPS),
            "torch_compile": _compiled(lambda x, w: rms_norm_reference(x, w, EPS)),
            "liger": lambda x, w: _liger("LigerRMSNormFunction").apply(x, w, EPS),
        }
    elif op == "layernorm":
        inputs = [
            _rand(M, N, device=device),
            _rand(N, scale=0.1, shift=1.0, device=device),
            _rand(N, scale=0.1, device=device),
        ]
        ref = lambda x, w, b: layer_norm_reference(x, w, b, EPS)  # noqa: E731
        providers = {
            "triformers": lambda x, w, b: layer_norm(x, w, b, EPS),
            "torch_eager": lambda x, w, b: F.layer_norm(x, (N,), w, b, EPS),
            "torch_compile": _compiled(lambda x, w, b: layer_norm_reference(x, w, b, EPS)),
            "liger": lambda x, w, b: _liger("LigerLayerNormFunction").apply(x, w, b, EPS),
        }
    elif op == "softmax":
        inputs = [_rand(M, N, scale=3.0, device=device)]
        ref = softmax_reference
        providers = {
            "triformers": softmax,
            "torch_eager": lambda x: torch.softmax(x, -1),
            "torch_compile": _compiled(lambda x: softmax_reference(x)),
            "liger": lambda x: _liger("LigerSoftmaxFunction").apply(x),
        }
    elif op == "silu_mul":
        inputs = [_rand(M, N, device=device), _rand(M, N, device=device)]
        ref = silu_mul_reference
        providers = {
            "triformers": silu_mul,
            "torch_eager": lambda a, b: F.silu(a) * b,
            "torch_compile": _compiled(lambda a, b: silu_mul_reference(a, b)),
            "liger": lambda a, b: _liger("LigerSiLUMulFunction").apply(a, b),
        }
    else:  # dropout_bias_act
        inputs = [_rand(M, N, device=device), _rand(N, scale=0.1, device=device)]
        ref = lambda x, b: F.gelu(x + b)  # noqa: E731  (checked on the kept elements, see _check)
        eager = lambda x, b: F.dropout(F.gelu(x + b), P_DROP)  # noqa: E731
        providers = {
            "triformers": lambda x, b: dropout(x, P_DROP, b, "gelu"),
            "torch_eager": eager,
            "torch_compile": _compiled(lambda x, b: F.dropout(F.gelu(x + b), P_DROP)),
            "liger": "Liger-Kernel 0.8.5 has no fused dropout + bias + activation op",
        }
    return inputs, providers, ref


def _gemm_case(op: str, device: str):
    from triformers.ops.swiglu import swiglu, swiglu_reference
    from triformers.ops.unbind import unbind
    from triformers.triton.fused_linear import fused_linear

    if op == "swiglu_mlp":
        T, D, H = SWIGLU["tokens"], SWIGLU["dim"], SWIGLU["hidden"]
        x = _rand(T, D, device=device)
        w12 = _rand(2 * H, D, scale=D**-0.5, device=device)
        w3 = _rand(D, H, scale=H**-0.5, device=device)
        w1, w2 = (w.detach().clone().requires_grad_() for w in (w12[:H], w12[H:]))  # separate, as nn.Linear's
        inputs = [x, w12, w3, w1, w2]

        def ours(x, w12, w3, w1, w2):  # what SwiGLU(D, H, bias=False) runs: w1, w2 are views of the packed w12
            a, b = unbind(w12.view(2, H, D), 0)
            return swiglu(x, a, None, b, None, w3, None)

        eager = lambda x, w12, w3, w1, w2: swiglu_reference(x, w1, None, w2, None, w3, None)  # noqa: E731
        compiled = _compiled(lambda x, w1, w2, w3: swiglu_reference(x, w1, None, w2, None, w3, None))

        def liger(x, w12, w3, w1, w2):
            silu_mul = _liger("LigerSiLUMulFunction")  # LigerSwiGLUMLP's forward, on these weights
            return F.linear(silu_mul.apply(F.linear(x, w1), F.linear(x, w2)), w3)

        providers = {
            "triformers": ours,
            "torch_eager": eager,
            "torch_compile": lambda x, w12, w3, w1, w2: compiled(x, w1, w2, w3),
            "liger": liger,
        }
        leaves = {
            "triformers": [0, 1, 2],
            "torch_eager": [0, 2, 3, 4],
            "torch_compile": [0, 2, 3, 4],
            "liger": [0, 2, 3, 4],
        }
        # the float32 reference on the weights each provider differentiates: packed w12, or w1 and w2
        ref = {p: eager for p in providers}
        ref["triformers"] = lambda x, w12, w3, w1, w2: swiglu_reference(x, w12[:H], None, w12[H:], None, w3, None)
    else:
        T, K, N = LINEAR["tokens"], LINEAR["in_features"], LINEAR["out_features"]
        inputs = [
            _rand(T, K, device=device),
            _rand(N, K, scale=K**-0.5, device=device),
            _rand(N, scale=0.1, device=device),
        ]
        eager = lambda x, w, b: F.gelu(F.linear(x, w, b))  # noqa: E731
        providers = {
            "triformers": lambda x, w, b: fused_linear(x, w, b, "gelu"),
            "torch_eager": eager,
            "torch_compile": _compiled(lambda x, w, b: F.gelu(F.linear(x, w, b))),
            "liger": "Liger-Kernel 0.8.5 has no fused linear + activation op",
        }
        leaves = {p: [0, 1, 2] for p in providers}
        ref = {p: eager for p in providers}
    return inputs, providers, ref, leaves


def _rel(a: torch.Tensor, r: torch.Tensor) -> float:
    return ((a.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)).item()


def _check(op: str, fn, ref, inputs, leaves, dy) -> str | None:
    """None if ``fn`` matches the float32 reference (output and gradients of ``leaves``), else why not."""
    ref_in = [t.detach().float().requires_grad_() for t in inputs]  # before fn can touch the inputs
    out = fn(*inputs)
    grads = torch.autograd.grad(out, [inputs[i] for i in leaves], dy.clone())
    if op == "dropout_bias_act":
        from triformers.triton.dropout import dropout_with_keep_mask

        keep = out != 0
        rate = keep.float().mean().item()
        if abs(rate - (1 - P_DROP)) > 0.01:
            return f"keep rate {rate:.4f}, expected {1 - P_DROP}"
        out_ref = dropout_with_keep_mask(ref_in[0], keep, P_DROP, ref_in[1], "gelu")
    else:
        out_ref = ref(*ref_in)
    grads_ref = torch.autograd.grad(out_ref, [ref_in[i] for i in leaves], dy.float())
    errors = {"out": _rel(out, out_ref)}
    errors.update({f"grad{i}": _rel(g, gr) for i, g, gr in zip(leaves, grads, grads_ref)})
    bad = {k: v for k, v in errors.items() if not v <= CHECK_TOL}
    return f"mismatch vs float32 reference (relative L2 error {bad})" if bad else None


def _runner(fn, inputs, leaves, dy, mode: str):
    """The timed call: the forward, or the forward and the gradients of ``leaves``."""
    if mode == "fw":
        return lambda: fn(*inputs)
    req = [inputs[i] for i in leaves]
    return lambda: torch.autograd.grad(fn(*inputs), req, dy)


def _time(fn, inputs, leaves, dy, mode: str) -> float:
    """Median ms of one ``triton.testing.do_bench(warmup=25, rep=100)`` (GPU), for the profiling script."""
    return do_bench(_runner(fn, inputs, leaves, dy, mode), warmup=25, rep=100)


def copy_bandwidth(device: str = "cuda", nbytes: int = 2**32) -> float:
    """GB/s of a device-to-device copy moving ``nbytes`` (read + write; default 2 GiB copied)."""
    src = torch.empty(max(1, nbytes // 4), dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100)
    return 4 * src.numel() / (ms * 1e-3) / 1e9


def memory_fw_bytes(ops, widths, rows: int = ROWS) -> list[int]:
    """The byte counts of the memory-bound forwards (each gets a copy of the same size as its reference)."""
    return sorted({_bytes(op, rows, N, "fw") for op in ops if op in MEMORY_OPS for N in widths})


def run(ops, providers, modes, widths, device="cuda", log=print, on_record=None, rows=ROWS,
        rounds: int = ROUNDS) -> list[dict]:
    """Measure every case. Providers are timed in ``rounds`` interleaved rounds per case and mode (each round
    times every provider once, the order rotated by one per round); ``ms`` is the median of the rounds'
    medians, ``ms_rounds`` lists them."""
    torch._dynamo.config.recompile_limit = 64  # grad-mode switches must never push compile into eager
    torch._dynamo.config.cache_size_limit = 64
    records: list[dict] = []

    def add(rec):
        records.append(rec)
        if on_record:
            on_record(records)
        value = rec.get("gbps", rec.get("tflops"))
        log(
            f"{rec['op']:>18} {rec['mode']:>4} {rec['provider']:>13} M={rec['M']:>5} N={rec['N']:>5} "
            + (f"{rec['ms']:8.4f} ms {value:8.1f}" if "ms" in rec else f"error: {rec['error']}")
        )

    cases = [(op, N) for op in ops if op in MEMORY_OPS for N in widths] + [(op, None) for op in ops if op in GEMM_OPS]
    for op, N in cases:
        torch.manual_seed(0)
        if N is not None:
            inputs, fns, ref = _memory_case(op, rows, N, device)
            ref = {p: ref for p in fns}
            leaves_of = {p: list(range(len(inputs))) for p in fns}
            M = rows
        else:
            inputs, fns, ref, leaves_of = _gemm_case(op, device)
            M = SWIGLU["tokens"] if op == "swiglu_mlp" else LINEAR["tokens"]
            N = SWIGLU["dim"] if op == "swiglu_mlp" else LINEAR["out_features"]
        extra = (
            {"hidden": SWIGLU["hidden"]}
            if op == "swiglu_mlp"
            else ({"K": LINEAR["in_features"]} if op == "fused_linear_gelu" else {})
        )
        dy = None
        problems, owns = {}, {}
        for provider in providers:
            fn, leaves = fns[provider], leaves_of[provider]
            if isinstance(fn, str):
                problems[provider] = fn
                continue
            # Each provider gets its own copy of the inputs: some peers write gradients into them in place.
            own = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
            try:
                if dy is None:
                    with torch.no_grad():
                        dy = torch.randn_like(fns["torch_eager"](*inputs))
                problems[provider] = _check(op, fn, ref[provider], own, leaves, dy)
            except Exception as e:  # a peer that cannot run this case: recorded, not fatal
                problems[provider] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if not problems[provider]:
                owns[provider] = own
        for mode in modes:
            runners = {p: _runner(fns[p], owns[p], leaves_of[p], dy, mode) for p in providers if p in owns}
            for r in runners.values():
                r()  # first-call work (compilation, tuning) stays out of the rounds
            times: dict[str, list[float]] = {p: [] for p in runners}
            order = list(runners)
            for i in range(rounds):
                shift = i % max(1, len(order))
                for p in order[shift:] + order[:shift]:
                    times[p].append(do_bench(runners[p], warmup=10, rep=REP_MS))
            for provider in providers:
                base = {"op": op, "provider": provider, "M": M, "N": N, **extra, "mode": mode}
                if provider not in runners:
                    add({**base, "error": problems[provider]})
                    continue
                ms = statistics.median(times[provider])
                rec = {**base, "ms": ms, "ms_rounds": [round(t, 5) for t in times[provider]]}
                if op in GEMM_OPS:
                    rec["tflops"] = _flops(op, mode) / (ms * 1e-3) / 1e12
                else:
                    rec["gbps"] = _bytes(op, M, N, mode) / (ms * 1e-3) / 1e9
                add(rec)
            del runners
        del inputs, fns, dy, owns
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="triformers bench layers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"JSON path (default {DEFAULT_OUT}); the PNG goes beside it")
    ap.add_argument("--ops", default=",".join(MEMORY_OPS + GEMM_OPS))
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--modes", default="fw,fwbw")
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    ap.add_argument("--summary", metavar="JSON", help="print the markdown summary of an existing run and exit")
    ap.add_argument("--plot", metavar="JSON", help="draw the PNG of an existing run (beside it) and exit")
    args = ap.parse_args(argv)
    if args.plot:
        plot(load_results(args.plot), Path(args.plot).with_suffix(".png"))
        return 0
    if args.summary:
        print(markdown_summary(load_results(args.summary)))
        return 0
    if not torch.cuda.is_available():
        print("triformers bench layers: needs a CUDA GPU", file=sys.stderr)
        return 2
    ops, widths = args.ops.split(","), [int(w) for w in args.widths.split(",")]
    env = {**env_info(), "dtype": "bfloat16", "copy_gbps": copy_bandwidth(),
           "copy_gbps_at_bytes": {str(b): copy_bandwidth(nbytes=b) for b in memory_fw_bytes(ops, widths)}}
    out = Path(args.out)
    start = time.perf_counter()
    records = run(
        ops,
        args.providers.split(","),
        args.modes.split(","),
        widths,
        on_record=lambda recs: write_results(out, recs, {**env, "seconds": time.perf_counter() - start}),
    )
    doc = write_results(out, records, {**env, "seconds": round(time.perf_counter() - start, 1)})
    try:
        plot(doc, out.with_suffix(".png"))
    except ImportError as e:  # matplotlib is an optional extra ("bench")
        print(f"no plot ({e}); `triformers bench layers --plot {out}` draws it later", file=sys.stderr)
    print(markdown_summary(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
