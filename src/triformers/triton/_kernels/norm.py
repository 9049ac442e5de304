"""LayerNorm and RMSNorm kernels (one family: ``IS_RMS`` drops the centring) and their launchers.

Forward, row r of x [M, N]:  LayerNorm y = (x - mean) * rstd * w + b,  RMSNorm y = x * rstd * w,
with rstd = 1 / sqrt(var + eps) (RMSNorm: var = mean(x²)); statistics in float32, stored per row
([M] float32) for the backward. Backward, with x̂ = (x - mean) * rstd and g = dy * w:
    dx = rstd * (g - x̂ * mean(g * x̂) - mean(g))      (RMSNorm: no mean(g) term)
    dw = Σ_rows dy * x̂,   db = Σ_rows dy.

Memory traffic for x [M, N] (element size s): forward reads M·N·s and writes M·N·s (+8M bytes of stats):
one read + one write, the floor. Eager torch (x.pow(2).mean, rsqrt, two multiplies) moves ~5 such
passes. Backward reads x and dy, writes dx: 3·M·N·s, plus the weight/bias gradients through a
two-stage reduction: each of the ``BWD_PROGRAMS_PER_SM x SMs`` persistent programs accumulates its
rows' dw/db in registers and writes one float32 row; torch sums those few rows (<1 % of the traffic).

Rows wider than ``MAX_BLOCK_N`` loop over column blocks: the forward then reads each row two or three
times (cache-resident), the backward splits into a row-statistics kernel and a 2-D tiled kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triformers.triton._common import launch, next_pow2, prune_by_tile, sm_count, tuned

# Above 8192 columns one row no longer fits in registers: the backward keeps five float32 row vectors
# (x, dy, w, dw, db) live, 5 x 8192 / 512 threads = 80 registers each at 16 warps, and 16384 would spill.
MAX_BLOCK_N = 8192
# Column block of the looped kernels (rows wider than MAX_BLOCK_N).
LOOP_BLOCK_N = 4096
# Persistent backward programs per SM: at 8 warps a program holds ~100 registers/thread, so two of them
# fill an SM's 64K registers; more programs only lengthen the partial dw/db buffers.
BWD_PROGRAMS_PER_SM = 2

# Row tiles of 4K-16K elements keep 16-64 KB in flight per program, which the H100 needs to saturate HBM;
# 8-64 elements per thread keeps registers below spilling.
_TILE_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=w) for bm in (1, 2, 4, 8, 16, 32, 64) for w in (4, 8, 16)
]
_PRUNE = {"early_config_prune": prune_by_tile(4096, 16384, 8, 64)}


@triton.jit
def _norm_fwd_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    M,
    N,
    eps,
    stride_x_m,
    stride_x_n,
    stride_r_m,
    stride_r_n,
    stride_y_m,
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,  # HAS_RESIDUAL: x += r in place first (rms_norm_add)
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_PASS: tl.constexpr,  # SINGLE_PASS: BLOCK_N >= N
):
    """One program normalises BLOCK_M rows; a row is read once when it fits in BLOCK_N."""
    pid = tl.program_id(0)  # row block
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    x_row = x_ptr + rows64[:, None] * stride_x_m
    r_row = r_ptr + rows64[:, None] * stride_r_m
    y_row = y_ptr + rows64[:, None] * stride_y_m
    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < N)[None, :]
        x = tl.load(x_row + cols[None, :] * stride_x_n, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_row + cols[None, :] * stride_r_n, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(x_row + cols[None, :] * stride_x_n, x, mask=mask)
        x = x.to(tl.float32)
        if IS_RMS:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
            xc = x
        else:
            mean = tl.sum(x, axis=1) / N
            xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        y = xc * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Looped: mean, then variance around it (two passes, as stable as the single-pass form), then write.
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        if not IS_RMS:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = row_ok[:, None] & (cols < N)[None, :]
                x = tl.load(x_row + cols[None, :] * stride_x_n, mask=mask, other=0.0)
                if HAS_RESIDUAL:
                    r = tl.load(r_row + cols[None, :] * stride_r_n, mask=mask, other=0.0)
                    x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
                acc += x.to(tl.float32)
            mean = tl.sum(acc, axis=1) / N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < N)[None, :]
            x = tl.load(x_row + cols[None, :] * stride_x_n, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(r_row + cols[None, :] * stride_r_n, mask=mask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            xc = tl.where(mask, x.to(tl.float32) - mean[:, None], 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < N)[None, :]
            x = tl.load(x_row + cols[None, :] * stride_x_n, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(r_row + cols[None, :] * stride_r_n, mask=mask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
                tl.store(
                    x_row + cols[None, :] * stride_x_n, x, mask=mask
                )  # every read of these columns is done
            y = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                y = y + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
        if not IS_RMS:
            tl.store(mean_ptr + rows, mean, mask=row_ok)


@triton.jit
def _norm_bwd_kernel(
    x_ptr,
    w_ptr,
    dy_ptr,
    dx_ptr,
    mean_ptr,
    rstd_ptr,
    dw_ptr,
    db_ptr,  # dw_ptr, db_ptr: [programs, N] float32
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
    """Persistent: program p owns a contiguous run of rows, writes their dx and one row of dw/db partials."""
    pid = tl.program_id(0)
    rows_per_program = tl.cdiv(M, tl.num_programs(0))
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_x_m + cols[None, :] * stride_x_n, mask=mask, other=0.0)
        dy = tl.load(
            dy_ptr + rows64[:, None] * stride_dy_m + cols[None, :] * stride_dy_n, mask=mask, other=0.0
        )
        x = x.to(tl.float32)
        dy = dy.to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy
        if HAS_WEIGHT:
            g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / N
        if IS_RMS:
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(g, axis=1) / N
            dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(
            dx_ptr + rows64[:, None] * stride_dx_m + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask
        )
        if COMPUTE_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if COMPUTE_DB:
            db_acc += tl.sum(dy, axis=0)
    if COMPUTE_DW:
        tl.store(dw_ptr + pid * N + cols, dw_acc, mask=col_ok)
    if COMPUTE_DB:
        tl.store(db_ptr + pid * N + cols, db_acc, mask=col_ok)


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
        dy = tl.load(
            dy_ptr + rows64[:, None] * stride_dy_m + cols[None, :] * stride_dy_n, mask=mask, other=0.0
        )
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
        dy = tl.load(
            dy_ptr + rows64[:, None] * stride_dy_m + cols[None, :] * stride_dy_n, mask=mask, other=0.0
        )
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
        tl.store(
            dx_ptr + rows64[:, None] * stride_dx_m + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask
        )
        if COMPUTE_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if COMPUTE_DB:
            db_acc += tl.sum(dy, axis=0)
    if COMPUTE_DW:
        tl.store(dw_ptr + pid_m * N + cols, dw_acc, mask=col_ok)
    if COMPUTE_DB:
        tl.store(db_ptr + pid_m * N + cols, db_acc, mask=col_ok)


_KEY = ["N", "BLOCK_N", "IS_RMS", "HAS_RESIDUAL", "SINGLE_PASS"]
_fwd = tuned(_norm_fwd_kernel, _TILE_CONFIGS, _KEY, prune_configs_by=_PRUNE)
# rms_norm_add writes x in place: autotuning must restore it between trials.
_fwd_residual = tuned(_norm_fwd_kernel, _TILE_CONFIGS, _KEY, prune_configs_by=_PRUNE, restore_value=["x_ptr"])
_bwd = tuned(_norm_bwd_kernel, _TILE_CONFIGS, ["N", "BLOCK_N", "IS_RMS"], prune_configs_by=_PRUNE)


def _interp_block_m(block_n: int) -> int:
    return max(1, min(64, 4096 // block_n))


def norm_fwd(
    x: torch.Tensor,  # [M, N], any strides
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    rms: bool,
    out_dtype: torch.dtype,
    residual: torch.Tensor | None = None,  # [M, N]: x += residual in place before normalising
    store_stats: bool = True,
    max_block_n: int | None = None,  # default MAX_BLOCK_N (read per call)
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Normalise the rows of ``x``; returns ``(y [M, N] contiguous, mean [M] | None, rstd [M] | None)``."""
    M, N = x.shape
    y = torch.empty((M, N), device=x.device, dtype=out_dtype)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32) if store_stats else None
    mean = torch.empty(M, device=x.device, dtype=torch.float32) if store_stats and not rms else None
    max_block_n = max_block_n or MAX_BLOCK_N
    single = next_pow2(N) <= max_block_n
    block_n = next_pow2(N) if single else min(LOOP_BLOCK_N, next_pow2(max_block_n))
    r = residual if residual is not None else x
    kernel = _fwd_residual if residual is not None else _fwd
    dummy = y
    args = (
        x,
        r,
        weight if weight is not None else dummy,
        bias if bias is not None else dummy,
        y,
        mean if mean is not None else dummy,
        rstd if rstd is not None else dummy,
        M,
        N,
        eps,
        x.stride(0),
        x.stride(1),
        r.stride(0),
        r.stride(1),
        y.stride(0),
    )
    meta = dict(
        IS_RMS=rms,
        HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        STORE_STATS=store_stats,
        BLOCK_N=block_n,
        SINGLE_PASS=single,
    )
    if single:
        launch(
            kernel,
            lambda m: (triton.cdiv(M, m["BLOCK_M"]),),
            *args,
            interp={"BLOCK_M": _interp_block_m(block_n)},
            **meta,
        )
    else:  # wide rows: one row per program, no autotuning (a rare shape)
        _norm_fwd_kernel[(M,)](*args, BLOCK_M=1, num_warps=8, **meta)
    return y, mean, rstd


def norm_bwd(
    dy: torch.Tensor,  # [M, N], any strides
    x: torch.Tensor,  # [M, N], any strides
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    *,
    rms: bool,
    dx_dtype: torch.dtype,
    compute_dw: bool,
    compute_db: bool,
    max_block_n: int | None = None,  # default MAX_BLOCK_N (read per call)
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`norm_fwd`: ``(dx [M, N], dw [N] float32 | None, db [N] float32 | None)``."""
    M, N = x.shape
    dx = torch.empty((M, N), device=x.device, dtype=dx_dtype)
    compute_dw = compute_dw and weight is not None
    w = weight if weight is not None else dx
    mean_arg = mean if mean is not None else rstd
    flags = dict(IS_RMS=rms, HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db)
    max_block_n = max_block_n or MAX_BLOCK_N
    if next_pow2(N) <= max_block_n:
        block_n = next_pow2(N)
        programs = max(1, min(M, BWD_PROGRAMS_PER_SM * sm_count(x)))
        dw = torch.empty((programs, N), device=x.device, dtype=torch.float32) if compute_dw else None
        db = torch.empty((programs, N), device=x.device, dtype=torch.float32) if compute_db else None
        launch(
            _bwd,
            (programs,),
            x,
            w,
            dy,
            dx,
            mean_arg,
            rstd,
            dw if dw is not None else rstd,
            db if db is not None else rstd,
            M,
            N,
            x.stride(0),
            x.stride(1),
            dy.stride(0),
            dy.stride(1),
            dx.stride(0),
            interp={"BLOCK_M": _interp_block_m(block_n)},
            BLOCK_N=block_n,
            **flags,
        )
    else:
        block_n = min(LOOP_BLOCK_N, next_pow2(max_block_n))
        c1 = torch.empty(M, device=x.device, dtype=torch.float32)
        c2 = torch.empty(M, device=x.device, dtype=torch.float32)
        _norm_bwd_stats_kernel[(M,)](
            x,
            w,
            dy,
            mean_arg,
            rstd,
            c1,
            c2,
            M,
            N,
            x.stride(0),
            x.stride(1),
            dy.stride(0),
            dy.stride(1),
            IS_RMS=rms,
            HAS_WEIGHT=weight is not None,
            BLOCK_M=1,
            BLOCK_N=block_n,
            num_warps=8,
        )
        col_blocks = triton.cdiv(N, block_n)
        chunks = max(1, min(M, triton.cdiv(BWD_PROGRAMS_PER_SM * sm_count(x), col_blocks)))
        dw = torch.empty((chunks, N), device=x.device, dtype=torch.float32) if compute_dw else None
        db = torch.empty((chunks, N), device=x.device, dtype=torch.float32) if compute_db else None
        _norm_bwd_tile_kernel[(chunks, col_blocks)](
            x,
            w,
            dy,
            dx,
            mean_arg,
            rstd,
            c1,
            c2,
            dw if dw is not None else c1,
            db if db is not None else c1,
            M,
            N,
            x.stride(0),
            x.stride(1),
            dy.stride(0),
            dy.stride(1),
            dx.stride(0),
            BLOCK_M=2,
            BLOCK_N=block_n,
            num_warps=8,
            **flags,
        )
    return dx, dw.sum(0) if dw is not None else None, db.sum(0) if db is not None else None
