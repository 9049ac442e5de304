"""Base class and config of the positional embeddings."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from triformers.components._registry import config_to_kwargs


@dataclass
class PositionEmbeddingConfig:
    """Fields every positional embedding config has: ``name``, ``dim_model``, ``seq_len``."""

    name: str
    dim_model: int
    seq_len: int


class PositionEmbedding(nn.Module, metaclass=ABCMeta):
    """Adds (or builds) position information: ``[B, S]`` tokens or ``[B, S, E]`` features in,
    ``[B, S', E]`` out."""

    @abstractmethod
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    @classmethod
    def from_config(cls, config: PositionEmbeddingConfig) -> PositionEmbedding:
        """Build from a config: only its non-None fields reach the constructor."""
        return cls(**config_to_kwargs(config))

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
