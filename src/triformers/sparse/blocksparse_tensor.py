"""``BlockSparseTensor``: a ``[B, C, M, N]`` tensor stored as its non-zero ``bs x bs`` blocks (xFormers' class).

A ``torch.Tensor`` subclass through ``__torch_function__``: matmul with dense operands (``S @ D``, ``D @ S``),
:func:`~triformers.sparse.masked_matmul` (``(A @ B)`` at the stored blocks), softmax over the stored blocks
(optionally causal and scaled), scaling, dropout, transpose, ``to_dense``/``from_dense``. Every operation is
differentiable with respect to ``values`` and the dense operands; the products and the softmax run our Triton
kernels on CUDA and torch on the CPU (:mod:`triformers.sparse._blocksparse_ops`).
"""

from __future__ import annotations

import torch

from triformers.ops.common import InputError
from triformers.sparse import _blocksparse_ops as ops
from triformers.sparse._blocksparse_layout import BlockLayout, check_layout
from triformers.sparse._wrapper import SparseWrapper

__all__ = ["BlockSparseTensor"]



class BlockSparseTensor(SparseWrapper):
    """A block-sparse ``[B, C, bs·h, bs·w]`` tensor: its stored blocks and their layout.

    Args:
        values: ``[B, nnz, bs, bs]``, the stored blocks in ``layout.nonzero()`` order (row-major over (c, i, j)).
            ``bs >= 16``.
        layout: ``[C, h, w]`` 0/1 integer or bool tensor on ``values``' device, 1 = stored block, with exactly
            ``nnz`` ones.

    Raises:
        InputError: values not 4-D with square blocks of at least 16, a layout that is not 3-D 0/1, on
            another device, or whose number of ones differs from ``values.shape[1]``.
    """

    @staticmethod
    def __new__(cls, values: torch.Tensor, layout: torch.Tensor):
        _check(values, layout)
        return cls._wrap(values, BlockLayout.build(layout, values.shape[-1]))

    def __init__(self, values: torch.Tensor, layout: torch.Tensor):  # noqa: ARG002 (built in __new__)
        pass

    @classmethod
    def _wrap(cls, values: torch.Tensor, info: BlockLayout) -> BlockSparseTensor:
        """A tensor on an already-built layout (no validation, no look-up tables rebuilt)."""
        C, h, w = info.shape
        bs = info.block_size
        return cls._new((values.shape[0], C, bs * h, bs * w), values, info)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, layout: torch.Tensor) -> BlockSparseTensor:
        """The blocks of ``dense [B, C, M, N]`` at ``layout [C, h, w]`` (block size ``M / h``); differentiable.

        Raises:
            InputError: ``dense`` not 4-D, a channel count differing from the layout's, or a block size that
                does not divide M and N (``M = h·bs`` and ``N = w·bs`` are required).
        """
        try:
            check_layout(layout)
        except ValueError as e:
            raise InputError(str(e)) from None
        if not isinstance(dense, torch.Tensor) or dense.dim() != 4:
            raise InputError(f"dense must be [B, C, M, N], got shape {tuple(getattr(dense, 'shape', ()))}")
        C, h, w = layout.shape
        B, Cd, M, N = dense.shape
        bs = M // h if h else 0
        if Cd != C or h == 0 or M != h * bs or N != w * bs:
            raise InputError(
                f"dense.shape={tuple(dense.shape)} does not match layout.shape={tuple(layout.shape)}: need "
                f"[B, {C}, h·bs, w·bs] with one block size bs dividing both M={M} and N={N} "
                f"(M/h={M / max(h, 1):g}, N/w={N / max(w, 1):g}); pad the sequence to a multiple of the block "
                "size or build the layout for this shape"
            )
        _check_block_size(bs)
        info = BlockLayout.build(layout.to(dense.device), bs)
        return cls._wrap(info_blocks(dense, info), info)

    def _from_dense_values(self, dense: torch.Tensor) -> torch.Tensor:
        if tuple(dense.shape) != tuple(self.shape):
            raise InputError(f"dense.shape={tuple(dense.shape)} differs from the sparse tensor's {tuple(self.shape)}")
        return info_blocks(dense, self._pattern)

    def _same_pattern(self, other: BlockSparseTensor) -> bool:
        a, b = self._pattern, other._pattern
        return a is b or (a.block_size == b.block_size and a.shape == b.shape
                          and torch.equal(a.layout, b.layout.to(a.layout.device)))

    # --- accessors -------------------------------------------------------------------------------------------
    @property
    def _info(self) -> BlockLayout:
        return self._pattern

    @property
    def layout_tensor(self) -> torch.Tensor:
        """The ``[C, h, w]`` layout."""
        return self._pattern.layout

    @property
    def block_size(self) -> int:
        return self._pattern.block_size

    def __repr__(self) -> str:
        return (
            f"BlockSparseTensor(shape={tuple(self.shape)}, block_size={self.block_size}, nnz_blocks="
            f"{self._pattern.nnz}, dtype={self.dtype}, device={self.device})"
        )

    def __reduce_ex__(self, protocol):
        return BlockSparseTensor, (self.values(), self._pattern.layout)

    def to_dense(self) -> torch.Tensor:
        """The ``[B, C, M, N]`` dense tensor, zeros outside the stored blocks; differentiable."""
        info = self._pattern
        C, h, w = info.shape
        bs = info.block_size
        v = self.values()
        blocks = v.new_zeros((C, h, w, v.shape[0], bs, bs))
        blocks = blocks.index_put((info.block_c.long(), info.block_i.long(), info.block_j.long()), v.transpose(0, 1))
        return blocks.permute(3, 0, 1, 4, 2, 5).reshape(self.shape)  # [B, C, h, bs, w, bs]

    # --- operations ------------------------------------------------------------------------------------------
    def softmax(self, dim: int = -1, dtype=None, *, causal: bool = False, scale: float = 1.0) -> BlockSparseTensor:
        """Softmax of ``scale · self`` along the last dim over the stored entries only (``causal``: also only
        columns <= row). Rows with nothing stored or visible are 0."""
        if dim not in (-1, 3):
            raise InputError(f"BlockSparseTensor.softmax takes dim=-1 (the last dim), got dim={dim}")
        if dtype is not None and dtype != self.dtype:
            raise InputError(f"BlockSparseTensor.softmax keeps the values' dtype {self.dtype}; got dtype={dtype}")
        if causal and self.shape[-2] != self.shape[-1]:
            raise InputError(f"causal softmax needs a square tensor, got shape {tuple(self.shape)}")
        return self._rewrap(ops.blocks_softmax(self.values(), self._pattern, causal, scale))

    def transpose(self, dim0: int, dim1: int) -> BlockSparseTensor:
        """Swap the last two dims (the only transposition a block layout supports)."""
        if {dim0 % 4, dim1 % 4} != {2, 3}:
            raise InputError(f"BlockSparseTensor.transpose swaps dims -2 and -1 only, got ({dim0}, {dim1})")
        info_t, src = self._pattern.transposed()
        return self._wrap(self.values()[:, src].transpose(-2, -1), info_t)

    def t(self) -> BlockSparseTensor:
        return self.transpose(-2, -1)

    @property
    def mT(self) -> BlockSparseTensor:  # noqa: N802
        return self.transpose(-2, -1)

    @staticmethod
    def _product(a, b):
        return _matmul(a, b)

    @staticmethod
    def _masked_product(a, b, mask):
        return _masked_matmul(a, b, mask)


def info_blocks(dense: torch.Tensor, info: BlockLayout) -> torch.Tensor:
    """The stored blocks ``[B, nnz, bs, bs]`` of ``dense [B, C, h·bs, w·bs]`` (differentiable gather)."""
    _, h, w = info.shape
    bs = info.block_size
    blocks = dense.unflatten(3, (w, bs)).unflatten(2, (h, bs)).permute(0, 1, 2, 4, 3, 5)  # [B, C, h, w, bs, bs]
    return blocks[:, info.block_c.long(), info.block_i.long(), info.block_j.long()]


# --- helpers -------------------------------------------------------------------------------------------------
def _check_block_size(bs: int) -> None:
    if bs < 16:
        raise InputError(f"block size {bs} is below the minimum of 16; use blocks of 16 or more")


def _check(values: torch.Tensor, layout: torch.Tensor) -> None:
    if not isinstance(values, torch.Tensor) or values.dim() != 4 or values.shape[-1] != values.shape[-2]:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise InputError(f"values must be [B, nnz_blocks, bs, bs] with square blocks, got {shape}")
    _check_block_size(values.shape[-1])
    try:
        check_layout(layout)
    except ValueError as e:
        raise InputError(str(e)) from None
    if layout.device != values.device:
        raise InputError(f"layout is on {layout.device} but values on {values.device}; move the layout")
    nnz = int(layout.count_nonzero())
    if nnz != values.shape[1]:
        raise InputError(
            f"layout has {nnz} stored blocks but values.shape={tuple(values.shape)} holds {values.shape[1]}; "
            "values must hold one block per 1 of the layout, in layout.nonzero() order"
        )


def _check_dense(name: str, t, like: BlockSparseTensor, dim: int, size: int) -> None:
    if not isinstance(t, torch.Tensor) or isinstance(t, BlockSparseTensor):
        raise NotImplementedError(
            f"{name}: a BlockSparseTensor multiplies dense tensors only (got {type(t).__name__}); use .to_dense()"
        )
    B, C = like.shape[:2]
    if t.dim() != 4 or t.shape[0] != B or t.shape[1] != C or t.shape[dim] != size:
        want = "[B, C, K, N]" if dim == 2 else "[B, C, M, K]"
        raise InputError(
            f"{name}.shape={tuple(t.shape)} does not fit the BlockSparseTensor of shape {tuple(like.shape)}: "
            f"need {want} with B={B}, C={C}, K={size}"
        )
    if t.dtype != like.dtype or t.device != like.device:
        raise InputError(
            f"{name} is {t.dtype} on {t.device} but the BlockSparseTensor is {like.dtype} on {like.device}; "
            "convert one of them"
        )


def _matmul(a, b):
    if isinstance(a, BlockSparseTensor) and isinstance(b, BlockSparseTensor):
        raise NotImplementedError("BlockSparseTensor @ BlockSparseTensor is not supported; densify one operand")
    if isinstance(a, BlockSparseTensor):
        _check_dense("other", b, a, 2, a.shape[3])
        return ops.sparse_dense_matmul(a.values(), b, a._info)
    _check_dense("input", a, b, 3, b.shape[2])
    return ops.dense_sparse_matmul(a, b.values(), b._info)


def _masked_matmul(a, b, mask):
    if not isinstance(mask, BlockSparseTensor) or isinstance(a, BlockSparseTensor) or isinstance(b, BlockSparseTensor):
        raise NotImplementedError("masked_matmul with a BlockSparseTensor takes dense a, b and a BlockSparseTensor "
                                  "mask")
    B, C, M, N = mask.shape
    for name, t, want in (("a", a, (B, C, M)), ("b", b, (B, C))):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[: len(want)]) != want:
            raise InputError(
                f"masked_matmul: {name}.shape={tuple(getattr(t, 'shape', ()))} does not fit the mask of shape "
                f"{tuple(mask.shape)}: need a [B, C, M, K] and b [B, C, K, N] with B={B}, C={C}, M={M}, N={N}"
            )
    if b.shape[3] != N or a.shape[3] != b.shape[2]:
        raise InputError(f"masked_matmul: a.shape={tuple(a.shape)} @ b.shape={tuple(b.shape)} is not [.., {M}, {N}]")
    if a.dtype != b.dtype or a.device != b.device:
        raise InputError(f"masked_matmul: a is {a.dtype} on {a.device}, b is {b.dtype} on {b.device}; match them")
    return BlockSparseTensor._wrap(ops.masked_matmul_blocks(a, b, mask._info.to(a.device)), mask._info.to(a.device))
