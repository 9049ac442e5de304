"""Mixture of experts in one process: top-2 (GShard) or round-robin routing, with a load-balancing loss.

Each token goes to its selected experts only (no capacity limit, no token dropped), so the output of a
sample does not depend on the rest of the batch. After a forward pass ``self.l_aux`` holds the
load-balancing loss to add to the training objective (zero for round-robin routing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from triformers.components.feedforward._registry import register_feedforward
from triformers.components.feedforward.base import Feedforward, FeedforwardConfig
from triformers.components.feedforward.mlp import MLP


class GateConfig(str, Enum):
    RoundRobin = "round_robin"
    Top2 = "top_2"


class Top2Gate(nn.Module):
    """GShard top-2 gate: ``softmax(W x)``, the two best experts weighted by their renormalised scores.

    ``l_aux = E * sum_e mean_tokens(p_e) * fraction_of_tokens_whose_top1_is_e`` (Lepikhin et al., 2020).
    """

    def __init__(self, model_dim: int, num_experts: int) -> None:
        super().__init__()
        if num_experts < 2:
            raise ValueError(f"top-2 gating needs at least 2 experts, got number_of_experts={num_experts}")
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        self.num_experts = num_experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``[T, E]`` -> (l_aux, expert indices ``[T, 2]``, weights ``[T, 2]``)."""
        gates = torch.softmax(self.wg(x).float(), dim=-1)  # [T, experts]
        top_w, top_i = gates.topk(2, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True).clamp_min(torch.finfo(top_w.dtype).eps)
        me = gates.mean(dim=0)
        ce = nn.functional.one_hot(top_i[:, 0], self.num_experts).float().mean(dim=0)
        l_aux = (me * ce).sum() * self.num_experts
        return l_aux, top_i, top_w.to(x.dtype)


class RoundRobinGate(nn.Module):
    """Token at sequence position s goes to expert ``s % num_experts`` with weight 1 (no learned routing)."""

    def __init__(self, model_dim: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = (positions % self.num_experts).unsqueeze(-1)  # [T, 1]
        return x.new_zeros(()), idx, x.new_ones(idx.shape)


@dataclass
class MoEConfig(FeedforwardConfig):
    number_of_experts: int
    gate: GateConfig
    number_of_local_experts: int | None = None
    expert_constructor: Any = None  # callable -> nn.Module (typed Any so the Hydra schema can be stored)
    hidden_layer_multiplier: int | None = None
    group: Any = None


@register_feedforward("MixtureOfExperts", MoEConfig)
class MixtureOfExperts(Feedforward):
    """A mixture of feedforward experts, ``[B, S, E] -> [B, S, E]``.

    Args:
        dim_model: model dimension E.
        dropout: dropout of the default experts.
        activation: activation of the default experts.
        number_of_experts: experts in total.
        gate: ``"top_2"`` or ``"round_robin"`` (default top-2).
        number_of_local_experts: must equal ``number_of_experts`` when given (single process).
        expert_constructor: builds one expert ``nn.Module`` ``[T, E] -> [T, E]`` (default: an MLP).
        hidden_layer_multiplier: hidden width of the default MLP experts (default 4).
        group: a process group is not supported: experts all live in this process.
    """

    def __init__(
        self,
        dim_model: int,
        dropout: float,
        activation,
        number_of_experts: int,
        gate: GateConfig | str = GateConfig.Top2,
        number_of_local_experts: int | None = None,
        expert_constructor: Callable[..., nn.Module] | None = None,
        hidden_layer_multiplier: int | None = None,
        group=None,
        *args,
        **kwargs,
    ) -> None:
        super().__init__()
        if number_of_local_experts is not None and number_of_local_experts != number_of_experts:
            raise ValueError(
                f"number_of_local_experts={number_of_local_experts} != "
                f"number_of_experts={number_of_experts}: "
                "experts are not sharded across processes here; leave number_of_local_experts unset"
            )
        if group is not None:
            raise ValueError("MixtureOfExperts runs in a single process; pass group=None")
        mult = hidden_layer_multiplier or 4
        if expert_constructor is None:

            def expert_constructor() -> nn.Module:
                return MLP(dim_model, dropout, activation, mult)

        self.gate_type = GateConfig(gate)
        gate_cls = Top2Gate if self.gate_type == GateConfig.Top2 else RoundRobinGate
        self.gate = gate_cls(dim_model, number_of_experts)
        self.experts = nn.ModuleList([expert_constructor() for _ in range(number_of_experts)])
        self.l_aux = torch.zeros(())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        B, S, E = inputs.shape
        tokens = inputs.reshape(-1, E)  # [T, E]
        if self.gate_type == GateConfig.Top2:
            self.l_aux, idx, weight = self.gate(tokens)
        else:
            positions = torch.arange(S, device=inputs.device).repeat(B)
            self.l_aux, idx, weight = self.gate(tokens, positions)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            y = expert(tokens[tok]) * weight[tok, slot].unsqueeze(-1)
            out = out.index_add(0, tok, y)
        return out.reshape(B, S, E)
