"""The block-diagonal biases (packed sequences, :mod:`attn_bias` has the table): ``BlockDiagonalMask`` and its
causal and local variants.

Private: :mod:`attn_bias` re-exports these classes, and the KV-cache biases (``attn_bias_kv``) build on
``BlockDiagonalMask`` without importing :mod:`attn_bias`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from triformers.ops.fmha._attn_bias_base import (
    AttentionBias,
    _as_int_list,
    _check_window,
    _materialize_blocks,
    _materialize_causal_mask,
    _SeqLenInfo,
)

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

