"""Host (CPU) time per call of the fused layers and their peers, at a size where the GPU time is negligible.

    PYTHONPATH=src python scripts/host_overhead.py [--out host.json]

Each entry is the wall-clock microseconds per call of a loop of calls, synchronised once at the end, so it is
the time the host needs to issue the work. Prints a table and, with ``--profile [CASE ...]``, the top functions
of a cProfile of each named case (default: triformers' RMSNorm forward + backward on the calling thread).
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
    ap.add_argument(
        "--profile",
        nargs="*",
        metavar="CASE",
        help="cProfile these cases, named as in the table (none named: ours rms_norm fwbw, 1 thread)",
    )
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
    cases: dict = {}

    def measure(name: str, fn) -> None:
        cases[name] = fn
        res[name] = per_call_us(fn)

    def fwbw(f, *leaves):
        return lambda: torch.autograd.grad(f(), leaves, dy)

    measure("empty torch.empty", lambda: torch.empty(M, N, device=dev))
    measure("triton noop launch", lambda: _noop[(1,)](x, N, BLOCK=16))
    measure("x.clone()", lambda: x.detach().clone())
    measure("identity Function fw", lambda: _Identity.apply(x))
    measure("identity Function fwbw", fwbw(lambda: _Identity.apply(x), x))
    measure("eager clone fwbw", fwbw(lambda: x.clone(), x))
    measure("eager rms_norm fw", lambda: F.rms_norm(x, (N,), w, 1e-6))
    measure("eager rms_norm fwbw", fwbw(lambda: F.rms_norm(x, (N,), w, 1e-6), x, w))
    measure("ours rms_norm fw", lambda: rms_norm(x, w, 1e-6))
    measure("ours rms_norm fwbw", fwbw(lambda: rms_norm(x, w, 1e-6), x, w))
    measure("ours layer_norm fw", lambda: layer_norm(x, w, b, 1e-6))
    with torch.no_grad():
        measure("ours layer_norm fw, no grad", lambda: layer_norm(x, w, b, 1e-6))
        measure("ours rms_norm fw, no grad", lambda: rms_norm(x, w, 1e-6))
    xb = torch.randn(16384, 1024, device=dev, dtype=torch.bfloat16, requires_grad=True)
    wb, bb = (torch.ones(1024, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    measure("ours layer_norm fw, 16384x1024", lambda: layer_norm(xb, wb, bb, 1e-6))
    measure("ours rms_norm fw, 16384x1024", lambda: rms_norm(xb, wb, 1e-6))
    measure("ours layer_norm fw, no bias", lambda: layer_norm(x, w, None, 1e-6))
    measure("ours layer_norm fwbw", fwbw(lambda: layer_norm(x, w, b, 1e-6), x, w, b))
    measure("ours softmax fw", lambda: softmax(x))
    measure("ours softmax fwbw", fwbw(lambda: softmax(x), x))
    measure("ours dropout+bias+gelu fw", lambda: dropout(x, 0.1, b, "gelu"))
    measure("ours dropout+bias+gelu fwbw", fwbw(lambda: dropout(x, 0.1, b, "gelu"), x, b))
    measure("ours silu_mul fw", lambda: silu_mul(x, y))
    measure("ours silu_mul fwbw", fwbw(lambda: silu_mul(x, y), x, y))
    try:
        from liger_kernel.ops import LigerRMSNormFunction

        measure("liger rms_norm fw", lambda: LigerRMSNormFunction.apply(x, w, 1e-6))
        measure("liger rms_norm fwbw", fwbw(lambda: LigerRMSNormFunction.apply(x, w, 1e-6), x, w))
    except ImportError:
        pass
    with torch.autograd.set_multithreading_enabled(False):
        measure("identity Function fwbw, 1 thread", fwbw(lambda: _Identity.apply(x), x))
        measure("eager rms_norm fwbw, 1 thread", fwbw(lambda: F.rms_norm(x, (N,), w, 1e-6), x, w))
        measure("ours rms_norm fwbw, 1 thread", fwbw(lambda: rms_norm(x, w, 1e-6), x, w))
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name(),
    }
    print(info)
    for k, v in res.items():
        print(f"{k:40s} {v:8.1f} us")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": info, "us_per_call": res}, f, indent=1)
    if args.profile is not None:
        import cProfile
        import pstats

        for name in args.profile or ["ours rms_norm fwbw, 1 thread"]:
            print(f"\n== cProfile: {name}, 500 calls")
            with torch.autograd.set_multithreading_enabled(False), torch.set_grad_enabled("no grad" not in name):
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(500):
                    cases[name]()
                pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
