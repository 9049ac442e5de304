"""Fixed sinusoidal positions ("Attention is all you need")."""

from __future__ import annotations

import math

import torch

from triformers.components.positional_embedding._registry import register_positional_embedding
from triformers.components.positional_embedding.base import PositionEmbedding, PositionEmbeddingConfig


@register_positional_embedding("sine", PositionEmbeddingConfig)
class SinePositionalEmbedding(PositionEmbedding):
    """Adds ``PE[s, 2i] = sin(s / 10000^(2i/E))``, ``PE[s, 2i+1] = cos(s / 10000^(2i/E))``.

    Shapes: ``[B, S, E]`` -> ``[B, S, E]``; a ``[B, S]`` input is treated as ``[B, S, 1]`` and broadcast.

    Args:
        dim_model: embedding dimension E.
    """

    def __init__(self, dim_model: int, *args, **kwargs) -> None:
        super().__init__()
        self.dim_model = dim_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[1]
        pos = torch.arange(seq_len, device=x.device, dtype=torch.float32).unsqueeze(1)
        dim = torch.arange(self.dim_model, device=x.device, dtype=torch.float32).unsqueeze(0)
        angle = pos * torch.exp(
            -math.log(10000.0) * (2 * torch.div(dim, 2, rounding_mode="floor")) / self.dim_model
        )
        pe = torch.where(dim.long() % 2 == 0, torch.sin(angle), torch.cos(angle))  # [S, E]
        output = x.unsqueeze(-1) if x.ndim == 2 else x
        return output + pe.unsqueeze(0).to(output.dtype if output.is_floating_point() else torch.float32)
