"""Dense softmax attention (xFormers' ``scaled_dot_product``), computed by memory_efficient_attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from triformers.components.attention._registry import register_attention
from triformers.components.attention.attention_mask import AttentionMask
from triformers.components.attention.base import Attention, AttentionConfig
from triformers.components.attention.core import scaled_dot_product_attention


@dataclass
class ScaledDotProductConfig(AttentionConfig):
    causal: bool | None
    seq_len: int | None
    to_seq_len: int | None


@register_attention("scaled_dot_product", ScaledDotProductConfig)
class ScaledDotProduct(Attention):
    r"""``softmax(q k^T / sqrt(D) + mask) v``, "Attention is all you need".

    Runs ``triformers.ops.memory_efficient_attention`` for no mask, the causal mask and any dense mask
    (bool, additive or :class:`AttentionMask`, passed as a tensor bias); only a ``torch.sparse`` mask takes
    the O(nnz) torch path of :func:`~triformers.components.attention.core.sparse_attention`.

    Shapes: q ``[N, Sq, D]``, k ``[N, Sk, D]``, v ``[N, Sk, Dv]`` -> ``[N, Sq, Dv]`` (N = batch x heads).

    Args:
        dropout: dropout on the attention weights, applied inside the kernel (default 0.0).
        causal: query i attends keys j <= i (default False).
        seq_len, to_seq_len: kept for xFormers compatibility (the causal mask is never materialised).
    """

    def __init__(
        self,
        dropout: float = 0.0,
        causal: bool = False,
        seq_len: int | None = None,
        to_seq_len: int | None = None,
        *args,
        **kwargs,
    ) -> None:
        super().__init__()
        self.attn_drop = nn.Dropout(dropout, inplace=False)
        self.causal = causal
        self.seq_len = seq_len
        self.to_seq_len = to_seq_len

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        att_mask: torch.Tensor | AttentionMask | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        """Attend; ``att_mask`` is bool (True = attend), additive float, AttentionMask or sparse."""
        return scaled_dot_product_attention(q, k, v, att_mask=att_mask, dropout=self.attn_drop, causal=self.causal)
