"""Forward kernel: FlashAttention-2 with every bias type, GQA, dropout and lse.

One program computes ``BLOCK_M`` query rows of one head of one batch element (dense) or packed sequence
(varlen): it streams the key tiles the mask allows, keeping the running max ``m_i`` and sum ``l_i`` of
``exp2(s - m_i)`` (scores pre-multiplied by ``log2(e)``) and the accumulator ``acc``; it writes
``out = acc / l_i`` and ``lse = (m_i + log2(l_i)) * ln(2)``. Rows that see no key give out 0, lse -inf.
"""

import triton
import triton.language as tl

from triformers.ops.fmha._triton.common import LN2, LOG2E, dropout_keep, key_tiles, tile_allowed


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, b_ptrs, lo, hi,
               offs_i, offs_j, offs_d, offs_dv, q_len, k_len, off, WL, WR,
               stride_kn, stride_vn, stride_bn, qk_scale,
               seed, dropout_p, drop_rows, drop_cols0, drop_head,
               K_DIM, KV_DIM,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
               HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               INPUT_PRECISION: tl.constexpr):
    dtype = q.dtype
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        start64 = start_n.to(tl.int64)
        cols = start_n + offs_j  # [1, BN] block-local key index
        if MASKED or not EVEN_D:
            k = tl.load(k_ptrs + start64 * stride_kn, mask=(cols < k_len) & (offs_d[:, None] < K_DIM), other=0.0)
        else:
            k = tl.load(k_ptrs + start64 * stride_kn)
        qk = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale  # [BM, BN], log2 units
        if HAS_BIAS:
            bias = tl.load(b_ptrs + start64 * stride_bn, mask=(offs_i < q_len) & (cols < k_len), other=0.0)
            qk += bias.to(tl.float32) * LOG2E
        if MASKED:
            qk = tl.where(tile_allowed(offs_i, cols, q_len, k_len, off, WL, WR, HAS_WL, HAS_WR), qk, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, drop_rows, drop_cols0 + start_n + offs_j, drop_head, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        if MASKED or not EVEN_D:
            cols_t = start_n + tl.arange(0, BLOCK_N)[:, None]  # [BN, 1]
            v = tl.load(v_ptrs + start64 * stride_vn, mask=(cols_t < k_len) & (offs_dv[None, :] < KV_DIM), other=0.0)
        else:
            v = tl.load(v_ptrs + start64 * stride_vn)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd(
    Q, K, V, Out, LSE, Bias,
    SEQ_Q, K_START, K_LEN,  # varlen: query block starts [nb + 1], key block starts / lengths [nb]
    stride_qb, stride_qm, stride_qg, stride_qh,
    stride_kb, stride_kn, stride_kg, stride_kh,
    stride_vb, stride_vn, stride_vg, stride_vh,
    stride_ob, stride_om, stride_og, stride_oh,
    stride_lb, stride_lg, stride_lh,
    stride_bb, stride_bg, stride_bh, stride_bm, stride_bn,
    num_heads, HG, Mq, Mkv, qk_scale, WL, WR, dropout_p, seed, K_DIM, KV_DIM,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # program (z * heads + head, query tile); z is the batch element, or the packed sequence when varlen
    pid_zh = tl.program_id(0)
    z = pid_zh // num_heads
    head = pid_zh % num_heads
    g = head // HG
    h = head % HG
    if IS_VARLEN:
        b = z * 0
        q_start = tl.load(SEQ_Q + z)
        q_len = tl.load(SEQ_Q + z + 1) - q_start
        k_start = tl.load(K_START + z)
        k_len = tl.load(K_LEN + z)
    else:
        b = z
        q_start = 0
        q_len = Mq
        k_start = 0
        k_len = Mkv
    m_start = tl.program_id(1) * BLOCK_M
    if m_start >= q_len:
        return
    off = 0
    if BOTTOM_RIGHT:
        off = k_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_i = (m_start + offs_m)[:, None]  # [BM, 1] block-local query index
    offs_j = tl.arange(0, BLOCK_N)[None, :]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    g = g.to(tl.int64)
    h = h.to(tl.int64)
    rows = (q_start + offs_i).to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + g * stride_qg + h * stride_qh + rows * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_i < q_len) & (offs_d[None, :] < K_DIM), other=0.0)
    k_ptrs = (K + b64 * stride_kb + g * stride_kg + h * stride_kh
              + (k_start + offs_j).to(tl.int64) * stride_kn + offs_d[:, None])  # [BD, BN]
    v_ptrs = (V + b64 * stride_vb + g * stride_vg + h * stride_vh
              + (k_start + tl.arange(0, BLOCK_N)[:, None]).to(tl.int64) * stride_vn + offs_dv[None, :])  # [BN, BDV]
    b_ptrs = Bias
    if HAS_BIAS:
        b_ptrs = (Bias + b64 * stride_bb + g * stride_bg + h * stride_bh + offs_i.to(tl.int64) * stride_bm
                  + offs_j * stride_bn)

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    drop_head = b * num_heads + head
    lo, mid_lo, mid_hi, hi = key_tiles(m_start, q_len, k_len, off, WL, WR, BLOCK_M, BLOCK_N, HAS_WL, HAS_WR)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, b_ptrs, lo, mid_lo, offs_i, offs_j, offs_d,
                               offs_dv, q_len, k_len, off, WL, WR, stride_kn, stride_vn, stride_bn, qk_scale,
                               seed, dropout_p, q_start + offs_i, k_start, drop_head, K_DIM, KV_DIM,
                               BLOCK_N, True, EVEN_D, HAS_WL, HAS_WR, HAS_BIAS, HAS_DROPOUT, INPUT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, b_ptrs, mid_lo, mid_hi, offs_i, offs_j, offs_d,
                               offs_dv, q_len, k_len, off, WL, WR, stride_kn, stride_vn, stride_bn, qk_scale,
                               seed, dropout_p, q_start + offs_i, k_start, drop_head, K_DIM, KV_DIM,
                               BLOCK_N, False, EVEN_D, HAS_WL, HAS_WR, HAS_BIAS, HAS_DROPOUT, INPUT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, b_ptrs, mid_hi, hi, offs_i, offs_j, offs_d,
                               offs_dv, q_len, k_len, off, WL, WR, stride_kn, stride_vn, stride_bn, qk_scale,
                               seed, dropout_p, q_start + offs_i, k_start, drop_head, K_DIM, KV_DIM,
                               BLOCK_N, True, EVEN_D, HAS_WL, HAS_WR, HAS_BIAS, HAS_DROPOUT, INPUT_PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, -float("inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_ptrs = Out + b64 * stride_ob + g * stride_og + h * stride_oh + rows * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_i < q_len) & (offs_dv[None, :] < KV_DIM))
    l_ptrs = LSE + b64 * stride_lb + g * stride_lg + h * stride_lh + q_start + m_start + offs_m
    tl.store(l_ptrs, lse, mask=m_start + offs_m < q_len)
