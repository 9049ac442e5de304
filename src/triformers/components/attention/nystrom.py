"""Nyströmformer (Xiong et al., 2021): softmax attention through landmark queries and keys."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from triformers.components.attention._registry import register_attention
from triformers.components.attention.base import Attention, AttentionConfig
from triformers.components.attention.core import scaled_dot_product_attention, scaled_query_key_softmax
from triformers.components.attention.utils import (
    bool_mask_to_additive,
    iterative_pinv,
    reshape_key_padding_mask,
)

logger = logging.getLogger(__name__)


@dataclass
class NystromSelfAttentionConfig(AttentionConfig):
    num_heads: int  # number of heads (for the optional convolutional skip connection)
    num_landmarks: int | None  # number of landmarks (segments the sequence is averaged over)
    landmark_pooling: Any  # nn.Module (typed Any so the Hydra schema can be stored)
    causal: bool | None
    pinverse_original_init: bool | None
    inv_iterations: int | None
    v_skip_connection: Any  # nn.Module
    conv_kernel_size: int | None
    use_razavi_pinverse: bool | None


class AvgPool(nn.Module):
    """Average the sequence ``[N, S, D]`` over ``n`` contiguous segments -> ``[N, n, D]`` (the last
    ``S % n`` segments are one token longer)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq_len, head_dim = x.shape[1], x.shape[2]
        segments = seq_len // self.n
        if segments < 1:
            raise ValueError(f"num_landmarks={self.n} must not exceed the sequence length {seq_len}")
        if seq_len % self.n == 0:
            return x.reshape(-1, self.n, segments, head_dim).mean(dim=-2)
        n_round = self.n - seq_len % self.n
        short = x[:, : n_round * segments].reshape(-1, n_round, segments, head_dim).mean(dim=-2)
        long = x[:, n_round * segments :].reshape(-1, self.n - n_round, segments + 1, head_dim).mean(dim=-2)
        return torch.cat((short, long), dim=-2)


@register_attention("nystrom", NystromSelfAttentionConfig)
class NystromAttention(Attention):
    r"""``softmax(Q L_k^T) pinv(softmax(L_q L_k^T)) softmax(L_q K^T) V`` with segment-mean landmarks L.

    Exact softmax attention when ``num_landmarks >= S``. Landmarks average future tokens, so with
    ``causal=True`` and fewer landmarks than tokens the approximation would leak the future: this module
    then computes exact causal attention instead (and logs it once).

    Shapes: q, k ``[N, S, D]``, v ``[N, S, Dv]`` -> ``[N, S, Dv]`` (N = batch x heads).

    Args:
        dropout: dropout on the output.
        num_heads: heads folded into N (for the convolutional skip connection).
        num_landmarks: number of landmarks (default 64).
        landmark_pooling: module ``[N, S, D] -> [N, num_landmarks, D]`` (default segment means).
        causal: query i only sees keys j <= i (default False).
        use_razavi_pinverse: iterative pseudo-inverse (default True) instead of ``torch.linalg.pinv``.
        pinverse_original_init: see :func:`iterative_pinv` (default False).
        inv_iterations: pseudo-inverse iterations (default 6).
        v_skip_connection: module added to the output from v reshaped ``[B, H, S, Dv]``.
        conv_kernel_size: build a depthwise ``(k, 1)`` convolution as ``v_skip_connection``.

    Masks: ``key_padding_mask`` only, ``[B, S]`` or ``[B*H, 1, S]``, additive or bool (True = keep).
    """

    def __init__(
        self,
        dropout: float,
        num_heads: int,
        num_landmarks: int = 64,
        landmark_pooling: nn.Module | None = None,
        causal: bool = False,
        use_razavi_pinverse: bool = True,
        pinverse_original_init: bool = False,
        inv_iterations: int = 6,
        v_skip_connection: nn.Module | None = None,
        conv_kernel_size: int | None = None,
        *args,
        **kwargs,
    ) -> None:
        super().__init__()
        self.requires_separate_masks = True
        self.supports_attention_mask = False
        self.supports_key_padding_mask = True
        self.num_landmarks = num_landmarks
        self.num_heads = num_heads
        self.use_razavi_pinverse = use_razavi_pinverse
        self.pinverse_original_init = pinverse_original_init
        self.inv_iterations = inv_iterations
        self.attn_drop = nn.Dropout(dropout)
        self.skip_connection = v_skip_connection
        self.causal = causal
        if self.skip_connection is None and conv_kernel_size is not None:
            self.skip_connection = nn.Conv2d(
                in_channels=num_heads,
                out_channels=num_heads,
                kernel_size=(conv_kernel_size, 1),
                padding=(conv_kernel_size // 2, 0),
                bias=False,
                groups=num_heads,
            )
        self.landmark_pooling = landmark_pooling if landmark_pooling is not None else AvgPool(n=num_landmarks)
        self._warned_causal = False

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        batched_dim, seq_len = k.shape[0], k.shape[-2]
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                key_padding_mask = bool_mask_to_additive(key_padding_mask, q.dtype)
            if key_padding_mask.ndim == 2:
                key_padding_mask = reshape_key_padding_mask(key_padding_mask, batched_dim)
            if tuple(key_padding_mask.shape) != (batched_dim, 1, seq_len):
                raise ValueError(
                    f"key_padding_mask.shape={tuple(key_padding_mask.shape)}; expected [B, S] or "
                    f"[B*H, 1, S] = {(batched_dim, 1, seq_len)}"
                )
            keep = (~torch.isinf(-key_padding_mask)).to(q.dtype).transpose(2, 1)  # [N, S, 1]
            # zero the padded tokens before pooling them into landmarks
            q, k = q * keep, k * keep

        exact = self.num_landmarks >= seq_len
        if self.causal and not exact and not self._warned_causal:
            logger.warning(
                "nystrom: causal attention with num_landmarks=%d < seq_len=%d would leak future tokens "
                "through "
                "the landmarks; computing exact causal attention",
                self.num_landmarks,
                seq_len,
            )
            self._warned_causal = True
        if exact or self.causal:
            x = scaled_dot_product_attention(q, k, v, att_mask=key_padding_mask, causal=self.causal)
        else:
            q_landmarks = self.landmark_pooling(q)
            k_landmarks = self.landmark_pooling(k)
            kernel_1 = scaled_query_key_softmax(q, k_landmarks, None)
            kernel_2 = scaled_query_key_softmax(q_landmarks, k_landmarks, None)
            kernel_3 = scaled_dot_product_attention(q_landmarks, k, v, att_mask=key_padding_mask)
            if self.use_razavi_pinverse:
                kernel_2_inv = iterative_pinv(kernel_2, self.inv_iterations, self.pinverse_original_init)
            else:
                kernel_2_inv = torch.linalg.pinv(kernel_2)
            # kernel_1 @ (kernel_2_inv @ kernel_3): [S, m] @ [m, Dv] after [m, m] @ [m, Dv], which costs
            # 2 S m Dv + 2 m^2 Dv instead of 2 S m^2 + 2 S m Dv for (kernel_1 @ kernel_2_inv) @ kernel_3
            x = kernel_1 @ (kernel_2_inv @ kernel_3)

        if self.skip_connection is not None:
            v_conv = self.skip_connection(v.reshape(-1, self.num_heads, v.size(-2), v.size(-1)))
            x = x + v_conv.reshape(-1, v_conv.size(-2), v_conv.size(-1))
        return self.attn_drop(x)
