"""CSR SpMM and SDDMM kernels (the Sputnik operations) for one pattern shared by a batch, and launchers.

Notation: the pattern ``[m, n]`` has ``nnz`` entries, ``row_offsets [m + 1]``, ``column_indices [nnz]``;
``values [B, nnz]``. Programs visit rows through ``row_indices`` (rows by decreasing nnz, Sputnik's row swizzle:
the longest rows start first instead of trailing at the end of the launch).

- SpMM ``out[b, r] = Σ_e values[b, e] · dense[b, col_e]``: one program per (row, K tile, batch), ``BLOCK_E``
  entries per step gathered as a ``[BLOCK_E, BLOCK_K]`` tile of dense rows.
- SDDMM ``values[b, e] = a[b, row_e] · bt[b, col_e]`` (``bt`` = ``b`` transposed, ``[B, n, K]``): one program
  per (row, batch); each step gathers ``BLOCK_E`` rows of ``bt`` and reduces over K in ``BLOCK_K`` chunks.
Both accumulate in float32 and take any strides; they are memory-bound (no tensor cores: the entries of a CSR
row have no shared structure a ``tl.dot`` could use).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triformers._triton import cdiv, launch

# entries gathered per step: 32 x 64 fp16 gathered rows = 4 KB in flight per program.
BLOCK_E = 32
# dense columns per program (SpMM) / K chunk (SDDMM).
BLOCK_K = 64


@triton.jit
def _spmm_kernel(
    values_ptr,
    dense_ptr,
    out_ptr,
    row_offsets_ptr,
    column_indices_ptr,
    row_indices_ptr,
    K,
    stride_v_b,
    stride_v_e,
    stride_d_b,
    stride_d_n,
    stride_d_k,
    stride_o_b,
    stride_o_m,
    stride_o_k,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    r = tl.load(row_indices_ptr + tl.program_id(0)).to(tl.int64)  # row, longest first
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    bz = tl.program_id(2).to(tl.int64)  # batch
    start = tl.load(row_offsets_ptr + r)
    end = tl.load(row_offsets_ptr + r + 1)
    ee = tl.arange(0, BLOCK_E)
    k_ok = kk < K
    acc = tl.zeros((BLOCK_K,), tl.float32)
    for e0 in range(start, end, BLOCK_E):
        e_ok = e0 + ee < end
        col = tl.load(column_indices_ptr + e0 + ee, mask=e_ok, other=0).to(tl.int64)
        v = tl.load(values_ptr + bz * stride_v_b + (e0 + ee) * stride_v_e, mask=e_ok, other=0.0).to(tl.float32)
        d_ptrs = dense_ptr + bz * stride_d_b + col[:, None] * stride_d_n + kk[None, :] * stride_d_k
        d = tl.load(d_ptrs, mask=e_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v[:, None] * d, 0)
    o_ptrs = out_ptr + bz * stride_o_b + r * stride_o_m + kk * stride_o_k
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=k_ok)


@triton.jit
def _sddmm_kernel(
    a_ptr,
    bt_ptr,
    out_ptr,
    row_offsets_ptr,
    column_indices_ptr,
    row_indices_ptr,
    K,
    stride_a_b,
    stride_a_m,
    stride_a_k,
    stride_bt_b,
    stride_bt_n,
    stride_bt_k,
    stride_o_b,
    stride_o_e,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    r = tl.load(row_indices_ptr + tl.program_id(0)).to(tl.int64)  # row, longest first
    bz = tl.program_id(1).to(tl.int64)  # batch
    start = tl.load(row_offsets_ptr + r)
    end = tl.load(row_offsets_ptr + r + 1)
    ee = tl.arange(0, BLOCK_E)
    kk = tl.arange(0, BLOCK_K)
    a_row = a_ptr + bz * stride_a_b + r * stride_a_m
    for e0 in range(start, end, BLOCK_E):
        e_ok = e0 + ee < end
        col = tl.load(column_indices_ptr + e0 + ee, mask=e_ok, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_E,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = k0 + kk < K
            a = tl.load(a_row + (k0 + kk) * stride_a_k, mask=k_ok, other=0.0).to(tl.float32)
            b_ptrs = bt_ptr + bz * stride_bt_b + col[:, None] * stride_bt_n + (k0 + kk)[None, :] * stride_bt_k
            b = tl.load(b_ptrs, mask=e_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(b * a[None, :], 1)
        o_ptrs = out_ptr + bz * stride_o_b + (e0 + ee) * stride_o_e
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=e_ok)


def spmm(values, dense, row_offsets, column_indices, row_indices, m: int) -> torch.Tensor:
    """``[B, m, K]`` = CSR ``(values [B, nnz], pattern [m, n])`` @ ``dense [B, n, K]``."""
    B, _, K = dense.shape
    out = torch.empty((B, m, K), device=dense.device, dtype=dense.dtype)
    if out.numel() == 0:
        return out
    block_k = min(BLOCK_K, max(16, triton.next_power_of_2(K)))
    args = (values, dense, out, row_offsets, column_indices, row_indices, K, *values.stride(), *dense.stride(),
            *out.stride())
    launch(_spmm_kernel, (m, cdiv(K, block_k), B), args, dict(BLOCK_E=BLOCK_E, BLOCK_K=block_k))
    return out


def sddmm(a, bt, row_offsets, column_indices, row_indices, nnz: int) -> torch.Tensor:
    """``[B, nnz]``: ``(a [B, m, K] @ bt [B, n, K]ᵀ)`` at the pattern's entries."""
    B, m, K = a.shape
    out = torch.empty((B, nnz), device=a.device, dtype=a.dtype)
    if out.numel() == 0:
        return out
    if K == 0:
        return out.zero_()
    block_k = min(BLOCK_K, max(16, triton.next_power_of_2(K)))
    args = (a, bt, out, row_offsets, column_indices, row_indices, K, *a.stride(), *bt.stride(), *out.stride())
    launch(_sddmm_kernel, (m, B), args, dict(BLOCK_E=BLOCK_E, BLOCK_K=block_k))
    return out
