"""Kernel-level profile of attention benchmark cases on the GPU: where each provider's time goes.

    PYTHONPATH=src python scripts/profile_fmha.py [--cases gqa,varlen] [--modes fwbw] [--providers a,b]

For each case of ``triformers.benchmarks.fmha`` (same inputs) and provider: the ``do_bench`` median, then a
``torch.profiler`` trace of a few calls summarised as GPU time per call (sum of kernel times), the kernels
that take it, and the wall time per call of the same loop synchronised once (host-bound calls show a wall
time above their GPU time).
"""

from __future__ import annotations

import argparse
import time

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from triformers.benchmarks import fmha as bench


def ms_per_call(run, iters: int, until_done: bool) -> float:
    """Milliseconds per call of a loop of ``iters`` calls: until the GPU is done (``until_done``), or until
    the host has issued them (the host's time per call when it runs ahead of the GPU)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        run()
    if until_done:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / iters * 1e3


def kernel_ms_per_call(run, iters: int) -> dict[str, float]:
    """GPU milliseconds per call of each CUDA kernel ``run`` launches, by name (``torch.profiler``)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            run()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name] = kernels.get(ev.name, 0.0) + ev.device_time_total / 1e3 / iters
    return kernels


def print_kernels(kernels: dict[str, float], top: int, indent: int) -> None:
    for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {'':>{indent}}   {v:.4f} ms  {k[:110]}")


def attention_call(fn, inp, g, mode: str) -> None:
    """One benchmark call of ``fn``: the forward without grad (``fw``), or forward and backward of ``g``."""
    if mode == "fw":
        with torch.no_grad():
            fn(inp)
    else:
        fn(inp).backward(g)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="gqa,varlen")
    ap.add_argument("--modes", default="fw,fwbw")
    ap.add_argument("--providers", default="triformers,triformers_triton,sdpa_cudnn,flex")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--top", type=int, default=6)
    args = ap.parse_args()
    for c in bench.cases(set(args.cases.split(",")), quick=False):
        for mode in args.modes.split(","):
            inp = bench.Inputs(c, requires_grad=(mode == "fwbw"))
            g = torch.randn_like(inp.q) if mode == "fwbw" else None
            print(f"\n=== {c.case} D={c.D} N={c.N} {mode}")
            for name in args.providers.split(","):
                try:
                    fn = bench._provider_fn(name, inp)
                except Exception as e:
                    print(f"  {name}: {type(e).__name__}: {e}")
                    continue

                def run(fn=fn, inp=inp, g=g, mode=mode):
                    attention_call(fn, inp, g, mode)

                run()
                ms = triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")
                wall = ms_per_call(run, args.iters, until_done=True)
                kernels = kernel_ms_per_call(run, args.iters)
                print(f"  {name:>18}: do_bench {ms:.4f} ms | GPU {sum(kernels.values()):.4f} ms/call | "
                      f"wall {wall:.4f} ms/call")
                print_kernels(kernels, args.top, 18)
                for leaf in inp.leaves():
                    leaf.grad = None


if __name__ == "__main__":
    main()
