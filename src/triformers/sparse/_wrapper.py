"""What every sparse tensor subclass shares: a ``torch.Tensor`` wrapper over ``values`` and a pattern object.

A subclass stores its non-zeros in ``values`` (a plain tensor, the leaf autograd sees) and its structure in a
pattern object (look-up tables, built once and shared). This base class forwards the tensor plumbing to
``values``: ``.grad``, ``requires_grad_``, ``detach``, ``clone``, ``copy_``, ``equal``, ``to(device)``,
``deepcopy``, dropout and scaling; tensor metadata (``shape``, ``dtype``, ``dim()``, ...) is the wrapper's own.
Subclasses define ``_wrap(values, pattern)``, ``_pattern``, ``_same_pattern(other)``, ``_product(a, b)``,
``_masked_product(a, b, mask)`` and, for operations of their own, ``_handle(func, args, kwargs)`` (return
``NotImplemented`` to fall through to the shared ones).
"""

from __future__ import annotations

import copy
import numbers

import torch
import torch.nn.functional as F

from triformers.ops.common import InputError
from triformers.sparse._masked_matmul import masked_matmul

_METADATA = {
    torch.Tensor.dim, torch.Tensor.ndimension, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.nelement,
    torch.Tensor.element_size, torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.__len__,
    torch.Tensor.get_device, torch.Tensor.is_contiguous, torch.Tensor.__setstate__,
}
_SCALES = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
_DIVS = {torch.div, torch.Tensor.div, torch.Tensor.__truediv__}
_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_DROPOUTS = {F.dropout, torch.dropout, torch.nn.functional.dropout}
_EQUALS = {torch.equal, torch.Tensor.equal}
_MATMULS = {torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm, torch.Tensor.__matmul__}
_SOFTMAXES = {torch.softmax, torch.Tensor.softmax, F.softmax}
_TRANSPOSES = {torch.transpose, torch.Tensor.transpose}


class SparseWrapper(torch.Tensor):
    """Base class of the sparse tensors (not public)."""

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # every supported operation is handled above the dispatcher (__torch_function__) on plain tensors
        raise NotImplementedError(f"{cls.__name__} does not support {func}; use .to_dense() first")

    @classmethod
    def _new(cls, shape, values: torch.Tensor, pattern):
        out = torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=values.dtype, device=values.device, requires_grad=values.requires_grad
        )
        out._sparse_values = values
        out._sparse_pattern = pattern
        return out

    def values(self) -> torch.Tensor:
        """The stored non-zeros (differentiable leaf or result)."""
        return self._sparse_values

    @property
    def _pattern(self):
        return self._sparse_pattern

    def _rewrap(self, values: torch.Tensor):
        """A tensor of the same pattern holding ``values``."""
        return self._wrap(values, self._sparse_pattern)

    def _values_of(self, other) -> torch.Tensor:
        """``other``'s values on this pattern (``other`` sparse of the same pattern, or dense)."""
        if isinstance(other, type(self)):
            if not self._same_pattern(other):
                raise InputError(
                    f"the two {type(self).__name__}s have different sparsity patterns; convert one with .to_dense()"
                )
            return other.values()
        return self._from_dense_values(other)

    # --- autograd and copies ----------------------------------------------------------------------------------
    @property
    def grad(self):
        g = self._sparse_values.grad
        return None if g is None else self._rewrap(g)

    @grad.setter
    def grad(self, value):
        self._sparse_values.grad = None if value is None else self._values_of(value)

    @property
    def requires_grad(self) -> bool:
        return self._sparse_values.requires_grad

    def requires_grad_(self, requires_grad: bool = True):
        self._sparse_values.requires_grad_(requires_grad)
        return self

    def detach(self):
        return self._rewrap(self._sparse_values.detach())

    def clone(self, *, memory_format=None):  # noqa: ARG002
        return self._rewrap(self._sparse_values.clone())

    def __deepcopy__(self, memo):
        out = self._wrap(copy.deepcopy(self._sparse_values, memo), self._sparse_pattern)
        memo[id(self)] = out
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    @classmethod
    def _handle(cls, func, args, kwargs):  # noqa: ARG003
        """A subclass's own operations (before the shared ones); NotImplemented for the others."""
        return NotImplemented

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # below, our own code reads .shape, .dtype, ... of the wrappers directly (a __torch_function__ round
        # trip each would cost microseconds of host time per product)
        with torch._C.DisableTorchFunctionSubclass():
            return cls._dispatch(func, args, kwargs)

    @classmethod
    def _dispatch(cls, func, args, kwargs):
        out = cls._handle(func, args, kwargs)
        if out is not NotImplemented:
            return out
        if func in _MATMULS:
            return cls._product(*args)
        if func is torch.Tensor.__rmatmul__:
            return cls._product(args[1], args[0])
        if func is masked_matmul:
            return cls._masked_product(*args, **kwargs)
        if func in _SOFTMAXES:
            dim = kwargs.pop("dim", args[1] if len(args) > 1 else None)
            if dim is None:
                raise InputError(f"softmax of a {cls.__name__} needs dim=-1")
            return args[0].softmax(dim, kwargs.get("dtype"))
        if func in _TRANSPOSES:
            return args[0].transpose(*args[1:], **kwargs)
        if func in _METADATA or getattr(func, "__name__", None) == "__get__":  # shape, dtype, device, dim(), ...
            return func(*args, **kwargs)
        if func in _DROPOUTS:
            return _dropout(*args, **kwargs)
        if func in _SCALES or func in _DIVS or func in _ADDS:
            return _elementwise(func, *args, **kwargs)
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            x = args[0]
            v = func(x.values(), *args[1:], **kwargs)
            return x._wrap(v, x._pattern.to(v.device))
        if func is torch.Tensor.copy_:
            dst, src = args[0], args[1]
            dst.values().copy_(dst._values_of(src))
            return dst
        if func in _EQUALS:
            a, b = args
            return type(a) is type(b) and a._same_pattern(b) and torch.equal(a.values(), b.values())
        if func is torch.Tensor.to_dense:
            return args[0].to_dense()
        if func in (torch.Tensor.detach, torch.Tensor.clone, torch.Tensor.requires_grad_):
            return getattr(cls, func.__name__)(*args, **kwargs)
        raise NotImplementedError(
            f"{cls.__name__} does not support {getattr(func, '__name__', func)}; use .to_dense() first"
        )


def _dropout(x, p: float = 0.5, train: bool = True, inplace: bool = False, training=None):  # noqa: ARG001
    if training is not None:
        train = training
    return x._rewrap(F.dropout(x.values(), p, train))  # never in place: values may be shared


def _elementwise(func, a, b, *rest, **kwargs):
    x, other = (a, b) if isinstance(a, SparseWrapper) else (b, a)
    scalar = isinstance(other, numbers.Number) or (
        isinstance(other, torch.Tensor) and not isinstance(other, SparseWrapper) and other.dim() == 0
    )
    if scalar:
        if func in _ADDS:
            raise NotImplementedError(f"adding a number to a {type(x).__name__} would fill its missing entries")
        if func in _DIVS and x is not a:
            raise NotImplementedError(f"dividing by a {type(x).__name__} divides by its missing zeros")
        return x._rewrap((torch.mul if func in _SCALES else torch.div)(x.values(), other))
    if isinstance(other, SparseWrapper) and func not in _DIVS:
        op = torch.add if func in _ADDS else torch.mul
        return x._rewrap(op(x.values(), x._values_of(other), *rest, **kwargs))
    if isinstance(other, torch.Tensor) and func in _SCALES:  # the dense factor read at the stored entries
        return x._rewrap(x.values() * x._values_of(other))
    raise NotImplementedError(
        f"{type(x).__name__} supports scaling by a number, * with a dense tensor of its shape, and + and * with "
        f"the same pattern (got {type(other).__name__}); use .to_dense()"
    )
