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
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

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


# --------------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------------


def _default_device(device: str | torch.device | None = None) -> torch.device:
    """Where ``from_seqlens`` puts a bias's tensors: ``device``, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _int_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int32 tensor on ``device`` (to a GPU through pinned memory, without waiting)."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=torch.int32)
    pinned = torch.tensor(values, dtype=torch.int32, pin_memory=device.type == "cuda")
    return pinned.to(device, non_blocking=True)


def _same_device(have: torch.device, want: torch.device) -> bool:
    return have.type == want.type and (want.index is None or have.index == want.index)


def _moved(obj: Any, device: torch.device, memo: dict) -> Any:
    """``obj`` (a tensor, or a dataclass holding tensors and such dataclasses) with every tensor on ``device``:
    a copy where something moved (validated already, not again; without the operators' per-object caches),
    ``obj`` itself otherwise; objects shared inside ``obj`` stay shared (``memo``)."""
    if id(obj) in memo:
        return memo[id(obj)]
    out = obj
    if isinstance(obj, torch.Tensor):
        if not _same_device(obj.device, device):
            out = obj.to(device, non_blocking=device.type != "cpu")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, torch.Tensor) or dataclasses.is_dataclass(value):
                new = _moved(value, device, memo)
                if new is not value:
                    changes[f.name] = new
        if changes:
            out = copy.copy(obj)
            for name in [n for n in vars(out) if n.startswith("_triformers_")]:
                delattr(out, name)
            for name, value in changes.items():
                object.__setattr__(out, name, value)
    memo[id(obj)] = out
    return out


class AttentionBias:
    """Base class for a structured bias added to ``Q @ K^T`` before the softmax.

    Passing one as ``attn_bias`` to :func:`triformers.ops.memory_efficient_attention` lets operators apply
    the mask from its parameters (and skip the tiles it hides) instead of reading a ``[Mq, Mkv]`` tensor.
    """

    def materialize(
        self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """Returns the bias as a dense tensor of ``shape`` (``[..., Mq, Mkv]``): 0 where allowed, -inf
        where masked. For debugging and tests."""
        raise NotImplementedError()

    def to(self, device: str | torch.device) -> AttentionBias:
        """The bias with its tensors on ``device``: a new object, or ``self`` when nothing has to move."""
        return _moved(self, torch.device(device), {})


def _materialize_causal_mask(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    window_size: int | None = None,
    from_bottomright: bool = False,
) -> torch.Tensor:
    create_as = dtype if dtype is not torch.bfloat16 else torch.float32
    ones = torch.ones(tuple(shape), dtype=create_as, device=device)
    num_queries, num_keys = shape[-2:]
    shift = num_keys - num_queries if from_bottomright else 0
    mask = torch.tril(ones, diagonal=shift)
    if window_size is not None:
        mask = torch.triu(mask, diagonal=shift - window_size + 1)
    return torch.log(mask).to(dtype)


def _materialize_local_mask(
    shape: Sequence[int], window_left: int, window_right: int, dtype: torch.dtype, device: str | torch.device
) -> torch.Tensor:
    """Bottom-right local window ``i + s - window_left <= j <= i + s + window_right`` as a -inf/0 tensor."""
    create_as = dtype if dtype is not torch.bfloat16 else torch.float32
    ones = torch.ones(tuple(shape), dtype=create_as, device=device)
    num_queries, num_keys = shape[-2:]
    shift = num_keys - num_queries
    mask = torch.tril(ones, diagonal=shift + window_right)
    mask = torch.triu(mask, diagonal=shift - window_left)
    return torch.log(mask).to(dtype)


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


def _check_window(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Expected `{name}` to be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        comparison = "> 0" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"Expected `{name} {comparison}`, but {name}={value}")


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
# Sequence-length bookkeeping for packed (block-diagonal) batches
# --------------------------------------------------------------------------------------------------


def _as_int_list(name: str, seqlens: Iterable[int] | torch.Tensor) -> list[int]:
    if isinstance(seqlens, torch.Tensor):
        if seqlens.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got a tensor of shape {tuple(seqlens.shape)}")
        seqlens = seqlens.tolist()
    values = list(seqlens)
    for x in values:
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"{name} must hold non-negative ints, got {values}")
    return values


def _cumulative(lengths: Sequence[int]) -> list[int]:
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    return starts


@dataclass
class _SeqLenInfo:
    """Start offsets of sequences concatenated along M: ``from_seqlens([2, 3, 2])`` has
    ``seqstart_py == [0, 2, 5, 7]``, ``seqstart`` the same as an int32 tensor, ``max_seqlen == 3``,
    ``min_seqlen == 2``."""

    seqstart: torch.Tensor
    max_seqlen: int
    min_seqlen: int
    seqstart_py: list[int]

    def to(self, device: str | torch.device) -> _SeqLenInfo:
        """The same lengths with the tensors on ``device`` (a new object; ``self`` if already there)."""
        return _moved(self, torch.device(device), {})

    def intervals(self) -> Iterable[tuple[int, int]]:
        yield from zip(self.seqstart_py, self.seqstart_py[1:])

    @classmethod
    def from_seqlens(cls, seqlens: Iterable[int], *, device: str | torch.device | None = None) -> _SeqLenInfo:
        """``[2, 3, 2]`` gives ``seqstart_py == [0, 2, 5, 7]``; tensors on ``device`` (default: CUDA when
        available, else the CPU)."""
        lengths = _as_int_list("seqlens", seqlens)
        seqstart_py = _cumulative(lengths)
        return cls(
            seqstart=_int_tensor(seqstart_py, _default_device(device)),
            max_seqlen=max(lengths, default=0),
            min_seqlen=min(lengths, default=0),
            seqstart_py=seqstart_py,
        )

    def from_seqlens_inplace(self, seqlens: Iterable[int]) -> None:
        """Overwrites the lengths in place (for CUDA graphs): same number of sequences, none longer than
        ``max_seqlen``. ``seqstart`` keeps its storage; ``max_seqlen``/``min_seqlen`` keep their values (the
        bounds kernels were sized for)."""
        lengths = _as_int_list("seqlens", seqlens)
        if len(lengths) + 1 != len(self.seqstart_py):
            raise ValueError(
                f"from_seqlens_inplace needs {len(self.seqstart_py) - 1} lengths (one per sequence), got "
                f"{len(lengths)}: {lengths}; build a new bias to change the number of sequences"
            )
        if max(lengths, default=0) > self.max_seqlen:
            raise ValueError(
                f"from_seqlens_inplace: seqlens={lengths} exceed max_seqlen={self.max_seqlen}, the bound this "
                "bias was built with; build a new bias (from_seqlens) for longer sequences"
            )
        self.seqstart_py[:] = _cumulative(lengths)
        self.seqstart.copy_(torch.tensor(self.seqstart_py, dtype=self.seqstart.dtype), non_blocking=True)

    def split(self, x: torch.Tensor, batch_sizes: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Splits ``x`` ``[1, total, *]`` into the sequences, grouped ``[batch_size_i, M_i, *]``."""
        if x.ndim < 2 or x.shape[0] != 1 or x.shape[1] != self.seqstart_py[-1]:
            raise ValueError(
                f"Expected a tensor of shape [1, {self.seqstart_py[-1]}, ...] (the packed sequences), "
                f"got x.shape={tuple(x.shape)}"
            )
        if batch_sizes is None:
            batch_sizes = [1] * (len(self.seqstart_py) - 1)
        split_chunks, it = [], 0
        for batch_size in batch_sizes:
            split_chunks.append(self.seqstart_py[it + batch_size] - self.seqstart_py[it])
            it += batch_size
        return [
            chunk.reshape([batch_sizes[i], -1, *chunk.shape[2:]])
            for i, chunk in enumerate(x.split(split_chunks, dim=1))
        ]


def _materialize_blocks(bias, shape, dtype, device) -> torch.Tensor:
    """-inf everywhere but block ``b``'s rectangle ``q_seqinfo.intervals()[b] x k_seqinfo.intervals()[b]``,
    which holds ``bias._create_block_mask``; expanded to ``shape``."""
    if shape[-1] != bias.k_seqinfo.seqstart_py[-1]:
        raise ValueError(f"k shapes wrong: shape[-1]={shape[-1]}, the keys total {bias.k_seqinfo.seqstart_py[-1]}")
    if shape[-2] != bias.q_seqinfo.seqstart_py[-1]:
        raise ValueError(f"q shapes wrong: shape[-2]={shape[-2]}, the queries total {bias.q_seqinfo.seqstart_py[-1]}")
    mask = torch.full(tuple(shape[-2:]), -math.inf, dtype=dtype, device=device)
    for (q_start, q_end), (k_start, k_end) in zip(bias.q_seqinfo.intervals(), bias.k_seqinfo.intervals()):
        mask[q_start:q_end, k_start:k_end] = bias._create_block_mask(
            (q_end - q_start, k_end - k_start), dtype=dtype, device=device
        )
    for _ in range(len(shape) - 2):
        mask = mask.unsqueeze(0)
    return mask.expand(tuple(shape))


# --------------------------------------------------------------------------------------------------
# Block-diagonal family
# --------------------------------------------------------------------------------------------------


@dataclass
class BlockDiagonalMask(AttentionBias):
    """Packed sequences: queries of block ``b`` attend only keys of block ``b``.

    Queries and keys are concatenated along M (batch size 1). Build one with :meth:`from_seqlens` or
    :meth:`from_tensor_list`; :meth:`split` undoes the packing.

    Example::

        attn_bias, x = BlockDiagonalMask.from_tensor_list([x0, x1, x2])   # x_i: [B_i, M_i, H, K]
        out = memory_efficient_attention(q(x), k(x), v(x), attn_bias=attn_bias)
        out0, out1, out2 = attn_bias.split(out)
    """

    q_seqinfo: _SeqLenInfo
    k_seqinfo: _SeqLenInfo
    _batch_sizes: Sequence[int] | None = None

    def _create_block_mask(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=dtype, device=device)

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _materialize_blocks(self, shape, dtype, device)

    @classmethod
    def from_seqlens(
        cls,
        q_seqlen: Sequence[int],
        kv_seqlen: Sequence[int] | None = None,
        *,
        device: str | torch.device | None = None,
    ) -> BlockDiagonalMask:
        """Builds the mask from the query lengths (and key lengths, by default the same); tensors on
        ``device`` (default: CUDA when available, else the CPU)."""
        q_list = _as_int_list("q_seqlen", q_seqlen)
        kv_list = None if kv_seqlen is None else _as_int_list("kv_seqlen", kv_seqlen)
        if kv_list is not None and len(kv_list) != len(q_list):
            raise ValueError(
                f"q_seqlen and kv_seqlen must have one entry per block, got {len(q_list)} and {len(kv_list)}"
            )
        q_seqinfo = _SeqLenInfo.from_seqlens(q_list, device=device)
        if kv_list is None or kv_list == q_list:
            k_seqinfo = q_seqinfo
        else:
            k_seqinfo = _SeqLenInfo.from_seqlens(kv_list, device=device)
        return cls(q_seqinfo=q_seqinfo, k_seqinfo=k_seqinfo)

    @classmethod
    def from_tensor_list(cls, tensors: Sequence[torch.Tensor]) -> tuple[BlockDiagonalMask, torch.Tensor]:
        """Packs tensors ``[B_i, M_i, *]`` into ``[1, sum_i B_i * M_i, *]`` and returns the matching mask
        (its tensors on the tensors' device)."""
        batch_sizes = [tensor.shape[0] for tensor in tensors]
        seqlens = []
        for x in tensors:
            seqlens.extend([x.shape[1]] * x.shape[0])
        block_diag = cls.from_seqlens(seqlens, device=tensors[0].device if tensors else None)
        block_diag._batch_sizes = batch_sizes
        concat = torch.cat([x.reshape([1, -1, *x.shape[2:]]) for x in tensors], dim=1)
        return block_diag, concat

    @classmethod
    def from_tensor_lists_qkv(
        cls,
        tensors_q: Sequence[torch.Tensor],
        tensors_k: Sequence[torch.Tensor],
        tensors_v: Sequence[torch.Tensor] | None = None,
    ) -> tuple[BlockDiagonalMask, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Packs matching lists of queries, keys (and values), which may differ in length per entry."""
        if len(tensors_q) != len(tensors_k) or (tensors_v is not None and len(tensors_v) != len(tensors_q)):
            raise ValueError("tensors_q, tensors_k and tensors_v must have the same number of entries")
        batch_sizes = [tensor.shape[0] for tensor in tensors_q]
        q_seqlens, kv_seqlens = [], []
        for i, (q, k) in enumerate(zip(tensors_q, tensors_k)):
            if q.shape[0] != k.shape[0]:
                raise ValueError(f"entry {i}: query batch {q.shape[0]} != key batch {k.shape[0]}")
            if tensors_v is not None and tuple(tensors_v[i].shape[:2]) != tuple(k.shape[:2]):
                raise ValueError(f"entry {i}: value shape {tuple(tensors_v[i].shape)} does not match key's")
            q_seqlens.extend([q.shape[1]] * q.shape[0])
            kv_seqlens.extend([k.shape[1]] * k.shape[0])
        block_diag = cls.from_seqlens(q_seqlens, kv_seqlens, device=tensors_q[0].device if tensors_q else None)
        block_diag._batch_sizes = batch_sizes

        def pack(xs):
            return torch.cat([x.reshape([1, -1, *x.shape[2:]]) for x in xs], dim=1)

        return block_diag, pack(tensors_q), pack(tensors_k), None if tensors_v is None else pack(tensors_v)

    def split_queries(self, tensor: torch.Tensor) -> Sequence[torch.Tensor]:
        return self.q_seqinfo.split(tensor, self._batch_sizes)

    def split_kv(self, tensor: torch.Tensor) -> Sequence[torch.Tensor]:
        return self.k_seqinfo.split(tensor, self._batch_sizes)

    def split(self, tensor: torch.Tensor) -> Sequence[torch.Tensor]:
        """Inverse of :meth:`from_tensor_list`: ``[1, total, *]`` back to ``[B_i, M_i, *]`` tensors."""
        if self.q_seqinfo is not self.k_seqinfo:
            raise ValueError("split() needs identical query and key lengths: use split_queries() or split_kv()")
        return self.split_queries(tensor)

    def _derive(self, cls, **extra):
        return cls(q_seqinfo=self.q_seqinfo, k_seqinfo=self.k_seqinfo, _batch_sizes=self._batch_sizes, **extra)

    def make_causal(self) -> BlockDiagonalCausalMask:
        """Each block causal, top-left aligned."""
        return self._derive(BlockDiagonalCausalMask)

    def make_causal_from_bottomright(self) -> BlockDiagonalCausalFromBottomRightMask:
        """Each block causal, bottom-right aligned (a non-causal prefix when keys outnumber queries)."""
        return self._derive(BlockDiagonalCausalFromBottomRightMask)

    def make_local_attention(self, window_size: int) -> BlockDiagonalCausalLocalAttentionMask:
        """Each block causal (top-left) with a sliding window of ``window_size`` keys."""
        return self._derive(BlockDiagonalCausalLocalAttentionMask, _window_size=window_size)

    def make_local_attention_from_bottomright(
        self, window_size: int
    ) -> BlockDiagonalCausalLocalAttentionFromBottomRightMask:
        """Each block causal (bottom-right) with a sliding window of ``window_size`` keys."""
        return self._derive(BlockDiagonalCausalLocalAttentionFromBottomRightMask, _window_size=window_size)


@dataclass
class BlockDiagonalCausalMask(BlockDiagonalMask):
    """Block-diagonal, each block causal (top-left): local ``j <= i``."""

    def _create_block_mask(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _materialize_causal_mask(shape, dtype=dtype, device=device)


@dataclass
class BlockDiagonalCausalFromBottomRightMask(BlockDiagonalMask):
    """Block-diagonal, each block causal from the bottom-right: local ``j <= i + nk_b - nq_b``.

    Every block needs at least as many keys as queries.
    """

    def __post_init__(self) -> None:
        for i, ((q_start, q_end), (k_start, k_end)) in enumerate(
            zip(self.q_seqinfo.intervals(), self.k_seqinfo.intervals())
        ):
            num_queries, num_keys = q_end - q_start, k_end - k_start
            if num_keys < num_queries:
                raise ValueError(
                    f"Block #{i} has num_keys={num_keys} and num_queries={num_queries}. "
                    "Expected `num_keys >= num_queries`"
                )

    def _create_block_mask(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _materialize_causal_mask(shape, dtype=dtype, device=device, from_bottomright=True)


@dataclass
class BlockDiagonalCausalLocalAttentionMask(BlockDiagonalCausalMask):
    """Block-diagonal, causal (top-left) with a window: local ``i - w + 1 <= j <= i``."""

    _window_size: int = 0

    def __post_init__(self) -> None:
        _check_window("window_size", self._window_size, 1)
        for (q_start, q_end), (k_start, k_end) in zip(self.q_seqinfo.intervals(), self.k_seqinfo.intervals()):
            q_len, k_len = q_end - q_start, k_end - k_start
            if q_len - self._window_size >= k_len:
                raise RuntimeError(
                    f"No keys are attended in q_seqlen {q_len} k_seqlen {k_len} "
                    f"with sliding window {self._window_size}"
                )

    def _create_block_mask(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _materialize_causal_mask(shape, dtype=dtype, device=device, window_size=self._window_size)


@dataclass
class BlockDiagonalCausalLocalAttentionFromBottomRightMask(BlockDiagonalCausalFromBottomRightMask):
    """Block-diagonal, causal (bottom-right) with a window: local ``i + s_b - w + 1 <= j <= i + s_b``."""

    _window_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_window("window_size", self._window_size, 1)

    def _create_block_mask(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _materialize_causal_mask(
            shape, dtype=dtype, device=device, window_size=self._window_size, from_bottomright=True
        )


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


# The KV-cache biases (padded, gappy, paged) live in attn_bias_kv, which builds on the classes above; they are
# part of this module's namespace (xFormers' `attn_bias.<name>`). The package imports this module first, so
# attn_bias_kv always finds the names it imports from here.
from triformers.ops.fmha.attn_bias_kv import (  # noqa: E402
    VARLEN_BIASES,
    BlockDiagonalCausalLocalAttentionPaddedKeysMask,
    BlockDiagonalCausalWithOffsetGappyKeysMask,
    BlockDiagonalCausalWithOffsetPaddedKeysMask,
    BlockDiagonalGappyKeysMask,
    BlockDiagonalLocalAttentionFromBottomRightGappyKeysMask,
    BlockDiagonalLocalAttentionPaddedKeysMask,
    BlockDiagonalPaddedKeysMask,
    PagedBlockDiagonalCausalLocalPaddedKeysMask,
    PagedBlockDiagonalCausalWithOffsetGappyKeysMask,
    PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
    PagedBlockDiagonalGappyKeysMask,
    PagedBlockDiagonalPaddedKeysMask,
    _GappySeqInfo,  # noqa: F401  (xFormers' attn_bias._GappySeqInfo)
    _PaddedSeqLenInfo,  # noqa: F401
)
