"""Host (CPU) time per call of the fused layers and their peers, at a size where the GPU time is negligible.

    PYTHONPATH=src python scripts/host_overhead.py [--out host.json]

Each entry is the wall-clock microseconds per call of a loop of calls, synchronised once at the end, so it is
the time the host needs to issue the work. Prints a table and, with ``--profile``, the top functions of a
cProfile of triformers' RMSNorm forward + backward run on the calling thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def per_call_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        return dy


@triton.jit
def _noop(x_ptr, n, BLOCK: tl.constexpr):
    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    from triformers.ops.rmsnorm import rms_norm
    from triformers.ops.swiglu import silu_mul
    from triformers.triton import dropout, layer_norm, softmax

    dev = "cuda"
    M, N = 64, 256
    x = torch.randn(M, N, device=dev, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(M, N, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(N, device=dev, dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(N, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    res: dict[str, float] = {}

    def fwbw(f, *leaves):
        return lambda: torch.autograd.grad(f(), leaves, dy)

    res["empty torch.empty"] = per_call_us(lambda: torch.empty(M, N, device=dev))
    res["triton noop launch"] = per_call_us(lambda: _noop[(1,)](x, N, BLOCK=16))
    res["x.clone()"] = per_call_us(lambda: x.detach().clone())
    res["identity Function fw"] = per_call_us(lambda: _Identity.apply(x))
    res["identity Function fwbw"] = per_call_us(fwbw(lambda: _Identity.apply(x), x))
    res["eager clone fwbw"] = per_call_us(fwbw(lambda: x.clone(), x))
    res["eager rms_norm fw"] = per_call_us(lambda: F.rms_norm(x, (N,), w, 1e-6))
    res["eager rms_norm fwbw"] = per_call_us(fwbw(lambda: F.rms_norm(x, (N,), w, 1e-6), x, w))
    res["ours rms_norm fw"] = per_call_us(lambda: rms_norm(x, w, 1e-6))
    res["ours rms_norm fwbw"] = per_call_us(fwbw(lambda: rms_norm(x, w, 1e-6), x, w))
    res["ours layer_norm fw"] = per_call_us(lambda: layer_norm(x, w, b, 1e-6))
    res["ours layer_norm fwbw"] = per_call_us(fwbw(lambda: layer_norm(x, w, b, 1e-6), x, w, b))
    res["ours softmax fw"] = per_call_us(lambda: softmax(x))
    res["ours softmax fwbw"] = per_call_us(fwbw(lambda: softmax(x), x))
    res["ours dropout+bias+gelu fw"] = per_call_us(lambda: dropout(x, 0.1, b, "gelu"))
    res["ours dropout+bias+gelu fwbw"] = per_call_us(fwbw(lambda: dropout(x, 0.1, b, "gelu"), x, b))
    res["ours silu_mul fw"] = per_call_us(lambda: silu_mul(x, y))
    res["ours silu_mul fwbw"] = per_call_us(fwbw(lambda: silu_mul(x, y), x, y))
    try:
        from liger_kernel.ops import LigerRMSNormFunction

        res["liger rms_norm fw"] = per_call_us(lambda: LigerRMSNormFunction.apply(x, w, 1e-6))
        res["liger rms_norm fwbw"] = per_call_us(fwbw(lambda: LigerRMSNormFunction.apply(x, w, 1e-6), x, w))
    except ImportError:
        pass
    with torch.autograd.set_multithreading_enabled(False):
        res["identity Function fwbw, 1 thread"] = per_call_us(fwbw(lambda: _Identity.apply(x), x))
        res["eager rms_norm fwbw, 1 thread"] = per_call_us(fwbw(lambda: F.rms_norm(x, (N,), w, 1e-6), x, w))
        res["ours rms_norm fwbw, 1 thread"] = per_call_us(fwbw(lambda: rms_norm(x, w, 1e-6), x, w))
    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "cpu": cpu_name(), "gpu": torch.cuda.get_device_name()}
    print(info)
    for k, v in res.items():
        print(f"{k:40s} {v:8.1f} us")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": info, "us_per_call": res}, f, indent=1)
    if args.profile:
        import cProfile
        import pstats

        f = fwbw(lambda: rms_norm(x, w, 1e-6), x, w)
        with torch.autograd.set_multithreading_enabled(False):
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(500):
                f()
            pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
