"""LayerNorm / RMSNorm backward for rows wider than ``norm.MAX_BLOCK_N`` (see ``norm`` for the maths).

Step 1 loops over each row's column blocks for c1 = mean(g · x̂) and c2 = mean(g) (g = dy · w); step 2
runs over (row chunk, column block) programs, writing dx and one float32 row of dw/db partials per chunk.
x and dy are read twice (5·M·N·s instead of 3·M·N·s): the price of rows that do not fit in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triformers.triton._common import cdiv, sm_count

# Programs of step 2 per SM (row chunks x column blocks): enough rows in flight at two programs per SM.
WIDE_PROGRAMS_PER_SM = 2


@triton.jit
def _norm_bwd_stats_kernel(
    x_ptr,
    w_ptr,
    dy_ptr,
    mean_ptr,
    rstd_ptr,
    c1_ptr,
    c2_ptr,
    M,
    N,
    stride_x_m,
    stride_x_n,
    stride_dy_m,
    stride_dy_n,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Wide rows, step 1: c1 = mean(g * x̂) and c2 = mean(g) per row, looping over column blocks."""
    pid = tl.program_id(0)  # row block
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    if not IS_RMS:
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < N)[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_x_m + cols[None, :] * stride_x_n, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dy_m + cols[None, :] * stride_dy_n, mask=mask, other=0.0)
        g = dy.to(tl.float32)
        if HAS_WEIGHT:
            g = g * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        acc1 += g * xhat
        acc2 += g
    tl.store(c1_ptr + rows, tl.sum(acc1, axis=1) / N, mask=row_ok)
    tl.store(c2_ptr + rows, tl.sum(acc2, axis=1) / N, mask=row_ok)


@triton.jit
def _norm_bwd_tile_kernel(
    x_ptr,
    w_ptr,
    dy_ptr,
    dx_ptr,
    mean_ptr,
    rstd_ptr,
    c1_ptr,
    c2_ptr,
    dw_ptr,
    db_ptr,  # dw/db: [row chunks, N]
    M,
    N,
    stride_x_m,
    stride_x_n,
    stride_dy_m,
    stride_dy_n,
    stride_dx_m,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Wide rows, step 2: dx for a run of rows over one column block, and that run's column sums."""
    pid_m = tl.program_id(0)  # row chunk
    pid_n = tl.program_id(1)  # column block
    rows_per_program = tl.cdiv(M, tl.num_programs(0))
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_x_m + cols[None, :] * stride_x_n, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dy_m + cols[None, :] * stride_dy_n, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        if not IS_RMS:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        g = dy
        if HAS_WEIGHT:
            g = dy * w[None, :]
        c1 = tl.load(c1_ptr + rows, mask=row_ok, other=0.0)
        dx = g - xhat * c1[:, None]
        if not IS_RMS:
            dx = dx - tl.load(c2_ptr + rows, mask=row_ok, other=0.0)[:, None]
        dx = dx * rstd[:, None]
        tl.store(dx_ptr + rows64[:, None] * stride_dx_m + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if COMPUTE_DB:
            db_acc += tl.sum(dy, axis=0)
    if COMPUTE_DW:
        tl.store(dw_ptr + pid_m * N + cols, dw_acc, mask=col_ok)
    if COMPUTE_DB:
        tl.store(db_ptr + pid_m * N + cols, db_acc, mask=col_ok)


def norm_bwd_wide(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    *,
    rms: bool,
    dx_dtype: torch.dtype,
    compute_dw: bool,
    compute_db: bool,
    block_n: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """As ``norm.norm_bwd``, for wide rows, with ``block_n`` columns per step."""
    M, N = x.shape
    dx = torch.empty((M, N), device=x.device, dtype=dx_dtype)
    compute_dw = compute_dw and weight is not None
    w = weight if weight is not None else dx
    mean_arg = mean if mean is not None else rstd
    c1 = torch.empty(M, device=x.device, dtype=torch.float32)
    c2 = torch.empty(M, device=x.device, dtype=torch.float32)
    # fmt: off
    _norm_bwd_stats_kernel[(M,)](
        x, w, dy, mean_arg, rstd, c1, c2, M, N, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        IS_RMS=rms, HAS_WEIGHT=weight is not None, BLOCK_M=1, BLOCK_N=block_n, num_warps=8,
    )
    col_blocks = cdiv(N, block_n)
    chunks = max(1, min(M, cdiv(WIDE_PROGRAMS_PER_SM * sm_count(x), col_blocks)))
    dw = torch.empty((chunks, N), device=x.device, dtype=torch.float32) if compute_dw else None
    db = torch.empty((chunks, N), device=x.device, dtype=torch.float32) if compute_db else None
    _norm_bwd_tile_kernel[(chunks, col_blocks)](
        x, w, dy, dx, mean_arg, rstd, c1, c2, dw if dw is not None else c1, db if db is not None else c1,
        M, N, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dx.stride(0),
        IS_RMS=rms, HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
        BLOCK_M=2, BLOCK_N=block_n, num_warps=8,
    )
    # fmt: on
    return dx, dw.sum(0) if dw is not None else None, db.sum(0) if db is not None else None
