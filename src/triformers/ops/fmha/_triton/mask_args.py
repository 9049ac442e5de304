"""An attention bias as the Triton kernels see it (``MaskArgs``): window bounds, sequence arrays and KV-cache
parameters from the bias's description in ``_mask.py`` (``launch.py`` re-exports them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha._mask import (
    KV_CACHE_BIAS_TYPES,
    PAGED_BIAS_TYPES,
    kv_cache_window,
    mask_spec,
)

NO_WINDOW = -1


@dataclass(frozen=True)
class MaskArgs:
    """An attention bias as the kernels see it.

    Attributes:
        seq_q, k_start, k_len: int32 device tensors ``[nb + 1]``, ``[nb]``, ``[nb]`` for packed sequences
            (block-diagonal biases), or None for a dense batch.
        max_q, max_k: longest query / key block (the grid size).
        bottom_right: diagonal offset ``k_len - q_len`` instead of 0.
        window_left, window_right: window bounds around the diagonal, ``NO_WINDOW`` when absent.
        keys_covered: every key row lies in some block (dense batches, and packed sequences without
            padded or skipped keys): the backward writes every dK/dV row and needs no zero fill. False for
            KV-cache biases, whose unused rows may hold anything (NaN): kernels zero what they read past a
            block's keys.
        block_tables, page_size: a paged bias's table ``[nb, max_pages]`` (int32/int64) and page size; ``k_len``
            then holds each block's *end* offset in its logical row and ``k_start`` its start, None when every
            row starts at logical key 0 (padded pages: key tiles then never straddle pages when ``page_size`` is
            a multiple of the tile). Forward only.
        bs_layout, bs_block_q, bs_block_k: a block-sparse mask's bool layout ``[H or 1, nqb, nkb]`` and block
            sizes (None, 0, 0 otherwise); kernels read it through the tile tables of ``_mask.BlockSparseSpec``.
    """

    seq_q: torch.Tensor | None
    k_start: torch.Tensor | None
    k_len: torch.Tensor | None
    max_q: int
    max_k: int
    bottom_right: bool
    window_left: int
    window_right: int
    keys_covered: bool = True
    block_tables: torch.Tensor | None = None
    page_size: int = 0
    bs_layout: torch.Tensor | None = None
    bs_block_q: int = 0
    bs_block_k: int = 0


def mask_args(attn_bias, Mq: int, Mkv: int, device: torch.device) -> MaskArgs:
    """:class:`MaskArgs` of an attention bias (a tensor bias is passed to the kernels separately), kept on
    an :class:`AttentionBias` object per (device, Mq, Mkv) after its first call."""
    cache = None
    if attn_bias is not None and not isinstance(attn_bias, torch.Tensor) and not torch.compiler.is_compiling():
        cache = attn_bias.__dict__.get("_triformers_mask_args")
        if cache is None:
            cache = {}
            object.__setattr__(attn_bias, "_triformers_mask_args", cache)
        m = cache.get((device, Mq, Mkv))
        if m is None:
            m = cache[device, Mq, Mkv] = _mask_args(attn_bias, Mq, Mkv, device)
        return m
    return _mask_args(attn_bias, Mq, Mkv, device)


def _mask_args(attn_bias, Mq: int, Mkv: int, device: torch.device) -> MaskArgs:
    if type(attn_bias) in KV_CACHE_BIAS_TYPES:
        return _kv_cache_mask_args(attn_bias)
    spec = mask_spec(attn_bias)
    wl = NO_WINDOW if spec.window_left is None else spec.window_left
    wr = NO_WINDOW if spec.window_right is None else spec.window_right
    if spec.block_sparse is not None:
        bs = spec.block_sparse
        return MaskArgs(None, None, None, Mq, Mkv, False, wl, wr, bs_layout=bs.layout, bs_block_q=bs.block_q,
                        bs_block_k=bs.block_k)
    if not spec.is_block_diagonal:
        return MaskArgs(None, None, None, Mq, Mkv, spec.bottom_right, wl, wr)
    seq_q, k_start, k_len, keys_covered = _varlen_arrays(spec, Mkv, device)
    # plain lists (not max(generator, default=...)) keep this traceable by torch.compile
    max_q = max([0] + [b - a for a, b in zip(spec.q_starts, spec.q_starts[1:])])
    return MaskArgs(seq_q, k_start, k_len, max_q, max([0, *spec.k_lens]), spec.bottom_right, wl, wr, keys_covered)


def _kv_cache_mask_args(bias) -> MaskArgs:
    """A KV-cache bias as the kernels see it: its own device tensors (no copy, no sync), so that updates made
    in place (``from_seqlens_padded_inplace``, ``k_seqinfo.seqlen.add_(1)``, a CUDA graph's replay) reach the
    kernels. The grid comes from bounds those updates keep: ``q_seqinfo.max_seqlen`` and the padding (the
    table's width for paged caches, the longest segment for gappy ones)."""
    wl, wr = kv_cache_window(bias)
    q, k = bias.q_seqinfo, bias.k_seqinfo
    block_tables, page_size, max_k = None, 0, k.max_seqlen
    if type(bias) in PAGED_BIAS_TYPES:
        block_tables, page_size = bias.block_tables, bias.page_size
        max_k = block_tables.shape[1] * page_size
    elif hasattr(k, "padding"):
        max_k = k.padding
    # paged padded rows start at their logical key 0: no start array (the launcher passes zeros)
    k_start = None if isinstance(bias, ab.PagedBlockDiagonalPaddedKeysMask) else k.seqstart.to(torch.int32)
    return MaskArgs(
        q.seqstart.to(torch.int32),
        k_start,
        k.seqlen.to(torch.int32),
        q.max_seqlen,
        max_k,
        True,
        NO_WINDOW if wl is None else wl,
        NO_WINDOW if wr is None else wr,
        False,
        block_tables,
        page_size,
    )


def _varlen_arrays(spec, Mkv: int, device: torch.device):
    """``(seq_q, k_start, k_len, keys_covered)``: the sequence arrays on ``device`` (one host-to-device copy;
    :func:`mask_args` keeps the result per bias object) and whether the blocks cover every key."""
    nb = spec.num_blocks
    packed = torch.tensor([*spec.q_starts, *spec.k_starts, *spec.k_lens], dtype=torch.int32).to(device)
    blocks = sorted(zip(spec.k_starts, spec.k_lens))
    ends = [0] + [a + n for a, n in blocks]
    covered = all(a == e for (a, _), e in zip(blocks, ends)) and ends[-1] == Mkv
    return packed[: nb + 1], packed[nb + 1: 2 * nb + 1], packed[2 * nb + 1:], covered
