"""Feedforward blocks: a registry of position-wise modules, each tied to a config dataclass."""

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


# Registration: one explicit import per module.
from triformers.components.feedforward import mlp, fused_mlp, conv_mlp, mixture_of_experts  # noqa: E402, F401, I001
from triformers.components.feedforward.conv_mlp import Conv2DFeedforward  # noqa: E402
from triformers.components.feedforward.fused_mlp import FusedMLP  # noqa: E402
from triformers.components.feedforward.mixture_of_experts import GateConfig, MixtureOfExperts  # noqa: E402
from triformers.components.feedforward.mlp import MLP  # noqa: E402

__all__ = [
    "FEEDFORWARD_REGISTRY",
    "Conv2DFeedforward",
    "Feedforward",
    "FeedforwardConfig",
    "FusedMLP",
    "GateConfig",
    "MLP",
    "MixtureOfExperts",
    "build_feedforward",
    "register_feedforward",
]
