"""Column sums of float32 partial rows: the second stage of the weight/bias-gradient reductions.

The backward kernels of the norms, dropout and SwiGLU accumulate their parameter gradients per program and
write one float32 row each (a few hundred rows). ``sum_rows`` adds those rows up and casts to the
parameter's dtype in one launch, where ``partial.sum(0).to(dtype)`` takes two kernels, an intermediate
tensor and twice the host time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triformers.triton._common import cdiv, launch


@triton.jit
def _sum_rows_kernel(src_ptr, dst_ptr, P, N, stride_p, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        ok = (rows < P)[:, None] & col_ok[None, :]
        acc += tl.load(src_ptr + rows.to(tl.int64)[:, None] * stride_p + cols[None, :], mask=ok, other=0.0)
    tl.store(dst_ptr + cols, tl.sum(acc, axis=0).to(dst_ptr.dtype.element_ty), mask=col_ok)


_META = {"BLOCK_P": 32, "BLOCK_N": 64, "num_warps": 4}
_STATIC = (id(_sum_rows_kernel), tuple(_META.items()))


def sum_rows(partial: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``partial.sum(0).to(out_dtype)`` for a float32 ``[P, N]`` tensor with unit column stride."""
    P, N = partial.shape
    out = torch.empty(N, device=partial.device, dtype=out_dtype)
    if N == 0:
        return out
    stride = partial.stride(0)
    launch(
        _sum_rows_kernel,
        (cdiv(N, 64),),
        (partial, out, P, N, stride),
        _META,
        _STATIC,
        (partial.dtype, out_dtype, P, N, stride, partial.data_ptr() & 15),  # out is fresh
    )
    return out
