"""One config dict that builds every registered attention, shared by the generic tests and the benchmark.

Each attention picks the fields its config declares and ignores the others, so a new attention whose
fields are among these (or have defaults) is tested and benchmarked with no other change.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from triformers.components.attention.sparsity_config import BigBirdSparsityConfig


def generic_attention_config(
    name: str,
    seq_len: int,
    dim_model: int,
    num_heads: int,
    causal: bool = False,
    dropout: float = 0.0,
) -> dict[str, Any]:
    """The superset config of attention ``name`` for inputs ``[B, seq_len, dim_model]``.

    Args:
        name: registered attention name.
        seq_len: sequence length (a perfect square suits the 2-D token mixers).
        dim_model: model dimension.
        num_heads: number of heads.
        causal: request causal attention from the attentions that support it.
        dropout: attention dropout.
    """
    # blocks of 16 tokens (the GPU kernels' smallest) when the sequence has room for a few, else smaller ones
    block_size = next(b for b in (16, 8, 6, 4, 3, 2, 1) if seq_len % b == 0 and seq_len // b >= 3)
    num_blocks = seq_len // block_size
    layout = BigBirdSparsityConfig(
        num_heads, block_size=block_size, num_random_blocks=1, num_sliding_window_blocks=min(3, num_blocks)
    ).make_layout(seq_len)
    return {
        "name": name,
        "dropout": dropout,
        "causal": causal,
        "seq_len": seq_len,
        "dim_model": dim_model,
        "num_heads": num_heads,
        "dim_head": dim_model // num_heads,
        "window_size": 2 * (max(seq_len // 8, 1) // 2) + 1,  # local attention, odd
        "attention_query_mask": torch.rand((seq_len, 1)) < 0.3,  # global tokens
        "num_rules": 2,  # compositional attention
        "r": 0.5,  # random attention
        "num_landmarks": max(2, math.isqrt(seq_len)),  # nystrom, orthoformer: fewer landmarks than tokens
        "layout": layout,  # blocksparse
        "block_size": block_size,
    }
