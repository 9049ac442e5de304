"""PoolFormer token mixing (Yu et al., "MetaFormer is actually what you need for vision")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from triformers.components.attention._registry import register_attention
from triformers.components.attention.base import Attention, AttentionConfig


@dataclass
class PoolingAttentionConfig(AttentionConfig):
    pool_size: int | None  # kernel of the average pooling
    stride: int | None
    padding: int | None


def _to_grid(x: torch.Tensor, who: str) -> torch.Tensor:
    """``[B, S, C]`` with S a perfect square -> ``[B, C, H, H]``."""
    B, HW, C = x.shape
    H = math.isqrt(HW)
    if H * H != HW:
        raise ValueError(f"{who} works on a square token grid: sequence length {HW} is not a perfect square")
    return x.transpose(-2, -1).reshape(B, C, H, H)


@register_attention("pooling", PoolingAttentionConfig)
class Pooling(Attention):
    """``AvgPool2d(x) - x`` on the ``sqrt(S) x sqrt(S)`` token grid (the residual path adds x back).

    Skips the multi-head machinery and the projections; inputs and output ``[B, S, C]``.

    Args:
        pool_size: pooling window (default 3).
        stride: pooling stride (default 1; keep 1 to preserve the sequence length).
        padding: pooling padding (default ``pool_size // 2``).
    """

    def __init__(self, pool_size: int = 3, stride: int = 1, padding: int | None = None, *_, **__) -> None:
        super().__init__()
        padding = padding if padding is not None else pool_size // 2
        self.pool = nn.AvgPool2d(pool_size, stride=stride, padding=padding, count_include_pad=False)
        self.supports_attention_mask = False
        self.requires_skip_multi_head = True
        self.requires_input_projection = False
        self.requires_same_k_q_dimensions = True
        self.requires_squared_context = True

    def forward(self, q: torch.Tensor, *_, **__) -> torch.Tensor:
        x = _to_grid(q, "pooling")
        x_pool = self.pool(x) - x  # the residual path adds x back
        return x_pool.flatten(2, 3).transpose(-2, -1)
