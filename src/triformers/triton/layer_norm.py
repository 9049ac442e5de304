"""Fused LayerNorm (xFormers' ``xformers.triton.layer_norm`` / ``FusedLayerNorm``), trainable.

The kernels (``triformers.triton._kernels.norm``) read x once and write y once in the forward, and read
x and dy once and write dx once in the backward, with weight/bias gradients through a two-stage
reduction; eager torch needs several passes for the same (see that module for the traffic count).

Semantics: normalisation over the last dimension, statistics in float32, output in x's dtype
(float32 under autocast, torch's autocast policy for ``layer_norm``). Any leading shape and strides;
rows of any width. CPU tensors without Triton's interpreter run :func:`layer_norm_reference`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from triformers.triton._common import autocast_dtype, device_type, rows_2d, shaped, use_triton
from triformers.triton._kernels.norm import norm_bwd, norm_fwd

__all__ = ["layer_norm", "FusedLayerNorm", "layer_norm_reference"]


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """Pure-torch LayerNorm over the last dim (float32 maths, float64 for float64 inputs); x's dtype out."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    mean = xf.mean(-1, keepdim=True)
    xc = xf - mean
    y = xc * torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def _check(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> None:
    if not x.is_floating_point():
        raise ValueError(f"layer_norm needs a floating-point x, got x.dtype={x.dtype}")
    n = x.shape[-1] if x.dim() else 1
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(
                f"{name}.shape={tuple(t.shape)} does not match the normalised (last) dim of "
                f"x.shape={tuple(x.shape)}; "
                f"pass a 1-D {name} of size {n}"
            )
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got eps={eps}")


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        x2 = rows_2d(x)  # [M, N]
        y, mean, rstd = norm_fwd(x2, weight, bias, eps, rms=False, out_dtype=out_dtype)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        # the parameter gradients are summed straight into the parameters' dtype when they share one
        params = {t.dtype for t in (weight, bias) if t is not None}
        param_dtype = params.pop() if len(params) == 1 else torch.float32
        w_dtype, b_dtype = (t.dtype if t is not None else None for t in (weight, bias))
        ctx.dtypes = (w_dtype, b_dtype, param_dtype)
        return shaped(y, x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        w_dtype, b_dtype, param_dtype = ctx.dtypes
        needs = ctx.needs_input_grad
        dx, dw, db = norm_bwd(
            rows_2d(dy), x2, weight, mean, rstd, rms=False, dx_dtype=ctx.x_dtype,
            compute_dw=needs[1], compute_db=needs[2] and b_dtype is not None, param_dtype=param_dtype,
        )  # fmt: skip
        if dw is not None and dw.dtype != w_dtype:
            dw = dw.to(w_dtype)
        if db is not None and db.dtype != b_dtype:
            db = db.to(b_dtype)
        return shaped(dx, ctx.x_shape), dw, db, None, None


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x``: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    Args:
        x: input ``[..., N]``, float16/bfloat16/float32, any strides.
        weight: optional scale ``[N]`` (default None: no scale).
        bias: optional shift ``[N]`` (default None: no shift).
        eps: added to the variance (default 1e-6).

    Returns:
        Tensor of x's shape; x's dtype (float32 under autocast).

    Raises:
        ValueError: if weight/bias do not have shape ``[N]`` or eps is negative.
    """
    _check(x, weight, bias, eps)
    out_dtype = torch.float32 if autocast_dtype(device_type(x)) is not None else x.dtype
    if x.numel() == 0 or not use_triton("layer_norm", x, weight, bias):
        return layer_norm_reference(x, weight, bias, eps).to(out_dtype)
    if torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
    ):
        return _LayerNormFn.apply(x, weight, bias, float(eps), out_dtype)
    y, _, _ = norm_fwd(rows_2d(x), weight, bias, float(eps), rms=False, out_dtype=out_dtype, store_stats=False)
    return shaped(y, x.shape)


class FusedLayerNorm(nn.Module):
    """LayerNorm over the trailing ``normalized_shape`` dims, with the fused kernels.

    Args:
        normalized_shape: size of the normalised trailing dim(s), an int or a tuple.
        affine: learn a per-element scale (init 1) and shift (init 0) (default True).
        eps: added to the variance (default 1e-6).
    """

    def __init__(self, normalized_shape: int | tuple[int, ...], affine: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if not shape or any(int(d) <= 0 for d in shape):
            raise ValueError(f"normalized_shape must be positive sizes, got normalized_shape={normalized_shape!r}")
        self.normalized_shape = shape
        self.epsilon = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(shape))
            self.bias = nn.Parameter(torch.zeros(shape))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def init_weights(self, *args, **kwargs) -> None:
        """Reset the scale to 1 and the shift to 0."""
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(1.0)
                self.bias.fill_(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k :]) != self.normalized_shape:
            raise ValueError(f"x.shape={tuple(x.shape)} does not end with normalized_shape={self.normalized_shape}")
        if k == 1:
            return layer_norm(x, self.weight, self.bias, self.epsilon)
        w = self.weight.flatten() if self.weight is not None else None
        b = self.bias.flatten() if self.bias is not None else None
        return layer_norm(x.flatten(-k), w, b, self.epsilon).view(x.shape)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.epsilon}, affine={self.weight is not None}"
