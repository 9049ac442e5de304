"""The positional embedding registry: ``POSITION_EMBEDDING_REGISTRY``,
``register_positional_embedding`` and ``build_positional_embedding``.

The modules of this package register into it; the package's ``__init__`` imports them (which fills
the registry) and re-exports these names.
"""

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
