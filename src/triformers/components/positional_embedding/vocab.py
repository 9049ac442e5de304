"""Token embeddings plus learned absolute positions (GPT style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from triformers.components.positional_embedding._registry import register_positional_embedding
from triformers.components.positional_embedding.base import PositionEmbedding, PositionEmbeddingConfig


@dataclass
class VocabEmbeddingConfig(PositionEmbeddingConfig):
    vocab_size: int
    dropout: float


@register_positional_embedding("vocab", VocabEmbeddingConfig)
class VocabEmbedding(PositionEmbedding):
    """``dropout(word_embeddings[x] + position_embeddings[arange(S)])``.

    Shapes: ``[B, S]`` token ids (``S <= seq_len``) -> ``[B, S, E]``.

    Args:
        dim_model: embedding dimension E.
        seq_len: longest sequence.
        vocab_size: number of tokens.
        dropout: dropout on the sum (default 0.0).
    """

    def __init__(
        self, dim_model: int, seq_len: int, vocab_size: int, dropout: float = 0.0, *args, **kwargs
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.dim_model = dim_model
        self.seq_len = seq_len
        self.dropout = nn.Dropout(p=dropout)
        self.position_embeddings = nn.Embedding(seq_len, dim_model)
        self.word_embeddings = nn.Embedding(vocab_size, dim_model)
        self.init_weights()

    def init_weights(self, gain: float = 1.0) -> None:
        nn.init.normal_(self.position_embeddings.weight, std=0.02 * gain)
        nn.init.normal_(self.word_embeddings.weight, std=0.02 * gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"vocab embedding takes [B, S] integer token ids, got shape={tuple(x.shape)} {x.dtype}"
            )
        if x.shape[1] > self.seq_len:
            raise ValueError(
                f"sequence length {x.shape[1]} exceeds seq_len={self.seq_len} of the position table"
            )
        position_ids = torch.arange(x.shape[1], dtype=torch.long, device=x.device)
        return self.dropout(self.word_embeddings(x) + self.position_embeddings(position_ids).unsqueeze(0))
