"""Learned absolute positions, with an optional class token (ViT)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from triformers.components.positional_embedding._registry import register_positional_embedding
from triformers.components.positional_embedding.base import PositionEmbedding, PositionEmbeddingConfig


@dataclass
class LearnablePositionalEmbeddingConfig(PositionEmbeddingConfig):
    add_class_token: bool


@register_positional_embedding("learnable", LearnablePositionalEmbeddingConfig)
class LearnablePositionalEmbedding(PositionEmbedding):
    """Adds a learned ``[1, S (+1), E]`` table; with ``add_class_token`` a learned token is prepended first.

    Shapes: ``[B, S, E]`` (``S <= seq_len``) -> ``[B, S (+1), E]``; ``[B, S]`` is read as ``[B, S, 1]``.

    Args:
        seq_len: longest sequence (without the class token).
        dim_model: embedding dimension E.
        add_class_token: prepend a class token (default False).
    """

    def __init__(self, seq_len: int, dim_model: int, add_class_token: bool = False, *args, **kwargs) -> None:
        super().__init__()
        self.pos_emb = torch.nn.Parameter(torch.randn(1, seq_len + int(add_class_token), dim_model) * 0.02)
        self.class_token = torch.nn.Parameter(torch.zeros(dim_model)) if add_class_token else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            x = x.unsqueeze(-1)
        if self.class_token is not None:
            clf_token = self.class_token.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([clf_token, x], dim=1)
        if x.shape[1] > self.pos_emb.shape[1]:
            raise ValueError(
                f"sequence length {x.shape[1]} exceeds the {self.pos_emb.shape[1]} learned positions "
                "(seq_len)"
            )
        return x + self.pos_emb[:, : x.shape[1]]
