"""Lambda layer (Bello, 2021): content and relative-position lambdas instead of attention maps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from triformers.components.attention._registry import register_attention
from triformers.components.attention.base import Attention, AttentionConfig


def calc_rel_pos(n: int) -> torch.Tensor:
    """``[n, n]`` index of the relative position ``j - i``, shifted to ``[0, 2n - 2]``."""
    return torch.arange(n)[None, :] - torch.arange(n)[:, None] + n - 1


@dataclass
class LambdaLayerConfig(AttentionConfig):
    seq_len: int  # dimension of the input sequence
    dim_head: int


@register_attention("lambda", LambdaLayerConfig)
class LambdaLayer(Attention):
    r"""``y_n = q_n (lambda^c + lambda^p_n)`` with the content lambda ``softmax_over_positions(k)^T v``
    and the position lambda ``lambda^p_n = sum_m E[m - n]^T v_m`` (learned relative embeddings ``E``,
    ``[2 seq_len - 1, Dh]``).

    Shapes: q, k ``[N, S, Dh]``, v ``[N, S, Dv]`` with ``S <= seq_len`` -> ``[N, S, Dv]``. The position term is
    computed through relative logits (``q E^T``, gathered by offset): O(N S²) memory, no ``[S, S, Dh]`` table.

    Args:
        dropout: dropout on the output.
        seq_len: longest sequence.
        dim_head: per-head query/key dimension.
    """

    def __init__(self, dropout: float, seq_len: int, dim_head: int, *_, **__) -> None:
        super().__init__()
        self.rel_pos_emb = torch.nn.Parameter(torch.randn(2 * seq_len - 1, int(dim_head)))
        self.register_buffer("rel_pos", calc_rel_pos(seq_len), persistent=False)
        self.seq_len = seq_len
        self.attn_drop = torch.nn.Dropout(dropout, inplace=False)
        self.requires_same_k_q_dimensions = True
        self.supports_attention_mask = False
        self.supports_key_padding_mask = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_, **__) -> torch.Tensor:
        S = q.shape[1]
        if S > self.seq_len:
            raise ValueError(f"sequence length {S} exceeds seq_len={self.seq_len} of the lambda layer")
        if q.shape[-1] != self.rel_pos_emb.shape[-1]:
            raise ValueError(f"queries have {q.shape[-1]} features per head but dim_head={self.rel_pos_emb.shape[-1]}")
        content_lambda = torch.softmax(k, dim=1).transpose(1, 2) @ v  # [N, Dh, Dv]
        content_output = q @ content_lambda  # [N, S, Dv]
        # q_n . lambda^p_n = sum_m (q_n . E[m - n]) v_m: relative logits q E^T, gathered at offset m - n
        rel_logits = q @ self.rel_pos_emb.t()  # [N, S, 2 seq_len - 1]
        index = self.rel_pos[:S, :S].unsqueeze(0).expand(q.shape[0], -1, -1)
        position_output = torch.gather(rel_logits, -1, index) @ v  # [N, S, Dv]
        return self.attn_drop(content_output + position_output)
