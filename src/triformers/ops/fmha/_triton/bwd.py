"""Backward kernels: FlashAttention-2's, recomputing ``P = exp(S - lse)`` tile by tile.

- ``attn_bwd_preprocess``: ``delta_i = rowsum(dO_i * O_i)``.
- ``attn_bwd_dkdv``: one program per key tile and K/V head; it loops over the query heads that share the
  K/V head (GQA: dK/dV summed over the group in registers, no atomics) and over the query tiles the mask
  lets see its keys, accumulating ``dV += P^T dO`` and ``dK += dS^T Q``. With ``ATOMIC_DQ`` it also adds
  ``dS K`` into a float32 dQ buffer (a TMA reduce-add when ``USE_TMA``): 5 matrix products per tile in
  all. The tensor-bias gradient ``dS`` is stored (or atomically added where the bias is broadcast) in the
  same pass.
- ``attn_bwd_dq``: one program per query tile (deterministic mode): recomputes ``dS`` over the allowed
  key tiles and accumulates ``dQ = dS K`` without atomics.

Tiles of Q, K, V, dO come through TMA descriptors when ``USE_TMA`` (see ``fwd.py`` for why). A block-sparse
mask (``BLOCK_SPARSE``) gives each dK/dV program the query tiles that see its key tile (the transposed tile
table) and each dQ program its key tiles, as in the forward.
"""

import triton
import triton.language as tl

from triformers.ops.fmha._triton.common import (
    LOG2E,
    dropout_keep,
    key_tiles,
    load_key_rows,
    load_rows,
    query_tiles,
    sequence_bounds,
    sparse_allowed,
    sparse_tiles,
    tile_allowed,
)
from triformers.ops.fmha._triton.fwd import load_bias_tile


@triton.jit
def attn_bwd_preprocess(
    Out, DO, Delta,
    stride_ob, stride_om, stride_og, stride_oh,
    stride_db, stride_dm, stride_dg, stride_dh,
    stride_eb, stride_eg, stride_eh,
    num_heads, HG, Mq, KV_DIM,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # program (batch * heads + head, row tile)
    pid = tl.program_id(0)
    b = (pid // num_heads).to(tl.int64)
    head = pid % num_heads
    g = (head // HG).to(tl.int64)
    h = (head % HG).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_DV)
    mask = (rows[:, None] < Mq) & (cols[None, :] < KV_DIM)
    r64 = rows[:, None].to(tl.int64)
    o = tl.load(Out + b * stride_ob + g * stride_og + h * stride_oh + r64 * stride_om + cols[None, :], mask=mask,
                other=0.0)
    do = tl.load(DO + b * stride_db + g * stride_dg + h * stride_dh + r64 * stride_dm + cols[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b * stride_eb + g * stride_eg + h * stride_eh + rows, delta, mask=rows < Mq)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, desc_q, desc_do, desc_b, desc_dq, q_ptr, do_ptr, lse_ptr, delta_ptr, b_ptr, db_ptr,
                dq_ptr, lo, hi, b, g, h, q_start, k_start, n_start, offs_m, offs_jT, q_len, k_len, off, WL, WR,
                stride_qm, stride_dom, stride_bm, stride_bn, stride_dbm, stride_dbn, stride_dqm, qk_scale,
                seed, dropout_p, drop_head, K_DIM, KV_DIM, bs_cols, bs_layout, bs_block_q, bs_block_k, bs_nkb,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                MASKED: tl.constexpr, USE_TMA: tl.constexpr, BIAS_TMA: tl.constexpr,
                HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                DB_MODE: tl.constexpr, ATOMIC_DQ: tl.constexpr, DQ_TMA: tl.constexpr, BLOCK_SPARSE: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    dtype = k.dtype
    offs_d = tl.arange(0, BLOCK_D)
    STEP: tl.constexpr = 1 if BLOCK_SPARSE else BLOCK_M  # block-sparse: [lo, hi) index the table's tiles
    nxt = lo
    if BLOCK_SPARSE:  # the next tile's index is loaded one iteration ahead (cols ends with a spare entry)
        nxt = tl.load(bs_cols + lo)
    for it in range(lo, hi, STEP):
        if BLOCK_SPARSE:
            start_m = nxt * BLOCK_M
            nxt = tl.load(bs_cols + it + 1)
        else:
            start_m = it
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m  # [BM] block-local query index
        rows_t = rows[None, :]  # [1, BM]
        row_ok = rows < q_len
        q = load_rows(desc_q, q_ptr, b, q_start + start_m, g, h, q_start + q_len, stride_qm, K_DIM,
                      BLOCK_M, BLOCK_D, USE_TMA, MASKED)
        do = load_rows(desc_do, do_ptr, b, q_start + start_m, g, h, q_start + q_len, stride_dom, KV_DIM,
                       BLOCK_M, BLOCK_DV, USE_TMA, MASKED)
        lse = tl.load(lse_ptr + start_m + offs_m, mask=row_ok, other=0.0)
        lse2 = tl.where(lse == -float("inf"), float("inf"), lse * LOG2E)
        delta = tl.load(delta_ptr + start_m + offs_m, mask=row_ok, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale  # [BN, BM]
        if HAS_BIAS:
            bias = load_bias_tile(desc_b, b_ptr, b, g, h, start_m, n_start, q_len, k_len, stride_bm, stride_bn,
                                  BLOCK_M, BLOCK_N, BIAS_TMA)
            qkT += tl.trans(bias) * LOG2E
        pT = tl.math.exp2(qkT - lse2[None, :])
        if MASKED:
            okT = tile_allowed(rows_t, offs_jT, q_len, k_len, off, WL, WR, HAS_WL, HAS_WR)
            if BLOCK_SPARSE:
                okT = okT & sparse_allowed(bs_layout, rows_t, offs_jT, q_len, k_len, bs_block_q, bs_block_k, bs_nkb)
            pT = tl.where(okT, pT, 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # [BN, BM]
        if HAS_DROPOUT:
            keepT = dropout_keep(seed, q_start + rows_t, k_start + offs_jT, drop_head, dropout_p)
            z = 1.0 / (1.0 - dropout_p)
            dv = tl.dot(tl.where(keepT, pT * z, 0.0).to(dtype), do, dv, input_precision=INPUT_PRECISION)
            dpT = tl.where(keepT, dpT * z, 0.0)
        else:
            dv = tl.dot(pT.to(dtype), do, dv, input_precision=INPUT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(dtype), q, dk, input_precision=INPUT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dsT.to(dtype)), k, input_precision=INPUT_PRECISION)  # [BM, BD]
            if DQ_TMA:  # rows past q_len have dS = 0 (masked), so adding them is harmless
                desc_dq.atomic_add([b, q_start + start_m, g, h, 0], dq.reshape(1, BLOCK_M, 1, 1, BLOCK_D))
            else:
                dq_ptrs = dq_ptr + (q_start + rows).to(tl.int64)[:, None] * stride_dqm + offs_d[None, :]
                tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None] & (offs_d[None, :] < K_DIM), sem="relaxed")
        if DB_MODE != 0:
            key_ok = offs_jT < k_len
            if DB_MODE == 3:  # bias broadcast over queries: reduce the rows first
                tl.atomic_add(db_ptr + offs_jT.to(tl.int64) * stride_dbn, tl.sum(dsT, 1)[:, None], mask=key_ok,
                              sem="relaxed")
            else:
                db_ptrs = db_ptr + rows_t.to(tl.int64) * stride_dbm + offs_jT.to(tl.int64) * stride_dbn
                if DB_MODE == 1:
                    tl.store(db_ptrs, dsT, mask=key_ok & (rows_t < q_len))
                else:
                    tl.atomic_add(db_ptrs, dsT, mask=key_ok & (rows_t < q_len), sem="relaxed")
    return dk, dv


@triton.jit
def attn_bwd_dkdv(
    Q, K, V, DO, LSE, Delta, Bias, DB, DQ, DK, DV, desc_q, desc_k, desc_v, desc_do, desc_b, desc_dq, SEQ_Q, K_START,
    K_LEN, BS_OFF, BS_FULL, BS_COLS, BS_LAYOUT, BS_ORDER, stride_qb, stride_qm, stride_qg, stride_qh, stride_kb,
    stride_kn, stride_kg, stride_kh, stride_vb, stride_vn,
    stride_vg, stride_vh, stride_dob, stride_dom, stride_dog, stride_doh, stride_lb, stride_lg, stride_lh, stride_bb,
    stride_bg, stride_bh, stride_bm, stride_bn, stride_dbb, stride_dbg, stride_dbh, stride_dbm, stride_dbn, stride_dqb,
    stride_dqm, stride_dqg, stride_dqh, stride_dkb, stride_dkn, stride_dkg, stride_dkh, stride_dvb, stride_dvn,
    stride_dvg, stride_dvh, num_heads, HG, Mq, Mkv, qk_scale, sm_scale, WL, WR, dropout_p, seed, K_DIM, KV_DIM,
    NUM_TILES, bs_head_step, stride_bsl_h, bs_nkb, bs_block_q, bs_block_k, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_VARLEN: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, KV_SHARED: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DB_MODE: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    USE_TMA: tl.constexpr, BIAS_TMA: tl.constexpr, DQ_TMA: tl.constexpr, KEYS_PADDED: tl.constexpr,
    BLOCK_SPARSE: tl.constexpr, BS_ORDERED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # program (z * kv_heads + kv_head) * NUM_TILES + key tile (key tiles vary fastest: programs running
    # together share Q and dO through L2); kv_head = g * HK + hk, HK = 1 when a group's HG query heads share
    # one K/V head (GQA), else HK = HG
    HK = HG
    if KV_SHARED:
        HK = 1
    num_kv_heads = (num_heads // HG) * HK
    pid = tl.program_id(0)
    if BS_ORDERED:  # heavy programs first (sparse_order.py)
        pid = tl.load(BS_ORDER + pid)
    z = pid // NUM_TILES // num_kv_heads
    kv_head = pid // NUM_TILES % num_kv_heads
    g = kv_head // HK
    hk = kv_head % HK
    b, q_start, q_len, k_start, k_len = sequence_bounds(z, SEQ_Q, K_START, K_LEN, Mq, Mkv, IS_VARLEN)
    n_start = (pid % NUM_TILES) * BLOCK_N
    if n_start >= k_len:
        return
    off = 0
    if BOTTOM_RIGHT:
        off = k_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_jT = (n_start + tl.arange(0, BLOCK_N))[:, None]  # [BN, 1] block-local key index
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64, g64, hk64 = b.to(tl.int64), g.to(tl.int64), hk.to(tl.int64)
    k_ptr = K + b64 * stride_kb + g64 * stride_kg + hk64 * stride_kh
    v_ptr = V + b64 * stride_vb + g64 * stride_vg + hk64 * stride_vh
    k = load_key_rows(
        desc_k, k_ptr, b, k_start + n_start, g, hk, k_start + k_len, stride_kn, K_DIM, BLOCK_N, BLOCK_D, USE_TMA, True,
        KEYS_PADDED,
    )
    v = load_key_rows(
        desc_v, v_ptr, b, k_start + n_start, g, hk, k_start + k_len, stride_vn, KV_DIM, BLOCK_N, BLOCK_DV, USE_TMA,
        True, KEYS_PADDED,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    if not BLOCK_SPARSE:
        lo, mid_lo, mid_hi, hi = query_tiles(n_start, q_len, k_len, off, WL, WR, BLOCK_M, BLOCK_N, HAS_WL, HAS_WR)
    if KV_SHARED:
        h_lo = hk * 0
        h_hi = h_lo + HG
    else:
        h_lo = hk
        h_hi = hk + 1
    for h in range(h_lo, h_hi):
        h64 = g64 * 0 + h  # int64 (the loop variable may be a Python int under the interpreter)
        hh = hk * 0 + h  # int32 descriptor coordinate
        q_ptr = Q + b64 * stride_qb + g64 * stride_qg + h64 * stride_qh
        do_ptr = DO + b64 * stride_dob + g64 * stride_dog + h64 * stride_doh
        lse_ptr = LSE + b64 * stride_lb + g64 * stride_lg + h64 * stride_lh + q_start
        delta_ptr = Delta + ((b64 * (num_heads // HG) + g64) * HG + h64) * Mq + q_start
        b_ptr = Bias + b64 * stride_bb + g64 * stride_bg + h64 * stride_bh
        db_ptr = DB + b64 * stride_dbb + g64 * stride_dbg + h64 * stride_dbh
        dq_ptr = DQ + b64 * stride_dqb + g64 * stride_dqg + h64 * stride_dqh
        drop_head = b * num_heads + g * HG + hh
        bs_layout = BS_LAYOUT
        if BLOCK_SPARSE:  # the query tiles that see this key tile, for this query head's layout (or the shared one)
            bs_head = (g * HG + hh) * bs_head_step
            lo, mid_lo, mid_hi, hi = sparse_tiles(BS_OFF, BS_FULL, bs_head, pid % NUM_TILES, NUM_TILES)
            bs_layout = BS_LAYOUT + bs_head.to(tl.int64) * stride_bsl_h
        for seg in tl.static_range(3):  # masked, full, masked query-tile ranges
            if seg == 0:
                s_lo, s_hi = lo, mid_lo
            elif seg == 1:
                s_lo, s_hi = mid_lo, mid_hi
            else:
                s_lo, s_hi = mid_hi, hi
            dk, dv = _dkdv_tiles(dk, dv, k, v, desc_q, desc_do, desc_b, desc_dq, q_ptr, do_ptr, lse_ptr, delta_ptr,
                                 b_ptr, db_ptr, dq_ptr, s_lo, s_hi, b, g, hh, q_start, k_start, n_start, offs_m,
                                 offs_jT, q_len, k_len, off, WL, WR, stride_qm, stride_dom, stride_bm, stride_bn,
                                 stride_dbm, stride_dbn, stride_dqm, qk_scale, seed, dropout_p, drop_head, K_DIM,
                                 KV_DIM, BS_COLS, bs_layout, bs_block_q, bs_block_k, bs_nkb, BLOCK_M, BLOCK_N,
                                 BLOCK_D, BLOCK_DV, seg != 1, USE_TMA, BIAS_TMA, HAS_WL, HAS_WR, HAS_BIAS,
                                 HAS_DROPOUT, DB_MODE, ATOMIC_DQ, DQ_TMA, BLOCK_SPARSE, INPUT_PRECISION)
    keys = (k_start + offs_jT).to(tl.int64)
    key_ok = offs_jT < k_len
    dk_ptrs = DK + b64 * stride_dkb + g64 * stride_dkg + hk64 * stride_dkh + keys * stride_dkn + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok & (offs_d[None, :] < K_DIM))
    dv_ptrs = DV + b64 * stride_dvb + g64 * stride_dvg + hk64 * stride_dvh + keys * stride_dvn + offs_dv[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=key_ok & (offs_dv[None, :] < KV_DIM))


@triton.jit
def _dq_tiles(
    dq, q, do, lse2, delta, desc_k, desc_v, desc_b, k_ptr, v_ptr, b_ptr, lo, hi, b, g, h, hk, m_start, q_start, k_start,
    offs_i, offs_j, q_len, k_len, off, WL, WR, stride_kn, stride_vn, stride_bm, stride_bn, qk_scale, seed, dropout_p,
    drop_head, K_DIM, KV_DIM, bs_cols, bs_layout, bs_block_q, bs_block_k, bs_nkb, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
    BIAS_TMA: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, KEYS_PADDED: tl.constexpr, BLOCK_SPARSE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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
        k = load_key_rows(
            desc_k, k_ptr, b, k_start + start_n, g, hk, k_start + k_len, stride_kn, K_DIM, BLOCK_N, BLOCK_D, USE_TMA,
            MASKED, KEYS_PADDED,
        )
        v = load_key_rows(
            desc_v, v_ptr, b, k_start + start_n, g, hk, k_start + k_len, stride_vn, KV_DIM, BLOCK_N, BLOCK_DV, USE_TMA,
            MASKED, KEYS_PADDED,
        )
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        if HAS_BIAS:
            qk += load_bias_tile(desc_b, b_ptr, b, g, h, m_start, start_n, q_len, k_len, stride_bm, stride_bn,
                                 BLOCK_M, BLOCK_N, BIAS_TMA) * LOG2E
        p = tl.math.exp2(qk - lse2[:, None])
        if MASKED:
            ok = tile_allowed(offs_i, start_n + offs_j, q_len, k_len, off, WL, WR, HAS_WL, HAS_WR)
            if BLOCK_SPARSE:
                ok = ok & sparse_allowed(bs_layout, offs_i, start_n + offs_j, q_len, k_len, bs_block_q, bs_block_k,
                                         bs_nkb)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, q_start + offs_i, k_start + start_n + offs_j, drop_head, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def attn_bwd_dq(
    Q, K, V, DO, LSE, Delta, Bias, DQ, desc_q, desc_k, desc_v, desc_do, desc_b, SEQ_Q, K_START, K_LEN, BS_OFF,
    BS_FULL, BS_COLS, BS_LAYOUT, BS_ORDER, stride_qb,
    stride_qm, stride_qg, stride_qh, stride_kb, stride_kn, stride_kg, stride_kh, stride_vb, stride_vn, stride_vg,
    stride_vh, stride_dob, stride_dom, stride_dog, stride_doh, stride_lb, stride_lg, stride_lh, stride_bb, stride_bg,
    stride_bh, stride_bm, stride_bn, stride_dqb, stride_dqm, stride_dqg, stride_dqh, num_heads, HG, Mq, Mkv, qk_scale,
    sm_scale, WL, WR, dropout_p, seed, K_DIM, KV_DIM, NUM_TILES, bs_head_step, stride_bsl_h, bs_nkb, bs_block_q,
    bs_block_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, KV_SHARED: tl.constexpr, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
    BIAS_TMA: tl.constexpr, KEYS_PADDED: tl.constexpr, BLOCK_SPARSE: tl.constexpr, BS_ORDERED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # program (z * heads + head) * NUM_TILES + query tile, like the forward
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
    m_start = (pid % NUM_TILES) * BLOCK_M
    if m_start >= q_len:
        return
    off = 0
    if BOTTOM_RIGHT:
        off = k_len - q_len
    b64, g64, h64, hk64 = b.to(tl.int64), g.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_i = (m_start + offs_m)[:, None]
    offs_j = tl.arange(0, BLOCK_N)[None, :]
    offs_d = tl.arange(0, BLOCK_D)
    q_ptr = Q + b64 * stride_qb + g64 * stride_qg + h64 * stride_qh
    do_ptr = DO + b64 * stride_dob + g64 * stride_dog + h64 * stride_doh
    k_ptr = K + b64 * stride_kb + g64 * stride_kg + hk64 * stride_kh
    v_ptr = V + b64 * stride_vb + g64 * stride_vg + hk64 * stride_vh
    b_ptr = Bias + b64 * stride_bb + g64 * stride_bg + h64 * stride_bh
    q = load_rows(desc_q, q_ptr, b, q_start + m_start, g, h, q_start + q_len, stride_qm, K_DIM,
                  BLOCK_M, BLOCK_D, USE_TMA, True)
    do = load_rows(desc_do, do_ptr, b, q_start + m_start, g, h, q_start + q_len, stride_dom, KV_DIM,
                   BLOCK_M, BLOCK_DV, USE_TMA, True)
    row_ok = m_start + offs_m < q_len
    lse = tl.load(LSE + b64 * stride_lb + g64 * stride_lg + h64 * stride_lh + q_start + m_start + offs_m,
                  mask=row_ok, other=0.0)
    lse2 = tl.where(lse == -float("inf"), float("inf"), lse * LOG2E)
    delta = tl.load(Delta + ((b64 * (num_heads // HG) + g64) * HG + h64) * Mq + q_start + m_start + offs_m,
                    mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    drop_head = b * num_heads + head
    if BLOCK_SPARSE:  # the table's row of this query tile, as in the forward
        bs_head = head * bs_head_step
        lo, mid_lo, mid_hi, hi = sparse_tiles(BS_OFF, BS_FULL, bs_head, pid % NUM_TILES, NUM_TILES)
        bs_layout = BS_LAYOUT + bs_head.to(tl.int64) * stride_bsl_h
    else:
        lo, mid_lo, mid_hi, hi = key_tiles(m_start, q_len, k_len, off, WL, WR, BLOCK_M, BLOCK_N, HAS_WL, HAS_WR)
        bs_layout = BS_LAYOUT
    for seg in tl.static_range(3):  # masked, full, masked key-tile ranges
        if seg == 0:
            s_lo, s_hi = lo, mid_lo
        elif seg == 1:
            s_lo, s_hi = mid_lo, mid_hi
        else:
            s_lo, s_hi = mid_hi, hi
        dq = _dq_tiles(
            dq, q, do, lse2, delta, desc_k, desc_v, desc_b, k_ptr, v_ptr, b_ptr, s_lo, s_hi, b, g, h, hk, m_start,
            q_start, k_start, offs_i, offs_j, q_len, k_len, off, WL, WR, stride_kn, stride_vn, stride_bm, stride_bn,
            qk_scale, seed, dropout_p, drop_head, K_DIM, KV_DIM, BS_COLS, bs_layout, bs_block_q, bs_block_k, bs_nkb,
            BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, seg != 1, USE_TMA, BIAS_TMA, HAS_WL, HAS_WR, HAS_BIAS, HAS_DROPOUT,
            KEYS_PADDED, BLOCK_SPARSE, INPUT_PRECISION,
        )
    rows = (q_start + offs_i).to(tl.int64)
    dq_ptrs = DQ + b64 * stride_dqb + g64 * stride_dqg + h64 * stride_dqh + rows * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=(offs_i < q_len) & (offs_d[None, :] < K_DIM))
