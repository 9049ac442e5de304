"""Activations and their derivatives as ``@triton.jit`` helpers, selected by a constexpr index.

The formulas are those of :mod:`triformers.components.activations` (the pure-torch reference); the
index map is xFormers' ``get_triton_activation_index``: None 0, relu 1, leaky_relu 2, gelu 3,
squared_relu 4, smelu 5, star_relu 6. Inputs are float32 (the kernels upcast before calling).

GeLU is the exact x·Φ(x), with erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, so |GeLU error|
< 2.2e-7: below float32 resolution for |x| > 2, invisible after a 16-bit rounding). libdevice's erff
costs ~36 instructions per element in these kernels (SASS count, sm_90), which made the fused dropout
+ GeLU forward compute-bound at ~55 % of the H100's bandwidth. Here, with q(x) = ½·erfc(|x|/√2) =
min(Φ(x), 1 - Φ(x)) from the A&S polynomial (halved coefficients) times exp(-x²/2):

    GeLU(x) = max(x, 0) - |x|·q(x)        Φ(x) = q(x) if x < 0 else 1 - q(x)

(both cases of x·Φ(x) in one expression, no select), with one reciprocal and one exp2 as single
approximate GPU instructions (``rcp.approx.ftz``, ``ex2.approx.ftz``: ~2⁻²² relative error). exp(-x²/2)
is shared with the derivative Φ(x) + x·φ(x).
"""

from __future__ import annotations

import triton
import triton.language as tl

from triformers._triton import interpret_mode
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
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
# Abramowitz & Stegun 7.1.26: erf(z) = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-z²), t = 1 / (1 + p z);
# here z = |x| / √2, so t = 1 / (1 + (p / √2)|x|), and the a_k are halved: ½ erfc(z) = t·poly(t)·exp(-x²/2).
_AS_P_SQRT2 = tl.constexpr(0.3275911 * 0.7071067811865476)
_AS_A1 = tl.constexpr(0.5 * 0.254829592)
_AS_A2 = tl.constexpr(0.5 * -0.284496736)
_AS_A3 = tl.constexpr(0.5 * 1.421413741)
_AS_A4 = tl.constexpr(0.5 * -1.453152027)
_AS_A5 = tl.constexpr(0.5 * 1.061405429)
_NEG_HALF_LOG2E = tl.constexpr(-0.5 * 1.4426950408889634)  # exp(-x²/2) = exp2(x² * this)
# On the GPU: one-instruction approximate reciprocal and exp2 (PTX rcp.approx.ftz / ex2.approx.ftz); the
# interpreter runs the plain forms (it has no inline assembly).
_FAST_MATH = tl.constexpr(not interpret_mode())


@triton.jit
def _rcp(x):
    if _FAST_MATH:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _exp2(x):
    if _FAST_MATH:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


def get_triton_activation_index(activation: Activation | str | None) -> int:
    """The constexpr ``ACTIVATION`` index of an activation (0 for None)."""
    return _INDEX[to_activation(activation)]


@triton.jit
def _gelu_parts(x):
    """(q, exp(-x²/2)) for float32 x, q = ½·erfc(|x|/√2) = min(Φ(x), 1 - Φ(x))."""
    t = _rcp(1.0 + _AS_P_SQRT2 * tl.abs(x))
    e = _exp2(x * x * _NEG_HALF_LOG2E)
    poly = t * (_AS_A1 + t * (_AS_A2 + t * (_AS_A3 + t * (_AS_A4 + t * _AS_A5))))
    return poly * e, e


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr):
    """f(x) for the activation index ``ACTIVATION`` (x float32)."""
    if ACTIVATION == 1:
        y = tl.maximum(x, 0.0)
    elif ACTIVATION == 2:
        y = tl.where(x > 0, x, x * _SLOPE)
    elif ACTIVATION == 3:
        q, _ = _gelu_parts(x)
        y = tl.maximum(x, 0.0) - tl.abs(x) * q
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
        q, e = _gelu_parts(x)
        d = tl.where(x < 0, q, 1.0 - q) + x * e * _INV_SQRT_2PI
    elif ACTIVATION == 4:
        d = 2.0 * tl.maximum(x, 0.0)
    elif ACTIVATION == 5:
        d = tl.where(x >= _BETA, 1.0, tl.where(x <= -_BETA, 0.0, (x + _BETA) / (2.0 * _BETA)))
    elif ACTIVATION == 6:
        d = (2.0 * _STAR_SCALE) * tl.maximum(x, 0.0)
    else:
        d = tl.full(x.shape, 1.0, tl.float32)
    return d
