"""Sliding-window attention: each token attends to its neighbours only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from triformers import ops
from triformers.components.attention._registry import register_attention
from triformers.components.attention.attention_mask import AttentionMask
from triformers.components.attention.attention_patterns import causal_1d_pattern, local_1d_pattern
from triformers.components.attention.base import Attention, AttentionConfig
from triformers.components.attention.core import (
    attention_with_bias,
    maybe_sparsify,
    scaled_dot_product_attention,
    sparsify,
)
from triformers.components.attention.utils import combine_masks


@dataclass
class LocalAttentionConfig(AttentionConfig):
    causal: bool | None = None
    window_size: int | None = None
    force_sparsity: bool | None = None


@register_attention("local", LocalAttentionConfig)
class LocalAttention(Attention):
    """Attention within a window: ``|i - j| <= window_size // 2``, or ``i - window_size <= j <= i`` if causal.

    Without ``att_mask`` the window is a kernel-side mask of ``memory_efficient_attention``
    (``LocalAttentionFromBottomRightMask``, or ``LowerTriangularFromBottomRightLocalAttentionMask`` when
    causal): nothing is materialised and the tiles outside the window are skipped. With a mask (or
    ``force_sparsity``) the window becomes a pattern combined with it: sparse windows (under 30% of the
    pairs, or ``force_sparsity``) run the O(S x window) sparse path, denser ones a tensor bias.

    Shapes: q, k, v ``[N, S, D]`` -> ``[N, S, D]``.

    Args:
        dropout: dropout on the attention weights (default 0.0).
        causal: look back only (default False).
        window_size: odd window width when not causal (default 5); keys looked back when causal.
        force_sparsity: always use the sparse path (default False).
    """

    def __init__(
        self,
        dropout: float = 0.0,
        causal: bool = False,
        window_size: int = 5,
        force_sparsity: bool = False,
        *args,
        **kwargs,
    ) -> None:
        super().__init__()
        if not causal and window_size % 2 != 1:
            raise ValueError(f"a non-causal window is centred on the token: window_size must be odd, got {window_size}")
        self.attn_drop = nn.Dropout(dropout, inplace=False)
        self.causal = causal
        self.force_sparsity = force_sparsity
        self.window_size = window_size
        self.attention_mask: torch.Tensor | AttentionMask | None = None
        self.requires_same_k_q_dimensions = True  # the pattern is [S, S]: query and key lengths match

    def _get_local_mask(self, seq_len: int, device: torch.device):
        window_size = self.window_size * 2 + 1 if self.causal else self.window_size
        mask = local_1d_pattern(seq_len, window_size)
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
            raise ValueError(f"local attention needs equal query and key lengths, got {S} and {k.shape[-2]}")
        if att_mask is None and not self.force_sparsity:
            # the window as a kernel-side mask: memory_efficient_attention skips the tiles outside it
            if self.causal:
                bias = ops.attn_bias.LowerTriangularFromBottomRightLocalAttentionMask(self.window_size + 1)
            else:
                half = self.window_size // 2
                bias = ops.attn_bias.LocalAttentionFromBottomRightMask(window_left=half, window_right=half)
            return attention_with_bias(q, k, v, bias, dropout=self.attn_drop)
        current = self.attention_mask
        if current is None or current.shape[-1] != S or current.device != q.device:
            self.attention_mask = current = self._get_local_mask(S, q.device)
        mask = current if att_mask is None else combine_masks(current, att_mask)
        return scaled_dot_product_attention(q, k, v, att_mask=mask, dropout=self.attn_drop)
