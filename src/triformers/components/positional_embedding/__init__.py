"""Positional embeddings: a registry of modules adding position information, plus rotary embeddings."""

from __future__ import annotations

from triformers.components.positional_embedding._registry import (  # noqa: F401  (the registry's names)
    POSITION_EMBEDDING_CLASS_NAMES,
    POSITION_EMBEDDING_REGISTRY,
    build_positional_embedding,
    register_positional_embedding,
)
from triformers.components.positional_embedding.base import PositionEmbedding, PositionEmbeddingConfig

# isort: split
# Registration: one explicit import per module.
from triformers.components.positional_embedding import sine, vocab, param  # noqa: F401, I001
from triformers.components.positional_embedding.param import LearnablePositionalEmbedding
from triformers.components.positional_embedding.rotary import (
    RotaryEmbedding,
    apply_rotary_pos_emb,
    rotate_half,
)
from triformers.components.positional_embedding.sine import SinePositionalEmbedding
from triformers.components.positional_embedding.vocab import VocabEmbedding

__all__ = [
    "POSITION_EMBEDDING_REGISTRY",
    "LearnablePositionalEmbedding",
    "PositionEmbedding",
    "PositionEmbeddingConfig",
    "RotaryEmbedding",
    "SinePositionalEmbedding",
    "VocabEmbedding",
    "apply_rotary_pos_emb",
    "build_positional_embedding",
    "register_positional_embedding",
    "rotate_half",
]
