"""Host time of the fused-layer benchmark calls, split into forward and backward, as do_bench runs them.

    PYTHONPATH=src python scripts/host_timeline.py [--cases layernorm:1024,rmsnorm:1024] [--iters 300]

For each case and provider, the forward + backward call of the benchmark is repeated the way
``triton.testing.do_bench`` repeats it (an L2-clearing memset and a start event before each call), with
wall-clock stamps: the forward's host time (the call returning its output), the backward's (``autograd.grad``
returning) and the GPU time from start to end event. Python's garbage collections during the loop are
counted and timed (``gc.callbacks``). Prints medians and 90th percentiles in µs.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from triformers.benchmarks import layers as bench


def _q(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_case(op: str, N: int, provider: str, iters: int, threads: bool) -> str:
    torch.manual_seed(0)
    inputs, fns, _ = bench._memory_case(op, bench.ROWS, N, "cuda")
    own = [t.detach().clone().requires_grad_() for t in inputs]
    fn = fns[provider]
    with torch.no_grad():
        dy = torch.randn_like(fns["torch_eager"](*inputs))
    cache = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    fw, bw = [], []
    collections = []
    t_gc = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            t_gc[0] = time.perf_counter()
        else:
            collections.append((info["generation"], (time.perf_counter() - t_gc[0]) * 1e6))

    with torch.autograd.set_multithreading_enabled(threads):
        for _ in range(20):
            torch.autograd.grad(fn(*own), own, dy)
        torch.cuda.synchronize()
        gc.callbacks.append(on_gc)
        try:
            for i in range(iters):
                cache.zero_()
                starts[i].record()
                t0 = time.perf_counter()
                out = fn(*own)
                t1 = time.perf_counter()
                torch.autograd.grad(out, own, dy)
                t2 = time.perf_counter()
                ends[i].record()
                del out
                fw.append((t1 - t0) * 1e6)
                bw.append((t2 - t1) * 1e6)
            torch.cuda.synchronize()
        finally:
            gc.callbacks.remove(on_gc)
    gpu = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    gcs = f"{len(collections)} gc ({sum(t for _, t in collections):.0f} us)"
    return (f"{op:>16} N={N:5d} {provider:>12} {'threads' if threads else '1 thread':>8}: "
            f"fw {statistics.median(fw):6.1f} (p90 {_q(fw, 0.9):6.1f}) | grad {statistics.median(bw):6.1f} "
            f"(p90 {_q(bw, 0.9):6.1f}) | GPU span {statistics.median(gpu):6.1f} (p90 {_q(gpu, 0.9):6.1f}) | {gcs}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="layernorm:1024,rmsnorm:1024,softmax:1024,layernorm:4096,rmsnorm:4096")
    ap.add_argument("--providers", default="triformers,torch_eager")
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args()
    for case in args.cases.split(","):
        op, N = case.split(":")
        for provider in args.providers.split(","):
            for threads in (True, False):
                print(run_case(op, int(N), provider, args.iters, threads), flush=True)


if __name__ == "__main__":
    main()
