"""Python (host) time per call of the Triton paths, on a machine without a GPU: kernel launches are stubbed out.

    python scripts/host_cpu_stubbed.py [--profile NAME]

Triton's kernels are defined normally (not interpreted), every ``kernel[grid](...)`` returns a compiled kernel
whose launcher does nothing, ``triformers._triton.launch`` takes its direct path as on a GPU, and the ops are
made to take their Triton paths on small CPU tensors. What remains is the Python the
package runs around its kernels: argument checks, allocations, launch plans, autograd. Prints µs per call
(best of 7 batches in each of 3 rounds) for the fused layers and the attention operator, forward and
forward + backward, next to an identity ``autograd.Function`` (the floor autograd itself sets) and a minimal
RMSNorm Function (the floor of a Python Function making RMSNorm's allocations and launcher calls).
``--profile NAME`` prints the top of a cProfile of one case.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions, so that launches can be stubbed
os.environ["TRIFORMERS_AUTOTUNE"] = "0"

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _StubCompiled:
    """What ``kernel[grid](...)`` returns: a compiled kernel whose C launcher does nothing."""

    class run:  # noqa: N801  (the attribute names of Triton's CompiledKernel.run)
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid = launch_pdl = False
        launch = staticmethod(lambda *args: None)

    function, packed_metadata = 0, None


JITFunction.__getitem__ = lambda self, grid: (lambda *args, **kwargs: _StubCompiled)

import triformers.ops.fmha._triton.launch  # noqa: E402, F401  (kernels defined before the switch below)
from triformers.ops import fmha  # noqa: E402
from triformers.ops.rmsnorm import rms_norm  # noqa: E402
from triformers.ops.swiglu import silu_mul  # noqa: E402
from triformers.triton import dropout, layer_norm, softmax  # noqa: E402

# The fused layers take their Triton path on CPU tensors only under the interpreter; with it switched on
# now (after the kernels exist) they do, and `launch` goes through the stubbed `kernel[grid]`. Their path
# check is replaced by the answer it gives CUDA tensors (its CPU branch is slower than the CUDA one).
os.environ["TRITON_INTERPRET"] = "1"
for _module in list(sys.modules.values()):
    if getattr(_module, "__name__", "").startswith("triformers.") and hasattr(_module, "use_triton"):
        _module.use_triton = lambda op, *tensors: True
# ``launch`` takes its direct path, as on a GPU: after the first call of a specialisation it builds the key
# and calls the stub's launcher (``--jit-path``: every launch through the stubbed ``kernel[grid]``).
if "--jit-path" not in sys.argv:
    from triton import knobs  # noqa: E402

    import triformers._triton as _T  # noqa: E402

    _T._FAST_LAUNCH, _T._knobs = True, knobs
    _T._current_device = lambda: 0
    torch.cuda.current_device = lambda: 0  # what older commits of the launcher call
    torch._C._cuda_getCurrentRawStream = lambda device: 0
    _T._cuda_stream = lambda device: 0  # (older commits read torch._C's at each launch)


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _MinimalRMSNorm(torch.autograd.Function):
    """RMSNorm's work as a bare minimum: the allocations and the three launcher calls of ``rms_norm`` with the
    same arguments, no checks, plans or keys (the floor of a Python Function with these kernels)."""

    LAUNCH = staticmethod(lambda *args: None)
    FIXED = (False, False, None, None, None, None, None, None)

    @staticmethod
    def forward(ctx, x, w):
        M, N = x.shape
        y, rstd = torch.empty_like(x), torch.empty(M, device=x.device, dtype=torch.float32)
        F = _MinimalRMSNorm
        F.LAUNCH(4, 1, 1, 0, 0, *F.FIXED, x, x, w, y, y, y, rstd, M, N, 1e-6, N, 1, N, 1, N, 0, 0, 0, 0, 0, 0, 0)
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, rstd = ctx.saved_tensors
        M, N = x.shape
        dx, partial = torch.empty_like(x), torch.empty((8, N), device=x.device, dtype=torch.float32)
        F = _MinimalRMSNorm
        F.LAUNCH(8, 1, 1, 0, 0, *F.FIXED, x, w, dy, dx, rstd, rstd, partial, partial, M, N, N, 1, N, 1, N, N, 0, 0)
        dw = torch.empty(N, device=x.device, dtype=w.dtype)
        F.LAUNCH(4, 1, 1, 0, 0, *F.FIXED, partial, dw, 8, N, N, 0, 0)
        return dx, dw


def per_call_us(fn, n: int = 400) -> float:
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def cases() -> dict:
    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    x, y = rand(64, 256), rand(64, 256)
    w = torch.ones(256, dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(256, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = (rand(2, 128, 4, 64, dtype=torch.float16) for _ in range(3))
    op = fmha.TritonFlashAttentionOp
    q1, k1, v1 = (rand(1, 512, 4, 64, dtype=torch.float16) for _ in range(3))
    packed = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens([64] * 8)
    return {
        "identity Function": (lambda: _Identity.apply(x), (x,)),
        "rms_norm": (lambda: rms_norm(x, w), (x, w)),
        "rms_norm, minimal": (lambda: _MinimalRMSNorm.apply(x, w), (x, w)),
        "layer_norm": (lambda: layer_norm(x, w, b), (x, w, b)),
        "softmax": (lambda: softmax(x), (x,)),
        "silu_mul": (lambda: silu_mul(x, y), (x, y)),
        "dropout+bias+gelu": (lambda: dropout(x, 0.1, b, "gelu"), (x, b)),
        "attention (triton op)": (lambda: fmha.memory_efficient_attention(q, k, v, op=op), (q, k, v)),
        "attention, 8 packed sequences": (
            lambda: fmha.memory_efficient_attention(q1, k1, v1, packed, op=op), (q1, k1, v1)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", metavar="NAME", help="cProfile forward + backward of this case")
    ap.add_argument("--jit-path", action="store_true", help="launches through kernel[grid], not the direct path")
    ap.add_argument("--out", help="also write the table as JSON here, with the commit and the machine")
    args = ap.parse_args()
    all_cases = cases()
    times: dict[str, list[float]] = {}
    for _ in range(3):  # rounds over all cases, best of them: the first cases otherwise read high
        for name, (fw, leaves) in all_cases.items():
            g = torch.randn_like(fw())
            fwbw = lambda fw=fw, leaves=leaves, g=g: torch.autograd.grad(fw(), leaves, g)  # noqa: E731
            t = [per_call_us(fw), per_call_us(fwbw)]
            times[name] = [min(a, b) for a, b in zip(times.get(name, t), t)]
    print(f"{'case':24s} {'fw µs':>8s} {'fw+bw µs':>9s}")
    for name, (fw_us, fwbw_us) in times.items():
        print(f"{name:24s} {fw_us:8.1f} {fwbw_us:9.1f}")
    if args.out:
        import json
        import platform
        import subprocess

        from host_overhead import cpu_name  # scripts/ is on sys.path

        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout
        env = {"commit": os.environ.get("TRIFORMERS_COMMIT") or commit.strip(), "python": platform.python_version(),
               "torch": torch.__version__, "cpu": cpu_name(),
               "launch_path": "jit stub" if args.jit_path else "direct"}
        with open(args.out, "w") as f:
            json.dump({"env": env, "us_per_call": {k: {"fw": v[0], "fwbw": v[1]} for k, v in times.items()}}, f,
                      indent=1)
    if args.profile:
        fw, leaves = all_cases[args.profile]
        g = torch.randn_like(fw())
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(500):
            torch.autograd.grad(fw(), leaves, g)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
