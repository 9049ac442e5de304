"""Where the host time of a forward + backward goes when the backward runs on autograd's CUDA thread.

    PYTHONPATH=src python scripts/host_thread_probe.py

Softmax at a size where the GPU time is negligible (M = 64, N = 256), triformers (direct launcher and
Triton's own launch path) against Liger-Kernel: µs per forward + backward with the backward on autograd's
device thread and on the calling thread, and the wall time spent inside each ``backward`` body (timed
by wrapping it), so that the hand-off between threads and the body itself can be told apart.
"""

from __future__ import annotations

import os
import time

import torch
from host_overhead import per_call_us  # scripts/ is on sys.path


def timed_backward(fn_cls, acc):
    inner = fn_cls.backward

    def backward(ctx, *grads):
        t0 = time.perf_counter()
        out = inner(ctx, *grads)
        acc[0] += time.perf_counter() - t0
        acc[1] += 1
        return out

    fn_cls.backward = staticmethod(backward)


def main() -> None:
    import importlib

    from triformers import _triton
    from triformers.triton import softmax

    softmax_mod = importlib.import_module("triformers.triton.softmax")  # the module, not the function

    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    ours_acc, liger_acc = [0.0, 0], [0.0, 0]
    timed_backward(softmax_mod._SoftmaxFn, ours_acc)
    cases = {"triformers": (lambda: softmax(x), ours_acc)}
    try:
        from liger_kernel.ops.softmax import LigerSoftmaxFunction

        timed_backward(LigerSoftmaxFunction, liger_acc)
        cases["liger"] = (lambda: LigerSoftmaxFunction.apply(x), liger_acc)
    except ImportError:
        pass
    for fast in ("1", "0"):
        os.environ["TRIFORMERS_FAST_LAUNCH"] = fast
        _triton._FAST_LAUNCH = None
        for name, (fw, acc) in cases.items():
            if name == "liger" and fast == "0":
                continue
            label = f"{name} (direct launch {'on' if fast == '1' else 'off'})" if name == "triformers" else name
            row = []
            for threads in (True, False):
                acc[0], acc[1] = 0.0, 0
                with torch.autograd.set_multithreading_enabled(threads):
                    total = per_call_us(lambda fw=fw: torch.autograd.grad(fw(), x, g))
                body = acc[0] / max(acc[1], 1) * 1e6
                row.append(f"{total:7.1f} µs (backward body {body:5.1f})")
            fw_only = per_call_us(fw)
            print(f"{label:36s} fw {fw_only:6.1f} µs | fw+bw, CUDA thread: {row[0]} | calling thread: {row[1]}")


if __name__ == "__main__":
    main()
