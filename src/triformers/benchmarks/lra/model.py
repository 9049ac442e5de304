"""The LRA classifier: a pre-norm encoder over any registered attention, mean pooling, an MLP head (xFormers'
``ModelForSC`` / ``ModelForSCDual``)."""

from __future__ import annotations

import torch
from torch import nn

from triformers.components import MultiHeadDispatch
from triformers.components.attention import build_attention

# Names the benchmark accepts besides the registry's
ALIASES = {"dense": "scaled_dot_product"}


def attention_config(name: str, seq_len: int, dim: int, heads: int, block_size: int = 32) -> dict:
    """The config of attention ``name`` for sequences of ``seq_len`` (fields an attention does not declare are
    ignored by ``build_attention``): LRA's settings where it has them (Nystrom 128 landmarks and a 35-wide
    convolution on ListOps, Favor 256 features), else a quarter of the sequence."""
    name = ALIASES.get(name, name)
    config = {"name": name, "dropout": 0.0, "causal": False, "seq_len": seq_len, "num_heads": heads,
              "dim_head": dim // heads, "window_size": min(64, seq_len // 4) + 1,
              "k": min(256, max(1, seq_len // 4)), "num_landmarks": min(128, max(1, seq_len // 8)),
              "conv_kernel_size": 35 if seq_len >= 512 else None, "dim_features": min(256, 4 * dim // heads),
              "num_rules": heads}  # fmt: skip
    if name == "blocksparse":
        from triformers.components.attention.sparsity_config import BigBirdSparsityConfig

        if seq_len % block_size:
            raise ValueError(f"blocksparse: seq_len={seq_len} must be a multiple of block_size={block_size}")
        blocks = seq_len // block_size  # BigBird's defaults (1 random, 3-block window, 1 global), fitted to the row
        bigbird = BigBirdSparsityConfig(num_heads=heads, block_size=block_size, num_random_blocks=min(1, blocks),
                                        num_sliding_window_blocks=min(3, blocks), num_global_blocks=1)  # fmt: skip
        config["layout"] = bigbird.make_layout(seq_len)
        config["block_size"] = block_size
    return config


class Block(nn.Module):
    def __init__(self, attention: nn.Module, dim: int, heads: int, dim_mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = MultiHeadDispatch(dim_model=dim, num_heads=heads, attention=attention)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim_mlp), nn.GELU(), nn.Linear(dim_mlp, dim))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, key_padding_mask=key_padding_mask)
        return x + self.mlp(self.norm2(x))


class LRAClassifier(nn.Module):
    """Token + learned position embeddings, ``layers`` blocks, final norm, mean over non-padding tokens,
    ``Linear -> ReLU -> Linear``. ``dual``: two documents encoded alike, the head reads ``[a, b, a * b, a - b]``.
    Padding keys are masked out of the attention where the attention takes a mask (as LRA's models do; dense
    and Nystrom here), and attended like any token where it cannot (blocksparse, linformer):
    ``masks_padding`` says which. ``mask_padding=False`` for tasks without padding (Pathfinder, Image): an
    all-true mask changes nothing but costs the dense attention a fifth of its training throughput.

    Args:
        attention: a registered attention name (``dense`` = ``scaled_dot_product``).
        vocab, seq_len, num_classes: the task's.
        dim, heads, layers, dim_mlp: model sizes (LRA ListOps: 64, 2, 2, 128).
        block_size: blocks of the blocksparse layout (BigBird).
    """

    def __init__(self, attention: str, vocab: int, seq_len: int, num_classes: int, dim: int = 64, heads: int = 2,
                 layers: int = 2, dim_mlp: int = 128, dual: bool = False, block_size: int = 32,
                 mask_padding: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(build_attention(attention_config(attention, seq_len, dim, heads, block_size)), dim, heads, dim_mlp)
            for _ in range(layers)
        )
        first = self.blocks[0].attention.attention
        self.masks_padding = mask_padding and bool(first.supports_key_padding_mask or first.supports_attention_mask)
        self.norm = nn.LayerNorm(dim)
        self.dual = dual
        self.head = nn.Sequential(nn.Linear(4 * dim if dual else dim, dim_mlp), nn.ReLU(),
                                  nn.Linear(dim_mlp, num_classes))  # fmt: skip

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        keep = (ids != 0).unsqueeze(-1)  # [B, L, 1]
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        mask = keep.squeeze(-1) if self.masks_padding else None  # [B, L] bool, True = attend
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x) * keep
        return x.sum(1) / keep.sum(1).clamp(min=1)  # [B, dim]

    def forward(self, ids: torch.Tensor, ids2: torch.Tensor | None = None) -> torch.Tensor:
        a = self.encode(ids)
        if not self.dual:
            return self.head(a)
        b = self.encode(ids2)
        return self.head(torch.cat([a, b, a * b, a - b], dim=-1))
