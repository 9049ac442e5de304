"""RMSNorm (xFormers' ``xformers.ops.rmsnorm``), trainable where xFormers' is inference-only.

``y = x / sqrt(mean(x²) + eps) * weight`` over the last dim, statistics in float32. The kernels are the
LayerNorm family's with the centring dropped (``triformers.triton._kernels.norm``):

* forward: one read of x, one write of y (2·M·N·s bytes, the floor). Eager torch (x.pow(2), mean,
  rsqrt, two multiplies, casts) makes ~5 passes over M·N.
* ``rms_norm_add``: x += y and the normalisation in the same pass: reads x and y, writes x and the
  output (4·M·N·s) instead of 6·M·N·s for an add followed by a norm.
* backward: reads x and dy, writes dx (3·M·N·s); dw through a two-stage reduction (per-program float32
  partial rows, summed by torch).

Output dtype: x's (float32 under autocast, as for LayerNorm). CPU tensors without Triton's interpreter
run :func:`rms_norm_reference`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from triformers.triton._common import autocast_dtype, device_type, rows_2d, shaped, use_triton
from triformers.triton._kernels.norm import norm_bwd, norm_fwd

__all__ = ["rms_norm", "rms_norm_add", "RMSNorm", "rms_norm_reference"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """Pure-torch RMSNorm over the last dim (float32 maths, float64 for float64 inputs); x's dtype out."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    y = xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(compute)
    return y.to(x.dtype)


def _check(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> None:
    if not x.is_floating_point():
        raise ValueError(f"rms_norm needs a floating-point x, got x.dtype={x.dtype}")
    n = x.shape[-1] if x.dim() else 1
    if weight is not None and tuple(weight.shape) != (n,):
        raise ValueError(
            f"weight.shape={tuple(weight.shape)} does not match the last dim of x.shape={tuple(x.shape)}; "
            f"pass a 1-D weight of size {n} (or None)"
        )
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got eps={eps}")


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        x2 = rows_2d(x)  # [M, N]
        y, _, rstd = norm_fwd(x2, weight, None, eps, rms=True, out_dtype=out_dtype)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return shaped(y, x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw, _ = norm_bwd(
            rows_2d(dy), x2, weight, None, rstd, rms=True, dx_dtype=ctx.x_dtype,
            compute_dw=ctx.needs_input_grad[1], compute_db=False,
            param_dtype=weight.dtype if weight is not None else torch.float32,
        )  # fmt: skip
        return shaped(dx, ctx.x_shape), dw, None, None


class _RMSNormAddFn(torch.autograd.Function):
    """x += y (in place) then RMSNorm; outputs (the updated x, the normalised rows)."""

    @staticmethod
    def forward(ctx, x, y, weight, eps, out_dtype):
        x2 = rows_2d(x)  # a view: the kernel writes x + y into x through it
        out, _, rstd = norm_fwd(x2, weight, None, eps, rms=True, out_dtype=out_dtype, residual=rows_2d(y))
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, weight, rstd)
        ctx.y_dtype = y.dtype
        return x, out.view(x.shape)

    @staticmethod
    def backward(ctx, dsum, dout):
        s, weight, rstd = ctx.saved_tensors
        dw = None
        ds = dsum
        if dout is not None:
            dnorm, dw, _ = norm_bwd(
                rows_2d(dout),
                rows_2d(s),
                weight,
                None,
                rstd,
                rms=True,
                dx_dtype=torch.float32,
                compute_dw=ctx.needs_input_grad[2],
                compute_db=False,
            )
            dnorm = dnorm.view(s.shape)
            ds = dnorm if dsum is None else dsum + dnorm
        if ds is None:
            return None, None, None, None, None
        dw = dw.to(weight.dtype) if dw is not None else None
        return ds.to(s.dtype), ds.to(ctx.y_dtype), dw, None, None


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if autocast_dtype(device_type(x)) is not None else x.dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: ``x * rsqrt(mean(x², -1) + eps) * weight``.

    Args:
        x: input ``[..., N]``, float16/bfloat16/float32, any strides.
        weight: scale ``[N]`` or None.
        eps: added to the mean square (default 1e-6).

    Returns:
        Tensor of x's shape and dtype (float32 under autocast).

    Raises:
        ValueError: if weight is not ``[N]`` or eps is negative.
    """
    _check(x, weight, eps)
    out_dtype = _out_dtype(x)
    if x.numel() == 0 or not use_triton("rms_norm", x, weight):
        return rms_norm_reference(x, weight, eps).to(out_dtype)
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return _RMSNormFn.apply(x, weight, float(eps), out_dtype)
    y, _, _ = norm_fwd(rows_2d(x), weight, None, float(eps), rms=True, out_dtype=out_dtype, store_stats=False)
    return shaped(y, x.shape)


def rms_norm_add(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """``x += y`` in place, then :func:`rms_norm` of the updated x, in one pass.

    Args:
        x: residual stream ``[..., N]``, updated in place.
        y: increment of x's shape.
        weight: scale ``[N]`` or None.
        eps: added to the mean square (default 1e-6).

    Returns:
        ``rms_norm(x + y, weight, eps)`` (x holds ``x + y`` afterwards).

    Raises:
        ValueError: on mismatched shapes, or when x cannot be written through a single view.
    """
    _check(x, weight, eps)
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(
            f"rms_norm_add needs y.shape == x.shape, got y.shape={tuple(y.shape)}, x.shape={tuple(x.shape)}"
        )
    out_dtype = _out_dtype(x)
    triton_ok = x.numel() > 0 and use_triton("rms_norm_add", x, y, weight)
    if triton_ok:
        try:
            x.view(-1, x.shape[-1])
        except RuntimeError:
            triton_ok = False  # no single [M, N] view to write through: the torch path adds in place
    if not triton_ok:
        x.add_(y)
        return rms_norm_reference(x, weight, eps).to(out_dtype)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, y, weight)):
        return _RMSNormAddFn.apply(x, y, weight, float(eps), out_dtype)[1]
    out, _, _ = norm_fwd(
        rows_2d(x),
        weight,
        None,
        float(eps),
        rms=True,
        out_dtype=out_dtype,
        residual=rows_2d(y),
        store_stats=False,
    )
    return shaped(out, x.shape)


class RMSNorm(nn.Module):
    """RMSNorm layer.

    Args:
        dim: size of the normalised last dim.
        include_weight: learn a per-channel scale initialised to 1 (default True).
        eps: added to the mean square (default 1e-6).
    """

    def __init__(self, dim: int, include_weight: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"RMSNorm needs dim > 0, got dim={dim}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if include_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def increment_and_forward_(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x += y`` in place, then return the normalised x."""
        return rms_norm_add(x, y, self.weight, self.eps)
