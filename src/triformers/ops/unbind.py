"""``unbind`` / ``stack_or_none`` that avoid copies (xFormers' ``xformers.ops.unbind``).

``torch.unbind``'s backward stacks the gradients into a new tensor. When those gradients are already
equally spaced views of one buffer (SwiGLU's fused backward computes dw1 and dw2 as the two halves of
one [2H, D] GEMM output), :func:`unbind`'s backward returns a strided view of that buffer instead: no
copy of the packed weight gradient. :func:`stack_or_none` is the forward counterpart: the stacked view
of such tensors, or None when they are not laid out that way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["get_stack_strides", "stack_or_none", "unbind"]


def get_stack_strides(tensors: Sequence[torch.Tensor], dim: int) -> tuple[int, ...] | None:
    """Strides of ``torch.stack(tensors, dim)`` if the tensors are already laid out as its slices.

    That is: same shape and strides, same storage, and offsets ``t0 + i * s`` for a constant ``s``.

    Returns:
        The stacked tensor's strides, or None when there are fewer than two tensors, ``dim`` is out of
        range or the layout does not match.
    """
    if len(tensors) <= 1 or dim > tensors[0].dim() or dim < 0:
        return None
    t0 = tensors[0]
    step = tensors[1].storage_offset() - t0.storage_offset()
    strides = list(t0.stride())
    strides.insert(dim, step)
    storage = t0.untyped_storage().data_ptr()
    for i, t in enumerate(tensors[1:], start=1):
        if t.shape != t0.shape or t.stride() != t0.stride() or t.dtype != t0.dtype or t.device != t0.device:
            return None
        if t.storage_offset() != t0.storage_offset() + i * step:
            return None
        if t.untyped_storage().data_ptr() != storage:
            return None
    return tuple(strides)


def _stack_or_none_fw(tensors: Sequence[torch.Tensor], dim: int) -> torch.Tensor | None:
    strides = get_stack_strides(tensors, dim)
    if strides is None:
        return None
    shape = list(tensors[0].shape)
    shape.insert(dim, len(tensors))
    return tensors[0].as_strided(shape, strides)


class _Unbind(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device
        return x.unbind(dim)

    @staticmethod
    def backward(ctx, *grads):
        if any(g is None for g in grads):
            like = next((g for g in grads if g is not None), None)
            if like is None:
                return None, None
            grads = tuple(torch.zeros_like(like) if g is None else g for g in grads)
        out = _stack_or_none_fw(grads, ctx.dim)
        return (out if out is not None else torch.stack(grads, ctx.dim)), None


class _StackOrNone(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dim, *tensors):
        ctx.dim = dim
        return _stack_or_none_fw(tensors, dim)

    @staticmethod
    def backward(ctx, grad):
        return (None, *grad.unbind(ctx.dim))


def unbind(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    """``torch.unbind(x, dim)`` whose backward stacks the gradients without a copy when it can.

    Args:
        x: tensor to split.
        dim: dimension to remove (negative values count from the end).
    """
    dim = dim % x.dim() if x.dim() else dim
    return _Unbind.apply(x, dim)


def stack_or_none(tensors: Sequence[torch.Tensor], dim: int) -> torch.Tensor | None:
    """The stacked view of ``tensors`` along ``dim`` without copying, or None if their layout forbids it.

    Autograd-aware: gradients of the view flow back to each tensor.
    """
    if not tensors:
        return None
    if dim < 0:
        dim += tensors[0].dim() + 1
    if get_stack_strides(tensors, dim) is None:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _StackOrNone.apply(dim, *tensors)
    return _stack_or_none_fw(tensors, dim)
