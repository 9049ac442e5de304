"""How low the host time of a Triton op's forward + backward can go: RMSNorm at M=16384, N=1024 (bf16).

    PYTHONPATH=src python scripts/host_floor.py

Times, per call, the host's issue time (a loop synchronised once at the end) and the benchmark's
``do_bench`` time of forward + backward for: eager torch, ``triformers.ops.rms_norm``, the same autograd
Function called directly (no argument checks), and a minimal Function that allocates and calls the compiled
kernels' C launchers with nothing else (the floor for a Python ``autograd.Function`` with these kernels).
Then the cost of the primitives the ops are made of, and a cProfile of ``rms_norm`` forward + backward
(autograd on the calling thread, so that the profile sees the backward).
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch
import torch.nn.functional as F
import triton
from host_overhead import _noop, per_call_us  # scripts/ is on sys.path
from triton.testing import do_bench

import triformers._triton as T
from triformers.ops.rmsnorm import _RMSNormFn, rms_norm
from triformers.triton._kernels import norm, reduce


@triton.jit
def _noop8(a, b, c, d, e, f, g, h, n):
    pass


def entry(kernel):
    """The direct-launcher entry kept for ``kernel`` (its only specialisation in this script)."""
    return next(v for k, v in T._compiled.items() if k[0][0] == id(kernel))


def main() -> None:
    M, N, eps = 16384, 1024, 1e-6
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    torch.autograd.grad(rms_norm(x, w, eps), (x, w), dy)  # tunes and keeps the launch entries
    torch.cuda.synchronize()
    fwd, bwd, red = entry(norm._norm_fwd_kernel), entry(norm._norm_bwd_kernel), entry(reduce._sum_rows_kernel)
    ((fwd_cfg, _, _),) = [v for k, v in norm._fwd._chosen.items() if k[0] == N]
    block_n, programs, _ = norm._bwd_plan(M, N, torch.cuda.get_device_properties(0).multi_processor_count)
    stream = torch._C._cuda_getCurrentRawStream
    grid_fwd = T.cdiv(M, fwd_cfg["BLOCK_M"])

    class MinRMS(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            y = torch.empty_like(x)
            rstd = torch.empty(M, device=x.device, dtype=torch.float32)
            run, fn, fixed, tail = fwd
            run(grid_fwd, 1, 1, stream(0), fn, *fixed, x, x, w, y, y, y, rstd, M, N, eps, N, 1, N, 1, N, *tail)
            ctx.save_for_backward(x, w, rstd)
            return y

        @staticmethod
        def backward(ctx, dy):
            x, w, rstd = ctx.saved_tensors
            dx = torch.empty_like(x)
            partial = torch.empty((programs, N), device=x.device, dtype=torch.float32)
            run, fn, fixed, tail = bwd
            s = stream(0)
            run(programs, 1, 1, s, fn, *fixed, x, w, dy, dx, rstd, rstd, partial, partial, M, N, N, 1, N, 1, N, N,
                *tail)  # fmt: skip
            dw = torch.empty(N, device=x.device, dtype=w.dtype)
            run, fn, fixed, tail = red
            run(T.cdiv(N, 64), 1, 1, s, fn, *fixed, partial, dw, programs, N, N, *tail)
            return dx, dw

    calls = {
        "eager F.rms_norm": lambda: F.rms_norm(x, (N,), w, eps),
        "triformers rms_norm": lambda: rms_norm(x, w, eps),
        "_RMSNormFn.apply": lambda: _RMSNormFn.apply(x, w, eps, torch.bfloat16),
        "minimal Function": lambda: MinRMS.apply(x, w),
    }
    ref = torch.autograd.grad(F.rms_norm(x.float(), (N,), w.float(), eps), (x, w), dy.float())
    got = torch.autograd.grad(MinRMS.apply(x, w), (x, w), dy)
    errs = [((a.float() - b).norm() / b.norm()).item() for a, b in zip(got, ref)]
    print(f"minimal Function vs float32: relative errors dx {errs[0]:.2e}, dw {errs[1]:.2e}")

    print(f"\n{'M=16384 N=1024 bf16':28s} {'host fw':>8s} {'host fwbw':>10s} {'1 thread':>9s} {'bench fwbw':>11s}")
    for name, f in calls.items():
        fb = lambda f=f: torch.autograd.grad(f(), (x, w), dy)  # noqa: E731
        host_fw, host_fwbw = per_call_us(f), per_call_us(fb)
        with torch.autograd.set_multithreading_enabled(False):
            one = per_call_us(fb)
        bench = do_bench(fb, warmup=10, rep=200) * 1e3
        print(f"{name:28s} {host_fw:8.1f} {host_fwbw:10.1f} {one:9.1f} {bench:9.1f} us")

    # Time spent inside the Function's own forward and backward bodies, with the backward on autograd's
    # device thread (the default) and on the calling thread: what the thread switch itself costs.
    spent = {"forward": [], "backward": []}
    originals = {name: getattr(_RMSNormFn, name) for name in spent}

    def timed(name):
        body = originals[name]

        def run(ctx, *args):
            t0 = time.perf_counter()
            out = body(ctx, *args)
            spent[name].append(time.perf_counter() - t0)
            return out

        return staticmethod(run)

    fb = lambda: torch.autograd.grad(rms_norm(x, w, eps), (x, w), dy)  # noqa: E731
    for name in spent:
        setattr(_RMSNormFn, name, timed(name))
    try:
        for threads in (True, False):
            with torch.autograd.set_multithreading_enabled(threads):
                for _ in range(50):
                    fb()
                torch.cuda.synchronize()
                for v in spent.values():
                    v.clear()
                t0 = time.perf_counter()
                for _ in range(500):
                    fb()
                torch.cuda.synchronize()
                total = (time.perf_counter() - t0) / 500 * 1e6
            body = {k: sorted(v)[len(v) // 2] * 1e6 for k, v in spent.items()}
            print(
                f"rms_norm fwbw, backward on {'the device thread' if threads else 'the calling thread'}: "
                f"{total:.1f} us per call, forward body {body['forward']:.1f} us, backward body "
                f"{body['backward']:.1f} us (medians)"
            )
    finally:
        for name, f in originals.items():
            setattr(_RMSNormFn, name, staticmethod(f))

    t = torch.empty(4, device="cuda")
    run, fn, fixed, tail = red
    T.launch(_noop, (1,), (t, 4), {"BLOCK": 16})
    T.launch(_noop, (1,), (t, 4), {"BLOCK": 16})
    T.launch(_noop8, (1,), (t,) * 8 + (4,), {})
    T.launch(_noop8, (1,), (t,) * 8 + (4,), {})
    run1, fn1, fixed1, tail1 = entry(_noop)
    run8, fn8, fixed8, tail8 = entry(_noop8)
    p = t.data_ptr()  # the launcher takes an int as the address itself: no data_ptr() call, no driver check
    prims = {
        "torch.empty(cuda)": lambda: torch.empty(M, device=x.device, dtype=torch.float32),
        "torch.empty_like": lambda: torch.empty_like(x),
        "x.data_ptr()": x.data_ptr,
        "x.stride(0)": lambda: x.stride(0),
        "x.shape": lambda: x.shape,
        "torch.cuda.current_device()": torch.cuda.current_device,
        "current raw stream": lambda: stream(0),
        "is_autocast_enabled('cuda')": lambda: torch.is_autocast_enabled("cuda"),
        "is_grad_enabled()": torch.is_grad_enabled,
        "C launcher, 5 args": lambda: run(1, 1, 1, stream(0), fn, *fixed, t, t, 0, 0, 0, *tail),
        "T.launch (key + C launcher)": lambda: T.launch(
            reduce._sum_rows_kernel, (1,), (t, t, 0, 0, 0), {"BLOCK_P": 32, "BLOCK_N": 64, "num_warps": 4}),
        "sum_rows (alloc + launch)": lambda: reduce.sum_rows(t.view(1, 4), torch.float32),
        "launch key, 15 args": lambda: T._key((x, x, w, x, x, x, x, M, N, eps, N, 1, N, 1, N)),
        # the launcher checks every pointer with the driver: the difference is 7 pointers' worth
        "C launcher, no-op, 1 pointer": lambda: run1(1, 1, 1, stream(0), fn1, *fixed1, t, 4, *tail1),
        "C launcher, no-op, 8 pointers": lambda: run8(1, 1, 1, stream(0), fn8, *fixed8, *(t,) * 8, 4, *tail8),
        "C launcher, no-op, 8 pointers as ints": lambda: run8(1, 1, 1, stream(0), fn8, *fixed8, *(p,) * 8, 4, *tail8),
        "T.launch no-op 8 pointers, dyn_key": lambda: T.launch(_noop8, (1,), (t,) * 8 + (4,), {}, None, (4,)),
    }  # fmt: skip
    print()
    for name, f in prims.items():
        print(f"{name:30s} {per_call_us(f, 5000):7.2f} us")

    with torch.autograd.set_multithreading_enabled(False):
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(500):
            fb()
        pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
