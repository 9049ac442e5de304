"""The split-K kernel's int4 path for head dims of 128 and more: eight interleaved products instead of one.

An int4 word holds values ``8 w + j`` (``j = 0..7``) of a row. Unpacking a ``[BLOCK_N, D / 8]`` tile of words
into a ``[BLOCK_N, D]`` tile in value order needs a register shuffle (a reshape of ``[BLOCK_N, D / 8, 8]``),
which made the int4 kernel slower than the bf16 one it should outrun (H200: 0.34 ms against 0.15 ms at
B = 16, L = 8192). Here nothing is reordered: with ``x_j = x[:, j::8]`` and ``q_j = q[:, j::8]``,

    q . x = sum_j q_j . x_j        p @ x = [p @ x_0, ..., p @ x_7] interleaved back (at the final store)

so a tile becomes eight ``[BLOCK_N, D / 8]`` operands, two per shift of the words: the nibbles ``j`` and
``j + 4`` sit in the low and high 16-bit halves of ``(word >> 4 j) & 0x000F000F``; or-ing in the bits of fp16
1024 gives both as exact fp16 values ``1024 + x`` (one shift, and, or per two values, a subtraction each).
The products run in fp16 (values 0..15 and the scales are exact there; the query is cast once). Per-row
scale and shift are folded out as in the main kernel; group-wise ones are applied per word.
"""

import triton
import triton.language as tl

from triformers.ops.fmha._triton.common import LN2

INT4_PAIR_MASK = tl.constexpr(0x000F000F)
FP16_1024_PAIR = tl.constexpr(0x64006400)  # the bits of fp16 1024.0 in both halves


@triton.jit
def _half_to_f32(bits):
    """The fp16 whose bits are the low 16 bits of ``bits`` (int32), as float32."""
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _rows(
    z, t0, offs_n, Table, stride_tz, stride_tp, t_end, n_pages, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Physical rows (int64 [BLOCK_N]) of logical keys ``t0 + offs_n`` and whether each may be read. A block
    within one page takes its page id clamped into the pool (a stale table entry reads a page of the pool, never
    past it; the host checked the table when the bias was built), so that its loads need no mask."""
    if PAGED:
        if PAGE_SIZE % BLOCK_N == 0:  # t0 is BLOCK_N-aligned: the block lies in one page
            page = tl.load(Table + z * stride_tz + (t0 // PAGE_SIZE) * stride_tp)
            page = tl.minimum(tl.maximum(page, 0), n_pages - 1).to(tl.int64)  # never outside the pool
            rows = page * PAGE_SIZE + (t0 % PAGE_SIZE) + offs_n
            ok = offs_n >= 0
        else:
            t = t0 + offs_n
            page = tl.load(Table + z * stride_tz + (t // PAGE_SIZE) * stride_tp, mask=t < t_end, other=-1)
            page = page.to(tl.int64)
            rows = page * PAGE_SIZE + t % PAGE_SIZE
            ok = (page >= 0) & (page < n_pages)
    else:
        rows = (t0 + offs_n).to(tl.int64)
        ok = offs_n >= 0
    return rows, ok



@triton.jit
def _softmax_step(qk, k_scale, k_shift, q_sum, qk_scale, m_i, l_i, ok, j, offs_i, off, WL, WR, FOLD: tl.constexpr,
                  MASKED: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """One key block of the online softmax (exp2 domain): the raw products ``qk`` ``[BM, BN]`` (a folded row
    scale and shift applied when ``FOLD``), scaled, masked (``MASKED``: key bound ``ok`` and the windows around
    the diagonal offset ``off``), then ``(p, alpha, l_i, m_new)``. Rows that see no key keep ``m_i = -inf``
    without NaN."""
    if FOLD:
        qk = qk * k_scale[None, :] + q_sum[:, None] * k_shift[None, :]
    qk = qk * qk_scale
    if MASKED:
        d = j[None, :] - offs_i - off
        allowed = ok[None, :]
        if HAS_WR:
            allowed = allowed & (d <= WR)
        if HAS_WL:
            allowed = allowed & (d >= -WL)
        qk = tl.where(allowed, qk, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = m_new
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_new


@triton.jit
def _pair(words, J: tl.constexpr):
    """Values ``8 w + J`` and ``8 w + J + 4`` of int4 words, as exact fp16 tiles shaped like ``words``."""
    t = ((words >> (4 * J)) & INT4_PAIR_MASK) | FP16_1024_PAIR
    lo = t.to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    hi = (t >> 16).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    return lo, hi


@triton.jit
def _deq(x, scale, shift, NUM_GROUPS: tl.constexpr):
    """Group-wise dequantization of an fp16 nibble tile (per-word float32 scale and shift); identity when the
    row's single scale and shift are folded out of the products instead."""
    if NUM_GROUPS == 1:  # if/else, not an early return: compiled Triton builds both sides of a returning `if`
        y = x
    else:
        y = (x.to(tl.float32) * scale + shift).to(tl.float16)
    return y


@triton.jit
def _tile(X, rows, ok, stride_n, offs_w, NUM_GROUPS: tl.constexpr, W: tl.constexpr, CHECK: tl.constexpr):
    """The ``[BLOCK_N, W]`` data words of a tile, its per-row (float32 ``[BLOCK_N]``) or per-word (``[BLOCK_N,
    W]``) scale and shift. Rows that are not ``ok`` read as 0 when ``CHECK``."""
    rows2 = rows[:, None]
    ptrs = X + rows2 * stride_n + NUM_GROUPS + offs_w[None, :]
    if NUM_GROUPS == 1:
        s_ptrs = X + rows * stride_n
    else:  # value 8 w + j of group (8 w + j) // (D / G) = w // (W / G)
        s_ptrs = X + rows2 * stride_n + offs_w[None, :] // (W // NUM_GROUPS)
    if CHECK:
        words = tl.load(ptrs, mask=ok[:, None], other=0)
        s_mask = ok if NUM_GROUPS == 1 else ok[:, None]
        sw = tl.load(s_ptrs, mask=s_mask, other=0)
    else:
        words = tl.load(ptrs)
        sw = tl.load(s_ptrs)
    return words, _half_to_f32(sw), _half_to_f32(sw >> 16)


@triton.jit
def _pv(acc, p16, v, s_max, FOLD: tl.constexpr):
    if FOLD:
        out = acc + tl.dot(p16, v) * s_max
    else:
        out = tl.dot(p16, v, acc)
    return out


@triton.jit
def _attend_int4(
    a0, a1, a2, a3, a4, a5, a6, a7, acc_t, l_i, m_i, q0, q1, q2, q3, q4, q5, q6, q7, q_sum, K, V, t_lo, t_hi,
    k_start, k_len, z, offs_i, offs_n, offs_w, Table, stride_tz, stride_tp, t_end, n_pages, stride_kn, stride_vn,
    off, WL, WR, qk_scale, NUM_GROUPS: tl.constexpr, PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    BLOCK_N: tl.constexpr, W: tl.constexpr,
):
    """Online softmax over the key blocks ``t_lo, t_lo + BLOCK_N, ... < t_hi`` of an int4 cache: ``a_j`` holds
    output columns ``j::8``, ``acc_t`` the folded shifts' contribution (every column)."""
    FOLD: tl.constexpr = NUM_GROUPS == 1
    CHECK: tl.constexpr = MASKED or (PAGED and PAGE_SIZE % BLOCK_N != 0)  # loads masked by ok (see _rows)
    for t0 in range(t_lo, t_hi, BLOCK_N):
        t0 = tl.multiple_of(t0, BLOCK_N)
        rows, ok = _rows(z, t0, offs_n, Table, stride_tz, stride_tp, t_end, n_pages, PAGED, PAGE_SIZE, BLOCK_N)
        j = t0 - k_start + offs_n  # [BN] key index within the sequence
        if MASKED:
            ok = ok & (j >= 0) & (j < k_len)
        kw, ks, kt = _tile(K, rows, ok, stride_kn, offs_w, NUM_GROUPS, W, CHECK)
        # two operands per shift, used at once (short live ranges: eight [BLOCK_N, W] tiles at a time spill)
        k_lo, k_hi = _pair(kw, 0)
        qk = tl.dot(q0, tl.trans(_deq(k_lo, ks, kt, NUM_GROUPS)))
        qk = tl.dot(q4, tl.trans(_deq(k_hi, ks, kt, NUM_GROUPS)), qk)
        k_lo, k_hi = _pair(kw, 1)
        qk = tl.dot(q1, tl.trans(_deq(k_lo, ks, kt, NUM_GROUPS)), qk)
        qk = tl.dot(q5, tl.trans(_deq(k_hi, ks, kt, NUM_GROUPS)), qk)
        k_lo, k_hi = _pair(kw, 2)
        qk = tl.dot(q2, tl.trans(_deq(k_lo, ks, kt, NUM_GROUPS)), qk)
        qk = tl.dot(q6, tl.trans(_deq(k_hi, ks, kt, NUM_GROUPS)), qk)
        k_lo, k_hi = _pair(kw, 3)
        qk = tl.dot(q3, tl.trans(_deq(k_lo, ks, kt, NUM_GROUPS)), qk)
        qk = tl.dot(q7, tl.trans(_deq(k_hi, ks, kt, NUM_GROUPS)), qk)  # [BM, BN]
        p, alpha, l_i, m_new = _softmax_step(qk, ks, kt, q_sum, qk_scale, m_i, l_i, ok, j, offs_i, off, WL, WR,
                                             FOLD, MASKED, HAS_WL, HAS_WR)
        vw, vs, vt = _tile(V, rows, ok, stride_vn, offs_w, NUM_GROUPS, W, CHECK)
        if FOLD:
            # p * scale can fall below fp16's normal range: scale by the block's largest |scale| first
            s_max = tl.max(tl.abs(vs), 0)
            s_max = tl.where(s_max > 0, s_max, 1.0)
            p16 = (p * (vs / s_max)[None, :]).to(tl.float16)
            acc_t = acc_t * alpha + tl.sum(p * vt[None, :], 1)
        else:
            s_max = 1.0
            p16 = p.to(tl.float16)
        al = alpha[:, None]
        v_lo, v_hi = _pair(vw, 0)
        a0 = _pv(a0 * al, p16, _deq(v_lo, vs, vt, NUM_GROUPS), s_max, FOLD)
        a4 = _pv(a4 * al, p16, _deq(v_hi, vs, vt, NUM_GROUPS), s_max, FOLD)
        v_lo, v_hi = _pair(vw, 1)
        a1 = _pv(a1 * al, p16, _deq(v_lo, vs, vt, NUM_GROUPS), s_max, FOLD)
        a5 = _pv(a5 * al, p16, _deq(v_hi, vs, vt, NUM_GROUPS), s_max, FOLD)
        v_lo, v_hi = _pair(vw, 2)
        a2 = _pv(a2 * al, p16, _deq(v_lo, vs, vt, NUM_GROUPS), s_max, FOLD)
        a6 = _pv(a6 * al, p16, _deq(v_hi, vs, vt, NUM_GROUPS), s_max, FOLD)
        v_lo, v_hi = _pair(vw, 3)
        a3 = _pv(a3 * al, p16, _deq(v_lo, vs, vt, NUM_GROUPS), s_max, FOLD)
        a7 = _pv(a7 * al, p16, _deq(v_hi, vs, vt, NUM_GROUPS), s_max, FOLD)
        m_i = m_new
    return a0, a1, a2, a3, a4, a5, a6, a7, acc_t, l_i, m_i


@triton.jit
def _store(Out, base, a, acc_t, l_safe, row_ok, offs_w, J: tl.constexpr):
    """Output columns ``J::8``: ``(a + acc_t) / l``."""
    out = (a + acc_t[:, None]) / l_safe[:, None]
    tl.store(base + (offs_w * 8 + J)[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def int4_program(
    q_base, q_sum, row_ok, K, V, Out, o_base, l_ptrs, s_lo, s_hi, t_mid_lo, t_mid_hi, k_start, k_len, z, offs_i,
    Table, stride_tz, stride_tp, t_end, n_pages, stride_kn, stride_vn, off, WL, WR, qk_scale,
    NUM_GROUPS: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program of the split-K kernel over an int4 cache with ``D = BLOCK_D >= 128``: this split's key blocks
    ``[s_lo, s_hi)`` (masked head, unmasked middle ``[t_mid_lo, t_mid_hi)``, masked tail), then the normalised
    output at ``o_base`` (row pointers ``[BLOCK_M, 1]`` of the output) and the lse at ``l_ptrs``. ``q_base``:
    row pointers ``[BLOCK_M, 1]`` of the query."""
    W: tl.constexpr = BLOCK_D // 8
    offs_w = tl.arange(0, W)
    offs_n = tl.arange(0, BLOCK_N)
    qm = row_ok[:, None]
    q0 = tl.load(q_base + (offs_w * 8 + 0)[None, :], mask=qm, other=0.0).to(tl.float16)
    q1 = tl.load(q_base + (offs_w * 8 + 1)[None, :], mask=qm, other=0.0).to(tl.float16)
    q2 = tl.load(q_base + (offs_w * 8 + 2)[None, :], mask=qm, other=0.0).to(tl.float16)
    q3 = tl.load(q_base + (offs_w * 8 + 3)[None, :], mask=qm, other=0.0).to(tl.float16)
    q4 = tl.load(q_base + (offs_w * 8 + 4)[None, :], mask=qm, other=0.0).to(tl.float16)
    q5 = tl.load(q_base + (offs_w * 8 + 5)[None, :], mask=qm, other=0.0).to(tl.float16)
    q6 = tl.load(q_base + (offs_w * 8 + 6)[None, :], mask=qm, other=0.0).to(tl.float16)
    q7 = tl.load(q_base + (offs_w * 8 + 7)[None, :], mask=qm, other=0.0).to(tl.float16)
    a0 = tl.zeros([BLOCK_M, W], dtype=tl.float32)
    a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
    acc_t = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for run in tl.static_range(3):
        if run == 0:
            lo_run, hi_run = s_lo, tl.minimum(t_mid_lo, s_hi)
        elif run == 1:
            lo_run, hi_run = tl.maximum(t_mid_lo, s_lo), tl.minimum(t_mid_hi, s_hi)
        else:
            lo_run, hi_run = tl.maximum(t_mid_hi, s_lo), s_hi
        a0, a1, a2, a3, a4, a5, a6, a7, acc_t, l_i, m_i = _attend_int4(
            a0, a1, a2, a3, a4, a5, a6, a7, acc_t, l_i, m_i, q0, q1, q2, q3, q4, q5, q6, q7, q_sum, K, V, lo_run,
            hi_run, k_start, k_len, z, offs_i, offs_n, offs_w, Table, stride_tz, stride_tp, t_end, n_pages,
            stride_kn, stride_vn, off, WL, WR, qk_scale, NUM_GROUPS, PAGED, PAGE_SIZE, run != 1, HAS_WL, HAS_WR,
            BLOCK_N, W,
        )
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    _store(Out, o_base, a0, acc_t, l_safe, row_ok, offs_w, 0)
    _store(Out, o_base, a1, acc_t, l_safe, row_ok, offs_w, 1)
    _store(Out, o_base, a2, acc_t, l_safe, row_ok, offs_w, 2)
    _store(Out, o_base, a3, acc_t, l_safe, row_ok, offs_w, 3)
    _store(Out, o_base, a4, acc_t, l_safe, row_ok, offs_w, 4)
    _store(Out, o_base, a5, acc_t, l_safe, row_ok, offs_w, 5)
    _store(Out, o_base, a6, acc_t, l_safe, row_ok, offs_w, 6)
    _store(Out, o_base, a7, acc_t, l_safe, row_ok, offs_w, 7)
    lse = tl.where(empty, -float("inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(l_ptrs, lse, mask=row_ok)
