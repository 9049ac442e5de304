"""``python -m triformers.demo`` (``make demo``): the main job end to end on this machine's default device.

1. The environment and operator table (``triformers info``).
2. Every attention bias type through ``memory_efficient_attention``, forward and backward, checked against
   the float64 reference.
3. Time and peak memory of ``memory_efficient_attention`` against naive attention at a size where the naive
   ``[Mq, Mkv]`` score matrix hurts.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from triformers import info
from triformers.ops import fmha
from triformers.ops.fmha.attn_bias_utils import ALL_BIAS_TYPES, bias_name, create_inputs
from triformers.ops.fmha.reference import ref_attention


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_every_bias(device: torch.device) -> bool:
    """Forward and all gradients of every bias type against the float64 reference."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    print(f"\n== every attention bias, forward and backward, {dtype} on {device.type}, vs float64 reference ==")
    ok = True
    for bias_type in ALL_BIAS_TYPES:
        inp = create_inputs(bias_type, batch_size=2, q_len=77, kv_len=101, num_heads=4, k=64, dtype=dtype,
                            device=device, requires_grad=True, bias_requires_grad=True, seed=1)
        q, k, v, bias = inp.query, inp.key, inp.value, inp.attn_bias
        normalized = fmha.Inputs(q, k, v, bias)
        op = fmha.dispatch.dispatch_fw(normalized, needs_gradient=True)
        out = fmha.memory_efficient_attention(q, k, v, bias)
        ref, _ = ref_attention(q, k, v, bias)
        tensors = inp.tensors()
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, tensors, g)
        ref_grads = torch.autograd.grad(ref, tensors, g.double())
        errs = [(out.double() - ref).abs().max().item()] + [
            ((a.double() - b.double()).abs().max() / (b.double().abs().max() + 1e-9)).item()
            for a, b in zip(grads, ref_grads)
        ]
        good = all(math.isfinite(e) and e < tol * (1 if i == 0 else 10) for i, e in enumerate(errs))
        ok &= good
        names = ["out"] + ["dq", "dk", "dv", "dbias"][: len(grads)]
        detail = "  ".join(f"{n} {e:.1e}" for n, e in zip(names, errs))
        print(f"  {'ok  ' if good else 'FAIL'} {bias_name(bias_type):55s} [{op.NAME}]  {detail}")
    return ok


def _peak_bytes(device: torch.device, fn) -> tuple[float, float]:
    """(seconds, peak bytes allocated above the start) of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the process's peak RSS (Linux)
        base = _rss_kb("VmRSS:")
    except OSError:
        base = None
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = (_rss_kb("VmHWM:") - base) * 1024 if base is not None else float("nan")
    return seconds, peak


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise OSError(field)


def compare_with_naive(device: torch.device) -> None:
    if device.type == "cuda":
        B, M, H, K, dtype = 1, 16384, 16, 64, torch.bfloat16
    else:
        B, M, H, K, dtype = 1, 4096, 8, 64, torch.float32
    print(f"\n== causal attention, B={B} M={M} H={H} K={K} {dtype}: memory_efficient_attention vs naive ==")
    q, k, v = (torch.randn(B, M, H, K, device=device, dtype=dtype) for _ in range(3))
    bias = fmha.LowerTriangularMask()

    def ours():
        with torch.no_grad():
            return fmha.memory_efficient_attention(q, k, v, bias)

    def naive():
        with torch.no_grad():
            return ref_attention(q, k, v, bias, dtype=None)[0]

    ours()  # warm-up (kernel compilation)
    rows = []
    for name, fn in (("memory_efficient_attention", ours), ("naive (materialized scores)", naive)):
        seconds, peak = _peak_bytes(device, fn)
        rows.append((name, seconds, peak))
    out_a, out_b = ours(), naive()
    err = (out_a.float() - out_b.float()).abs().max().item()
    for name, seconds, peak in rows:
        print(f"  {name:30s} {seconds * 1000:9.1f} ms   peak +{peak / 2**20:9.1f} MiB")
    print(f"  speed-up x{rows[1][1] / rows[0][1]:.1f}, memory /{rows[1][2] / max(rows[0][2], 1):.0f}; "
          f"outputs agree within {err:.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else _device()
    print("== triformers info ==")
    info.main([])
    ok = check_every_bias(device)
    compare_with_naive(device)
    print("\nall bias checks passed" if ok else "\nSOME BIAS CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
