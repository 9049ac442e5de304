"""Forward kernel: FlashAttention-2 with every bias type, GQA, dropout and lse.

One program computes ``BLOCK_M`` query rows of one head of one batch element (dense) or packed sequence
(varlen): it streams the key tiles the mask allows, keeping the running max ``m_i`` and sum ``l_i`` of
``exp2(s - m_i)`` (scores pre-multiplied by ``log2(e)``) and the accumulator ``acc``; it writes
``out = acc / l_i`` and ``lse = (m_i + log2(l_i)) * ln(2)``. Rows that see no key give out 0, lse -inf.

Tiles of Q, K, V (and of a bias without broadcast dims) are read through TMA tensor descriptors when
``USE_TMA``: the copy engine fills shared memory directly and no per-element addresses occupy registers
(with pointer tensors the [BLOCK_N, D] address tiles alone took ~128 registers per thread at D = 128 and
every configuration spilled, per ``scripts/compile_check.py``). The pointer path remains for strides a
descriptor cannot express (unaligned, or stride-0 broadcast dims).

A block-sparse mask (``BLOCK_SPARSE``) takes the key tiles of each query tile from a tile table
(``_mask.TileTable``: ``BS_OFF``, ``BS_FULL``, ``BS_COLS``), boundary tiles masked through the int8 layout
(``BS_LAYOUT``), tiles allowed entirely without a mask; every other tile is skipped.
"""

import triton
import triton.language as tl

from triformers.ops.fmha._triton.common import (
    LN2,
    LOG2E,
    dropout_keep,
    gather_rows,
    key_tiles,
    load_key_rows,
    load_rows,
    page_tile_row,
    paged_rows,
    sequence_bounds,
    sparse_allowed,
    sparse_tiles,
    tile_allowed,
)


@triton.jit
def load_bias_tile(desc_b, b_ptr, b, g, h, row0, col0, q_len, k_len, stride_bm, stride_bn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BIAS_TMA: tl.constexpr):
    """Bias tile [BLOCK_M, BLOCK_N] at block-local (row0, col0), float32, 0 outside the block."""
    if BIAS_TMA:
        return desc_b.load([b, g, h, row0, col0]).reshape(BLOCK_M, BLOCK_N).to(tl.float32)
    rows = row0 + tl.arange(0, BLOCK_M)[:, None]
    cols = col0 + tl.arange(0, BLOCK_N)[None, :]
    ptrs = b_ptr + rows.to(tl.int64) * stride_bm + cols.to(tl.int64) * stride_bn
    return tl.load(ptrs, mask=(rows < q_len) & (cols < k_len), other=0.0).to(tl.float32)


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, desc_k, desc_v, desc_b, k_ptr, v_ptr, b_ptr, bt_ptr, lo, hi, b, g, h, hk, m_start, q_start,
    k_start, offs_i, offs_j, q_len, k_len, off, WL, WR, stride_kn, stride_vn, stride_bm, stride_bn, stride_bt_p,
    num_pages, Mkv, qk_scale, seed, dropout_p, drop_head, K_DIM, KV_DIM, bs_cols, bs_layout, bs_block_q, bs_block_k,
    bs_nkb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, USE_TMA: tl.constexpr, BIAS_TMA: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, KEYS_PADDED: tl.constexpr, PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGE_TILES: tl.constexpr, BLOCK_SPARSE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    dtype = q.dtype
    STEP: tl.constexpr = 1 if BLOCK_SPARSE else BLOCK_N  # block-sparse: [lo, hi) index the table's tiles
    nxt = lo
    if BLOCK_SPARSE:  # the next tile's index is loaded one iteration ahead (cols ends with a spare entry)
        nxt = tl.load(bs_cols + lo)
    for it in range(lo, hi, STEP):
        if BLOCK_SPARSE:
            start_n = nxt * BLOCK_N
            nxt = tl.load(bs_cols + it + 1)
        else:
            start_n = it
        start_n = tl.multiple_of(start_n, BLOCK_N)
        if PAGE_TILES:  # the tile is BLOCK_N consecutive rows of one page
            row0 = page_tile_row(bt_ptr, stride_bt_p, num_pages, k_start + start_n, Mkv, PAGE_SIZE)
            k = load_key_rows(
                desc_k, k_ptr, b, row0, g, hk, row0 + k_len - start_n, stride_kn, K_DIM, BLOCK_N, BLOCK_D, USE_TMA,
                MASKED, True,
            )
        elif PAGED:  # each key row through the block table (pointer path)
            rows, row_ok = paged_rows(bt_ptr, stride_bt_p, num_pages, k_start, start_n, k_len, Mkv, BLOCK_N, PAGE_SIZE)
            k = gather_rows(k_ptr, rows, row_ok, stride_kn, K_DIM, BLOCK_D)
        else:
            k = load_key_rows(
                desc_k, k_ptr, b, k_start + start_n, g, hk, k_start + k_len, stride_kn, K_DIM, BLOCK_N, BLOCK_D,
                USE_TMA, MASKED, KEYS_PADDED,
            )
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # [BM, BN]
        if HAS_BIAS or MASKED:
            qk = qk * qk_scale
            if HAS_BIAS:
                qk += load_bias_tile(desc_b, b_ptr, b, g, h, m_start, start_n, q_len, k_len, stride_bm, stride_bn,
                                     BLOCK_M, BLOCK_N, BIAS_TMA) * LOG2E
            if MASKED:
                ok = tile_allowed(offs_i, start_n + offs_j, q_len, k_len, off, WL, WR, HAS_WL, HAS_WR)
                if BLOCK_SPARSE:
                    ok = ok & sparse_allowed(bs_layout, offs_i, start_n + offs_j, q_len, k_len, bs_block_q,
                                             bs_block_k, bs_nkb)
                qk = tl.where(ok, qk, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_safe[:, None])
        else:  # a full tile: one fused multiply-add per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_safe = m_new
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:  # the counter's key column: the key's row in the key tensor (physical when paged)
            if PAGE_TILES:
                keep = dropout_keep(seed, q_start + offs_i, row0 + offs_j, drop_head, dropout_p)
            elif PAGED:
                keep = dropout_keep(seed, q_start + offs_i, rows.to(tl.int32)[None, :], drop_head, dropout_p)
            else:
                keep = dropout_keep(seed, q_start + offs_i, k_start + start_n + offs_j, drop_head, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        if PAGE_TILES:
            v = load_key_rows(
                desc_v, v_ptr, b, row0, g, hk, row0 + k_len - start_n, stride_vn, KV_DIM, BLOCK_N, BLOCK_DV, USE_TMA,
                MASKED, True,
            )
        elif PAGED:
            v = gather_rows(v_ptr, rows, row_ok, stride_vn, KV_DIM, BLOCK_DV)
        else:
            v = load_key_rows(
                desc_v, v_ptr, b, k_start + start_n, g, hk, k_start + k_len, stride_vn, KV_DIM, BLOCK_N, BLOCK_DV,
                USE_TMA, MASKED, KEYS_PADDED,
            )
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd(
    Q, K, V, Out, LSE, Bias, desc_q, desc_k, desc_v, desc_b, SEQ_Q, K_START,
    K_LEN,  # varlen: query block starts [nb + 1], key block starts / lengths [nb] (ends if PAGED)
    BT,  # PAGED: block table [nb, NUM_PAGES], each row's physical page ids
    BS_OFF, BS_FULL, BS_COLS, BS_LAYOUT,  # BLOCK_SPARSE: tile table (offsets, full_start, cols), int8 layout
    BS_ORDER,  # BS_ORDERED: the program id each launch slot runs (heavy programs first, sparse_order.py)
    stride_qb, stride_qm, stride_qg, stride_qh, stride_kb, stride_kn, stride_kg, stride_kh, stride_vb, stride_vn,
    stride_vg, stride_vh, stride_ob, stride_om, stride_og, stride_oh, stride_lb, stride_lg, stride_lh, stride_bb,
    stride_bg, stride_bh, stride_bm, stride_bn, stride_bt_b, stride_bt_p, num_heads, HG, Mq, Mkv, qk_scale, WL, WR,
    dropout_p, seed, K_DIM, KV_DIM, NUM_TILES, NUM_PAGES,
    bs_head_step,  # BLOCK_SPARSE: 1 for a layout per head, 0 for one shared by all
    stride_bsl_h, bs_nkb, bs_block_q, bs_block_k,  # layout head stride, key blocks per row, block sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    KV_SHARED: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    KEYS_PADDED: tl.constexpr,  # rows past a block's keys may hold anything (KV-cache padding, NaN)
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,  # K/V rows through the block table BT
    PAGE_TILES: tl.constexpr,  # PAGED with every key tile inside one page
    BLOCK_SPARSE: tl.constexpr,  # key tiles from the tile table BS_*
    BS_ORDERED: tl.constexpr,
    USE_TMA: tl.constexpr, BIAS_TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # program (z * heads + head) * NUM_TILES + query tile; z is the batch element, or the packed sequence when
    # varlen. Query tiles vary fastest, so the programs running together share their head's K/V through L2.
    pid = tl.program_id(0)
    if BS_ORDERED:
        pid = tl.load(BS_ORDER + pid)
    pid_zh = pid // NUM_TILES
    z = pid_zh // num_heads
    head = pid_zh % num_heads
    g = head // HG
    h = head % HG
    hk = h
    if KV_SHARED:
        hk = h * 0
    b, q_start, q_len, k_start, k_len = sequence_bounds(z, SEQ_Q, K_START, K_LEN, Mq, Mkv, IS_VARLEN)
    if PAGED:  # K_LEN holds each block's end in its logical row, K_START its start
        k_len = k_len - k_start
    m_start = (pid % NUM_TILES) * BLOCK_M
    if m_start >= q_len:
        return
    off = 0
    if BOTTOM_RIGHT:
        off = k_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_i = (m_start + offs_m)[:, None]  # [BM, 1] block-local query index
    offs_j = tl.arange(0, BLOCK_N)[None, :]
    offs_dv = tl.arange(0, BLOCK_DV)
    b64, g64, h64, hk64 = b.to(tl.int64), g.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    q_ptr = Q + b64 * stride_qb + g64 * stride_qg + h64 * stride_qh
    k_ptr = K + b64 * stride_kb + g64 * stride_kg + hk64 * stride_kh
    v_ptr = V + b64 * stride_vb + g64 * stride_vg + hk64 * stride_vh
    b_ptr = Bias + b64 * stride_bb + g64 * stride_bg + h64 * stride_bh
    bt_ptr = BT + z.to(tl.int64) * stride_bt_b
    q = load_rows(
        desc_q, q_ptr, b, q_start + m_start, g, h, q_start + q_len, stride_qm, K_DIM, BLOCK_M, BLOCK_D, USE_TMA, True
    )

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    drop_head = b * num_heads + head
    if BLOCK_SPARSE:  # the table's row of this query tile, for the head's layout (or the shared one)
        bs_head = head * bs_head_step
        lo, mid_lo, mid_hi, hi = sparse_tiles(BS_OFF, BS_FULL, bs_head, pid % NUM_TILES, NUM_TILES)
        bs_layout = BS_LAYOUT + bs_head.to(tl.int64) * stride_bsl_h
    else:
        lo, mid_lo, mid_hi, hi = key_tiles(m_start, q_len, k_len, off, WL, WR, BLOCK_M, BLOCK_N, HAS_WL, HAS_WR)
        bs_layout = BS_LAYOUT
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, desc_k, desc_v, desc_b, k_ptr, v_ptr, b_ptr, bt_ptr, lo, mid_lo, b, g, h, hk, m_start,
        q_start, k_start, offs_i, offs_j, q_len, k_len, off, WL, WR, stride_kn, stride_vn, stride_bm, stride_bn,
        stride_bt_p, NUM_PAGES, Mkv, qk_scale, seed, dropout_p, drop_head, K_DIM, KV_DIM, BS_COLS, bs_layout,
        bs_block_q, bs_block_k, bs_nkb, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, True, USE_TMA, BIAS_TMA, HAS_WL, HAS_WR,
        HAS_BIAS, HAS_DROPOUT, KEYS_PADDED, PAGED, PAGE_SIZE, PAGE_TILES, BLOCK_SPARSE, INPUT_PRECISION,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, desc_k, desc_v, desc_b, k_ptr, v_ptr, b_ptr, bt_ptr, mid_lo, mid_hi, b, g, h, hk, m_start,
        q_start, k_start, offs_i, offs_j, q_len, k_len, off, WL, WR, stride_kn, stride_vn, stride_bm, stride_bn,
        stride_bt_p, NUM_PAGES, Mkv, qk_scale, seed, dropout_p, drop_head, K_DIM, KV_DIM, BS_COLS, bs_layout,
        bs_block_q, bs_block_k, bs_nkb, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, False, USE_TMA, BIAS_TMA, HAS_WL, HAS_WR,
        HAS_BIAS, HAS_DROPOUT, KEYS_PADDED, PAGED, PAGE_SIZE, PAGE_TILES, BLOCK_SPARSE, INPUT_PRECISION,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, desc_k, desc_v, desc_b, k_ptr, v_ptr, b_ptr, bt_ptr, mid_hi, hi, b, g, h, hk, m_start,
        q_start, k_start, offs_i, offs_j, q_len, k_len, off, WL, WR, stride_kn, stride_vn, stride_bm, stride_bn,
        stride_bt_p, NUM_PAGES, Mkv, qk_scale, seed, dropout_p, drop_head, K_DIM, KV_DIM, BS_COLS, bs_layout,
        bs_block_q, bs_block_k, bs_nkb, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, True, USE_TMA, BIAS_TMA, HAS_WL, HAS_WR,
        HAS_BIAS, HAS_DROPOUT, KEYS_PADDED, PAGED, PAGE_SIZE, PAGE_TILES, BLOCK_SPARSE, INPUT_PRECISION,
    )

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, -float("inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    rows = (q_start + offs_i).to(tl.int64)
    o_ptrs = Out + b64 * stride_ob + g64 * stride_og + h64 * stride_oh + rows * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_i < q_len) & (offs_dv[None, :] < KV_DIM))
    l_ptrs = LSE + b64 * stride_lb + g64 * stride_lg + h64 * stride_lh + q_start + m_start + offs_m
    tl.store(l_ptrs, lse, mask=m_start + offs_m < q_len)
