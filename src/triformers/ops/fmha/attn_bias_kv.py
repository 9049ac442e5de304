"""KV-cache attention biases: padded, gappy and paged keys (part of :mod:`attn_bias`'s namespace).

Queries are packed without padding (``q`` ``[1, sum(q_seqlen), ...]``); block ``b``'s keys are

- *padded*: rows ``[b * padding, b * padding + kv_seqlen[b])`` of ``k`` ``[1, B * padding, ...]``; the rest of
  each slot is unused (its rows may hold anything, NaN included: no operator reads them);
- *gappy*: rows ``[kv_seqstarts[b], kv_seqstarts[b] + kv_seqlen[b])`` anywhere on the key axis, in any order,
  overlapping allowed (``kv_seqstarts`` has ``B + 1`` entries, the last is the key count);
- *paged*: logical keys of row ``b`` (``[0, kv_seqlen[b])`` padded, ``[start_b, end_b)`` gappy) live in pages
  of ``page_size`` rows: logical key ``t`` is row ``block_tables[b, t // page_size] * page_size +
  t % page_size`` of ``k`` ``[1, num_pages * page_size, ...]``.

Causal and local variants are bottom-right aligned within each block (``s_b = nk_b - nq_b``): the ``q_seqlen[b]``
new tokens are the last ones of their sequence. Validation happens at construction (ValueError naming the
argument and the fix); a paged bias also stores its table's largest page id (one ``aminmax`` here, so that a call
can check it against the cache without a device sync).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from triformers.ops.fmha.attn_bias import (
    AttentionBias,
    BlockDiagonalMask,
    _as_int_list,
    _check_window,
    _default_device,
    _int_tensor,
    _materialize_blocks,
    _materialize_causal_mask,
    _materialize_local_mask,
    _SeqLenInfo,
)

# --------------------------------------------------------------------------------------------------
# Sequence descriptors
# --------------------------------------------------------------------------------------------------


@dataclass
class _PaddedSeqLenInfo(_SeqLenInfo):
    """Sequences in fixed slots of ``padding`` positions, of which the first ``seqlen[b]`` are used:
    ``from_seqlens_padded([2, 3, 2], 4)`` has ``seqstart_py == [0, 4, 8, 12]``, ``seqlen_py == [2, 3, 2]``
    (and the same as int32 tensors ``seqstart``, ``seqlen``)."""

    seqlen: torch.Tensor
    seqlen_py: list[int]
    padding: int

    def __post_init__(self) -> None:
        if len(self.seqstart_py) != len(self.seqlen_py) + 1:
            raise ValueError(
                f"seqstart_py has {len(self.seqstart_py)} entries, seqlen_py {len(self.seqlen_py)}: seqstart_py "
                "needs one more (the end of the last slot)"
            )

    def intervals(self) -> Iterable[tuple[int, int]]:
        for start, length in zip(self.seqstart_py, self.seqlen_py):
            yield start, start + length

    @classmethod
    def from_seqlens(cls, seqlens: Iterable[int], *, device=None) -> _SeqLenInfo:
        raise RuntimeError("Use either `_SeqLenInfo.from_seqlens` or `_PaddedSeqLenInfo.from_seqlens_padded`")

    @classmethod
    def from_seqlens_padded(
        cls, seqlens: Sequence[int], padding: int, *, device: str | torch.device | None = None
    ) -> _PaddedSeqLenInfo:
        """Slots of ``padding`` keys holding ``seqlens`` keys each; tensors on ``device`` (default: CUDA when
        available, else the CPU)."""
        lengths = _as_int_list("kv_seqlen", seqlens)
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"kv_padding must be a non-negative int, got {padding!r}")
        _check_lengths_fit(lengths, padding)
        device = _default_device(device)
        seqstart_py = [b * padding for b in range(len(lengths) + 1)]
        return cls(
            seqstart=_int_tensor(seqstart_py, device),
            max_seqlen=max(lengths, default=0),
            min_seqlen=min(lengths, default=0),
            seqstart_py=seqstart_py,
            seqlen=_int_tensor(lengths, device),
            seqlen_py=lengths,
            padding=padding,
        )

    def from_seqlens_padded_inplace(self, seqlens: Sequence[int]) -> None:
        """Overwrites the used lengths in place (for CUDA graphs): same number of sequences, none longer than
        ``max_seqlen`` (nor ``padding``, which stays: kernels were sized for it). ``seqlen`` keeps its
        storage."""
        lengths = _as_int_list("seqlens", seqlens)
        if len(lengths) != len(self.seqlen_py):
            raise ValueError(
                f"from_seqlens_padded_inplace needs {len(self.seqlen_py)} lengths (one per sequence), got "
                f"{len(lengths)}: {lengths}; build a new bias to change the number of sequences"
            )
        _check_lengths_fit(lengths, self.padding)
        if max(lengths, default=0) > self.max_seqlen:
            raise ValueError(
                f"from_seqlens_padded_inplace: seqlens={lengths} exceed max_seqlen={self.max_seqlen}, the bound "
                "this bias was built with; build a new bias for longer sequences"
            )
        self.seqlen_py[:] = lengths
        self.seqlen.copy_(torch.tensor(lengths, dtype=self.seqlen.dtype), non_blocking=True)

    def split(self, x: torch.Tensor, batch_sizes: Sequence[int] | None = None) -> list[torch.Tensor]:
        raise NotImplementedError("_PaddedSeqLenInfo.split")


def _check_lengths_fit(lengths: Sequence[int], padding: int) -> None:
    for b, length in enumerate(lengths):
        if length > padding:
            raise ValueError(
                f"kv_seqlen[{b}]={length} is more than kv_padding={padding}: a sequence cannot hold more keys "
                f"than its slot; raise kv_padding to at least {max(lengths)}"
            )


@dataclass
class _GappySeqInfo(_SeqLenInfo):
    """Key segments anywhere on the key axis: ``seqstart_py`` (B + 1 entries, the last is the key count) and
    lengths ``seqlen_py``, e.g. ``from_seqlens_gappy([0, 7, 12, 14], [6, 3, 1], False)``.

    Paged semantics (``paged=True``): ``seqstart_py[b]`` is the first key's offset inside row ``b``'s logical
    space, ``seqlen_py[b]`` the *end* offset (start + length), and ``seqstart_py`` has a trailing -1 (the
    tensors ``seqstart``/``seqlen`` hold the same). ``max_seqlen``/``min_seqlen`` are over the lengths.
    """

    seqlen: torch.Tensor
    seqlen_py: Sequence[int]

    def intervals(self) -> Iterable[tuple[int, int]]:
        """``(start, start + length)`` per segment (non-paged semantics)."""
        for start, length in zip(self.seqstart_py, self.seqlen_py):
            yield start, start + length

    @classmethod
    def from_seqlens(cls, seqlens: Iterable[int], *, device=None) -> _SeqLenInfo:
        raise NotImplementedError()

    @classmethod
    def from_seqlens_gappy(
        cls,
        seqstarts: Sequence[int],
        seqlens: Sequence[int],
        paged: bool,
        *,
        device: str | torch.device | None = None,
    ) -> _GappySeqInfo:
        """Segments ``[seqstarts[b], seqstarts[b] + seqlens[b])``. Not paged: ``seqstarts`` has one more entry
        than ``seqlens``, the key count. Paged: one offset per row (a trailing entry is ignored); the result
        holds end offsets and a trailing -1 (see the class docstring)."""
        lengths = _as_int_list("kv_seqlen", seqlens)
        starts = list(seqstarts.tolist() if isinstance(seqstarts, torch.Tensor) else seqstarts)
        if not lengths:
            raise ValueError("No elements: kv_seqlen is empty; a gappy bias needs at least one sequence")
        expected = (len(lengths), len(lengths) + 1) if paged else (len(lengths) + 1,)
        if len(starts) not in expected:
            raise ValueError(
                f"kv_seqstarts has {len(starts)} entries for {len(lengths)} sequences; expected "
                + (
                    f"{len(lengths)} (one offset per row)"
                    if paged
                    else f"{len(lengths) + 1} (the starts, then the total number of keys)"
                )
            )
        if any(isinstance(s, bool) or not isinstance(s, int) for s in starts):
            raise ValueError(f"kv_seqstarts must hold ints, got {starts}")
        if paged:
            starts = starts[: len(lengths)]
            if min(starts) < 0:
                raise ValueError(f"kv_seqstarts must be offsets >= 0 inside each row, got {starts}")
            seqstart_py = [*starts, -1]
            ends = [s + n for s, n in zip(starts, lengths)]
        else:
            total = starts[-1]
            for b, (s, n) in enumerate(zip(starts, lengths)):
                if s < 0 or s + n > total:
                    raise ValueError(
                        f"key segment {b} = [{s}, {s + n}) (kv_seqstarts[{b}]={s}, kv_seqlen[{b}]={n}) lies outside "
                        f"the key axis [0, {total}) (kv_seqstarts[-1]={total}, the number of keys); fix the starts "
                        "or raise the last entry to the key count"
                    )
            seqstart_py, ends = starts, lengths
        device = _default_device(device)
        return cls(
            seqstart=_int_tensor(seqstart_py, device),
            max_seqlen=max(lengths),
            min_seqlen=min(lengths),
            seqstart_py=seqstart_py,
            seqlen=_int_tensor(ends, device),
            seqlen_py=ends,
        )

    def split(self, x: torch.Tensor, batch_sizes: Sequence[int] | None = None) -> list[torch.Tensor]:
        raise NotImplementedError("_GappySeqInfo.split")


def _check_block_count(bias) -> None:
    nq, nk = len(bias.q_seqinfo.seqstart_py) - 1, len(bias.k_seqinfo.seqlen_py)
    if nq != nk:
        raise ValueError(
            f"{type(bias).__name__}: q_seqinfo describes {nq} sequences but k_seqinfo {nk}; build both from the "
            "same number of sequences (q_seqlen and kv_seqlen of equal length)"
        )


def _seqinfos(q_seqlen, kv_seqlen, device):
    q_list, kv_list = _as_int_list("q_seqlen", q_seqlen), _as_int_list("kv_seqlen", kv_seqlen)
    if len(q_list) != len(kv_list):
        raise ValueError(
            f"q_seqlen and kv_seqlen must have one entry per sequence, got {len(q_list)} and {len(kv_list)}"
        )
    return _SeqLenInfo.from_seqlens(q_list, device=device), kv_list


# --------------------------------------------------------------------------------------------------
# Padded keys
# --------------------------------------------------------------------------------------------------


@dataclass
class BlockDiagonalPaddedKeysMask(AttentionBias):
    """Packed queries, padded keys: block ``b``'s queries attend the ``kv_seqlen[b]`` keys in use of slot ``b``
    (rows ``[b * kv_padding, b * kv_padding + kv_seqlen[b])``), none of the padding.

    Example: room for 12 keys in 3 slots of 4, of which 2, 3 and 2 are used: ``from_seqlens(q_seqlen,
    kv_padding=4, kv_seqlen=[2, 3, 2])``.
    """

    q_seqinfo: _SeqLenInfo
    k_seqinfo: _PaddedSeqLenInfo

    def __post_init__(self) -> None:
        _check_block_count(self)
        _check_lengths_fit(self.k_seqinfo.seqlen_py, self.k_seqinfo.padding)

    def _create_block_mask(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=dtype, device=device)

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _materialize_blocks(self, shape, dtype, device)

    @classmethod
    def from_seqlens(
        cls,
        q_seqlen: Sequence[int],
        kv_padding: int,
        kv_seqlen: Sequence[int],
        causal_diagonal: Any = None,
        *,
        device: str | torch.device | None = None,
    ) -> BlockDiagonalPaddedKeysMask:
        """Builds the mask from the query lengths, the slot size and the used key lengths (``causal_diagonal``:
        unused, for compatibility); tensors on ``device`` (default: CUDA when available, else the CPU)."""
        q_seqinfo, kv_list = _seqinfos(q_seqlen, kv_seqlen, _default_device(device))
        k_seqinfo = _PaddedSeqLenInfo.from_seqlens_padded(kv_list, kv_padding, device=q_seqinfo.seqstart.device)
        return cls(q_seqinfo=q_seqinfo, k_seqinfo=k_seqinfo)

    def make_paged(self, block_tables: torch.Tensor, page_size: int, paged_type: type) -> AttentionBias:
        """The same mask over a paged cache: row ``b``'s keys through ``block_tables[b]`` (``[B,
        max_num_pages]``) in pages of ``page_size``. ``paged_type`` is the paged class whose ``_UNPAGED_TYPE``
        is this bias's type. Shares this bias's tensors."""
        _check_paged_type(self, paged_type)
        _check_block_tables(block_tables, page_size, len(self.k_seqinfo.seqlen_py))
        k = self.k_seqinfo
        k_seqinfo = _PaddedSeqLenInfo(
            seqstart=k.seqstart,
            max_seqlen=k.max_seqlen,
            min_seqlen=k.min_seqlen,
            seqstart_py=k.seqstart_py,
            seqlen=k.seqlen,
            seqlen_py=k.seqlen_py,
            padding=block_tables.shape[1] * page_size,
        )
        return paged_type(
            q_seqinfo=self.q_seqinfo,
            k_seqinfo=k_seqinfo,
            block_tables=block_tables,
            page_size=page_size,
            **_extra_fields(self, paged_type),
        )

    def make_local_attention(self, window_left: int, window_right: int) -> BlockDiagonalLocalAttentionPaddedKeysMask:
        """The same blocks with a non-causal window ``i + s_b - window_left <= j <= i + s_b + window_right``."""
        return BlockDiagonalLocalAttentionPaddedKeysMask(
            q_seqinfo=self.q_seqinfo, k_seqinfo=self.k_seqinfo, window_left=window_left, window_right=window_right
        )


@dataclass
class BlockDiagonalCausalWithOffsetPaddedKeysMask(BlockDiagonalPaddedKeysMask):
    """The KV-cache mask: padded keys, bottom-right causal per block, ``j <= i + kv_seqlen[b] - q_seqlen[b]``
    (the ``q_seqlen[b]`` new tokens are the last of the ``kv_seqlen[b]`` cache entries; a single query sees
    every key in use)."""

    causal_diagonal: Any = None  # unused, kept for compatibility

    def _create_block_mask(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _materialize_causal_mask(shape, dtype=dtype, device=device, from_bottomright=True)

    @classmethod
    def from_seqlens(
        cls,
        q_seqlen: Sequence[int],
        kv_padding: int,
        kv_seqlen: Sequence[int],
        causal_diagonal: Any = None,
        *,
        device: str | torch.device | None = None,
    ) -> BlockDiagonalCausalWithOffsetPaddedKeysMask:
        """Builds the mask from the query lengths, the slot size of the cache and the used key lengths."""
        base = BlockDiagonalPaddedKeysMask.from_seqlens(q_seqlen, kv_padding, kv_seqlen, device=device)
        return cls(q_seqinfo=base.q_seqinfo, k_seqinfo=base.k_seqinfo, causal_diagonal=causal_diagonal)


@dataclass
class BlockDiagonalLocalAttentionPaddedKeysMask(BlockDiagonalPaddedKeysMask):
    """Padded keys with a non-causal window around the bottom-right diagonal of each block:
    ``i + s_b - window_left <= j <= i + s_b + window_right``."""

    window_left: int
    window_right: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_window("window_left", self.window_left, 0)
        _check_window("window_right", self.window_right, 0)

    def _create_block_mask(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _materialize_local_mask(shape, self.window_left, self.window_right, dtype, device)

    @classmethod
    def from_seqlens_local(
        cls,
        q_seqlen: Sequence[int],
        kv_padding: int,
        kv_seqlen: Sequence[int],
        window_left: int,
        window_right: int,
        *,
        device: str | torch.device | None = None,
    ) -> BlockDiagonalLocalAttentionPaddedKeysMask:
        base = BlockDiagonalPaddedKeysMask.from_seqlens(q_seqlen, kv_padding, kv_seqlen, device=device)
        return cls(
            q_seqinfo=base.q_seqinfo, k_seqinfo=base.k_seqinfo, window_left=window_left, window_right=window_right
        )


@dataclass
class BlockDiagonalCausalLocalAttentionPaddedKeysMask(BlockDiagonalPaddedKeysMask):
    """Padded keys, bottom-right causal with a window of ``w`` keys per query: ``i + s_b - w + 1 <= j <= i +
    s_b``."""

    _window_size: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_window("window_size", self._window_size, 1)

    def _create_block_mask(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _materialize_causal_mask(
            shape, dtype=dtype, device=device, window_size=self._window_size, from_bottomright=True
        )

    @classmethod
    def from_seqlens_local(
        cls,
        q_seqlen: Sequence[int],
        kv_padding: int,
        kv_seqlen: Sequence[int],
        window_size: int,
        *,
        device: str | torch.device | None = None,
    ) -> BlockDiagonalCausalLocalAttentionPaddedKeysMask:
        base = BlockDiagonalPaddedKeysMask.from_seqlens(q_seqlen, kv_padding, kv_seqlen, device=device)
        return cls(q_seqinfo=base.q_seqinfo, k_seqinfo=base.k_seqinfo, _window_size=window_size)


# --------------------------------------------------------------------------------------------------
# Gappy keys
# --------------------------------------------------------------------------------------------------


@dataclass
class BlockDiagonalGappyKeysMask(AttentionBias):
    """Packed queries; block ``b`` attends keys ``[kv_seqstarts[b], kv_seqstarts[b] + kv_seqlen[b])``,
    which may lie anywhere on the key axis (e.g. a shared prompt stored once plus per-sequence suffixes)."""

    q_seqinfo: _SeqLenInfo
    k_seqinfo: _GappySeqInfo

    def __post_init__(self) -> None:
        _check_block_count(self)

    def _create_block_mask(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=dtype, device=device)

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _materialize_blocks(self, shape, dtype, device)

    @classmethod
    def from_seqlens(
        cls,
        q_seqlen: Sequence[int],
        kv_seqstarts: Sequence[int],
        kv_seqlen: Sequence[int],
        *,
        device: str | torch.device | None = None,
    ) -> BlockDiagonalGappyKeysMask:
        """``kv_seqstarts``: ``B + 1`` entries, the start of each key segment then the total key count."""
        q_seqinfo, kv_list = _seqinfos(q_seqlen, kv_seqlen, _default_device(device))
        k_seqinfo = _GappySeqInfo.from_seqlens_gappy(kv_seqstarts, kv_list, False, device=q_seqinfo.seqstart.device)
        return cls(q_seqinfo=q_seqinfo, k_seqinfo=k_seqinfo)

    def make_paged(
        self, block_tables: torch.Tensor, page_size: int, notional_padding: int, paged_type: type
    ) -> AttentionBias:
        """The paged version, assuming sequence ``b``'s keys live in ``[b * notional_padding, (b + 1) *
        notional_padding)``: offsets become row-local, computed apart on the host and the device (no sync)."""
        if notional_padding % page_size:
            raise ValueError(
                "Notional padding should be divisible by the page size,"
                f" but got notional_padding={notional_padding}, page_size={page_size}."
            )
        _check_paged_type(self, paged_type)
        batch = len(self.k_seqinfo.seqlen_py)
        _check_block_tables(block_tables, page_size, batch)
        k = self.k_seqinfo
        starts = [start - b * notional_padding for b, start in enumerate(k.seqstart_py[:batch])]
        for b, start in enumerate(starts):
            if not 0 <= start < notional_padding:
                raise ValueError(
                    f"key segment {b} starts at {k.seqstart_py[b]}, outside its notional row "
                    f"[{b * notional_padding}, {(b + 1) * notional_padding}); fix notional_padding"
                )
        offsets = notional_padding * torch.arange(batch + 1, device=k.seqstart.device, dtype=k.seqstart.dtype)
        new_starts = k.seqstart - offsets
        new_starts[batch:].fill_(-1)  # the paged convention's trailing -1
        k_seqinfo = _GappySeqInfo(
            seqstart=new_starts,
            max_seqlen=k.max_seqlen,
            min_seqlen=k.min_seqlen,
            seqstart_py=[*starts, -1],
            seqlen=k.seqlen + new_starts[:batch],
            seqlen_py=[s + n for s, n in zip(starts, k.seqlen_py)],
        )
        return paged_type(
            q_seqinfo=self.q_seqinfo,
            k_seqinfo=k_seqinfo,
            block_tables=block_tables,
            page_size=page_size,
            **_extra_fields(self, paged_type),
        )


@dataclass
class BlockDiagonalCausalWithOffsetGappyKeysMask(BlockDiagonalGappyKeysMask):
    """Gappy keys, bottom-right causal inside each key segment: ``j <= i + kv_seqlen[b] - q_seqlen[b]``."""

    def _create_block_mask(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _materialize_causal_mask(shape, dtype=dtype, device=device, from_bottomright=True)


@dataclass
class BlockDiagonalLocalAttentionFromBottomRightGappyKeysMask(BlockDiagonalGappyKeysMask):
    """Gappy keys with a non-causal window around each block's bottom-right diagonal:
    ``i + s_b - window_left <= j <= i + s_b + window_right``."""

    window_left: int
    window_right: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_window("window_left", self.window_left, 0)
        _check_window("window_right", self.window_right, 0)

    def _create_block_mask(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _materialize_local_mask(shape, self.window_left, self.window_right, dtype, device)

    @classmethod
    def from_seqlens_local_gappy(
        cls,
        q_seqlen: Sequence[int],
        kv_seqstarts: Sequence[int],
        kv_seqlen: Sequence[int],
        window_left: int,
        window_right: int,
        device: str | torch.device | None = None,
    ) -> BlockDiagonalLocalAttentionFromBottomRightGappyKeysMask:
        base = BlockDiagonalGappyKeysMask.from_seqlens(q_seqlen, kv_seqstarts, kv_seqlen, device=device)
        return cls(
            q_seqinfo=base.q_seqinfo, k_seqinfo=base.k_seqinfo, window_left=window_left, window_right=window_right
        )


# The paged classes live in attn_bias_paged (they need the unpaged ones above).
from triformers.ops.fmha.attn_bias_paged import (  # noqa: E402
    PagedBlockDiagonalCausalLocalPaddedKeysMask,
    PagedBlockDiagonalCausalWithOffsetGappyKeysMask,
    PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
    PagedBlockDiagonalGappyKeysMask,
    PagedBlockDiagonalPaddedKeysMask,
    _check_block_tables,
    _check_paged_type,
    _extra_fields,
)

#: The biases whose operators pack every sequence into one batch (isinstance: subclasses included).
VARLEN_BIASES: tuple[type, ...] = (
    BlockDiagonalMask,
    BlockDiagonalGappyKeysMask,
    BlockDiagonalPaddedKeysMask,
    PagedBlockDiagonalPaddedKeysMask,
    PagedBlockDiagonalGappyKeysMask,
)

__all__ = [
    "BlockDiagonalPaddedKeysMask",
    "BlockDiagonalCausalWithOffsetPaddedKeysMask",
    "BlockDiagonalLocalAttentionPaddedKeysMask",
    "BlockDiagonalCausalLocalAttentionPaddedKeysMask",
    "BlockDiagonalGappyKeysMask",
    "BlockDiagonalCausalWithOffsetGappyKeysMask",
    "BlockDiagonalLocalAttentionFromBottomRightGappyKeysMask",
    "PagedBlockDiagonalPaddedKeysMask",
    "PagedBlockDiagonalCausalWithOffsetPaddedKeysMask",
    "PagedBlockDiagonalCausalLocalPaddedKeysMask",
    "PagedBlockDiagonalGappyKeysMask",
    "PagedBlockDiagonalCausalWithOffsetGappyKeysMask",
    "VARLEN_BIASES",
]
