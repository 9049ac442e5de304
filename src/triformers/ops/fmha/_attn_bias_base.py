"""The base of every attention bias (:mod:`attn_bias` has the table of classes): ``AttentionBias``, the
device helpers, the dense materializers, and the sequence descriptor of packed batches (``_SeqLenInfo``).

Private: :mod:`attn_bias` re-exports these names, and the block-diagonal, KV-cache and paged biases build on
them without importing :mod:`attn_bias`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

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


def _check_window(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Expected `{name}` to be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        comparison = "> 0" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"Expected `{name} {comparison}`, but {name}={value}")



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

