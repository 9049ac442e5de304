"""memory_efficient_attention_partial + merge_attentions: keys split into disjoint parts, merged, equal full
attention (output, lse and every gradient, through both outputs) against a float64 reference, for every
kind of bias; gradients through the lse alone; parts without keys; output_dtype on every
memory_efficient_attention function; refusals; torch.compile. merge_attentions alone: test_merge.py."""

import math
import random

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha import triton as triton_op

# (atol, rtol). Partial outputs are float32 whatever the inputs; fp16 inputs are rounded before the matrix
# products (and the Triton kernels round P to fp16 for P @ V), hence the looser fp16 bounds.
TOL_OUT = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 2e-3)}
TOL_GRAD = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2)}

CHUNKED = fmha.MemoryEfficientAttentionChunkedOp
TRITON = fmha.TritonFlashAttentionOp
OPS = {"chunked": CHUNKED, "triton": TRITON}
needs_triton = pytest.mark.skipif(not triton_op.FwOp.is_available(), reason="triton is not installed")
OP_PARAMS = [pytest.param("chunked"), pytest.param("triton", marks=needs_triton)]


# ------------------------------------------------------------------------------------------------------
# Float64 reference (differentiable through out and lse, also for rows that see no key)
# ------------------------------------------------------------------------------------------------------


def _heads_first(x):
    return x.permute(0, 2, 1, 3) if x.ndim == 4 else x.permute(0, 2, 3, 1, 4)


def reference(q, k, v, bias=None):
    """``(out, lse)`` in float64, BMHK or BMGHK; rows without keys give 0 and -inf with finite gradients."""
    qh, kh, vh = (_heads_first(x).double() for x in (q, k, v))
    s = (qh * q.shape[-1] ** -0.5) @ kh.transpose(-1, -2)
    if isinstance(bias, torch.Tensor):
        s = s + bias.double()
    elif bias is not None:
        s = s + bias.materialize(tuple(s.shape), dtype=torch.float64)
    empty = (s == -math.inf).all(-1, keepdim=True)
    s = torch.where(empty, 0.0, s)
    lse = torch.where(empty[..., 0], -math.inf, torch.logsumexp(s, -1))
    out = torch.where(empty, 0.0, s.softmax(-1)) @ vh
    out = out.permute(0, 2, 1, 3) if q.ndim == 4 else out.permute(0, 3, 1, 2, 4)
    return out, lse


def _cuts(total: int, n: int, rng: random.Random) -> list[tuple[int, int]]:
    """``n`` contiguous ranges covering ``[0, total)``, random sizes (some may be empty)."""
    inner = sorted(rng.randint(0, total) for _ in range(n - 1))
    bounds = [0, *inner, total]
    return list(zip(bounds[:-1], bounds[1:]))


def _leaf(shape, dtype, expand_to=None):
    x = torch.randn(shape, dtype=dtype).requires_grad_()
    return x, (x if expand_to is None else x.expand(expand_to))


# ------------------------------------------------------------------------------------------------------
# Cases: full inputs and bias, and the same attention as ``n`` parts over disjoint keys
# ------------------------------------------------------------------------------------------------------


def case_dense(n, dtype, rng):
    """BMHK, K != Kv, no bias."""
    (q, _), (k, _), (v, _) = (_leaf(s, dtype) for s in ((2, 7, 3, 16), (2, 29, 3, 16), (2, 29, 3, 24)))
    parts = [(k[:, a:b], v[:, a:b], None) for a, b in _cuts(29, n, rng)]
    return q, k, v, None, parts, [q, k, v]


def case_gqa(n, dtype, rng):
    """BMGHK, K/V shared over the 3 heads of each of 2 groups (stride-0 expansion of one head)."""
    q, _ = _leaf((1, 5, 2, 3, 16), dtype)
    kb, k = _leaf((1, 19, 2, 1, 16), dtype, (1, 19, 2, 3, 16))
    vb, v = _leaf((1, 19, 2, 1, 16), dtype, (1, 19, 2, 3, 16))
    parts = [(k[:, a:b], v[:, a:b], None) for a, b in _cuts(19, n, rng)]
    return q, k, v, None, parts, [q, kb, vb]


def case_causal(n, dtype, rng):
    """Causal from the bottom right (the queries are the last of the keys' sequence): each part is a local
    window that ends where the causal diagonal crosses it, or no mask where every query sees all of it."""
    Mq, Mkv = 6, 23
    (q, _), (k, _), (v, _) = (_leaf((2, m, 2, 8), dtype) for m in (Mq, Mkv, Mkv))
    parts = []
    for a, b in _cuts(Mkv, n, rng):
        visible = b - 1 <= Mkv - Mq  # the first query sees the whole part
        part_bias = None if visible else ab.LocalAttentionFromBottomRightMask(window_left=b - a, window_right=Mkv - b)
        parts.append((k[:, a:b], v[:, a:b], part_bias))
    return q, k, v, ab.LowerTriangularFromBottomRightMask(), parts, [q, k, v]


def case_tensor_bias(n, dtype, rng):
    """An additive bias with a gradient, -inf on part of the first query row (some parts see no key there)."""
    (q, _), (k, _), (v, _) = (_leaf((1, m, 2, 8), dtype) for m in (9, 21, 21))
    bias = torch.randn(1, 2, 9, 21, dtype=dtype) * 2
    bias[:, :, 0, 3:] = -math.inf
    bias.requires_grad_()
    parts = [(k[:, a:b], v[:, a:b], bias[..., a:b]) for a, b in _cuts(21, n, rng)]
    return q, k, v, bias, parts, [q, k, v, bias]


def _packed_parts(k, v, q_lens, k_lens, n, rng, make_bias):
    """Each packed sequence's keys cut into ``n`` ranges; part ``c`` packs range ``c`` of every sequence."""
    starts = [sum(k_lens[:i]) for i in range(len(k_lens))]
    cuts = [_cuts(kl, n, rng) for kl in k_lens]
    parts = []
    for c in range(n):
        ranges = [cut[c] for cut in cuts]
        idx = torch.cat([torch.arange(s + a, s + b) for s, (a, b) in zip(starts, ranges)])
        parts.append((k[:, idx], v[:, idx], make_bias([b - a for a, b in ranges])))
    return parts


def case_block_diagonal(n, dtype, rng):
    """Packed sequences (varlen); the parts are block-diagonal too, some blocks without keys."""
    q_lens, k_lens = [3, 5, 4], [7, 9, 6]
    (q, _), (k, _), (v, _) = (_leaf((1, m, 2, 8), dtype) for m in (12, 22, 22))
    parts = _packed_parts(k, v, q_lens, k_lens, n, rng, lambda lens: ab.BlockDiagonalMask.from_seqlens(q_lens, lens))
    return q, k, v, ab.BlockDiagonalMask.from_seqlens(q_lens, k_lens), parts, [q, k, v]


def _nan_padded_cache(kv_lens, P, dtype):
    x = torch.randn(len(kv_lens), P, 2, 8, dtype=dtype)
    for b, n_used in enumerate(kv_lens):
        x[b, n_used:] = math.nan
    return x.reshape(1, len(kv_lens) * P, 2, 8).requires_grad_()


def case_kv_cache(n, dtype, rng):
    """Decoding from a KV cache (one query per sequence; one sequence empty); the cache padding is NaN and
    must never be read. Part ``c`` holds slots ``[s, e)`` of every sequence's cache."""
    P, kv_lens = 13, [13, 0, 7]
    q, _ = _leaf((1, 3, 2, 8), dtype)
    k, v = _nan_padded_cache(kv_lens, P, dtype), _nan_padded_cache(kv_lens, P, dtype)
    full = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1] * 3, P, kv_lens)
    parts = []
    for s, e in _cuts(P, n, rng):
        used = [min(max(n_used - s, 0), e - s) for n_used in kv_lens]
        kc, vc = (x.view(3, P, 2, 8)[:, s:e].reshape(1, 3 * (e - s), 2, 8) for x in (k, v))
        parts.append((kc, vc, ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1] * 3, e - s, used)))
    return q, k, v, full, parts, [q, k, v]


def case_padded_prefix(n, dtype, rng):
    """Several queries per sequence over a padded KV cache: the first slots, which every query sees, in
    ``n - 1`` non-causal padded-keys parts, the rest in one causal part."""
    q_lens, P, kv_lens, prefix = [3, 2], 11, [9, 6], 4  # prefix <= min(kv - q) + 1: all queries see it
    q, _ = _leaf((1, 5, 2, 8), dtype)
    k, v = _nan_padded_cache(kv_lens, P, dtype), _nan_padded_cache(kv_lens, P, dtype)

    def slots(x, s, e):
        return x.view(len(kv_lens), P, 2, 8)[:, s:e].reshape(1, len(kv_lens) * (e - s), 2, 8)

    full = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q_lens, P, kv_lens, device="cpu")
    if n == 1:
        return q, k, v, full, [(k, v, full)], [q, k, v]
    parts = [(slots(k, s, e), slots(v, s, e), ab.BlockDiagonalPaddedKeysMask.from_seqlens(
        q_lens, e - s, [e - s] * len(kv_lens), device="cpu")) for s, e in _cuts(prefix, n - 1, rng)]
    parts.append((slots(k, prefix, P), slots(v, prefix, P), ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        q_lens, P - prefix, [x - prefix for x in kv_lens], device="cpu")))
    return q, k, v, full, parts, [q, k, v]


def case_shared_prefix(n, dtype, rng):
    """A prompt prefix stored once (one gappy part: every sequence's key segment is the same) and each
    sequence's own suffix (a causal part); full attention reads per-sequence copies of prefix + suffix."""
    q_lens, prefix, suffixes = [2, 1, 3], 5, [4, 1, 3]  # suffix >= q - 1: every query sees the whole prefix
    q, _ = _leaf((1, sum(q_lens), 2, 8), dtype)
    (kp, _), (vp, _), (ks, _), (vs, _) = (_leaf((1, m, 2, 8), dtype) for m in (prefix, prefix, 8, 8))
    starts = [sum(suffixes[:b]) for b in range(3)]
    k = torch.cat([t for b, s in enumerate(starts) for t in (kp, ks[:, s:s + suffixes[b]])], 1)
    v = torch.cat([t for b, s in enumerate(starts) for t in (vp, vs[:, s:s + suffixes[b]])], 1)
    full = ab.BlockDiagonalMask.from_seqlens(q_lens, [prefix + s for s in suffixes]).make_causal_from_bottomright()
    shared = ab.BlockDiagonalGappyKeysMask.from_seqlens(q_lens, [0, 0, 0, prefix], [prefix] * 3, device="cpu")
    own = ab.BlockDiagonalMask.from_seqlens(q_lens, suffixes).make_causal_from_bottomright()
    return q, k, v, full, [(kp, vp, shared), (ks, vs, own)], [q, kp, vp, ks, vs]


CASES = {
    "dense": (case_dense, (1, 4)),
    "gqa": (case_gqa, (2, 3)),
    "causal_bottom_right": (case_causal, (4,)),
    "tensor_bias": (case_tensor_bias, (3,)),
    "block_diagonal": (case_block_diagonal, (2, 3)),
    "kv_cache": (case_kv_cache, (1, 3)),
    "padded_prefix": (case_padded_prefix, (1, 3)),
    "shared_prefix": (case_shared_prefix, (2,)),
}
# cases built on KV-cache biases: run where the operators support them
_NEEDS = {"padded_prefix": ("BlockDiagonalPaddedKeysMask",), "shared_prefix": ("BlockDiagonalGappyKeysMask",)}


def _nan_free(x):
    return torch.where(torch.isnan(x), 0.0, x) if x.is_floating_point() else x


def _assert_close(actual, expected, tol, what):
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    atol, rtol = tol
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("op_name", OP_PARAMS)
@pytest.mark.parametrize("case", list(CASES))
def test_parts_merged_equal_full_attention(case, op_name):
    """Output, lse and every gradient (loss on both outputs) of merged parts equal full attention's."""
    make, counts = CASES[case]
    for name in _NEEDS.get(case, ()):
        if getattr(ab, name, None) not in OPS[op_name][0].SUPPORTED_ATTN_BIAS_TYPES:
            pytest.skip(f"{name} is not supported by {op_name}")
    dtype = torch.float16 if case in ("dense", "block_diagonal") else torch.float32
    for n in counts:
        q, k, v, bias, parts, leaves = make(n, dtype, random.Random(n))
        outs, lses = zip(*(fmha.memory_efficient_attention_partial(q, kc, vc, bc, op=OPS[op_name])
                           for kc, vc, bc in parts))
        assert all(o.dtype == torch.float32 and m.dtype == torch.float32 for o, m in zip(outs, lses))
        out, lse = fmha.merge_attentions(list(outs), list(lses))
        ref_out, ref_lse = reference(q, _nan_free(k), _nan_free(v), bias)
        _assert_close(out, ref_out, TOL_OUT[dtype], f"{case} n={n} out")
        _assert_close(lse, ref_lse, TOL_OUT[dtype], f"{case} n={n} lse")
        g, g_lse = torch.randn_like(ref_out), torch.randn_like(ref_lse)
        got = torch.autograd.grad((out * g).sum() + (lse * g_lse).sum(), leaves)
        want = torch.autograd.grad((ref_out * g).sum() + (torch.where(ref_lse.isinf(), 0.0, ref_lse) * g_lse).sum(),
                                   leaves)
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_close(a, b, TOL_GRAD[dtype], f"{case} n={n} grad {i}")


# ------------------------------------------------------------------------------------------------------
# Gradient through the lse, parts without keys
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op_name", OP_PARAMS)
@pytest.mark.parametrize("loss", ["lse_only", "out_and_lse"])
def test_gradient_through_lse(op_name, loss):
    """BMGHK with shared K/V heads and a tensor bias (one query row fully masked): the gradients of a loss on
    the lse alone, and on both outputs, equal float64 autograd of the reference."""
    q, _ = _leaf((2, 11, 2, 3, 16), torch.float32)
    kb, k = _leaf((2, 13, 2, 1, 16), torch.float32, (2, 13, 2, 3, 16))
    vb, v = _leaf((2, 13, 2, 1, 16), torch.float32, (2, 13, 2, 3, 16))
    bias = torch.randn(2, 2, 3, 11, 13)
    bias[:, :, :, 4] = -math.inf
    bias.requires_grad_()
    out, lse = fmha.memory_efficient_attention_partial(q, k, v, bias, op=OPS[op_name])
    ref_out, ref_lse = reference(q, k, v, bias)
    _assert_close(lse, ref_lse, TOL_OUT[torch.float32], "lse")
    g_lse = torch.randn_like(ref_lse)
    leaves = [q, kb, vb, bias]
    if loss == "lse_only":
        got = torch.autograd.grad((lse * g_lse).sum(), leaves)  # dv = 0: the lse does not read V
        want = torch.autograd.grad((torch.where(ref_lse.isinf(), 0.0, ref_lse) * g_lse).sum(), leaves,
                                   allow_unused=True, materialize_grads=True)
    else:
        g = torch.randn_like(ref_out)
        got = torch.autograd.grad((out * g).sum() + (lse * g_lse).sum(), leaves)
        want = torch.autograd.grad((ref_out * g).sum() + (torch.where(ref_lse.isinf(), 0.0, ref_lse) * g_lse).sum(),
                                   leaves)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), got, want):
        _assert_close(a, b, TOL_GRAD[torch.float32], name)


@pytest.mark.parametrize("op_name", OP_PARAMS)
def test_partial_without_keys(op_name):
    q, k, v = torch.randn(2, 5, 3, 8), torch.randn(2, 0, 3, 8), torch.randn(2, 0, 3, 4)
    out, lse = fmha.memory_efficient_attention_partial(q, k, v, op=OPS[op_name])
    assert out.shape == (2, 5, 3, 4) and out.dtype == torch.float32 and not out.any()
    assert lse.shape == (2, 3, 5) and (lse == -math.inf).all()


# ------------------------------------------------------------------------------------------------------
# output_dtype on memory_efficient_attention*, partial defaults
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op_name", OP_PARAMS)
def test_output_dtype_on_every_function(op_name):
    """float32 output from float16 inputs: memory_efficient_attention (with every gradient), _forward, and
    _forward_requires_grad whose output and lse the low-level backward takes."""
    op = OPS[op_name]
    q, k, v = (torch.randn(2, m, 3, 16, dtype=torch.float16).requires_grad_() for m in (9, 14, 14))
    bias = ab.LowerTriangularFromBottomRightMask()
    ref_out, _ = reference(q, k, v, bias)
    # the chunked operator computes in float32: an unrounded output is float32-accurate
    tol_out = TOL_OUT[torch.float32 if op_name == "chunked" else torch.float16]
    out = fmha.memory_efficient_attention(q, k, v, bias, op=op, output_dtype=torch.float32)
    assert out.dtype == torch.float32
    _assert_close(out, ref_out, tol_out, "out")
    g = torch.randn_like(ref_out)
    ref_grads = torch.autograd.grad((ref_out * g).sum(), (q, k, v))
    for name, a, b in zip("qkv", torch.autograd.grad((out * g).sum(), (q, k, v)), ref_grads):
        assert a.dtype == torch.float16
        _assert_close(a, b, TOL_GRAD[torch.float16], f"d{name}")
    out_fw = fmha.memory_efficient_attention_forward(q, k, v, bias, op=op[0], output_dtype=torch.float32)
    assert out_fw.dtype == torch.float32
    _assert_close(out_fw, ref_out, tol_out, "forward")
    out_rg, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, bias, op=op[0],
                                                                        output_dtype=torch.float32)
    assert out_rg.dtype == torch.float32 and lse.dtype == torch.float32
    grads = fmha.memory_efficient_attention_backward(g.float(), out_rg, lse, q, k, v, bias, op=op[1])
    for name, a, b in zip("qkv", grads, ref_grads):
        _assert_close(a, b, TOL_GRAD[torch.float16], f"backward d{name}")


def test_output_dtype_dispatch():
    """SDPA writes the query's dtype: an output_dtype sends the call elsewhere (also after the same shapes
    were dispatched without one), an explicit SDPA operator says why it cannot."""
    q = torch.randn(1, 6, 2, 8, dtype=torch.float16)
    assert fmha.memory_efficient_attention(q, q, q).dtype == torch.float16
    assert fmha.memory_efficient_attention(q, q, q, output_dtype=torch.float32).dtype == torch.float32
    assert fmha.memory_efficient_attention(q, q, q, output_dtype=torch.float16).dtype == torch.float16
    reasons = fmha.sdpa.FwOp.not_supported_reasons(fmha.Inputs(q, q, q, output_dtype=torch.float32))
    assert "Custom output dtype not supported" in reasons
    assert not fmha.sdpa.FwOp.not_supported_reasons(fmha.Inputs(q, q, q, output_dtype=torch.float16))
    with pytest.raises(ValueError, match="Custom output dtype not supported"):
        fmha.memory_efficient_attention(q, q, q, op=fmha.MemoryEfficientAttentionSdpaOp, output_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"output_dtype=torch.int32 is not a floating-point torch.dtype"):
        fmha.memory_efficient_attention(q, q, q, output_dtype=torch.int32)
    assert fmha.Inputs(q, q, q, is_partial=True).get_output_dtype() == torch.float32
    assert fmha.Inputs(q.double(), q.double(), q.double(), is_partial=True).get_output_dtype() == torch.float64
    assert fmha.Inputs(q, q, q, output_dtype=torch.bfloat16, is_partial=True).get_output_dtype() == torch.bfloat16


def test_partial_layouts_dtypes_and_operator_forms():
    """Default dispatch (SDPA cannot: no lse), BMGHK and packed lse shapes, output dtypes, and ``op`` as a
    forward operator or a pair."""
    q, k, v = (torch.randn(2, m, 2, 3, 8, dtype=torch.float16) for m in (5, 7, 7))
    out, lse = fmha.memory_efficient_attention_partial(q, k, v)
    assert out.shape == (2, 5, 2, 3, 8) and out.dtype == torch.float32 and lse.shape == (2, 2, 3, 5)
    out16, _ = fmha.memory_efficient_attention_partial(q, k, v, output_dtype=torch.float16)
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16, out.half())
    out64, lse64 = fmha.memory_efficient_attention_partial(q.double(), k.double(), v.double())
    assert out64.dtype == torch.float64 and lse64.dtype == torch.float32
    bias = ab.BlockDiagonalMask.from_seqlens([2, 4, 1], [3, 0, 5])
    qp, kp, vp = (torch.randn(1, m, 3, 8, requires_grad=True) for m in (7, 8, 8))
    for op in (fmha.chunked.FwOp, CHUNKED):
        out, lse = fmha.memory_efficient_attention_partial(qp, kp, vp, bias, op=op)
        assert out.shape == (1, 7, 3, 8) and lse.shape == (1, 3, 7)
        assert (lse[:, :, 2:6] == -math.inf).all() and not out[:, 2:6].any()  # the block without keys
        ref_out, ref_lse = reference(qp, kp, vp, bias)
        _assert_close(out, ref_out, TOL_OUT[torch.float32], "packed out")
        dq, = torch.autograd.grad(out.sum() + torch.where(lse.isinf(), 0.0, lse).sum(), (qp,))
        ref_dq, = torch.autograd.grad(ref_out.sum() + torch.where(ref_lse.isinf(), 0.0, ref_lse).sum(), (qp,))
        _assert_close(dq, ref_dq, TOL_GRAD[torch.float32], "packed dq")


def test_partial_refusals():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="dropout is not supported."):
        fmha.memory_efficient_attention_partial(q, q, q, p=0.1)
    with pytest.raises(ValueError, match="Partial attention not supported"):
        fmha.memory_efficient_attention_partial(q, q, q, op=fmha.sdpa.FwOp)
    qg = q.clone().requires_grad_()
    with pytest.raises(ValueError, match="Partial attention not supported"):  # the backward needs the lse gradient
        out, lse = fmha.memory_efficient_attention_partial(qg, q, q, op=(fmha.chunked.FwOp, fmha.sdpa.BwOp))
        torch.autograd.grad(lse.sum(), qg)
    with pytest.raises(ValueError, match="query.shape"):
        fmha.memory_efficient_attention_partial(q, q[:, :, :1], q)


@pytest.mark.slow
@pytest.mark.parametrize("op_name", OP_PARAMS)
def test_compile_fullgraph_partial_merge(op_name):
    """Partial attentions and their merge compile with fullgraph=True, forward and backward."""
    op = OPS[op_name]
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, m, 2, 16, requires_grad=True) for m in (9, 20, 20))

    def f(q, k, v):
        parts = [fmha.memory_efficient_attention_partial(q, k[:, s], v[:, s], op=op)
                 for s in (slice(0, 7), slice(7, None))]
        out, lse = fmha.merge_attentions([p[0] for p in parts], [p[1] for p in parts])
        return out, lse

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # capture + fake tracing; GPU test: Inductor
    for (a_out, a_lse), (b_out, b_lse) in [(compiled(q, k, v), f(q, k, v))]:
        torch.testing.assert_close(a_out, b_out)
        torch.testing.assert_close(a_lse, b_lse)
        g = torch.randn_like(a_out)
        got = torch.autograd.grad((a_out * g).sum() + a_lse.sum(), (q, k, v))
        want = torch.autograd.grad((b_out * g).sum() + b_lse.sum(), (q, k, v))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
