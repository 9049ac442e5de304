"""Base class and config of the feedforward blocks (xFormers' ``components/feedforward/base.py``)."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from triformers.components._registry import config_to_kwargs


@dataclass
class FeedforwardConfig:
    """Fields every feedforward config has.

    Attributes:
        name: registered name, e.g. ``"MLP"``.
        dim_model: input and output features.
        dropout: dropout probability.
        activation: activation name (see ``triformers.components.activations.Activation``).
    """

    name: str
    dim_model: int
    dropout: float
    activation: Any


class Feedforward(nn.Module, metaclass=ABCMeta):
    """A position-wise block ``[B, S, E] -> [B, S, E]``.

    Flags: ``requires_cuda`` (False), ``requires_squared_context`` (False: True when S must be a perfect
    square, for 2-D token grids).
    """

    def __init__(
        self,
        dim_model: int | None = None,
        dropout: float | None = None,
        activation: Any = None,
        *args,
        **kwargs,
    ) -> None:
        super().__init__()
        self.requires_cuda = False
        self.requires_squared_context = False

    @classmethod
    def from_config(cls, config: FeedforwardConfig) -> Feedforward:
        """Build from a config: only its non-None fields reach the constructor."""
        return cls(**config_to_kwargs(config))

    @abstractmethod
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError
