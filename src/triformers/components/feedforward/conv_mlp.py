"""Convolutional feedforward on the token grid (PVT v2 / MetaFormer style)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from triformers.components.feedforward._registry import register_feedforward
from triformers.components.feedforward.base import Feedforward, FeedforwardConfig


@dataclass
class Conv2DFeedforwardConfig(FeedforwardConfig):
    hidden_layer_multiplier: int
    dim_model_out: int | None
    act_layer: str | None = None  # xFormers compatibility; ``activation`` is the one used


@register_feedforward("Conv2DFeedforward", Conv2DFeedforwardConfig)
class Conv2DFeedforward(Feedforward):
    """``1x1 conv -> depthwise 3x3 conv -> act -> 1x1 conv -> dropout`` on the ``sqrt(S) x sqrt(S)`` grid.

    Shapes: ``[B, S, dim_model] -> [B, S, dim_model_out]``, S a perfect square.

    Args:
        dim_model: input channels.
        hidden_layer_multiplier: hidden channels over ``dim_model`` (default 1).
        dim_model_out: output channels (default ``dim_model``).
        activation: activation name (default ``"gelu"``).
        dropout: output dropout (default 0.0).
    """

    def __init__(
        self,
        dim_model: int,
        hidden_layer_multiplier: int = 1,
        dim_model_out: int | None = None,
        activation="gelu",
        dropout: float = 0.0,
        *args,
        **kwargs,
    ) -> None:
        super().__init__()
        from triformers.components.activations import build_activation

        out_features = dim_model_out or dim_model
        hidden = hidden_layer_multiplier * dim_model
        self.conv_mlp = nn.Sequential(
            nn.Conv2d(dim_model, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, 1, 1, bias=True, groups=hidden),
            build_activation(activation),
            nn.Conv2d(hidden, out_features, 1),
            nn.Dropout(dropout),
        )
        self.requires_squared_context = True

    def init_weights(self, **kwargs) -> None:
        for m in self.conv_mlp:
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        H = math.isqrt(L)
        if H * H != L:
            raise ValueError(f"Conv2DFeedforward needs a square token grid: sequence length {L} is not a square")
        x = x.transpose(1, 2).reshape(B, C, H, H)
        x = self.conv_mlp(x)
        return x.flatten(2).transpose(1, 2)
