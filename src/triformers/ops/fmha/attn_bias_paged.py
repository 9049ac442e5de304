"""Paged KV-cache biases: the padded and gappy masks of :mod:`attn_bias_kv` over a cache of pages (part of
:mod:`attn_bias`'s namespace).

``block_tables`` ``[B, max_num_pages]`` (int32 or int64) maps row ``b``'s logical page ``p`` to a physical page;
K/V are ``[1, num_pages * page_size, (G,) H, K]``. Logical key ``t`` of row ``b`` is physical row
``block_tables[b, t // page_size] * page_size + t % page_size``. Row ``b``'s keys are the logical range
``[0, kv_seqlen[b])`` (padded) or ``[start_b, end_b)`` (gappy: ``k_seqinfo.seqstart_py[b]`` and the end offset
``k_seqinfo.seqlen_py[b]``). Pages and rows no sequence uses may hold anything (NaN included).

Each class applies the rule of its ``_UNPAGED_TYPE`` to the logical keys. Construction checks the table
(2-D int32/int64, one row per sequence, wide enough for every row's keys, no negative page id) and keeps its
largest page id (``_max_page``): a call checks it against the cache's page count without a device sync.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from triformers.ops.fmha._attn_bias_base import AttentionBias, _check_window, _SeqLenInfo
from triformers.ops.fmha._paged_table import (  # noqa: F401  (_check_block_tables, _extra_fields: re-exported)
    _PAGED_TYPES,
    _check_block_tables,
    _check_paged_type,
    _check_rows_fit,
    _extra_fields,
    _largest_page,
)
from triformers.ops.fmha.attn_bias_kv import (
    BlockDiagonalCausalLocalAttentionPaddedKeysMask,
    BlockDiagonalCausalWithOffsetGappyKeysMask,
    BlockDiagonalCausalWithOffsetPaddedKeysMask,
    BlockDiagonalGappyKeysMask,
    BlockDiagonalPaddedKeysMask,
    _check_block_count,
    _GappySeqInfo,
    _PaddedSeqLenInfo,
    _seqinfos,
)


class _Paged(AttentionBias):
    """What the paged classes share: validation, the stored largest page id, ``materialize``."""

    _UNPAGED_TYPE: ClassVar[type]

    def _row_bounds(self) -> tuple[list[int], list[int]]:
        """Logical ``(starts, ends)`` of each row's keys."""
        raise NotImplementedError

    def _unpaged_k_seqinfo(self, row_len: int):
        """The keys as the unpaged type's descriptor over ``B`` rows of ``row_len`` logical keys."""
        raise NotImplementedError

    def __post_init__(self) -> None:
        _check_block_count(self)
        starts, ends = self._row_bounds()
        _check_block_tables(self.block_tables, self.page_size, len(ends))
        _check_rows_fit(self.block_tables, self.page_size, ends)
        self._max_page = _largest_page(self.block_tables)

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """The bias over ``shape[-1]`` physical key rows (at least ``(largest page id + 1) * page_size``).

        Unlike xFormers (which takes the logical key count and returns ``(largest page id + 1) * page_size``
        columns), the result has exactly ``shape``, matching the key tensor the operators see. A page mapped
        twice within one row is shown once (a dense mask cannot hold a key twice).
        """
        ps, row_len = self.page_size, self.block_tables.shape[1] * self.page_size
        if shape[-1] < (self._max_page + 1) * ps:
            raise ValueError(
                f"k shapes wrong: shape[-1]={shape[-1]} physical keys, but block_tables addresses page "
                f"{self._max_page}, i.e. at least {(self._max_page + 1) * ps} keys (page_size={ps})"
            )
        starts, ends = self._row_bounds()
        unpaged = self._UNPAGED_TYPE(
            q_seqinfo=self.q_seqinfo,
            k_seqinfo=self._unpaged_k_seqinfo(row_len),
            **_extra_fields(self, self._UNPAGED_TYPE),
        )
        logical = unpaged.materialize((shape[-2], len(ends) * row_len), dtype, device)
        mask = torch.full((shape[-2], shape[-1]), -math.inf, dtype=dtype, device=device)
        tables = self.block_tables.tolist()
        for b, (q_start, q_end) in enumerate(self.q_seqinfo.intervals()):
            for page in range(starts[b] // ps, -(-ends[b] // ps)):
                phys, src = tables[b][page] * ps, b * row_len + page * ps
                mask[q_start:q_end, phys : phys + ps] = logical[q_start:q_end, src : src + ps]
        for _ in range(len(shape) - 2):
            mask = mask.unsqueeze(0)
        return mask.expand(tuple(shape))


# --------------------------------------------------------------------------------------------------
# Paged padded keys
# --------------------------------------------------------------------------------------------------


@dataclass
class PagedBlockDiagonalPaddedKeysMask(_Paged):
    """:class:`BlockDiagonalPaddedKeysMask` over a paged cache: row ``b``'s logical keys ``[0,
    kv_seqlen[b])`` through ``block_tables[b]``. ``k_seqinfo.padding`` is ``max_num_pages * page_size``."""

    q_seqinfo: _SeqLenInfo
    k_seqinfo: _PaddedSeqLenInfo
    block_tables: torch.Tensor
    page_size: int

    _UNPAGED_TYPE: ClassVar[type] = BlockDiagonalPaddedKeysMask

    def _row_bounds(self):
        return [0] * len(self.k_seqinfo.seqlen_py), list(self.k_seqinfo.seqlen_py)

    def _unpaged_k_seqinfo(self, row_len: int):
        return _PaddedSeqLenInfo.from_seqlens_padded(list(self.k_seqinfo.seqlen_py), row_len, device="cpu")

    @classmethod
    def from_seqlens(
        cls,
        q_seqlen: Sequence[int],
        kv_seqlen: Sequence[int],
        block_tables: torch.Tensor,
        page_size: int,
        *,
        device: str | torch.device | None = None,
    ) -> PagedBlockDiagonalPaddedKeysMask:
        """``block_tables`` ``[B, max_num_pages]``; tensors on ``device`` (default: CUDA when available, else
        the CPU); the table itself is kept as given."""
        return cls._build(q_seqlen, kv_seqlen, block_tables, page_size, device)

    @classmethod
    def _build(cls, q_seqlen, kv_seqlen, block_tables, page_size, device, **extra):
        q_seqinfo, kv_list = _seqinfos(q_seqlen, kv_seqlen, device)
        _check_block_tables(block_tables, page_size, len(kv_list))
        _check_rows_fit(block_tables, page_size, kv_list)
        k_seqinfo = _PaddedSeqLenInfo.from_seqlens_padded(
            kv_list, block_tables.shape[1] * page_size, device=q_seqinfo.seqstart.device
        )
        return cls(q_seqinfo=q_seqinfo, k_seqinfo=k_seqinfo, block_tables=block_tables, page_size=page_size, **extra)


@dataclass
class PagedBlockDiagonalCausalWithOffsetPaddedKeysMask(PagedBlockDiagonalPaddedKeysMask):
    """:class:`BlockDiagonalCausalWithOffsetPaddedKeysMask` over a paged cache (the paged KV-cache mask)."""

    _UNPAGED_TYPE: ClassVar[type] = BlockDiagonalCausalWithOffsetPaddedKeysMask


@dataclass
class PagedBlockDiagonalCausalLocalPaddedKeysMask(PagedBlockDiagonalPaddedKeysMask):
    """:class:`BlockDiagonalCausalLocalAttentionPaddedKeysMask` over a paged cache."""

    _window_size: int

    _UNPAGED_TYPE: ClassVar[type] = BlockDiagonalCausalLocalAttentionPaddedKeysMask

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_window("window_size", self._window_size, 1)

    @classmethod
    def from_seqlens_local(
        cls,
        q_seqlen: Sequence[int],
        kv_seqlen: Sequence[int],
        block_tables: torch.Tensor,
        page_size: int,
        window_size: int,
        *,
        device: str | torch.device | None = None,
    ) -> PagedBlockDiagonalCausalLocalPaddedKeysMask:
        return cls._build(q_seqlen, kv_seqlen, block_tables, page_size, device, _window_size=window_size)


# --------------------------------------------------------------------------------------------------
# Paged gappy keys
# --------------------------------------------------------------------------------------------------


@dataclass
class PagedBlockDiagonalGappyKeysMask(_Paged):
    """:class:`BlockDiagonalGappyKeysMask` over a paged cache: row ``b``'s logical keys ``[start_b, end_b)``
    with ``start_b = k_seqinfo.seqstart_py[b]`` and ``end_b = k_seqinfo.seqlen_py[b]`` (paged semantics of
    ``_GappySeqInfo``)."""

    q_seqinfo: _SeqLenInfo
    k_seqinfo: _GappySeqInfo
    block_tables: torch.Tensor
    page_size: int

    _UNPAGED_TYPE: ClassVar[type] = BlockDiagonalGappyKeysMask

    def __post_init__(self) -> None:
        k = self.k_seqinfo
        if k.seqstart_py[-1] != -1 or any(s < 0 or e < s for s, e in zip(k.seqstart_py, k.seqlen_py)):
            raise ValueError(
                f"k_seqinfo (seqstart_py={k.seqstart_py}, seqlen_py={k.seqlen_py}) does not hold the paged "
                "semantics (row-local starts >= 0 and a trailing -1, end offsets); build it with "
                "_GappySeqInfo.from_seqlens_gappy(..., paged=True) or BlockDiagonalGappyKeysMask.make_paged"
            )
        super().__post_init__()

    def _row_bounds(self):
        n = len(self.k_seqinfo.seqlen_py)
        return list(self.k_seqinfo.seqstart_py[:n]), list(self.k_seqinfo.seqlen_py)

    def _unpaged_k_seqinfo(self, row_len: int):
        starts, ends = self._row_bounds()
        return _GappySeqInfo.from_seqlens_gappy(
            [s + b * row_len for b, s in enumerate(starts)] + [len(ends) * row_len],
            [e - s for s, e in zip(starts, ends)],
            False,
            device="cpu",
        )

    @classmethod
    def from_seqlens(
        cls,
        q_seqlen: Sequence[int],
        kv_seqstarts: Sequence[int],
        kv_seqlen: Sequence[int],
        block_tables: torch.Tensor,
        page_size: int,
        *,
        device: str | torch.device | None = None,
    ) -> PagedBlockDiagonalGappyKeysMask:
        """``kv_seqstarts``: one offset per row, inside that row's logical keys (to skip the first key of each
        of two rows: ``[1, 1]``, where the unpaged gappy mask with padding 100 takes ``[1, 101, 200]``).
        Tensors on ``device`` (default: ``block_tables``'s device)."""
        device = block_tables.device if device is None and isinstance(block_tables, torch.Tensor) else device
        q_seqinfo, kv_list = _seqinfos(q_seqlen, kv_seqlen, device)
        k_seqinfo = _GappySeqInfo.from_seqlens_gappy(kv_seqstarts, kv_list, True, device=q_seqinfo.seqstart.device)
        return cls(q_seqinfo=q_seqinfo, k_seqinfo=k_seqinfo, block_tables=block_tables, page_size=page_size)


@dataclass
class PagedBlockDiagonalCausalWithOffsetGappyKeysMask(PagedBlockDiagonalGappyKeysMask):
    """:class:`BlockDiagonalCausalWithOffsetGappyKeysMask` over a paged cache."""

    _UNPAGED_TYPE: ClassVar[type] = BlockDiagonalCausalWithOffsetGappyKeysMask


_PAGED_TYPES.extend((
    PagedBlockDiagonalPaddedKeysMask,
    PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
    PagedBlockDiagonalCausalLocalPaddedKeysMask,
    PagedBlockDiagonalGappyKeysMask,
    PagedBlockDiagonalCausalWithOffsetGappyKeysMask,
))
