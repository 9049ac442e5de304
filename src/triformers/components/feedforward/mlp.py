"""Two-layer MLP: the Transformer feedforward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from triformers.components.feedforward._registry import register_feedforward
from triformers.components.feedforward.base import Feedforward, FeedforwardConfig


@dataclass
class MlpConfig(FeedforwardConfig):
    hidden_layer_multiplier: int
    bias: bool


@register_feedforward("MLP", MlpConfig)
class MLP(Feedforward):
    """``Dropout(Linear(Dropout(act(Linear(x)))))``, hidden size ``hidden_layer_multiplier * dim_model``.

    Args:
        dim_model: input/output features.
        dropout: dropout after the activation and after the output layer.
        activation: activation name or ``Activation`` (e.g. ``"gelu"``).
        hidden_layer_multiplier: hidden width over ``dim_model``.
        bias: biases in both linear layers (default True).
    """

    def __init__(
        self,
        dim_model: int,
        dropout: float,
        activation,
        hidden_layer_multiplier: int,
        bias: bool = True,
        *args,
        **kwargs,
    ) -> None:
        super().__init__()
        from triformers.components.activations import build_activation

        dim_mlp = hidden_layer_multiplier * dim_model
        self.mlp = nn.Sequential(
            nn.Linear(dim_model, dim_mlp, bias=bias),
            build_activation(activation),
            nn.Dropout(dropout),
            nn.Linear(dim_mlp, dim_model, bias=bias),
            nn.Dropout(dropout),
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.mlp(inputs)
