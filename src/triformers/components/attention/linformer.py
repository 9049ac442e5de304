"""Linformer (Wang et al., 2020): keys and values projected to ``k`` positions along the sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from triformers.components.attention._registry import register_attention
from triformers.components.attention.base import Attention, AttentionConfig
from triformers.components.attention.core import scaled_dot_product_attention


@dataclass
class LinformerSelfAttentionConfig(AttentionConfig):
    seq_len: int  # longest sequence
    k: int | None  # number of projected positions


@register_attention("linformer", LinformerSelfAttentionConfig)
class LinformerAttention(Attention):
    """``softmax(q (E k)^T / sqrt(D)) (F v)`` with learned ``E, F: [k, seq_len]`` over the sequence.

    Every query sees a mix of all positions: Linformer cannot be causal and takes no masks. Shorter
    sequences use the first columns of E and F (the same as zero-padding the keys).

    Shapes: q ``[N, S, D]``, k ``[N, S, D]``, v ``[N, S, Dv]`` with ``S <= seq_len`` -> ``[N, S, Dv]``.

    Args:
        dropout: dropout on the attention weights.
        seq_len: longest sequence.
        k: projected length (default ``max(1, seq_len // 4)``).
    """

    def __init__(self, dropout: float, seq_len: int, k: int | None = None, *args, **kwargs) -> None:
        super().__init__()
        k = k or max(1, seq_len // 4)
        self.k = k
        self.seq_len = seq_len
        self.E = nn.Linear(seq_len, k, bias=False)
        self.F = nn.Linear(seq_len, k, bias=False)
        self.attn_drop = nn.Dropout(dropout, inplace=False)
        self.requires_same_k_q_dimensions = True
        self.supports_attention_mask = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        S = k.shape[-2]
        if S > self.seq_len:
            raise ValueError(f"sequence length {S} exceeds seq_len={self.seq_len} of the Linformer projections")
        k_projected = self.E.weight[:, :S] @ k  # [N, k, D]
        v_projected = self.F.weight[:, :S] @ v  # [N, k, Dv]
        return scaled_dot_product_attention(q, k_projected, v_projected, att_mask=None, dropout=self.attn_drop)
