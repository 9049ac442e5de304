"""Fused softmax / log-softmax (xFormers' ``xformers.triton.softmax``), trainable.

Last-dim (log-)softmax with an optional additive ``mask`` (shared across the batch, indexed by the query
row ``x.shape[-2]``, gradient included when it requires grad) and ``causal`` (hides j > i). Forward and
backward are one pass each (``triformers.triton._kernels.softmax`` counts the traffic). Computes in
float32; output in x's dtype (float32 under autocast, torch's autocast policy for softmax). CPU tensors
without Triton's interpreter run :func:`softmax_reference`.
"""

from __future__ import annotations

import torch

from triformers.triton._common import autocast_dtype, device_type, rows_2d, shaped, use_triton
from triformers.triton._kernels.softmax import softmax_bwd, softmax_fwd

__all__ = ["softmax", "log_softmax", "softmax_reference", "log_softmax_reference"]


def _reference(x, mask, causal, log):
    compute = torch.promote_types(x.dtype, torch.float32)
    z = x.to(compute)
    if mask is not None:
        z = z + mask.to(compute)
    if causal:
        m, n = (x.shape[-2], x.shape[-1]) if x.dim() >= 2 else (1, x.shape[-1])
        hide = torch.ones(m, n, dtype=torch.bool, device=x.device).triu(1)
        z = z.masked_fill(hide if x.dim() >= 2 else hide[0], float("-inf"))
    y = torch.log_softmax(z, -1) if log else torch.softmax(z, -1)
    return y.to(x.dtype)


def softmax_reference(x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Pure-torch softmax of ``x + mask`` over the last dim (j > i hidden when causal); x's dtype out."""
    return _reference(x, mask, causal, log=False)


def log_softmax_reference(x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Pure-torch log-softmax, as :func:`softmax_reference`."""
    return _reference(x, mask, causal, log=True)


def _mask_2d(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask as a [M, N] view (broadcast dims get stride 0), after checking it."""
    if mask is None:
        return None
    if not mask.is_floating_point():
        raise ValueError(
            f"mask must be additive (floating point), got mask.dtype={mask.dtype}; "
            "for a boolean keep-mask pass "
            "torch.zeros_like(keep, dtype=x.dtype).masked_fill(~keep, float('-inf'))"
        )
    m, n = (x.shape[-2], x.shape[-1]) if x.dim() >= 2 else (1, x.shape[-1])
    if any(d != 1 for d in mask.shape[:-2]):
        raise ValueError(
            f"mask.shape={tuple(mask.shape)} varies across the batch; the fused softmax shares one [M, N] = "
            f"[{m}, {n}] mask over every leading dim of x.shape={tuple(x.shape)} "
            "(add a per-batch mask to x first)"
        )
    try:
        return mask.reshape(mask.shape[-2:] if mask.dim() >= 2 else mask.shape).expand(m, n)
    except RuntimeError:
        raise ValueError(
            f"mask.shape={tuple(mask.shape)} does not broadcast to x's last two dims [{m}, {n}] "
            f"(x.shape={tuple(x.shape)})"
        ) from None


class _SoftmaxFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, causal, log, out_dtype):
        seq_m = x.shape[-2] if x.dim() >= 2 else 1
        y = softmax_fwd(rows_2d(x), _mask_2d(x, mask), seq_m, log=log, causal=causal, out_dtype=out_dtype)
        ctx.save_for_backward(y)
        ctx.log, ctx.x_shape, ctx.x_dtype, ctx.seq_m = log, x.shape, x.dtype, seq_m
        ctx.mask_shape = None if mask is None else mask.shape
        ctx.mask_dtype = None if mask is None else mask.dtype
        return shaped(y, x.shape)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dx = softmax_bwd(
            rows_2d(dy), y, log=ctx.log, dx_dtype=torch.float32 if ctx.needs_input_grad[1] else ctx.x_dtype
        )
        dmask = None
        if ctx.needs_input_grad[1]:
            # d(x + mask) = dx, summed over every row sharing a mask row, then back to mask's broadcast shape.
            full = dx.view(-1, ctx.seq_m, dx.shape[-1]).sum(0)  # [M, N]
            dmask = full.sum_to_size(ctx.mask_shape).to(ctx.mask_dtype)
        dx = shaped(dx.to(ctx.x_dtype), ctx.x_shape) if ctx.needs_input_grad[0] else None
        return dx, dmask, None, None, None


def _softmax(x, mask, causal, log, name):
    if not x.is_floating_point():
        raise ValueError(f"{name} needs a floating-point x, got x.dtype={x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} needs at least one dim, got a 0-d x")
    mask2 = _mask_2d(x, mask)
    out_dtype = torch.float32 if autocast_dtype(device_type(x)) is not None else x.dtype
    if x.numel() == 0 or not use_triton(name, x, mask):
        reference = log_softmax_reference if log else softmax_reference
        return reference(x, mask, causal).to(out_dtype)
    if torch.is_grad_enabled() and (x.requires_grad or (mask is not None and mask.requires_grad)):
        return _SoftmaxFn.apply(x, mask, bool(causal), log, out_dtype)
    seq_m = x.shape[-2] if x.dim() >= 2 else 1
    y = softmax_fwd(rows_2d(x), mask2, seq_m, log=log, causal=bool(causal), out_dtype=out_dtype)
    return shaped(y, x.shape)


def softmax(x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Softmax over the last dim of ``x + mask``, hiding j > i when ``causal``.

    Args:
        x: logits ``[..., M, N]`` (or ``[N]``), float16/bfloat16/float32, any strides.
        mask: optional additive mask broadcastable to ``[M, N]``, shared by every leading index of x.
        causal: hide column j from row i when j > i (default False).

    Returns:
        Probabilities, x's shape and dtype (float32 under autocast).

    Raises:
        ValueError: on a non-floating mask or one that does not broadcast to ``[M, N]``.
    """
    return _softmax(x, mask, causal, False, "softmax")


def log_softmax(x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Log-softmax over the last dim of ``x + mask``; arguments as :func:`softmax`."""
    return _softmax(x, mask, causal, True, "log_softmax")
