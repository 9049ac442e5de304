"""The export surface of ``xformers.ops`` / ``xformers.ops.fmha`` in ``triformers.ops``: every name, the
operator-pair aliases as xFormers composes them, ``output_dtype``, and xFormers' documented ``op=`` example
running on our operators."""

import inspect

import pytest
import torch

import triformers.ops as xops
from triformers.ops import fmha

# `xformers.ops.__all__`, typed from the reference sheets: xformers-api.md §1.1 (v0.0.24) and the names the
# newer releases add (xformers-api-wave2.md §0.1 and §6.1)
XFORMERS_OPS_NAMES = """
memory_efficient_attention AttentionBias AttentionMask AttentionOp AttentionOpBase AttentionOpDispatch
LowerTriangularMask MemoryEfficientAttentionCutlassFwdFlashBwOp MemoryEfficientAttentionCutlassOp
MemoryEfficientAttentionFlashAttentionOp MemoryEfficientAttentionOp MemoryEfficientAttentionTritonFwdFlashBwOp
memory_efficient_attention_backward memory_efficient_attention_forward memory_efficient_attention_forward_requires_grad
RMSNorm SwiGLU SwiGLUEagerOp SwiGLUFusedOp SwiGLUOp SwiGLUOpDispatch SwiGLUPackedFusedOp swiglu TritonFlashAttentionOp
unbind stack_or_none get_stack_strides masked_matmul scaled_index_add index_select_cat rope_padded attn_bias fmha
MemoryEfficientAttentionCkOp MemoryEfficientAttentionSplitKCkOp
ColumnParallelLinear RowParallelLinear sequence_parallel_leading_matmul sequence_parallel_trailing_matmul
fused_allgather_and_anything fused_allgather_and_linear fused_anything_and_reducescatter fused_linear_and_reducescatter
tiled_matmul sparsify24 sparsify24_like Sparse24Tensor
""".split()
# what `xformers.ops.fmha` exposes beyond that (the same sheets)
XFORMERS_FMHA_NAMES = """
BlockDiagonalMask Inputs Context Gradients AttentionFwOpBase AttentionBwOpBase bmk2bmhk ALL_FW_OPS ALL_BW_OPS
attn_bias cutlass decoder flash small_k triton triton_splitk common dispatch MemoryEfficientAttentionDecoderOp
MemoryEfficientAttentionCutlassBlackwellOp flash3 ck ck_splitk cutlass_blackwell merge_training
memory_efficient_attention_partial merge_attentions _get_use_fa3 _set_use_fa3
""".split()
DISTRIBUTED = set(
    """
ColumnParallelLinear RowParallelLinear sequence_parallel_leading_matmul sequence_parallel_trailing_matmul
fused_allgather_and_anything fused_allgather_and_linear fused_anything_and_reducescatter fused_linear_and_reducescatter
""".split()
)


def test_every_xformers_ops_name_exists():
    names = [n for n in XFORMERS_OPS_NAMES if torch.distributed.is_available() or n not in DISTRIBUTED]
    assert [n for n in names if not hasattr(xops, n)] == []
    listed = set(xops.__all__)
    assert [n for n in names if n not in listed] == []  # `from triformers.ops import *` brings them too


def test_every_xformers_fmha_name_exists():
    assert [n for n in XFORMERS_FMHA_NAMES if not hasattr(fmha, n)] == []
    assert xops.AttentionMask is xops.AttentionBias


def test_operator_pairs_are_composed_as_in_xformers():
    # xFormers defines each pair from its operator modules (xformers-api.md §1.1, wave-2 §0.1); triformers
    # answers each module with one of its own, and the pairs must agree with the modules
    def pair(module_fw, module_bw):
        return (module_fw.FwOp, module_bw.BwOp)

    assert xops.MemoryEfficientAttentionCutlassOp == pair(fmha.cutlass, fmha.cutlass)
    assert xops.MemoryEfficientAttentionCutlassFwdFlashBwOp == pair(fmha.cutlass, fmha.flash)
    assert xops.MemoryEfficientAttentionFlashAttentionOp == pair(fmha.flash, fmha.flash)
    assert xops.MemoryEfficientAttentionTritonFwdFlashBwOp == pair(fmha.triton, fmha.flash)
    assert xops.MemoryEfficientAttentionOp == pair(fmha.small_k, fmha.small_k)
    assert xops.TritonFlashAttentionOp == pair(fmha.triton, fmha.triton)
    assert xops.MemoryEfficientAttentionCkOp == pair(fmha.ck, fmha.ck)
    assert fmha.MemoryEfficientAttentionCutlassBlackwellOp == pair(fmha.cutlass_blackwell, fmha.cutlass_blackwell)
    assert xops.MemoryEfficientAttentionSplitKCkOp[0] is fmha.ck_splitk.FwOp
    assert fmha.MemoryEfficientAttentionDecoderOp[0] is fmha.decoder.FwOp
    for name in ("MemoryEfficientAttentionSplitKCkOp", "MemoryEfficientAttentionDecoderOp"):
        op_fw, op_bw = getattr(fmha, name)
        assert op_bw is None or issubclass(op_bw, fmha.AttentionBwOpBase), name
    for name in [n for n in XFORMERS_OPS_NAMES + XFORMERS_FMHA_NAMES if n.endswith("Op") and "SwiGLU" not in n]:
        value = getattr(fmha, name)
        if name in ("AttentionOp",):
            continue
        op_fw, op_bw = value
        assert issubclass(op_fw, fmha.AttentionFwOpBase) and issubclass(op_bw, fmha.AttentionBwOpBase), name
    assert fmha._get_use_fa3() is False


@pytest.mark.parametrize(
    "fn",
    [
        xops.memory_efficient_attention,
        xops.memory_efficient_attention_forward,
        xops.memory_efficient_attention_forward_requires_grad,
    ],
)
def test_output_dtype_is_a_keyword(fn):
    parameter = inspect.signature(fn).parameters["output_dtype"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is None


def _reference(q, k, v, causal: bool):
    """Attention in float64, BMHK."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))  # [B, H, M, K]
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def _inputs(dtype, B=2, M=37, H=3, K=24, Kv=None, requires_grad=True):
    shapes = ([B, M, H, K], [B, M, H, K], [B, M, H, Kv or K])
    return [torch.randn(s, dtype=dtype).requires_grad_(requires_grad) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_output_dtype_float32_from_half(dtype):
    q, k, v = _inputs(torch.float16, requires_grad=False)
    expected = _reference(q, k, v, causal=False)
    out = xops.memory_efficient_attention_forward(q, k, v, output_dtype=dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = xops.memory_efficient_attention(q, k, v, output_dtype=dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)
    out.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.float16 for x in (q, k, v))
    out, lse = xops.memory_efficient_attention_forward_requires_grad(q, k, v, output_dtype=dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(
    "name",
    # the cutlass and ck pairs are the FlashAttention one (test_operator_pairs_are_composed_as_in_xformers)
    ["MemoryEfficientAttentionFlashAttentionOp", "MemoryEfficientAttentionOp"],
)
def test_documented_op_example_runs(name, dtype):
    """xFormers' documented example ``memory_efficient_attention(q, k, v, attn_bias=..., op=...)``, forward and
    gradients against float64, on this machine's device (the CPU: Triton's interpreter)."""
    op = getattr(xops, name)
    q, k, v = _inputs(dtype, M=21, K=16)
    out = xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask(), op=op)
    tol = {torch.float16: 2e-3, torch.float32: 2e-5}[dtype]
    torch.testing.assert_close(out.double(), _reference(q, k, v, causal=True), atol=tol, rtol=tol)
    grad = torch.randn_like(out)
    out.backward(grad)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected = torch.autograd.grad(_reference(*leaves, causal=True), leaves, grad.double())
    for x, g in zip((q, k, v), expected):
        # fp16 gradients: sums over 21 keys rounded to half
        torch.testing.assert_close(x.grad.double(), g, atol=10 * tol, rtol=10 * tol)


def test_decoder_pair_runs_a_decoding_step():
    op_fw, _ = xops.MemoryEfficientAttentionSplitKCkOp
    q = torch.randn(3, 1, 2, 16)
    k, v = torch.randn(3, 57, 2, 16), torch.randn(3, 57, 2, 16)
    out = xops.memory_efficient_attention_forward(q, k, v, op=op_fw)
    torch.testing.assert_close(out.double(), _reference(q, k, v, causal=False), atol=2e-5, rtol=2e-5)


def test_attention_op_dispatch_gives_a_usable_pair():
    q, k, v = _inputs(torch.float32, M=19, K=8)
    dispatched = xops.AttentionOpDispatch.from_arguments(q, k, v, attn_bias=xops.LowerTriangularMask())
    op_fw, op_bw = dispatched.op
    assert issubclass(op_fw, fmha.AttentionFwOpBase) and issubclass(op_bw, fmha.AttentionBwOpBase)
    out = xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask(), op=dispatched.op)
    torch.testing.assert_close(out.double(), _reference(q, k, v, causal=True), atol=2e-5, rtol=2e-5)
    out.sum().backward()
    assert all(x.grad is not None for x in (q, k, v))
