"""The feedforward registry: ``FEEDFORWARD_REGISTRY``, ``register_feedforward`` and ``build_feedforward``.

The modules of this package register into it; the package's ``__init__`` imports them (which fills
the registry) and re-exports these names.
"""

from __future__ import annotations

from typing import Any

from triformers.components._registry import build_from_registry, get_registry_decorator
from triformers.components.feedforward.base import Feedforward, FeedforwardConfig

FEEDFORWARD_REGISTRY: dict = {}
FEEDFORWARD_CLASS_NAMES: set[str] = set()

register_feedforward = get_registry_decorator(
    FEEDFORWARD_REGISTRY, FEEDFORWARD_CLASS_NAMES, Feedforward, FeedforwardConfig
)


def build_feedforward(config: dict[str, Any] | FeedforwardConfig) -> Feedforward:
    """Build a registered feedforward from a dict (or config) with a ``name``.

    Fields the feedforward's config does not declare are ignored; missing ones take the constructor's
    defaults, e.g. ``build_feedforward({"name": "MLP", "dim_model": 64, "dropout": 0.0,
    "activation": "gelu", "hidden_layer_multiplier": 4})``.

    Raises:
        KeyError: if the name is not registered.
    """
    return build_from_registry(config, FEEDFORWARD_REGISTRY, "feedforward")
