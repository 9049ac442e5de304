"""Kernel-level profile of fused-layer benchmark cases on the GPU: GPU time against wall time per call.

    PYTHONPATH=src python scripts/profile_layers.py [--ops rmsnorm,dropout_bias_act] [--widths 1024,4096]

For each memory-bound op of ``triformers.benchmarks.layers`` (same inputs) and provider: the benchmark's
timing (``do_bench`` median), the GPU time per call from a ``torch.profiler`` trace (sum of kernel times,
with the kernels that take it) and the wall time per call of an unsynchronised loop (the host's issue
rate: above the GPU time, the call is host-bound), also with the backward run on the calling thread.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from triformers.benchmarks import layers as bench


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="rmsnorm,softmax,dropout_bias_act")
    ap.add_argument("--widths", default="1024,4096")
    ap.add_argument("--modes", default="fw,fwbw")
    ap.add_argument("--providers", default="triformers,torch_eager,liger")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--top", type=int, default=4)
    args = ap.parse_args()
    for op in args.ops.split(","):
        for N in map(int, args.widths.split(",")):
            torch.manual_seed(0)
            inputs, fns, _ = bench._memory_case(op, bench.ROWS, N, "cuda")
            leaves = list(range(len(inputs)))
            with torch.no_grad():
                dy = torch.randn_like(fns["torch_eager"](*inputs))
            for mode in args.modes.split(","):
                print(f"\n=== {op} N={N} {mode}")
                for name in args.providers.split(","):
                    fn = fns[name]
                    if isinstance(fn, str):
                        continue
                    own = [t.detach().clone().requires_grad_() for t in inputs]
                    req = [own[i] for i in leaves]
                    if mode == "fw":
                        run = lambda fn=fn, own=own: fn(*own)  # noqa: E731
                    else:
                        run = lambda fn=fn, own=own, req=req, dy=dy: torch.autograd.grad(fn(*own), req, dy)  # noqa: E731
                    ms = bench._time(fn, own, leaves, dy, mode)
                    for _ in range(5):
                        run()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(args.iters):
                        run()
                    t1 = time.perf_counter()
                    torch.cuda.synchronize()
                    host = (t1 - t0) / args.iters * 1e3
                    torch.cuda.synchronize()
                    with torch.autograd.set_multithreading_enabled(False):  # backward on the calling thread
                        t0 = time.perf_counter()
                        for _ in range(args.iters):
                            run()
                        t1 = time.perf_counter()
                    torch.cuda.synchronize()
                    host1 = (t1 - t0) / args.iters * 1e3
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        for _ in range(args.iters):
                            run()
                        torch.cuda.synchronize()
                    kernels = {}
                    for ev in prof.events():
                        if ev.device_type == torch.autograd.DeviceType.CUDA:
                            kernels[ev.name] = kernels.get(ev.name, 0.0) + ev.device_time_total / 1e3 / args.iters
                    gpu = sum(kernels.values())
                    print(f"  {name:>12}: bench {ms:.4f} ms | GPU {gpu:.4f} ms/call | host issue {host:.4f} ms/call"
                          f" ({host1:.4f} with the backward on the calling thread)")
                    for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[: args.top]:
                        print(f"  {'':>12}   {v:.4f} ms  {k[:100]}")


if __name__ == "__main__":
    main()
