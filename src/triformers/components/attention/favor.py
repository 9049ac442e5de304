"""FAVOR+ (Performer) linear attention: softmax attention through positive random features."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from triformers.components.attention._registry import register_attention
from triformers.components.attention.base import Attention, AttentionConfig
from triformers.components.attention.feature_maps import FeatureMapType, SMHyperbolic, SMOrf, SMReg

logger = logging.getLogger(__name__)


@dataclass
class FavorAttentionConfig(AttentionConfig):
    causal: bool | None
    dim_features: int | None = None  # the dimension of the random features
    dim_head: int | None = None  # the embedding dimension of the inputs
    iter_before_redraw: int | None = None  # the number of forward passes between random feature redraws
    feature_map: FeatureMapType | None = None  # the type of feature map


@register_attention("favor", FavorAttentionConfig)
class FavorAttention(Attention):
    r"""Linear-cost approximation of softmax attention, "Rethinking Attention with Performers".

    ``out_i = phi(q_i) . sum_j phi(k_j) v_j^T / phi(q_i) . sum_j phi(k_j)``, sums over all j, or over
    ``j <= i`` when causal (prefix sums, Performer Algorithm 1). Computed in float32.

    Shapes: q, k ``[N, S, D]``, v ``[N, S, Dv]`` -> ``[N, S, Dv]``.

    Args:
        causal: query i only sees keys j <= i (default False).
        dropout: dropout on the output (default 0.0).
        dim_features: random features m (default ``2 * (ceil(Dh (1 + log2 Dh)) // 2)`` from ``dim_head``).
        dim_head: head dimension, used for the default ``dim_features``.
        iter_before_redraw: forward passes (in training) between random feature redraws (default None: never).
        feature_map_type: ``sm_orf``, ``sm_hyp`` or ``sm_reg`` (default ``sm_reg``); the config field
            ``feature_map`` sets it too.
        normalize_inputs: subtract a per-batch maximum inside the exponentials (default False).
    """

    def __init__(
        self,
        causal: bool = False,
        dropout: float = 0.0,
        dim_features: int | None = None,
        dim_head: int | None = None,
        iter_before_redraw: int | None = None,
        feature_map_type: FeatureMapType | str = FeatureMapType.SMReg,
        normalize_inputs: bool = False,
        feature_map: FeatureMapType | str | None = None,
        *_,
        **__,
    ) -> None:
        super().__init__()
        self.causal = causal
        self.iter_before_redraw = 2 * iter_before_redraw if iter_before_redraw is not None else None  # k and q
        self.normalize_inputs = normalize_inputs
        self.feature_map_type = FeatureMapType(feature_map if feature_map is not None else feature_map_type)
        self.attn_drop = nn.Dropout(dropout, inplace=False)
        if dim_features is None:
            if dim_head is None:
                raise ValueError("favor attention needs dim_features or dim_head (the per-head dimension)")
            dim_features = math.ceil(int(dim_head) * (1 + math.log2(int(dim_head))))
            dim_features = 2 * (dim_features // 2)  # the +/- feature maps need an even count
        self.dim_features = int(dim_features)
        constructor = {
            FeatureMapType.SMHyp: SMHyperbolic,
            FeatureMapType.SMReg: SMReg,
            FeatureMapType.SMOrf: SMOrf,
        }[self.feature_map_type]
        self.feature_map = constructor(
            dim_features=self.dim_features,
            iter_before_redraw=self.iter_before_redraw,
            normalize_inputs=self.normalize_inputs,
        )
        self.supports_attention_mask = False
        self.supports_key_padding_mask = False

    @staticmethod
    def _causal_attention(k_prime: torch.Tensor, q_prime: torch.Tensor, v: torch.Tensor):
        """Prefix sums over the sequence: ``[N, S, F]`` features, ``[N, S, Dv]`` values."""
        kv = torch.cumsum(k_prime.unsqueeze(-1) * v.unsqueeze(-2), dim=1)  # [N, S, F, Dv]
        att_raw = (q_prime.unsqueeze(-2) @ kv).squeeze(-2)  # [N, S, Dv]
        att_norm = (q_prime * torch.cumsum(k_prime, dim=1)).sum(-1, keepdim=True)  # [N, S, 1]
        return att_raw, att_norm

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_, **__) -> torch.Tensor:
        dtype = q.dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            # the exponentials overflow in half precision
            q, k, v = q.float(), k.float(), v.float()
            k_prime = self.feature_map(k)
            q_prime = self.feature_map(q)
            if not self.causal:
                att_raw = q_prime @ (k_prime.transpose(-2, -1) @ v)
                att_norm = q_prime @ k_prime.sum(dim=-2, keepdim=True).transpose(-2, -1)
            else:
                att_raw, att_norm = self._causal_attention(k_prime, q_prime, v)
            att = att_raw / att_norm
        return self.attn_drop(att.to(dtype))
