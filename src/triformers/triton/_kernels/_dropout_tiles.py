"""The per-lane tile steps of the fused dropout kernels (``dropout.py``): the keep decision from a Philox word,
and the loads and stores of one lane of a row tile, forward and backward."""

from __future__ import annotations

import triton
import triton.language as tl

from triformers.triton._kernels.activations import activation_grad, apply_activation

LANES = 8  # 16-bit random numbers per Philox call (4 words x 2 halves)


_LANES = tl.constexpr(LANES)


@triton.jit
def _lane_keep(r0, r1, r2, r3, J: tl.constexpr, threshold):
    """keep for lane J: the 16-bit half J % 2 of Philox word J // 2, at least ``threshold``."""
    if J // 2 == 0:
        w = r0
    elif J // 2 == 1:
        w = r1
    elif J // 2 == 2:
        w = r2
    else:
        w = r3
    bits = (w.to(tl.uint32, bitcast=True) >> (16 * (J % 2))) & 0xFFFF
    return bits.to(tl.int32) >= threshold


@triton.jit
def _fwd_load(x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_x_m, stride_x_n, J: tl.constexpr,
              HAS_BIAS: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
    """Lane J's tile of x + bias, in float32 (``EVEN``: every tile is whole, no bounds masks)."""
    cols = J * L + offs
    col_ok = (offs < L) & (cols < N)
    ok = row_ok[:, None] & col_ok[None, :]
    x_ptrs = x_ptr + rows64[:, None] * stride_x_m + cols[None, :] * stride_x_n
    b_ptrs = b_ptr + (rows64 * 0)[:, None] + cols[None, :]
    if EVEN:
        z = tl.load(x_ptrs).to(tl.float32)
    else:
        z = tl.load(x_ptrs, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:  # read as a [BLOCK_M, BLOCK_S] tile of stride-0 rows: x's layout, no shuffle through smem
        if EVEN:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        z += b.to(tl.float32)
    return z


@triton.jit
def _fwd_store(z, r0, r1, r2, r3, y_ptr, rows64, row_ok, offs, L, N, stride_y_m, threshold, scale,
               J: tl.constexpr, ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
    """y for lane J from its tile of x + bias."""
    cols = J * L + offs
    y = apply_activation(z, ACTIVATION)
    if HAS_DROPOUT:
        y = tl.where(_lane_keep(r0, r1, r2, r3, J, threshold), y * scale, 0.0)
    y_ptrs = y_ptr + rows64[:, None] * stride_y_m + cols[None, :]
    if EVEN:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty))
    else:
        ok = row_ok[:, None] & ((offs < L) & (cols < N))[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_load(dy_ptr, x_ptr, b_ptr, rows64, row_ok, offs, L, N, stride_dy_m, stride_dy_n, stride_x_m, stride_x_n,
              J: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
    """Lane J's tiles of dy and of the activation's input (dy again when there is no activation)."""
    cols = J * L + offs
    col_ok = (offs < L) & (cols < N)
    ok = row_ok[:, None] & col_ok[None, :]
    dy_ptrs = dy_ptr + rows64[:, None] * stride_dy_m + cols[None, :] * stride_dy_n
    if EVEN:
        g = tl.load(dy_ptrs)
    else:
        g = tl.load(dy_ptrs, mask=ok, other=0.0)
    if ACTIVATION != 0:
        x_ptrs = x_ptr + rows64[:, None] * stride_x_m + cols[None, :] * stride_x_n
        if EVEN:
            z = tl.load(x_ptrs).to(tl.float32)
        else:
            z = tl.load(x_ptrs, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:  # a [BLOCK_M, BLOCK_S] tile of stride-0 rows, as in the forward: no shuffle through smem
            b_ptrs = b_ptr + (rows64 * 0)[:, None] + cols[None, :]
            if EVEN:
                z += tl.load(b_ptrs).to(tl.float32)
            else:
                z += tl.load(b_ptrs, mask=col_ok[None, :], other=0.0).to(tl.float32)
    else:
        z = g
    return g, z


@triton.jit
def _bwd_store(g, z, r0, r1, r2, r3, dx_ptr, rows64, row_ok, offs, L, N, stride_dx_m, threshold, scale,
               J: tl.constexpr, ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_DB: tl.constexpr,
               EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """dx for lane J from its loaded tiles; returns the tile of dx in float32 (0 outside the bounds) for
    the db accumulator, or zeros."""
    cols = J * L + offs
    ok = row_ok[:, None] & ((offs < L) & (cols < N))[None, :]
    g = g.to(tl.float32)
    if HAS_DROPOUT:
        g = tl.where(_lane_keep(r0, r1, r2, r3, J, threshold), g * scale, 0.0)
    if ACTIVATION != 0:
        g = g * activation_grad(z, ACTIVATION)
    dx_ptrs = dx_ptr + rows64[:, None] * stride_dx_m + cols[None, :]
    if EVEN:
        tl.store(dx_ptrs, g.to(dx_ptr.dtype.element_ty))
    else:
        tl.store(dx_ptrs, g.to(dx_ptr.dtype.element_ty), mask=ok)
    if COMPUTE_DB:
        if EVEN:
            return g
        else:
            return tl.where(ok, g, 0.0)
    else:
        return tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
