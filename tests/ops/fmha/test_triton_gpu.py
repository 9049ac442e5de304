"""fmha.triton on the GPU: every bias type x fp16/bf16 x head dims {32, 64, 80, 128, 256} at sizes with several
tiles and ragged edges, forward and every gradient; dropout statistics and agreement with the chunked
operator; bitwise-repeatable deterministic backward; torch.compile; grid limits.

Half-precision check (as FlashAttention's tests do): the error of our output against a float64 reference
must stay within a small multiple of the error of PyTorch's own attention computed in the same dtype.
"""

import math

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha.attn_bias_utils import ALL_BIAS_TYPES, bias_name, create_inputs
from triformers.ops.fmha.reference import ref_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TRITON = fmha.TritonFlashAttentionOp
HEAD_DIMS = [32, 64, 80, 128, 256]
# our error may be this many times the error of torch's same-dtype attention, plus a floor for values
# where both are essentially exact
ERR_RATIO = 3.0
ERR_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _leaves(tensors):
    out = []
    for t in tensors:
        leaf = t if t.is_leaf else t._base
        if leaf is not None and leaf.requires_grad and all(leaf is not x for x in out):
            out.append(leaf)
    return out


def _check_close(ours, lowp, exact, dtype, what):
    err = (ours.double() - exact).abs().max().item()
    ref_err = (lowp.double() - exact).abs().max().item()
    scale = exact.abs().max().item() + 1e-6
    assert math.isfinite(err), f"{what}: non-finite"
    assert err <= ERR_RATIO * ref_err + ERR_FLOOR[dtype] * max(1.0, scale), (
        f"{what}: max error {err:.3e} vs torch {dtype} attention {ref_err:.3e} (max |ref| {scale:.2f})"
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("bias_type", ALL_BIAS_TYPES, ids=bias_name)
def test_forward_backward(bias_type, head_dim, dtype):
    fmt, gqa = ("BMGHK", True) if head_dim in (64, 128) else ("BMHK", False)
    inp = create_inputs(bias_type, batch_size=2, q_len=197, kv_len=261, num_heads=3, k=head_dim, num_groups=2,
                        fmt=fmt, gqa=gqa, dtype=dtype, device="cuda", requires_grad=True,
                        bias_requires_grad=True, seed=head_dim)
    q, k, v, bias = inp.query, inp.key, inp.value, inp.attn_bias
    out = fmha.memory_efficient_attention(q, k, v, bias, op=TRITON)
    exact, _ = ref_attention(q, k, v, bias)
    lowp, _ = ref_attention(q, k, v, bias, dtype=None)
    _check_close(out, lowp, exact, dtype, "out")
    leaves = _leaves(inp.tensors())
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    exact_grads = torch.autograd.grad(exact, leaves, g.double())
    lowp_grads = torch.autograd.grad(lowp, leaves, g)
    for name, a, b, c in zip(["dq", "dk", "dv", "dbias"], grads, lowp_grads, exact_grads):
        _check_close(a, b, c.double(), dtype, name)


@pytest.mark.parametrize("bias_type", [type(None), ab.LowerTriangularMask, ab.BlockDiagonalCausalMask,
                                       ab.LowerTriangularMaskWithTensorBias], ids=bias_name)
def test_fp32_without_tf32(bias_type):
    inp = create_inputs(bias_type, batch_size=2, q_len=131, kv_len=131, num_heads=2, k=64, dtype=torch.float32,
                        device="cuda", requires_grad=True, bias_requires_grad=True, seed=3)
    q, k, v, bias = inp.query, inp.key, inp.value, inp.attn_bias
    out = fmha.memory_efficient_attention(q, k, v, bias, op=TRITON)
    ref, _ = ref_attention(q, k, v, bias)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    leaves = _leaves(inp.tensors())
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g.double())):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-4, rtol=2e-4)


def test_lse_and_low_level_api():
    q, k, v = (torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    out, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, ab.LowerTriangularMask(),
                                                                     op=fmha.triton.FwOp)
    _, ref_lse = ref_attention(q, k, v, ab.LowerTriangularMask())
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-3, rtol=1e-3)
    grad = torch.randn_like(out)
    dq, dk, dv = fmha.memory_efficient_attention_backward(grad, out, lse, q, k, v, ab.LowerTriangularMask(),
                                                          op=fmha.triton.BwOp)
    q2, k2, v2 = (x.clone().requires_grad_() for x in (q, k, v))
    ref = fmha.memory_efficient_attention(q2, k2, v2, ab.LowerTriangularMask(), op=TRITON)
    for a, b in zip((dq, dk, dv), torch.autograd.grad(ref, (q2, k2, v2), grad)):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def test_dropout_statistics_and_chunked_agreement():
    B, M, H, K = 2, 384, 4, 64
    q, k, v = (torch.randn(B, M, H, K, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    torch.manual_seed(7)
    a = fmha.memory_efficient_attention(q, k, v, p=0.3, op=TRITON)
    torch.manual_seed(7)
    b = fmha.memory_efficient_attention(q, k, v, p=0.3, op=TRITON)
    assert torch.equal(a, b)
    torch.manual_seed(7)
    c = fmha.memory_efficient_attention(q, k, v, p=0.3, op=fmha.MemoryEfficientAttentionChunkedOp)
    torch.testing.assert_close(a, c, atol=5e-3, rtol=5e-3)  # same mask: only rounding differs
    g = torch.randn_like(a)
    for x, y in zip(torch.autograd.grad(a, (q, k, v), g), torch.autograd.grad(c, (q, k, v), g)):
        torch.testing.assert_close(x, y, atol=3e-2, rtol=3e-2)
    # keep rate: with V = identity rows, out = P * mask / (1 - p) summed; use v = 1 -> E[out] = 1
    ones = torch.ones(1, 2048, 1, 16, device="cuda", dtype=torch.float32)
    qz = torch.zeros(1, 64, 1, 16, device="cuda")
    out = fmha.memory_efficient_attention(qz, ones[..., :16], ones, p=0.5, op=TRITON)
    kept_fraction = (out[..., 0] * 0.5).mean().item()  # uniform P = 1/2048 per key
    n = 64 * 2048
    assert abs(kept_fraction - 0.5) < 5 * math.sqrt(0.25 / n)


def test_deterministic_backward_is_bitwise_repeatable():
    B, M, H, K = 2, 700, 4, 64
    q, k, v = (torch.randn(B, M, H, K, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    base = torch.randn(H, M, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = base[None, :, None, :].expand(B, H, M, M)
    g = torch.randn(B, M, H, K, device="cuda", dtype=torch.bfloat16)
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(3):
            out = fmha.memory_efficient_attention(q, k, v, bias, op=TRITON)
            runs.append(torch.autograd.grad(out, (q, k, v, base), g))
    finally:
        torch.use_deterministic_algorithms(False)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    nondet = torch.autograd.grad(fmha.memory_efficient_attention(q, k, v, bias, op=TRITON), (q, k, v, base), g)
    for a, b in zip(runs[0], nondet):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("op_name", ["auto", "triton"])
def test_torch_compile_fullgraph(op_name):
    """Compiled (fullgraph) and eager calls give the same result through the same operator choice."""
    op = TRITON if op_name == "triton" else None
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 512, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    bias = ab.BlockDiagonalMask.from_seqlens([300, 212, 400, 112]).make_causal()
    qp, kp, vp = (x.reshape(1, 1024, 8, 64) for x in (q, k, v))
    for attn_bias, args in ((ab.LowerTriangularMask(), (q, k, v)), (bias, (qp, kp, vp))):
        fn = torch.compile(lambda a, b, c, m=attn_bias: fmha.memory_efficient_attention(a, b, c, m, op=op),
                           fullgraph=True)
        out = fn(*args)
        ref = fmha.memory_efficient_attention(*args, attn_bias, op=op)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    # q/k/v as transposed views of [B, H, M, K] (a multi-head layer's), through Inductor's stride checks
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    fn = torch.compile(lambda a, b, c: fmha.memory_efficient_attention(a.transpose(1, 2), b.transpose(1, 2),
                                                                       c.transpose(1, 2), op=op), fullgraph=True)
    out = fn(qt, kt, vt)
    ref = fmha.memory_efficient_attention(qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2), op=op)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (qt, kt, vt), g), torch.autograd.grad(ref, (qt, kt, vt), g)):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_batch_times_heads_beyond_grid_limit():
    q = torch.randn(70000, 3, 1, 16, device="cuda", dtype=torch.float16)
    out = fmha.memory_efficient_attention(q, q, q, op=TRITON)
    ref, _ = ref_attention(q, q, q, dtype=torch.float32)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


def test_empty_and_long():
    q = torch.randn(2, 0, 4, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 10, 4, 64, device="cuda", dtype=torch.float16)
    assert fmha.memory_efficient_attention(q, k, k, op=TRITON).shape == (2, 0, 4, 64)
    q = torch.randn(2, 5, 4, 64, device="cuda", dtype=torch.float16)
    out = fmha.memory_efficient_attention(q, k[:, :0], k[:, :0], op=TRITON)
    assert torch.equal(out, torch.zeros_like(out))
    # a packed batch of 131072 tokens with sliding windows: check the last rows against a reference
    M, W = 1 << 17, 256
    x = torch.randn(1, M, 2, 128, device="cuda", dtype=torch.bfloat16)
    bias = ab.BlockDiagonalMask.from_seqlens([M // 2, M // 2]).make_local_attention(W)
    out = fmha.memory_efficient_attention(x, x, x, bias, op=TRITON)
    rows = 300
    q_tail, kv_tail = x[:, M - rows:], x[:, M - rows - W + 1:]
    ref, _ = ref_attention(q_tail, kv_tail, kv_tail, ab.LowerTriangularFromBottomRightMask().make_local_attention(W),
                           dtype=torch.float32)
    torch.testing.assert_close(out[:, M - rows:].float(), ref, atol=2e-2, rtol=2e-2)


def test_bias_offsets_past_2_pow_31():
    """A [1, 1, M, M] bias with M * M > 2**31 elements: pointer offsets need 64 bits."""
    M = 46400
    q, k, v = (torch.randn(1, M, 1, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(1, 1, M, M, device="cuda", dtype=torch.bfloat16)
    out = fmha.memory_efficient_attention(q, k, v, bias, op=TRITON)
    rows = slice(M - 64, M)
    ref, _ = ref_attention(q[:, rows], k, v, bias[:, :, rows], dtype=torch.float32)
    torch.testing.assert_close(out[:, rows].float(), ref, atol=2e-2, rtol=2e-2)
    del bias


def test_fully_masked_rows_gpu():
    q, k, v = (torch.randn(2, 64, 2, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    bias = torch.zeros(2, 2, 64, 64, device="cuda", dtype=torch.float16)
    bias[:, :, 5] = -math.inf
    for op in (TRITON, None):
        out = fmha.memory_efficient_attention(q, k, v, bias, op=op)
        assert torch.equal(out[:, 5], torch.zeros_like(out[:, 5]))
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(x).all() for x in grads)
