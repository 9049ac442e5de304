"""Layout-driven block-sparse attention (xFormers' ``blocksparse``).

Only the attended blocks are computed: the queries of block r attend the keys of the blocks c with
``layout[h, r, c] == 1``. Blocks of 16 tokens or more run through ``memory_efficient_attention`` with a
:class:`~triformers.ops.fmha.attn_bias.BlockSparseMask` (our Triton kernels on CUDA, which skip the hidden
tiles forward and backward; the chunked operator on the CPU). Smaller blocks, which no kernel tile is fine
enough for, take the torch path (with a warning, once): it gathers the attended key blocks of each query
block (rows sorted by their number of blocks and processed in chunks), so work and memory scale with the
non-zero blocks, not with S².
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from triformers.components.attention._registry import register_attention
from triformers.components.attention.base import Attention, AttentionConfig

if TYPE_CHECKING:
    from triformers.ops.fmha.attn_bias import BlockSparseMask

_WARNED_SMALL_BLOCKS: set[bool] = set()


@dataclass
class BlockSparseConfig(AttentionConfig):
    layout: Any  # 0/1 tensor [heads, S/block, S/block] (typed Any so the Hydra schema can be stored)
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

    A query row whose blocks are all empty (or fully causally masked) outputs zeros. With ``block_size >= 16``
    the attention runs on ``memory_efficient_attention`` with :attr:`mask` (a ``BlockSparseMask``); below,
    on the torch path (:meth:`torch_forward`).
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
        self.ROWS_PER_CHUNK = 64  # query blocks per gather: bounds the padded working set
        # the mask the kernels read, built here and again when .to()/.cuda() move the layout (not on a first
        # forward: under torch.compile that would recompile the second call)
        self._mask: BlockSparseMask | None = None
        self._sync_mask()
        self.requires_head_dimension = True
        self.requires_same_k_q_dimensions = True
        self.supports_attention_mask = False

    def _sync_mask(self) -> None:
        """Builds the kernels' mask when it is missing or on another device than the layout (none below the
        kernels' smallest block: those run the torch path)."""
        from triformers.ops.fmha.attn_bias import MIN_SPARSE_BLOCK, BlockSparseMask  # ops imports the components

        stale = self._mask is None or self._mask.layout.device != self.layout.device
        if stale and self.block_size >= MIN_SPARSE_BLOCK:
            self._mask = BlockSparseMask(self.layout, self.block_size, causal=self.causal)

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        self._sync_mask()
        return module

    @property
    def mask(self) -> BlockSparseMask:
        """The layout as a :class:`BlockSparseMask` (blocks of at least 16 tokens), on the layout's device."""
        self._sync_mask()
        return self._mask

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0, *args, **kwargs):
        """Attend; ``scale`` multiplies the usual 1/sqrt(Dh) softmax scaling (default 1.0)."""
        if kwargs.get("att_mask") is not None:
            raise ValueError("blocksparse attention takes no att_mask: encode the pattern in its layout")
        B, H, S, D = q.shape
        bs, nb = self.block_size, self.layout.shape[-1]
        if S != nb * bs:
            raise ValueError(
                f"sequence length {S} does not match the layout: {nb} blocks of {bs} = {nb * bs}; "
                "pad the inputs or build the layout for this length"
            )
        if self.layout.shape[0] not in (1, H):
            raise ValueError(f"layout has {self.layout.shape[0]} heads but the inputs have {H}")
        from triformers.ops.fmha import memory_efficient_attention
        from triformers.ops.fmha.attn_bias import MIN_SPARSE_BLOCK

        if bs < MIN_SPARSE_BLOCK:
            if not _WARNED_SMALL_BLOCKS:
                _WARNED_SMALL_BLOCKS.add(True)
                warnings.warn(
                    f"blocksparse attention: block_size={bs} is below {MIN_SPARSE_BLOCK}, the smallest block the "
                    "attention kernels take; running the (slower) torch path. Build the layout with blocks of "
                    f"{MIN_SPARSE_BLOCK} or more tokens",
                    stacklevel=2,
                )
            return self.torch_forward(q, k, v, scale)
        p = self.attn_drop.p if self.training else 0.0
        out = memory_efficient_attention(  # BMHK views of [B, H, S, D]: no copy
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.mask, p=p, scale=scale / math.sqrt(D)
        )
        return out.transpose(1, 2)

    def torch_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The torch path of :meth:`forward` (any block size): gathers each query block's attended key blocks."""
        B, H, S, D = q.shape
        bs, nb = self.block_size, self.layout.shape[-1]
        layout = self.layout.expand(H, nb, nb).reshape(H * nb, nb)  # one row per (head, query block)
        widths = layout.sum(-1)
        # rows sorted by how many key blocks they attend, processed in chunks padded to the chunk's widest row:
        # a few dense (global) rows do not inflate the memory of all the others
        order = torch.argsort(widths, stable=True)
        qb = q.reshape(B, H * nb, bs, D)
        kb = k.reshape(B, H * nb, bs, D)
        vb = v.reshape(B, H * nb, bs, v.shape[-1])
        outs = []
        for rows in order.split(self.ROWS_PER_CHUNK):
            outs.append(self._attend_rows(qb, kb, vb, layout, rows, int(widths[rows].max()), nb, scale))
        out = torch.cat(outs, dim=1)[:, torch.argsort(order)]  # back to (head, block) order
        return out.reshape(B, H, S, v.shape[-1])

    def _attend_rows(self, qb, kb, vb, layout, rows, width, nb, scale):
        """Attention of the query blocks ``rows`` (flat head * nb + block) over their attended key blocks."""
        B, _, bs, D = qb.shape
        if width == 0:  # nothing attended: zeros
            return qb.new_zeros(B, len(rows), bs, vb.shape[-1])
        sub = layout[rows]  # [c, nb]
        cols = torch.argsort((~sub).to(torch.int8), dim=-1, stable=True)[:, :width]  # attended blocks first
        valid = torch.gather(sub, 1, cols)  # [c, w]; False where the row has fewer blocks than w
        key_blocks = (torch.div(rows, nb, rounding_mode="floor")[:, None] * nb + cols).flatten()  # same head
        k_sel = kb[:, key_blocks].reshape(B, len(rows), width * bs, D)
        v_sel = vb[:, key_blocks].reshape(B, len(rows), width * bs, vb.shape[-1])
        scores = (qb[:, rows] @ k_sel.transpose(-1, -2)) * (scale / math.sqrt(D))  # [B, c, bs, w*bs]
        allowed = valid.repeat_interleave(bs, dim=-1)[:, None, :]  # [c, 1, w*bs]
        if self.causal:
            offs = torch.arange(bs, device=qb.device)
            q_pos = (rows % nb)[:, None] * bs + offs  # [c, bs]
            k_pos = (cols[..., None] * bs + offs).flatten(-2)  # [c, w*bs]
            allowed = allowed & (k_pos[:, None, :] <= q_pos[:, :, None])
        allowed = allowed.unsqueeze(0)
        att = torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)
        att = torch.where(allowed & allowed.any(-1, keepdim=True), att, torch.zeros_like(att))
        return self.attn_drop(att) @ v_sel
