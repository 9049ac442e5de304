"""LayerNorm and RMSNorm kernels (one family: ``IS_RMS`` drops the centring) and their launchers.

Forward, row r of x [M, N]:  LayerNorm y = (x - mean) * rstd * w + b,  RMSNorm y = x * rstd * w,
with rstd = 1 / sqrt(var + eps) (RMSNorm: var = mean(x²)); statistics in float32, stored per row
([M] float32) for the backward. Backward, with x̂ = (x - mean) * rstd and g = dy * w:
    dx = rstd * (g - x̂ * mean(g * x̂) - mean(g))      (RMSNorm: no mean(g) term)
    dw = Σ_rows dy * x̂,   db = Σ_rows dy.

Memory traffic for x [M, N] (element size s): forward reads M·N·s and writes M·N·s (+8M bytes of stats):
one read + one write, the floor. Eager torch (x.pow(2).mean, rsqrt, two multiplies) moves ~5 such
passes. Backward reads x and dy, writes dx: 3·M·N·s, plus the weight/bias gradients through a
two-stage reduction: each of the few-per-SM persistent programs accumulates its
rows' dw/db in registers and writes one float32 row; ``sum_rows`` adds those few rows (<1 % of the traffic).

Rows wider than ``MAX_BLOCK_N`` loop over column blocks: the forward then reads each row two or three
times (cache-resident), the backward splits into a row-statistics kernel and a 2-D tiled kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from triformers.triton._common import Tuner, cdiv, default_tile, next_pow2, prune_by_tile, sm_count, tile_configs
from triformers.triton._kernels.norm_wide import norm_bwd_wide
from triformers.triton._kernels.reduce import sum_rows

# Above 8192 columns one row no longer fits in registers: the backward keeps five float32 row vectors
# (x, dy, w, dw, db) live, 5 x 8192 / 512 threads = 80 registers each at 16 warps, and 16384 would spill.
MAX_BLOCK_N = 8192
# Column block of the looped kernels (rows wider than MAX_BLOCK_N).
LOOP_BLOCK_N = 4096
# Row tiles of 4K-16K elements keep 16-64 KB in flight per program, which the H100 needs to saturate HBM;
# 8-64 elements per thread keeps registers below spilling. The Tuner picks among those per shape.


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
                tl.store(x_row + cols[None, :] * stride_x_n, x, mask=mask)  # every read of these columns is done
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
    db_ptr,  # dw_ptr, db_ptr: float32 rows of stride stride_p; with both, db's N columns follow dw's in a row
    M,
    N,
    stride_x_m,
    stride_x_n,
    stride_dy_m,
    stride_dy_n,
    stride_dx_m,
    stride_p,
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
    # accumulator tiles, summed over their rows once at the end (a column sum per tile would go through
    # shared memory, with barriers, every iteration)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_x_m + cols[None, :] * stride_x_n, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dy_m + cols[None, :] * stride_dy_n, mask=mask, other=0.0)
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
        tl.store(dx_ptr + rows64[:, None] * stride_dx_m + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * xhat  # 0 outside the bounds: masked loads read 0
        if COMPUTE_DB:
            db_acc += dy
    if COMPUTE_DW:
        tl.store(dw_ptr + pid * stride_p + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if COMPUTE_DB:
        db_row = db_ptr + pid * stride_p
        if COMPUTE_DW:
            db_row += N
        tl.store(db_row + cols, tl.sum(db_acc, axis=0), mask=col_ok)


# Persistent backward programs per SM. Measured on an H100 (RMSNorm, M = 16384, bf16): at N = 1024 four
# programs per SM beat two by 15 % (0.072 vs 0.085 ms: short rows need more rows in flight); from N = 4096
# one and two are within 2 %, and fewer programs mean fewer partial dw/db rows to sum.
def _bwd_programs_per_sm(block_n: int) -> int:
    return max(1, min(4, 4096 // block_n))


_PRUNE = prune_by_tile(4096, 16384, 8, 64)
_fwd = Tuner(_norm_fwd_kernel, tile_configs(), _PRUNE)
_fwd_residual = Tuner(_norm_fwd_kernel, tile_configs(), _PRUNE, restore=(0,))  # rms_norm_add writes x
_bwd = Tuner(_norm_bwd_kernel, tile_configs(), _PRUNE)


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
    single, block_n, default = _fwd_plan(N, max_block_n or MAX_BLOCK_N)
    r = residual if residual is not None else x
    w, b = weight if weight is not None else y, bias if bias is not None else y
    m, s = mean if mean is not None else y, rstd if rstd is not None else y
    sx0, sx1, sr0, sr1 = *x.stride(), *r.stride()
    # fmt: off
    args = (x, r, w, b, y, m, s, M, N, eps, sx0, sx1, sr0, sr1, N)
    flags = (rms, residual is not None, weight is not None, bias is not None, store_stats)
    # with the key: what the launch specialises on (y, mean, rstd are fresh, so aligned, and y is [M, N])
    dyn = (M, sx0, sx1, sr0, sr1, x.data_ptr() & 15, r.data_ptr() & 15, w.data_ptr() & 15, b.data_ptr() & 15)
    meta = _fwd_meta(*flags, block_n, single)
    # fmt: on
    if single:
        key = (N, x.dtype, r.dtype, w.dtype, b.dtype, y.dtype, block_n, *flags)
        tuner = _fwd_residual if residual is not None else _fwd
        tuner(lambda c: (cdiv(M, c["BLOCK_M"]),), args, key, default, meta, dyn)
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
    param_dtype: torch.dtype = torch.float32,
    max_block_n: int | None = None,  # default MAX_BLOCK_N (read per call)
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`norm_fwd`: ``(dx [M, N], dw [N] | None, db [N] | None)``, dw/db in ``param_dtype``."""
    M, N = x.shape
    max_block_n = max_block_n or MAX_BLOCK_N
    compute_dw = compute_dw and weight is not None
    if next_pow2(N) > max_block_n:
        dx, dw, db = norm_bwd_wide(
            dy,
            x,
            weight,
            mean,
            rstd,
            rms=rms,
            dx_dtype=dx_dtype,
            compute_dw=compute_dw,
            compute_db=compute_db,
            block_n=min(LOOP_BLOCK_N, next_pow2(max_block_n)),
        )
        return dx, None if dw is None else dw.to(param_dtype), None if db is None else db.to(param_dtype)
    dx = torch.empty((M, N), device=x.device, dtype=dx_dtype)
    block_n, programs, default = _bwd_plan(M, N, sm_count(x))
    # dw and db partials side by side in one buffer: one reduction launch for both
    width = (compute_dw + compute_db) * N
    # (with both, the kernel writes db's partials after dw's in each row: no sliced view to build)
    partial = torch.empty((programs, width), device=x.device, dtype=torch.float32) if width else rstd
    w = weight if weight is not None else dx
    sx0, sx1, sdy0, sdy1 = *x.stride(), *dy.stride()
    stats = mean if mean is not None else rstd
    # fmt: off
    args = (x, w, dy, dx, stats, rstd, partial, partial, M, N, sx0, sx1, sdy0, sdy1, N, width)
    # fmt: on
    key = (N, x.dtype, w.dtype, dy.dtype, dx.dtype, rms, weight is not None, compute_dw, compute_db, block_n)
    # with the key: what the launch specialises on (dx and the partials are fresh)
    dyn = (M, sx0, sx1, sdy0, sdy1, x.data_ptr() & 15, w.data_ptr() & 15, dy.data_ptr() & 15,
           stats.data_ptr() & 15, rstd.data_ptr() & 15)
    meta = _bwd_meta(rms, weight is not None, compute_dw, compute_db, block_n)
    _bwd(lambda c: (programs,), args, key, default, meta, dyn)
    if not width:
        return dx, None, None
    sums = sum_rows(partial, param_dtype)
    if compute_dw and compute_db:
        return dx, sums[:N], sums[N:]
    return dx, sums if compute_dw else None, sums if compute_db else None


@functools.lru_cache(maxsize=256)
def _bwd_plan(M: int, N: int, sms: int) -> tuple[int, int, dict]:
    """(BLOCK_N, persistent programs, default config) of the single-pass backward."""
    block_n = next_pow2(N)
    return block_n, max(1, min(M, _bwd_programs_per_sm(block_n) * sms)), default_tile(block_n)


@functools.lru_cache(maxsize=256)
def _fwd_meta(rms, residual, weight, bias, store_stats, block_n, single) -> dict:
    """The forward's constexprs (cached: shared, never written)."""
    return dict(IS_RMS=rms, HAS_RESIDUAL=residual, HAS_WEIGHT=weight, HAS_BIAS=bias, STORE_STATS=store_stats,
                BLOCK_N=block_n, SINGLE_PASS=single)


@functools.lru_cache(maxsize=256)
def _bwd_meta(rms, weight, compute_dw, compute_db, block_n) -> dict:
    """The backward's constexprs (cached: shared, never written)."""
    return dict(IS_RMS=rms, HAS_WEIGHT=weight, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, BLOCK_N=block_n)


@functools.lru_cache(maxsize=256)
def _fwd_plan(N: int, max_block_n: int) -> tuple[bool, int, dict]:
    """(SINGLE_PASS, BLOCK_N, default config) of the forward."""
    single = next_pow2(N) <= max_block_n
    block_n = next_pow2(N) if single else min(LOOP_BLOCK_N, next_pow2(max_block_n))
    return single, block_n, default_tile(block_n)
