"""The tiles :mod:`chunked` visits: which (query chunk, key chunk) pairs a mask lets through, and their masks.

Dense masks give contiguous key ranges per query chunk (a slice; a paged bias's rows through its block table).
A block-sparse mask is read from its tile table, a query chunk of whole query blocks at a time:

- a layout shared by every head: the key blocks the chunk's query blocks allow, gathered ``chunk_k`` keys at a
  time (one gather for every head);
- a layout per head: each head's own key blocks, gathered per head (:class:`HeadRows`: ``[heads, keys]`` rows,
  the shorter lists padded), so that the work follows each head's blocks. A union over heads would visit a
  block whenever any head allows it: at 90 % sparsity and 16 random heads that is ~80 % of the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from triformers.ops.fmha._mask import MaskSpec

# A block-sparse query chunk covers whole query blocks, about this many queries: more queries per chunk widen
# the union of the key blocks its rows allow (random layouts: 1 - (1 - density)^blocks of the keys).
SPARSE_CHUNK_Q = 128


@dataclass(frozen=True)
class HeadRows:
    """Key rows of one chunk per layout head: ``rows`` int64 ``[Hl, nk]`` (padding: row 0, where it adds exact
    zeros in the backward), ``read`` the rows to gather (padding: row ``Mkv``, the zero row of
    :func:`with_zero_row`), ``pad`` bool ``[Hl, nk]`` (True on padding) or None when no head is padded."""

    rows: torch.Tensor
    read: torch.Tensor
    pad: torch.Tensor | None


def with_zero_row(x5: torch.Tensor) -> torch.Tensor:
    """A canonical ``[B, Mkv, G, Hk, X]`` K or V tensor with a row of zeros appended (row ``Mkv``): what padding
    reads, so that a NaN in a real row a head does not see never reaches its result."""
    return torch.cat([x5, x5.new_zeros(x5.shape[0], 1, *x5.shape[2:])], dim=1)


def gather_heads(x5: torch.Tensor, keys: HeadRows, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``keys.read`` of a :func:`with_zero_row` K or V tensor ``[B, Mkv + 1, G, Hk, X]``, per query head:
    ``[B, G, Hg, nk, X]`` in ``dtype`` (``Hg`` from the layout's heads; shared K/V heads, ``Hk = 1``, are read for
    each of them)."""
    B, Mkv, G, Hk, X = x5.shape
    rows = keys.read
    Hg = rows.shape[0] // G
    xp = x5.permute(0, 2, 3, 1, 4)  # [B, G, Hk, Mkv, X], a view
    if Hk != Hg:
        xp = xp.expand(B, G, Hg, Mkv, X)
    dev = x5.device
    g = torch.arange(G, device=dev).view(G, 1, 1)
    h = torch.arange(Hg, device=dev).view(1, Hg, 1)
    return xp[:, g, h, rows.view(G, Hg, -1)].to(dtype)


def accumulate_heads(buf: torch.Tensor, keys: HeadRows, value: torch.Tensor) -> None:
    """``buf[:, g, hk(h), rows[g, h]] += value[:, g, h]`` for a contiguous ``[B, G, Hk, Mkv, X]`` buffer and
    per-head ``value`` ``[B, G, Hg, nk, X]``; the heads sharing a K/V head add into the same rows (one
    ``index_add_`` over the flattened rows: far faster on the CPU than an accumulating ``index_put_``)."""
    B, G, Hk, Mkv, X = buf.shape
    Hg = value.shape[2]
    dev = buf.device
    g = torch.arange(G, device=dev).view(G, 1, 1)
    h = torch.arange(Hg, device=dev).view(1, Hg, 1)
    hk = h if Hk == Hg else torch.zeros_like(h)
    flat = ((g * Hk + hk) * Mkv + keys.rows.view(G, Hg, -1)).flatten()
    buf.view(B, G * Hk * Mkv, X).index_add_(1, flat, value.reshape(B, -1, X))


class Tiles:
    """The (query chunk, key chunk) tiles a mask lets through, and their masks; ``heads`` ``(G, Hg)`` shapes
    the per-head masks of a block-sparse layout."""

    def __init__(self, spec: MaskSpec, Mq: int, Mkv: int, chunk_q: int, chunk_k: int, device: torch.device,
                 heads: tuple[int, int] = (1, 1)):
        self.spec, self.chunk_q, self.chunk_k, self.device, self.Mkv = spec, chunk_q, chunk_k, device, Mkv
        self.blocks = spec.blocks(Mq, Mkv)
        self.per_head = False  # a per-head block-sparse layout: key chunks are HeadRows
        sparse = spec.block_sparse
        if sparse is not None:
            bq = sparse.block_q
            self.chunk_q = max(1, SPARSE_CHUNK_Q // bq) * bq
            self.heads = heads
            self.per_head = sparse.num_heads > 1
            table = sparse.table(Mq, Mkv, self.chunk_q, sparse.block_k, spec.is_causal,
                                 union_heads=not self.per_head, edges_masked=False)  # fmt: skip
            self.table = (table.offsets.tolist(), table.full_start.tolist(), table.cols.tolist())

    def query_chunks(self):
        """``(block, q0, q1)``: absolute query ranges, per block."""
        for index, blk in enumerate(self.blocks):
            q_start, q_len = blk[0], blk[1]
            for a in range(0, q_len, self.chunk_q):
                yield (index, *blk), q_start + a, q_start + min(q_len, a + self.chunk_q)

    def key_chunks(self, blk, q0: int, q1: int):
        """``(keys, mask or None)`` for the key tiles query rows ``[q0, q1)`` of ``blk`` may see: ``keys`` the
        key rows, a slice (an int64 tensor of physical rows for a paged bias: only the chunk's rows are read
        through the block table, never the whole logical cache; :class:`HeadRows` for a per-head layout)."""
        if self.spec.block_sparse is not None:
            yield from (self._head_key_chunks(q0, q1) if self.per_head else self._sparse_key_chunks(q0, q1))
            return
        index, q_start, _, k_start, k_len, offset = blk
        a, b = q0 - q_start, q1 - q_start
        lo, hi = self.spec.key_range(a, b, k_len, offset)
        for c in range(lo, hi, self.chunk_k):
            d = min(hi, c + self.chunk_k)
            mask = None
            if not self.spec.fully_allowed(a, b, c, d, offset):
                i = torch.arange(a, b, device=self.device).view(-1, 1)
                j = torch.arange(c, d, device=self.device).view(1, -1)
                mask = self.spec.allowed(i, j, offset)
            if self.spec.is_paged:
                keys = self.spec.key_rows(index, torch.arange(c, d, device=self.device), self.Mkv)
            else:
                keys = slice(k_start + c, k_start + d)
            yield keys, mask

    def _sparse_key_chunks(self, q0: int, q1: int):
        """Block-sparse :meth:`key_chunks` of a shared layout: the key blocks of query chunk ``[q0, q1)``,
        boundary blocks (masked) then blocks allowed entirely, gathered ``chunk_k`` keys at a time (a slice when
        contiguous)."""
        sparse, dev = self.spec.block_sparse, self.device
        offsets, full_start, cols = (self.table[0][0], self.table[1][0], self.table[2])
        t = q0 // self.chunk_q
        bk = sparse.block_k
        per_chunk = max(1, self.chunk_k // bk)
        for lo, hi, masked in ((offsets[t], full_start[t], True), (full_start[t], offsets[t + 1], False)):
            for a in range(lo, hi, per_chunk):
                blocks = cols[a:min(hi, a + per_chunk)]
                if blocks[-1] - blocks[0] == len(blocks) - 1:
                    keys = slice(blocks[0] * bk, min(self.Mkv, (blocks[-1] + 1) * bk))
                    j = torch.arange(keys.start, keys.stop, device=dev)
                else:
                    j = (torch.tensor(blocks, device=dev)[:, None] * bk + torch.arange(bk, device=dev)).flatten()
                    keys = j = j[j < self.Mkv]
                mask = sparse.allowed(torch.arange(q0, q1, device=dev), j, self.spec.is_causal)[0] if masked else None
                yield keys, mask

    def _head_key_chunks(self, q0: int, q1: int):
        """Block-sparse :meth:`key_chunks` of a per-head layout: the key blocks each head allows to some query
        block of chunk ``[q0, q1)`` (:class:`HeadRows`), ``chunk_k`` keys per head at a time; the mask
        ``[1, G, Hg, n or 1, nk]`` keeps each head's allowed pairs (its layout, causal, not padding), None when
        every pair of the gathered blocks is allowed (one query block, no padding, not causal)."""
        sparse, dev = self.spec.block_sparse, self.device
        offsets, _, cols = self.table
        t = q0 // self.chunk_q
        bq, bk = sparse.block_q, sparse.block_k
        per_chunk = max(1, self.chunk_k // bk)
        lists = [cols[row[t]:row[t + 1]] for row in offsets]
        longest = max(map(len, lists))
        n, q_blocks = q1 - q0, -(-(q1 - q0) // bq)
        last = self.Mkv // bk if self.Mkv % bk else -1  # a key block that ends past Mkv
        for a in range(0, longest, per_chunk):
            parts = [blocks[a:a + per_chunk] for blocks in lists]
            width = max(map(len, parts))
            padded = any(len(p) < width or last in p for p in parts)
            block_ids = torch.tensor([p + [0] * (width - len(p)) for p in parts], device=dev)  # [Hl, width]
            rows = (block_ids[:, :, None] * bk + torch.arange(bk, device=dev)).flatten(1)  # [Hl, width * bk]
            pad, read = None, rows
            if padded:
                lengths = torch.tensor([len(p) for p in parts], device=dev)
                short = torch.arange(width, device=dev)[None, :] >= lengths[:, None]  # [Hl, width]
                pad = short[:, :, None].expand(-1, -1, bk).flatten(1) | (rows >= self.Mkv)
                rows, read = rows.masked_fill(pad, 0), rows.masked_fill(pad, self.Mkv)
            mask = None
            if q_blocks == 1 and not self.spec.is_causal and pad is not None:  # only padding: [Hl, 1, nk]
                mask = (~pad[:, None, :]).view(1, *self.heads, 1, -1)
            elif q_blocks > 1 or self.spec.is_causal:
                # a head's blocks are allowed for some of the chunk's query blocks: the layout decides per block
                heads = torch.arange(len(parts), device=dev)[:, None, None]
                q_ids = torch.arange(q0 // bq, q0 // bq + q_blocks, device=dev)[None, :, None]
                ok = sparse.layout[heads, q_ids, block_ids[:, None, :]]  # [Hl, q_blocks, width]
                ok = ok[:, :, None, :, None].expand(-1, -1, bq, -1, bk).reshape(len(parts), q_blocks * bq, -1)[:, :n]
                if pad is not None:
                    ok = ok & ~pad[:, None, :]
                if self.spec.is_causal:
                    ok = ok & (rows[:, None, :] <= torch.arange(q0, q1, device=dev)[None, :, None])
                mask = ok.view(1, *self.heads, *ok.shape[1:])  # [1, G, Hg, n, nk]
            yield HeadRows(rows, read, pad), mask
