"""2:4 semi-structured sparsity (xFormers' ``xformers.ops.sp24``): sparsify a matrix, multiply by it.

``sparsify24(x)`` keeps the 2 largest-magnitude entries of every 4 consecutive entries of each row and returns a
:class:`Sparse24Tensor`. Its products (``W @ D``, ``F.linear(x, W, b)``, ``x @ W.t()``) run torch's 2:4 sparse
GEMMs (``torch.sparse.to_sparse_semi_structured``: CUTLASS or cuSPARSELt on sm80+ GPUs, float16/bfloat16) and
otherwise multiply the masked dense matrix, with a one-time warning saying why. Gradients follow the
``gradient`` argument: ``"24sparse"`` and ``"24dense"`` keep the pattern (pruned entries get zero gradient),
``"ste"`` passes the gradient straight through.

Pointwise: ``relu``, ``gelu``, ``silu`` keep the pattern; ``*`` with a Sparse24Tensor of the same pattern or
with a dense matrix of the same shape (sparsified like the pattern), ``+`` with the same pattern, scaling by a
number. So xFormers' sparse-activation MLPs run as written: ``F.gelu(sparsify24(x @ w1)) @ w2`` and
``(F.silu(h1) * sparsify24_like(h2, h1)) @ w3``.

Storage differs from xFormers: ``packed`` holds the masked dense matrix (zeros at pruned entries) and
``threads_masks`` the kept-entry mask; the compressed form the GPU kernels read (values + metadata) is torch's
``SparseSemiStructuredTensor``, built on first use and kept. ``meta``, ``packed_t`` and ``meta_t`` are None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from triformers.ops.common import InputError
from triformers.sparse._wrapper import SparseWrapper
from triformers.triton._common import warn_once

__all__ = [
    "Sparse24Tensor",
    "sparsify24",
    "sparsify24_like",
    "sparsify24_ste",
    "sparse24_largest_mask_2d",
    "sparseNM_dense",
    "GRADIENT_SP24",
    "GRADIENT_DENSE",
    "GRADIENT_STE",
    "BACKEND_CUTLASS",
    "BACKEND_CUSPARSELT",
    "BACKEND_DENSE",
]

GRADIENT_SP24 = "24sparse"
GRADIENT_DENSE = "24dense"
GRADIENT_STE = "ste"
BACKEND_CUTLASS = "cutlass"
BACKEND_CUSPARSELT = "cusparselt"
BACKEND_DENSE = "dense"
_GRADIENTS = (GRADIENT_SP24, GRADIENT_DENSE, GRADIENT_STE)
_BACKENDS = (BACKEND_CUTLASS, BACKEND_CUSPARSELT, BACKEND_DENSE)
# "" = the default; xFormers' greedy variants and ours all keep the 2 largest of each group of 4
_ALGORITHMS = {"": "largest_abs", "largest_values_greedy": "largest", "largest_abs_values_greedy": "largest_abs",
               "largest_notranspose": "largest", "largest_abs_notranspose": "largest_abs"}
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def sparseNM_dense(input: torch.Tensor, sort_preproc: str, N: int, M: int) -> torch.Tensor:  # noqa: N802
    """``input`` with all but the ``N`` largest of every ``M`` consecutive entries of each row zeroed.

    Args:
        input: ``[..., K]`` with K a multiple of M.
        sort_preproc: ``"largest"`` (by value) or ``"largest_abs"`` (by magnitude).
    """
    return input * _nm_mask(input, sort_preproc, N, M)


def sparse24_largest_mask_2d(input: torch.Tensor, sort_preproc: str = "largest_abs") -> torch.Tensor:
    """The 0/1 mask (dtype of ``input``) of the 2 largest entries of each group of 4 along the rows."""
    return _nm_mask(input, sort_preproc, 2, 4).to(input.dtype)


def _nm_mask(x: torch.Tensor, sort_preproc: str, N: int, M: int) -> torch.Tensor:
    if sort_preproc not in ("largest", "largest_abs"):
        raise InputError(f"sort_preproc must be 'largest' or 'largest_abs', got {sort_preproc!r}")
    if x.shape[-1] % M:
        raise InputError(f"the last dim ({x.shape[-1]}) must be a multiple of {M} for {N}:{M} sparsity; pad it")
    score = x.abs() if sort_preproc == "largest_abs" else x
    groups = score.unflatten(-1, (-1, M))
    keep = groups.topk(N, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.flatten(-2)


class Sparse24Tensor(SparseWrapper):
    """A 2-D matrix with 2 of every 4 consecutive entries of each row kept (see the module docstring).

    Args:
        shape: ``(rows, cols)``.
        packed: the masked dense matrix.
        meta, packed_t, meta_t: unused (None); kept for xFormers' signature.
        threads_masks: bool mask of the kept entries.
        requires_grad: forwarded to ``packed``.
    """

    @staticmethod
    def __new__(cls, shape, packed, meta=None, packed_t=None, meta_t=None, threads_masks=None, *,
                requires_grad: bool = False):
        if threads_masks is None:
            raise InputError("threads_masks (the kept-entry mask) is required")
        if tuple(packed.shape) != tuple(shape) or tuple(threads_masks.shape) != tuple(shape):
            raise InputError(f"packed {tuple(packed.shape)} and threads_masks {tuple(threads_masks.shape)} "
                             f"must both have shape {tuple(shape)}")
        if requires_grad:
            packed.requires_grad_(True)
        return cls._wrap(packed, _Pattern(threads_masks.bool()))

    def __init__(self, *args, **kwargs):  # built in __new__
        pass

    @classmethod
    def _wrap(cls, values: torch.Tensor, pattern: _Pattern) -> Sparse24Tensor:
        return cls._new(tuple(values.shape), values, pattern)

    @property
    def threads_masks(self) -> torch.Tensor:
        return self._pattern.mask

    @property
    def packed(self) -> torch.Tensor:
        return self.values()

    def _from_dense_values(self, dense: torch.Tensor) -> torch.Tensor:
        if tuple(dense.shape) != tuple(self.shape):
            raise InputError(f"dense.shape={tuple(dense.shape)} differs from the Sparse24Tensor's {tuple(self.shape)} "
                             "(broadcasting is not implemented)")  # fmt: skip
        return dense * self._pattern.mask

    def _same_pattern(self, other: Sparse24Tensor) -> bool:
        return self._pattern is other._pattern or torch.equal(self._pattern.mask, other._pattern.mask)

    def _sp24_to_dense(self) -> torch.Tensor:
        return self.values()

    def to_dense(self) -> torch.Tensor:
        return self.values()

    def t(self) -> Sparse24Tensor:
        return self._wrap(self.values().t(), self._pattern.t())

    def transpose(self, dim0: int, dim1: int) -> Sparse24Tensor:
        if {dim0 % 2, dim1 % 2} != {0, 1}:
            raise InputError(f"a 2-D Sparse24Tensor transposes dims 0 and 1, got ({dim0}, {dim1})")
        return self.t()

    def _mm(self, B: torch.Tensor, *, prefer_col_major_output: bool = False, bias=None) -> torch.Tensor:  # noqa: ARG002
        out = _Sp24MM.apply(self.values(), B, self._pattern)
        return out if bias is None else out + bias[:, None]

    @classmethod
    def _handle(cls, func, args, kwargs):
        if func in (torch.mm, torch.matmul, torch.Tensor.mm, torch.Tensor.matmul, torch.Tensor.__matmul__):
            return _matmul(*args)
        if func is torch.Tensor.__rmatmul__:
            return _matmul(args[1], args[0])
        if func in (F.linear, torch._C._nn.linear):
            return _linear(*args, **kwargs)
        if func in (torch.t, torch.Tensor.t):
            return args[0].t()
        if func in (torch.transpose, torch.Tensor.transpose):
            return args[0].transpose(*args[1:])
        if func in _ACTIVATIONS:  # f(0) = 0: the pattern holds
            x, *rest = args
            return x._rewrap(_ACTIVATIONS[func](x.values(), *rest, **kwargs))
        return NotImplemented


# pointwise functions with f(0) = 0 that apply to the kept entries (xFormers' CUTLASS tensor has relu, gelu,
# silu); their gradients are autograd's on the values
_ACTIVATIONS = {F.relu: F.relu, torch.relu: F.relu, torch.Tensor.relu: F.relu, F.gelu: F.gelu, F.silu: F.silu}


class _Pattern:
    """The kept-entry mask and, once built, torch's compressed matrix for the GPU kernels."""

    def __init__(self, mask: torch.Tensor, transposed: bool = False):
        self.mask = mask
        self.transposed = transposed  # 2:4 along the columns: the kernels do not take this orientation
        self._compressed = None

    def t(self) -> _Pattern:
        return _Pattern(self.mask.t(), not self.transposed)

    def to(self, device) -> _Pattern:
        return self if self.mask.device == torch.device(device) else _Pattern(self.mask.to(device), self.transposed)

    def kernel_unsupported(self, values: torch.Tensor) -> str | None:
        """Why torch's 2:4 kernels cannot multiply by ``values``, or None."""
        if self.transposed:
            return "the matrix is 2:4 along its columns (a transposed weight): multiply by the untransposed one"
        if not values.is_cuda:
            return f"2:4 sparse GEMMs need a CUDA GPU (tensor on {values.device})"
        if torch.cuda.get_device_capability(values.device) < (8, 0):
            return "2:4 sparse GEMMs need an sm80 or newer GPU"
        if values.dtype not in _KERNEL_DTYPES:
            return f"2:4 sparse GEMMs take float16/bfloat16, got {values.dtype}"
        rows, cols = values.shape
        if rows % 64 or cols % 128:
            return (f"2:4 sparse GEMMs need rows % 64 == 0 and cols % 128 == 0, got {tuple(values.shape)}; "
                    "pad the weight")
        return None

    def compressed(self, values: torch.Tensor):
        if self._compressed is None or self._compressed[0] is not values:
            from torch.sparse import to_sparse_semi_structured

            self._compressed = (values, to_sparse_semi_structured(values.detach().contiguous()))
        return self._compressed[1]


def _sparse_mm(values: torch.Tensor, dense: torch.Tensor, pattern: _Pattern) -> torch.Tensor:
    """``values @ dense`` on the 2:4 kernels where they run, else dense (warned once)."""
    reason = pattern.kernel_unsupported(values)
    if reason is None:
        return torch.mm(pattern.compressed(values), dense)
    warn_once(f"triformers.ops.sp24: multiplying densely because {reason}")
    return values @ dense


class _Sp24MM(torch.autograd.Function):
    """``S @ D`` for a 2:4 ``S``: the forward on the sparse kernels, the backward dense (as xFormers' CUTLASS
    path computes ``dS``)."""

    @staticmethod
    def forward(ctx, values, dense, pattern):
        ctx.save_for_backward(values, dense)
        return _sparse_mm(values, dense, pattern)

    @staticmethod
    def backward(ctx, grad):
        values, dense = ctx.saved_tensors
        gv = grad @ dense.t() if ctx.needs_input_grad[0] else None
        gd = values.t() @ grad if ctx.needs_input_grad[1] else None
        return gv, gd, None


def _check_2d(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise NotImplementedError(
            f"Sparse24Tensor products are 2-D matrix products; {name} has shape {tuple(getattr(t, 'shape', ()))} "
            "(Broadcasting is not implemented: flatten the batch dims first)"
        )


def _matmul(a, b):
    if isinstance(a, Sparse24Tensor) and isinstance(b, Sparse24Tensor):
        raise ValueError("Sparse24Tensor @ Sparse24Tensor is not supported; densify one operand")
    _check_2d("the left operand", a)
    _check_2d("the right operand", b)
    if isinstance(a, Sparse24Tensor):
        return a._mm(b)
    return b.t()._mm(a.t()).t()  # D @ S = (Sᵀ @ Dᵀ)ᵀ


def _linear(x, weight, bias=None):
    """``x @ weight.t() + bias`` with a 2:4 ``weight [out, in]`` (``x [..., in]``)."""
    if not isinstance(weight, Sparse24Tensor) or isinstance(x, Sparse24Tensor):
        raise NotImplementedError("F.linear with a Sparse24Tensor takes it as the weight")
    x2 = x.reshape(-1, x.shape[-1])  # [T, in]
    out = weight._mm(x2.t()).t()  # [T, out] = (W @ xᵀ)ᵀ
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class _Sparsify24(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, gradient, mul0, mul1):
        ctx.save_for_backward(mask)
        ctx.gradient, ctx.mul0, ctx.mul1 = gradient, mul0, mul1
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        if ctx.gradient == GRADIENT_STE:
            if ctx.mul0 == 1.0 and ctx.mul1 == 1.0:
                return grad, None, None, None, None
            return grad * torch.where(mask, ctx.mul1, ctx.mul0).to(grad.dtype), None, None, None, None
        return grad * mask, None, None, None, None


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise InputError(f"sparsify24 takes a 2-D matrix, got shape {tuple(getattr(x, 'shape', ()))}")
    if not x.is_floating_point():
        raise InputError(f"sparsify24 takes a floating-point matrix, got dtype {x.dtype}")
    if x.shape[1] % 4:
        raise InputError(f"x.shape={tuple(x.shape)}: the number of columns must be a multiple of 4 (2:4 groups); pad")


def _sparsify(x, algo, gradient, backend, mul0=1.0, mul1=1.0) -> Sparse24Tensor:
    if isinstance(x, Sparse24Tensor):
        return x
    if algo not in _ALGORITHMS:
        raise InputError(f"Unknown algorithm {algo!r}; use one of {sorted(_ALGORITHMS)}")
    if gradient not in _GRADIENTS:
        raise InputError(f"gradient must be one of {_GRADIENTS}, got {gradient!r}")
    if backend not in _BACKENDS:
        raise InputError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _check_input(x)
    mask = _nm_mask(x.detach(), _ALGORITHMS[algo], 2, 4)
    return Sparse24Tensor._wrap(_Sparsify24.apply(x, mask, gradient, mul0, mul1), _Pattern(mask))


def sparsify24(x: torch.Tensor, algo: str = "", gradient: str = GRADIENT_SP24,
               backend: str = BACKEND_CUTLASS) -> Sparse24Tensor:
    """Keep the 2 largest-magnitude entries of every 4 consecutive entries of each row of ``x``.

    Args:
        x: ``[rows, cols]`` floating point, cols a multiple of 4 (a Sparse24Tensor is returned as is).
        algo: ``""`` (magnitude), or xFormers' names: ``"largest_abs_values_greedy"``,
            ``"largest_abs_notranspose"`` (magnitude), ``"largest_values_greedy"``, ``"largest_notranspose"``
            (signed value).
        gradient: ``"24sparse"`` / ``"24dense"`` (gradient masked by the pattern) or ``"ste"`` (passed through).
        backend: ``"cutlass"``, ``"cusparselt"`` (both: torch's 2:4 kernels, torch's choice of library) or
            ``"dense"``.

    Raises:
        InputError: not 2-D, not floating point, cols not a multiple of 4, unknown algo/gradient/backend.
    """
    return _sparsify(x, algo, gradient, backend)


def sparsify24_ste(x: torch.Tensor, algo: str = "", backend: str = BACKEND_CUTLASS, bw_mul0: float = 1.0,
                   bw_mul1: float = 1.0) -> Sparse24Tensor:
    """:func:`sparsify24` with a straight-through gradient scaled by ``bw_mul0`` on pruned and ``bw_mul1`` on
    kept entries."""
    return _sparsify(x, algo, GRADIENT_STE, backend, float(bw_mul0), float(bw_mul1))


def sparsify24_like(x: torch.Tensor, pattern: torch.Tensor, gradient: str = GRADIENT_SP24, backend: str = "",
                    out_dense: bool | None = None) -> torch.Tensor:
    """``x`` masked with the pattern of the Sparse24Tensor ``pattern``; dense when ``out_dense`` or
    ``backend == "dense"``.

    Raises:
        ValueError: ``pattern`` is not a Sparse24Tensor, or its shape differs from ``x``'s.
    """
    if not isinstance(pattern, Sparse24Tensor):
        raise ValueError(f"pattern must be a Sparse24Tensor (from sparsify24), got {type(pattern).__name__}")
    if tuple(x.shape) != tuple(pattern.shape):
        raise ValueError(f"x.shape={tuple(x.shape)} differs from pattern.shape={tuple(pattern.shape)}")
    if gradient not in _GRADIENTS:
        raise InputError(f"gradient must be one of {_GRADIENTS}, got {gradient!r}")
    mask = pattern.threads_masks
    values = _Sparsify24.apply(x, mask, gradient, 1.0, 1.0)
    if out_dense or backend == BACKEND_DENSE:
        return values
    return Sparse24Tensor._wrap(values, pattern._pattern)
