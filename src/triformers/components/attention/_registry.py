"""The attention registry: ``ATTENTION_REGISTRY``, ``register_attention`` and ``build_attention``.

The modules of this package register into it; the package's ``__init__`` imports them (which fills
the registry) and re-exports these names.
"""

from __future__ import annotations

from typing import Any

from triformers.components._registry import build_from_registry, get_registry_decorator
from triformers.components.attention.base import Attention, AttentionConfig

ATTENTION_REGISTRY: dict = {}
ATTENTION_CLASS_NAMES: set[str] = set()

register_attention = get_registry_decorator(ATTENTION_REGISTRY, ATTENTION_CLASS_NAMES, Attention, AttentionConfig)


def build_attention(config: dict[str, Any] | AttentionConfig) -> Attention:
    """Build a registered attention from a dict (or config) with a ``name``.

    Fields the attention's config does not declare are ignored; missing ones take the constructor's
    defaults. For instance ``build_attention({"name": "local", "dropout": 0.1, "window_size": 7})``.

    Raises:
        KeyError: if the name is not registered (the message lists the registered names).
    """
    return build_from_registry(config, ATTENTION_REGISTRY, "attention")
