"""Fused bias + activation + dropout kernels, and their launchers.

Forward: y = keep ⊙ f(x + b) / (1 - p), keep = u > p with u uniform in [0, 1) drawn by Philox from
(seed, element index); backward: dx = keep ⊙ dy / (1 - p) ⊙ f'(x + b), db = Σ_rows dx.

The backward regenerates ``keep`` from the seed instead of storing it: the random stream of element
(r, c) is Philox(seed, counter = r·⌈N/4⌉ + ⌊c/4⌋), output word c mod 4, so any tiling draws the same bits.
One Philox call yields four words, hence four columns per call.

Memory traffic for x [M, N] (element size s): forward reads x (M·N·s) and writes y (M·N·s); backward
reads x and dy and writes dx (3·M·N·s) with db through a two-stage reduction (per-program float32 rows).
Eager torch (x + b, f, dropout) reads 3·M·N·s and writes 3·M·N·s plus an M·N mask in the forward, and
keeps the mask and f's input alive for the backward.

The same backward kernel with p = 0 and no bias is FusedLinear's activation gradient (x = pre-activation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triformers.triton._common import launch, next_pow2, prune_by_tile, sm_count, tuned
from triformers.triton._kernels.activations import activation_grad, apply_activation

# Column block: 1024 bf16 columns are 2 KB contiguous per row, wide enough for full-width vector loads;
# the row count (BLOCK_M) is autotuned so a tile holds 4K-16K elements.
BLOCK_N_MAX = 1024
# Persistent backward programs per SM: a program holds ~4 float32 values per element of its tile, so four
# 8-warp programs of 8K-element tiles fit the 64K registers; the db partials stay under 1 % of the traffic.
BWD_PROGRAMS_PER_SM = 4
_TILE_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=w) for bm in (1, 2, 4, 8, 16, 32, 64) for w in (4, 8, 16)
]
_PRUNE = {"early_config_prune": prune_by_tile(4096, 16384, 8, 64)}


@triton.jit
def _keep_mask(seed, rows, col0, N4, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """keep[i, j] for element (rows[i], col0 + j); col0 is a multiple of 4."""
    c4 = col0 // 4 + tl.arange(0, BLOCK_N // 4)
    counter = rows.to(tl.int64)[:, None] * N4 + c4[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    # [BLOCK_M, BLOCK_N // 4, 2, 2] -> column 4c + k holds word k of counter c
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    return tl.random.uint_to_uniform_float(r) > p


@triton.jit
def _dropout_fwd_kernel(
    x_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    N4,
    stride_x_m,
    stride_x_n,
    stride_y_m,
    seed,
    p,
    scale,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)  # row block
    pid_n = tl.program_id(1)  # column block
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)
    z = tl.load(x_ptr + rows64[:, None] * stride_x_m + cols[None, :] * stride_x_n, mask=ok, other=0.0).to(
        tl.float32
    )
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y = apply_activation(z, ACTIVATION)
    if HAS_DROPOUT:
        keep = _keep_mask(seed, rows, pid_n * BLOCK_N, N4, p, BLOCK_M, BLOCK_N)
        y = tl.where(keep, y * scale, 0.0)
    tl.store(y_ptr + rows64[:, None] * stride_y_m + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dropout_bwd_kernel(
    dy_ptr,
    x_ptr,
    b_ptr,
    dx_ptr,
    db_ptr,  # db_ptr: [row chunks, N] float32 partial sums
    M,
    N,
    N4,
    stride_dy_m,
    stride_dy_n,
    stride_x_m,
    stride_x_n,
    stride_dx_m,
    seed,
    p,
    scale,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
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
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        ok = (rows < row_end)[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        g = tl.load(dy_ptr + rows64[:, None] * stride_dy_m + cols[None, :] * stride_dy_n, mask=ok, other=0.0)
        g = g.to(tl.float32)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, rows, pid_n * BLOCK_N, N4, p, BLOCK_M, BLOCK_N)
            g = tl.where(keep, g * scale, 0.0)
        if ACTIVATION != 0:
            z = tl.load(x_ptr + rows64[:, None] * stride_x_m + cols[None, :] * stride_x_n, mask=ok, other=0.0)
            z = z.to(tl.float32)
            if HAS_BIAS:
                z += b[None, :]
            g = g * activation_grad(z, ACTIVATION)
        tl.store(
            dx_ptr + rows64[:, None] * stride_dx_m + cols[None, :], g.to(dx_ptr.dtype.element_ty), mask=ok
        )
        if COMPUTE_DB:
            db_acc += tl.sum(tl.where(ok, g, 0.0), axis=0)
    if COMPUTE_DB:
        tl.store(db_ptr + pid_m * N + cols, db_acc, mask=col_ok)


_fwd = tuned(
    _dropout_fwd_kernel,
    _TILE_CONFIGS,
    ["N", "BLOCK_N", "ACTIVATION", "HAS_BIAS", "HAS_DROPOUT"],
    prune_configs_by=_PRUNE,
)
_bwd = tuned(
    _dropout_bwd_kernel,
    _TILE_CONFIGS,
    ["N", "BLOCK_N", "ACTIVATION", "HAS_BIAS", "HAS_DROPOUT", "COMPUTE_DB"],
    prune_configs_by=_PRUNE,
)


def _block_n(N: int) -> int:
    return max(4, min(BLOCK_N_MAX, next_pow2(N)))


def _scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def dropout_fwd(
    x: torch.Tensor,  # [M, N], any strides
    bias: torch.Tensor | None,  # [N]
    p: float,
    seed: int,
    activation: int,  # index from get_triton_activation_index
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``dropout(f(x + bias), p)`` with the Philox stream of ``seed``; a contiguous ``[M, N]`` tensor."""
    M, N = x.shape
    y = torch.empty((M, N), device=x.device, dtype=out_dtype)
    block_n = _block_n(N)
    launch(
        _fwd,
        lambda c: (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(N, block_n)),
        x,
        bias if bias is not None else x,
        y,
        M,
        N,
        triton.cdiv(N, 4),
        x.stride(0),
        x.stride(1),
        y.stride(0),
        seed,
        p,
        _scale(p),
        interp={"BLOCK_M": max(1, 4096 // block_n)},
        ACTIVATION=activation,
        HAS_BIAS=bias is not None,
        HAS_DROPOUT=p > 0.0,
        BLOCK_N=block_n,
    )
    return y


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`dropout_fwd`: ``(dx [M, N], db [N] float32 | None)``."""
    M, N = x.shape
    dx = torch.empty((M, N), device=x.device, dtype=dx_dtype)
    block_n = _block_n(N)
    col_blocks = triton.cdiv(N, block_n)
    chunks = max(1, min(M, triton.cdiv(BWD_PROGRAMS_PER_SM * sm_count(x), col_blocks)))
    db = torch.empty((chunks, N), device=x.device, dtype=torch.float32) if compute_db else None
    launch(
        _bwd,
        (chunks, col_blocks),
        dy,
        x,
        bias if bias is not None else x,
        dx,
        db if db is not None else dx,
        M,
        N,
        triton.cdiv(N, 4),
        dy.stride(0),
        dy.stride(1),
        x.stride(0),
        x.stride(1),
        dx.stride(0),
        seed,
        p,
        _scale(p),
        interp={"BLOCK_M": max(1, 4096 // block_n)},
        ACTIVATION=activation,
        HAS_BIAS=bias is not None,
        HAS_DROPOUT=p > 0.0,
        COMPUTE_DB=compute_db,
        BLOCK_N=block_n,
    )
    return dx, db.sum(0) if db is not None else None
