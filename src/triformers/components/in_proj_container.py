"""Q/K/V input projections (xFormers' ``components/in_proj_container.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class InputProjectionConfig:
    """One projection: ``nn.Linear(in_features, out_features, bias)``."""

    in_features: int
    out_features: int
    bias: bool


class InputProjection(nn.Module):
    """Project query, key and value in one module.

    Args:
        query_proj_params: the query projection.
        key_proj_params: the key projection (default None: share the query projection module).
        value_proj_params: the value projection (default None: share the query projection module).
        use_separate_proj_weight: False ties the key and value weights to the query weight (default True).

    When one tensor is passed as query, key and value (self-attention) with distinct projections of the
    same input size, the three projections run as one matmul over the concatenated weights.
    """

    def __init__(
        self,
        query_proj_params: InputProjectionConfig,
        key_proj_params: InputProjectionConfig | None = None,
        value_proj_params: InputProjectionConfig | None = None,
        use_separate_proj_weight: bool = True,
    ) -> None:
        super().__init__()
        self.out_features = query_proj_params.out_features
        self.q_proj = nn.Linear(
            query_proj_params.in_features, query_proj_params.out_features, query_proj_params.bias
        )
        self.k_proj = self._maybe_linear(key_proj_params)
        self.v_proj = self._maybe_linear(value_proj_params)
        if not use_separate_proj_weight:
            for name, proj in (("key", self.k_proj), ("value", self.v_proj)):
                if proj.weight.shape != self.q_proj.weight.shape:
                    raise ValueError(
                        f"use_separate_proj_weight=False ties the {name} weight to the query weight, but "
                        "their shapes "
                        f"differ ({tuple(proj.weight.shape)} vs {tuple(self.q_proj.weight.shape)}); use "
                        "equal "
                        "dimensions or separate weights"
                    )
            self.k_proj.weight = self.q_proj.weight
            self.v_proj.weight = self.q_proj.weight

    def _maybe_linear(self, params: InputProjectionConfig | None) -> nn.Module:
        if params is None:
            return self.q_proj
        return nn.Linear(params.in_features, params.out_features, params.bias)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q_proj(query), k_proj(key), v_proj(value))``."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if query is key and key is value and len({p.in_features for p in projs}) == 1:
            weight = torch.cat([p.weight for p in projs], dim=0)
            biases = [p.bias for p in projs]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat(
                    [b if b is not None else weight.new_zeros(p.out_features) for b, p in zip(biases, projs)]
                )
            out = nn.functional.linear(query, weight, bias)
            return tuple(out.split([p.out_features for p in projs], dim=-1))  # type: ignore[return-value]
        return self.q_proj(query), self.k_proj(key), self.v_proj(value)
