"""memory_efficient_attention: output, lse and every gradient against the float64 reference, for every
operator x bias type x layout, odd sizes, K != Kv, GQA/MQA through stride-0 K/V."""

import math

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha import triton as triton_op
from triformers.ops.fmha.attn_bias_utils import ALL_BIAS_TYPES, bias_name, create_inputs
from triformers.ops.fmha.reference import ref_attention

# (atol, rtol) per dtype. Operators accumulate in float32; half-precision outputs and gradients are
# rounded to 8 (bf16) or 11 (fp16) bits, hence the looser bounds there.
TOL_OUT = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
TOL_GRAD = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 3e-2)}
TOL_LSE = {torch.float32: (2e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}

OPS = {
    "chunked": fmha.MemoryEfficientAttentionChunkedOp,
    "sdpa": fmha.MemoryEfficientAttentionSdpaOp,
    "triton": (triton_op.FwOp, triton_op.BwOp),  # on CPU tensors under Triton's interpreter
    "auto": None,
}

# (batch, Mq, Mkv, heads, K, Kv): odd sizes, a single query, a single key, K != Kv both ways
SHAPES = [
    (2, 17, 29, 3, 16, 16),
    (1, 1, 13, 2, 8, 8),
    (3, 9, 1, 2, 12, 12),
    (1, 33, 33, 1, 24, 40),
    (2, 20, 7, 2, 40, 8),
]

# The Triton operator under the interpreter takes most of this file's time: BMHK and BMGHK reach its kernels
# through one canonical layout, so they share the shapes out between them (each shape, with and without GQA,
# still runs for every bias type); BMK runs them all.
TRITON_SHAPES = {"BMK": range(len(SHAPES)), "BMHK": (0, 1, 2), "BMGHK": (3, 4)}

BMK_BIASES = (type(None), ab.LowerTriangularMask, torch.Tensor)


def _leaves(tensors):
    """The tensors autograd accumulates into (the base of an expanded K/V)."""
    out = []
    for t in tensors:
        leaf = t if t.is_leaf else t._base
        if leaf is not None and leaf.requires_grad and all(leaf is not x for x in out):
            out.append(leaf)
    return out


def _assert_close(actual, expected, tol, what):
    atol, rtol = tol
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _check(op, bias_type, fmt, shape, dtype, gqa, seed):
    B, Mq, Mkv, H, K, Kv = shape
    inp = create_inputs(
        bias_type, batch_size=B, q_len=Mq, kv_len=Mkv, num_heads=H, k=K, kv=Kv, num_groups=2, fmt=fmt,
        dtype=dtype, requires_grad=True, bias_requires_grad=True, seed=seed, gqa=gqa,
    )
    q, k, v, bias = inp.query, inp.key, inp.value, inp.attn_bias
    if fmt == "BMK" and bias_type not in BMK_BIASES:
        with pytest.raises(ValueError, match="BMHK format rather than BMK"):
            fmha.memory_efficient_attention(q, k, v, bias, op=op)
        return
    if op is not None:
        normalized = fmha.Inputs(q, k, v, bias)
        normalized.normalize_bmhk()
        if op[0].not_supported_reasons(normalized):
            # an explicitly requested operator that cannot run the inputs says why
            with pytest.raises(ValueError, match="does not support inputs"):
                fmha.memory_efficient_attention(q, k, v, bias, op=op)
            return
    out = fmha.memory_efficient_attention(q, k, v, bias, op=op)
    ref_out, ref_lse = ref_attention(q, k, v, bias)
    assert out.shape == ref_out.shape and out.dtype == dtype
    _assert_close(out, ref_out, TOL_OUT[dtype], "out")

    leaves = _leaves(inp.tensors())
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_grads = torch.autograd.grad(ref_out, leaves, grad_out.double())
    for name, g, r in zip(["dq", "dk", "dv", "dbias"], grads, ref_grads):
        # bias gradients sum over keys' contributions of size ~1: looser absolute bound
        _assert_close(g, r.double(), TOL_GRAD[dtype], name)

    normalized = fmha.Inputs(q, k, v, bias)
    normalized.normalize_bmhk()
    fw_op = fmha.dispatch.dispatch_fw(normalized, True, needs_lse=True) if op is None else op[0]
    if fw_op.RETURNS_LSE:
        with torch.no_grad():
            bias_nograd = bias
            _, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, bias_nograd, op=fw_op)
        expected_lse_shape = tuple(ref_lse.shape)
        assert tuple(lse.shape) == expected_lse_shape and lse.dtype == torch.float32
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite), "lse: -inf rows differ"
        _assert_close(lse[finite], ref_lse[finite], TOL_LSE[dtype], "lse")


@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("fmt", ["BMK", "BMHK", "BMGHK"])
@pytest.mark.parametrize("bias_type", ALL_BIAS_TYPES, ids=bias_name)
def test_forward_backward_fp32(op_name, fmt, bias_type):
    seed = hash((op_name, fmt, bias_name(bias_type))) % 1000
    for i, shape in enumerate(SHAPES):
        if op_name == "triton" and i not in TRITON_SHAPES[fmt]:
            continue
        _check(OPS[op_name], bias_type, fmt, shape, torch.float32, gqa=(i % 2 == 1), seed=seed + i)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op_name", ["chunked", "sdpa", "triton"])
@pytest.mark.parametrize("bias_type", ALL_BIAS_TYPES, ids=bias_name)
def test_forward_backward_half(dtype, op_name, bias_type):
    _check(OPS[op_name], bias_type, "BMHK", SHAPES[0], dtype, gqa=False, seed=7)
    _check(OPS[op_name], bias_type, "BMGHK", SHAPES[3], dtype, gqa=True, seed=8)


@pytest.mark.parametrize("op_name", ["chunked", "triton", "auto"])
def test_custom_scale(op_name):
    q, k, v = torch.randn(2, 11, 3, 8), torch.randn(2, 13, 3, 8), torch.randn(2, 13, 3, 8)
    for scale in (0.1, 1.0, 3.0):
        out = fmha.memory_efficient_attention(q, k, v, ab.LowerTriangularFromBottomRightMask(), scale=scale,
                                              op=OPS[op_name])
        ref, _ = ref_attention(q, k, v, ab.LowerTriangularFromBottomRightMask(), scale=scale)
        _assert_close(out, ref, TOL_OUT[torch.float32], f"scale={scale}")


def test_key_query_all_ones():
    """q = k = 1 gives the mean of v over the allowed keys."""
    for B, M, K in [(1, 128, 5), (4, 33, 6), (2, 7, 32)]:
        q, k = torch.ones(B, M, 2, K), torch.ones(B, M, 2, K)
        v = torch.randn(B, M, 2, K)
        out = fmha.memory_efficient_attention(q, k, v, op=OPS["chunked"])
        torch.testing.assert_close(out, v.mean(1, keepdim=True).expand_as(out), atol=1e-5, rtol=1e-5)


def test_non_contiguous_inputs():
    """Only the last stride must be 1: transposed and sliced inputs give the same result."""
    base = torch.randn(2, 4, 19, 24)  # [B, H, M, 3 * K]
    q, k, v = (base[..., i * 8:(i + 1) * 8].transpose(1, 2) for i in range(3))  # [B, M, H, 8], strided
    assert not q.is_contiguous()
    for op in (OPS["chunked"], None):
        out = fmha.memory_efficient_attention(q, k, v, ab.LowerTriangularMask(), op=op)
        ref = fmha.memory_efficient_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                              ab.LowerTriangularMask(), op=op)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_packed_qkv_gradients():
    """q, k, v as views of one [B, M, 3, H, K] tensor (xFormers' packed format) get their gradients."""
    qkv = torch.randn(2, 10, 3, 2, 8, requires_grad=True)
    q, k, v = qkv.unbind(2)
    out = fmha.memory_efficient_attention(q, k, v, op=OPS["chunked"])
    out.sum().backward()
    ref_qkv = qkv.detach().double().requires_grad_()
    rq, rk, rv = ref_qkv.unbind(2)
    ref_attention(rq, rk, rv)[0].sum().backward()
    torch.testing.assert_close(qkv.grad.double(), ref_qkv.grad, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    """Finite differences on float64 inputs (the chunked operator computes float64 in float64)."""
    q = torch.randn(1, 5, 2, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 7, 2, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 7, 2, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    for attn_bias in (ab.LowerTriangularFromBottomRightMask(), bias):
        torch.autograd.gradcheck(
            lambda q, k, v, b=attn_bias: fmha.memory_efficient_attention(q, k, v, b, op=OPS["chunked"]),
            (q, k, v),
        )
    torch.autograd.gradcheck(lambda b: fmha.memory_efficient_attention(q, k, v, b, op=OPS["chunked"]), (bias,))


@pytest.mark.parametrize("op_name", ["chunked", "triton", "auto"])
def test_broadcast_bias_gradient(op_name):
    """A per-head, per-key (ALiBi-like) bias broadcast over batch and queries: no copy, exact gradient."""
    B, Mq, Mkv, H, K = 3, 9, 14, 4, 8
    q, k, v = torch.randn(B, Mq, H, K), torch.randn(B, Mkv, H, K), torch.randn(B, Mkv, H, K)
    base = torch.randn(H, Mkv, requires_grad=True)
    for make in (lambda b: b[None, :, None, :].expand(B, H, Mq, Mkv), lambda b: b[None, :, None, :]):
        bias = make(base)
        out = fmha.memory_efficient_attention(q, k, v, bias, op=OPS[op_name])
        (g,) = torch.autograd.grad((out * out).sum(), base)
        base64 = base.detach().double().requires_grad_()
        ref, _ = ref_attention(q, k, v, make(base64).expand(B, H, Mq, Mkv))
        (rg,) = torch.autograd.grad((ref * ref).sum(), base64)
        torch.testing.assert_close(g.double(), rg, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("op_name", ["chunked", "triton", "sdpa"])
def test_mqa_grad_sums_over_heads(op_name):
    """K/V shared by all heads (stride 0): the gradient of the shared tensor is the sum over heads."""
    B, M, H, K = 2, 12, 5, 8
    q = torch.randn(B, M, H, K)
    k1, v1 = torch.randn(B, M, 1, K, requires_grad=True), torch.randn(B, M, 1, K, requires_grad=True)
    out = fmha.memory_efficient_attention(q, k1.expand(B, M, H, K), v1.expand(B, M, H, K), op=OPS[op_name])
    gk, gv = torch.autograd.grad(out.sum(), (k1, v1))
    k_rep = k1.detach().repeat(1, 1, H, 1).requires_grad_()
    v_rep = v1.detach().repeat(1, 1, H, 1).requires_grad_()
    rk, rv = torch.autograd.grad(ref_attention(q, k_rep, v_rep)[0].sum(), (k_rep, v_rep))
    torch.testing.assert_close(gk, rk.sum(2, keepdim=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gv, rv.sum(2, keepdim=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op_name", ["chunked", "triton", "sdpa"])
def test_stride0_leaf_gets_per_head_gradient(op_name):
    """An expanded tensor that is itself the leaf receives its true per-element gradient."""
    B, M, H, K = 1, 6, 3, 4
    q = torch.randn(B, M, H, K)
    k = torch.randn(B, M, 1, K).expand(B, M, H, K).requires_grad_()
    v = torch.randn(B, M, H, K)
    out = fmha.memory_efficient_attention(q, k, v, op=OPS[op_name])
    (gk,) = torch.autograd.grad(out.sum(), k)
    k64 = k.detach().double().contiguous().requires_grad_()
    (rk,) = torch.autograd.grad(ref_attention(q, k64, v)[0].sum(), k64)
    torch.testing.assert_close(gk, rk.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op_name", ["chunked", "triton", "auto"])
def test_fully_masked_rows(op_name):
    """Rows with no allowed key: output 0, lse -inf, zero gradients, never NaN."""
    B, Mq, Mkv, H, K = 2, 6, 4, 2, 8
    q = torch.randn(B, Mq, H, K, requires_grad=True)
    k = torch.randn(B, Mkv, H, K, requires_grad=True)
    v = torch.randn(B, Mkv, H, K, requires_grad=True)
    bias = torch.randn(B, H, Mq, Mkv)
    bias[:, :, 2] = -math.inf  # query row 2 masked for every head
    cases = [
        (ab.LowerTriangularFromBottomRightMask(), [0, 1]),  # Mq > Mkv: first Mq - Mkv rows see nothing
        (bias, [2]),
    ]
    for attn_bias, dead in cases:
        out = fmha.memory_efficient_attention(q, k, v, attn_bias, op=OPS[op_name])
        assert torch.isfinite(out).all()
        assert torch.equal(out[:, dead], torch.zeros_like(out[:, dead]))
        gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
        for g in (gq, gk, gv):
            assert torch.isfinite(g).all()
        assert torch.equal(gq[:, dead], torch.zeros_like(gq[:, dead]))
        ref = ref_attention(q, k, v, attn_bias)[0]
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        _, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, cases[0][0])
    assert torch.isneginf(lse[:, :, :2]).all() and torch.isfinite(lse[:, :, 2:]).all()
    pk = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([2, 3], kv_padding=4, kv_seqlen=[0, 4])
    q2, k2, v2 = torch.randn(1, 5, 1, 8), torch.randn(1, 8, 1, 8), torch.randn(1, 8, 1, 8)
    out = fmha.memory_efficient_attention(q2, k2, v2, pk)
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))  # sequence 0 has no key in use


@pytest.mark.parametrize("op_name", ["chunked", "triton", "auto"])
def test_empty_tensors(op_name):
    op = OPS[op_name]
    # Mkv = 0: output 0, dq 0
    q = torch.randn(2, 5, 3, 8, requires_grad=True)
    k, v = torch.randn(2, 0, 3, 8, requires_grad=True), torch.randn(2, 0, 3, 8, requires_grad=True)
    out = fmha.memory_efficient_attention(q, k, v, op=op)
    assert out.shape == (2, 5, 3, 8) and torch.equal(out, torch.zeros_like(out))
    (gq,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(gq, torch.zeros_like(gq))
    # Mq = 0: empty output, dk = dv = 0
    q = torch.randn(2, 0, 3, 8, requires_grad=True)
    k, v = torch.randn(2, 4, 3, 8, requires_grad=True), torch.randn(2, 4, 3, 8, requires_grad=True)
    out = fmha.memory_efficient_attention(q, k, v, op=op)
    assert out.shape == (2, 0, 3, 8)
    gk, gv = torch.autograd.grad(out.sum(), (k, v))
    assert torch.equal(gk, torch.zeros_like(gk)) and torch.equal(gv, torch.zeros_like(gv))
    # B = 0
    out = fmha.memory_efficient_attention(torch.randn(0, 3, 2, 4), torch.randn(0, 3, 2, 4), torch.randn(0, 3, 2, 4))
    assert out.shape == (0, 3, 2, 4)


@pytest.mark.parametrize("bias_type", [type(None), ab.LowerTriangularMask, torch.Tensor,
                                       ab.BlockDiagonalCausalLocalAttentionMask], ids=bias_name)
def test_low_level_api_matches_autograd(bias_type):
    inp = create_inputs(bias_type, batch_size=2, q_len=13, kv_len=13, num_heads=2, k=8, requires_grad=True,
                        seed=3)
    q, k, v, bias = inp.query, inp.key, inp.value, inp.attn_bias
    out, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, bias)
    grad = torch.randn_like(out)
    dq, dk, dv = fmha.memory_efficient_attention_backward(grad, out, lse, q, k, v, bias)
    ref = fmha.memory_efficient_attention(q, k, v, bias)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in ((dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    expected_lse = (1 if bias_type is ab.BlockDiagonalCausalLocalAttentionMask else 2, 2, q.shape[1])
    assert lse.shape == expected_lse
    # the sdpa backward operator recomputes the forward and must agree where SDPA expresses the bias
    if bias_type is ab.BlockDiagonalCausalLocalAttentionMask:
        with pytest.raises(ValueError, match="attn_bias type is BlockDiagonalCausalLocalAttentionMask"):
            fmha.memory_efficient_attention_backward(grad, out, lse, q, k, v, bias, op=fmha.sdpa.BwOp)
    else:
        sdpa_grads = fmha.memory_efficient_attention_backward(grad, out, lse, q, k, v, bias, op=fmha.sdpa.BwOp)
        for a, b in zip(sdpa_grads, (dq, dk, dv)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_low_level_api_errors():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="dropout is not supported on the non-autograd API"):
        fmha.memory_efficient_attention_forward_requires_grad(q, q, q, p=0.1)
    out, lse = fmha.memory_efficient_attention_forward_requires_grad(q, q, q)
    with pytest.raises(ValueError, match="lse.shape"):
        fmha.memory_efficient_attention_backward(out, out, lse[:, :, :-1], q, q, q)
    with pytest.raises(ValueError, match="BMK \\(ndim=3\\), BMHK"):
        fmha.memory_efficient_attention_backward(out[0], out, lse, q, q, q)
    # the SDPA operator computes its logsumexp in a separate pass: it equals the float64 one
    out, lse = fmha.memory_efficient_attention_forward_requires_grad(q, q, q, op=fmha.sdpa.FwOp)
    q64 = q.double().transpose(1, 2)  # [B, H, M, K]
    ref = torch.logsumexp(q64 @ q64.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    torch.testing.assert_close(lse.double(), ref, atol=1e-5, rtol=1e-5)


def test_seed_examples_verbatim():
    """The examples of xFormers' documentation, with `xformers` -> `triformers` and device="cpu"."""
    import triformers.ops as xops

    q, k, v = (torch.randn(2, 16, 4, 32) for _ in range(3))
    y = xops.memory_efficient_attention(q, k, v)
    y = xops.memory_efficient_attention(q, k, v, p=0.2)
    y = xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask())
    assert y.shape == (2, 16, 4, 32)

    B, M, K = 3, 32, 128
    kwargs = dict(device="cpu", dtype=torch.float16)
    q = torch.randn([B, M, 8, K], **kwargs)
    k = torch.randn([B, M, 2, K], **kwargs)
    v = torch.randn([B, M, 2, K], **kwargs)
    out_gqa = xops.memory_efficient_attention(
        q.reshape([B, M, 2, 4, K]),
        k.reshape([B, M, 2, 1, K]).expand([B, M, 2, 4, K]),
        v.reshape([B, M, 2, 1, K]).expand([B, M, 2, 4, K]),
    )
    ref, _ = ref_attention(q.reshape([B, M, 2, 4, K]), k.reshape([B, M, 2, 1, K]).expand([B, M, 2, 4, K]),
                           v.reshape([B, M, 2, 1, K]).expand([B, M, 2, 4, K]))
    torch.testing.assert_close(out_gqa.double(), ref, atol=2e-3, rtol=2e-3)

    from triformers.ops import fmha as fmha_mod

    K = 16
    dtype = torch.float16
    device = "cpu"
    list_x = [
        torch.randn([1, 3, 1, K], dtype=dtype, device=device),
        torch.randn([1, 6, 1, K], dtype=dtype, device=device),
        torch.randn([1, 2, 1, K], dtype=dtype, device=device),
    ]
    attn_bias, x = fmha_mod.BlockDiagonalMask.from_tensor_list(list_x)
    linear = torch.nn.Linear(K, K * 3).to(device=device, dtype=dtype)
    q, k, v = linear(x).reshape([1, -1, 1, 3, K]).unbind(-2)
    out = fmha_mod.memory_efficient_attention(q, k, v, attn_bias=attn_bias)
    list_out = attn_bias.split(out)
    assert tuple(list_out[0].shape) == (1, 3, 1, K)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BLOCK_KINDS = ["plain", "causal", "causal_br", "local", "local_br", "padded"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    q_lens=st.lists(st.integers(0, 23), min_size=1, max_size=4),
    extra=st.lists(st.integers(0, 9), min_size=4, max_size=4),
    window=st.integers(1, 12),
    kind=st.sampled_from(BLOCK_KINDS),
    op_name=st.sampled_from(["chunked", "triton", "auto"]),
    seed=st.integers(0, 2**16),
)
def test_block_diagonal_random_lengths(q_lens, extra, window, kind, op_name, seed):
    """Packed sequences of random lengths (empty ones included) for every block-diagonal bias."""
    k_lens = [q + e for q, e in zip(q_lens, extra)]
    base = ab.BlockDiagonalMask.from_seqlens(q_lens, k_lens)
    if kind == "padded":
        bias = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q_lens, max(k_lens) + 2, k_lens)
    else:
        bias = {"plain": base, "causal": base.make_causal(), "causal_br": base.make_causal_from_bottomright(),
                "local_br": base.make_local_attention_from_bottomright(window)}.get(kind)
        if kind == "local":
            # top-left windows need every block's last query to see a key: window > nq - nk
            bias = base.make_local_attention(max(window, max(q - k for q, k in zip(q_lens, k_lens)) + 1))
    gen = torch.Generator().manual_seed(seed)
    Mq, Mkv = sum(q_lens), bias.k_seqinfo.seqstart_py[-1]
    q = torch.randn(1, Mq, 2, 8, generator=gen, requires_grad=True)
    k = torch.randn(1, Mkv, 2, 8, generator=gen, requires_grad=True)
    v = torch.randn(1, Mkv, 2, 8, generator=gen, requires_grad=True)
    out = fmha.memory_efficient_attention(q, k, v, bias, op=OPS[op_name])
    ref, _ = ref_attention(q, k, v, bias)
    _assert_close(out, ref, TOL_OUT[torch.float32], "out")
    if Mq:
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g.double())):
            _assert_close(a, b.double(), TOL_GRAD[torch.float32], "grad")


@pytest.mark.parametrize("op_name", ["chunked", "triton", "sdpa"])
def test_gqa_bmghk_grad_sums_over_group(op_name):
    """BMGHK with K/V expanded over each group's heads: the base K/V gets the sum over the group's heads."""
    B, M, G, H, K = 2, 10, 2, 3, 8
    q = torch.randn(B, M, G, H, K, requires_grad=True)
    k1 = torch.randn(B, M, G, 1, K, requires_grad=True)
    v1 = torch.randn(B, M, G, 1, K, requires_grad=True)
    k, v = k1.expand(B, M, G, H, K), v1.expand(B, M, G, H, K)
    out = fmha.memory_efficient_attention(q, k, v, ab.LowerTriangularMask(), op=OPS[op_name])
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k1, v1), dy)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k1, v1))
    ref, _ = ref_attention(q64, k64.expand(B, M, G, H, K), v64.expand(B, M, G, H, K), ab.LowerTriangularMask())
    refs = torch.autograd.grad(ref, (q64, k64, v64), dy.double())
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)


def _expand_gradients(out: torch.Tensor) -> list[torch.Tensor]:
    """Hooks on every expand in ``out``'s graph: the list fills, on backward, with the gradients that
    reach them (an expand that gets none is skipped by autograd)."""
    seen, nodes, got = set(), [out.grad_fn], []
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "ExpandBackward0":
            node.register_prehook(lambda grads: got.extend(g for g in grads if g is not None))
        nodes += [n for n, _ in node.next_functions]
    return got


@pytest.mark.parametrize("fmt", ["BMGHK", "BMHK"])
@pytest.mark.parametrize("op_name", ["sdpa", "triton"])
def test_gqa_gradient_reaches_the_unexpanded_base(op_name, fmt):
    """K/V passed as ``base`` expanded over heads: the operator sends the group-summed gradient to ``base``
    itself (no gradient passes through the expand, so autograd builds no expanded gradient), and every
    gradient matches the float64 reference. A view whose own gradient is wanted keeps the expand's path."""
    from triformers.ops.fmha._layout import expanded_base

    B, M, G, H, K = 2, 21, 2, 3, 16
    gen = torch.Generator().manual_seed(3)
    if fmt == "BMGHK":
        q = torch.randn(B, M, G, H, K, generator=gen, requires_grad=True)
        kb, vb = (torch.randn(B, M, G, K, generator=gen, requires_grad=True) for _ in range(2))
        expand = lambda t: t.unsqueeze(3).expand(B, M, G, H, K)  # noqa: E731
    else:
        q = torch.randn(B, M, H, K, generator=gen, requires_grad=True)
        kb, vb = (torch.randn(B, M, 1, K, generator=gen, requires_grad=True) for _ in range(2))
        expand = lambda t: t.expand(B, M, H, K)  # noqa: E731
    bias = ab.LowerTriangularMask()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, kb, vb))
    ref, _ = ref_attention(q64, expand(k64), expand(v64), bias)
    for retain in (False, True):
        k, v = expand(kb), expand(vb)
        assert expanded_base(k) is kb
        if retain:  # k's own gradient is wanted: the gradient must flow through the view
            k.retain_grad()
        out = fmha.memory_efficient_attention(q, k, v, bias, op=OPS[op_name])
        through_expand = _expand_gradients(out)
        _assert_close(out, ref, TOL_OUT[torch.float32], "out")
        dy = torch.randn(out.shape, generator=gen)
        grads = torch.autograd.grad(out, (q, kb, vb), dy)
        assert bool(through_expand) == retain
        for a, b in zip(grads, torch.autograd.grad(ref, (q64, k64, v64), dy.double(), retain_graph=True)):
            _assert_close(a, b, TOL_GRAD[torch.float32], "grad")

    with torch.no_grad():  # a view autograd does not track: its gradient does not reach kb
        assert expanded_base(expand(kb)) is None
    assert expanded_base(expand(kb.detach())) is not kb
    shorter = kb[:, :-1]  # a view of a larger tensor: the base is not the head
    assert expanded_base(shorter.unsqueeze(3).expand(B, M - 1, G, H, K) if fmt == "BMGHK"
                         else shorter.expand(B, M - 1, H, K)) is None
