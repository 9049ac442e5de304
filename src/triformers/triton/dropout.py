"""Fused dropout(activation(x + bias)) (xFormers' ``xformers.triton.dropout`` / ``FusedDropoutBias``).

One pass forward, one pass backward that regenerates the dropout mask from the seed (no mask is stored);
``triformers.triton._kernels.dropout`` counts the traffic. The drop probability is applied at 16-bit
resolution (:func:`effective_p`: p rounded to a multiple of 2⁻¹⁶) and kept values are scaled by
1 / (1 - effective_p(p)), so the output stays unbiased. Gradients for x and the bias. The seed is drawn
from torch's default generator, so ``torch.manual_seed`` makes a call reproducible. Output dtype: the type
promotion of x and bias (the autocast dtype under autocast). CPU tensors without Triton's interpreter run
:func:`dropout_reference` (torch's own dropout: same distribution, different random stream).
"""

from __future__ import annotations

import torch
from torch import nn

from triformers.components.activations import Activation, activation_fn, to_activation
from triformers.triton._common import autocast_dtype, device_type, rows_2d, shaped, use_triton
from triformers.triton._kernels.activations import get_triton_activation_index
from triformers.triton._kernels.dropout import dropout_bwd, dropout_fwd

__all__ = ["dropout", "FusedDropoutBias", "dropout_reference", "dropout_with_keep_mask", "effective_p"]


def dropout_with_keep_mask(
    x: torch.Tensor,
    keep: torch.Tensor,
    p: float,
    bias: torch.Tensor | None = None,
    activation: Activation | str | None = None,
) -> torch.Tensor:
    """``keep * activation(x + bias) / (1 - p)`` for a given boolean ``keep`` mask (the tests' reference)."""
    z = x + bias if bias is not None else x
    y = activation_fn(activation, z)
    q = effective_p(p)
    return y * keep.to(y.dtype) * (0.0 if q >= 1 else 1.0 / (1.0 - q))


def effective_p(p: float) -> float:
    """The drop probability the kernels apply: p rounded to a multiple of 2⁻¹⁶ (16-bit random numbers)."""
    return round(p * 65536) / 65536


def dropout_reference(
    x: torch.Tensor, p: float, bias: torch.Tensor | None = None, activation: Activation | str | None = None
) -> torch.Tensor:
    """Pure torch: ``torch.nn.functional.dropout(activation(x + bias), p)``."""
    z = x + bias if bias is not None else x
    return nn.functional.dropout(activation_fn(activation, z), p, training=True)


def _new_seed(p: float) -> int:
    """A Philox seed from torch's default generator (none drawn when nothing is dropped)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item()) if p > 0 else 0


class _DropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, p, activation, out_dtype):
        seed = _new_seed(p)
        x2 = rows_2d(x)  # [M, N]
        y = dropout_fwd(x2, bias, p, seed, activation, out_dtype)
        ctx.save_for_backward(x2, bias)
        ctx.p, ctx.seed, ctx.activation, ctx.x_shape, ctx.x_dtype = p, seed, activation, x.shape, x.dtype
        return shaped(y, x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        compute_db = bias is not None and ctx.needs_input_grad[1]
        dx, db = dropout_bwd(
            rows_2d(dy),
            x2,
            bias,
            ctx.p,
            ctx.seed,
            ctx.activation,
            dx_dtype=ctx.x_dtype,
            compute_db=compute_db,
            db_dtype=bias.dtype if bias is not None else torch.float32,
        )
        return shaped(dx, ctx.x_shape), db, None, None, None


def _check(x, p, bias):
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"dropout probability must be in [0, 1], got p={p}")
    if not x.is_floating_point():
        raise ValueError(f"dropout needs a floating-point x, got x.dtype={x.dtype}")
    n = x.shape[-1] if x.dim() else 1
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(
            f"bias.shape={tuple(bias.shape)} does not match the last dim of x.shape={tuple(x.shape)}; "
            f"pass a 1-D bias of size {n}"
        )


def dropout(
    x: torch.Tensor, p: float, bias: torch.Tensor | None = None, activation: Activation | str | None = None
) -> torch.Tensor:
    """``dropout(activation(x + bias), p)`` in one fused pass.

    Args:
        x: input ``[..., N]``, float16/bfloat16/float32, any strides.
        p: probability of zeroing an element, in [0, 1]; kept elements are scaled by 1 / (1 - p).
        bias: optional ``[N]`` added before the activation (default None).
        activation: optional :class:`Activation` or its name (default None: identity).

    Returns:
        Tensor of x's shape.

    Raises:
        ValueError: on p outside [0, 1], a bias not of shape ``[N]`` or an unknown activation.
    """
    p = float(p)
    _check(x, p, bias)
    act = to_activation(activation)
    amp = autocast_dtype(device_type(x))
    out_dtype = amp if amp is not None else (torch.result_type(x, bias) if bias is not None else x.dtype)
    if x.numel() == 0 or not use_triton("dropout", x, bias):
        return dropout_reference(x, p, bias, act).to(out_dtype)
    index = get_triton_activation_index(act)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _DropoutFn.apply(x, bias, p, index, out_dtype)
    return shaped(dropout_fwd(rows_2d(x), bias, p, _new_seed(p), index, out_dtype), x.shape)


class FusedDropoutBias(nn.Module):
    """A learnable bias, an activation and dropout, fused: ``dropout(activation(x + bias), p)``.

    Args:
        p: dropout probability in [0, 1) (dropout is off in eval mode).
        bias_shape: size of the bias (x's last dim), or None for no bias.
        activation: optional :class:`Activation` or its name (default None).
    """

    def __init__(self, p: float, bias_shape: int | None, activation: Activation | str | None = None) -> None:
        super().__init__()
        if not (0.0 <= p < 1.0):
            raise ValueError(f"FusedDropoutBias needs 0 <= p < 1, got p={p}")
        self.p = float(p)
        self.activation = to_activation(activation)
        self.bias = nn.Parameter(torch.zeros(bias_shape)) if bias_shape is not None else None

    def init_weights(self, *args, **kwargs) -> None:
        """Reset the bias to zero."""
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p if self.training else 0.0, self.bias, self.activation)

    def extra_repr(self) -> str:
        act = self.activation.value if self.activation is not None else None
        return f"p={self.p}, bias={None if self.bias is None else tuple(self.bias.shape)}, activation={act}"
