import cProfile
import pstats
import time

import torch
import torch.nn.functional as F
import triton.language as tl

import triton
from triformers.ops import rms_norm
from triformers.ops.swiglu import silu_mul
from triformers.triton import dropout, layer_norm, softmax


def cpu_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


@triton.jit
def _noop(x_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n), mask=i < n)


dev = "cuda"
t = torch.zeros(1024, device=dev)
print(f"DIAG2 plain triton launch {cpu_us(lambda: _noop[(1,)](t, 1000, BLOCK=1024)):.1f} us")
print(f"DIAG2 torch add {cpu_us(lambda: t.add(1.0)):.1f} us")
M, N = 64, 256
x = torch.randn(M, N, device=dev, dtype=torch.bfloat16, requires_grad=True)
y = torch.randn(M, N, device=dev, dtype=torch.bfloat16, requires_grad=True)
w = torch.randn(N, device=dev, dtype=torch.bfloat16, requires_grad=True)
b = torch.randn(N, device=dev, dtype=torch.bfloat16, requires_grad=True)
dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
try:
    import liger_kernel.ops as lk
except ImportError:
    lk = None
cases = {
    "rms ours": (lambda: rms_norm(x, w), (x, w)),
    "rms eager": (lambda: F.rms_norm(x, (N,), w), (x, w)),
    "rms liger": (lambda: lk.LigerRMSNormFunction.apply(x, w, 1e-6), (x, w)),
    "ln ours": (lambda: layer_norm(x, w, b), (x, w, b)),
    "ln liger": (lambda: lk.LigerLayerNormFunction.apply(x, w, b, 1e-6), (x, w, b)),
    "softmax ours": (lambda: softmax(x), (x,)),
    "softmax liger": (lambda: lk.LigerSoftmaxFunction.apply(x), (x,)),
    "silu ours": (lambda: silu_mul(x, y), (x, y)),
    "dropout ours": (lambda: dropout(x, 0.1, b, "gelu"), (x, b)),
    "dropout eager": (lambda: F.dropout(F.gelu(x + b), 0.1), (x, b)),
}
for name, (fn, leaves) in cases.items():
    fw = cpu_us(fn)
    fwbw = cpu_us(lambda: torch.autograd.grad(fn(), leaves, dy))
    with torch.autograd.set_multithreading_enabled(False):
        fwbw1 = cpu_us(lambda: torch.autograd.grad(fn(), leaves, dy))
    print(f"DIAG2 {name:15s} fw {fw:7.1f} us  fwbw {fwbw:7.1f} us  fwbw(single-thread autograd) {fwbw1:7.1f} us")
prof = cProfile.Profile()
with torch.autograd.set_multithreading_enabled(False):
    prof.enable()
    for _ in range(200):
        torch.autograd.grad(rms_norm(x, w), (x, w), dy)
    torch.cuda.synchronize()
    prof.disable()
st = pstats.Stats(prof)
st.sort_stats("tottime").print_stats(18)
