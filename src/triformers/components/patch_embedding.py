"""Patch embedding: a strided convolution turning an image (or a token grid) into a token sequence."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch


class PoolType(str, Enum):
    Conv2D = "CONV_2D"


@dataclass
class PatchEmbeddingConfig:
    """``Conv2d(in_channels, out_channels, kernel_size, stride, padding)`` over the spatial grid."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int = 0
    pool_type: PoolType = PoolType.Conv2D


class ConditionalReshape(torch.nn.Module):
    """``[B, HW, C]`` tokens (square grid) -> ``[B, C, H, W]``; 4-D inputs pass through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            B, HW, C = x.shape
            H = math.isqrt(HW)
            if H * H != HW:
                raise ValueError(f"patch embedding of a token sequence needs a square grid, got {HW} tokens")
            x = x.transpose(1, 2).reshape(B, C, H, H)
        return x


class PatchToSequence(torch.nn.Module):
    """``[B, C, H, W]`` -> ``[B, HW, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2, 3).transpose(1, 2).contiguous()


def build_patch_embedding(config: PatchEmbeddingConfig | dict) -> torch.nn.Module:
    """``Sequential(ConditionalReshape, Conv2d, PatchToSequence)``: ``[B, C, H, W]`` or ``[B, HW, C]`` in,
    ``[B, H'W', out_channels]`` out."""
    if not isinstance(config, PatchEmbeddingConfig):
        config = PatchEmbeddingConfig(**config)
    if PoolType(config.pool_type) != PoolType.Conv2D:
        raise NotImplementedError(f"pool_type={config.pool_type!r}: only CONV_2D is implemented")
    pool = torch.nn.Conv2d(
        config.in_channels,
        config.out_channels,
        kernel_size=config.kernel_size,
        stride=config.stride,
        padding=config.padding,
    )
    return torch.nn.Sequential(ConditionalReshape(), pool, PatchToSequence())
