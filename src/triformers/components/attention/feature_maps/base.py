"""Feature map base: a random projection redrawn every ``iter_before_redraw`` training calls."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class FeatureMapType(str, Enum):
    SMOrf = "sm_orf"
    SMHyp = "sm_hyp"
    SMReg = "sm_reg"  # regularized softmax kernel


@dataclass
class FeatureMapConfig:
    name: FeatureMapType
    dim_features: int
    iter_before_redraw: int | None
    normalize_inputs: bool | None
    epsilon: float | None


class FeatureMap(torch.nn.Module):
    """Maps ``[..., D]`` inputs to ``[..., dim_features]`` positive features.

    Args:
        dim_features: number of output features.
        iter_before_redraw: redraw the random projection after this many calls in training mode
            (default None: never).
        normalize_inputs: stabilise the exponentials by subtracting a per-batch maximum (default False).
        epsilon: small constant for numerical safety (default 1e-6).
    """

    def __init__(
        self,
        dim_features: int,
        iter_before_redraw: int | None = None,
        normalize_inputs: bool = False,
        epsilon: float = 1e-6,
    ) -> None:
        super().__init__()
        self.dim_features = dim_features
        self.dim_feature_map = dim_features
        self.iter_before_redraw = iter_before_redraw
        self.features: torch.Tensor | None = None
        self.epsilon = epsilon
        self.normalize_inputs = normalize_inputs
        self._iter_counter = 0

    @torch.no_grad()
    def _get_feature_map(self, dim_input: int, dim_features: int, device: torch.device) -> torch.Tensor:
        raise NotImplementedError()

    @classmethod
    def from_config(cls, config: FeatureMapConfig) -> FeatureMap:
        kwargs = {k: v for k, v in vars(config).items() if v is not None and k != "name"}
        return cls(**kwargs)
