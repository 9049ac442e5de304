"""Fused linear layer: y = activation(x Wᵀ + b) (xFormers' ``xformers.triton.FusedLinear``), trainable.

Forward: the GEMM through torch (cuBLAS) with the bias in its epilogue, then one Triton pass applies
the activation (reads z = x Wᵀ + b, writes y; in training z is kept for the backward, the least it
needs). Backward: one fused pass computes dz = dy ⊙ f'(z) and the bias gradient (two-stage column sums),
reading dy and z and writing dz, where eager torch writes f'(z), reads it back, and reduces dz in a
separate pass; then dx = dz W and dW = dzᵀ x through cuBLAS.

Why not the activation in a Triton GEMM's epilogue? Measured on an H100 (bf16, 8192 x 4096 x 4096): a
Triton GEMM with the bias + gelu epilogue ran at 555 TFLOP/s (485 storing z too), cuBLAS addmm at 705;
the separate activation pass costs 47 µs, so cuBLAS + pass takes 0.437 ms against 0.496 (0.567) ms.
The ~134 MB the epilogue saves are worth less than cuBLAS's lead at this size.

Under autocast x, W and b are cast to the autocast dtype, as ``F.linear`` is. CPU tensors without
Triton's interpreter run :func:`fused_linear_reference`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from triformers.components.activations import Activation, activation_fn, to_activation
from triformers.triton._common import autocast_dtype, device_type, rows_2d, use_triton
from triformers.triton._kernels.activations import get_triton_activation_index
from triformers.triton._kernels.dropout import dropout_bwd, dropout_fwd

__all__ = ["FusedLinear", "fused_linear", "fused_linear_reference"]


def fused_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: Activation | str | None = None,
) -> torch.Tensor:
    """Pure torch: ``activation(F.linear(x, weight, bias))``."""
    return activation_fn(activation, nn.functional.linear(x, weight, bias))


def _linear_act(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: int):
    """``(y, z)``: z = x Wᵀ + b by cuBLAS (bias in its epilogue), y = f(z) by one Triton pass."""
    z = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()  # [M, N]
    if activation == 0:
        return z, z
    return dropout_fwd(z, None, 0.0, 0, activation, z.dtype), z


class _FusedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        x2 = rows_2d(x)  # [M, K]
        y, z = _linear_act(x2, weight, bias, activation)
        ctx.save_for_backward(x2, weight, z if activation != 0 else None)
        ctx.activation, ctx.x_shape, ctx.has_bias = activation, x.shape, bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, z = ctx.saved_tensors
        dy2 = rows_2d(dy)  # [M, N]
        compute_db = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.activation != 0:
            dz, db = dropout_bwd(
                dy2, z, None, 0.0, 0, ctx.activation, dx_dtype=z.dtype, compute_db=compute_db, db_dtype=weight.dtype
            )
        else:
            dz = dy2
            db = dy2.sum(0, dtype=torch.float32) if compute_db else None
        dx = (dz @ weight).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dw = dz.t() @ x2 if ctx.needs_input_grad[1] else None
        db = db.to(weight.dtype) if db is not None else None
        return dx, dw, db, None


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: Activation | str | None = None,
) -> torch.Tensor:
    """``activation(x @ weight.T + bias)`` with the bias and activation fused into the GEMM.

    Args:
        x: input ``[..., K]``.
        weight: ``[N, K]`` (``nn.Linear`` layout), x's dtype.
        bias: optional ``[N]``.
        activation: optional :class:`Activation` or its name (default None).

    Returns:
        Tensor ``[..., N]``.

    Raises:
        ValueError: on mismatched shapes or dtypes, or an unknown activation.
    """
    act = to_activation(activation)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight.shape={tuple(weight.shape)} does not fit x.shape={tuple(x.shape)}; weight must be "
            f"[out_features, {x.shape[-1]}]"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias.shape={tuple(bias.shape)} must be ({weight.shape[0]},) for weight.shape={tuple(weight.shape)}"
        )
    amp = autocast_dtype(device_type(x))
    if amp is not None:
        x, weight = x.to(amp), weight.to(amp)
        bias = bias.to(amp) if bias is not None else None
    elif x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(
            f"x.dtype={x.dtype}, weight.dtype={weight.dtype}, "
            f"bias.dtype={None if bias is None else bias.dtype} "
            "differ; cast them to one dtype or run under torch.autocast"
        )
    if x.numel() == 0 or not use_triton("FusedLinear", x, weight, bias):
        with torch.autocast(x.device.type, enabled=False):
            return fused_linear_reference(x, weight, bias, act)
    index = get_triton_activation_index(act)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _FusedLinearFn.apply(x, weight, bias, index)
    y, _ = _linear_act(rows_2d(x), weight, bias, index)
    return y.view(*x.shape[:-1], weight.shape[0])


class FusedLinear(nn.Module):
    """``activation(x Wᵀ + b)`` as one fused GEMM; initialised like ``nn.Linear``.

    Args:
        in_features: size of x's last dim.
        out_features: size of the output's last dim.
        bias: learn a bias (default False, as in xFormers).
        activation: optional :class:`Activation` or its name (default None).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        activation: Activation | str | None = None,
        **_,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"FusedLinear needs positive sizes, got in_features={in_features}, out_features={out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.activation = to_activation(activation)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform weight and uniform bias, as ``nn.Linear``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_linear(x, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        act = self.activation.value if self.activation is not None else None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation={act}"
        )
