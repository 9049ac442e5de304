"""Layout-driven block-sparse attention (xFormers' ``blocksparse``), correct in plain torch.

Only the attended blocks are computed: the queries of block r attend the keys of the blocks c with
``layout[h, r, c] == 1``. The torch path gathers the attended key blocks of every query block, so work
and memory scale with the number of non-zero blocks, not with S².
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from triformers.components.attention import register_attention
from triformers.components.attention.base import Attention, AttentionConfig


@dataclass
class BlockSparseConfig(AttentionConfig):
    layout: torch.Tensor | None
    block_size: int | None
    num_heads: int | None
    causal: bool | None = None


@register_attention("blocksparse", BlockSparseConfig)
class BlockSparseAttention(Attention):
    """Block-sparse attention over a fixed layout.

    Shapes: q, k, v ``[B, H, S, Dh]`` (``requires_head_dimension``), ``S = layout.shape[-1] * block_size``;
    output ``[B, H, S, Dh]``.

    Args:
        layout: 0/1 ``[H, S/bs, S/bs]`` (or ``[S/bs, S/bs]``, shared by every head); e.g. from
            :mod:`~triformers.components.attention.sparsity_config`.
        block_size: tokens per block side (default 16).
        dropout: dropout on the attention weights (default 0.0).
        num_heads: heads the layout is expanded to when it is 2-D (default 1).
        causal: additionally mask keys after the query inside the attended blocks (default False).

    A query row whose blocks are all empty (or fully causally masked) outputs zeros.
    """

    def __init__(
        self,
        layout: torch.Tensor,
        block_size: int = 16,
        dropout: float = 0.0,
        num_heads: int = 1,
        causal: bool = False,
        *args,
        **kwargs,
    ) -> None:
        super().__init__()
        layout = torch.as_tensor(layout)
        if layout.ndim == 2:
            layout = layout.unsqueeze(0).expand(num_heads, -1, -1)
        if layout.ndim != 3 or layout.shape[-1] != layout.shape[-2]:
            raise ValueError(f"layout must be [heads, nb, nb] or [nb, nb], got shape={tuple(layout.shape)}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.register_buffer("layout", layout.bool().contiguous(), persistent=False)
        self.block_size = block_size
        self.causal = causal
        self.attn_drop = nn.Dropout(dropout)
        self.requires_head_dimension = True
        self.requires_same_k_q_dimensions = True
        self.supports_attention_mask = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0, *args, **kwargs):
        """Attend; ``scale`` multiplies the usual 1/sqrt(Dh) softmax scaling (default 1.0)."""
        if kwargs.get("att_mask") is not None:
            raise ValueError("blocksparse attention takes no att_mask: encode the pattern in its layout")
        B, H, S, D = q.shape
        bs, nb = self.block_size, self.layout.shape[-1]
        if S != nb * bs:
            raise ValueError(
                f"sequence length {S} does not match the layout: {nb} blocks of {bs} = {nb * bs}; pad the "
                "inputs "
                "or build the layout for this length"
            )
        if self.layout.shape[0] not in (1, H):
            raise ValueError(f"layout has {self.layout.shape[0]} heads but the inputs have {H}")
        layout = self.layout.expand(H, nb, nb)
        width = int(layout.sum(-1).max().item())  # most attended blocks in any row
        # per (head, query block): indices of its attended key blocks, padded with block 0 (masked out below)
        order = torch.argsort((~layout).to(torch.int8), dim=-1, stable=True)[..., :width]  # [H, nb, w]
        valid = torch.gather(layout, -1, order)  # [H, nb, w]

        qb = q.reshape(B, H, nb, bs, D)
        kb = k.reshape(B, H, nb, bs, D)
        vb = v.reshape(B, H, nb, bs, v.shape[-1])
        idx = order.reshape(1, H, nb * width, 1, 1)
        k_sel = torch.gather(kb, 2, idx.expand(B, H, nb * width, bs, D)).reshape(B, H, nb, width * bs, D)
        v_sel = torch.gather(vb, 2, idx.expand(B, H, nb * width, bs, v.shape[-1]))
        v_sel = v_sel.reshape(B, H, nb, width * bs, v.shape[-1])

        scores = (qb @ k_sel.transpose(-1, -2)) * (scale / math.sqrt(D))  # [B, H, nb, bs, w*bs]
        allowed = valid.repeat_interleave(bs, dim=-1)[None, :, :, None, :]  # [1, H, nb, 1, w*bs]
        if self.causal:
            q_pos = torch.arange(nb, device=q.device)[:, None] * bs + torch.arange(bs, device=q.device)
            k_pos = (order[..., None] * bs + torch.arange(bs, device=q.device)).flatten(-2)  # [H, nb, w*bs]
            allowed = allowed & (k_pos[:, :, None, :] <= q_pos[None, :, :, None]).unsqueeze(0)
        any_allowed = allowed.any(-1, keepdim=True)
        finite_min = torch.finfo(scores.dtype).min
        att = torch.softmax(scores.masked_fill(~allowed, finite_min), dim=-1)
        att = torch.where(allowed & any_allowed, att, torch.zeros_like(att))
        att = self.attn_drop(att)
        return (att @ v_sel).reshape(B, H, S, v.shape[-1])
