"""Functional operators: memory-efficient attention and fused ops (xFormers' ``xformers.ops``)."""

from triformers.ops import fmha
from triformers.ops.fmha import (
    AttentionBias,
    AttentionMask,
    AttentionOp,
    AttentionOpBase,
    AttentionOpDispatch,
    LowerTriangularMask,
    MemoryEfficientAttentionCkOp,
    MemoryEfficientAttentionCutlassFwdFlashBwOp,
    MemoryEfficientAttentionCutlassOp,
    MemoryEfficientAttentionFlashAttentionOp,
    MemoryEfficientAttentionOp,
    MemoryEfficientAttentionSplitKCkOp,
    MemoryEfficientAttentionTritonFwdFlashBwOp,
    TritonFlashAttentionOp,
    attn_bias,
    memory_efficient_attention,
    memory_efficient_attention_backward,
    memory_efficient_attention_forward,
    memory_efficient_attention_forward_requires_grad,
    memory_efficient_attention_partial,
    merge_attentions,
)

__all__ = [
    "fmha",
    "attn_bias",
    "AttentionBias",
    "AttentionMask",
    "AttentionOp",
    "AttentionOpBase",
    "AttentionOpDispatch",
    "LowerTriangularMask",
    # xFormers' operator-pair names: our nearest operators (docs/differences-from-xformers.md)
    "MemoryEfficientAttentionCkOp",
    "MemoryEfficientAttentionCutlassFwdFlashBwOp",
    "MemoryEfficientAttentionCutlassOp",
    "MemoryEfficientAttentionFlashAttentionOp",
    "MemoryEfficientAttentionOp",
    "MemoryEfficientAttentionSplitKCkOp",
    "MemoryEfficientAttentionTritonFwdFlashBwOp",
    "TritonFlashAttentionOp",
    "memory_efficient_attention",
    "memory_efficient_attention_backward",
    "memory_efficient_attention_forward",
    "memory_efficient_attention_forward_requires_grad",
    "memory_efficient_attention_partial",
    "merge_attentions",
]

# --- fused operators (rms_norm, swiglu, indexing, unbind): exports are added below this line ---
from triformers.ops.indexing import index_select_cat, scaled_index_add  # noqa: E402
from triformers.ops.rmsnorm import RMSNorm, rms_norm, rms_norm_add  # noqa: E402
from triformers.ops.rope_padded import rope_padded  # noqa: E402
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
    "rope_padded",
]

# --- tensor/sequence-parallel operators (need torch.distributed; the rest of the package does not) ---
import torch.distributed as _dist  # noqa: E402

if _dist.is_available():
    from triformers.distributed.context_parallel import context_parallel_attention  # noqa: E402
    from triformers.ops import differentiable_collectives  # noqa: E402
    from triformers.ops.modpar_layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402
    from triformers.ops.seqpar import sequence_parallel_leading_matmul, sequence_parallel_trailing_matmul  # noqa: E402
    from triformers.ops.sequence_parallel_fused_ops import (  # noqa: E402
        fused_allgather_and_anything,
        fused_allgather_and_linear,
        fused_anything_and_reducescatter,
        fused_linear_and_reducescatter,
    )

    __all__ += [
        "context_parallel_attention",
        "differentiable_collectives",
        "ColumnParallelLinear",
        "RowParallelLinear",
        "sequence_parallel_leading_matmul",
        "sequence_parallel_trailing_matmul",
        "fused_allgather_and_linear",
        "fused_allgather_and_anything",
        "fused_linear_and_reducescatter",
        "fused_anything_and_reducescatter",
    ]
from triformers.ops.tiled_matmul import tiled_matmul  # noqa: E402

__all__ += ["tiled_matmul"]

# --- sparsity: 2:4 semi-structured weights, masked_matmul (dense, block-sparse or CSR masks) ---
from triformers.ops.sp24 import Sparse24Tensor, sparsify24, sparsify24_like  # noqa: E402
from triformers.sparse._masked_matmul import masked_matmul  # noqa: E402

__all__ += ["Sparse24Tensor", "sparsify24", "sparsify24_like", "masked_matmul"]

# --- tree attention (a module, as in xFormers: ops.tree_attention.tree_attention, .TreeAttnMetadata) ---
from triformers.ops import tree_attention  # noqa: E402

__all__ += ["tree_attention"]
