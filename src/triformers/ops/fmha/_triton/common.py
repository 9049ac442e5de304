"""Pieces shared by the forward and backward kernels: tile masks, tile ranges, dropout, row loads (paged too).

Mask rule (see ``_mask.py``): block-local query ``i`` and key ``j`` are allowed when ``j < k_len`` and
``-WL <= j - i - off <= WR`` (each bound only if present). Ranges are computed per tile so that tiles a mask
hides are never visited and tiles it allows entirely skip the mask. A block-sparse mask (``BLOCK_SPARSE``)
also requires ``layout[i // block_q, j // block_k]``; its tiles come from a table (``_mask.TileTable``) instead
of a range.
"""

import triton
import triton.language as tl

LOG2E_F = 1.4426950408889634  # host-side floats
LN2_F = 0.6931471805599453
LOG2E = tl.constexpr(LOG2E_F)  # kernel globals must be constexpr in compiled (non-interpreted) Triton
LN2 = tl.constexpr(LN2_F)


@triton.jit
def sequence_bounds(z, SEQ_Q, K_START, K_LEN, Mq, Mkv, IS_VARLEN: tl.constexpr):
    """``(b, q_start, q_len, k_start, k_len)`` of block ``z``: a packed sequence (varlen: batch 0, offsets
    from the seqstart arrays) or batch element ``z`` of a dense batch."""
    if IS_VARLEN:
        b = z * 0
        q_start = tl.load(SEQ_Q + z)
        q_len = tl.load(SEQ_Q + z + 1) - q_start
        k_start = tl.load(K_START + z)
        k_len = tl.load(K_LEN + z)
    else:
        b = z
        q_start = z * 0
        q_len = Mq + z * 0
        k_start = z * 0
        k_len = Mkv + z * 0
    return b, q_start, q_len, k_start, k_len


@triton.jit
def tile_allowed(offs_i, offs_j, q_len, k_len, off, WL, WR, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """Allowed pairs of a tile: offs_i [BM, 1] and offs_j [1, BN] block-local indices."""
    ok = (offs_j < k_len) & (offs_i < q_len)
    d = offs_j - offs_i - off
    if HAS_WR:
        ok = ok & (d <= WR)
    if HAS_WL:
        ok = ok & (d >= -WL)
    return ok


@triton.jit
def sparse_tiles(BS_OFF, BS_FULL, head, tile, NUM_TILES):
    """Entries ``[lo, hi)`` of a block-sparse tile table's ``cols`` for row ``tile`` of layout head ``head``,
    split at ``mid``: boundary tiles before it, tiles allowed entirely from it on. Returned as the four bounds
    of :func:`key_tiles` (``mid_hi == hi``)."""
    row = head * (NUM_TILES + 1) + tile
    lo = tl.load(BS_OFF + row)
    mid = tl.load(BS_FULL + head * NUM_TILES + tile)
    hi = tl.load(BS_OFF + row + 1)
    return lo, mid, hi, hi


@triton.jit
def sparse_allowed(layout_ptr, offs_i, offs_j, q_len, k_len, block_q, block_k, num_k_blocks):
    """Pairs of a tile a block-sparse layout allows: ``layout[i // block_q, j // block_k]`` (``layout_ptr``: the
    head's ``[nqb, nkb]`` int8 layout) for query indices ``offs_i`` and key indices ``offs_j`` of broadcastable
    shapes (``[BM, 1]`` and ``[1, BN]``, or transposed); pairs outside the bounds read as not allowed."""
    inside = (offs_i < q_len) & (offs_j < k_len)
    ptrs = layout_ptr + (offs_i // block_q) * num_k_blocks + offs_j // block_k
    return tl.load(ptrs, mask=inside, other=0) != 0


@triton.jit
def key_tiles(m_start, q_len, k_len, off, WL, WR, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """Key range [lo, hi) seen by query rows [m_start, m_start + BLOCK_M), split at [mid_lo, mid_hi): the
    tiles inside it need no mask. All bounds are multiples of BLOCK_N except hi."""
    m_last = tl.minimum(m_start + BLOCK_M, q_len) - 1
    lo = m_start * 0  # a tensor, so that every bound below has one type
    if HAS_WL:
        lo = tl.maximum(0, m_start + off - WL)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = k_len
    if HAS_WR:
        hi = tl.minimum(k_len, m_last + off + WR + 1)
    hi = tl.maximum(hi, lo)
    mid_lo = lo
    if HAS_WL:
        mid_lo = tl.maximum(lo, ((m_last + off - WL + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    mid_hi = (k_len // BLOCK_N) * BLOCK_N
    if HAS_WR:
        mid_hi = tl.minimum(mid_hi, ((m_start + off + WR + 1) // BLOCK_N) * BLOCK_N)
    if mid_hi <= mid_lo:
        mid_lo = hi
        mid_hi = hi
    return lo, mid_lo, mid_hi, hi


@triton.jit
def query_tiles(n_start, q_len, k_len, off, WL, WR, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """Query range [lo, hi) that sees keys [n_start, n_start + BLOCK_N), split at [mid_lo, mid_hi): the
    query tiles inside it need no mask. Bounds are multiples of BLOCK_M except hi."""
    n_last = tl.minimum(n_start + BLOCK_N, k_len) - 1
    lo = n_start * 0
    if HAS_WR:  # j - i - off <= WR  <=>  i >= j - off - WR
        lo = tl.maximum(0, n_start - off - WR)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = q_len
    if HAS_WL:  # j - i - off >= -WL  <=>  i <= j - off + WL
        hi = tl.minimum(q_len, n_last - off + WL + 1)
    hi = tl.maximum(hi, lo)
    mid_lo = lo
    if HAS_WR:
        mid_lo = tl.maximum(lo, ((n_last - off - WR + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
    mid_hi = (q_len // BLOCK_M) * BLOCK_M
    if HAS_WL:
        mid_hi = tl.minimum(mid_hi, ((n_start - off + WL + 1) // BLOCK_M) * BLOCK_M)
    if n_start + BLOCK_N > k_len:
        mid_hi = mid_lo
    if mid_hi <= mid_lo:
        mid_lo = hi
        mid_hi = hi
    return lo, mid_lo, mid_hi, hi


@triton.jit
def dropout_keep(seed, rows, cols, head, p):
    """Keep mask, identical to ``_rng.keep_mask``: Philox(seed; cols, rows, head, 0)[0] as a uniform >= p."""
    zero = rows * 0 + cols * 0
    r0, _, _, _ = tl.random.philox(seed, cols + zero, rows + zero, head + zero, zero)
    return tl.random.uint_to_uniform_float(r0) >= p


@triton.jit
def load_rows(desc, ptr, b, row0, g, h, rows_hi, stride_row, DIM, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
              USE_TMA: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Rows ``[row0, row0 + BLOCK_R)`` x ``[0, BLOCK_D)`` of head (b, g, h) of a canonical
    ``[B, M, G, H, D]`` tensor, through its TMA descriptor (out-of-bounds reads as 0) or from ``ptr`` (the
    head's base pointer), zero past ``rows_hi`` (when ``CHECK_ROWS``) and past ``DIM``."""
    if USE_TMA:
        return desc.load([b, row0, g, h, 0]).reshape(BLOCK_R, BLOCK_D)
    rows = row0 + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    ptrs = ptr + rows.to(tl.int64) * stride_row + cols
    if CHECK_ROWS:
        return tl.load(ptrs, mask=(rows < rows_hi) & (cols < DIM), other=0.0)
    return tl.load(ptrs, mask=cols < DIM, other=0.0)


@triton.jit
def load_key_rows(
    desc,
    ptr,
    b,
    row0,
    g,
    h,
    rows_hi,
    stride_row,
    DIM,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_TMA: tl.constexpr,
    CHECK_ROWS: tl.constexpr,
    KEYS_PADDED: tl.constexpr,
):
    """:func:`load_rows` for K/V tiles. With ``KEYS_PADDED`` (rows past a block's keys may hold anything, NaN
    in unused KV-cache slots) rows from ``rows_hi`` on read as 0 on the TMA path too: masked scores give them
    probability 0, but ``0 * NaN`` would still reach the output through ``P @ V`` (and dQ through ``dS @ K``)."""
    x = load_rows(desc, ptr, b, row0, g, h, rows_hi, stride_row, DIM, BLOCK_R, BLOCK_D, USE_TMA, CHECK_ROWS)
    if USE_TMA and CHECK_ROWS and KEYS_PADDED:
        rows = row0 + tl.arange(0, BLOCK_R)[:, None]
        x = tl.where(rows < rows_hi, x, 0.0)
    return x


@triton.jit
def paged_rows(
    bt_ptr, stride_bt_p, num_pages, k_start, start_n, k_len, Mkv, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr
):
    """``(rows, ok)`` for block-local keys ``[start_n, start_n + BLOCK_N)`` of a paged block whose keys start at
    logical key ``k_start`` of its row (``bt_ptr``: the row of the block table): logical key ``t`` is physical
    row ``table[t // PAGE_SIZE] * PAGE_SIZE + t % PAGE_SIZE`` (int64). ``ok``: keys of the block whose page is
    in the table and whose row is in the cache (``Mkv`` rows), so that a bad table never reads outside them."""
    j = start_n + tl.arange(0, BLOCK_N)
    t = k_start + j
    col = t // PAGE_SIZE
    ok = (j < k_len) & (t >= 0) & (col < num_pages)
    page = tl.load(bt_ptr + col.to(tl.int64) * stride_bt_p, mask=ok, other=0).to(tl.int64)
    rows = page * PAGE_SIZE + t % PAGE_SIZE
    return rows, ok & (rows >= 0) & (rows < Mkv)


@triton.jit
def gather_rows(ptr, rows, row_ok, stride_row, DIM, BLOCK_D: tl.constexpr):
    """Rows ``rows`` (int64 ``[BLOCK_R]``) x ``[0, BLOCK_D)`` from ``ptr`` (a head's base pointer); rows not
    ``row_ok`` and columns past ``DIM`` read as 0."""
    cols = tl.arange(0, BLOCK_D)[None, :]
    return tl.load(ptr + rows[:, None] * stride_row + cols, mask=row_ok[:, None] & (cols < DIM), other=0.0)


@triton.jit
def page_tile_row(bt_ptr, stride_bt_p, num_pages, t0, Mkv, PAGE_SIZE: tl.constexpr):
    """First physical row of the key tile starting at logical key ``t0`` (a multiple of the tile, which divides
    ``PAGE_SIZE``: the tile is one run of rows of one page). The page id is clamped into the cache, so that a
    bad table reads a wrong page, never outside the ``Mkv`` rows (a valid one never needs it)."""
    col = tl.minimum(t0 // PAGE_SIZE, num_pages - 1)
    page = tl.load(bt_ptr + col.to(tl.int64) * stride_bt_p)
    page = tl.minimum(tl.maximum(page, 0), Mkv // PAGE_SIZE - 1)
    return (page * PAGE_SIZE + t0 % PAGE_SIZE).to(tl.int32)
