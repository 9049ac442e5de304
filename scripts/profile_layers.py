"""Kernel-level profile of fused-layer benchmark cases on the GPU: GPU time against wall time per call.

    PYTHONPATH=src python scripts/profile_layers.py [--ops rmsnorm,dropout_bias_act] [--widths 1024,4096]

For each memory-bound op of ``triformers.benchmarks.layers`` (same inputs) and provider: the benchmark's
timing (``do_bench`` median), the GPU time per call from a ``torch.profiler`` trace (sum of kernel times,
with the kernels that take it) and the wall time per call of an unsynchronised loop (the host's issue
rate: above the GPU time, the call is host-bound), also with the backward run on the calling thread.
"""

from __future__ import annotations

import argparse

import torch
from profile_fmha import kernel_ms_per_call, ms_per_call, print_kernels  # scripts/ is on sys.path

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
                    host = ms_per_call(run, args.iters, until_done=False)
                    with torch.autograd.set_multithreading_enabled(False):  # backward on the calling thread
                        host1 = ms_per_call(run, args.iters, until_done=False)
                    kernels = kernel_ms_per_call(run, args.iters)
                    print(f"  {name:>12}: bench {ms:.4f} ms | GPU {sum(kernels.values()):.4f} ms/call | "
                          f"host issue {host:.4f} ms/call ({host1:.4f} with the backward on the calling thread)")
                    print_kernels(kernels, args.top, 12)

if __name__ == "__main__":
    main()
