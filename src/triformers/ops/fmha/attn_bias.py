"""Attention biases: structured masks that operators apply without materializing them.

Notation: query row ``i`` in ``[0, Mq)``, key column ``j`` in ``[0, Mkv)``; an allowed pair adds 0 to the
attention score, a masked one adds -inf. ``s = Mkv - Mq`` is the bottom-right shift (``s_b = nk_b - nq_b``
per block). All bounds are inclusive.

======================================================  ===================================================
class                                                   allowed (i, j)
======================================================  ===================================================
LowerTriangularMask                                     j <= i                       (causal, top-left)
LowerTriangularMaskWithTensorBias                       j <= i, plus an additive tensor
LowerTriangularFromBottomRightMask                      j <= i + s
LowerTriangularFromBottomRightLocalAttentionMask        i + s - w + 1 <= j <= i + s  (w keys, diagonal included)
LocalAttentionFromBottomRightMask                       i + s - wl <= j <= i + s + wr (not causal)
BlockDiagonalMask                                       same block only
BlockDiagonalCausalMask                                 same block, j <= i within it
BlockDiagonalCausalFromBottomRightMask                  same block, j <= i + s_b
BlockDiagonalCausalLocalAttentionMask                   same block, i - w + 1 <= j <= i
BlockDiagonalCausalLocalAttentionFromBottomRightMask    same block, i + s_b - w + 1 <= j <= i + s_b
BlockDiagonalPaddedKeysMask                             same block, key in use (j < kv_seqlen[b])
BlockDiagonalCausalWithOffsetPaddedKeysMask             padded, j <= i + s_b           (the KV-cache mask)
BlockDiagonalLocalAttentionPaddedKeysMask               padded, i + s_b - wl <= j <= i + s_b + wr
BlockDiagonalCausalLocalAttentionPaddedKeysMask         padded, i + s_b - w + 1 <= j <= i + s_b
BlockDiagonalGappyKeysMask                              same block; block b's keys anywhere on the key axis
BlockDiagonalCausalWithOffsetGappyKeysMask              gappy, j <= i + s_b
BlockDiagonalLocalAttentionFromBottomRightGappyKeysMask  gappy, i + s_b - wl <= j <= i + s_b + wr
PagedBlockDiagonal...KeysMask (5 classes)               its ``_UNPAGED_TYPE``'s rule, keys read through pages
BlockSparseMask                                         layout[h, i // bq, j // bk] == 1 (and j <= i if causal)
======================================================  ===================================================

Block-diagonal biases describe packed sequences (batch size 1, sequences concatenated along M); indices
inside a block are local to it. Key layouts of the KV-cache biases (``attn_bias_kv``): *padded*, block
``b``'s keys are rows ``[b * padding, b * padding + kv_seqlen[b])``; *gappy*, rows ``[kv_seqstarts[b],
kv_seqstarts[b] + kv_seqlen[b])`` anywhere (in any order, overlapping allowed); *paged*, logical key ``t`` of
row ``b`` is physical row ``block_tables[b, t // page_size] * page_size + t % page_size``.

Sequence lengths live twice: Python lists (``seqstart_py``, ``seqlen_py``: host-side checks and
``materialize``) and int32 tensors (``seqstart``, ``seqlen``) on the bias's device, which is what the
operators apply; ``from_seqlens_inplace``/``from_seqlens_padded_inplace`` overwrite both in place, so that a
captured CUDA graph replays with the new lengths. ``from_seqlens(..., device=None)`` puts the tensors on the
GPU when there is one (xFormers' default), ``to(device)`` returns a copy elsewhere. This module is pure
PyTorch and holds no kernel code: ``materialize`` exists for debugging and tests.

Every class above is importable from here. ``AttentionBias`` and ``_SeqLenInfo`` are defined in
``_attn_bias_base``, the block-diagonal family in ``_attn_bias_blockdiag``, the KV-cache biases in
``attn_bias_kv`` and ``attn_bias_paged``; those modules build on each other without importing this one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from triformers.ops.fmha._attn_bias_base import (  # noqa: F401  (xFormers' attn_bias.<name>, private ones too)
    AttentionBias,
    _as_int_list,
    _check_window,
    _cumulative,
    _default_device,
    _int_tensor,
    _materialize_blocks,
    _materialize_causal_mask,
    _materialize_local_mask,
    _moved,
    _same_device,
    _SeqLenInfo,
)
from triformers.ops.fmha._attn_bias_blockdiag import (
    BlockDiagonalCausalFromBottomRightMask,
    BlockDiagonalCausalLocalAttentionFromBottomRightMask,
    BlockDiagonalCausalLocalAttentionMask,
    BlockDiagonalCausalMask,
    BlockDiagonalMask,
)
from triformers.ops.fmha.attn_bias_kv import (
    BlockDiagonalCausalLocalAttentionPaddedKeysMask,
    BlockDiagonalCausalWithOffsetGappyKeysMask,
    BlockDiagonalCausalWithOffsetPaddedKeysMask,
    BlockDiagonalGappyKeysMask,
    BlockDiagonalLocalAttentionFromBottomRightGappyKeysMask,
    BlockDiagonalLocalAttentionPaddedKeysMask,
    BlockDiagonalPaddedKeysMask,
    _GappySeqInfo,  # noqa: F401  (xFormers' attn_bias._GappySeqInfo)
    _PaddedSeqLenInfo,  # noqa: F401
)
from triformers.ops.fmha.attn_bias_paged import (
    PagedBlockDiagonalCausalLocalPaddedKeysMask,
    PagedBlockDiagonalCausalWithOffsetGappyKeysMask,
    PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
    PagedBlockDiagonalGappyKeysMask,
    PagedBlockDiagonalPaddedKeysMask,
)

__all__ = [
    "AttentionBias",
    "LowerTriangularMask",
    "LowerTriangularMaskWithTensorBias",
    "LowerTriangularFromBottomRightMask",
    "LowerTriangularFromBottomRightLocalAttentionMask",
    "LocalAttentionFromBottomRightMask",
    "BlockDiagonalMask",
    "BlockDiagonalCausalMask",
    "BlockDiagonalCausalFromBottomRightMask",
    "BlockDiagonalCausalLocalAttentionMask",
    "BlockDiagonalCausalLocalAttentionFromBottomRightMask",
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
    "BlockSparseMask",
    "VARLEN_BIASES",
]


class LowerTriangularMask(AttentionBias):
    """Causal mask, top-left aligned: query ``i`` attends keys ``j <= i``.

    Constructor arguments (xFormers' ``device=None``) are accepted and ignored, for compatibility.
    """

    def __init__(self, *tensor_args: Any, **tensor_kwargs: Any) -> None:
        super().__init__()

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _materialize_causal_mask(shape, dtype=dtype, device=device)

    def add_bias(self, bias: torch.Tensor) -> LowerTriangularMaskWithTensorBias:
        """Returns this causal mask combined with an additive tensor ``bias`` ``[B, H, Mq, Mkv]``."""
        return LowerTriangularMaskWithTensorBias(bias)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LowerTriangularMaskWithTensorBias(LowerTriangularMask):
    """Causal mask (top-left) plus an additive tensor bias ``[B, H, Mq, Mkv]`` (broadcast views accepted)."""

    def __init__(self, bias: torch.Tensor) -> None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor, got {type(bias).__name__}")
        self._bias = bias

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return super().materialize(shape, dtype=dtype, device=device) + self._bias.to(dtype=dtype, device=device)

    def to(self, device: str | torch.device) -> LowerTriangularMaskWithTensorBias:
        moved = _moved(self._bias, torch.device(device), {})
        return self if moved is self._bias else LowerTriangularMaskWithTensorBias(moved)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bias of shape {tuple(self._bias.shape)})"


class LowerTriangularFromBottomRightMask(AttentionBias):
    """Causal mask aligned to the bottom-right corner: query ``i`` attends keys ``j <= i + Mkv - Mq``.

    With more keys than queries (a KV cache), the last query sees every key. Rows whose allowed range is
    empty (more queries than keys) produce an output of 0.
    """

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _materialize_causal_mask(shape, dtype=dtype, device=device, from_bottomright=True)

    def make_local_attention(self, window_size: int) -> LowerTriangularFromBottomRightLocalAttentionMask:
        """Returns the same mask limited to the last ``window_size`` keys (diagonal included)."""
        return LowerTriangularFromBottomRightLocalAttentionMask(window_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"



@dataclass
class LowerTriangularFromBottomRightLocalAttentionMask(LowerTriangularFromBottomRightMask):
    """Bottom-right causal mask with a sliding window: ``i + s - w + 1 <= j <= i + s`` (``s = Mkv - Mq``),
    i.e. each query sees ``w = window_size`` keys, its diagonal key included."""

    _window_size: int

    def __post_init__(self) -> None:
        _check_window("window_size", self._window_size, 1)

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _materialize_causal_mask(
            shape, dtype=dtype, device=device, window_size=self._window_size, from_bottomright=True
        )


@dataclass
class LocalAttentionFromBottomRightMask(AttentionBias):
    """Non-causal local window aligned to the bottom-right: ``i + s - wl <= j <= i + s + wr``.

    The window spans ``window_left + 1 + window_right`` keys.
    """

    window_left: int
    window_right: int

    def __post_init__(self) -> None:
        _check_window("window_left", self.window_left, 0)
        _check_window("window_right", self.window_right, 0)

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _materialize_local_mask(shape, self.window_left, self.window_right, dtype, device)


# --------------------------------------------------------------------------------------------------
# Block-sparse layouts
# --------------------------------------------------------------------------------------------------

#: Smallest side of a block of :class:`BlockSparseMask`: the smallest tile of the attention kernels (a
#: ``tl.dot`` operand has at least 16 rows), so that a block is never finer than the work it saves.
MIN_SPARSE_BLOCK = 16


def _sparse_block_sizes(block_size: Any) -> tuple[int, int]:
    sizes = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(sizes) != 2 or any(isinstance(b, bool) or not isinstance(b, int) for b in sizes):
        raise ValueError(f"BlockSparseMask: block_size={block_size!r} must be an int or a pair (bq, bk) of ints")
    if min(sizes) < MIN_SPARSE_BLOCK:
        raise ValueError(
            f"BlockSparseMask: block_size={block_size!r}; blocks must be at least {MIN_SPARSE_BLOCK} queries and "
            f"{MIN_SPARSE_BLOCK} keys: build the layout for larger blocks"
        )
    return sizes


@dataclass(eq=False)
class BlockSparseMask(AttentionBias):
    """Block-sparse mask: query ``i`` attends key ``j`` of head ``h`` when ``layout[h, i // bq, j // bk]`` is 1
    (and ``j <= i`` when ``causal``, top-left), like flex attention's ``BlockMask`` over a fixed layout.

    Operators skip the blocks the layout hides, forward and backward, and apply no mask inside the blocks it
    allows entirely; the blocks need not match the kernels' tiles. A query that sees no key gets output 0.

    Args:
        layout: 0/1 tensor (bool or integer) ``[H or 1, ceil(Mq / bq), ceil(Mkv / bk)]``: one layout per head,
            or one shared by all heads (BMGHK heads are numbered ``g * Hg + h``). The last block row or column
            may be partial: ``Mq`` and ``Mkv`` need not be multiples of the blocks.
        block_size: ``bq = bk = block_size``, or ``(bq, bk)``: any sizes >= 16 (default 128).
        causal: also mask the keys after the query (``j <= i``) inside the allowed blocks (default False).

    Raises:
        ValueError: a layout that is not a 3-D tensor of 0/1 (bool or integer), or a block below 16.
            ``memory_efficient_attention`` also checks the layout against the inputs (:meth:`check_inputs`).
    """

    layout: torch.Tensor
    block_size: int | tuple[int, int] = 128
    causal: bool = False

    def __post_init__(self) -> None:
        layout = self.layout
        if not isinstance(layout, torch.Tensor) or layout.ndim != 3:
            got = f"shape={tuple(layout.shape)}" if isinstance(layout, torch.Tensor) else type(layout).__name__
            raise ValueError(
                f"BlockSparseMask: layout must be a 3-D tensor [H or 1, query blocks, key blocks], got {got}; "
                "a layout shared by every head is layout[None]"
            )
        if layout.is_floating_point() or layout.is_complex():
            raise ValueError(
                f"BlockSparseMask: layout.dtype={layout.dtype}; pass a bool or integer 0/1 tensor "
                "(layout.bool() if its values are 0 and 1)"
            )
        if layout.dtype != torch.bool and bool(((layout != 0) & (layout != 1)).any()):
            found = sorted(layout.unique().tolist())[:8]
            raise ValueError(
                f"BlockSparseMask: layout holds values other than 0 and 1 (found {found}); pass layout != 0 for "
                "'attended where non-zero'"
            )
        self.block_q, self.block_k = _sparse_block_sizes(self.block_size)
        if not isinstance(self.causal, bool):
            raise ValueError(f"BlockSparseMask: causal={self.causal!r} must be a bool")
        self.layout = layout.to(torch.bool).contiguous()

    def check_inputs(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """Raises ValueError unless the layout fits BMHK/BMGHK ``query`` and ``key``: same device, 1 or
        ``H`` heads, ``ceil(Mq / bq)`` query blocks and ``ceil(Mkv / bk)`` key blocks."""
        layout, heads = self.layout, math.prod(query.shape[2:-1])
        if layout.device != query.device:
            raise ValueError(
                f"BlockSparseMask.layout is on {layout.device} but query is on {query.device}; move the bias with "
                "attn_bias.to(query.device)"
            )
        if layout.shape[0] not in (1, heads):
            raise ValueError(
                f"BlockSparseMask.layout has {layout.shape[0]} heads but the inputs have {heads} "
                f"(query.shape={tuple(query.shape)}); pass a layout of {heads} heads, or of 1 shared by all"
            )
        Mq, Mkv = query.shape[1], key.shape[1]
        want = (-(-Mq // self.block_q), -(-Mkv // self.block_k))
        if tuple(layout.shape[1:]) != want:
            raise ValueError(
                f"BlockSparseMask.layout.shape={tuple(layout.shape)} does not fit the inputs: {Mq} queries in "
                f"blocks of {self.block_q} and {Mkv} keys in blocks of {self.block_k} need [H or 1, {want[0]}, "
                f"{want[1]}] (query.shape={tuple(query.shape)}, key.shape={tuple(key.shape)}); build the layout "
                "for these lengths or pass the matching block_size"
            )

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """The mask as a tensor of ``shape`` ``[..., heads..., Mq, Mkv]``; a per-head layout covers the
        dims between the batch and ``Mq`` (``[B, H, ...]`` or ``[B, G, Hg, ...]``)."""
        Mq, Mkv = shape[-2:]
        heads = tuple(shape[1:-2])
        H, nq, nk = self.layout.shape
        if (nq, nk) != (-(-Mq // self.block_q), -(-Mkv // self.block_k)) or H not in (1, math.prod(heads)):
            raise ValueError(
                f"BlockSparseMask.layout.shape={(H, nq, nk)} does not fit shape={tuple(shape)} with blocks "
                f"({self.block_q}, {self.block_k})"
            )
        i = torch.arange(Mq, device=device)
        j = torch.arange(Mkv, device=device)
        allowed = self.layout.to(device)[:, i // self.block_q][:, :, j // self.block_k]  # [H, Mq, Mkv]
        if self.causal:
            allowed = allowed & (j[None, :] <= i[:, None])
        allowed = allowed.view(*heads, Mq, Mkv) if H > 1 else allowed[0]
        create_as = dtype if dtype is not torch.bfloat16 else torch.float32
        bias = torch.zeros(allowed.shape, dtype=create_as, device=device).masked_fill_(~allowed, -math.inf)
        return bias.to(dtype).expand(tuple(shape)).contiguous()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layout of shape {tuple(self.layout.shape)}, block_size=({self.block_q}, "
            f"{self.block_k}), causal={self.causal})"
        )


#: The biases whose operators pack every sequence into one batch (isinstance: subclasses included).
VARLEN_BIASES: tuple[type, ...] = (
    BlockDiagonalMask,
    BlockDiagonalGappyKeysMask,
    BlockDiagonalPaddedKeysMask,
    PagedBlockDiagonalPaddedKeysMask,
    PagedBlockDiagonalGappyKeysMask,
)
