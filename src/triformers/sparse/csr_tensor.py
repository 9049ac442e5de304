"""``SparseCSRTensor``: a batch ``[B, m, n]`` of matrices sharing one CSR pattern (xFormers' class).

xFormers built it on Sputnik's CUDA kernels (removed upstream in 2025). Here the products run on torch's sparse
CSR kernels for float32/float64 and on our Triton SpMM/SDDMM for half precision
(:mod:`triformers.sparse._csr_ops`); rows are visited by decreasing number of entries, as Sputnik does.
Every operation is differentiable with respect to ``values`` and the dense operands.
"""

from __future__ import annotations

import torch

from triformers.ops.common import InputError
from triformers.sparse import _csr_ops as ops
from triformers.sparse._wrapper import _TRANSPOSES, SparseWrapper

__all__ = ["SparseCSRTensor"]

_LOGICAL_AND = {torch.logical_and, torch.Tensor.logical_and, torch.Tensor.__and__}


class SparseCSRTensor(SparseWrapper):
    """A batch of ``B`` sparse ``[m, n]`` matrices with one CSR pattern.

    Args:
        row_offsets: ``[m + 1]`` integer offsets of each row's entries (``row_offsets[-1] == nnz``).
        column_indices: ``[nnz]`` column of each entry, row by row.
        values: ``[B, nnz]``.
        shape: ``(B, m, n)``.

    Raises:
        InputError: a shape that is not 3-D, or index tensors that do not describe a ``[m, n]`` pattern with
            ``values.shape[1]`` entries.
    """

    @staticmethod
    def __new__(cls, row_offsets, column_indices, values, shape):
        _check(row_offsets, column_indices, values, shape)
        B, m, n = shape
        pattern = ops.CSRPattern.build(row_offsets.to(values.device), column_indices.to(values.device), m, n)
        return cls._wrap(values, pattern)

    def __init__(self, row_offsets, column_indices, values, shape):  # noqa: ARG002 (built in __new__)
        pass

    @classmethod
    def _wrap(cls, values: torch.Tensor, pattern: ops.CSRPattern) -> SparseCSRTensor:
        return cls._new((values.shape[0], pattern.m, pattern.n), values, pattern)

    @classmethod
    def from_dense(cls, matrix: torch.Tensor) -> SparseCSRTensor:
        """The non-zeros of ``matrix [B, m, n]``, which must share one pattern over the batch; differentiable.

        Unlike xFormers (whose Sputnik kernels needed it), the number of entries is not rounded down to a
        multiple of 4: no non-zero is dropped.

        Raises:
            InputError: ``matrix`` not 3-D; ValueError: different sparsity patterns across the batch.
        """
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 3:
            raise InputError(f"matrix must be [B, m, n], got shape {tuple(getattr(matrix, 'shape', ()))}")
        mask = matrix != 0
        if not bool((mask == mask[:1]).all()):
            raise ValueError("Expected the same sparsity pattern over the batch dimension; use from_mask per pattern")
        return cls.from_mask(mask[0] if matrix.shape[0] else mask.new_zeros(matrix.shape[1:]), matrix)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, dense: torch.Tensor | None = None) -> SparseCSRTensor:
        """The entries of ``dense [B, m, n]`` (default: ones, B = 1) where ``mask [m, n]`` is True."""
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise InputError(f"mask must be a 2-D [m, n] pattern, got shape {tuple(getattr(mask, 'shape', ()))}")
        if dense is None:
            dense = torch.ones((1, *mask.shape), device=mask.device)
        if dense.dim() != 3 or tuple(dense.shape[1:]) != tuple(mask.shape):
            raise InputError(f"dense.shape={tuple(dense.shape)} must be [B, {mask.shape[0]}, {mask.shape[1]}]")
        rows, cols = mask.to(dense.device).nonzero(as_tuple=True)
        offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.long, device=dense.device)
        offsets[1:] = torch.bincount(rows, minlength=mask.shape[0]).cumsum(0)
        pattern = ops.CSRPattern.build(offsets, cols, *mask.shape)
        return cls._wrap(dense[:, rows, cols], pattern)

    @classmethod
    def from_sparse_coo(cls, arg0: torch.Tensor) -> SparseCSRTensor:
        """From a ``torch.sparse_coo`` tensor ``[m, n]`` (one matrix) or ``[B, m, n]`` (shared pattern)."""
        return cls.from_dense(arg0.to_dense() if arg0.dim() == 3 else arg0.to_dense()[None])

    def _from_dense_values(self, dense: torch.Tensor) -> torch.Tensor:
        if tuple(dense.shape) != tuple(self.shape):
            raise InputError(f"dense.shape={tuple(dense.shape)} differs from the sparse tensor's {tuple(self.shape)}")
        p = self._pattern
        return dense[:, p.rows.long(), p.column_indices.long()]

    def _same_pattern(self, other: SparseCSRTensor) -> bool:
        a, b = self._pattern, other._pattern
        if a is b:
            return True
        device = a.row_offsets.device
        return (a.m, a.n) == (b.m, b.n) and torch.equal(a.row_offsets, b.row_offsets.to(device)) \
            and torch.equal(a.column_indices, b.column_indices.to(device))

    # xFormers' attribute names
    @property
    def _csr_row_offsets(self) -> torch.Tensor:
        return self._pattern.row_offsets

    @property
    def _csr_column_indices(self) -> torch.Tensor:
        return self._pattern.column_indices

    @property
    def _csr_row_indices(self) -> torch.Tensor:
        return self._pattern.row_indices

    @property
    def _csr_transp_info(self):
        t, perm = self._pattern.transposed()
        return t.row_indices, t.row_offsets, t.column_indices, perm

    def __reduce_ex__(self, protocol):
        p = self._pattern
        return SparseCSRTensor, (p.row_offsets, p.column_indices, self.values(), tuple(self.shape))

    def to_dense(self) -> torch.Tensor:
        """``[B, m, n]`` with zeros outside the pattern; differentiable."""
        p = self._pattern
        B, m, n = self.shape
        out = self.values().new_zeros((m, n, B))
        return out.index_put((p.rows.long(), p.column_indices.long()), self.values().t()).permute(2, 0, 1)

    def softmax(self, dim: int = -1, dtype=None) -> SparseCSRTensor:
        """Row softmax over the stored entries (rows without entries stay empty)."""
        if dim not in (-1, 2):
            raise InputError(f"SparseCSRTensor.softmax takes dim=-1 (the last dim), got dim={dim}")
        if dtype is not None and dtype != self.dtype:
            raise InputError(f"SparseCSRTensor.softmax keeps the values' dtype {self.dtype}; got dtype={dtype}")
        return self._rewrap(ops.csr_softmax(self.values(), self._pattern))

    def transpose(self, dim0: int, dim1: int) -> SparseCSRTensor:
        """``[B, n, m]``: swap dims 1 and 2 (the pattern's transpose is built once and cached)."""
        if {dim0 % 3, dim1 % 3} != {1, 2}:
            raise InputError(f"SparseCSRTensor.transpose swaps dims 1 and 2 (-2, -1) only, got ({dim0}, {dim1})")
        pt, perm = self._pattern.transposed()
        return self._wrap(self.values()[:, perm], pt)

    def t(self) -> SparseCSRTensor:
        return self.transpose(1, 2)

    @staticmethod
    def _product(a, b):
        return _matmul(a, b)

    @staticmethod
    def _masked_product(a, b, mask):
        return _masked_matmul(a, b, mask)

    @classmethod
    def _handle(cls, func, args, kwargs):
        if func in _TRANSPOSES and kwargs:
            raise InputError("SparseCSRTensor.transpose takes positional dims only")
        if func in _LOGICAL_AND:
            a, b = args
            return cls.from_dense(torch.logical_and(_dense(a), _dense(b)).to(a.dtype))
        return NotImplemented


def _dense(x):
    return x.to_dense() if isinstance(x, SparseCSRTensor) else x


def _check(row_offsets, column_indices, values, shape) -> None:
    if len(tuple(shape)) != 3:
        raise InputError(f"shape must be 3-D (B, m, n), got {tuple(shape)}; add a batch dim of 1")
    B, m, n = shape
    for name, t, dim in (("row_offsets", row_offsets, 1), ("column_indices", column_indices, 1), ("values", values, 2)):
        if not isinstance(t, torch.Tensor) or t.dim() != dim:
            raise InputError(f"{name} must be a {dim}-D tensor, got {tuple(getattr(t, 'shape', ()))}")
    if row_offsets.is_floating_point() or column_indices.is_floating_point():
        raise InputError("row_offsets and column_indices must be integer tensors; use .int()")
    nnz = column_indices.numel()
    if row_offsets.numel() != m + 1 or tuple(values.shape) != (B, nnz):
        raise InputError(
            f"row_offsets.shape={tuple(row_offsets.shape)}, column_indices.shape={tuple(column_indices.shape)}, "
            f"values.shape={tuple(values.shape)} do not describe shape {tuple(shape)}: need [{m + 1}], [nnz], "
            f"[{B}, nnz]"
        )
    ro = row_offsets.long()
    if int(ro[0]) != 0 or int(ro[-1]) != nnz or bool((ro.diff() < 0).any()):
        raise InputError(f"row_offsets must rise from 0 to nnz={nnz} (got first {int(ro[0])}, last {int(ro[-1])})")
    if nnz and (int(column_indices.min()) < 0 or int(column_indices.max()) >= n):
        raise InputError(f"column_indices must lie in [0, {n}) for shape {tuple(shape)}")


def _check_operand(name: str, t, B: int, k: int, dim: int) -> None:
    if not isinstance(t, torch.Tensor) or isinstance(t, SparseWrapper) or t.dim() != 3 or t.shape[0] != B \
            or t.shape[dim] != k:
        want = f"[{B}, {k}, K]" if dim == 1 else f"[{B}, M, {k}]"
        raise InputError(f"{name}.shape={tuple(getattr(t, 'shape', ()))} does not fit: need a dense {want} tensor")


def _matmul(a, b):
    if isinstance(a, SparseCSRTensor) and isinstance(b, SparseCSRTensor):
        raise NotImplementedError("SparseCSRTensor @ SparseCSRTensor is not supported; densify one operand")
    if isinstance(a, SparseCSRTensor):
        _check_operand("other", b, a.shape[0], a.shape[2], 1)
        _check_dtype(a, b)
        return ops.csr_matmul(a.values(), b, a._pattern)
    _check_operand("input", a, b.shape[0], b.shape[1], 2)
    _check_dtype(b, a)
    return _matmul(b.t(), a.transpose(1, 2)).transpose(1, 2)  # D @ S = (Sᵀ @ Dᵀ)ᵀ


def _check_dtype(s: SparseCSRTensor, d: torch.Tensor) -> None:
    if d.dtype != s.dtype or d.device != s.device:
        raise InputError(f"the dense operand is {d.dtype} on {d.device}, the sparse one {s.dtype} on {s.device}")


def _masked_matmul(a, b, mask):
    if not isinstance(mask, SparseCSRTensor) or isinstance(a, SparseWrapper) or isinstance(b, SparseWrapper):
        raise NotImplementedError("masked_matmul with a SparseCSRTensor takes dense a, b and a SparseCSRTensor mask")
    B, m, n = mask.shape
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 3 and b.dim() == 3
            and a.shape[:2] == (B, m) and b.shape[0] == B and b.shape[2] == n and a.shape[2] == b.shape[1]):
        raise InputError(
            f"masked_matmul: a.shape={tuple(getattr(a, 'shape', ()))}, b.shape={tuple(getattr(b, 'shape', ()))} "
            f"do not fit the mask {tuple(mask.shape)}: need a [{B}, {m}, K] and b [{B}, K, {n}]"
        )
    if a.dtype != b.dtype or a.device != b.device:
        raise InputError(f"masked_matmul: a is {a.dtype} on {a.device}, b is {b.dtype} on {b.device}; match them")
    p = mask._pattern.to(a.device)
    return SparseCSRTensor._wrap(ops.csr_masked_matmul(a, b, p), p)
