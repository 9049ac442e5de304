"""Rotary embedding of the new q/k tokens fused with the K/V cache write, for ``rope_padded``; and its launcher.

For query token t of sequence b (block ``[qs_b, qs_{b+1})`` of the packed queries), with ``L_b`` used cache rows,
the token's place in its sequence is ``p = L_b - (qs_{b+1} - t)`` (the new tokens are the last ones) and

    out_q[t]          = rope(xq[t], pos)
    cache_k[row(b,p)] = rope(xk[t], pos)
    cache_v[row(b,p)] = xv[t]

where ``row(b, p) = seqstart_k[b] + p`` for a padded cache and ``block_tables[b, p // page] * page + p % page``
for a paged one, and ``pos`` is ``seqpos[t]``, or ``p + first_seqpos[b]``, or ``p``. ``rope`` rotates the feature
pairs ``(x_re, x_im)`` — ``(2c, 2c + 1)`` with ``ADJACENTS``, ``(c, c + D/2)`` otherwise — by ``pos * f_c /
linear_scale`` with ``f_c = theta^(-2c/D)`` (optionally rescaled llama-3.1 style).

Each program owns one query token and ``BLOCK_R`` of its ``G·(Hq + 2·Hkv)`` head rows (q, then k, then v
heads), so the angles' sines and cosines are computed once per program and D-chunk instead of once per head
row (xFormers' kernel runs one program per head row). The sequence bookkeeping (``seqstart_q``, ``seqlen_k``,
``seqstart_k``, the block table) is read from device tensors, so a captured CUDA graph follows in-place
updates of ``seqlen_k``. A cache row is written only when ``0 <= p < slot_len`` and the row (and, paged, the
page id) is inside the cache: a stale or inconsistent ``seqlen_k`` can never write out of bounds or into
another sequence's rows.

Memory traffic (element size s, T tokens): reads ``T·(Hq + 2·Hkv)·D·s`` and writes as much; the eager
sequence (rotate q, rotate k, two index copies into the caches) reads and writes the rotated q/k a second
time and materialises the cos/sin tables.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from triformers.triton._common import cdiv, launch, next_pow2, sm_count

# Feature pairs per D-chunk. 128 pairs cover a 256-wide head in one step; wider heads loop (the sines and
# cosines of a chunk are shared by every head row of the program's tile).
BLOCK_D_MAX = 128
# Pairs per thread of a tile (its q/k/v values, sines, cosines and 64-bit addresses live in registers). sm_90
# ptxas, bf16, D=128, 4 warps: 8 pairs per thread take 72 registers in float32 (16 take 164); the float64
# rotation takes 152 at 4 and spills at 8.
PAIRS_PER_THREAD = {False: 8, True: 4}  # keyed by float64 rotation
MAX_WARPS = 4  # full tiles of 1024 (float64: 512) pairs per program, 4 KB of bf16 reads
# A token's head rows go to one program (one evaluation of the sines and cosines) unless fewer than this many
# programs per SM would run: with one program per token, a B=1 decode step would load its rows one tile after
# the other in a single program.
PROGRAMS_PER_SM = 4


def as_float32(x: float) -> float:
    """x rounded to the nearest float32 (how a kernel receives a Python float)."""
    return float(np.float32(x))


def freq_exponent(theta: float, head_dim: int) -> float:
    """``-2·log2(theta) / D`` from theta as the kernel receives it: ``f_c = 2^(c · freq_exponent)``."""
    return -2 * math.log2(as_float32(theta)) / head_dim


@triton.jit
def _rope_padded_kernel(
    xq_ptr,
    xk_ptr,
    xv_ptr,
    out_q_ptr,
    cache_k_ptr,
    cache_v_ptr,
    seqstart_q_ptr,
    seqstart_k_ptr,
    seqlen_k_ptr,
    block_tables_ptr,
    seqpos_ptr,  # [T] positions, read when HAS_SEQPOS
    first_seqpos_ptr,  # [B] position of each sequence's first cache row, read when HAS_FIRST_SEQPOS
    theta,  # read by the float64 rotation
    freq_exp,  # -2·log2(theta)/D, rounded once to float32: f_c = 2^(c·freq_exp) for the float32 rotation
    linear_scale,
    n_groups,
    n_q_heads,
    n_kv_heads,  # heads read from xk/xv and written to the caches (1 for stride-0 expanded xk)
    head_dim,
    slot_len,  # cache rows a sequence may use (padding; paged: pages per row * page size)
    n_cache_rows,
    page_size,
    n_pages,
    stride_xq_m,
    stride_xq_g,
    stride_xq_h,
    stride_xk_m,
    stride_xk_g,
    stride_xk_h,
    stride_xv_m,
    stride_xv_g,
    stride_xv_h,
    stride_oq_m,
    stride_oq_g,
    stride_oq_h,
    stride_ck_m,
    stride_ck_g,
    stride_ck_h,
    stride_cv_m,
    stride_cv_g,
    stride_cv_h,
    stride_bt_b,
    stride_bt_p,
    stride_seqpos,
    stride_first_seqpos,
    F64: tl.constexpr,  # rotation in float64 (internal_dtype="f64"), else float32
    PAGED: tl.constexpr,
    HAS_SEQPOS: tl.constexpr,
    HAS_FIRST_SEQPOS: tl.constexpr,
    ADJACENTS: tl.constexpr,
    DYNAMIC: tl.constexpr,  # llama-3.1 frequency rescaling with the four constants below
    FREQ_LO: tl.constexpr,  # f < FREQ_LO (wavelength > old_ctx / low_factor): f / scale_factor
    FREQ_HI: tl.constexpr,  # FREQ_LO <= f < FREQ_HI: blend with smooth = f * SMOOTH_A - SMOOTH_B
    SMOOTH_A: tl.constexpr,
    SMOOTH_B: tl.constexpr,
    SCALE_FACTOR: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(query of a sequence, sequence, split)``: split s of S handles row blocks s, s + S, ..."""
    compute_dtype = tl.float64 if F64 else tl.float32
    j = tl.program_id(0)  # query index inside its sequence
    b = tl.program_id(1)  # sequence
    split = tl.program_id(2)  # which of the token's row blocks: split, split + num_programs(2), ...
    q_end = tl.load(seqstart_q_ptr + b + 1)
    t = tl.load(seqstart_q_ptr + b) + j
    if t >= q_end:
        return
    p = tl.load(seqlen_k_ptr + b) - (q_end - t)  # place of the token in its sequence

    # ---- the cache row and whether it may be written
    writable = (p >= 0) & (p < slot_len)
    p_safe = tl.where(writable, p, 0)
    if PAGED:
        page = tl.load(block_tables_ptr + b * stride_bt_b + (p_safe // page_size) * stride_bt_p, mask=writable, other=0)
        writable = writable & (page >= 0) & (page < n_pages)
        row = page.to(tl.int64) * page_size + p_safe % page_size
    else:
        row = tl.load(seqstart_k_ptr + b).to(tl.int64) + p_safe
        writable = writable & (row >= 0) & (row < n_cache_rows)

    # ---- the rotation position
    if HAS_SEQPOS:
        pos = tl.load(seqpos_ptr + t.to(tl.int64) * stride_seqpos)
    elif HAS_FIRST_SEQPOS:
        pos = p + tl.load(first_seqpos_ptr + b * stride_first_seqpos)
    else:
        pos = p
    pos = pos.to(compute_dtype)
    scale = tl.cast(linear_scale, compute_dtype)
    if F64:
        log2_theta = tl.log2(tl.cast(theta, tl.float64))

    n_q_rows = n_groups * n_q_heads
    n_kv_rows = n_groups * n_kv_heads
    n_rows = n_q_rows + 2 * n_kv_rows  # q rows [0, G·Hq), then k rows, then v rows
    t64 = t.to(tl.int64)
    half_d = head_dim // 2
    for d0 in range(0, half_d, BLOCK_D):
        # ---- sines and cosines of this chunk of pairs, shared by all the token's rows
        c = d0 + tl.arange(0, BLOCK_D)  # pair index
        col_ok = c < half_d
        if F64:
            freq = tl.exp2(-((2 * c).to(tl.float64) / head_dim) * log2_theta)  # f_c = theta^(-2c/D)
        else:
            freq = tl.exp2(c.to(tl.float32) * freq_exp)
        if DYNAMIC:
            smooth = freq * tl.full([], SMOOTH_A, compute_dtype) - tl.full([], SMOOTH_B, compute_dtype)
            scaled = freq / tl.full([], SCALE_FACTOR, compute_dtype)
            freq = tl.where(
                freq < tl.full([], FREQ_LO, compute_dtype),
                scaled,
                tl.where(freq < tl.full([], FREQ_HI, compute_dtype), (1 - smooth) * scaled + smooth * freq, freq),
            )
        angle = pos * freq / scale
        cos = tl.cos(angle)[None, :]
        sin = tl.sin(angle)[None, :]
        if ADJACENTS:
            col_re = 2 * c
            col_im = col_re + 1
        else:
            col_re = c
            col_im = c + half_d
        for r0 in range(split * BLOCK_R, n_rows, tl.num_programs(2) * BLOCK_R):
            # ---- a tile of head rows: where each row is read from and written to
            r = r0 + tl.arange(0, BLOCK_R)
            is_q = r < n_q_rows
            is_v = r >= n_q_rows + n_kv_rows
            rk = tl.where(is_v, r - n_q_rows - n_kv_rows, r - n_q_rows)  # k or v row among the G·Hkv
            gq, hq = r // n_q_heads, r % n_q_heads
            gk, hk = rk // n_kv_heads, rk % n_kv_heads
            src = tl.where(
                is_q,
                xq_ptr + t64 * stride_xq_m + gq * stride_xq_g + hq * stride_xq_h,
                tl.where(
                    is_v,
                    xv_ptr + t64 * stride_xv_m + gk * stride_xv_g + hk * stride_xv_h,
                    xk_ptr + t64 * stride_xk_m + gk * stride_xk_g + hk * stride_xk_h,
                ),
            )
            dst = tl.where(
                is_q,
                out_q_ptr + t64 * stride_oq_m + gq * stride_oq_g + hq * stride_oq_h,
                tl.where(
                    is_v,
                    cache_v_ptr + row * stride_cv_m + gk * stride_cv_g + hk * stride_cv_h,
                    cache_k_ptr + row * stride_ck_m + gk * stride_ck_g + hk * stride_ck_h,
                ),
            )
            ok = (r < n_rows)[:, None] & col_ok[None, :]
            out_ok = ok & (is_q | writable)[:, None]
            x_re = tl.load(src[:, None] + col_re[None, :], mask=ok, other=0.0)
            x_im = tl.load(src[:, None] + col_im[None, :], mask=ok, other=0.0)
            re = x_re.to(compute_dtype)
            im = x_im.to(compute_dtype)
            y_re = tl.where(is_v[:, None], re, re * cos - im * sin)
            y_im = tl.where(is_v[:, None], im, im * cos + re * sin)
            # through float32: a float64 -> bfloat16 conversion is not available on every target
            tl.store(dst[:, None] + col_re[None, :], y_re.to(tl.float32).to(x_re.dtype), mask=out_ok)
            tl.store(dst[:, None] + col_im[None, :], y_im.to(tl.float32).to(x_im.dtype), mask=out_ok)


def _tiles(half_d: int, n_rows: int, f64: bool) -> tuple[int, int, int]:
    """``(BLOCK_D, BLOCK_R, num_warps)`` for heads of ``2 * half_d`` features and ``n_rows`` head rows."""
    per_thread = PAIRS_PER_THREAD[f64]
    block_d = max(2, min(BLOCK_D_MAX, next_pow2(half_d)))
    block_r = max(1, min(MAX_WARPS * 32 * per_thread // block_d, next_pow2(n_rows)))
    num_warps = max(1, min(MAX_WARPS, block_r * block_d // (32 * per_thread)))
    return block_d, block_r, num_warps


def row_splits(n_row_blocks: int, n_tokens: int, n_sms: int) -> int:
    """Programs per token (each loops over its share of the row blocks): one, unless ``n_tokens`` programs
    (some of which exit at once: sequences shorter than the longest) would leave the SMs underused."""
    return max(1, min(n_row_blocks, cdiv(PROGRAMS_PER_SM * n_sms, n_tokens)))


@functools.cache
def dynamic_constants(
    old_context_len: float, scale_factor: float, low_freq_factor: float, high_freq_factor: float
) -> dict:
    """The llama-3.1 rescaling as frequency thresholds and the blend's affine coefficients.

    With ``w = 2π / f``: ``w > old / low`` (``f < FREQ_LO``) divides f by ``scale_factor``;
    ``old / high < w <= old / low`` (``FREQ_LO <= f < FREQ_HI``) blends ``(1 - s) f / scale_factor + s f`` with
    ``s = (old / w - low) / (high - low) = f · SMOOTH_A - SMOOTH_B``; higher frequencies are unchanged.
    """
    two_pi = 2 * math.pi
    return {
        "FREQ_LO": two_pi * low_freq_factor / old_context_len,
        "FREQ_HI": two_pi * high_freq_factor / old_context_len,
        "SMOOTH_A": old_context_len / (two_pi * (high_freq_factor - low_freq_factor)),
        "SMOOTH_B": low_freq_factor / (high_freq_factor - low_freq_factor),
        "SCALE_FACTOR": scale_factor,
    }


_NO_DYNAMIC = {"FREQ_LO": 0.0, "FREQ_HI": 0.0, "SMOOTH_A": 0.0, "SMOOTH_B": 0.0, "SCALE_FACTOR": 1.0}


class RopeArgs(NamedTuple):
    """A validated ``rope_padded`` call: the tensors, BMHK or BMGHK (unit stride on D), the bias's device
    tensors and the rotation's parameters."""

    xq: torch.Tensor  # [1, T, (G,) Hq, D]
    xk: torch.Tensor  # [1, T, (G,) Hkv', D]
    xv: torch.Tensor
    out_q: torch.Tensor  # xq's shape
    cache_k: torch.Tensor  # [1, rows, (G,) Hc, D]
    cache_v: torch.Tensor
    seqstart_q: torch.Tensor  # [B + 1]
    seqstart_k: torch.Tensor  # [B + 1]
    seqlen_k: torch.Tensor  # [B]
    block_tables: torch.Tensor | None  # [B, pages per row] for a paged cache
    seqpos: torch.Tensor | None  # [T]
    first_seqpos: torch.Tensor | None  # [B]
    n_kv_heads: int  # heads of xk/xv read and of the caches written (the first ones)
    max_q_len: int  # the longest sequence of new tokens (programs along grid dim 0)
    slot_len: int  # cache rows a sequence may use (padding; paged: pages per row * page size)
    page_size: int
    theta: float
    linear_scale: float
    dynamic: dict | None  # dynamic_constants(...) for llama-3.1 rescaling
    adjacents: bool
    f64: bool  # float64 rotation (internal_dtype="f64")


def _mgh(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of the token, group and head dims of a BMGHK (or BMHK: no group dim) tensor."""
    s = t.stride()
    return (s[1], s[2], s[3]) if len(s) == 5 else (s[1], 0, s[2])


def rope_padded_fwd(a: RopeArgs) -> None:
    """Launches the kernel: grid (query of a sequence, sequence, split of the head rows). A token's rows are split
    over several programs only when there are too few tokens to fill the GPU (decoding): each program computes
    the sines and cosines once for all the rows it owns."""
    n_groups = a.xq.shape[2] if a.xq.dim() == 5 else 1
    n_q_heads, head_dim = a.xq.shape[-2:]
    n_rows = n_groups * (n_q_heads + 2 * a.n_kv_heads)
    block_d, block_r, num_warps = _tiles(head_dim // 2, n_rows, a.f64)
    n_seqs = a.seqlen_k.shape[0]
    splits = row_splits(cdiv(n_rows, block_r), a.max_q_len * n_seqs, sm_count(a.xq))
    n_cache_rows = a.cache_k.shape[1]
    paged = a.block_tables is not None
    unread = a.seqlen_k  # pointer for the tensors a specialisation does not read
    bt = a.block_tables if paged else unread
    args = (
        a.xq, a.xk, a.xv, a.out_q, a.cache_k, a.cache_v, a.seqstart_q, a.seqstart_k, a.seqlen_k, bt,
        a.seqpos if a.seqpos is not None else unread,
        a.first_seqpos if a.first_seqpos is not None else unread,
        float(a.theta), freq_exponent(a.theta, head_dim), float(a.linear_scale),
        n_groups, n_q_heads, a.n_kv_heads, head_dim, a.slot_len, n_cache_rows,
        a.page_size, n_cache_rows // a.page_size,
        *_mgh(a.xq), *_mgh(a.xk), *_mgh(a.xv), *_mgh(a.out_q), *_mgh(a.cache_k), *_mgh(a.cache_v),
        bt.stride(0), bt.stride(1) if paged else 0,
        a.seqpos.stride(0) if a.seqpos is not None else 0,
        a.first_seqpos.stride(0) if a.first_seqpos is not None else 0,
    )  # fmt: skip
    meta = {
        "F64": bool(a.f64),
        "PAGED": paged,
        "HAS_SEQPOS": a.seqpos is not None,
        "HAS_FIRST_SEQPOS": a.first_seqpos is not None,
        "ADJACENTS": bool(a.adjacents),
        "DYNAMIC": a.dynamic is not None,
        **(a.dynamic if a.dynamic is not None else _NO_DYNAMIC),
        "BLOCK_R": block_r,
        "BLOCK_D": block_d,
        "num_warps": num_warps,
    }
    launch(_rope_padded_kernel, (a.max_q_len, n_seqs, splits), args, meta)
