"""Look-up tables of a block-sparse layout, built once per layout and shared by every tensor that uses it.

A layout ``[C, h, w]`` (0/1) marks the stored ``bs x bs`` blocks of a ``[B, C, h·bs, w·bs]`` tensor. Stored
blocks are numbered in ``layout.nonzero()`` order (row-major over (c, i, j)), the order of ``values[:, n]``.
The kernels read the blocks of a block-row (``r = c·h + i``) through ``row_ptr``/``row_blocks``/``row_k``,
and those of a block-column (``c·w + j``, for products with the transposed tensor) through the ``col_``
tables; both visit the rows with the most blocks first (``row_order``, ``col_order``) so that the longest
programs start first and do not trail at the end of the launch (Sputnik's row swizzle).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["BlockLayout", "check_layout"]


def check_layout(layout: torch.Tensor) -> None:
    """Raise ValueError unless ``layout`` is a 3-D 0/1 integer (or bool) tensor."""
    if not isinstance(layout, torch.Tensor) or layout.dim() != 3:
        shape = tuple(layout.shape) if isinstance(layout, torch.Tensor) else type(layout).__name__
        raise ValueError(f"layout must be a 3-D tensor [C, h, w] of 0/1, got {shape}; add a leading dim for C = 1")
    if layout.is_floating_point() or layout.is_complex():
        raise ValueError(f"layout must hold integers or bools (0/1), got dtype {layout.dtype}; use layout.long()")
    if layout.numel() and not bool(((layout == 0) | (layout == 1)).all()):
        raise ValueError("layout must hold only 0 and 1 (1 = stored block); use (layout != 0).long()")


@dataclass(eq=False)
class BlockLayout:
    """The layout of a block-sparse tensor and its look-up tables (all int32 on the layout's device).

    Attributes:
        layout: ``[C, h, w]`` as given by the user.
        block_size: ``bs``.
        nnz: number of stored blocks.
        block_c, block_i, block_j: ``[nnz]`` channel, block-row and block-column of each stored block.
        row_ptr: ``[C·h + 1]`` offsets of each block-row's blocks in ``row_blocks``/``row_k``.
        row_blocks, row_k: ``[nnz]`` stored-block index and block-column, by block-row then column.
        col_ptr, col_blocks, col_k: the same by block-column (``c·w + j``) then block-row.
        row_order, col_order: block-rows / block-columns by decreasing number of blocks.
    """

    layout: torch.Tensor
    block_size: int
    nnz: int
    block_c: torch.Tensor
    block_i: torch.Tensor
    block_j: torch.Tensor
    row_ptr: torch.Tensor
    row_blocks: torch.Tensor
    row_k: torch.Tensor
    row_order: torch.Tensor
    col_ptr: torch.Tensor
    col_blocks: torch.Tensor
    col_k: torch.Tensor
    col_order: torch.Tensor
    _transposed: tuple | None = field(default=None, repr=False)

    @classmethod
    def build(cls, layout: torch.Tensor, block_size: int) -> BlockLayout:
        C, h, w = layout.shape
        c, i, j = layout.nonzero(as_tuple=True)  # row-major: the block order of `values`
        nnz = c.numel()
        rows = c * h + i
        cols = c * w + j
        row_counts = torch.bincount(rows, minlength=C * h)
        col_counts = torch.bincount(cols, minlength=C * w)
        by_col = torch.argsort(cols * h + i, stable=True)  # blocks by (c, j, i)
        i32 = torch.int32
        return cls(
            layout=layout,
            block_size=block_size,
            nnz=nnz,
            block_c=c.to(i32),
            block_i=i.to(i32),
            block_j=j.to(i32),
            row_ptr=_offsets(row_counts),
            row_blocks=torch.arange(nnz, device=layout.device, dtype=i32),
            row_k=j.to(i32),
            row_order=torch.argsort(row_counts, descending=True, stable=True).to(i32),
            col_ptr=_offsets(col_counts),
            col_blocks=by_col.to(i32),
            col_k=i[by_col].to(i32),
            col_order=torch.argsort(col_counts, descending=True, stable=True).to(i32),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, h, w)``."""
        return tuple(self.layout.shape)

    def to(self, device: torch.device) -> BlockLayout:
        """The same tables on ``device``."""
        if self.layout.device == device:
            return self
        return self._map(lambda t: t.to(device))

    def clone(self) -> BlockLayout:
        """Tables in new memory (``copy.deepcopy``)."""
        return self._map(torch.clone)

    def _map(self, fn) -> BlockLayout:
        fields = {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items() if k[0] != "_"}
        return BlockLayout(**fields)

    def transposed(self) -> tuple[BlockLayout, torch.Tensor]:
        """The layout of the transposed tensor and, for each of its blocks, the index of the block it comes
        from (its values are that block transposed). Built once."""
        if self._transposed is None:
            t = BlockLayout.build(self.layout.transpose(-2, -1).contiguous(), self.block_size)
            t._transposed = (self, t.col_blocks.long())  # transposing back
            self._transposed = (t, self.col_blocks.long())
        return self._transposed


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(counts.numel() + 1, device=counts.device, dtype=torch.int32)
    out[1:] = counts.cumsum(0)
    return out
