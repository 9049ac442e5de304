"""KV-cache attention biases: padded and gappy keys, and their paged versions' key layout (part of
:mod:`attn_bias`'s namespace; the paged classes live in ``attn_bias_paged``).

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from triformers.ops.fmha._attn_bias_base import (
    AttentionBias,
    _check_window,
    _default_device,
    _materialize_blocks,
    _materialize_causal_mask,
    _materialize_local_mask,
    _SeqLenInfo,
)
from triformers.ops.fmha._kv_seqinfo import (  # noqa: F401  (re-exported)
    _check_block_count,
    _check_lengths_fit,
    _GappySeqInfo,
    _PaddedSeqLenInfo,
    _seqinfos,
)
from triformers.ops.fmha._paged_table import _check_block_tables, _check_paged_type, _extra_fields

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


__all__ = [
    "BlockDiagonalPaddedKeysMask",
    "BlockDiagonalCausalWithOffsetPaddedKeysMask",
    "BlockDiagonalLocalAttentionPaddedKeysMask",
    "BlockDiagonalCausalLocalAttentionPaddedKeysMask",
    "BlockDiagonalGappyKeysMask",
    "BlockDiagonalCausalWithOffsetGappyKeysMask",
    "BlockDiagonalLocalAttentionFromBottomRightGappyKeysMask",
]
