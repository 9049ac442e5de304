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
from triformers.ops.indexing import index_select_cat, scaled_index_add  # noqa: E402
from triformers.ops.rmsnorm import RMSNorm, rms_norm, rms_norm_add  # noqa: E402
from triformers.ops.swiglu import (  # noqa: E402
    SwiGLU,
    SwiGLUEagerOp,
    SwiGLUFusedOp,
    SwiGLUOp,
    SwiGLUOpDispatch,
    SwiGLUPackedFusedOp,
    swiglu,
)
from triformers.ops.unbind import get_stack_strides, stack_or_none, unbind  # noqa: E402

__all__ += [
    "rms_norm",
    "rms_norm_add",
    "RMSNorm",
    "swiglu",
    "SwiGLU",
    "SwiGLUOp",
    "SwiGLUOpDispatch",
    "SwiGLUEagerOp",
    "SwiGLUFusedOp",
    "SwiGLUPackedFusedOp",
    "scaled_index_add",
    "index_select_cat",
    "unbind",
    "stack_or_none",
    "get_stack_strides",
]
