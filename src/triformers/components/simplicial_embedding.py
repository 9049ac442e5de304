"""Simplicial embeddings (Lavoie et al., 2022): softmax over L groups of the features."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SimplicialEmbeddingConfig:
    L: int
    temperature: float | None


class SimplicialEmbedding(torch.nn.Module):
    """Split the last dim E into ``L`` groups of ``E / L`` and softmax each (divided by ``temperature``).

    Shapes: ``[..., E] -> [..., E]``.

    Args:
        L: number of groups (must divide E).
        temperature: softmax temperature (default None: 1).
    """

    def __init__(self, L: int, temperature: float | None = None) -> None:
        super().__init__()
        self.L = L
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        E = x.shape[-1]
        if E % self.L:
            raise ValueError(
                f"The embedding dimension {E} is not divisible by the chosen L parameter {self.L}"
            )
        groups = x.reshape(*x.shape[:-1], self.L, E // self.L)
        if self.temperature is not None:
            groups = groups / self.temperature
        return torch.softmax(groups, dim=-1).reshape(x.shape)
