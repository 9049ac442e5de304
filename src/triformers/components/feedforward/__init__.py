"""Feedforward blocks: a registry of position-wise modules, each tied to a config dataclass."""

from __future__ import annotations

from triformers.components.feedforward._registry import (  # noqa: F401  (the registry's names)
    FEEDFORWARD_CLASS_NAMES,
    FEEDFORWARD_REGISTRY,
    build_feedforward,
    register_feedforward,
)
from triformers.components.feedforward.base import Feedforward, FeedforwardConfig

# isort: split
# Registration: one explicit import per module.
from triformers.components.feedforward import mlp, fused_mlp, conv_mlp, mixture_of_experts  # noqa: F401, I001
from triformers.components.feedforward.conv_mlp import Conv2DFeedforward
from triformers.components.feedforward.fused_mlp import FusedMLP
from triformers.components.feedforward.mixture_of_experts import GateConfig, MixtureOfExperts
from triformers.components.feedforward.mlp import MLP

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
