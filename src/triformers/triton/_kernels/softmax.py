"""Softmax / log-softmax over the last dim, with an additive mask and a causal option, and launchers.

Forward, row r (query index i = r mod M_seq): z = x + mask[i] with z_j = -inf for j > i when causal,
softmax y = exp(z - max z) / Σ exp(z - max z), log-softmax y = z - max z - log Σ exp(z - max z).
Backward: softmax dx = y ⊙ (dy - Σ y ⊙ dy), log-softmax dx = dy - exp(y) Σ dy (0 where y = -inf: a
hidden logit gets no gradient).

Memory traffic for x [R, N] (element size s): forward reads R·N·s (the mask, shared across the batch,
stays in cache) and writes R·N·s; backward reads y and dy and writes dx, 3·R·N·s: each one pass, the
floor. Eager torch with a mask and causal hides makes 3 extra passes (x + mask, the triangular fill,
their temporaries) before its own softmax. Rows wider than ``MAX_BLOCK_N`` loop over column blocks
(online max/sum, then a write pass), reading x twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triformers.triton._common import Tuner, cdiv, default_tile, next_pow2, prune_by_tile, tile_configs

# One row in registers up to 8192 columns (x, and y/dy in the backward, as float32 at 16 warps: 16-32
# registers each); wider rows loop, like the norms.
MAX_BLOCK_N = 8192
LOOP_BLOCK_N = 4096
_PRUNE = prune_by_tile(4096, 16384, 8, 64)  # as for the norms: 4K-16K element tiles, 8-64 per thread
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _load_logits(
    x_ptr,
    mask_ptr,
    rows,
    qi,
    cols,
    row_ok,
    N,
    stride_x_m,
    stride_x_n,
    stride_mask_m,
    stride_mask_n,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """z = x (+ mask) with -inf outside the row, and above the diagonal when causal."""
    ok = row_ok[:, None] & (cols < N)[None, :]
    z = tl.load(
        x_ptr + rows.to(tl.int64)[:, None] * stride_x_m + cols[None, :] * stride_x_n,
        mask=ok,
        other=float("-inf"),
    ).to(tl.float32)
    if HAS_MASK:
        z += tl.load(mask_ptr + qi[:, None] * stride_mask_m + cols[None, :] * stride_mask_n, mask=ok, other=0.0).to(
            tl.float32
        )
    if CAUSAL:
        z = tl.where(cols[None, :] > qi[:, None], float("-inf"), z)
    return z, ok


@triton.jit
def _softmax_fwd_kernel(
    x_ptr,
    mask_ptr,
    y_ptr,
    R,
    N,
    SEQ_M,  # SEQ_M: rows per mask / causal period (x.shape[-2])
    stride_x_m,
    stride_x_n,
    stride_mask_m,
    stride_mask_n,
    stride_y_m,
    LOG: tl.constexpr,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    pid = tl.program_id(0)  # row block
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    qi = rows % SEQ_M
    y_row = y_ptr + rows.to(tl.int64)[:, None] * stride_y_m
    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_N)
        z, ok = _load_logits(
            x_ptr,
            mask_ptr,
            rows,
            qi,
            cols,
            row_ok,
            N,
            stride_x_m,
            stride_x_n,
            stride_mask_m,
            stride_mask_n,
            HAS_MASK,
            CAUSAL,
        )
        m = tl.max(z, axis=1)
        e = tl.exp2((z - m[:, None]) * _LOG2E)
        s = tl.sum(e, axis=1)
        if LOG:
            y = z - (m + tl.log(s))[:, None]
        else:
            y = e * (1.0 / s)[:, None]
        tl.store(y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            z, ok = _load_logits(
                x_ptr,
                mask_ptr,
                rows,
                qi,
                cols,
                row_ok,
                N,
                stride_x_m,
                stride_x_n,
                stride_mask_m,
                stride_mask_n,
                HAS_MASK,
                CAUSAL,
            )
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep l_i at 0, not NaN
            l_i = l_i * tl.exp2((m_i - m_safe) * _LOG2E) + tl.sum(tl.exp2((z - m_safe[:, None]) * _LOG2E), axis=1)
            m_i = m_new
        lse = m_i + tl.log(l_i)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            z, ok = _load_logits(
                x_ptr,
                mask_ptr,
                rows,
                qi,
                cols,
                row_ok,
                N,
                stride_x_m,
                stride_x_n,
                stride_mask_m,
                stride_mask_n,
                HAS_MASK,
                CAUSAL,
            )
            y = z - lse[:, None]
            if not LOG:
                y = tl.exp2(y * _LOG2E)
            tl.store(y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _softmax_bwd_kernel(
    y_ptr,
    dy_ptr,
    dx_ptr,
    R,
    N,
    stride_y_m,
    stride_dy_m,
    stride_dy_n,
    stride_dx_m,
    LOG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    pid = tl.program_id(0)  # row block
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    y_row = y_ptr + rows64[:, None] * stride_y_m
    dy_row = dy_ptr + rows64[:, None] * stride_dy_m
    dx_row = dx_ptr + rows64[:, None] * stride_dx_m
    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (cols < N)[None, :]
        y = tl.load(y_row + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols[None, :] * stride_dy_n, mask=ok, other=0.0).to(tl.float32)
        if LOG:  # hidden logits (y = -inf: causal or a -inf mask) get no gradient
            dx = tl.where(y == float("-inf"), 0.0, dy - tl.exp2(y * _LOG2E) * tl.sum(dy, axis=1)[:, None])
        else:
            dx = y * (dy - tl.sum(y * dy, axis=1)[:, None])
        tl.store(dx_row + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            ok = row_ok[:, None] & (cols < N)[None, :]
            dy = tl.load(dy_row + cols[None, :] * stride_dy_n, mask=ok, other=0.0).to(tl.float32)
            if LOG:
                acc += dy
            else:
                acc += dy * tl.load(y_row + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        total = tl.sum(acc, axis=1)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            ok = row_ok[:, None] & (cols < N)[None, :]
            y = tl.load(y_row + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols[None, :] * stride_dy_n, mask=ok, other=0.0).to(tl.float32)
            if LOG:
                dx = tl.where(y == float("-inf"), 0.0, dy - tl.exp2(y * _LOG2E) * total[:, None])
            else:
                dx = y * (dy - total[:, None])
            tl.store(dx_row + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)


_fwd = Tuner(_softmax_fwd_kernel, tile_configs(), _PRUNE)
_bwd = Tuner(_softmax_bwd_kernel, tile_configs(), _PRUNE)


def _blocks(N: int, max_block_n: int | None) -> tuple[bool, int]:
    max_block_n = max_block_n or MAX_BLOCK_N
    single = next_pow2(N) <= max_block_n
    block_n = next_pow2(N) if single else min(LOOP_BLOCK_N, next_pow2(max_block_n))
    return single, block_n


def softmax_fwd(
    x: torch.Tensor,  # [R, N], any strides
    mask: torch.Tensor | None,  # [SEQ_M, N], any strides (0 for broadcast dims)
    seq_m: int,
    *,
    log: bool,
    causal: bool,
    out_dtype: torch.dtype,
    max_block_n: int | None = None,  # default MAX_BLOCK_N (read per call)
) -> torch.Tensor:
    """(Log-)softmax of the rows of ``x``; returns a contiguous ``[R, N]`` tensor of ``out_dtype``."""
    R, N = x.shape
    y = torch.empty((R, N), device=x.device, dtype=out_dtype)
    single, block_n = _blocks(N, max_block_n)
    m = mask if mask is not None else x
    sx0, sx1, sm0, sm1 = *x.stride(), *m.stride()
    args = (x, m, y, R, N, seq_m, sx0, sx1, sm0, sm1, N)  # y: fresh [R, N]
    meta = dict(LOG=log, HAS_MASK=mask is not None, CAUSAL=causal, BLOCK_N=block_n, SINGLE_PASS=single)
    if single:
        key = (N, x.dtype, m.dtype, y.dtype, *meta.values())
        dyn = (R, seq_m, sx0, sx1, sm0, sm1, x.data_ptr() & 15, m.data_ptr() & 15)
        _fwd(lambda c: (cdiv(R, c["BLOCK_M"]),), args, key, default_tile(block_n), meta, dyn)
    else:
        _softmax_fwd_kernel[(R,)](*args, BLOCK_M=1, num_warps=8, **meta)
    return y


def softmax_bwd(
    dy: torch.Tensor,  # [R, N], any strides
    y: torch.Tensor,  # [R, N] contiguous rows (the forward's output)
    *,
    log: bool,
    dx_dtype: torch.dtype,
    max_block_n: int | None = None,  # default MAX_BLOCK_N (read per call)
) -> torch.Tensor:
    """Gradient of :func:`softmax_fwd` with respect to its logits, ``[R, N]``."""
    R, N = y.shape
    dx = torch.empty((R, N), device=y.device, dtype=dx_dtype)
    single, block_n = _blocks(N, max_block_n)
    sy0, sdy0, sdy1 = y.stride(0), *dy.stride()
    args = (y, dy, dx, R, N, sy0, sdy0, sdy1, N)  # dx: fresh [R, N]
    if single:
        meta = dict(LOG=log, BLOCK_N=block_n, SINGLE_PASS=True)
        key = (N, y.dtype, dy.dtype, dx.dtype, *meta.values())
        dyn = (R, sy0, sdy0, sdy1, y.data_ptr() & 15, dy.data_ptr() & 15)
        _bwd(lambda c: (cdiv(R, c["BLOCK_M"]),), args, key, default_tile(block_n), meta, dyn)
    else:
        _softmax_bwd_kernel[(R,)](*args, LOG=log, BLOCK_M=1, BLOCK_N=block_n, SINGLE_PASS=False, num_warps=8)
    return dx
