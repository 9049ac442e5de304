"""silu(a) ⊙ b, forward and backward, the elementwise core of SwiGLU; and launchers.

Forward g = silu(a) ⊙ b; backward, with σ = sigmoid(a):
    da = dg ⊙ b ⊙ σ (1 + a (1 - σ)),   db = dg ⊙ a σ,
optionally recomputing g (SwiGLU's w3 gradient needs it; recomputing costs no extra read, storing it
would keep an [T, H] tensor alive between forward and backward) and summing da, db over rows (the
w1/w2 bias gradients, two-stage: per-program float32 rows, summed by torch).

Memory traffic for a, b [M, N] (element size s): forward reads 2·M·N·s and writes M·N·s; eager torch
(silu, then mul) reads 3·M·N·s and writes 2·M·N·s. Backward reads a, b, dg and writes da, db (and g):
5 (6)·M·N·s, against ~10·M·N·s for eager autograd (sigmoid, products, two muls saved and re-read).
a and b are addressed by strides, so SwiGLU passes the two halves of its packed [T, 2H] GEMM output
without copying them, and gets da, db written straight into the packed [T, 2H] gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triformers.triton._common import Tuner, cdiv, default_tile, next_pow2, prune_by_tile, sm_count, tile_configs

# As for the dropout kernels: 1024-column blocks (2 KB contiguous per bf16 row), autotuned row counts.
BLOCK_N_MAX = 1024
BWD_PROGRAMS_PER_SM = 4  # persistent backward: 4 x 8-warp programs of 8K-element tiles fit an SM's registers
_PRUNE = prune_by_tile(4096, 16384, 8, 64)


@triton.jit
def _silu_mul_fwd_kernel(
    a_ptr,
    b_ptr,
    g_ptr,
    M,
    N,
    stride_a_m,
    stride_a_n,
    stride_b_m,
    stride_b_n,
    stride_g_m,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)  # row block
    pid_n = tl.program_id(1)  # column block
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    a = tl.load(a_ptr + rows[:, None] * stride_a_m + cols[None, :] * stride_a_n, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows[:, None] * stride_b_m + cols[None, :] * stride_b_n, mask=ok, other=0.0).to(tl.float32)
    g = a * tl.sigmoid(a) * b
    tl.store(g_ptr + rows[:, None] * stride_g_m + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_mul_bwd_kernel(
    a_ptr,
    b_ptr,
    dg_ptr,
    da_ptr,
    db_ptr,
    g_ptr,
    dbias_ptr,  # dbias_ptr: [row chunks, 2N] float32 partials
    M,
    N,
    stride_a_m,
    stride_a_n,
    stride_b_m,
    stride_b_n,
    stride_dg_m,
    stride_dg_n,
    stride_da_m,
    stride_db_m,
    stride_g_m,
    STORE_G: tl.constexpr,
    COMPUTE_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Persistent over rows: program (i, j) owns row chunk i of column block j."""
    pid_m = tl.program_id(0)  # row chunk
    pid_n = tl.program_id(1)  # column block
    rows_per_program = tl.cdiv(M, tl.num_programs(0))
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc_a = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
        ok = (rows < row_end)[:, None] & col_ok[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_a_m + cols[None, :] * stride_a_n, mask=ok, other=0.0)
        b = tl.load(b_ptr + rows[:, None] * stride_b_m + cols[None, :] * stride_b_n, mask=ok, other=0.0)
        dg = tl.load(dg_ptr + rows[:, None] * stride_dg_m + cols[None, :] * stride_dg_n, mask=ok, other=0.0)
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        dg = dg.to(tl.float32)
        sig = tl.sigmoid(a)
        silu = a * sig
        da = dg * b * sig * (1.0 + a * (1.0 - sig))
        db = dg * silu
        tl.store(da_ptr + rows[:, None] * stride_da_m + cols[None, :], da.to(da_ptr.dtype.element_ty), mask=ok)
        tl.store(db_ptr + rows[:, None] * stride_db_m + cols[None, :], db.to(db_ptr.dtype.element_ty), mask=ok)
        if STORE_G:
            tl.store(
                g_ptr + rows[:, None] * stride_g_m + cols[None, :],
                (silu * b).to(g_ptr.dtype.element_ty),
                mask=ok,
            )
        if COMPUTE_DBIAS:
            acc_a += tl.sum(da, axis=0)
            acc_b += tl.sum(db, axis=0)
    if COMPUTE_DBIAS:
        tl.store(dbias_ptr + pid_m * 2 * N + cols, acc_a, mask=col_ok)
        tl.store(dbias_ptr + pid_m * 2 * N + N + cols, acc_b, mask=col_ok)


_fwd = Tuner(_silu_mul_fwd_kernel, tile_configs(), _PRUNE)
_bwd = Tuner(_silu_mul_bwd_kernel, tile_configs(), _PRUNE)


def _block_n(N: int) -> int:
    return max(16, min(BLOCK_N_MAX, next_pow2(N)))


def silu_mul_fwd(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(a) * b`` for ``[M, N]`` a, b (any strides), into ``out`` (unit column stride) or new."""
    M, N = a.shape
    g = out if out is not None else torch.empty((M, N), device=a.device, dtype=a.dtype)
    block_n = _block_n(N)
    # fmt: off
    sa0, sa1, sb0, sb1, sg0 = *a.stride(), *b.stride(), g.stride(0)
    args = (a, b, g, M, N, sa0, sa1, sb0, sb1, sg0)
    dyn = (M, sa0, sa1, sb0, sb1, sg0, a.data_ptr() & 15, b.data_ptr() & 15, g.data_ptr() & 15)
    # fmt: on
    key = (N, a.dtype, b.dtype, g.dtype, block_n)
    grid = lambda c: (cdiv(M, c["BLOCK_M"]), cdiv(N, block_n))  # noqa: E731
    _fwd(grid, args, key, default_tile(block_n), {"BLOCK_N": block_n}, dyn)
    return g


def silu_mul_bwd(
    a: torch.Tensor,
    b: torch.Tensor,
    dg: torch.Tensor,  # [M, N], any strides
    da: torch.Tensor,
    db: torch.Tensor,  # outputs [M, N], unit column stride (may be halves of one [M, 2N])
    g: torch.Tensor | None = None,  # output: silu(a) * b recomputed, unit column stride
    *,
    compute_dbias: bool = False,
) -> torch.Tensor | None:
    """Fill ``da``, ``db`` (and ``g``); returns ``[Σ_rows da, Σ_rows db]`` (float32 ``[2N]``) if asked."""
    M, N = a.shape
    block_n = _block_n(N)
    col_blocks = cdiv(N, block_n)
    chunks = max(1, min(M, cdiv(BWD_PROGRAMS_PER_SM * sm_count(a), col_blocks)))
    dbias = torch.empty((chunks, 2 * N), device=a.device, dtype=torch.float32) if compute_dbias else None
    # fmt: off
    gg = g if g is not None else da
    strides = (*a.stride(), *b.stride(), *dg.stride(), da.stride(0), db.stride(0), g.stride(0) if g is not None else 0)
    args = (a, b, dg, da, db, gg, dbias if dbias is not None else da, M, N, *strides)
    dyn = (M, *strides, a.data_ptr() & 15, b.data_ptr() & 15, dg.data_ptr() & 15, da.data_ptr() & 15,
           db.data_ptr() & 15, gg.data_ptr() & 15)  # dbias: fresh
    # fmt: on
    meta = dict(STORE_G=g is not None, COMPUTE_DBIAS=compute_dbias, BLOCK_N=block_n)
    key = (N, a.dtype, b.dtype, dg.dtype, da.dtype, *meta.values())
    _bwd(lambda c: (chunks, col_blocks), args, key, default_tile(block_n), meta, dyn)
    return dbias.sum(0) if dbias is not None else None
