"""Random attention: each query attends a random subset of the keys (BigBird's random component)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from triformers.components.attention._registry import register_attention
from triformers.components.attention.attention_mask import AttentionMask
from triformers.components.attention.attention_patterns import causal_1d_pattern, random_pattern
from triformers.components.attention.base import Attention, AttentionConfig
from triformers.components.attention.core import maybe_sparsify, scaled_dot_product_attention, sparsify
from triformers.components.attention.utils import combine_masks


@dataclass
class RandomAttentionConfig(AttentionConfig):
    r: float | None  # fraction of the keys each query attends
    constant_masking: bool | None  # keep one pattern (True) or draw one per call
    force_sparsity: bool | None
    causal: bool | None = None


@register_attention("random", RandomAttentionConfig)
class RandomAttention(Attention):
    """Attention over a random pattern keeping a fraction ``r`` of the pairs, plus the diagonal.

    Each token always attends to itself, so no query is left without keys.

    Shapes: q, k, v ``[N, S, D]`` -> ``[N, S, D]``.

    Args:
        dropout: dropout on the attention weights.
        causal: also mask keys after the query (default False).
        r: kept fraction (default 0.01).
        constant_masking: draw the pattern once per sequence length (default True) or per call.
        force_sparsity: always use the sparse path (default False: sparse below 30% density).
    """

    def __init__(
        self,
        dropout: float,
        causal: bool = False,
        r: float = 0.01,
        constant_masking: bool = True,
        force_sparsity: bool = False,
        *args,
        **kwargs,
    ) -> None:
        super().__init__()
        if not 0 < r <= 1:
            raise ValueError(f"r is the fraction of keys attended: it must be in (0, 1], got {r}")
        self.attn_drop = nn.Dropout(dropout, inplace=False)
        self.causal = causal
        self.r = r
        self.constant_masking = constant_masking
        self.force_sparsity = force_sparsity
        self.rand_attention_mask: torch.Tensor | AttentionMask | None = None
        self.requires_same_k_q_dimensions = True  # the pattern is [S, S]: query and key lengths match

    def _get_rand_mask(self, seq_len: int, device: torch.device):
        mask = random_pattern(seq_len, sparsity=1 - self.r) if self.r < 1 else torch.ones(seq_len, seq_len).bool()
        mask |= torch.eye(seq_len, dtype=torch.bool)
        if self.causal:
            mask &= causal_1d_pattern(seq_len)
        mask = sparsify(mask) if self.force_sparsity else maybe_sparsify(mask)
        return mask.to(device)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        att_mask: torch.Tensor | AttentionMask | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        S = q.shape[-2]
        if k.shape[-2] != S:
            raise ValueError(f"random attention needs equal query and key lengths, got {S} and {k.shape[-2]}")
        current = self.rand_attention_mask
        if not self.constant_masking or current is None or current.shape[-1] != S or current.device != q.device:
            self.rand_attention_mask = current = self._get_rand_mask(S, q.device)
        mask = current if att_mask is None else combine_masks(current, att_mask)
        return scaled_dot_product_attention(q, k, v, att_mask=mask, dropout=self.attn_drop)
