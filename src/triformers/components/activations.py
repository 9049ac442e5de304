"""Activations (xFormers' ``xformers.components.activations``), with their derivatives.

``Activation`` names the activations every fused op accepts (as the enum or its plain string value);
``build_activation`` makes the matching ``nn.Module``. ``activation_fn`` / ``activation_grad`` are the
pure-torch forms the fused kernels are tested against and the torch paths run; the Triton forms live in
``triformers.triton._kernels.activations`` and follow the same formulas:

============  ====================================================  ==========================================
name          f(x)                                                  f'(x)
============  ====================================================  ==========================================
relu          max(x, 0)                                             1[x > 0]
leaky_relu    x if x > 0 else 0.01 x                                1 if x > 0 else 0.01
gelu          x Φ(x)  (exact, erf form, as ``nn.GELU()``)           Φ(x) + x φ(x)
squared_relu  relu(x)²                                              2 relu(x)
smelu (β=2)   x if x ≥ β; (x+β)²/(4β) if |x| ≤ β; 0 if x < −β       1; (x+β)/(2β); 0
star_relu     0.8944 relu(x)² − 0.4472                              1.7888 relu(x)
============  ====================================================  ==========================================

xFormers' Triton GeLU used the tanh approximation while its torch path used the exact form; here every
path computes the exact form, so switching paths never changes results beyond rounding.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import nn

__all__ = [
    "Activation",
    "build_activation",
    "activation_fn",
    "activation_grad",
    "to_activation",
    "SquaredReLU",
    "StarReLU",
    "SmeLU",
]

LEAKY_RELU_SLOPE = 0.01  # nn.LeakyReLU's default, as in xFormers
SMELU_BETA = 2.0  # xFormers' SmeLU default
STAR_RELU_SCALE = 0.8944  # StarReLU (MetaFormer baselines): s * relu(x)^2 + b, with xFormers' fixed s and b
STAR_RELU_BIAS = -0.4472


class Activation(str, Enum):
    """The activations of the fused layers; plain strings (``"gelu"``) are accepted wherever one is."""

    SquaredReLU = "squared_relu"
    GeLU = "gelu"
    LeakyReLU = "leaky_relu"
    ReLU = "relu"
    SmeLU = "smelu"
    StarReLU = "star_relu"


def to_activation(activation: Activation | str | None) -> Activation | None:
    """Normalise an activation argument: None or ``""`` -> None, a string -> the enum member.

    Raises:
        ValueError: if the name is not one of the ``Activation`` values.
    """
    if activation is None or activation == "":
        return None
    if isinstance(activation, Activation):
        return activation
    try:
        return Activation(str(activation).lower())
    except ValueError:
        names = ", ".join(repr(a.value) for a in Activation)
        raise ValueError(f"activation={activation!r} is not a known activation; use None or one of {names}") from None


class SquaredReLU(nn.Module):
    """relu(x)²."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation_fn(Activation.SquaredReLU, x)


class StarReLU(nn.Module):
    """0.8944 · relu(x)² − 0.4472."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation_fn(Activation.StarReLU, x)


class SmeLU(nn.Module):
    """Smooth ReLU: x for x ≥ β, (x+β)²/(4β) for |x| ≤ β, 0 below −β.

    Args:
        beta: half-width of the quadratic region (default 2.0).
    """

    def __init__(self, beta: float = SMELU_BETA) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"SmeLU needs beta > 0, got beta={beta}")
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _smelu(x, self.beta)


def build_activation(activation: Activation | str | None) -> nn.Module:
    """The ``nn.Module`` for ``activation`` (``nn.Identity`` for None or ``""``).

    Raises:
        ValueError: on an unknown name.
    """
    activation = to_activation(activation)
    if activation is None:
        return nn.Identity()
    return {
        Activation.ReLU: nn.ReLU,
        Activation.GeLU: nn.GELU,
        Activation.LeakyReLU: nn.LeakyReLU,
        Activation.SquaredReLU: SquaredReLU,
        Activation.SmeLU: SmeLU,
        Activation.StarReLU: StarReLU,
    }[activation]()


def _smelu(x: torch.Tensor, beta: float) -> torch.Tensor:
    quad = (x + beta) ** 2 / (4.0 * beta)
    return torch.where(x >= beta, x, torch.where(x <= -beta, torch.zeros_like(x), quad))


def activation_fn(activation: Activation | str | None, x: torch.Tensor) -> torch.Tensor:
    """f(x) for ``activation`` (identity for None), differentiable by autograd."""
    activation = to_activation(activation)
    if activation is None:
        return x
    if activation is Activation.ReLU:
        return torch.relu(x)
    if activation is Activation.LeakyReLU:
        return nn.functional.leaky_relu(x, LEAKY_RELU_SLOPE)
    if activation is Activation.GeLU:
        return nn.functional.gelu(x)
    if activation is Activation.SquaredReLU:
        return torch.relu(x) ** 2
    if activation is Activation.SmeLU:
        return _smelu(x, SMELU_BETA)
    return STAR_RELU_SCALE * torch.relu(x) ** 2 + STAR_RELU_BIAS


def activation_grad(activation: Activation | str | None, x: torch.Tensor) -> torch.Tensor:
    """f'(x) for ``activation`` (ones for None), elementwise, in ``x``'s dtype."""
    activation = to_activation(activation)
    if activation is None:
        return torch.ones_like(x)
    if activation is Activation.ReLU:
        return (x > 0).to(x.dtype)
    if activation is Activation.LeakyReLU:
        return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, LEAKY_RELU_SLOPE))
    if activation is Activation.GeLU:
        cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + x * pdf
    if activation is Activation.SquaredReLU:
        return 2.0 * torch.relu(x)
    if activation is Activation.SmeLU:
        beta = SMELU_BETA
        return torch.where(
            x >= beta,
            torch.ones_like(x),
            torch.where(x <= -beta, torch.zeros_like(x), (x + beta) / (2.0 * beta)),
        )
    return 2.0 * STAR_RELU_SCALE * torch.relu(x)
