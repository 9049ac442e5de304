"""Fused bias + activation + dropout kernels, and their launchers.

Forward: y = keep ⊙ f(x + b) / (1 - p); backward: dx = keep ⊙ dy / (1 - p) ⊙ f'(x + b), db = Σ_rows dx.

Random bits. The backward regenerates ``keep`` from the seed instead of storing a mask. A row of N
columns is read as 8 lanes of L = ⌈N / 8⌉ columns (rounded up to 16, so every lane starts 32-byte
aligned): column j·L + c is lane j, offset c. One Philox-4x32-10 call on counter r·L + c gives four 32-bit
words, i.e. eight 16-bit numbers u, one per lane; keep = u ≥ t with t = round(p · 2¹⁶). So the drop
probability is p rounded to a multiple of 2⁻¹⁶ (|error| ≤ 7.6e-6) and kept values are scaled by the
exact 1 / (1 - t / 2¹⁶): E[y] = f(x + b) holds exactly. The bits depend on (seed, row, column, N) only,
never on the tiling or the strides. Eight decisions per Philox call (rather than one, as ``tl.rand``
per element) keep the random numbers from making the kernel compute-bound.

Memory traffic for x [M, N] (element size s): forward reads x (M·N·s) and writes y (M·N·s); backward
reads x and dy and writes dx (3·M·N·s) with db through a two-stage reduction (per-program float32 rows).
Eager torch (x + b, f, dropout) reads 3·M·N·s and writes 3·M·N·s plus an M·N mask in the forward, and
keeps the mask and f's input alive for the backward.

The same backward kernel with p = 0 and no bias is FusedLinear's activation gradient (x = pre-activation).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from triformers._triton import int_code
from triformers.triton._common import Tuner, cdiv, default_tile, next_pow2, prune_by_tile, tile_configs
from triformers.triton._kernels._dropout_tiles import (  # noqa: F401  (re-exported)
    _LANES,
    LANES,
    _bwd_load,
    _bwd_store,
    _fwd_load,
    _fwd_store,
    _lane_keep,
)
from triformers.triton._kernels.reduce import sum_rows

# Lane block: 128 columns per lane (2 KB of bf16 per row across the 8 lanes) keeps loads full-width;
# the row count (BLOCK_M) is tuned so that a tile holds 4K-16K elements.
BLOCK_S_MAX = 128
# Rows per backward program when it also sums db (one float32 partial row of db per program, summed by
# `sum_rows`). H100, bf16, M = 16384, N = 4096 with gelu: a persistent grid (4 programs per SM, 124 rows
# each) ran at 0.38-0.41 ms; 32 rows per program leave many programs resident to hide memory latency
# while the partials (M / 32 float32 rows) stay ~2 % of the traffic.
DB_ROWS = 32
_PRUNE = prune_by_tile(4096, 16384, 8, 64, columns=lambda meta: LANES * meta["BLOCK_S"])


@triton.jit
def _dropout_fwd_kernel(
    x_ptr, b_ptr, y_ptr, M, N, L,  # L: lane width (columns), a multiple of 16
    stride_x_m, stride_x_n, stride_y_m, seed, threshold, scale,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Program (i, k) owns rows block i of lane-offset block k. All eight lanes are loaded before any is
    stored: y may alias x as far as the compiler knows, so a load after a store could not be issued
    early, and the program would wait for memory once per lane."""
    pid_m = tl.program_id(0)  # row block
    pid_c = tl.program_id(1)  # block of lane offsets, the same in all 8 lanes
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = pid_c * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    x0 = _fwd_load(x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_x_m, stride_x_n, 0, HAS_BIAS, EVEN)
    x1 = _fwd_load(x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_x_m, stride_x_n, 1, HAS_BIAS, EVEN)
    x2 = _fwd_load(x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_x_m, stride_x_n, 2, HAS_BIAS, EVEN)
    x3 = _fwd_load(x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_x_m, stride_x_n, 3, HAS_BIAS, EVEN)
    x4 = _fwd_load(x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_x_m, stride_x_n, 4, HAS_BIAS, EVEN)
    x5 = _fwd_load(x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_x_m, stride_x_n, 5, HAS_BIAS, EVEN)
    x6 = _fwd_load(x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_x_m, stride_x_n, 6, HAS_BIAS, EVEN)
    x7 = _fwd_load(x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_x_m, stride_x_n, 7, HAS_BIAS, EVEN)
    r0 = rows  # r0-r3 are unused without dropout
    r1 = rows
    r2 = rows
    r3 = rows
    if HAS_DROPOUT:
        r0, r1, r2, r3 = tl.randint4x(seed, rows64[:, None] * L + offs[None, :])
    # fmt: off
    _fwd_store(x0, r0, r1, r2, r3, y_ptr, rows64, row_ok, offs, L, N, stride_y_m, threshold, scale, 0,
               ACTIVATION, HAS_DROPOUT, EVEN)
    _fwd_store(x1, r0, r1, r2, r3, y_ptr, rows64, row_ok, offs, L, N, stride_y_m, threshold, scale, 1,
               ACTIVATION, HAS_DROPOUT, EVEN)
    _fwd_store(x2, r0, r1, r2, r3, y_ptr, rows64, row_ok, offs, L, N, stride_y_m, threshold, scale, 2,
               ACTIVATION, HAS_DROPOUT, EVEN)
    _fwd_store(x3, r0, r1, r2, r3, y_ptr, rows64, row_ok, offs, L, N, stride_y_m, threshold, scale, 3,
               ACTIVATION, HAS_DROPOUT, EVEN)
    _fwd_store(x4, r0, r1, r2, r3, y_ptr, rows64, row_ok, offs, L, N, stride_y_m, threshold, scale, 4,
               ACTIVATION, HAS_DROPOUT, EVEN)
    _fwd_store(x5, r0, r1, r2, r3, y_ptr, rows64, row_ok, offs, L, N, stride_y_m, threshold, scale, 5,
               ACTIVATION, HAS_DROPOUT, EVEN)
    _fwd_store(x6, r0, r1, r2, r3, y_ptr, rows64, row_ok, offs, L, N, stride_y_m, threshold, scale, 6,
               ACTIVATION, HAS_DROPOUT, EVEN)
    _fwd_store(x7, r0, r1, r2, r3, y_ptr, rows64, row_ok, offs, L, N, stride_y_m, threshold, scale, 7,
               ACTIVATION, HAS_DROPOUT, EVEN)
    # fmt: on


@triton.jit
def _dropout_bwd_kernel(
    dy_ptr, x_ptr, b_ptr, dx_ptr, db_ptr,  # db_ptr: [row chunks, N] float32 partial sums
    M, N, L, stride_dy_m, stride_dy_n, stride_x_m, stride_x_n, stride_dx_m, seed, threshold, scale,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_DB: tl.constexpr,
    EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Program (i, k) owns row chunk i of lane-offset block k (one tile per program without db; DB_ROWS
    rows, looped over in tiles, with db, so that each program writes one partial row of db).

    All eight lanes are loaded before any is stored: dx may alias dy, so a load after a store could not
    be issued early, and a persistent program would wait for memory once per lane."""
    pid_m = tl.program_id(0)  # row chunk
    pid_c = tl.program_id(1)  # block of lane offsets
    rows_per_program = tl.cdiv(M, tl.num_programs(0))
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    offs = pid_c * BLOCK_S + tl.arange(0, BLOCK_S)
    # one accumulator tile per lane (for db), summed over its rows once at the end: a column sum per tile
    # would shuffle through shared memory (with barriers) eight times per iteration
    acc0 = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
    acc4 = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
    acc5 = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
    acc6 = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
    acc7 = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        # fmt: off
        g0, z0 = _bwd_load(dy_ptr, x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_dy_m, stride_dy_n, stride_x_m,
                           stride_x_n, 0, ACTIVATION, HAS_BIAS, EVEN)
        g1, z1 = _bwd_load(dy_ptr, x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_dy_m, stride_dy_n, stride_x_m,
                           stride_x_n, 1, ACTIVATION, HAS_BIAS, EVEN)
        g2, z2 = _bwd_load(dy_ptr, x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_dy_m, stride_dy_n, stride_x_m,
                           stride_x_n, 2, ACTIVATION, HAS_BIAS, EVEN)
        g3, z3 = _bwd_load(dy_ptr, x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_dy_m, stride_dy_n, stride_x_m,
                           stride_x_n, 3, ACTIVATION, HAS_BIAS, EVEN)
        g4, z4 = _bwd_load(dy_ptr, x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_dy_m, stride_dy_n, stride_x_m,
                           stride_x_n, 4, ACTIVATION, HAS_BIAS, EVEN)
        g5, z5 = _bwd_load(dy_ptr, x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_dy_m, stride_dy_n, stride_x_m,
                           stride_x_n, 5, ACTIVATION, HAS_BIAS, EVEN)
        g6, z6 = _bwd_load(dy_ptr, x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_dy_m, stride_dy_n, stride_x_m,
                           stride_x_n, 6, ACTIVATION, HAS_BIAS, EVEN)
        g7, z7 = _bwd_load(dy_ptr, x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_dy_m, stride_dy_n, stride_x_m,
                           stride_x_n, 7, ACTIVATION, HAS_BIAS, EVEN)
        r0 = rows  # r0-r3 are unused without dropout
        r1 = rows
        r2 = rows
        r3 = rows
        if HAS_DROPOUT:
            r0, r1, r2, r3 = tl.randint4x(seed, rows64[:, None] * L + offs[None, :])
        acc0 += _bwd_store(g0, z0, r0, r1, r2, r3, dx_ptr, rows64, row_ok, offs, L, N, stride_dx_m, threshold, scale,
                           0, ACTIVATION, HAS_DROPOUT, COMPUTE_DB, EVEN, BLOCK_M, BLOCK_S)
        acc1 += _bwd_store(g1, z1, r0, r1, r2, r3, dx_ptr, rows64, row_ok, offs, L, N, stride_dx_m, threshold, scale,
                           1, ACTIVATION, HAS_DROPOUT, COMPUTE_DB, EVEN, BLOCK_M, BLOCK_S)
        acc2 += _bwd_store(g2, z2, r0, r1, r2, r3, dx_ptr, rows64, row_ok, offs, L, N, stride_dx_m, threshold, scale,
                           2, ACTIVATION, HAS_DROPOUT, COMPUTE_DB, EVEN, BLOCK_M, BLOCK_S)
        acc3 += _bwd_store(g3, z3, r0, r1, r2, r3, dx_ptr, rows64, row_ok, offs, L, N, stride_dx_m, threshold, scale,
                           3, ACTIVATION, HAS_DROPOUT, COMPUTE_DB, EVEN, BLOCK_M, BLOCK_S)
        acc4 += _bwd_store(g4, z4, r0, r1, r2, r3, dx_ptr, rows64, row_ok, offs, L, N, stride_dx_m, threshold, scale,
                           4, ACTIVATION, HAS_DROPOUT, COMPUTE_DB, EVEN, BLOCK_M, BLOCK_S)
        acc5 += _bwd_store(g5, z5, r0, r1, r2, r3, dx_ptr, rows64, row_ok, offs, L, N, stride_dx_m, threshold, scale,
                           5, ACTIVATION, HAS_DROPOUT, COMPUTE_DB, EVEN, BLOCK_M, BLOCK_S)
        acc6 += _bwd_store(g6, z6, r0, r1, r2, r3, dx_ptr, rows64, row_ok, offs, L, N, stride_dx_m, threshold, scale,
                           6, ACTIVATION, HAS_DROPOUT, COMPUTE_DB, EVEN, BLOCK_M, BLOCK_S)
        acc7 += _bwd_store(g7, z7, r0, r1, r2, r3, dx_ptr, rows64, row_ok, offs, L, N, stride_dx_m, threshold, scale,
                           7, ACTIVATION, HAS_DROPOUT, COMPUTE_DB, EVEN, BLOCK_M, BLOCK_S)
        # fmt: on
    if COMPUTE_DB:
        for j in tl.static_range(_LANES):
            cols = j * L + offs
            if j == 0:
                acc = acc0
            elif j == 1:
                acc = acc1
            elif j == 2:
                acc = acc2
            elif j == 3:
                acc = acc3
            elif j == 4:
                acc = acc4
            elif j == 5:
                acc = acc5
            elif j == 6:
                acc = acc6
            else:
                acc = acc7
            tl.store(db_ptr + pid_m * N + cols, tl.sum(acc, axis=0), mask=(offs < L) & (cols < N))


_fwd = Tuner(_dropout_fwd_kernel, tile_configs(), _PRUNE)


def _prune_bwd(configs, meta):
    """The forward's candidates; with db, none taller than a program's DB_ROWS rows."""
    return [c for c in _PRUNE(configs, meta) if not meta["COMPUTE_DB"] or c["BLOCK_M"] <= DB_ROWS]


_bwd = Tuner(_dropout_bwd_kernel, tile_configs(), _prune_bwd)


def _lanes(N: int) -> tuple[int, int]:
    """(lane width L, lane block BLOCK_S)."""
    L = cdiv(cdiv(N, LANES), 16) * 16
    return L, min(BLOCK_S_MAX, next_pow2(L))


def _threshold_and_scale(p: float) -> tuple[int, float]:
    t = min(1 << 16, max(0, round(p * (1 << 16))))
    return t, (0.0 if t == 1 << 16 else (1 << 16) / ((1 << 16) - t))


def dropout_fwd(
    x: torch.Tensor,  # [M, N], any strides
    bias: torch.Tensor | None,  # [N]
    p: float,
    seed: int,
    activation: int,  # index from get_triton_activation_index
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``dropout(f(x + bias), p)`` with the random bits of ``seed``; a contiguous ``[M, N]`` tensor."""
    M, N = x.shape
    y = torch.empty((M, N), device=x.device, dtype=out_dtype)
    b = bias if bias is not None else x
    L, threshold, scale, grid, key, default, meta = _fwd_plan(M, N, p, activation, bias is not None, x.dtype,
                                                              b.dtype, out_dtype)
    sx0, sx1 = x.stride()
    args = (x, b, y, M, N, L, sx0, sx1, N, seed, threshold, scale)  # y: fresh [M, N]
    dyn = (M, sx0, sx1, x.data_ptr() & 15, b.data_ptr() & 15, int_code(seed), int_code(threshold))
    _fwd(grid, args, key, default, meta, dyn)
    return y


@functools.lru_cache(maxsize=512)
def _fwd_plan(M, N, p, activation, has_bias, x_dtype, b_dtype, y_dtype):
    """Everything of a forward launch but the tensors and the seed, per shape (host time: the N = 1024
    forwards of the benchmark take about as long to issue as to run)."""
    L, block_s = _lanes(N)
    threshold, scale = _threshold_and_scale(p)
    # every tile whole, for every candidate BLOCK_M (<= 64): no bounds masks, full-width loads and stores
    even = M % 64 == 0 and N == LANES * L and L % block_s == 0
    meta = dict(ACTIVATION=activation, HAS_BIAS=has_bias, HAS_DROPOUT=p > 0.0, EVEN=even, BLOCK_S=block_s)
    key = (N, x_dtype, b_dtype, y_dtype, *meta.values())
    grid = lambda c: (cdiv(M, c["BLOCK_M"]), cdiv(L, block_s))  # noqa: E731
    return L, threshold, scale, grid, key, default_tile(LANES * block_s), meta


@functools.lru_cache(maxsize=512)
def _bwd_plan(M, N, p, activation, has_bias, compute_db, dy_dtype, x_dtype, b_dtype, dx_dtype):
    """Everything of a backward launch but the tensors and the seed, per shape (as ``_fwd_plan``)."""
    L, block_s = _lanes(N)
    threshold, scale = _threshold_and_scale(p)
    lane_blocks = cdiv(L, block_s)
    if compute_db:  # DB_ROWS rows per program, each program writing one partial row of db
        chunks = cdiv(M, DB_ROWS)
        grid = lambda c: (chunks, lane_blocks)  # noqa: E731
    else:  # one tile per program, as in the forward
        chunks = 0
        grid = lambda c: (cdiv(M, c["BLOCK_M"]), lane_blocks)  # noqa: E731
    # every tile whole (as in the forward; with db, every BLOCK_M divides the DB_ROWS rows of a program)
    even = M % 64 == 0 and N == LANES * L and L % block_s == 0
    meta = dict(ACTIVATION=activation, HAS_BIAS=has_bias, HAS_DROPOUT=p > 0.0, COMPUTE_DB=compute_db, EVEN=even,
                BLOCK_S=block_s)
    key = (N, dy_dtype, x_dtype, b_dtype, dx_dtype, *meta.values())
    return L, threshold, scale, grid, chunks, key, default_tile(LANES * block_s), meta


def dropout_bwd(
    dy: torch.Tensor,  # [M, N], any strides
    x: torch.Tensor,  # [M, N], the forward's input (FusedLinear: the pre-activation)
    bias: torch.Tensor | None,
    p: float,
    seed: int,
    activation: int,
    *,
    dx_dtype: torch.dtype,
    compute_db: bool,
    db_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`dropout_fwd`: ``(dx [M, N], db [N] in db_dtype | None)``."""
    M, N = x.shape
    dx = torch.empty((M, N), device=x.device, dtype=dx_dtype)
    b = bias if bias is not None else x
    L, threshold, scale, grid, chunks, key, default, meta = _bwd_plan(
        M, N, p, activation, bias is not None, compute_db, dy.dtype, x.dtype, b.dtype, dx_dtype
    )
    db = torch.empty((chunks, N), device=x.device, dtype=torch.float32) if compute_db else None
    # fmt: off
    sdy0, sdy1, sx0, sx1 = *dy.stride(), *x.stride()
    args = (dy, x, b, dx, db if db is not None else dx, M, N, L, sdy0, sdy1, sx0, sx1, N, seed, threshold, scale)
    dyn = (M, sdy0, sdy1, sx0, sx1, dy.data_ptr() & 15, x.data_ptr() & 15, b.data_ptr() & 15, int_code(seed),
           int_code(threshold))  # dx, db: fresh
    # fmt: on
    _bwd(grid, args, key, default, meta, dyn)
    return dx, sum_rows(db, db_dtype) if db is not None else None
