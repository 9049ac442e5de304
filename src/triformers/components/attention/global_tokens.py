"""Global-token attention: a few tokens attend everywhere and are attended by every token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from triformers.components.attention._registry import register_attention
from triformers.components.attention.attention_mask import AttentionMask
from triformers.components.attention.attention_patterns import causal_1d_pattern, global_token_pattern
from triformers.components.attention.base import Attention, AttentionConfig
from triformers.components.attention.core import scaled_dot_product_attention
from triformers.components.attention.utils import combine_masks


@dataclass
class GlobalAttentionConfig(AttentionConfig):
    attention_query_mask: Any  # bool tensor [S, 1], True for the global tokens (Any: Hydra-storable)
    causal: bool | None
    force_sparsity: bool | None


@register_attention("global", GlobalAttentionConfig)
class GlobalAttention(Attention):
    """Attention restricted to ``m_i | m_j`` (global tokens both ways) plus each token itself.

    Every token also attends to itself, so a row never ends up empty (e.g. before the first global
    token under ``causal``). Sequences shorter than the mask use its top-left corner.

    Shapes: q, k, v ``[N, S, D]`` with ``S <= attention_query_mask.shape[0]`` -> ``[N, S, D]``.

    Args:
        dropout: dropout on the attention weights.
        attention_query_mask: bool ``[S_max, 1]`` (or ``[S_max]``), True for global tokens.
        causal: also mask keys after the query (default False).
        force_sparsity: kept for xFormers compatibility; the pattern is applied as a dense bias.
    """

    def __init__(
        self,
        dropout: float,
        attention_query_mask: torch.Tensor,
        causal: bool = False,
        force_sparsity: bool = False,
        *_,
        **__,
    ) -> None:
        super().__init__()
        mask = torch.as_tensor(attention_query_mask)
        if mask.ndim == 2:
            if mask.shape[1] != 1:
                raise ValueError(f"attention_query_mask must be [S, 1] or [S], got shape={tuple(mask.shape)}")
            mask = mask[:, 0]
        if mask.dtype != torch.bool:
            raise ValueError(f"attention_query_mask must be bool (True = global token), got dtype={mask.dtype}")
        pattern = global_token_pattern(mask) | torch.eye(mask.shape[0], dtype=torch.bool)
        if causal:
            pattern &= causal_1d_pattern(mask.shape[0])
        self.register_buffer("attention_mask", pattern, persistent=False)
        self.attn_drop = nn.Dropout(dropout, inplace=False)
        self.causal = causal
        self.force_sparsity = force_sparsity

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        att_mask: torch.Tensor | AttentionMask | None = None,
        *_,
        **__,
    ) -> torch.Tensor:
        sq, sk = q.shape[-2], k.shape[-2]
        if max(sq, sk) > self.attention_mask.shape[0]:
            raise ValueError(
                f"sequence length {max(sq, sk)} exceeds the {self.attention_mask.shape[0]} tokens of "
                "attention_query_mask; build the attention with a mask covering the longest sequence"
            )
        mask = combine_masks(self.attention_mask[:sq, :sk], att_mask)
        return scaled_dot_product_attention(q, k, v, att_mask=mask, dropout=self.attn_drop)
