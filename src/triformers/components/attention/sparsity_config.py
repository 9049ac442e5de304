"""Block-sparse layouts (DeepSpeed's sparsity configs, as in xFormers' ``sparsity_config.py``).

``make_layout(seq_len)`` returns a long 0/1 tensor ``[num_heads, S/block_size, S/block_size]``; a 1 at
``[h, r, c]`` lets the queries of block r attend the keys of block c in head h. Random choices use torch's
generator, so ``torch.manual_seed`` makes layouts reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from triformers.ops.fmha.attn_bias import BlockSparseMask


def _check_attention(attention: str) -> None:
    if attention not in ("unidirectional", "bidirectional"):
        raise NotImplementedError(f"attention={attention!r}: only 'unidirectional' and 'bidirectional' are supported")


def _sample(n: int, k: int) -> torch.Tensor:
    """k distinct indices in [0, n)."""
    return torch.randperm(n)[:k]


class SparsityConfig:
    """Base layout config.

    Args:
        num_heads: number of attention heads.
        block_size: tokens per block side (default 16).
        different_layout_per_head: build one layout per head, else head 0's layout is copied (default False).
    """

    def __init__(self, num_heads: int, block_size: int = 16, different_layout_per_head: bool = False) -> None:
        if num_heads < 1 or block_size < 1:
            raise ValueError(f"num_heads and block_size must be >= 1, got {num_heads} and {block_size}")
        self.num_heads = num_heads
        self.block_size = block_size
        self.different_layout_per_head = different_layout_per_head
        self.num_layout_heads = num_heads if different_layout_per_head else 1

    def setup_layout(self, seq_len: int) -> torch.Tensor:
        """An all-zero layout for ``seq_len`` tokens.

        Raises:
            ValueError: if ``seq_len`` is not a multiple of ``block_size``.
        """
        if seq_len % self.block_size != 0:
            raise ValueError(
                f"Sequence length {seq_len} must be divisible by block_size {self.block_size}; pad the sequence"
            )
        num_blocks = seq_len // self.block_size
        return torch.zeros((self.num_heads, num_blocks, num_blocks), dtype=torch.int64)

    def check_and_propagate_first_head_layout(self, layout: torch.Tensor) -> torch.Tensor:
        if not self.different_layout_per_head:
            layout[1 : self.num_heads] = layout[0]
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        raise NotImplementedError

    def make_mask(self, seq_len: int, causal: bool = False) -> BlockSparseMask:
        """The layout of ``seq_len`` tokens as a :class:`~triformers.ops.fmha.attn_bias.BlockSparseMask` for
        ``memory_efficient_attention`` (BMHK inputs of ``num_heads`` heads; blocks of at least 16 tokens).

        Args:
            causal: also mask the keys after the query inside the attended blocks (default False).
        """
        from triformers.ops.fmha.attn_bias import BlockSparseMask  # ops imports the components: not at import

        return BlockSparseMask(self.make_layout(seq_len), self.block_size, causal=causal)


class DenseSparsityConfig(SparsityConfig):
    """Every block is attended (a dense layout, for comparisons)."""

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        layout[:] = 1
        return layout


class FixedSparsityConfig(SparsityConfig):
    """ "Generative Modeling with Sparse Transformers" fixed pattern: local windows plus global blocks.

    Args:
        num_local_blocks: blocks per local window (default 4).
        num_global_blocks: global blocks per window (default 1; must divide ``num_local_blocks``).
        attention: ``"bidirectional"`` or ``"unidirectional"`` (causal at block level).
        horizontal_global_attention: global blocks also attend everything (bidirectional only).
        num_different_global_patterns: distinct global positions across heads (needs per-head layouts).
    """

    def __init__(
        self,
        num_heads: int,
        block_size: int = 16,
        different_layout_per_head: bool = False,
        num_local_blocks: int = 4,
        num_global_blocks: int = 1,
        attention: str = "bidirectional",
        horizontal_global_attention: bool = False,
        num_different_global_patterns: int = 1,
    ) -> None:
        super().__init__(num_heads, block_size, different_layout_per_head)
        if num_local_blocks % num_global_blocks != 0:
            raise ValueError(
                f"num_local_blocks={num_local_blocks} must be divisible by num_global_blocks={num_global_blocks}"
            )
        _check_attention(attention)
        if attention != "bidirectional" and horizontal_global_attention:
            raise ValueError("horizontal_global_attention needs attention='bidirectional'")
        if num_different_global_patterns > 1 and not different_layout_per_head:
            raise ValueError("num_different_global_patterns > 1 needs different_layout_per_head=True")
        if num_different_global_patterns > num_local_blocks // num_global_blocks:
            raise ValueError(
                f"num_different_global_patterns={num_different_global_patterns} cannot exceed "
                f"num_local_blocks // num_global_blocks = {num_local_blocks // num_global_blocks}"
            )
        self.num_local_blocks = num_local_blocks
        self.num_global_blocks = num_global_blocks
        self.attention = attention
        self.horizontal_global_attention = horizontal_global_attention
        self.num_different_global_patterns = num_different_global_patterns

    def set_local_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        num_blocks = layout.shape[1]
        for i in range(0, num_blocks, self.num_local_blocks):
            end = min(i + self.num_local_blocks, num_blocks)
            for row in range(i, end):
                layout[h, row, i : (row + 1 if self.attention == "unidirectional" else end)] = 1
        return layout

    def set_global_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        num_blocks = layout.shape[1]
        first = self.num_local_blocks - (1 + h % self.num_different_global_patterns) * self.num_global_blocks
        end = num_blocks - (num_blocks % self.num_local_blocks)
        for i in range(first, end, self.num_local_blocks):
            first_row = 0 if self.attention == "bidirectional" else i
            layout[h, first_row:, i : i + self.num_global_blocks] = 1
            if self.horizontal_global_attention:
                layout[h, i : i + self.num_global_blocks, :] = 1
        if end < num_blocks:  # a short last window still gets its global blocks
            start = min(end + first, num_blocks - self.num_global_blocks)
            stop = start + self.num_global_blocks
            first_row = 0 if self.attention == "bidirectional" else start
            layout[h, first_row:, start:stop] = 1
            if self.horizontal_global_attention:
                layout[h, start:stop, :] = 1
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            layout = self.set_local_layout(h, layout)
            layout = self.set_global_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)


class VariableSparsityConfig(SparsityConfig):
    """Random blocks, variable-size local windows and global blocks.

    Args:
        num_random_blocks: random blocks per row (default 0).
        local_window_blocks: sizes of the successive local windows; the last size repeats (default [4]).
        global_block_indices: global block indices, or range starts with ``global_block_end_indices``.
        global_block_end_indices: exclusive range ends (default None: single blocks).
        attention: ``"bidirectional"`` or ``"unidirectional"``.
        horizontal_global_attention: global blocks also attend everything (bidirectional only).
    """

    def __init__(
        self,
        num_heads: int,
        block_size: int = 16,
        different_layout_per_head: bool = False,
        num_random_blocks: int = 0,
        local_window_blocks: Sequence[int] = (4,),
        global_block_indices: Sequence[int] = (0,),
        global_block_end_indices: Sequence[int] | None = None,
        attention: str = "bidirectional",
        horizontal_global_attention: bool = False,
    ) -> None:
        super().__init__(num_heads, block_size, different_layout_per_head)
        if global_block_end_indices is not None:
            if len(global_block_indices) != len(global_block_end_indices):
                raise ValueError(
                    f"global_block_indices ({len(global_block_indices)}) and global_block_end_indices "
                    f"({len(global_block_end_indices)}) must have the same length"
                )
            for start, stop in zip(global_block_indices, global_block_end_indices):
                if start >= stop:
                    raise ValueError(f"global block start {start} must be smaller than its end {stop}")
        _check_attention(attention)
        if attention != "bidirectional" and horizontal_global_attention:
            raise ValueError("horizontal_global_attention needs attention='bidirectional'")
        self.num_random_blocks = num_random_blocks
        self.local_window_blocks = list(local_window_blocks)
        self.global_block_indices = list(global_block_indices)
        self.global_block_end_indices = None if global_block_end_indices is None else list(global_block_end_indices)
        self.attention = attention
        self.horizontal_global_attention = horizontal_global_attention

    def set_random_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        num_blocks = layout.shape[1]
        if num_blocks < self.num_random_blocks:
            raise ValueError(f"num_random_blocks={self.num_random_blocks} exceeds the {num_blocks} blocks of a row")
        for row in range(num_blocks):
            layout[h, row, _sample(num_blocks, self.num_random_blocks)] = 1
        return layout

    def _local_window(self, h: int, layout: torch.Tensor, start: int, end: int) -> None:
        for row in range(start, end):
            layout[h, row, start : (row + 1 if self.attention == "unidirectional" else end)] = 1

    def set_local_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        num_blocks = layout.shape[1]
        start = 0
        for size in self.local_window_blocks:
            end = min(start + size, num_blocks)
            self._local_window(h, layout, start, end)
            start += size
        size = self.local_window_blocks[-1]
        for i in range(start, num_blocks, size):  # the last window size repeats to the end
            self._local_window(h, layout, i, min(i + size, num_blocks))
        return layout

    def set_global_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        num_blocks = layout.shape[1]
        ends = self.global_block_end_indices or [i + 1 for i in self.global_block_indices]
        for start, stop in zip(self.global_block_indices, ends):
            if start < num_blocks:
                stop = min(stop, num_blocks)
                if self.horizontal_global_attention:
                    layout[h, start:stop, :] = 1
                first_row = 0 if self.attention == "bidirectional" else start
                layout[h, first_row:, start:stop] = 1
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            layout = self.set_random_layout(h, layout)
            layout = self.set_local_layout(h, layout)
            layout = self.set_global_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)


def _sliding_window(layout: torch.Tensor, h: int, window: int) -> None:
    num_blocks = layout.shape[1]
    if num_blocks < window:
        raise ValueError(f"num_sliding_window_blocks={window} exceeds the {num_blocks} blocks of a row")
    w = window // 2
    for row in range(num_blocks):
        layout[h, row, max(0, row - w) : min(row + w + 1, num_blocks)] = 1


class BigBirdSparsityConfig(SparsityConfig):
    """BigBird: random blocks, a sliding window and global blocks at the start (ITC).

    Args:
        num_random_blocks: random blocks per row (default 1; causal rows sample among the past only).
        num_sliding_window_blocks: window width in blocks (default 3).
        num_global_blocks: leading global blocks (default 1).
        attention: ``"bidirectional"`` or ``"unidirectional"`` (block lower-triangular).
    """

    def __init__(
        self,
        num_heads: int,
        block_size: int = 16,
        different_layout_per_head: bool = False,
        num_random_blocks: int = 1,
        num_sliding_window_blocks: int = 3,
        num_global_blocks: int = 1,
        attention: str = "bidirectional",
    ) -> None:
        super().__init__(num_heads, block_size, different_layout_per_head)
        _check_attention(attention)
        self.num_random_blocks = num_random_blocks
        self.num_sliding_window_blocks = num_sliding_window_blocks
        self.num_global_blocks = num_global_blocks
        self.attention = attention

    def set_random_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        num_blocks = layout.shape[1]
        if num_blocks < self.num_random_blocks:
            raise ValueError(f"num_random_blocks={self.num_random_blocks} exceeds the {num_blocks} blocks of a row")
        for row in range(num_blocks):
            n = num_blocks if self.attention == "bidirectional" else row + 1
            layout[h, row, _sample(n, min(self.num_random_blocks, n))] = 1
        return layout

    def set_sliding_window_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        _sliding_window(layout, h, self.num_sliding_window_blocks)
        return layout

    def set_global_layout_itc(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        num_blocks = layout.shape[1]
        if num_blocks < self.num_global_blocks:
            raise ValueError(f"num_global_blocks={self.num_global_blocks} exceeds the {num_blocks} blocks of a row")
        layout[h, : self.num_global_blocks, :] = 1
        layout[h, :, : self.num_global_blocks] = 1
        if self.attention == "unidirectional":
            layout[h] = torch.tril(layout[h])
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            layout = self.set_random_layout(h, layout)
            layout = self.set_sliding_window_layout(h, layout)
            layout = self.set_global_layout_itc(h, layout)
        return self.check_and_propagate_first_head_layout(layout)


class BSLongformerSparsityConfig(SparsityConfig):
    """Block-sparse Longformer: a sliding window plus global blocks (rows and columns).

    Args:
        num_sliding_window_blocks: window width in blocks (default 3).
        global_block_indices: global block indices, or range starts with ``global_block_end_indices``.
        global_block_end_indices: exclusive range ends (default None: single blocks).
        attention: ``"bidirectional"`` or ``"unidirectional"`` (block lower-triangular).
    """

    def __init__(
        self,
        num_heads: int,
        block_size: int = 16,
        different_layout_per_head: bool = False,
        num_sliding_window_blocks: int = 3,
        global_block_indices: Sequence[int] = (0,),
        global_block_end_indices: Sequence[int] | None = None,
        attention: str = "bidirectional",
    ) -> None:
        super().__init__(num_heads, block_size, different_layout_per_head)
        if global_block_end_indices is not None:
            if len(global_block_indices) != len(global_block_end_indices):
                raise ValueError("global_block_indices and global_block_end_indices must have the same length")
            for start, stop in zip(global_block_indices, global_block_end_indices):
                if start >= stop:
                    raise ValueError(f"global block start {start} must be smaller than its end {stop}")
        _check_attention(attention)
        self.num_sliding_window_blocks = num_sliding_window_blocks
        self.global_block_indices = list(global_block_indices)
        self.global_block_end_indices = None if global_block_end_indices is None else list(global_block_end_indices)
        self.attention = attention

    def set_sliding_window_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        _sliding_window(layout, h, self.num_sliding_window_blocks)
        return layout

    def set_global_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        num_blocks = layout.shape[1]
        ends = self.global_block_end_indices or [i + 1 for i in self.global_block_indices]
        for start, stop in zip(self.global_block_indices, ends):
            if start < num_blocks:
                stop = min(stop, num_blocks)
                layout[h, start:stop, :] = 1
                layout[h, :, start:stop] = 1
        if self.attention == "unidirectional":
            layout[h] = torch.tril(layout[h])
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            layout = self.set_sliding_window_layout(h, layout)
            layout = self.set_global_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)
