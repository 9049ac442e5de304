"""Block-sparse matmul and softmax kernels (the ``triton.ops.blocksparse`` of Triton 2, rewritten), and launchers.

Notation: a block-sparse ``S [B, C, h·bs, w·bs]`` stores ``values [B, nnz, bs, bs]`` at the blocks of its layout
(:class:`~triformers.sparse._blocksparse_layout.BlockLayout`). Three products, each a ``tl.dot`` per block tile:

- sdd: ``values[:, n] = A[:, c, rows(i)] @ Bm[:, c, :, cols(j)]`` for every stored block n = (c, i, j): one
  program per (block, batch), K in chunks. Reads ``nnz·bs·K`` of each operand, writes the blocks only.
- dsd: ``out[:, c, rows(i)] = Σ_j values[:, (c, i, j)] @ D[:, c, rows(j)]``: one program per (block-row, N tile,
  batch) walks the row's blocks through the look-up table and writes its whole output tile (zeros for an empty
  block-row), so the output needs no memset and no atomics. With ``transpose_sparse`` the same kernel multiplies
  by ``Sᵀ``: it walks block-columns and reads each block transposed (strides swapped), no copy.
- dds (``D @ S``) is dsd on transposed views: ``(D @ S)ᵀ = Sᵀ @ Dᵀ``.

Softmax over the stored entries of each row (``causal``: also only columns <= the row, in global coordinates):
one program per (block-row, tile of rows, batch), an online max/sum pass over the row's blocks, then a pass that
writes ``exp(x - m) / l``; entries with nothing visible in their row are 0. Backward: ``gx = scale · y ⊙ (g -
Σ_row g ⊙ y)`` in the same two passes. Every kernel accumulates in float32 and takes any strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triformers._triton import cdiv, launch
from triformers.sparse._blocksparse_layout import BlockLayout

#: block sizes the kernels take (``tl.dot`` needs tiles of at least 16; 128 fills an SM's registers).
BLOCK_SIZES = (16, 32, 64, 128)
# sdd (K chunk, warps, pipeline stages) per block size, measured on an H200 (fp16, 16 heads x 4096^2, K = 64,
# best of warps {2, 4, 8} x stages {1, 2, 3} x K chunk {32, 64}): at 90 % sparsity bs 64 takes 27.7 us with
# (32, 4, 3) against 36.6 us with one 64-wide step (the two K halves overlap their loads), bs 32 41.6 us with
# (64, 2, 2) against 57.8 us at 4 warps, bs 128 25.5 us with (32, 4, 3) against 30.5 us at 8 warps. bs 16 (not
# measured) follows bs 32.
SDD_BLOCK_K = {16: 64, 32: 64, 64: 32, 128: 32}
SDD_WARPS = {16: 2, 32: 2, 64: 4, 128: 4}
SDD_STAGES = {16: 2, 32: 2, 64: 3, 128: 3}
# dsd: output columns per program (H200, bs 64, 90 %: 22.4 us at 64 against 30.6 us at 32); a 128x64 float32
# accumulator is 32 registers per thread at 8 warps.
DSD_BLOCK_N = 64
# softmax: rows per program; a 32x128 float32 tile is 32 registers per thread at 4 warps.
SOFTMAX_ROWS = 32


def _num_warps(bs: int) -> int:
    # dsd: 4 warps (H200, bs 64, 90 %: 22.4 us at 4 warps, 23.2 at 8, 23.6 at 2); a 128 x 64 float32
    # accumulator with 128-wide tiles wants 8
    return 8 if bs >= 128 else 4


def _input_precision(dtype: torch.dtype) -> str:
    """torch's own rule for float32 matmuls: TF32 only when ``torch.backends.cuda.matmul.allow_tf32``."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def _sdd_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    block_c_ptr,
    block_i_ptr,
    block_j_ptr,
    K,
    stride_a_b,
    stride_a_c,
    stride_a_m,
    stride_a_k,
    stride_b_b,
    stride_b_c,
    stride_b_k,
    stride_b_n,
    stride_o_b,
    stride_o_n,
    stride_o_r,
    stride_o_c,
    BS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    blk = tl.program_id(0)  # stored block
    bz = tl.program_id(1).to(tl.int64)  # batch
    c = tl.load(block_c_ptr + blk).to(tl.int64)
    rows = tl.load(block_i_ptr + blk) * BS + tl.arange(0, BS)
    cols = tl.load(block_j_ptr + blk) * BS + tl.arange(0, BS)
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + bz * stride_a_b + c * stride_a_c + rows[:, None] * stride_a_m + kk[None, :] * stride_a_k
    b_ptrs = b_ptr + bz * stride_b_b + c * stride_b_c + kk[:, None] * stride_b_k + cols[None, :] * stride_b_n
    acc = tl.zeros((BS, BS), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + kk)[None, :] < K, other=0.0)
            b = tl.load(b_ptrs, mask=(k0 + kk)[:, None] < K, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_a_k
        b_ptrs += BLOCK_K * stride_b_k
    offs = tl.arange(0, BS)
    o_ptrs = out_ptr + bz * stride_o_b + blk.to(tl.int64) * stride_o_n
    tl.store(o_ptrs + offs[:, None] * stride_o_r + offs[None, :] * stride_o_c, acc.to(out_ptr.dtype.element_ty))


@triton.jit
def _dsd_kernel(
    values_ptr,
    dense_ptr,
    out_ptr,
    ptr_ptr,  # [rows + 1] offsets into lut_blk / lut_k
    lut_blk_ptr,  # stored-block index of each entry
    lut_k_ptr,  # block index along the reduction dim of each entry
    order_ptr,  # block-rows, heaviest first
    N,
    ROWS_PER_C,  # block-rows per channel of the (possibly transposed) sparse operand
    stride_v_b,
    stride_v_n,
    stride_v_r,
    stride_v_c,
    stride_d_b,
    stride_d_c,
    stride_d_k,
    stride_d_n,
    stride_o_b,
    stride_o_c,
    stride_o_m,
    stride_o_n,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    r = tl.load(order_ptr + tl.program_id(0))  # block-row
    nn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bz = tl.program_id(2).to(tl.int64)  # batch
    c = (r // ROWS_PER_C).to(tl.int64)
    i = r % ROWS_PER_C
    start = tl.load(ptr_ptr + r)
    end = tl.load(ptr_ptr + r + 1)
    offs = tl.arange(0, BS)
    n_ok = nn[None, :] < N
    v_base = values_ptr + bz * stride_v_b + offs[:, None] * stride_v_r + offs[None, :] * stride_v_c
    d_base = dense_ptr + bz * stride_d_b + c * stride_d_c + nn[None, :] * stride_d_n
    acc = tl.zeros((BS, BLOCK_N), dtype=tl.float32)
    for p in range(start, end):
        blk = tl.load(lut_blk_ptr + p).to(tl.int64)
        k = tl.load(lut_k_ptr + p)
        v = tl.load(v_base + blk * stride_v_n)
        d = tl.load(d_base + (k * BS + offs)[:, None] * stride_d_k, mask=n_ok, other=0.0)
        acc = tl.dot(v, d, acc, input_precision=INPUT_PRECISION)
    o_ptrs = out_ptr + bz * stride_o_b + c * stride_o_c + (i * BS + offs)[:, None] * stride_o_m
    tl.store(o_ptrs + nn[None, :] * stride_o_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _softmax_fwd_kernel(
    x_ptr,
    y_ptr,
    ptr_ptr,
    lut_blk_ptr,
    lut_k_ptr,
    order_ptr,
    H,  # block-rows per channel
    scale,
    stride_x_b,
    stride_x_n,
    stride_x_r,
    stride_x_c,
    stride_y_b,
    stride_y_n,
    stride_y_r,
    stride_y_c,
    BS: tl.constexpr,
    ROWS: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    r = tl.load(order_ptr + tl.program_id(0))  # block-row
    sub = tl.program_id(1) * ROWS + tl.arange(0, ROWS)  # rows of the block this program handles
    bz = tl.program_id(2).to(tl.int64)
    start = tl.load(ptr_ptr + r)
    end = tl.load(ptr_ptr + r + 1)
    q_pos = (r % H) * BS + sub  # global row
    cc = tl.arange(0, BS)
    x_base = x_ptr + bz * stride_x_b + sub[:, None] * stride_x_r + cc[None, :] * stride_x_c
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    for p in range(start, end):
        blk = tl.load(lut_blk_ptr + p).to(tl.int64)
        x = tl.load(x_base + blk * stride_x_n).to(tl.float32) * scale
        if CAUSAL:
            k_pos = tl.load(lut_k_ptr + p) * BS + cc
            x = tl.where(k_pos[None, :] <= q_pos[:, None], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
        m_i = m_new
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)  # nothing visible in the row: every exp is 0, so zeros
    y_base = y_ptr + bz * stride_y_b + sub[:, None] * stride_y_r + cc[None, :] * stride_y_c
    for p in range(start, end):
        blk = tl.load(lut_blk_ptr + p).to(tl.int64)
        x = tl.load(x_base + blk * stride_x_n).to(tl.float32) * scale
        if CAUSAL:
            k_pos = tl.load(lut_k_ptr + p) * BS + cc
            x = tl.where(k_pos[None, :] <= q_pos[:, None], x, float("-inf"))
        y = tl.exp(x - m_safe[:, None]) * inv_l[:, None]
        tl.store(y_base + blk * stride_y_n, y.to(y_ptr.dtype.element_ty))


@triton.jit
def _softmax_bwd_kernel(
    y_ptr,
    g_ptr,
    gx_ptr,
    ptr_ptr,
    lut_blk_ptr,
    order_ptr,
    scale,
    stride_y_b,
    stride_y_n,
    stride_y_r,
    stride_y_c,
    stride_g_b,
    stride_g_n,
    stride_g_r,
    stride_g_c,
    stride_gx_b,
    stride_gx_n,
    stride_gx_r,
    stride_gx_c,
    BS: tl.constexpr,
    ROWS: tl.constexpr,
):
    r = tl.load(order_ptr + tl.program_id(0))  # block-row
    sub = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    bz = tl.program_id(2).to(tl.int64)
    start = tl.load(ptr_ptr + r)
    end = tl.load(ptr_ptr + r + 1)
    cc = tl.arange(0, BS)
    y_base = y_ptr + bz * stride_y_b + sub[:, None] * stride_y_r + cc[None, :] * stride_y_c
    g_base = g_ptr + bz * stride_g_b + sub[:, None] * stride_g_r + cc[None, :] * stride_g_c
    dot = tl.zeros((ROWS,), tl.float32)
    for p in range(start, end):
        blk = tl.load(lut_blk_ptr + p).to(tl.int64)
        y = tl.load(y_base + blk * stride_y_n).to(tl.float32)
        g = tl.load(g_base + blk * stride_g_n).to(tl.float32)
        dot += tl.sum(y * g, 1)
    gx_base = gx_ptr + bz * stride_gx_b + sub[:, None] * stride_gx_r + cc[None, :] * stride_gx_c
    for p in range(start, end):
        blk = tl.load(lut_blk_ptr + p).to(tl.int64)
        y = tl.load(y_base + blk * stride_y_n).to(tl.float32)
        g = tl.load(g_base + blk * stride_g_n).to(tl.float32)
        tl.store(gx_base + blk * stride_gx_n, (scale * y * (g - dot[:, None])).to(gx_ptr.dtype.element_ty))


def sdd(a: torch.Tensor, b: torch.Tensor, info: BlockLayout) -> torch.Tensor:
    """``values [B, nnz, bs, bs]`` of ``a @ b`` at the layout's blocks (a ``[B, C, M, K]``, b ``[B, C, K, N]``)."""
    B, K = a.shape[0], a.shape[3]
    bs = info.block_size
    out = torch.empty((B, info.nnz, bs, bs), device=a.device, dtype=a.dtype)
    if info.nnz == 0 or B == 0:
        return out
    if K == 0:
        return out.zero_()
    block_k = min(SDD_BLOCK_K[bs], max(16, triton.next_power_of_2(K)))
    args = (a, b, out, info.block_c, info.block_i, info.block_j, K, *a.stride(), *b.stride(), *out.stride())
    meta = dict(
        BS=bs,
        BLOCK_K=block_k,
        EVEN_K=K % block_k == 0,
        INPUT_PRECISION=_input_precision(a.dtype),
        num_warps=SDD_WARPS[bs],
        num_stages=SDD_STAGES[bs],
    )
    launch(_sdd_kernel, (info.nnz, B), args, meta)
    return out


def dsd(values: torch.Tensor, dense: torch.Tensor, info: BlockLayout, out: torch.Tensor, transpose_sparse: bool):
    """Writes ``S @ dense`` (``Sᵀ @ dense`` with ``transpose_sparse``) into ``out [B, C, R·bs, N]`` (any strides).

    ``dense [B, C, K·bs, N]`` with K the sparse operand's block-columns (h when transposed, w otherwise).
    """
    B, C, _, N = out.shape
    if B == 0 or N == 0 or out.shape[2] == 0:
        return
    bs = info.block_size
    _, h, w = info.shape
    if transpose_sparse:
        tables, rows_per_c = (info.col_ptr, info.col_blocks, info.col_k, info.col_order), w
        sv = (values.stride(0), values.stride(1), values.stride(3), values.stride(2))  # blocks read transposed
    else:
        tables, rows_per_c = (info.row_ptr, info.row_blocks, info.row_k, info.row_order), h
        sv = values.stride()
    block_n = min(DSD_BLOCK_N, max(16, triton.next_power_of_2(N)))
    args = (values, dense, out, *tables, N, rows_per_c, *sv, *dense.stride(), *out.stride())
    meta = dict(BS=bs, BLOCK_N=block_n, INPUT_PRECISION=_input_precision(values.dtype), num_warps=_num_warps(bs))
    launch(_dsd_kernel, (C * rows_per_c, cdiv(N, block_n), B), args, meta)


def _softmax_grid(x: torch.Tensor, info: BlockLayout) -> tuple[tuple[int, int, int], int]:
    rows = min(SOFTMAX_ROWS, info.block_size)
    return (info.row_order.numel(), info.block_size // rows, x.shape[0]), rows


def softmax_fwd(x: torch.Tensor, info: BlockLayout, causal: bool, scale: float) -> torch.Tensor:
    """Row softmax of ``scale · x`` over the stored blocks (``x [B, nnz, bs, bs]``); same shape and dtype."""
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    grid, rows = _softmax_grid(x, info)
    args = (x, y, info.row_ptr, info.row_blocks, info.row_k, info.row_order, info.shape[1], float(scale))
    meta = dict(BS=info.block_size, ROWS=rows, CAUSAL=bool(causal))
    launch(_softmax_fwd_kernel, grid, (*args, *x.stride(), *y.stride()), meta)
    return y


def softmax_bwd(y: torch.Tensor, g: torch.Tensor, info: BlockLayout, scale: float) -> torch.Tensor:
    """Gradient of the softmax input from its output ``y`` and output gradient ``g`` (both ``[B, nnz, bs, bs]``)."""
    gx = torch.empty(y.shape, device=y.device, dtype=y.dtype)
    if gx.numel() == 0:
        return gx
    grid, rows = _softmax_grid(y, info)
    args = (y, g, gx, info.row_ptr, info.row_blocks, info.row_order, float(scale))
    meta = dict(BS=info.block_size, ROWS=rows)
    launch(_softmax_bwd_kernel, grid, (*args, *y.stride(), *g.stride(), *gx.stride()), meta)
    return gx
