"""Merging partial attentions: the kernel and its launcher (the same math in torch operations is
:func:`triformers.ops.fmha.merge.merge_partials_torch`).

Attention over keys split into ``S`` disjoint parts, each part ``s`` giving an output ``O_s`` and its
log-sum-exp ``L_s``, is recovered exactly (arXiv 2402.05099)::

    L_max = max_s L_s      w_s = exp(L_s - L_max)      O = sum_s w_s O_s / sum_s w_s      L = L_max + log sum_s w_s

A part with ``L_s = -inf`` (it saw no key) contributes nothing; when every part is ``-inf`` the row is 0 and
``L = -inf``, never NaN. Sums are in float32 (float64 for float64 inputs).

Memory traffic: reads ``S * rows * K`` partial outputs and ``S * rows`` lse values, writes ``rows * K``; one
program merges one row, reading its parts' lse for the maximum, then ``BLOCK_S`` parts at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triformers._triton import launch

# Parts read at once: a [BLOCK_S, BLOCK_K] tile of at most MERGE_TILE values (float32: 64 per thread at 4 warps).
# One program merges one row, its parts loaded together: a decoding step merges up to 128 parts of few rows
# (B * Hq rows at Mq = 1), and a loop over the parts one at a time left each program waiting on a load per
# part (split-K at B = 1, L = 131072 on an H200: 64 parts of 32 rows, 0.147 ms in all against 0.131 at B = 4
# with 16 parts, for the same bytes).
MERGE_TILE = 8192
NUM_WARPS_MERGE = 4


@triton.jit
def merge_partials_kernel(
    Attn, Lse, Out, LseOut,
    stride_as, stride_ab, stride_am, stride_ag, stride_ah,  # attn [S, B, M, G, H, K]
    stride_ls, stride_lb, stride_lg, stride_lh, stride_lm,  # lse [S, B, G, H, M]
    stride_ob, stride_om, stride_og, stride_oh,  # out [B, M, G, H, K]
    stride_xb, stride_xg, stride_xh, stride_xm,  # lse_out [B, G, H, M]
    S, M, G, H, K,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_LSE: tl.constexpr, ACC_F64: tl.constexpr,
):
    # program ((b * G + g) * H + h) * M + m: one row of one head
    pid = tl.program_id(0)
    m = (pid % M).to(tl.int64)
    bgh = pid // M
    b = (bgh // (G * H)).to(tl.int64)
    g = ((bgh // H) % G).to(tl.int64)
    h = (bgh % H).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_k = tl.arange(0, BLOCK_K)
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    lse_ptr = Lse + b * stride_lb + g * stride_lg + h * stride_lh + m * stride_lm
    a_ptr = Attn + b * stride_ab + g * stride_ag + h * stride_ah + m * stride_am

    lse_max = tl.full([BLOCK_S], -float("inf"), dtype=acc_dtype)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        lse_max = tl.maximum(lse_max, tl.load(lse_ptr + s * stride_ls, mask=s < S, other=-float("inf")).to(acc_dtype))
    lse_top = tl.max(lse_max, 0)
    # all parts empty: weights exp(-inf - 0) = 0, so the row ends as 0 / 1
    lse_ref = tl.where(lse_top == -float("inf"), 0.0, lse_top)

    acc = tl.zeros([BLOCK_S, BLOCK_K], dtype=acc_dtype)
    w_sum = tl.zeros([BLOCK_S], dtype=acc_dtype)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        w = tl.exp(tl.load(lse_ptr + s * stride_ls, mask=s < S, other=-float("inf")).to(acc_dtype) - lse_ref)
        w_sum += w
        part_mask = (s[:, None] < S) & (offs_k[None, :] < K)
        part = tl.load(a_ptr + s.to(tl.int64)[:, None] * stride_as + offs_k[None, :], mask=part_mask, other=0.0)
        # a part without keys may hold anything (its rows are never normalised): weight 0 must win over NaN
        acc += tl.where(w[:, None] > 0, w[:, None] * part.to(acc_dtype), 0.0)
    total = tl.sum(w_sum, 0)
    empty = total == 0
    out = tl.sum(acc, 0) / tl.where(empty, 1.0, total)
    o_ptrs = Out + b * stride_ob + g * stride_og + h * stride_oh + m * stride_om + offs_k
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_k < K)
    if WRITE_LSE:
        lse_out = tl.where(empty, -float("inf"), lse_ref + tl.log(tl.where(empty, 1.0, total)))
        x_ptr = LseOut + b * stride_xb + g * stride_xg + h * stride_xh + m * stride_xm
        tl.store(x_ptr, lse_out.to(LseOut.dtype.element_ty))


def _check(attn: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, lse_out: torch.Tensor | None) -> None:
    if attn.ndim != 6 or lse.ndim != 5 or out.ndim != 5:
        raise ValueError(
            f"merge_partials expects attn [S, B, M, G, H, K], lse [S, B, G, H, M], out [B, M, G, H, K]; got "
            f"attn.shape={tuple(attn.shape)}, lse.shape={tuple(lse.shape)}, out.shape={tuple(out.shape)}"
        )
    S, B, M, G, H, K = attn.shape
    if tuple(lse.shape) != (S, B, G, H, M) or tuple(out.shape) != (B, M, G, H, K):
        raise ValueError(
            f"merge_partials: attn.shape={tuple(attn.shape)} needs lse.shape={(S, B, G, H, M)} and "
            f"out.shape={(B, M, G, H, K)}; got lse.shape={tuple(lse.shape)}, out.shape={tuple(out.shape)}"
        )
    if lse_out is not None and tuple(lse_out.shape) != (B, G, H, M):
        raise ValueError(f"merge_partials: lse_out.shape={tuple(lse_out.shape)}, expected {(B, G, H, M)}")
    for name, x in (("attn", attn), ("out", out)):
        if x.numel() and x.stride(-1) != 1:
            raise ValueError(f"merge_partials: {name}.stride(-1)={x.stride(-1)}; pass {name}.contiguous()")
    if not lse.is_floating_point() or lse.element_size() < 4:
        raise ValueError(f"merge_partials: lse.dtype={lse.dtype}; the log-sum-exp must be float32 or float64")


def merge_partials(attn: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, lse_out: torch.Tensor | None) -> None:
    """Merges ``S`` partial attentions into ``out`` (and ``lse_out``), in one launch.

    Args:
        attn: ``[S, B, M, G, H, K]`` partial outputs, float16/bfloat16/float32/float64, any strides with the
            last dim contiguous.
        lse: ``[S, B, G, H, M]`` their log-sum-exp, float32 or float64, any strides.
        out: ``[B, M, G, H, K]`` written, any float dtype, any strides with the last dim contiguous.
        lse_out: ``[B, G, H, M]`` written (float32 or float64), or None.

    Raises:
        ValueError: shapes that do not match, a non-contiguous last dim, or a half-precision lse.
    """
    _check(attn, lse, out, lse_out)
    S, B, M, G, H, K = attn.shape
    if B * G * H * M == 0 or K == 0:
        if lse_out is not None:
            lse_out.fill_(-float("inf"))
        return
    f64 = attn.dtype == torch.float64 or lse.dtype == torch.float64
    x = lse_out if lse_out is not None else lse  # never written without WRITE_LSE
    x_strides = lse_out.stride() if lse_out is not None else (0, 0, 0, 0)
    ints = (*attn.stride()[:5], *lse.stride(), *out.stride()[:4], *x_strides, S, M, G, H, K)
    block_k = max(16, 1 << (K - 1).bit_length())
    block_s = min(max(1, MERGE_TILE // (block_k * (2 if f64 else 1))), max(1, 1 << (S - 1).bit_length()))
    grid = (B * G * H * M,)
    meta = dict(
        BLOCK_S=block_s,
        BLOCK_K=block_k,
        WRITE_LSE=lse_out is not None,
        ACC_F64=f64,
        num_warps=NUM_WARPS_MERGE,
    )
    ptrs = (attn, lse, out, x)
    dyn = (tuple((t.dtype, t.data_ptr() & 15) for t in ptrs), ints)
    launch(merge_partials_kernel, grid, (*ptrs, *ints), meta, None, dyn)
