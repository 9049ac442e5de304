"""Split-K decoding kernel (flash-decoding): few queries per sequence against a long, possibly paged or
quantized, KV cache.

Grid ``(sequences * kv_heads * row_tiles, split_k)``. A program owns ``BLOCK_M`` rows of one sequence and one
K/V head and the ``s``-th of ``split_k`` equal slices of the keys its rows may see. With GQA/MQA the query heads
sharing the K/V head are rows of the same program (row ``r`` = query ``r // HQ``, head ``r % HQ``), so each K/V
tile is read once for all of them. Online softmax in exp2 with float32 accumulation; a program writes its
normalised output and log-sum-exp, either the final ones (``split_k == 1``) or a float32 partial that
``merge.merge_partials`` reduces.

Keys are addressed by their logical position ``t`` in the sequence's key space (``t = k_start + j`` for the
``j``-th key of the sequence); ``t`` is a physical row of the cache, or, paged, row
``table[z, t // PAGE_SIZE] * PAGE_SIZE + t % PAGE_SIZE``. Key blocks are aligned on ``t`` so that when
``BLOCK_N`` divides ``PAGE_SIZE`` a block lies in one page (one table entry per block); other page sizes gather
the rows of a block one by one. Every physical row read is checked against the cache, so a bad table reads
nothing out of bounds.

Quantized caches (int32 words, the query float): int4 (per row ``NUM_GROUPS`` words of fp16 scale | shift, then
eight 4-bit values per word) and fp8 e4m3 (four per word; scale | shift per token and head in a separate
tensor). Values become exact fp16/bf16 in registers (nibbles through the bits of ``1024 + x``, fp8 by
conversion). With one scale and shift per row they are folded out of the products:
``q . (x s + t) = s (q . x) + t sum(q)`` and ``p @ (x s + t) = (p s) @ x + sum(p t)``; group-wise int4 is
dequantized to the query dtype before its products.
"""

import triton
import triton.language as tl

from triformers.ops.fmha._triton.common import LN2
from triformers.ops.fmha._triton.splitk_int4 import _half_to_f32, _pair, _rows, _softmax_step, int4_program


@triton.jit
def _unpack_int4(words, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[BLOCK_N, BLOCK_D / 8]`` int4 words as the ``[BLOCK_N, BLOCK_D]`` exact fp16 values, in value order
    ``8 w + j``: each shift yields values ``j`` and ``j + 4`` of every word (``_pair``), and nested joins put the
    eight of a word next to each other in one thread, so that the reshape moves nothing (a broadcast
    ``[BLOCK_N, BLOCK_D / 8, 8]`` of shifted words did 5 operations per value and reshaped across threads). A join
    appends its selector as the new last dim, so the innermost join's selector ends up slowest: the tree
    ``[[[v0, v4], [v2, v6]], [[v1, v5], [v3, v7]]]`` flattens to ``v0 .. v7``."""
    lo0, hi0 = _pair(words, 0)  # v0, v4
    lo1, hi1 = _pair(words, 1)  # v1, v5
    lo2, hi2 = _pair(words, 2)  # v2, v6
    lo3, hi3 = _pair(words, 3)  # v3, v7
    x = tl.join(tl.join(tl.join(lo0, hi0), tl.join(lo2, hi2)), tl.join(tl.join(lo1, hi1), tl.join(lo3, hi3)))
    return tl.reshape(x, (BLOCK_N, BLOCK_D))


@triton.jit
def _nibbles(x, DEQ: tl.constexpr):
    """Ints 0..15 as exact values of the compute dtype (DEQ 0 fp16, 1 bf16, 2 fp32): the bits of
    1024 + x (fp16) or 128 + x (bf16), minus the offset, avoid an int-to-float conversion."""
    if DEQ == 0:
        return (x | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    elif DEQ == 1:
        return (x | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 128.0
    else:
        return x.to(tl.float32)


@triton.jit
def _load_kv(
    X, Scale, rows, ok, stride_n, stride_sn, offs_d, D, QUANT: tl.constexpr, NUM_GROUPS: tl.constexpr,
    DEQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, CHECK: tl.constexpr,
):
    """A K or V tile ``[BLOCK_N, BLOCK_D]`` of a float (QUANT 0), int4 (1) or fp8 (2) cache in the compute dtype
    with its per-row scale and shift (float32 ``[BLOCK_N]``; 1 and 0 where nothing is folded). ``X`` and
    ``Scale`` point at the (batch, group, head); rows that are not ``ok`` read as 0 when ``CHECK``; columns past
    ``D`` read as 0 unless ``EVEN_D`` (``D == BLOCK_D``). Both flags are constexpr: a load under a run-time branch
    is not pipelined."""
    rows2 = rows[:, None]
    ok2 = ok[:, None]
    one = tl.full([BLOCK_N], 1.0, tl.float32)
    zero = tl.zeros([BLOCK_N], tl.float32)
    if QUANT == 0:
        ptrs = X + rows2 * stride_n + offs_d[None, :]
        if CHECK:
            x = tl.load(ptrs, mask=ok2 & (offs_d[None, :] < D), other=0.0)
        elif EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
        return x, one, zero
    elif QUANT == 1:
        BLOCK_W: tl.constexpr = BLOCK_D // 8
        offs_w = tl.arange(0, BLOCK_W)
        w_mask = offs_w[None, :] < D // 8
        if CHECK:
            w_mask = w_mask & ok2
        words = tl.load(X + rows2 * stride_n + NUM_GROUPS + offs_w[None, :], mask=w_mask, other=0)
        if DEQ == 0:  # fp16: two values per shift, joined in registers into value order (see _unpack_int4)
            x = _unpack_int4(words, BLOCK_N, BLOCK_D)
        else:
            nib = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF  # value 8 w + j
            x = _nibbles(tl.reshape(nib, (BLOCK_N, BLOCK_D)), DEQ)
        if NUM_GROUPS == 1:
            sw = tl.load(X + rows * stride_n, mask=ok, other=0) if CHECK else tl.load(X + rows * stride_n)
            return x, _half_to_f32(sw), _half_to_f32(sw >> 16)
        else:
            # group-wise: [BLOCK_N, NUM_GROUPS] words, broadcast over each group's BLOCK_D / NUM_GROUPS columns
            offs_g = tl.arange(0, NUM_GROUPS)
            sw = tl.load(X + rows2 * stride_n + offs_g[None, :], mask=ok2 & (offs_g[None, :] >= 0), other=0)
            per_group: tl.constexpr = BLOCK_D // NUM_GROUPS
            s = tl.reshape(
                tl.broadcast_to(_half_to_f32(sw)[:, :, None], (BLOCK_N, NUM_GROUPS, per_group)), (BLOCK_N, BLOCK_D)
            )
            t = tl.reshape(
                tl.broadcast_to(_half_to_f32(sw >> 16)[:, :, None], (BLOCK_N, NUM_GROUPS, per_group)),
                (BLOCK_N, BLOCK_D),
            )
            return (x.to(tl.float32) * s + t).to(x.dtype), one, zero
    else:
        ptrs = X + rows2 * stride_n + offs_d[None, :]
        if CHECK:
            x8 = tl.load(ptrs, mask=ok2 & (offs_d[None, :] < D), other=0.0)
            sw = tl.load(Scale + rows * stride_sn, mask=ok, other=0)
        else:
            if EVEN_D:
                x8 = tl.load(ptrs)
            else:
                x8 = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
            sw = tl.load(Scale + rows * stride_sn)
        if DEQ == 0:
            x = x8.to(tl.float16)
        elif DEQ == 1:
            x = x8.to(tl.bfloat16)
        else:
            x = x8.to(tl.float32)
        return x, _half_to_f32(sw), _half_to_f32(sw >> 16)


@triton.jit
def _attend(
    acc, l_i, m_i, q, q_sum, K, V, KScale, VScale, t_lo, t_hi, k_start, k_len, z, offs_i, offs_n, offs_d, offs_dv,
    Table, stride_tz, stride_tp, t_end, n_pages, stride_kn, stride_vn, stride_ksn, stride_vsn, off, WL, WR,
    qk_scale, D, DV, QUANT: tl.constexpr, NUM_GROUPS: tl.constexpr, DEQ: tl.constexpr, PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Online softmax over the key blocks starting at ``t_lo, t_lo + BLOCK_N, ... < t_hi`` (logical
    positions). ``MASKED`` blocks apply the key bound and the windows; the others are fully allowed."""
    FOLD: tl.constexpr = QUANT != 0 and NUM_GROUPS == 1
    CHECK: tl.constexpr = MASKED or (PAGED and PAGE_SIZE % BLOCK_N != 0)  # loads masked by ok (see _rows)
    dtype = q.dtype
    for t0 in range(t_lo, t_hi, BLOCK_N):
        t0 = tl.multiple_of(t0, BLOCK_N)
        rows, ok = _rows(z, t0, offs_n, Table, stride_tz, stride_tp, t_end, n_pages, PAGED, PAGE_SIZE, BLOCK_N)
        j = t0 - k_start + offs_n  # [BN] key index within the sequence
        if MASKED:
            ok = ok & (j >= 0) & (j < k_len)
        k, k_scale, k_shift = _load_kv(
            K,
            KScale,
            rows,
            ok,
            stride_kn,
            stride_ksn,
            offs_d,
            D,
            QUANT,
            NUM_GROUPS,
            DEQ,
            BLOCK_N,
            BLOCK_D,
            EVEN_D,
            CHECK,
        )
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # [BM, BN]
        p, alpha, l_i, m_new = _softmax_step(qk, k_scale, k_shift, q_sum, qk_scale, m_i, l_i, ok, j, offs_i, off,
                                             WL, WR, FOLD, MASKED, HAS_WL, HAS_WR)
        v, v_scale, v_shift = _load_kv(
            V,
            VScale,
            rows,
            ok,
            stride_vn,
            stride_vsn,
            offs_dv,
            DV,
            QUANT,
            NUM_GROUPS,
            DEQ,
            BLOCK_N,
            BLOCK_DV,
            EVEN_DV,
            CHECK,
        )
        acc = acc * alpha[:, None]
        if FOLD:
            if DEQ == 0:
                # p * scale can fall below fp16's normal range: scale by the block's largest |scale| first
                s_max = tl.max(tl.abs(v_scale), 0)
                s_max = tl.where(s_max > 0, s_max, 1.0)
                pv = tl.dot((p * (v_scale / s_max)[None, :]).to(dtype), v, input_precision=INPUT_PRECISION)
                acc += pv * s_max
            else:
                acc = tl.dot((p * v_scale[None, :]).to(dtype), v, acc, input_precision=INPUT_PRECISION)
            acc += tl.sum(p * v_shift[None, :], 1)[:, None]
        else:
            acc = tl.dot(p.to(dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def splitk_fwd(
    Q, K, V, Out, Lse, KScale, VScale,
    SEQ_Q, K_START, K_LEN, Table,  # sequence arrays of a KV-cache bias (dummies when dense)
    stride_qb, stride_qm, stride_qg, stride_qh,
    stride_kb, stride_kn, stride_kg, stride_kh,
    stride_vb, stride_vn, stride_vg, stride_vh,
    stride_ksb, stride_ksn, stride_ksg, stride_ksh,  # fp8 scale|shift words [B, Mkv, G, Hk]
    stride_vsb, stride_vsn, stride_vsg, stride_vsh,
    stride_os, stride_ob, stride_om, stride_og, stride_oh,  # out [(S,) B, Mq, G, Hq, DV]
    stride_ls, stride_lb, stride_lg, stride_lh,  # lse [(S,) B, G, Hq, Mq], last dim contiguous
    stride_tz, stride_tp,  # block table [sequences, pages]
    num_kv_heads, HK, HQ, Mq, Mkv, len_cap, end_cap, n_pages, qk_scale, WL, WR, D, DV, NUM_TILES,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    QUANT: tl.constexpr, NUM_GROUPS: tl.constexpr, DEQ: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_K_START: tl.constexpr, K_LEN_IS_END: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INT4_INTERLEAVED: tl.constexpr,
):
    # program (sequence * kv heads + kv head) * NUM_TILES + row tile along axis 0, the key split along axis 1
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    tile = pid % NUM_TILES
    zh = pid // NUM_TILES
    z = zh // num_kv_heads
    g = (zh % num_kv_heads) // HK
    hk = zh % HK
    if IS_VARLEN:
        b = z * 0
        q_start = tl.load(SEQ_Q + z)
        q_len = tl.load(SEQ_Q + z + 1) - q_start
        k_start = tl.load(K_START + z) if HAS_K_START else z * 0
        k_len = tl.load(K_LEN + z)
        if K_LEN_IS_END:
            k_len = k_len - k_start
        k_start = tl.maximum(k_start, 0)
        # never past the cache: len_cap bounds a sequence (its padding), end_cap the key space
        k_len = tl.maximum(tl.minimum(tl.minimum(k_len, len_cap), end_cap - k_start), 0)
    else:
        b = z
        q_start = z * 0
        q_len = Mq + z * 0
        k_start = z * 0
        k_len = Mkv + z * 0
    off = k_len - q_len if BOTTOM_RIGHT else z * 0

    # rows of this tile: r = i * HQ + h (query i of the sequence, query head h of the K/V head)
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    i = r // HQ
    h = hk * HQ + r % HQ
    row_ok = i < q_len
    i_lo = tile * BLOCK_M // HQ
    if i_lo >= q_len:  # a tile past this sequence's queries (the grid covers the longest)
        return
    i_hi = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // HQ + 1, q_len)  # exclusive
    # keys [lo, hi) any row sees; [mid_lo, mid_hi) every row sees entirely (no mask)
    lo = z * 0
    if HAS_WL:
        lo = tl.maximum(lo, i_lo + off - WL)
    hi = k_len
    if HAS_WR:
        hi = tl.minimum(hi, i_hi - 1 + off + WR + 1)
    hi = tl.maximum(hi, lo)
    mid_lo = lo
    if HAS_WL:
        mid_lo = tl.maximum(lo, i_hi - 1 + off - WL)
    mid_hi = hi
    if HAS_WR:
        mid_hi = tl.minimum(hi, i_lo + off + WR + 1)
    # the same bounds as BLOCK_N-aligned logical positions; this split's share of the blocks
    t_lo = ((k_start + lo) // BLOCK_N) * BLOCK_N
    t_hi = k_start + hi
    t_mid_lo = tl.minimum(((k_start + mid_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, t_hi)
    t_mid_hi = ((k_start + mid_hi) // BLOCK_N) * BLOCK_N
    if t_mid_hi <= t_mid_lo:
        t_mid_lo = t_hi
        t_mid_hi = t_hi
    per_split = tl.cdiv(tl.cdiv(t_hi - t_lo, BLOCK_N), num_splits) * BLOCK_N
    s_lo = tl.minimum(t_lo + split * per_split, t_hi)
    s_hi = tl.minimum(s_lo + per_split, t_hi)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64, g64, hk64 = b.to(tl.int64), g.to(tl.int64), hk.to(tl.int64)
    q_rows = (q_start + i).to(tl.int64)
    q_ptrs = (
        Q
        + b64 * stride_qb
        + g64 * stride_qg
        + q_rows[:, None] * stride_qm
        + h.to(tl.int64)[:, None] * stride_qh
        + offs_d[None, :]
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    q_sum = tl.sum(q.to(tl.float32), 1)
    if QUANT != 0 and DEQ == 0:  # quantized caches compute in fp16 (fp8 converts to it natively)
        q = q.to(tl.float16)
    k_ptr = K + b64 * stride_kb + g64 * stride_kg + hk64 * stride_kh
    v_ptr = V + b64 * stride_vb + g64 * stride_vg + hk64 * stride_vh
    ks_ptr = KScale + b64 * stride_ksb + g64 * stride_ksg + hk64 * stride_ksh
    vs_ptr = VScale + b64 * stride_vsb + g64 * stride_vsg + hk64 * stride_vsh
    z64 = z.to(tl.int64)

    offs_i = i[:, None]
    split64 = split.to(tl.int64)
    h64 = h.to(tl.int64)
    o_rows = Out + split64 * stride_os + b64 * stride_ob + g64 * stride_og + q_rows[:, None] * stride_om
    o_rows += h64[:, None] * stride_oh  # [BM, 1] row pointers of the output
    l_ptrs = Lse + split64 * stride_ls + b64 * stride_lb + g64 * stride_lg + h64 * stride_lh + q_rows
    # int4 with D >= 128 in fp16, when asked: eight interleaved products instead of unpacking (see splitk_int4)
    INT4_SPLIT: tl.constexpr = (
        INT4_INTERLEAVED and QUANT == 1 and DEQ == 0 and EVEN_D and EVEN_DV and BLOCK_D == BLOCK_DV
        and BLOCK_D >= 128
    )
    if INT4_SPLIT:
        q_rows_ptr = Q + b64 * stride_qb + g64 * stride_qg + q_rows[:, None] * stride_qm
        q_rows_ptr += h.to(tl.int64)[:, None] * stride_qh
        int4_program(
            q_rows_ptr, q_sum, row_ok, k_ptr, v_ptr, Out, o_rows, l_ptrs, s_lo, s_hi, t_mid_lo, t_mid_hi, k_start,
            k_len, z64, offs_i, Table, stride_tz, stride_tp, end_cap, n_pages, stride_kn, stride_vn, off, WL, WR,
            qk_scale, NUM_GROUPS, PAGED, PAGE_SIZE, HAS_WL, HAS_WR, BLOCK_M, BLOCK_N, BLOCK_D,
        )
        return
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # this split's blocks in three runs: masked head, unmasked middle, masked tail
    for run in tl.static_range(3):
        if run == 0:
            lo_run, hi_run = s_lo, tl.minimum(t_mid_lo, s_hi)
        elif run == 1:
            lo_run, hi_run = tl.maximum(t_mid_lo, s_lo), tl.minimum(t_mid_hi, s_hi)
        else:
            lo_run, hi_run = tl.maximum(t_mid_hi, s_lo), s_hi
        acc, l_i, m_i = _attend(
            acc, l_i, m_i, q, q_sum, k_ptr, v_ptr, ks_ptr, vs_ptr, lo_run, hi_run, k_start, k_len, z64, offs_i,
            offs_n, offs_d, offs_dv, Table, stride_tz, stride_tp, end_cap, n_pages, stride_kn, stride_vn,
            stride_ksn, stride_vsn, off, WL, WR, qk_scale, D, DV, QUANT, NUM_GROUPS, DEQ, PAGED, PAGE_SIZE,
            run != 1, HAS_WL, HAS_WR, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, INPUT_PRECISION,
        )

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, -float("inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_ptrs = o_rows + offs_dv[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(l_ptrs, lse, mask=row_ok)
