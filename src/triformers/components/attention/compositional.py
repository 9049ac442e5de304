"""Compositional attention (Mittal et al., 2022): searches and retrievals as separate, recombined heads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from triformers.components.attention._registry import register_attention
from triformers.components.attention.attention_mask import AttentionMask
from triformers.components.attention.base import Attention, AttentionConfig
from triformers.components.attention.utils import bool_mask_to_additive
from triformers.components.in_proj_container import InputProjection, InputProjectionConfig


@dataclass
class CompositionalAttentionConfig(AttentionConfig):
    dim_model: int
    num_heads: int
    dim_attn: int | None = None
    num_rules: int | None = None
    dim_key: int | None = None
    dim_value: int | None = None
    dim_selection: int | None = None
    qk_rule: bool = False
    nonlinear: bool = False
    q_compose: bool = False
    bias: bool = True
    causal: bool | None = False
    in_proj_container: Any = None  # an InputProjection (typed Any so the Hydra schema can be stored)
    use_separate_proj_weight: bool | None = False


@register_attention("compositional", CompositionalAttentionConfig)
class CompositionalAttention(Attention):
    """Compositional attention: ``num_heads`` searches (softmax(QK^T)) times ``num_rules`` retrievals
    (values), each search picking a soft mix of retrievals through a learned selection score.

    It owns its projections (``requires_skip_multi_head``): inputs and output are ``[B, S, E]``.

    Args:
        dim_model: model dimension E.
        num_heads: number of searches.
        dim_attn: total retrieval dimension (default E), split over ``num_rules``.
        num_rules: number of retrievals (default ``num_heads``).
        dim_selection: dimension of the selection query/key (default E / num_heads).
        dim_key: query/key projection size (default E), split over ``num_heads``.
        dim_value: value projection size; must equal ``dim_attn`` (default ``dim_attn``).
        dropout: dropout on the search weights (default 0.0).
        qk_rule: score retrievals by a query-key product instead of a score network (default False).
        nonlinear: two-layer score network (default False).
        q_compose: the selection query comes from the per-head projected query (default False: the input).
        in_proj_container: custom q/k/v projections (default None: built here).
        use_separate_proj_weight: False ties the q/k/v weights (default False, as in xFormers).
        bias: biases in the projections (default True).
        causal: query i only searches keys j <= i (default False).
    """

    def __init__(
        self,
        dim_model: int,
        num_heads: int,
        dim_attn: int | None = None,
        num_rules: int | None = None,
        dim_selection: int | None = None,
        dim_key: int | None = None,
        dim_value: int | None = None,
        dropout: float = 0.0,
        qk_rule: bool = False,
        nonlinear: bool = False,
        q_compose: bool = False,
        in_proj_container: InputProjection | None = None,
        use_separate_proj_weight: bool | None = False,
        bias: bool = True,
        causal: bool | None = False,
        *_,
        **__,
    ) -> None:
        super().__init__()
        self.requires_skip_multi_head = True
        self.supports_attention_mask = True
        num_rules = num_rules or num_heads
        dim_selection = dim_selection or dim_model // num_heads
        dim_attn = dim_attn or dim_model
        dim_key = dim_key or dim_model
        dim_value = dim_value or dim_attn
        if dim_attn % num_rules:
            raise ValueError(f"dim_attn={dim_attn} must be divisible by num_rules={num_rules}")
        if dim_key % num_heads:
            raise ValueError(f"dim_key={dim_key} must be divisible by num_heads={num_heads}")
        if dim_value != dim_attn:
            raise ValueError(f"dim_value={dim_value} must equal dim_attn={dim_attn} (values are split over the rules)")
        self.dim_model, self.num_heads, self.num_rules = dim_model, num_heads, num_rules
        self.dim_selection, self.qk_rule, self.nonlinear, self.q_compose = (
            dim_selection,
            qk_rule,
            nonlinear,
            q_compose,
        )
        self.causal = bool(causal)
        self.dim_head = dim_key // num_heads
        self.value_dim = dim_attn // num_rules
        self.scaling = self.dim_head**-0.5
        self.scaling_values = dim_selection**-0.5
        self.in_proj_container = in_proj_container or InputProjection(
            query_proj_params=InputProjectionConfig(dim_model, dim_key, bias=bias),
            key_proj_params=InputProjectionConfig(dim_model, dim_key, bias=bias),
            value_proj_params=InputProjectionConfig(dim_model, dim_value, bias=bias),
            use_separate_proj_weight=bool(use_separate_proj_weight) if dim_key == dim_value else True,
        )
        self.dropout_module = nn.Dropout(dropout)
        self.out_proj = nn.Linear(num_heads * self.value_dim, dim_model, bias=bias)
        q_in = self.dim_head if q_compose else dim_model
        q_out = dim_selection if q_compose else dim_selection * num_heads
        self.value_q = nn.Linear(q_in, q_out, bias=bias)
        if qk_rule:
            self.value_k = nn.Linear(self.value_dim, dim_selection, bias=bias)
        elif nonlinear:
            self.score_network: nn.Module = nn.Sequential(
                nn.Linear(dim_selection + self.value_dim, dim_selection, bias=bias),
                nn.ReLU(),
                nn.Linear(dim_selection, 1, bias=bias),
            )
        else:
            self.score_network = nn.Linear(dim_selection + self.value_dim, 1, bias=bias)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for proj in (
            self.in_proj_container.q_proj,
            self.in_proj_container.k_proj,
            self.in_proj_container.v_proj,
        ):
            nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)
        nn.init.xavier_uniform_(self.value_q.weight)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        att_mask: torch.Tensor | AttentionMask | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        """``[B, Sq, E]`` query, ``[B, Sk, E]`` key/value -> ``[B, Sq, E]``.

        ``att_mask``: bool (True = attend), additive float or AttentionMask.
        """
        B, Sq, E = q.shape
        Sk = k.shape[1]
        if E != self.dim_model:
            raise ValueError(f"query has {E} features but dim_model={self.dim_model}")
        q_unprojected = q
        q, k, v = self.in_proj_container(query=q, key=k, value=v)
        q = q * self.scaling
        q = q.view(B, Sq, self.num_heads, self.dim_head).transpose(1, 2)  # [B, H, Sq, Dh]
        k = k.view(B, Sk, self.num_heads, self.dim_head).transpose(1, 2)  # [B, H, Sk, Dh]
        v = v.view(B, Sk, self.num_rules, self.value_dim).transpose(1, 2)  # [B, R, Sk, Dv]

        scores = q @ k.transpose(-1, -2)  # [B, H, Sq, Sk]
        if isinstance(att_mask, AttentionMask):
            att_mask = att_mask.values
        if att_mask is not None:
            if att_mask.dtype == torch.bool:
                att_mask = bool_mask_to_additive(att_mask, scores.dtype)
            att_mask = att_mask[..., :Sq, :Sk]
            if att_mask.ndim == 3 and att_mask.shape[0] == B * self.num_heads:
                att_mask = att_mask.view(B, self.num_heads, Sq, Sk)
            elif att_mask.ndim == 3:
                att_mask = att_mask.unsqueeze(1)  # [B | 1, 1, Sq, Sk]
            scores = scores + att_mask.to(scores.dtype)
        if self.causal:
            future = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        attn_probs = self.dropout_module(torch.softmax(scores, dim=-1))

        # every search retrieves with every rule: [B, H, R, Sq, Dv]
        retrieved = attn_probs.unsqueeze(2) @ v.unsqueeze(1)
        retrieved = retrieved.permute(0, 3, 1, 2, 4)  # [B, Sq, H, R, Dv]
        if self.q_compose:
            v_q = self.value_q(q.transpose(1, 2))  # [B, Sq, H, dsel]
        else:
            v_q = self.value_q(q_unprojected).view(B, Sq, self.num_heads, self.dim_selection)
        v_q = v_q.unsqueeze(3)  # [B, Sq, H, 1, dsel]
        if self.qk_rule:
            v_k = self.value_k(retrieved)  # [B, Sq, H, R, dsel]
            v_score = (v_q * self.scaling_values * v_k).sum(-1, keepdim=True)  # [B, Sq, H, R, 1]
        else:
            v_in = torch.cat([retrieved, v_q.expand(-1, -1, -1, self.num_rules, -1)], dim=-1)
            v_score = self.score_network(v_in)  # [B, Sq, H, R, 1]
        v_score = torch.softmax(v_score, dim=3)
        out = (retrieved * v_score).sum(dim=3).reshape(B, Sq, self.num_heads * self.value_dim)
        return self.out_proj(out)
