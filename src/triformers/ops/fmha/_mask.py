"""Every attention bias as the few numbers a kernel needs.

Each bias of :mod:`attn_bias` is a set of blocks (one per batch element for dense biases; one per packed
sequence for block-diagonal ones) in which query ``i`` and key ``j`` (block-local indices) are allowed when

    i + off_b - window_left  <=  j  <=  i + off_b + window_right

with ``off_b = nk_b - nq_b`` for bottom-right alignment and 0 for top-left, and a missing window bound meaning
"unbounded". Causal is ``window_right = 0``; a causal window of ``w`` keys is ``window_left = w - 1``. The
operators (chunked, Triton) work only from this description, so a bias is supported by every operator
the moment it has a row in :func:`mask_spec`.

KV-cache biases (padded, gappy, paged) are block-diagonal with ``k_starts[b]``/``k_lens[b]`` the first key and
number of keys of block ``b`` (only those keys exist for the block: padding and unused pages are never read).
Their causal and local variants are bottom-right; a non-causal local window is ``(window_left, window_right)``
as given. Paged biases carry ``block_tables`` ``[nb, max_pages]`` and ``page_size``, and ``k_starts[b]`` is then
the offset of block ``b``'s first key inside row ``b``'s *logical* key space (0 for padded caches, the gappy
start otherwise): block-local key ``j`` is physical key row

    block_tables[b, (k_starts[b] + j) // page_size] * page_size + (k_starts[b] + j) % page_size.

A :class:`~attn_bias.BlockSparseMask` is one dense block with a :class:`BlockSparseSpec` on top: query ``i``
and key ``j`` are also required to lie in an allowed block, ``layout[h, i // bq, j // bk]``. Operators read it
as a :class:`TileTable` at their own tile sizes: per (head, query tile) the key tiles holding an allowed pair,
boundary tiles (masked) first, then the tiles allowed entirely (no mask); at tiles ``(bq, bk)`` it is the
layout's own CSR table (``offsets [H, nqb + 1]``, ``cols [nnz]``). Tables are built on the layout's device with
a few tensor ops and kept per layout and tile size (:func:`block_sparse_spec`).

A kernel reading the bias directly takes its device tensors: ``q_seqinfo.seqstart`` (query block bounds),
``k_seqinfo.seqstart`` (key starts; row-local offsets with a trailing -1 for paged gappy), ``k_seqinfo.seqlen``
(key counts; *end* offsets for paged gappy) and ``block_tables``. :func:`mask_spec` reads the same tensors (one
copy to the host), so every operator applies what they hold, also after an in-place update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from triformers.ops.fmha import attn_bias as ab


@dataclass(frozen=True)
class MaskSpec:
    """What an attention bias allows, per block.

    Attributes:
        q_starts: query block boundaries ``[nb + 1]`` in the packed sequence, or None for a dense batch
            (one block per batch element covering all ``Mq`` queries and ``Mkv`` keys).
        k_starts: first key of each block ``[nb]`` (None when dense); for paged biases, the offset inside
            the block's logical row.
        k_lens: number of keys in use in each block ``[nb]`` (None when dense).
        bottom_right: diagonal offset ``nk_b - nq_b`` (True) or 0 (False).
        window_left: keys allowed left of the diagonal (None: unbounded).
        window_right: keys allowed right of the diagonal (None: unbounded; 0: causal).
        tensor_bias: additive ``[B, H, Mq, Mkv]`` tensor (broadcast views allowed) or None.
        block_tables: int32/int64 ``[nb, max_pages]``: the physical page of each logical page (paged biases).
        page_size: keys per page (paged biases; 0 otherwise).
        block_sparse: the allowed blocks of a block-sparse mask (one dense block), or None.
    """

    q_starts: tuple[int, ...] | None = None
    k_starts: tuple[int, ...] | None = None
    k_lens: tuple[int, ...] | None = None
    bottom_right: bool = False
    window_left: int | None = None
    window_right: int | None = None
    tensor_bias: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    page_size: int = 0
    block_sparse: BlockSparseSpec | None = None

    @property
    def is_block_diagonal(self) -> bool:
        return self.q_starts is not None

    @property
    def is_paged(self) -> bool:
        return self.block_tables is not None

    @property
    def is_causal(self) -> bool:
        return self.window_right == 0

    @property
    def num_blocks(self) -> int:
        return 0 if self.q_starts is None else len(self.q_starts) - 1

    def blocks(self, Mq: int, Mkv: int) -> list[tuple[int, int, int, int, int]]:
        """``(q_start, q_len, k_start, k_len, diagonal_offset)`` for every block."""
        if self.q_starts is None:
            return [(0, Mq, 0, Mkv, (Mkv - Mq) if self.bottom_right else 0)]
        out = []
        for b in range(self.num_blocks):
            q0, q_len = self.q_starts[b], self.q_starts[b + 1] - self.q_starts[b]
            k0, k_len = self.k_starts[b], self.k_lens[b]
            out.append((q0, q_len, k0, k_len, (k_len - q_len) if self.bottom_right else 0))
        return out

    def key_rows(self, b: int, j: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Physical key rows (int64) of block ``b``'s block-local keys ``j`` (a paged bias), clamped to the
        ``num_rows`` rows of the key tensor and to the table's width, so that a bad table never reads outside
        them (a valid one never needs it: calls check the largest page id against the key tensor)."""
        t = self.k_starts[b] + j
        page_col = (t // self.page_size).clamp_(0, self.block_tables.shape[1] - 1)
        rows = self.block_tables[b].index_select(0, page_col).to(torch.int64) * self.page_size + t % self.page_size
        return rows.clamp_(0, num_rows - 1)

    def key_range(self, i_lo: int, i_hi: int, k_len: int, offset: int) -> tuple[int, int]:
        """Keys ``[lo, hi)`` that any of the block-local queries ``[i_lo, i_hi)`` may attend."""
        lo = 0 if self.window_left is None else max(0, i_lo + offset - self.window_left)
        hi = k_len if self.window_right is None else min(k_len, i_hi - 1 + offset + self.window_right + 1)
        return lo, max(lo, hi)

    def fully_allowed(self, i_lo: int, i_hi: int, j_lo: int, j_hi: int, offset: int) -> bool:
        """True when every pair of the tile ``[i_lo, i_hi) x [j_lo, j_hi)`` is allowed (no mask to apply)."""
        if self.window_right is not None and j_hi - 1 > i_lo + offset + self.window_right:
            return False
        if self.window_left is not None and j_lo < i_hi - 1 + offset - self.window_left:
            return False
        return True

    def allowed(self, i: torch.Tensor, j: torch.Tensor, offset: int) -> torch.Tensor:
        """Boolean mask of allowed pairs for block-local index tensors ``i`` ``[..., 1]`` and ``j`` ``[1, ...]``."""
        d = j - i - offset
        ok = torch.ones_like(d, dtype=torch.bool)
        if self.window_right is not None:
            ok = ok & (d <= self.window_right)
        if self.window_left is not None:
            ok = ok & (d >= -self.window_left)
        return ok


@dataclass(frozen=True, eq=False)
class TileTable:
    """The tiles of a block-sparse mask an operator visits, as CSR over rows of tiles (query tiles, or key
    tiles when transposed), per layout head.

    Attributes:
        offsets: int32 ``[Hr, n + 1]``: row ``r`` of head ``h`` visits ``cols[offsets[h, r]:offsets[h, r + 1]]``
            (indices into one ``cols``: ``offsets[h, n] == offsets[h + 1, 0]``).
        full_start: int32 ``[Hr, n]``: the row's entries before ``full_start[h, r]`` are boundary tiles (some
            pair masked: apply the mask), those from it on are allowed entirely.
        cols: int32 ``[nnz + 1]``: column-tile indices, increasing within each part of a row (a trailing 0
            keeps the tensor non-empty).
    """

    offsets: torch.Tensor
    full_start: torch.Tensor
    cols: torch.Tensor


# Block-sparse specs per layout tensor (see block_sparse_spec); bounded, refilled as needed
_SPECS: dict[tuple, BlockSparseSpec] = {}
_MAX_SPECS = 256


@dataclass(frozen=True, eq=False)
class BlockSparseSpec:
    """The allowed blocks of a :class:`~attn_bias.BlockSparseMask`, and the tables operators derive from them.

    Attributes:
        layout: bool ``[Hl, nqb, nkb]`` (``Hl`` 1: shared by every head).
        block_q, block_k: queries and keys per block.
    """

    layout: torch.Tensor
    block_q: int
    block_k: int
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_heads(self) -> int:
        return self.layout.shape[0]

    def kernel_layout(self) -> torch.Tensor:
        """The layout as int8 ``[Hl, nqb, nkb]`` (contiguous), for the kernels' boundary tiles."""
        if "int8" not in self._cache:
            self._cache["int8"] = self.layout.to(torch.int8).contiguous()
        return self._cache["int8"]

    def table(
        self, Mq: int, Mkv: int, tile_q: int, tile_k: int, causal: bool, *, transposed: bool = False,
        union_heads: bool = False, edges_masked: bool = True,
    ) -> TileTable:
        """The :class:`TileTable` of ``[tile_q, tile_k]`` tiles over ``Mq`` queries and ``Mkv`` keys, built once.

        Args:
            causal: also hide keys after the query (``j <= i``).
            transposed: rows are key tiles and columns query tiles (a backward over key tiles).
            union_heads: one row set for all heads (``Hr = 1``): a tile is visited if any head allows a pair
                in it and is entirely allowed only if every head allows every pair.
            edges_masked: tiles that reach past ``Mq`` or ``Mkv`` are boundary tiles (kernels that read
                whole tiles bound them there); False: their pairs inside the bounds decide.
        """
        key = (Mq, Mkv, tile_q, tile_k, causal, transposed, union_heads, edges_masked)
        if key not in self._cache:
            self._cache[key] = _tile_table(self, Mq, Mkv, tile_q, tile_k, causal, transposed, union_heads,
                                           edges_masked)
        return self._cache[key]

    def allowed(self, i: torch.Tensor, j: torch.Tensor, causal: bool) -> torch.Tensor:
        """Allowed pairs ``[Hl, n, nk]`` of the query indices ``i`` ``[n]`` and key indices ``j`` ``[nk]``."""
        ok = self.layout[:, i // self.block_q][:, :, j // self.block_k]
        return ok & (j[None, :] <= i[:, None]) if causal else ok


def block_sparse_spec(layout: torch.Tensor, block_q: int, block_k: int) -> BlockSparseSpec:
    """The :class:`BlockSparseSpec` of a bool layout, one per layout tensor (while its values are unchanged), so
    that its tables are built once. The spec holds the layout, so that its address is not reused while kept."""
    key = (layout.data_ptr(), layout._version, tuple(layout.shape), layout.device, block_q, block_k)
    spec = _SPECS.get(key)
    if spec is None:
        if len(_SPECS) >= _MAX_SPECS:
            _SPECS.clear()
        spec = _SPECS[key] = BlockSparseSpec(layout, block_q, block_k)
    return spec


def _spans(n: int, tile: int, block: int, device: torch.device):
    """Per tile of ``tile`` indices over ``[0, n)``: first and last index, first and last block."""
    t = torch.arange(-(-n // tile), device=device)
    first = t * tile
    last = torch.clamp((t + 1) * tile, max=n) - 1
    return first, last, first // block, last // block, (t + 1) * tile <= n


def _block_sums(x: torch.Tensor, r0, r1, c0, c1) -> torch.Tensor:
    """Sums of ``x`` ``[H, R, C]`` over the block rectangles ``[r0, r1] x [c0, c1]`` -> ``[H, nr, nc]``."""
    s = x.to(torch.int32).cumsum(1, dtype=torch.int32).cumsum(2, dtype=torch.int32)
    s = torch.nn.functional.pad(s, (1, 0, 1, 0))
    a, b, c, d = r1 + 1, r0, c1 + 1, c0
    return s[:, a][:, :, c] - s[:, b][:, :, c] - s[:, a][:, :, d] + s[:, b][:, :, d]


def _tile_table(spec: BlockSparseSpec, Mq, Mkv, tile_q, tile_k, causal, transposed, union_heads, edges_masked):
    layout = spec.layout
    dev = layout.device
    i0, i1, r0, r1, q_inside = _spans(Mq, tile_q, spec.block_q, dev)
    j0, j1, c0, c1, k_inside = _spans(Mkv, tile_k, spec.block_k, dev)
    some = layout.any(0, keepdim=True) if union_heads else layout
    every = layout.all(0, keepdim=True) if union_heads else layout
    visited = _block_sums(some, r0, r1, c0, c1) > 0  # [Hr, nqt, nkt]
    area = (r1 - r0 + 1)[:, None] * (c1 - c0 + 1)[None, :]
    full = _block_sums(every, r0, r1, c0, c1) == area
    if edges_masked:
        full &= q_inside[:, None] & k_inside[None, :]
    if causal:  # top-left: a tile is visited if its first key is <= its last query, full if its last key <= first
        visited &= j0[None, :] <= i1[:, None]
        full &= j1[None, :] <= i0[:, None]
    full &= visited
    if transposed:
        visited, full = visited.transpose(1, 2), full.transpose(1, 2)
    partial = visited & ~full
    heads, rows, ncols = visited.shape
    sel = torch.stack([partial, full], dim=2)  # [Hr, rows, 2, ncols]: per row, boundary tiles then full ones
    counts = sel.sum(-1, dtype=torch.int32)  # [Hr, rows, 2]
    cols = sel.reshape(-1, ncols).nonzero()[:, 1].to(torch.int32)
    starts = torch.nn.functional.pad(counts.sum(-1).flatten().cumsum(0, dtype=torch.int32), (1, 0))
    offsets = starts.as_strided((heads, rows + 1), (rows, 1)).contiguous()
    full_start = (starts[:-1].view(heads, rows) + counts[..., 0]).contiguous()
    return TileTable(offsets, full_start, torch.nn.functional.pad(cols, (0, 1)))


# exact type -> (bottom_right, window_right); a `_window_size` attribute adds window_left = w - 1
_DENSE = {
    ab.LowerTriangularMask: (False, 0),
    ab.LowerTriangularMaskWithTensorBias: (False, 0),
    ab.LowerTriangularFromBottomRightMask: (True, 0),
    ab.LowerTriangularFromBottomRightLocalAttentionMask: (True, 0),
}
_BLOCK_DIAGONAL = {
    ab.BlockDiagonalMask: (False, None),
    ab.BlockDiagonalCausalMask: (False, 0),
    ab.BlockDiagonalCausalFromBottomRightMask: (True, 0),
    ab.BlockDiagonalCausalLocalAttentionMask: (False, 0),
    ab.BlockDiagonalCausalLocalAttentionFromBottomRightMask: (True, 0),
}
# KV-cache biases: exact type -> window_right (None: not causal); all bottom-right. `window_left`/`window_right`
# attributes (non-causal local) are taken as they are; `_window_size` gives window_left = w - 1.
_KV_CACHE = {
    ab.BlockDiagonalPaddedKeysMask: None,
    ab.BlockDiagonalCausalWithOffsetPaddedKeysMask: 0,
    ab.BlockDiagonalLocalAttentionPaddedKeysMask: None,
    ab.BlockDiagonalCausalLocalAttentionPaddedKeysMask: 0,
    ab.BlockDiagonalGappyKeysMask: None,
    ab.BlockDiagonalCausalWithOffsetGappyKeysMask: 0,
    ab.BlockDiagonalLocalAttentionFromBottomRightGappyKeysMask: None,
    ab.PagedBlockDiagonalPaddedKeysMask: None,
    ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask: 0,
    ab.PagedBlockDiagonalCausalLocalPaddedKeysMask: 0,
    ab.PagedBlockDiagonalGappyKeysMask: None,
    ab.PagedBlockDiagonalCausalWithOffsetGappyKeysMask: 0,
}
#: The KV-cache bias types (padded, gappy, paged keys), and the paged ones among them.
KV_CACHE_BIAS_TYPES: frozenset[type] = frozenset(_KV_CACHE)
PAGED_BIAS_TYPES: frozenset[type] = frozenset(
    t for t in _KV_CACHE if issubclass(t, (ab.PagedBlockDiagonalPaddedKeysMask, ab.PagedBlockDiagonalGappyKeysMask))
)

SUPPORTED_BIAS_TYPES: frozenset[type] = frozenset(
    {type(None), torch.Tensor, ab.LocalAttentionFromBottomRightMask, ab.BlockSparseMask}
    | set(_DENSE)
    | set(_BLOCK_DIAGONAL)
    | set(_KV_CACHE)
)


def kv_cache_window(bias) -> tuple[int | None, int | None]:
    """``(window_left, window_right)`` of a KV-cache bias (its mask is bottom-right)."""
    if hasattr(bias, "window_left"):
        return bias.window_left, bias.window_right
    window = getattr(bias, "_window_size", None)
    return (None if window is None else window - 1), _KV_CACHE[type(bias)]


def kv_cache_arrays(bias) -> tuple[list[int], list[int], list[int]]:
    """``(q_starts [nb + 1], k_starts [nb], k_lens [nb])`` of a KV-cache bias, read from its device tensors in
    one copy (under ``torch.compile``, from the Python lists the in-place updates keep in step)."""
    q, k = bias.q_seqinfo, bias.k_seqinfo
    nb = len(k.seqlen_py)
    paged_gappy = isinstance(bias, ab.PagedBlockDiagonalGappyKeysMask)
    if torch.compiler.is_compiling():
        q_starts, starts, ends = list(q.seqstart_py), list(k.seqstart_py[:nb]), list(k.seqlen_py)
    else:
        packed = torch.cat([q.seqstart, k.seqstart[:nb], k.seqlen[:nb]]).tolist()
        q_starts, starts, ends = packed[: nb + 1], packed[nb + 1 : 2 * nb + 1], packed[2 * nb + 1 :]
    if isinstance(bias, ab.PagedBlockDiagonalPaddedKeysMask):
        return q_starts, [0] * nb, ends  # padded rows start at their logical key 0
    if paged_gappy:
        return q_starts, starts, [e - s for s, e in zip(starts, ends)]
    return q_starts, starts, ends


def mask_spec(bias: torch.Tensor | ab.AttentionBias | None) -> MaskSpec:
    """The :class:`MaskSpec` of ``bias`` (exact types only, as in :data:`SUPPORTED_BIAS_TYPES`)."""
    kind = type(bias)
    if bias is None:
        return MaskSpec()
    if isinstance(bias, torch.Tensor):
        return MaskSpec(tensor_bias=bias)
    window = getattr(bias, "_window_size", None)
    window_left = None if window is None else window - 1
    if kind in _DENSE:
        bottom_right, window_right = _DENSE[kind]
        tensor = bias._bias if kind is ab.LowerTriangularMaskWithTensorBias else None
        return MaskSpec(
            bottom_right=bottom_right, window_left=window_left, window_right=window_right, tensor_bias=tensor
        )
    if kind is ab.LocalAttentionFromBottomRightMask:
        return MaskSpec(bottom_right=True, window_left=bias.window_left, window_right=bias.window_right)
    if kind is ab.BlockSparseMask:
        # traced by torch.compile: no cache keyed by addresses (the kernels' launcher builds the tables)
        make = BlockSparseSpec if torch.compiler.is_compiling() else block_sparse_spec
        sparse = make(bias.layout, bias.block_q, bias.block_k)
        return MaskSpec(window_right=0 if bias.causal else None, block_sparse=sparse)
    if kind in _BLOCK_DIAGONAL:
        bottom_right, window_right = _BLOCK_DIAGONAL[kind]
        ks = bias.k_seqinfo.seqstart_py
        return MaskSpec(
            q_starts=tuple(bias.q_seqinfo.seqstart_py),
            k_starts=tuple(ks[:-1]),
            k_lens=tuple(b - a for a, b in zip(ks, ks[1:])),
            bottom_right=bottom_right,
            window_left=window_left,
            window_right=window_right,
        )
    if kind in _KV_CACHE:
        window_left, window_right = kv_cache_window(bias)
        q_starts, k_starts, k_lens = kv_cache_arrays(bias)
        paged = kind in PAGED_BIAS_TYPES
        return MaskSpec(
            q_starts=tuple(q_starts),
            k_starts=tuple(k_starts),
            k_lens=tuple(k_lens),
            bottom_right=True,
            window_left=window_left,
            window_right=window_right,
            block_tables=bias.block_tables if paged else None,
            page_size=bias.page_size if paged else 0,
        )
    raise NotImplementedError(f"attention bias of type {kind.__name__} has no mask description")
