"""Visual attention (Guo et al., "Visual Attention Network"): large-kernel attention on the token grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from triformers.components.attention._registry import register_attention
from triformers.components.attention.base import Attention, AttentionConfig
from triformers.components.attention.pooling import _to_grid


@dataclass
class VisualAttentionConfig(AttentionConfig):
    dim_model: int  # dimension of the input sequence


class LKA(nn.Module):
    """Large kernel attention: depthwise 5x5, depthwise 7x7 dilated 3, pointwise; gates its input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, 7, stride=1, padding=9, groups=dim, dilation=3)
        self.conv1 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv1(self.conv_spatial(self.conv0(x)))


@register_attention("visual", VisualAttentionConfig)
class Visual(Attention):
    """VAN attention: ``x + proj_2(LKA(GELU(proj_1(x))))`` on the ``sqrt(S) x sqrt(S)`` grid.

    Skips the multi-head machinery and the projections; inputs and output ``[B, S, C]``.

    Args:
        dim_model: channels C.
    """

    def __init__(self, dim_model: int, *_, **__) -> None:
        super().__init__()
        self.proj_1 = nn.Conv2d(dim_model, dim_model, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = LKA(dim_model)
        self.proj_2 = nn.Conv2d(dim_model, dim_model, 1)
        self.supports_attention_mask = False
        self.requires_skip_multi_head = True
        self.requires_squared_context = True
        self.requires_input_projection = False
        self.requires_same_k_q_dimensions = True

    def forward(self, q: torch.Tensor, *_, **__) -> torch.Tensor:
        x = _to_grid(q, "visual attention")
        shortcut = x
        x = self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x))))
        return (x + shortcut).flatten(2, 3).transpose(-2, -1)
