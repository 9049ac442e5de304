"""The sequence descriptors of the KV-cache biases (``attn_bias_kv``): keys padded to a fixed stride per sequence,
and keys starting anywhere (gappy), with the checks their constructors share."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from triformers.ops.fmha._attn_bias_base import (
    _as_int_list,
    _default_device,
    _int_tensor,
    _SeqLenInfo,
)


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
