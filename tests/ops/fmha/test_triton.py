"""fmha.triton on CPU tensors under Triton's interpreter: multi-tile odd sizes, dropout identical to the
chunked operator, the deterministic backward, torch.compile, and the operator's refusals."""

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha import triton as triton_op
from triformers.ops.fmha.attn_bias_utils import create_inputs
from triformers.ops.fmha.reference import ref_attention

TRITON = fmha.TritonFlashAttentionOp
CHUNKED = fmha.MemoryEfficientAttentionChunkedOp

pytestmark = pytest.mark.skipif(not triton_op.FwOp.is_available(), reason="triton is not installed")


def _grads(out, tensors, g):
    return torch.autograd.grad(out, tensors, g)


@pytest.mark.parametrize("bias_type", [ab.LowerTriangularMask, ab.LocalAttentionFromBottomRightMask,
                                       ab.BlockDiagonalCausalLocalAttentionFromBottomRightMask, torch.Tensor])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_multi_tile_odd_sizes(bias_type, dtype):
    """Several 16-wide tiles with ragged edges in every direction, K = 40 and Kv = 24 padded in registers."""
    inp = create_inputs(bias_type, batch_size=2, q_len=67, kv_len=83, num_heads=2, k=40, kv=24, dtype=dtype,
                        requires_grad=True, bias_requires_grad=True, seed=11)
    q, k, v, bias = inp.query, inp.key, inp.value, inp.attn_bias
    out = fmha.memory_efficient_attention(q, k, v, bias, op=TRITON)
    ref, _ = ref_attention(q, k, v, bias)
    atol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
    tensors = inp.tensors()
    g = torch.randn_like(out)
    for a, b in zip(_grads(out, tensors, g), _grads(ref, tensors, g.double())):
        torch.testing.assert_close(a.double(), b.double(), atol=10 * atol, rtol=10 * atol)


@pytest.mark.parametrize("bias_type", [type(None), ab.LowerTriangularMask, ab.BlockDiagonalCausalMask])
@pytest.mark.parametrize("gqa", [False, True])
def test_dropout_identical_to_chunked(bias_type, gqa):
    """Both operators draw the same Philox stream: same seed, same dropped entries, same gradients."""
    inp = create_inputs(bias_type, batch_size=1, q_len=37, kv_len=37, num_heads=2, k=16, fmt="BMGHK",
                        num_groups=2, requires_grad=True, seed=5, gqa=gqa)
    q, k, v, bias = inp.query, inp.key, inp.value, inp.attn_bias
    torch.manual_seed(123)
    out_t = fmha.memory_efficient_attention(q, k, v, bias, p=0.4, op=TRITON)
    torch.manual_seed(123)
    out_c = fmha.memory_efficient_attention(q, k, v, bias, p=0.4, op=CHUNKED)
    torch.testing.assert_close(out_t, out_c, atol=2e-5, rtol=1e-4)
    leaves = [x if x.is_leaf else x._base for x in (q, k, v)]
    g = torch.randn_like(out_t)
    for a, b in zip(_grads(out_t, leaves, g), _grads(out_c, leaves, g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_deterministic_backward():
    """Under torch.use_deterministic_algorithms the backward uses no atomics (separate dQ kernel, bias
    gradient reduced after the kernel) and matches the reference."""
    B, M, H, K = 2, 45, 3, 16
    q, k, v = (torch.randn(B, M, H, K, requires_grad=True) for _ in range(3))
    base = torch.randn(H, M, requires_grad=True)
    bias = base[None, :, None, :].expand(B, H, M, M)
    g = torch.randn(B, M, H, K)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            out = fmha.memory_efficient_attention(q, k, v, ab.LowerTriangularMask().add_bias(bias), op=TRITON)
            runs.append(_grads(out, (q, k, v, base), g))
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref, _ = ref_attention(q, k, v, ab.LowerTriangularMask().add_bias(bias))
    for a, b in zip(runs[0], _grads(ref, (q, k, v, base), g.double())):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("op_name", ["chunked", "triton"])
def test_compile_fullgraph(op_name):
    """memory_efficient_attention compiles with fullgraph=True (no graph break): the Triton kernels are
    torch.library custom ops with fake implementations; the chunked operator is plain torch."""
    op = {"chunked": CHUNKED, "triton": TRITON}[op_name]
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 40, 4, 16, requires_grad=True) for _ in range(3))
    bias_base = torch.randn(1, 4, 1, 40, requires_grad=True)
    for bias in (ab.LowerTriangularMask(), bias_base, ab.BlockDiagonalMask.from_seqlens([30, 50]).make_causal()):
        args = (q, k, v) if not isinstance(bias, ab.BlockDiagonalMask) else tuple(x.reshape(1, 80, 4, 16)
                                                                                   for x in (q, k, v))
        # aot_eager: Dynamo's capture and AOT autograd's trace through the custom ops' fake implementations,
        # which is what could break; Inductor's code generation is torch's (the GPU test compiles with it)
        fn = torch.compile(lambda a, b, c, bias=bias: fmha.memory_efficient_attention(a, b, c, bias, op=op),
                           fullgraph=True, backend="aot_eager")
        out = fn(*args)
        ref = fmha.memory_efficient_attention(*args, bias, op=op)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        leaves = [q, k, v] + ([bias_base] if bias is bias_base else [])
        for a, b in zip(_grads(out.sum(), leaves, None), _grads(ref.sum(), leaves, None)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_refusals(monkeypatch):
    q = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    reasons = triton_op.FwOp.not_supported_reasons(fmha.Inputs(q, q, q))
    assert any("bf16 under Triton's interpreter" in r for r in reasons)
    q = torch.randn(1, 8, 2, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = triton_op.FwOp.not_supported_reasons(fmha.Inputs(q, q, q))
    assert any("TRITON_INTERPRET=1" in r for r in reasons)
    with pytest.raises(ValueError, match="does not support inputs"):
        fmha.memory_efficient_attention(q, q, q, op=TRITON)
    big = torch.randn(1, 4, 1, 264)
    assert any("> 256" in r for r in triton_op.FwOp.not_supported_reasons(fmha.Inputs(big, big, big)))


def test_cpu_auto_never_picks_triton():
    """On the CPU the interpreter is for tests only: auto dispatch picks sdpa or chunked."""
    q, k = torch.randn(1, 8, 2, 16), torch.randn(1, 11, 2, 16)
    for bias in (None, ab.LowerTriangularFromBottomRightMask(), torch.randn(1, 2, 8, 11)):
        inp = fmha.Inputs(q, k, k, bias)
        assert fmha.dispatch.dispatch_fw(inp, needs_gradient=True) in (fmha.sdpa.FwOp, fmha.chunked.FwOp)


@pytest.mark.parametrize("path", ["pointers", "atomic_dq"])
def test_alternative_kernel_paths(path, monkeypatch):
    """The pointer path (strides TMA cannot address) and the atomic-dQ backward stay correct."""
    from triformers.ops.fmha._triton import launch

    if path == "pointers":
        monkeypatch.setattr(launch, "USE_TMA", False)
    else:
        monkeypatch.setattr(launch, "ATOMIC_DQ", True)
    inp = create_inputs(ab.BlockDiagonalCausalLocalAttentionMask, batch_size=2, q_len=40, kv_len=40, num_heads=2,
                        k=24, kv=16, fmt="BMGHK", num_groups=2, gqa=True, requires_grad=True, seed=9)
    q, k, v, bias = inp.query, inp.key, inp.value, inp.attn_bias
    tensor_bias = torch.randn(2, 2, 40, 40, requires_grad=True)
    qd, kd, vd = (torch.randn(2, 40, 2, 24, requires_grad=True) for _ in range(3))
    for args in ((q, k, v, bias), (qd, kd, vd, tensor_bias)):
        out = fmha.memory_efficient_attention(*args, op=TRITON)
        ref, _ = ref_attention(*args)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
        leaves = [x if x.is_leaf else x._base for x in args if isinstance(x, torch.Tensor)]
        g = torch.randn_like(out)
        for a, b in zip(_grads(out, leaves, g), _grads(ref, leaves, g.double())):
            torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


def test_keys_covered_only_when_every_key_is_in_a_block():
    """The backward skips zero-filling dK/dV only when every key row lies in some block."""
    from triformers.ops.fmha._triton.launch import mask_args

    def covered(bias, Mq, Mkv):
        return mask_args(bias, Mq, Mkv, torch.device("cpu")).keys_covered

    assert covered(None, 5, 7) and covered(ab.LowerTriangularMask(), 7, 7)
    assert covered(ab.BlockDiagonalCausalMask.from_seqlens([3, 5, 2]), 10, 10)
    assert covered(ab.BlockDiagonalMask.from_seqlens([3, 5], [4, 6]), 8, 10)
    padded = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([2, 3], kv_padding=8, kv_seqlen=[5, 8])
    assert not covered(padded, 5, 16)  # keys 5..7 of the first sequence are padding
    full = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([2, 3], kv_padding=8, kv_seqlen=[8, 8])
    assert not covered(full, 5, 16)  # full now, but its lengths may shrink in place (from_seqlens_padded_inplace)


@pytest.mark.parametrize("scale", [0.3, -0.3, 0.0])
@pytest.mark.parametrize("bias_type", [ab.LowerTriangularMaskWithTensorBias, ab.LowerTriangularMask])
def test_scale_of_any_sign(scale, bias_type):
    """Custom scales of every sign (the row max does not commute with a negative scale), with a tensor bias
    and a mask: outputs and all gradients match the float64 reference."""
    inp = create_inputs(bias_type, batch_size=1, q_len=37, kv_len=37, num_heads=2, k=16, dtype=torch.float32,
                        requires_grad=True, bias_requires_grad=True, seed=5)
    q, k, v, bias = inp.query, inp.key, inp.value, inp.attn_bias
    out = fmha.memory_efficient_attention(q, k, v, bias, scale=scale, op=TRITON)
    ref, _ = ref_attention(q, k, v, bias, scale=scale)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    g = torch.randn_like(out)
    tensors = inp.tensors()
    for a, b in zip(_grads(out, tensors, g), _grads(ref, tensors, g.double())):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("layout", ["bmhk", "bhmk_transposed"])
def test_custom_ops_fake_outputs_match_the_kernels(layout):
    """The fake implementations of ``triformers::flash_fwd``/``flash_bwd`` give the sizes and strides the kernels
    return, also for q/k/v that are transposed views (what a multi-head layer hands over): Inductor checks the
    real outputs against them, and ``dq`` was once faked with q's strides while the kernel writes it dense."""
    from triformers.ops.fmha import _flash_ops

    gen = torch.Generator().manual_seed(3)

    def make(m):
        x = torch.randn(2, 3, m, 16, generator=gen)  # [B, H, M, K]
        return x.transpose(1, 2) if layout == "bhmk_transposed" else x.transpose(1, 2).contiguous()

    q, k, v = make(20), make(24), make(24)
    args = _flash_ops._call_args(fmha.Inputs(q, k, v), None)
    fwd = torch.ops.triformers.flash_fwd.default
    torch.library.opcheck(fwd, args, test_utils=("test_schema", "test_faketensor"))
    out, lse = fwd(*args)
    grad = torch.randn(out.shape, generator=gen).transpose(1, 2).contiguous().transpose(1, 2)
    bwd_args = (grad, q, k, v, out, lse, None, -1, *args[4:14], None, args[15], args[16], False, None)
    torch.library.opcheck(torch.ops.triformers.flash_bwd.default, bwd_args, test_utils=("test_schema",
                                                                                     "test_faketensor"))
