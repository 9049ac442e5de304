"""Partial attention and merging on the GPU (Triton operator and merge kernel), bf16 and fp16 at realistic
sizes: merged parts equal full attention (output, lse, every gradient through both), KV-cache decoding,
the merge kernel and its gradients, output_dtype, the merge_training API, torch.compile(fullgraph=True)."""

import math

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TRITON = fmha.TritonFlashAttentionOp
DTYPES = [torch.bfloat16, torch.float16]
# (atol, rtol) against float64. Inputs are rounded to 8 (bf16) or 11 (fp16) bits and the kernels round P to
# that dtype for P @ V; partial outputs and the merge stay float32.
TOL_OUT = {torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}
TOL_LSE = {torch.bfloat16: (1e-2, 1e-2), torch.float16: (1e-3, 1e-3)}
TOL_GRAD = {torch.bfloat16: (6e-2, 3e-2), torch.float16: (1e-2, 1e-2)}


def reference(q, k, v, bias=None):
    """``(out, lse)`` in float64 (BMHK or BMGHK); rows without keys give 0 and -inf, with finite gradients."""
    def heads_first(x):
        return x.permute(0, 2, 1, 3) if x.ndim == 4 else x.permute(0, 2, 3, 1, 4)

    qh, kh, vh = (heads_first(x).double() for x in (q, k, v))
    s = (qh * q.shape[-1] ** -0.5) @ kh.transpose(-1, -2)
    if bias is not None:
        s = s + bias.materialize(tuple(s.shape), dtype=torch.float64, device=s.device)
    empty = (s == -math.inf).all(-1, keepdim=True)
    s = torch.where(empty, 0.0, s)
    lse = torch.where(empty[..., 0], -math.inf, torch.logsumexp(s, -1))
    out = torch.where(empty, 0.0, s.softmax(-1)) @ vh
    return (out.permute(0, 2, 1, 3) if q.ndim == 4 else out.permute(0, 3, 1, 2, 4)), lse


def _close(actual, expected, tol, what):
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol[0], rtol=tol[1],
                               msg=lambda m: f"{what}: {m}")


def _finite(x):
    return torch.where(x.isinf(), 0.0, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parts_merged_equal_full_attention_gqa_causal(dtype):
    """BMGHK with K/V shared by 4 heads per group, causal from the bottom right over 2048 keys cut into parts
    of odd sizes (one a single key): output, lse and every gradient of a loss on both."""
    B, Mq, Mkv, G, H, K = 2, 384, 2048, 2, 4, 128
    cuts = [0, 700, 701, 1500, Mkv]
    q = torch.randn(B, Mq, G, H, K, device="cuda", dtype=dtype, requires_grad=True)
    kb, vb = (torch.randn(B, Mkv, G, 1, K, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    k, v = kb.expand(B, Mkv, G, H, K), vb.expand(B, Mkv, G, H, K)
    outs, lses = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        visible = b - 1 <= Mkv - Mq
        bias = None if visible else ab.LocalAttentionFromBottomRightMask(window_left=b - a, window_right=Mkv - b)
        out, lse = fmha.memory_efficient_attention_partial(q, k[:, a:b], v[:, a:b], bias, op=TRITON)
        outs.append(out)
        lses.append(lse)
    out, lse = fmha.merge_attentions(outs, lses)
    ref_out, ref_lse = reference(q, k, v, ab.LowerTriangularFromBottomRightMask())
    _close(out, ref_out, TOL_OUT[dtype], "out")
    _close(lse, ref_lse, TOL_LSE[dtype], "lse")
    g, g_lse = torch.randn_like(ref_out), torch.randn_like(ref_lse)
    got = torch.autograd.grad((out * g).sum() + (lse * g_lse).sum(), (q, kb, vb))
    want = torch.autograd.grad((ref_out * g).sum() + (ref_lse * g_lse).sum(), (q, kb, vb))
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        _close(a, b, TOL_GRAD[dtype], name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_cache_decoding_in_parts(dtype):
    """Flash-decoding shape: 16 sequences of one query over a padded cache of 4096 slots (NaN padding, one
    empty sequence) in 4 parts, merged; gradients too."""
    B, P, H, K = 16, 4096, 8, 128
    kv_lens = [P, 0] + [int(x) for x in torch.randint(1, P, (B - 2,))]
    q = torch.randn(1, B, H, K, device="cuda", dtype=dtype, requires_grad=True)
    cache = []
    for _ in range(2):
        x = torch.randn(B, P, H, K, device="cuda", dtype=dtype)
        for b, n in enumerate(kv_lens):
            x[b, n:] = math.nan
        cache.append(x.requires_grad_())
    k, v = cache
    outs, lses = [], []
    for s, e in ((0, 1000), (1000, 1024), (1024, 3001), (3001, P)):
        used = [min(max(n - s, 0), e - s) for n in kv_lens]
        bias = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1] * B, e - s, used, device="cuda")
        kc, vc = (x[:, s:e].reshape(1, B * (e - s), H, K) for x in (k, v))
        out, lse = fmha.memory_efficient_attention_partial(q, kc, vc, bias, op=TRITON)
        outs.append(out)
        lses.append(lse)
    out, lse = fmha.merge_attentions(outs, lses)
    full = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1] * B, P, kv_lens, device="cuda")
    clean = [torch.where(torch.isnan(x), 0.0, x).reshape(1, B * P, H, K) for x in (k, v)]
    ref_out, ref_lse = reference(q, *clean, full)
    _close(out, ref_out, TOL_OUT[dtype], "out")
    _close(lse, ref_lse, TOL_LSE[dtype], "lse")
    assert not out[0, 1].any() and (lse[0, :, 1] == -math.inf).all()
    g, g_lse = torch.randn_like(ref_out), torch.randn_like(ref_lse)
    got = torch.autograd.grad((out * g).sum() + (_finite(lse) * g_lse).sum(), (q, k, v))
    want = torch.autograd.grad((ref_out * g).sum() + (_finite(ref_lse) * g_lse).sum(), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        _close(a, b, TOL_GRAD[dtype], name)


def test_gradient_through_lse_alone_packed():
    """A loss on the lse alone, packed sequences (varlen), fp16."""
    dtype = torch.float16
    bias = ab.BlockDiagonalMask.from_seqlens([300, 17, 700, 1], [513, 900, 777, 129]).make_causal_from_bottomright()
    q = torch.randn(1, 1018, 8, 64, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, 2319, 8, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    _, lse = fmha.memory_efficient_attention_partial(q, k, v, bias, op=TRITON)
    _, ref_lse = reference(q, k, v, bias)
    _close(lse, ref_lse, TOL_LSE[dtype], "lse")
    g_lse = torch.randn_like(ref_lse)
    got = torch.autograd.grad((_finite(lse) * g_lse).sum(), (q, k, v))
    want = torch.autograd.grad((_finite(ref_lse) * g_lse).sum(), (q, k, v), allow_unused=True, materialize_grads=True)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        _close(a, b, TOL_GRAD[dtype], name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("bmghk", [False, True])
def test_merge_kernel_and_gradients(dtype, bmghk):
    """The Triton merge (16 parts, K = 128 and 80) against float64 autograd of a logsumexp merge, stacked
    form, output and lse, and the gradients of both."""
    for K in (128, 80):
        S, B, M, G, H = 16, 4, 137, 2, 8
        attn = torch.randn(S, B, M, G, H, K, device="cuda").to(dtype)
        lse = torch.randn(S, B, G, H, M, device="cuda") * 4
        lse[3, :, :, :, :50] = -math.inf
        if not bmghk:
            attn, lse = attn[:, :, :, 0].contiguous(), lse[:, :, 0].contiguous()
        attn.requires_grad_()
        lse.requires_grad_()
        out, lse_out = fmha.merge_attentions(attn, lse)
        a64, l64 = (x.detach().double().requires_grad_() for x in (attn, lse))
        total = torch.logsumexp(l64, 0)
        w = torch.exp(l64 - total).unsqueeze(-1)
        w = w.permute(0, 1, 3, 2, 4) if not bmghk else w.permute(0, 1, 4, 2, 3, 5)
        ref = (w * a64).sum(0)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
        torch.testing.assert_close(lse_out.double(), total, atol=1e-5, rtol=1e-5)
        g, g_lse = torch.randn_like(ref), torch.randn_like(total)
        got = torch.autograd.grad((out * g).sum() + (lse_out * g_lse).sum(), (attn, lse))
        want = torch.autograd.grad((ref * g).sum() + (total * g_lse).sum(), (a64, l64))
        for name, a, b in zip(("d_attn", "d_lse"), got, want):
            torch.testing.assert_close(a.double(), b, atol=10 * tol, rtol=10 * tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_dtype_float32(dtype):
    """A float32 output from half-precision inputs on the Triton operator, with gradients; the low-level API
    takes that output back."""
    q, k, v = (torch.randn(2, 1000, 8, 128, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    bias = ab.LowerTriangularMask()
    out = fmha.memory_efficient_attention(q, k, v, bias, op=TRITON, output_dtype=torch.float32)
    assert out.dtype == torch.float32
    ref_out, _ = reference(q, k, v, bias)
    _close(out, ref_out, TOL_OUT[dtype], "out")
    g = torch.randn_like(out)
    want = torch.autograd.grad((ref_out * g).sum(), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad((out * g).sum(), (q, k, v)), want):
        assert a.dtype == dtype
        _close(a, b, TOL_GRAD[dtype], name)
    out_rg, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, bias, op=TRITON[0],
                                                                        output_dtype=torch.float32)
    assert out_rg.dtype == torch.float32
    for name, a, b in zip(("dq", "dk", "dv"), fmha.memory_efficient_attention_backward(
            g, out_rg, lse, q, k, v, bias, op=TRITON[1]), want):
        _close(a, b, TOL_GRAD[dtype], f"low-level {name}")


def test_merge_training_two_halves_equal_full_attention():
    """xFormers' merge_training usage: two partials over halves of the keys give memory_efficient_attention's
    output and gradients (bf16)."""
    q, k, v = (3 * torch.rand(2, 777, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    full = fmha.memory_efficient_attention(q, k, v, op=TRITON)
    g = torch.randn_like(full)
    want = torch.autograd.grad((full.float() * g.float()).sum(), (q, k, v))
    halves = [fmha.memory_efficient_attention_partial_autograd(q, k[:, s], v[:, s], op=TRITON)
              for s in (slice(0, 400), slice(400, None))]
    merged = fmha.merge_attentions_autograd(*halves)
    torch.testing.assert_close(merged, full.float(), atol=2e-2, rtol=2e-2)
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad((merged * g.float()).sum(), (q, k, v)), want):
        torch.testing.assert_close(a.float(), b.float(), atol=6e-2, rtol=3e-2, msg=lambda m, n=name: f"{n}: {m}")


def test_compile_fullgraph_partial_and_merge():
    """torch.compile(fullgraph=True) of partials and their merge, forward and backward, equals eager."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, m, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for m in (256, 1000, 1000))

    def f(q, k, v):
        parts = [fmha.memory_efficient_attention_partial(q, k[:, s], v[:, s], op=TRITON)
                 for s in (slice(0, 333), slice(333, None))]
        return fmha.merge_attentions([p[0] for p in parts], [p[1] for p in parts])

    out_c, lse_c = torch.compile(f, fullgraph=True)(q, k, v)
    out_e, lse_e = f(q, k, v)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_c, lse_e, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out_e)
    got = torch.autograd.grad((out_c * g).sum() + lse_c.sum(), (q, k, v))
    want = torch.autograd.grad((out_e * g).sum() + lse_e.sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
