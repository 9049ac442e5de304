"""What each ring step computes: the global mask cut into one attention call per (rank, K/V block).

At step ``i`` of the ring, rank ``r`` holds the K/V block of rank ``s = (r - i) mod W``. Its queries sit at the
global positions of its chunks (:mod:`~triformers.distributed.sharding`), the keys at those of ``s``'s chunks;
the global mask restricted to that rectangle decides what to compute:

- step 0 (``s = r``): queries and keys are the same positions in the same increasing order, so the mask
  restricted to them *is* the mask of the local sequence: ``LowerTriangularMask`` stays causal, and a
  block-diagonal mask becomes the block-diagonal mask of the documents' local pieces (a document crossing
  from chunk ``r`` to chunk ``2W-1-r`` is one local block, causal where the global one is);
- other steps: the chunks of ``r`` and ``s`` are disjoint, so for each document a causal mask either shows a
  key to every query of a chunk (the key comes first) or hides it; non-causal masks show the whole document.
  Every (query chunk, document) piece therefore attends a *contiguous* run of the K/V block's rows (a
  document is an interval, and a rank's rows are in increasing position order). Pieces with the same run
  merge, empty pieces at either end are dropped, and what is left becomes one call: dense attention of a
  slice of the queries over a slice of the keys when it is a single piece (always the case without documents:
  for zigzag, ``s < r`` is every query over chunk ``s``, ``s > r`` the late chunk over both), else a
  ``BlockDiagonalGappyKeysMask`` giving each piece its run of keys. A step with nothing visible computes
  nothing (contiguous causal: every block of a later rank).

The global mask is read from its :class:`~triformers.ops.fmha._mask.MaskSpec`: no mask, causal (top-left, or
bottom-right, the same on a square), or block-diagonal self-attention (each document its own queries and
keys, optionally causal).
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch

from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha._mask import mask_spec
from triformers.ops.fmha.attn_bias import AttentionBias

from .sharding import rank_ranges

__all__ = ["GlobalMask", "BlockCall", "global_mask", "ring_plan", "SUPPORTED_BIASES"]

#: The ``attn_bias`` types context-parallel attention takes (they describe the global sequence).
SUPPORTED_BIASES: tuple[type, ...] = (
    type(None),
    ab.LowerTriangularMask,
    ab.LowerTriangularFromBottomRightMask,
    ab.BlockDiagonalMask,
    ab.BlockDiagonalCausalMask,
    ab.BlockDiagonalCausalFromBottomRightMask,
)
PLAN_CACHE_SIZE = 64  # plans (with their bias objects) kept per process: one per mask, rank and shape in use


@dataclass(frozen=True)
class GlobalMask:
    """The global mask as ring attention uses it.

    Attributes:
        causal: key ``j`` visible to query ``i`` only when ``j <= i`` (within its document).
        docs: document boundaries ``(0, ..., S)`` of a block-diagonal mask; None for one document.
    """

    causal: bool
    docs: tuple[int, ...] | None


@dataclass(frozen=True)
class BlockCall:
    """One partial attention: local query rows ``q`` over rows ``k`` of the K/V block, with ``bias``."""

    q: slice
    k: slice
    bias: AttentionBias | None


def _bias_error(attn_bias, why: str) -> ValueError:
    names = ", ".join("None" if t is type(None) else t.__name__ for t in SUPPORTED_BIASES)
    return ValueError(
        f"context_parallel_attention: attn_bias (a {type(attn_bias).__name__}) {why}; pass one of {names}, "
        "describing the whole (unsharded) sequence, the same on every rank"
    )


def check_bias_type(attn_bias) -> None:
    """Raise ValueError unless ``attn_bias`` is of a type context-parallel attention supports."""
    if type(attn_bias) not in SUPPORTED_BIASES:
        raise _bias_error(attn_bias, "is not a mask context parallelism can cut")


def global_mask(attn_bias, seq_len: int, batch: int) -> GlobalMask:
    """The :class:`GlobalMask` of ``attn_bias`` over a global sequence of ``seq_len`` tokens.

    Raises:
        ValueError: an unsupported bias, or a block-diagonal one that is not self-attention over exactly
            ``seq_len`` tokens with batch 1.
    """
    check_bias_type(attn_bias)
    spec = mask_spec(attn_bias)
    if not spec.is_block_diagonal:
        return GlobalMask(causal=spec.is_causal, docs=None)
    starts = spec.q_starts
    lens = tuple(b - a for a, b in zip(starts, starts[1:]))
    if spec.k_starts != starts[:-1] or spec.k_lens != lens:
        raise _bias_error(attn_bias, "gives queries and keys different documents (it is not self-attention)")
    if starts[-1] != seq_len:
        raise _bias_error(
            attn_bias,
            f"describes {starts[-1]} tokens but the global sequence has {seq_len} (world size x local length)",
        )
    if batch != 1:
        raise _bias_error(attn_bias, f"packs documents into one sequence (batch 1), but the batch is {batch}")
    return GlobalMask(causal=spec.is_causal, docs=tuple(starts))


def _below(ranges: list[tuple[int, int]], x: int) -> int:
    """Number of positions of ``ranges`` (sorted, disjoint) below ``x``: the local row of position ``x``."""
    return sum(max(0, min(b, x) - a) for a, b in ranges)


def _docs_in(docs: tuple[int, ...] | None, seq_len: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """The documents ``[start, stop)`` that intersect positions ``[lo, hi)``."""
    if docs is None:
        return [(0, seq_len)]
    first = bisect.bisect_right(docs, lo) - 1
    out = []
    for d in range(first, len(docs) - 1):
        if docs[d] >= hi:
            break
        out.append((docs[d], docs[d + 1]))
    return out


def _local_docs(docs: tuple[int, ...], ranges: list[tuple[int, int]]) -> list[int]:
    """Lengths of the documents' pieces among the local rows (in row order, empty pieces left out)."""
    lens: dict[int, int] = {}
    for lo, hi in ranges:
        for d in range(bisect.bisect_right(docs, lo) - 1, len(docs) - 1):
            if docs[d] >= hi:
                break
            lens[d] = lens.get(d, 0) + min(hi, docs[d + 1]) - max(lo, docs[d])
    return list(lens.values())


def _diagonal_call(mask: GlobalMask, ranges: list[tuple[int, int]], rows: int, device: torch.device) -> BlockCall:
    """Step 0: the local queries over their own keys, under the global mask restricted to the local rows."""
    bias: AttentionBias | None = ab.LowerTriangularMask() if mask.causal else None
    if mask.docs is not None:
        lens = _local_docs(mask.docs, ranges)
        if len(lens) > 1:
            bias = ab.BlockDiagonalMask.from_seqlens(lens, device=device)
            bias = bias.make_causal() if mask.causal else bias
    return BlockCall(slice(0, rows), slice(0, rows), bias)


def _pieces(mask: GlobalMask, seq_len: int, q_ranges, k_ranges) -> list[list[int]]:
    """``[q_lo, q_hi, k_lo, k_hi]`` local rows per (query chunk, document) piece, in query-row order."""
    pieces = []
    for q0, q1 in q_ranges:
        row0 = _below(q_ranges, q0)
        for d0, d1 in _docs_in(mask.docs, seq_len, q0, q1):
            # chunks of different ranks are disjoint: a causal key is visible to the whole piece iff it
            # precedes the chunk
            k_hi = min(d1, q0) if mask.causal else d1
            lo, hi = _below(k_ranges, d0), _below(k_ranges, max(d0, k_hi))
            pieces.append([row0 + max(d0, q0) - q0, row0 + min(d1, q1) - q0, lo, hi])
    merged: list[list[int]] = []
    for p in pieces:
        if merged and (merged[-1][2:] == p[2:] or (merged[-1][2] == merged[-1][3] and p[2] == p[3])):
            merged[-1][1] = p[1]  # same run of keys (or none): one piece
        else:
            merged.append(p)
    while merged and merged[-1][2] == merged[-1][3]:
        merged.pop()
    while merged and merged[0][2] == merged[0][3]:
        merged.pop(0)
    return merged


def _off_diagonal_call(
    mask: GlobalMask, seq_len: int, q_ranges, k_ranges, k_rows: int, device: torch.device
) -> BlockCall | None:
    """A step over another rank's block: one dense call, one gappy-keys call, or None (nothing visible)."""
    pieces = _pieces(mask, seq_len, q_ranges, k_ranges)
    if not pieces:
        return None
    if len(pieces) == 1:
        q_lo, q_hi, k_lo, k_hi = pieces[0]
        return BlockCall(slice(q_lo, q_hi), slice(k_lo, k_hi), None)
    bias = ab.BlockDiagonalGappyKeysMask.from_seqlens(
        q_seqlen=[p[1] - p[0] for p in pieces],
        kv_seqstarts=[p[2] for p in pieces] + [k_rows],
        kv_seqlen=[p[3] - p[2] for p in pieces],
        device=device,
    )
    return BlockCall(slice(pieces[0][0], pieces[-1][1]), slice(0, k_rows), bias)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def ring_plan(
    mask: GlobalMask, seq_len: int, world: int, rank: int, load_balance: str, device: torch.device
) -> tuple[BlockCall | None, ...]:
    """The call of every ring step of rank ``rank`` (step ``i``: the K/V block of rank ``(rank - i) % world``;
    None where the mask hides the whole block). Step 0 covers every local query row."""
    q_ranges = rank_ranges(rank, world, load_balance, seq_len)
    rows = seq_len // world
    plan = [_diagonal_call(mask, q_ranges, rows, device)]
    for i in range(1, world):
        k_ranges = rank_ranges((rank - i) % world, world, load_balance, seq_len)
        plan.append(_off_diagonal_call(mask, seq_len, q_ranges, k_ranges, rows, device))
    return tuple(plan)
