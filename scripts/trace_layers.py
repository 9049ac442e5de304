"""Timeline of fused-layer benchmark calls: where the GPU waits for the host.

    PYTHONPATH=src python scripts/trace_layers.py OUTDIR [--cases layernorm:1024:fwbw,rmsnorm:4096:fwbw]
        [--providers triformers,torch_eager] [--iters 12]

Runs each case's timed call as ``triton.testing.do_bench`` does (an L2-clearing memset, a start event, the
call, an end event) under ``torch.profiler`` and writes one Chrome trace per case and provider into OUTDIR.
Prints, per case, the median over iterations of the time from the start event to the end event on the
GPU, the kernels' busy time inside it and the idle gaps before each kernel: a gap is the GPU waiting for
the host to issue the next kernel.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from triformers.benchmarks import layers as bench


def _kernels(events) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of every GPU kernel and memset among profiler events, in start order."""
    out = []
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0:
            out.append((e.name, e.time_range.start, e.time_range.end))
    return sorted(out, key=lambda k: k[1])


def trace_case(op: str, N: int, mode: str, provider: str, iters: int, outdir: str) -> dict:
    torch.manual_seed(0)
    inputs, fns, _ = bench._memory_case(op, bench.ROWS, N, "cuda")
    own = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.no_grad():
        dy = torch.randn_like(fns["torch_eager"](*inputs))
    run = bench._runner(fns[provider], own, list(range(len(own))), dy, mode)
    cache = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")  # do_bench's L2 clearer
    for _ in range(20):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            cache.zero_()
            torch.cuda._sleep(0)  # a marker kernel: the iteration's start on the GPU
            run()
        torch.cuda.synchronize()
    prof.export_chrome_trace(os.path.join(outdir, f"trace_{op}_{N}_{mode}_{provider}.json"))
    kernels = _kernels(prof.profiler.function_events)
    # split into iterations at the marker kernel (torch.cuda._sleep's spin kernel), which follows the memset
    starts = [i for i, k in enumerate(kernels) if "spin" in k[0].lower()]
    if not starts:
        raise RuntimeError(f"no marker kernel among {sorted({k[0][:60] for k in kernels})}")
    spans, busy, gaps = [], [], []
    for a, b in zip(starts, starts[1:] + [len(kernels)]):
        body = kernels[a + 1 : b - 1] if b < len(kernels) else kernels[a + 1 :]  # minus the next memset
        if not body:
            continue
        t0 = kernels[a][2]  # end of the marker: where do_bench's start event would sit
        spans.append(body[-1][2] - t0)
        busy.append(sum(k[2] - k[1] for k in body))
        prev, g = t0, []
        for name, s, e in body:
            g.append((name[:40], round(s - prev, 1)))
            prev = e
        gaps.append(g)
    return {"span": statistics.median(spans), "busy": statistics.median(busy), "gaps": gaps[len(gaps) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--cases", default="layernorm:1024:fwbw,rmsnorm:1024:fwbw,rmsnorm:4096:fwbw,layernorm:1024:fw")
    ap.add_argument("--providers", default="triformers,torch_eager")
    ap.add_argument("--iters", type=int, default=12)
    args = ap.parse_args()
    os.makedirs(args.outdir, exist_ok=True)
    for case in args.cases.split(","):
        op, N, mode = case.split(":")
        for provider in args.providers.split(","):
            r = trace_case(op, int(N), mode, provider, args.iters, args.outdir)
            gaps = ", ".join(f"{name} after {gap} us" for name, gap in r["gaps"])
            print(f"{op} N={N} {mode} {provider}: span {r['span']:.1f} us, kernels busy {r['busy']:.1f} us | {gaps}")


if __name__ == "__main__":
    main()
