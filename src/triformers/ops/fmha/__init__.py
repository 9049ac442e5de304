"""Memory-efficient exact attention (xFormers' ``xformers.ops.fmha``), on every device.

    out = memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None)

Shapes (BMHK, unlike SDPA's BHMK)::

    query [B, Mq, H, K]   key [B, Mkv, H, K]   value [B, Mkv, H, Kv]   ->   out [B, Mq, H, Kv]

BMK (``[B, M, K]``, one head) and BMGHK (``[B, M, G, H, K]``, GQA with K/V expanded over H) work too.
Equivalent PyTorch::

    scale = 1 / query.shape[-1] ** 0.5 if scale is None else scale
    attn = (query * scale) @ key.transpose(-2, -1)     # per head, in [B, H, Mq, Mkv]
    attn = attn + attn_bias                            # a tensor, or a structured AttentionBias
    attn = attn.softmax(-1)
    attn = F.dropout(attn, p)
    return attn @ value
"""

from __future__ import annotations

from triformers.ops.fmha import attn_bias, chunked, common, dispatch, merge, sdpa, triton, triton_splitk
from triformers.ops.fmha._api import (
    _forward,  # noqa: F401  (ops.tree_attention runs a forward operator through it)
    memory_efficient_attention,
    memory_efficient_attention_backward,
    memory_efficient_attention_forward,
    memory_efficient_attention_forward_requires_grad,
    memory_efficient_attention_partial,
)
from triformers.ops.fmha._autograd import _fMHA, _with_tensor  # noqa: F401  (xFormers' private names)
from triformers.ops.fmha.attn_bias import AttentionBias, BlockDiagonalMask, LowerTriangularMask
from triformers.ops.fmha.common import (
    AttentionBwOpBase,
    AttentionFwOpBase,
    AttentionOp,
    AttentionOpBase,
    Context,
    Gradients,
    Inputs,
    bmk2bmhk,
)
from triformers.ops.fmha.dispatch import AttentionOpDispatch, _get_use_fa3, _set_use_fa3
from triformers.ops.fmha.merge import (
    Partial,
    memory_efficient_attention_partial_autograd,
    merge_attentions,
    merge_attentions_autograd,
)

AttentionMask = AttentionBias  # backward-compatible alias

MemoryEfficientAttentionChunkedOp = (chunked.FwOp, chunked.BwOp)
MemoryEfficientAttentionSdpaOp = (sdpa.FwOp, sdpa.BwOp)
TritonFlashAttentionOp = (triton.FwOp, triton.BwOp)
# xFormers' operator-pair names, for code that passes them as `op=`: they select our nearest equivalents
# (our Triton FlashAttention kernels cover what cutlass and flash did; the deprecated small-K operator maps
# to the pure-PyTorch one).
MemoryEfficientAttentionFlashAttentionOp = TritonFlashAttentionOp
MemoryEfficientAttentionCutlassOp = TritonFlashAttentionOp
MemoryEfficientAttentionCutlassFwdFlashBwOp = TritonFlashAttentionOp
MemoryEfficientAttentionTritonFwdFlashBwOp = TritonFlashAttentionOp
MemoryEfficientAttentionOp = MemoryEfficientAttentionChunkedOp
# newer xFormers pairs: Blackwell cutlass and ROCm's composable-kernel (ck) operators -> our Triton kernels; the
# decoding ones (decoder, ck_decoder, ck_splitk: forward only) -> split-K, paired with our Triton backward
MemoryEfficientAttentionCutlassBlackwellOp = TritonFlashAttentionOp
MemoryEfficientAttentionCkOp = TritonFlashAttentionOp
MemoryEfficientAttentionDecoderOp = (triton_splitk.FwOp, triton.BwOp)
MemoryEfficientAttentionCkDecoderOp = MemoryEfficientAttentionDecoderOp
MemoryEfficientAttentionSplitKCkOp = MemoryEfficientAttentionDecoderOp
# xFormers' operator modules under their names (`from xformers.ops.fmha import flash`, `fmha.cutlass.FwOp`),
# the same mapping as the pairs above; docs/differences-from-xformers.md has the table
flash = flash3 = cutlass = cutlass_blackwell = ck = triton
small_k = chunked
decoder = ck_decoder = ck_splitk = triton_splitk
merge_training = merge  # memory_efficient_attention_partial_autograd, merge_attentions_autograd
ALL_FW_OPS: list[type[AttentionFwOpBase]] = [triton.FwOp, sdpa.FwOp, chunked.FwOp, triton_splitk.FwOp]
ALL_BW_OPS: list[type[AttentionBwOpBase]] = [triton.BwOp, chunked.BwOp, sdpa.BwOp]

__all__ = [
    "memory_efficient_attention",
    "memory_efficient_attention_forward",
    "memory_efficient_attention_forward_requires_grad",
    "memory_efficient_attention_backward",
    "memory_efficient_attention_partial",
    "merge_attentions",
    "Partial",
    "memory_efficient_attention_partial_autograd",
    "merge_attentions_autograd",
    "AttentionBias",
    "AttentionMask",
    "AttentionOp",
    "AttentionOpBase",
    "AttentionFwOpBase",
    "AttentionBwOpBase",
    "BlockDiagonalMask",
    "LowerTriangularMask",
    "Inputs",
    "Context",
    "Gradients",
    "bmk2bmhk",
    "ALL_FW_OPS",
    "ALL_BW_OPS",
    "attn_bias",
    "chunked",
    "sdpa",
    "triton",
    "triton_splitk",
    "common",
    "dispatch",
    "merge",
    "TritonFlashAttentionOp",
    "MemoryEfficientAttentionChunkedOp",
    "MemoryEfficientAttentionSdpaOp",
    "MemoryEfficientAttentionFlashAttentionOp",
    "MemoryEfficientAttentionCutlassOp",
    "MemoryEfficientAttentionCutlassFwdFlashBwOp",
    "MemoryEfficientAttentionTritonFwdFlashBwOp",
    "MemoryEfficientAttentionOp",
    "MemoryEfficientAttentionCutlassBlackwellOp",
    "MemoryEfficientAttentionCkOp",
    "MemoryEfficientAttentionDecoderOp",
    "MemoryEfficientAttentionCkDecoderOp",
    "MemoryEfficientAttentionSplitKCkOp",
    "flash",
    "flash3",
    "cutlass",
    "cutlass_blackwell",
    "ck",
    "small_k",
    "decoder",
    "ck_decoder",
    "ck_splitk",
    "merge_training",
    "AttentionOpDispatch",
    "_get_use_fa3",
    "_set_use_fa3",
]
