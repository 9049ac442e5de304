"""MLP whose bias + activation + dropout run as one fused op (``triformers.triton.FusedDropoutBias``).

Eager: after each matmul, bias-add, activation and dropout each read and write the activations
(3 reads + 3 writes of ``M x N``); fused: one read and one write. Where the fused layer is not
installed, the same maths runs in eager torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from triformers.components.feedforward._registry import register_feedforward
from triformers.components.feedforward.base import Feedforward, FeedforwardConfig


def fused_dropout_bias_class() -> type[nn.Module] | None:
    """``triformers.triton.FusedDropoutBias`` if it can be imported, else None."""
    try:
        from triformers.triton import FusedDropoutBias
    except ImportError:
        return None
    return FusedDropoutBias


class _EagerDropoutBias(nn.Module):
    """``dropout(activation(x + bias))`` in eager torch (same interface as FusedDropoutBias)."""

    def __init__(self, p: float, bias_shape: int | None, activation=None) -> None:
        super().__init__()
        from triformers.components.activations import build_activation

        self.p = p
        self.bias = nn.Parameter(torch.zeros(bias_shape)) if bias_shape is not None else None
        self.activation = build_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            x = x + self.bias
        return nn.functional.dropout(self.activation(x), self.p, self.training)


@dataclass
class FusedMlpConfig(FeedforwardConfig):
    hidden_layer_multiplier: int


@register_feedforward("FusedMLP", FusedMlpConfig)
class FusedMLP(Feedforward):
    """``Linear -> [bias + activation + dropout] -> Linear -> [bias + dropout]``, the brackets fused.

    Args:
        dim_model: input/output features.
        dropout: dropout probability of both fused layers.
        activation: activation name or ``Activation``.
        hidden_layer_multiplier: hidden width over ``dim_model`` (default 4).
    """

    def __init__(
        self, dim_model: int, dropout: float, activation, hidden_layer_multiplier: int = 4, *args, **kwargs
    ) -> None:
        super().__init__()
        dim_mlp = hidden_layer_multiplier * dim_model
        dropout_bias = fused_dropout_bias_class() or _EagerDropoutBias
        self.mlp = nn.Sequential(
            nn.Linear(dim_model, dim_mlp, bias=False),
            dropout_bias(p=dropout, bias_shape=dim_mlp, activation=activation),
            nn.Linear(dim_mlp, dim_model, bias=False),
            dropout_bias(p=dropout, bias_shape=dim_model, activation=None),
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.mlp(inputs)
