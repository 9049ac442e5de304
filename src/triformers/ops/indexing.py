"""Indexed row operations (xFormers' ``xformers.ops.indexing``), on CUDA and, unlike xFormers', on CPU.

``scaled_index_add`` adds scaled rows of ``source`` into selected rows of ``input`` in place (stochastic
depth's "add the kept samples back"); ``index_select_cat`` gathers rows of several tensors into one flat
tensor. Both are trainable for every floating input (``scaling`` too). The kernels and their traffic
count are in ``triformers.ops._triton.indexing``. CPU tensors without Triton's interpreter run the torch
references (``scaled_index_add_reference``, ``index_select_cat_reference``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from triformers.ops._triton.indexing import index_select_fwd, scaled_index_add_bwd, scaled_index_add_fwd
from triformers.triton._common import use_triton

__all__ = ["scaled_index_add", "index_select_cat", "scaled_index_add_reference", "index_select_cat_reference"]


def scaled_index_add_reference(
    input: torch.Tensor,
    index: torch.Tensor,
    source: torch.Tensor,
    scaling: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Pure torch, in place: ``input.index_add_(0, index, scaling * source, alpha=alpha)``."""
    return input.index_add_(0, index, source * scaling if scaling is not None else source, alpha=alpha)


def index_select_cat_reference(sources: Sequence[torch.Tensor], indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pure torch: ``torch.cat([s[i].flatten() for s, i in zip(sources, indices)])``."""
    return torch.cat([s[i.long()].flatten() for s, i in zip(sources, indices)])


def _check_index(name: str, index: torch.Tensor, rows: int | None = None) -> None:
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name} must be a 1-D int32/int64 tensor, got shape {tuple(index.shape)}, dtype {index.dtype}"
        )
    if rows is not None and index.shape[0] != rows:
        raise ValueError(
            f"{name} has {index.shape[0]} entries but source has {rows} rows (source.shape[0]); they must match"
        )


def _check_scaled_index_add(input, index, source, scaling) -> None:
    if input.dim() != 3 or source.dim() != 3:
        raise ValueError(
            f"input and source must be 3-D [B, M, D], got input.shape={tuple(input.shape)}, "
            f"source.shape={tuple(source.shape)}"
        )
    if input.shape[1:] != source.shape[1:]:
        raise ValueError(
            f"input.shape={tuple(input.shape)} and source.shape={tuple(source.shape)} must agree on dims 1 and 2"
        )
    if input.shape[0] < source.shape[0]:
        raise ValueError(
            f"source has more rows ({source.shape[0]}) than input ({input.shape[0]}); index entries "
            "must be unique rows of input"
        )
    _check_index("index", index, source.shape[0])
    if scaling is not None and tuple(scaling.shape) != (input.shape[2],):
        raise ValueError(f"scaling.shape={tuple(scaling.shape)} must be ({input.shape[2]},), the last dim of input")
    devices = {t.device for t in (input, index, source, scaling) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"input, index, source and scaling must be on one device, got {sorted(map(str, devices))}")


class _ScaledIndexAddFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, index, source, scaling, alpha):
        scaled_index_add_fwd(input, index, source, scaling, alpha)
        ctx.mark_dirty(input)
        need_scaling_grad = scaling is not None and ctx.needs_input_grad[3]
        ctx.save_for_backward(index, source if need_scaling_grad else None, scaling)
        ctx.alpha, ctx.source_meta = alpha, (source.shape, source.dtype)
        return input

    @staticmethod
    def backward(ctx, grad):
        index, source, scaling = ctx.saved_tensors
        want_src, want_scaling = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        if not (want_src or want_scaling):
            return grad, None, None, None, None
        like = (
            source
            if source is not None
            else torch.empty(ctx.source_meta[0], device=grad.device, dtype=ctx.source_meta[1])
        )
        gs, gsc = scaled_index_add_bwd(
            grad,
            index,
            like,
            scaling,
            ctx.alpha,
            compute_grad_source=want_src,
            compute_grad_scaling=want_scaling,
        )
        return grad, None, gs, gsc.to(scaling.dtype) if gsc is not None else None, None


def scaled_index_add(
    input: torch.Tensor,
    index: torch.Tensor,
    source: torch.Tensor,
    scaling: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """In place: ``input[index[i]] += alpha * scaling * source[i]``; returns ``input``.

    Equals ``torch.index_add(input, 0, index, scaling * source, alpha=alpha)``. As in xFormers the Triton
    path assumes the entries of ``index`` are unique (repeated rows would race); the torch path accepts
    repeats.

    Args:
        input: ``[B, M, D]``, updated in place.
        index: ``[Bi]`` int32/int64 rows of input.
        source: ``[Bi, M, D]``.
        scaling: optional per-channel scale ``[D]``.
        alpha: scalar factor (default 1.0).

    Raises:
        ValueError: on shapes, dtypes or devices that do not fit together.
    """
    _check_scaled_index_add(input, index, source, scaling)
    if source.numel() == 0 or not use_triton("scaled_index_add", input, source, scaling):
        return scaled_index_add_reference(input, index, source, scaling, alpha)
    if scaling is not None and scaling.stride(0) != 1:
        scaling = scaling.contiguous()  # [D]: negligible
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, source, scaling)):
        return _ScaledIndexAddFn.apply(input, index, source, scaling, float(alpha))
    scaled_index_add_fwd(input, index, source, scaling, float(alpha))
    return input


def _index_select_cat_fwd(sources, indices) -> torch.Tensor:
    sources = [rows_of(s) for s in sources]  # [N_k, D_k]
    total = sum(i.shape[0] * s.shape[1] for s, i in zip(sources, indices))
    dtype = sources[0].dtype
    for s in sources[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    out = torch.empty(total, device=sources[0].device, dtype=dtype)
    offset = 0
    for s, i in zip(sources, indices):
        size = i.shape[0] * s.shape[1]
        index_select_fwd(s, i, out[offset : offset + size])
        offset += size
    return out


class _IndexSelectCatFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        n = len(args) // 2
        ctx.save_for_backward(*args[n:])
        ctx.meta = [(s.shape, s.dtype) for s in args[:n]]
        return _index_select_cat_fwd(args[:n], args[n:])

    @staticmethod
    def backward(ctx, grad):
        indices = ctx.saved_tensors
        grads, offset = [], 0
        for (shape, dtype), i, need in zip(ctx.meta, indices, ctx.needs_input_grad):
            d = 1
            for s in shape[1:]:
                d *= s
            size = i.shape[0] * d
            if need:
                g = torch.zeros((shape[0], d), device=grad.device, dtype=dtype)
                g.index_add_(0, i, grad[offset : offset + size].view(i.shape[0], d).to(dtype))
                grads.append(g.view(shape))
            else:
                grads.append(None)
            offset += size
        return (*grads, *([None] * len(indices)))


def rows_of(s: torch.Tensor) -> torch.Tensor:
    """``s`` as ``[N, D]`` (trailing dims merged; a view when the strides allow)."""
    return s.reshape(s.shape[0], -1) if s.dim() != 2 else s


def index_select_cat(sources: Sequence[torch.Tensor], indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat([s[i].flatten() for s, i in zip(sources, indices)])`` with one gather per source.

    Args:
        sources: tensors ``[N_k, ...]`` (rows along dim 0) on one device.
        indices: one 1-D int32/int64 tensor of row numbers per source (repeats allowed).

    Returns:
        1-D tensor of ``Σ_k len(indices[k]) · D_k`` elements.

    Raises:
        ValueError: on mismatched lengths, 0-d sources or non-integer indices.
    """
    sources, indices = list(sources), list(indices)
    if len(sources) != len(indices) or not sources:
        raise ValueError(f"need one index per source, got {len(sources)} sources and {len(indices)} indices")
    for k, (s, i) in enumerate(zip(sources, indices)):
        if s.dim() == 0:
            raise ValueError(f"sources[{k}] is 0-d; sources need a row dim (dim 0)")
        _check_index(f"indices[{k}]", i)
    devices = {t.device for t in (*sources, *indices)}
    if len(devices) != 1:
        raise ValueError(f"sources and indices must be on one device, got {sorted(map(str, devices))}")
    if sum(s.numel() for s in sources) == 0 or not use_triton("index_select_cat", *sources):
        return index_select_cat_reference(sources, indices)
    if torch.is_grad_enabled() and any(s.requires_grad for s in sources):
        return _IndexSelectCatFn.apply(*sources, *indices)
    return _index_select_cat_fwd(sources, indices)
