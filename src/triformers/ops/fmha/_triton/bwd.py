"""Backward kernels: FlashAttention-2's, recomputing ``P = exp(S - lse)`` tile by tile.

- ``attn_bwd_preprocess``: ``delta_i = rowsum(dO_i * O_i)``.
- ``attn_bwd_dkdv``: one program per key tile and K/V head; it loops over the query heads that share the
  K/V head (GQA: dK/dV summed over the group in registers, no atomics) and over the query tiles the mask
  lets see its keys, accumulating ``dV += P^T dO`` and ``dK += dS^T Q``. With ``ATOMIC_DQ`` it also adds
  ``dS K`` into a float32 dQ buffer (5 matrix products per tile in all); the tensor-bias gradient ``dS``
  is stored (or atomically added where the bias is broadcast) in the same pass.
- ``attn_bwd_dq``: one program per query tile (deterministic mode): recomputes ``dS`` over the allowed
  key tiles and accumulates ``dQ = dS K`` without atomics.
"""

import triton
import triton.language as tl

from triformers.ops.fmha._triton.common import LOG2E, dropout_keep, key_tiles, query_tiles, tile_allowed


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
def _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, b_ptrs, db_ptrs, dq_ptrs, lo, hi,
                offs_m, offs_jT, offs_d, offs_dv, q_len, k_len, off, WL, WR,
                stride_qm, stride_dom, stride_bm, stride_dbm, stride_dqm, qk_scale,
                seed, dropout_p, drop_rows0, drop_colsT, drop_head, K_DIM, KV_DIM,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                DB_MODE: tl.constexpr, ATOMIC_DQ: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    dtype = k.dtype
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        start64 = start_m.to(tl.int64)
        rows = start_m + offs_m  # [BM] block-local query index
        rows_t = rows[None, :]  # [1, BM]
        row_ok = rows < q_len
        if MASKED or not EVEN_D:
            q = tl.load(q_ptrs + start64 * stride_qm, mask=row_ok[:, None] & (offs_d[None, :] < K_DIM), other=0.0)
            do = tl.load(do_ptrs + start64 * stride_dom, mask=row_ok[:, None] & (offs_dv[None, :] < KV_DIM),
                         other=0.0)
        else:
            q = tl.load(q_ptrs + start64 * stride_qm)
            do = tl.load(do_ptrs + start64 * stride_dom)
        lse = tl.load(lse_ptrs + start_m, mask=row_ok, other=0.0)
        lse2 = tl.where(lse == -float("inf"), float("inf"), lse * LOG2E)
        delta = tl.load(delta_ptrs + start_m, mask=row_ok, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale  # [BN, BM]
        if HAS_BIAS:
            biasT = tl.load(b_ptrs + start64 * stride_bm, mask=(offs_jT < k_len) & (rows_t < q_len), other=0.0)
            qkT += biasT.to(tl.float32) * LOG2E
        pT = tl.math.exp2(qkT - lse2[None, :])
        if MASKED:
            pT = tl.where(tile_allowed(rows_t, offs_jT, q_len, k_len, off, WL, WR, HAS_WL, HAS_WR), pT, 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # [BN, BM]
        if HAS_DROPOUT:
            keepT = dropout_keep(seed, drop_rows0 + rows_t, drop_colsT, drop_head, dropout_p)
            z = 1.0 / (1.0 - dropout_p)
            dv = tl.dot(tl.where(keepT, pT * z, 0.0).to(dtype), do, dv, input_precision=INPUT_PRECISION)
            dpT = tl.where(keepT, dpT * z, 0.0)
        else:
            dv = tl.dot(pT.to(dtype), do, dv, input_precision=INPUT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(dtype), q, dk, input_precision=INPUT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dsT.to(dtype)), k, input_precision=INPUT_PRECISION)  # [BM, BD]
            tl.atomic_add(dq_ptrs + start64 * stride_dqm, dq, mask=row_ok[:, None] & (offs_d[None, :] < K_DIM),
                          sem="relaxed")
        if DB_MODE == 1:
            tl.store(db_ptrs + start64 * stride_dbm, dsT, mask=(offs_jT < k_len) & (rows_t < q_len))
        elif DB_MODE == 2:
            tl.atomic_add(db_ptrs + start64 * stride_dbm, dsT, mask=(offs_jT < k_len) & (rows_t < q_len),
                          sem="relaxed")
        elif DB_MODE == 3:  # bias broadcast over queries: reduce the rows first
            tl.atomic_add(db_ptrs, tl.sum(dsT, 1)[:, None], mask=offs_jT < k_len, sem="relaxed")
    return dk, dv


@triton.jit
def attn_bwd_dkdv(
    Q, K, V, DO, LSE, Delta, Bias, DB, DQ, DK, DV,
    SEQ_Q, K_START, K_LEN,
    stride_qb, stride_qm, stride_qg, stride_qh,
    stride_kb, stride_kn, stride_kg, stride_kh,
    stride_vb, stride_vn, stride_vg, stride_vh,
    stride_dob, stride_dom, stride_dog, stride_doh,
    stride_lb, stride_lg, stride_lh,
    stride_bb, stride_bg, stride_bh, stride_bm, stride_bn,
    stride_dbb, stride_dbg, stride_dbh, stride_dbm, stride_dbn,
    stride_dqb, stride_dqm, stride_dqg, stride_dqh,
    stride_dkb, stride_dkn, stride_dkg, stride_dkh,
    stride_dvb, stride_dvn, stride_dvg, stride_dvh,
    num_heads, HG, Mq, Mkv, qk_scale, sm_scale, WL, WR, dropout_p, seed, K_DIM, KV_DIM,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DB_MODE: tl.constexpr, ATOMIC_DQ: tl.constexpr, KV_SHARED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # program (z * kv_heads + kv_head, key tile); kv_head = g * HK + hk, HK = 1 when a group's HG query
    # heads share one K/V head (GQA), else HK = HG
    HK = HG
    if KV_SHARED:
        HK = 1
    num_kv_heads = (num_heads // HG) * HK
    pid = tl.program_id(0)
    z = pid // num_kv_heads
    kv_head = pid % num_kv_heads
    g = kv_head // HK
    hk = kv_head % HK
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
    n_start = tl.program_id(1) * BLOCK_N
    if n_start >= k_len:
        return
    off = 0
    if BOTTOM_RIGHT:
        off = k_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_jT = (n_start + offs_n)[:, None]  # [BN, 1] block-local key index
    b64 = b.to(tl.int64)
    g64 = g.to(tl.int64)
    keys = (k_start + offs_jT).to(tl.int64)
    key_ok = offs_jT < k_len
    k = tl.load(K + b64 * stride_kb + g64 * stride_kg + hk * stride_kh + keys * stride_kn + offs_d[None, :],
                mask=key_ok & (offs_d[None, :] < K_DIM), other=0.0)
    v = tl.load(V + b64 * stride_vb + g64 * stride_vg + hk * stride_vh + keys * stride_vn + offs_dv[None, :],
                mask=key_ok & (offs_dv[None, :] < KV_DIM), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = query_tiles(n_start, q_len, k_len, off, WL, WR, BLOCK_M, BLOCK_N, HAS_WL, HAS_WR)
    rows0 = (q_start + offs_m).to(tl.int64)
    if KV_SHARED:
        h_lo = hk * 0
        h_hi = h_lo + HG
    else:
        h_lo = hk
        h_hi = hk + 1
    for h in range(h_lo, h_hi):
        h64 = g64 * 0 + h  # int64 (the loop variable may be a Python int under the interpreter)
        q_ptrs = Q + b64 * stride_qb + g64 * stride_qg + h64 * stride_qh + rows0[:, None] * stride_qm + offs_d[None, :]
        do_ptrs = (DO + b64 * stride_dob + g64 * stride_dog + h64 * stride_doh + rows0[:, None] * stride_dom
                   + offs_dv[None, :])
        lse_ptrs = LSE + b64 * stride_lb + g64 * stride_lg + h64 * stride_lh + q_start + offs_m
        delta_ptrs = Delta + ((b64 * (num_heads // HG) + g64) * HG + h64) * Mq + q_start + offs_m
        b_ptrs = Bias
        db_ptrs = DB
        dq_ptrs = DQ
        if HAS_BIAS:
            b_ptrs = (Bias + b64 * stride_bb + g64 * stride_bg + h64 * stride_bh + offs_m[None, :] * stride_bm
                      + offs_jT * stride_bn)  # [BN, BM]
        if DB_MODE == 3:  # [BN, 1]: one gradient per key, summed over the query rows in registers
            db_ptrs = DB + b64 * stride_dbb + g64 * stride_dbg + h64 * stride_dbh + offs_jT * stride_dbn
        elif DB_MODE != 0:
            db_ptrs = (DB + b64 * stride_dbb + g64 * stride_dbg + h64 * stride_dbh + offs_m[None, :] * stride_dbm
                       + offs_jT * stride_dbn)
        if ATOMIC_DQ:
            dq_ptrs = (DQ + b64 * stride_dqb + g64 * stride_dqg + h64 * stride_dqh + rows0[:, None] * stride_dqm
                       + offs_d[None, :])
        drop_head = b * num_heads + g * HG + h
        drop_colsT = k_start + offs_jT
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, b_ptrs, db_ptrs, dq_ptrs, lo,
                             mid_lo, offs_m, offs_jT, offs_d, offs_dv, q_len, k_len, off, WL, WR, stride_qm, stride_dom,
                             stride_bm, stride_dbm, stride_dqm, qk_scale, seed, dropout_p, q_start, drop_colsT,
                             drop_head, K_DIM, KV_DIM, BLOCK_M, True, EVEN_D, HAS_WL, HAS_WR, HAS_BIAS,
                             HAS_DROPOUT, DB_MODE, ATOMIC_DQ, INPUT_PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, b_ptrs, db_ptrs, dq_ptrs, mid_lo,
                             mid_hi, offs_m, offs_jT, offs_d, offs_dv, q_len, k_len, off, WL, WR, stride_qm, stride_dom,
                             stride_bm, stride_dbm, stride_dqm, qk_scale, seed, dropout_p, q_start, drop_colsT,
                             drop_head, K_DIM, KV_DIM, BLOCK_M, False, EVEN_D, HAS_WL, HAS_WR, HAS_BIAS,
                             HAS_DROPOUT, DB_MODE, ATOMIC_DQ, INPUT_PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, b_ptrs, db_ptrs, dq_ptrs, mid_hi,
                             hi, offs_m, offs_jT, offs_d, offs_dv, q_len, k_len, off, WL, WR, stride_qm, stride_dom,
                             stride_bm, stride_dbm, stride_dqm, qk_scale, seed, dropout_p, q_start, drop_colsT,
                             drop_head, K_DIM, KV_DIM, BLOCK_M, True, EVEN_D, HAS_WL, HAS_WR, HAS_BIAS,
                             HAS_DROPOUT, DB_MODE, ATOMIC_DQ, INPUT_PRECISION)
    dk_ptrs = DK + b64 * stride_dkb + g64 * stride_dkg + hk * stride_dkh + keys * stride_dkn + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok & (offs_d[None, :] < K_DIM))
    dv_ptrs = DV + b64 * stride_dvb + g64 * stride_dvg + hk * stride_dvh + keys * stride_dvn + offs_dv[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=key_ok & (offs_dv[None, :] < KV_DIM))


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_ptrs, v_ptrs, b_ptrs, lo, hi, offs_i, offs_j, offs_d, offs_dv,
              q_len, k_len, off, WL, WR, stride_kn, stride_vn, stride_bn, qk_scale,
              seed, dropout_p, drop_rows, drop_cols0, drop_head, K_DIM, KV_DIM,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
              HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              INPUT_PRECISION: tl.constexpr):
    dtype = q.dtype
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        start64 = start_n.to(tl.int64)
        cols = start_n + offs_j  # [1, BN]
        cols_t = start_n + tl.arange(0, BLOCK_N)[:, None]  # [BN, 1]
        if MASKED or not EVEN_D:
            kT = tl.load(k_ptrs + start64 * stride_kn, mask=(cols < k_len) & (offs_d[:, None] < K_DIM), other=0.0)
            v = tl.load(v_ptrs + start64 * stride_vn, mask=(cols_t < k_len) & (offs_dv[None, :] < KV_DIM),
                        other=0.0)
        else:
            kT = tl.load(k_ptrs + start64 * stride_kn)
            v = tl.load(v_ptrs + start64 * stride_vn)
        qk = tl.dot(q, kT, input_precision=INPUT_PRECISION) * qk_scale
        if HAS_BIAS:
            bias = tl.load(b_ptrs + start64 * stride_bn, mask=(offs_i < q_len) & (cols < k_len), other=0.0)
            qk += bias.to(tl.float32) * LOG2E
        p = tl.math.exp2(qk - lse2[:, None])
        if MASKED:
            p = tl.where(tile_allowed(offs_i, cols, q_len, k_len, off, WL, WR, HAS_WL, HAS_WR), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, drop_rows, drop_cols0 + cols, drop_head, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(dtype), tl.trans(kT), dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def attn_bwd_dq(
    Q, K, V, DO, LSE, Delta, Bias, DQ,
    SEQ_Q, K_START, K_LEN,
    stride_qb, stride_qm, stride_qg, stride_qh,
    stride_kb, stride_kn, stride_kg, stride_kh,
    stride_vb, stride_vn, stride_vg, stride_vh,
    stride_dob, stride_dom, stride_dog, stride_doh,
    stride_lb, stride_lg, stride_lh,
    stride_bb, stride_bg, stride_bh, stride_bm, stride_bn,
    stride_dqb, stride_dqm, stride_dqg, stride_dqh,
    num_heads, HG, Mq, Mkv, qk_scale, sm_scale, WL, WR, dropout_p, seed, K_DIM, KV_DIM,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # program (z * heads + head, query tile), like the forward
    pid_zh = tl.program_id(0)
    z = pid_zh // num_heads
    head = pid_zh % num_heads
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
    g = (head // HG).to(tl.int64)
    h = (head % HG).to(tl.int64)
    hk = h  # shared K/V heads come with stride_kh = stride_vh = 0
    b64 = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_i = (m_start + offs_m)[:, None]
    offs_j = tl.arange(0, BLOCK_N)[None, :]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = (q_start + offs_i).to(tl.int64)
    row_ok = offs_i < q_len
    q = tl.load(Q + b64 * stride_qb + g * stride_qg + h * stride_qh + rows * stride_qm + offs_d[None, :],
                mask=row_ok & (offs_d[None, :] < K_DIM), other=0.0)
    do = tl.load(DO + b64 * stride_dob + g * stride_dog + h * stride_doh + rows * stride_dom + offs_dv[None, :],
                 mask=row_ok & (offs_dv[None, :] < KV_DIM), other=0.0)
    lse = tl.load(LSE + b64 * stride_lb + g * stride_lg + h * stride_lh + q_start + m_start + offs_m,
                  mask=m_start + offs_m < q_len, other=0.0)
    lse2 = tl.where(lse == -float("inf"), float("inf"), lse * LOG2E)
    delta = tl.load(Delta + ((b64 * (num_heads // HG) + g) * HG + h) * Mq + q_start + m_start + offs_m,
                    mask=m_start + offs_m < q_len, other=0.0)
    k_ptrs = (K + b64 * stride_kb + g * stride_kg + hk * stride_kh + (k_start + offs_j).to(tl.int64) * stride_kn
              + offs_d[:, None])  # [BD, BN]
    v_ptrs = (V + b64 * stride_vb + g * stride_vg + hk * stride_vh
              + (k_start + tl.arange(0, BLOCK_N)[:, None]).to(tl.int64) * stride_vn + offs_dv[None, :])
    b_ptrs = Bias
    if HAS_BIAS:
        b_ptrs = (Bias + b64 * stride_bb + g * stride_bg + h * stride_bh + offs_i.to(tl.int64) * stride_bm
                  + offs_j * stride_bn)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    drop_head = b * num_heads + head
    lo, mid_lo, mid_hi, hi = key_tiles(m_start, q_len, k_len, off, WL, WR, BLOCK_M, BLOCK_N, HAS_WL, HAS_WR)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_ptrs, v_ptrs, b_ptrs, lo, mid_lo, offs_i, offs_j, offs_d, offs_dv,
                   q_len, k_len, off, WL, WR, stride_kn, stride_vn, stride_bn, qk_scale, seed, dropout_p,
                   q_start + offs_i, k_start, drop_head, K_DIM, KV_DIM, BLOCK_N, True, EVEN_D, HAS_WL, HAS_WR,
                   HAS_BIAS, HAS_DROPOUT, INPUT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_ptrs, v_ptrs, b_ptrs, mid_lo, mid_hi, offs_i, offs_j, offs_d, offs_dv,
                   q_len, k_len, off, WL, WR, stride_kn, stride_vn, stride_bn, qk_scale, seed, dropout_p,
                   q_start + offs_i, k_start, drop_head, K_DIM, KV_DIM, BLOCK_N, False, EVEN_D, HAS_WL, HAS_WR,
                   HAS_BIAS, HAS_DROPOUT, INPUT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_ptrs, v_ptrs, b_ptrs, mid_hi, hi, offs_i, offs_j, offs_d, offs_dv,
                   q_len, k_len, off, WL, WR, stride_kn, stride_vn, stride_bn, qk_scale, seed, dropout_p,
                   q_start + offs_i, k_start, drop_head, K_DIM, KV_DIM, BLOCK_N, True, EVEN_D, HAS_WL, HAS_WR,
                   HAS_BIAS, HAS_DROPOUT, INPUT_PRECISION)
    dq_ptrs = DQ + b64 * stride_dqb + g * stride_dqg + h * stride_dqh + rows * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok & (offs_d[None, :] < K_DIM))
