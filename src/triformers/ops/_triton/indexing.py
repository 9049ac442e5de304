"""Row gather/scatter kernels for ``scaled_index_add`` and ``index_select_cat``, and launchers.

scaled_index_add, in place: input[index[i], m, :] += alpha * scaling ⊙ source[i, m, :]; its backward
gathers grad_source[i] = alpha * scaling ⊙ grad[index[i]] and, in the same pass, the column sums
Σ_{i, m} source ⊙ grad[index[i]] for the scaling gradient (per-program float32 rows, summed by torch).
index_select_cat: out[off_s + r·D_s + d] = source_s[index_s[r], d], one launch per source.

Memory traffic: scaled_index_add reads source and the indexed input rows and writes those rows
(3·Bi·M·D·s); torch's ``index_add_(0, index, scaling * source, alpha=alpha)`` first materialises
scaling * source (2 more passes over Bi·M·D). The backward reads grad rows and source once and writes
grad_source, where eager gathers grad[index] into a temporary first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triformers.triton._common import cdiv

# Tiles of 16 rows x 128 columns (2K elements, 4 KB in bf16) per program: rows of one index entry are
# contiguous, and an index entry usually has M >= 16 rows (tokens) of D >= 128 channels.
BLOCK_M = 16
BLOCK_D_MAX = 128


@triton.jit
def _scaled_index_add_fwd_kernel(
    input_ptr,
    index_ptr,
    source_ptr,
    scaling_ptr,
    M,
    D,
    alpha,
    stride_in_b,
    stride_in_m,
    stride_in_d,
    stride_src_b,
    stride_src_m,
    stride_src_d,
    HAS_SCALING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)  # index entry
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = (rows < M)[:, None] & (cols < D)[None, :]
    dst = tl.load(index_ptr + i).to(tl.int64)
    src = tl.load(
        source_ptr + i.to(tl.int64) * stride_src_b + rows[:, None] * stride_src_m + cols[None, :] * stride_src_d,
        mask=ok,
        other=0.0,
    ).to(tl.float32)
    if HAS_SCALING:
        src *= tl.load(scaling_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    ptrs = input_ptr + dst * stride_in_b + rows[:, None] * stride_in_m + cols[None, :] * stride_in_d
    out = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32) + alpha * src
    tl.store(ptrs, out.to(input_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scaled_index_add_bwd_kernel(
    grad_ptr,
    index_ptr,
    source_ptr,
    scaling_ptr,
    grad_source_ptr,
    grad_scaling_ptr,  # grad_scaling: partials
    M,
    D,
    alpha,
    stride_g_b,
    stride_g_m,
    stride_g_d,
    stride_src_b,
    stride_src_m,
    stride_src_d,
    stride_gs_b,
    stride_gs_m,
    HAS_SCALING: tl.constexpr,
    COMPUTE_GRAD_SOURCE: tl.constexpr,
    COMPUTE_GRAD_SCALING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)  # index entry
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = (rows < M)[:, None] & (cols < D)[None, :]
    dst = tl.load(index_ptr + i).to(tl.int64)
    g = tl.load(
        grad_ptr + dst * stride_g_b + rows[:, None] * stride_g_m + cols[None, :] * stride_g_d,
        mask=ok,
        other=0.0,
    ).to(tl.float32)
    if COMPUTE_GRAD_SOURCE:
        gs = alpha * g
        if HAS_SCALING:
            gs *= tl.load(scaling_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        tl.store(
            grad_source_ptr + i.to(tl.int64) * stride_gs_b + rows[:, None] * stride_gs_m + cols[None, :],
            gs.to(grad_source_ptr.dtype.element_ty),
            mask=ok,
        )
    if COMPUTE_GRAD_SCALING:
        src = tl.load(
            source_ptr + i.to(tl.int64) * stride_src_b + rows[:, None] * stride_src_m + cols[None, :] * stride_src_d,
            mask=ok,
            other=0.0,
        ).to(tl.float32)
        partial_row = i.to(tl.int64) * tl.num_programs(1) + pid_m
        tl.store(grad_scaling_ptr + partial_row * D + cols, alpha * tl.sum(src * g, axis=0), mask=cols < D)


@triton.jit
def _index_select_kernel(
    source_ptr,
    index_ptr,
    out_ptr,
    R,
    D,
    stride_s_n,
    stride_s_d,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # positions in the index
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = (rows < R)[:, None] & (cols < D)[None, :]
    src_rows = tl.load(index_ptr + rows, mask=rows < R, other=0).to(tl.int64)
    x = tl.load(source_ptr + src_rows[:, None] * stride_s_n + cols[None, :] * stride_s_d, mask=ok, other=0.0)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], x, mask=ok)


def _block_d(D: int) -> int:
    return max(16, min(BLOCK_D_MAX, triton.next_power_of_2(D)))


def scaled_index_add_fwd(input, index, source, scaling, alpha: float) -> None:
    """In place: ``input[index[i]] += alpha * scaling * source[i]`` (input, source: [B, M, D])."""
    Bi, M, D = source.shape
    block_d = _block_d(D)
    grid = (Bi, cdiv(M, BLOCK_M), cdiv(D, block_d))
    _scaled_index_add_fwd_kernel[grid](
        input,
        index,
        source,
        scaling if scaling is not None else source,
        M,
        D,
        alpha,
        *input.stride(),
        *source.stride(),
        HAS_SCALING=scaling is not None,
        BLOCK_M=BLOCK_M,
        BLOCK_D=block_d,
    )


def scaled_index_add_bwd(
    grad, index, source, scaling, alpha: float, *, compute_grad_source: bool, compute_grad_scaling: bool
):
    """``(grad_source [Bi, M, D] | None, grad_scaling [D] float32 | None)``."""
    Bi, M, D = source.shape
    block_d = _block_d(D)
    grid = (Bi, cdiv(M, BLOCK_M), cdiv(D, block_d))
    gs = torch.empty((Bi, M, D), device=grad.device, dtype=source.dtype) if compute_grad_source else None
    partial = torch.empty((Bi * grid[1], D), device=grad.device, dtype=torch.float32) if compute_grad_scaling else None
    _scaled_index_add_bwd_kernel[grid](
        grad,
        index,
        source,
        scaling if scaling is not None else source,
        gs if gs is not None else grad,
        partial if partial is not None else grad,
        M,
        D,
        alpha,
        *grad.stride(),
        *source.stride(),
        gs.stride(0) if gs is not None else 0,
        gs.stride(1) if gs is not None else 0,
        HAS_SCALING=scaling is not None,
        COMPUTE_GRAD_SOURCE=compute_grad_source,
        COMPUTE_GRAD_SCALING=compute_grad_scaling,
        BLOCK_M=BLOCK_M,
        BLOCK_D=block_d,
    )
    return gs, partial.sum(0) if partial is not None else None


def index_select_fwd(source: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` (contiguous, ``len(index) * D`` elements) = ``source[index]`` flattened (source: [N, D])."""
    R, D = index.shape[0], source.shape[1]
    block_d = _block_d(D)
    _index_select_kernel[(cdiv(R, BLOCK_M), cdiv(D, block_d))](
        source,
        index,
        out,
        R,
        D,
        source.stride(0),
        source.stride(1),
        BLOCK_M=BLOCK_M,
        BLOCK_D=block_d,
    )
