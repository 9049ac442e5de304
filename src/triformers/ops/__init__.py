"""Functional operators: memory-efficient attention and fused ops (xFormers' ``xformers.ops``)."""

from triformers.ops import fmha
from triformers.ops.fmha import (
    AttentionBias,
    AttentionMask,
    AttentionOp,
    AttentionOpBase,
    LowerTriangularMask,
    attn_bias,
    memory_efficient_attention,
    memory_efficient_attention_backward,
    memory_efficient_attention_forward,
    memory_efficient_attention_forward_requires_grad,
)

__all__ = [
    "fmha",
    "attn_bias",
    "AttentionBias",
    "AttentionMask",
    "AttentionOp",
    "AttentionOpBase",
    "LowerTriangularMask",
    "memory_efficient_attention",
    "memory_efficient_attention_backward",
    "memory_efficient_attention_forward",
    "memory_efficient_attention_forward_requires_grad",
]

# --- fused operators (rms_norm, swiglu, indexing, unbind): exports are added below this line ---
