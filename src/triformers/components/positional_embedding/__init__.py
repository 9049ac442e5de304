"""Positional embeddings: a registry of modules adding position information, plus rotary embeddings."""

from __future__ import annotations

from typing import Any

from triformers.components._registry import build_from_registry, get_registry_decorator
from triformers.components.positional_embedding.base import PositionEmbedding, PositionEmbeddingConfig

POSITION_EMBEDDING_REGISTRY: dict = {}
POSITION_EMBEDDING_CLASS_NAMES: set[str] = set()

register_positional_embedding = get_registry_decorator(
    POSITION_EMBEDDING_REGISTRY, POSITION_EMBEDDING_CLASS_NAMES, PositionEmbedding, PositionEmbeddingConfig
)


def build_positional_embedding(config: dict[str, Any] | PositionEmbeddingConfig) -> PositionEmbedding:
    """Build a registered positional embedding from a dict (or config) with a ``name``.

    Raises:
        KeyError: if the name is not registered.
    """
    return build_from_registry(config, POSITION_EMBEDDING_REGISTRY, "positional_embedding")


# Registration: one explicit import per module.
from triformers.components.positional_embedding import sine, vocab, param  # noqa: E402, F401, I001
from triformers.components.positional_embedding.param import LearnablePositionalEmbedding  # noqa: E402
from triformers.components.positional_embedding.rotary import (  # noqa: E402
    RotaryEmbedding,
    apply_rotary_pos_emb,
    rotate_half,
)
from triformers.components.positional_embedding.sine import SinePositionalEmbedding  # noqa: E402
from triformers.components.positional_embedding.vocab import VocabEmbedding  # noqa: E402

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
