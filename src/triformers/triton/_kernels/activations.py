"""Activations and their derivatives as ``@triton.jit`` helpers, selected by a constexpr index.

The formulas are those of :mod:`triformers.components.activations` (the pure-torch reference); the
index map is xFormers' ``get_triton_activation_index``: None 0, relu 1, leaky_relu 2, gelu 3,
squared_relu 4, smelu 5, star_relu 6. Inputs are float32 (the kernels upcast before calling).
"""

from __future__ import annotations

import triton
import triton.language as tl

from triformers.components.activations import (
    LEAKY_RELU_SLOPE,
    SMELU_BETA,
    STAR_RELU_BIAS,
    STAR_RELU_SCALE,
    Activation,
    to_activation,
)

_INDEX = {
    None: 0,
    Activation.ReLU: 1,
    Activation.LeakyReLU: 2,
    Activation.GeLU: 3,
    Activation.SquaredReLU: 4,
    Activation.SmeLU: 5,
    Activation.StarReLU: 6,
}

_SLOPE = tl.constexpr(LEAKY_RELU_SLOPE)
_BETA = tl.constexpr(SMELU_BETA)
_STAR_SCALE = tl.constexpr(STAR_RELU_SCALE)
_STAR_BIAS = tl.constexpr(STAR_RELU_BIAS)
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


def get_triton_activation_index(activation: Activation | str | None) -> int:
    """The constexpr ``ACTIVATION`` index of an activation (0 for None)."""
    return _INDEX[to_activation(activation)]


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr):
    """f(x) for the activation index ``ACTIVATION`` (x float32)."""
    if ACTIVATION == 1:
        y = tl.maximum(x, 0.0)
    elif ACTIVATION == 2:
        y = tl.where(x > 0, x, x * _SLOPE)
    elif ACTIVATION == 3:
        y = 0.5 * x * (1.0 + tl.math.erf(x * _INV_SQRT2))
    elif ACTIVATION == 4:
        r = tl.maximum(x, 0.0)
        y = r * r
    elif ACTIVATION == 5:
        quad = (x + _BETA) * (x + _BETA) / (4.0 * _BETA)
        y = tl.where(x >= _BETA, x, tl.where(x <= -_BETA, 0.0, quad))
    elif ACTIVATION == 6:
        r = tl.maximum(x, 0.0)
        y = _STAR_SCALE * r * r + _STAR_BIAS
    else:
        y = x
    return y


@triton.jit
def activation_grad(x, ACTIVATION: tl.constexpr):
    """f'(x) for the activation index ``ACTIVATION`` (x float32)."""
    if ACTIVATION == 1:
        d = tl.where(x > 0, 1.0, 0.0)
    elif ACTIVATION == 2:
        d = tl.where(x > 0, 1.0, _SLOPE)
    elif ACTIVATION == 3:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT2))
        d = cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    elif ACTIVATION == 4:
        d = 2.0 * tl.maximum(x, 0.0)
    elif ACTIVATION == 5:
        d = tl.where(x >= _BETA, 1.0, tl.where(x <= -_BETA, 0.0, (x + _BETA) / (2.0 * _BETA)))
    elif ACTIVATION == 6:
        d = (2.0 * _STAR_SCALE) * tl.maximum(x, 0.0)
    else:
        d = tl.full(x.shape, 1.0, tl.float32)
    return d
