"""Activation enum, build_activation, and the pure-torch activations and derivatives."""

import math

import pytest
import torch

from triformers.components.activations import (
    Activation,
    activation_fn,
    activation_grad,
    build_activation,
    to_activation,
)

ALL = [None, *Activation]


def _expected(name, x):
    """The formulas of xFormers' activations, written out independently."""
    relu = torch.clamp(x, min=0)
    return {
        None: x,
        "relu": relu,
        "leaky_relu": torch.where(x > 0, x, 0.01 * x),
        "gelu": 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
        "squared_relu": relu * relu,
        "smelu": torch.where(x >= 2, x, torch.where(x <= -2, torch.zeros_like(x), (x + 2) ** 2 / 8)),
        "star_relu": 0.8944 * relu * relu - 0.4472,
    }[name]


@pytest.mark.parametrize("activation", ALL)
def test_values_and_modules(activation):
    x = torch.linspace(-4, 4, 1001, dtype=torch.float64)
    name = activation.value if activation is not None else None
    expected = _expected(name, x)
    torch.testing.assert_close(activation_fn(activation, x), expected)
    torch.testing.assert_close(activation_fn(name, x), expected)  # plain strings work too
    torch.testing.assert_close(build_activation(activation)(x), expected)


@pytest.mark.parametrize("activation", ALL)
def test_derivative_matches_autograd(activation):
    # points away from the kinks (0, ±2), where the one-sided derivatives differ
    x = torch.linspace(-3.9, 3.9, 79, dtype=torch.float64) + 0.013
    x.requires_grad_()
    (auto,) = torch.autograd.grad(activation_fn(activation, x).sum(), x)
    torch.testing.assert_close(activation_grad(activation, x.detach()), auto)


def test_names_and_errors():
    assert to_activation("GELU") is Activation.GeLU
    assert to_activation(None) is None and to_activation("") is None
    assert isinstance(build_activation(""), torch.nn.Identity)
    assert isinstance(build_activation("leaky_relu"), torch.nn.LeakyReLU)
    assert [a.value for a in Activation] == [
        "squared_relu",
        "gelu",
        "leaky_relu",
        "relu",
        "smelu",
        "star_relu",
    ]
    with pytest.raises(ValueError, match="'swish' is not a known activation"):
        build_activation("swish")
