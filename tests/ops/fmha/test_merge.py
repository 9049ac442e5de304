"""merge_attentions: list and stacked forms, BMHK and BMGHK, odd head dims, the Triton kernel and the torch
path against a float64 reference; gradients by gradcheck; empty parts; parts read in place; every ValueError;
xFormers' merge_training API (Partial, memory_efficient_attention_partial_autograd,
merge_attentions_autograd)."""

import math

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha import merge as merge_impl
from triformers.ops.fmha import triton as triton_op

OPS = {"chunked": fmha.MemoryEfficientAttentionChunkedOp, "triton": fmha.TritonFlashAttentionOp}
OP_PARAMS = [pytest.param("chunked"), pytest.param("triton", marks=pytest.mark.skipif(
    not triton_op.FwOp.is_available(), reason="triton is not installed"))]
# (atol, rtol) of float32 attention against float64 (as in test_partial_merge.py)
TOL_OUT, TOL_GRAD = (2e-5, 1e-4), (1e-4, 1e-4)


def reference_merge(attn, lse):
    """Float64 merge of stacked parts ``[S, B, M, (G,) H, K]``, ``[S, B, (G,) H, M]`` by logsumexp."""
    bmhk = attn.ndim == 5
    if bmhk:
        attn, lse = attn.unsqueeze(3), lse.unsqueeze(2)
    lse_d = lse.double()
    total = torch.logsumexp(lse_d, 0)
    w = torch.where(total.isinf(), 0.0, torch.exp(lse_d - total)).permute(0, 1, 4, 2, 3).unsqueeze(-1)
    out = torch.where(w > 0, w * attn.double(), 0.0).sum(0)
    return (out.squeeze(2), total.squeeze(1)) if bmhk else (out, total)


@pytest.fixture(params=["kernel", "torch"])
def merge_path(request, monkeypatch):
    """Runs a test through the Triton merge kernel (under the interpreter) and through the torch path."""
    if request.param == "torch":
        monkeypatch.setattr(merge_impl, "_use_kernel", lambda x: False)
    elif not triton_op.FwOp.is_available():
        pytest.skip("triton is not installed")
    return request.param


def test_empty_parts_never_nan(merge_path):
    """Parts with lse -inf hold anything (NaN here) and contribute nothing; rows whose parts are all empty
    merge to 0 and lse -inf; gradients stay finite (0 for the empty parts)."""
    S, B, M, H, K = 3, 2, 5, 2, 7
    attn = torch.randn(S, B, M, H, K, dtype=torch.float64)
    lse = torch.randn(S, B, H, M, dtype=torch.float64)
    lse[0, :, :, 1] = -math.inf  # part 0 saw no key for query 1
    lse[:, 1, 0, 3] = -math.inf  # no part saw a key for (batch 1, head 0, query 3)
    attn[0, :, 1] = math.nan
    attn[:, 1, 3, 0] = math.nan
    attn.requires_grad_()
    lse.requires_grad_()
    out, lse_out = fmha.merge_attentions(attn, lse)
    assert not torch.isnan(out).any() and not torch.isnan(lse_out).any()
    assert torch.equal(out[1, 3, 0], torch.zeros(K, dtype=out.dtype)) and lse_out[1, 0, 3] == -math.inf
    ref_out, ref_lse = reference_merge(torch.nan_to_num(attn.detach()), lse.detach())
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse_out, ref_lse)
    d_attn, d_lse = torch.autograd.grad((out * torch.randn_like(out)).sum() + lse_out.clamp_min(-1e9).sum(),
                                        (attn, lse))
    assert torch.isfinite(d_attn).all() and torch.isfinite(d_lse).all()
    assert not d_attn[0, :, 1].any() and not d_lse[0, :, :, 1].any() and not d_lse[:, 1, 0, 3].any()


# ------------------------------------------------------------------------------------------------------
# merge_attentions: forms, paths, gradcheck
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bmghk", [False, True])
@pytest.mark.parametrize("stacked", [False, True])
def test_merge_gradcheck(monkeypatch, stacked, bmghk):
    """gradcheck in float64 through out and lse (parts with -inf lse in some rows), list and stacked forms.
    The backward is the same torch code after either forward path; the torch forward keeps the numerical
    Jacobian fast (the kernel forward is checked against the reference below)."""
    monkeypatch.setattr(merge_impl, "_use_kernel", lambda x: False)
    S, B, M, G, H, K = 3, 1, 3, 2, 2, 3
    heads = (G, H) if bmghk else (H,)
    attn = torch.randn(S, B, M, *heads, K, dtype=torch.float64)
    lse = torch.randn(S, B, *heads, M, dtype=torch.float64)
    lse[1, ..., 0] = -math.inf
    attn.requires_grad_()
    lse.requires_grad_()
    if stacked:
        assert torch.autograd.gradcheck(lambda a, m: fmha.merge_attentions(a, m), (attn, lse))
    else:
        parts = [x.detach().clone().requires_grad_() for x in (*attn.unbind(0), *lse.unbind(0))]
        assert torch.autograd.gradcheck(lambda *xs: fmha.merge_attentions(list(xs[:S]), list(xs[S:])), parts)


@pytest.mark.parametrize("dtype, K", [(torch.float16, 17), (torch.float32, 129), (torch.float32, 3),
                                      (torch.float64, 1)], ids=str)
def test_merge_forms_dtypes_head_dims(merge_path, dtype, K):
    """List and stacked forms, BMHK and BMGHK, head dims that are not powers of two, output_dtype, write_lse,
    against a float64 logsumexp reference."""
    S, B, M, G, H = 4, 2, 5, 2, 3
    attn = torch.randn(S, B, M, G, H, K).to(dtype)
    lse = (torch.randn(S, B, G, H, M) * 3).to(torch.float64 if dtype == torch.float64 else torch.float32)
    ref_out, ref_lse = reference_merge(attn, lse)
    tol = {torch.float16: 1e-3, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    forms = ((attn, lse, False), (list(attn.unbind(0)), list(lse.unbind(0)), False),
             (attn[:, :, :, 0], lse[:, :, 0], True), ([x[:, :, 0] for x in attn], list(lse[:, :, 0]), True))
    for a, m, squeeze in forms:
        out, lse_out = fmha.merge_attentions(a, m)
        want_out, want_lse = (ref_out[:, :, 0], ref_lse[:, 0]) if squeeze else (ref_out, ref_lse)
        assert out.dtype == dtype and lse_out.dtype == lse.dtype and out.shape == want_out.shape
        torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
        torch.testing.assert_close(lse_out.double(), want_lse, atol=tol, rtol=tol)
    out32, none = fmha.merge_attentions(attn, lse, write_lse=False, output_dtype=torch.float32)
    assert none is None and out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref_out, atol=max(tol, 1e-6), rtol=max(tol, 1e-6))


def test_merge_reads_equally_spaced_parts_in_place():
    """Parts that are views of one buffer at a constant step are merged without stacking them; separate
    tensors are stacked once."""
    stacked = torch.randn(3, 2, 5, 1, 2, 8)
    view = merge_impl._stacked(list(stacked.unbind(0)))
    assert view.data_ptr() == stacked.data_ptr() and torch.equal(view, stacked)
    buffer = torch.randn(2, 5, 1, 2, 24)
    parts = [buffer[..., i * 8:(i + 1) * 8] for i in range(3)]  # slices of the head dim: step 8
    view = merge_impl._stacked(parts)
    assert view.data_ptr() == buffer.data_ptr() and torch.equal(view, torch.stack(parts))
    separate = [torch.randn(2, 5, 1, 2, 8) for _ in range(3)]
    assert torch.equal(merge_impl._stacked(separate), torch.stack(separate))


# ------------------------------------------------------------------------------------------------------
# merge_attentions: every ValueError
# ------------------------------------------------------------------------------------------------------


def _raises(match, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        fmha.merge_attentions(*args, **kwargs)
    return str(info.value)


def test_merge_errors():
    a, m = torch.randn(3, 2, 5, 4, 8), torch.randn(3, 2, 4, 5)  # stacked BMHK: [S, B, M, H, K], [S, B, H, M]
    msg = _raises("Incompatible input shapes for chunk 0", a, m[..., 0])
    assert "attn.shape=(2, 5, 4, 8)" in msg and "lse.shape=(2, 4)" in msg and "lse [B, (G,) H, M]" in msg
    msg = _raises("Incompatible number of LSE and attention chunks", a, m[:2])
    assert "3 parts" in msg and "2" in msg
    msg = _raises("Incompatible input shapes: attn.shape=\\(2, 5, 4, 8\\)", a, m.transpose(2, 3))
    assert "needs lse.shape=(2, 4, 5)" in msg and "got lse.shape=(2, 5, 4)" in msg
    msg = _raises("for attention chunk 1", [a[0], a[1, :, :3]], [m[0], m[1, :, :, :3]])
    assert "(2, 3, 4, 8)" in msg and "(2, 5, 4, 8)" in msg
    msg = _raises("for LSE chunk 1", [a[0], a[1]], [m[0], m[1, :1]])
    assert "(1, 4, 5)" in msg
    msg = _raises("either BMHK or BMGHK", [a[0], a[1].unsqueeze(2)], [m[0], m[1].unsqueeze(1)])
    assert "attn.shape=(2, 5, 1, 4, 8)" in msg
    _raises("attn_split is empty", [], [])
    _raises("holds no part", a[:0], m[:0])
    msg = _raises("lse_split has dtype torch.float16", a, m.half())
    assert "lse.float()" in msg
    msg = _raises("attn_split chunk 1 is torch.float16", [a[0], a[1].half()], [m[0], m[1]])
    assert "one dtype and device" in msg
    _raises("attn_split must be a tensor or a sequence of tensors", 3, m)
    _raises("output_dtype=torch.int64 is not a floating-point", a, m, output_dtype=torch.int64)
    with pytest.raises(ValueError, match="write_lse should be true if inputs require gradients"):
        fmha.merge_attentions(a.requires_grad_(), m, write_lse=False)
    with torch.no_grad():
        assert fmha.merge_attentions(a, m, write_lse=False)[1] is None
    with pytest.raises(ValueError, match="No partials to merge"):
        fmha.merge_attentions_autograd()


# ------------------------------------------------------------------------------------------------------
# xFormers' merge_training API
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op_name", OP_PARAMS)
def test_merge_training_equals_full_attention(op_name):
    """One partial, and two over halves of the keys, give full attention's output and gradients."""
    op = OPS[op_name]
    q, k, v = (torch.randn(1, m, 2, 16, requires_grad=True) for m in (13, 21, 21))
    full = fmha.memory_efficient_attention(q, k, v, op=op)
    g = torch.randn_like(full)
    want = torch.autograd.grad((full * g).sum(), (q, k, v))
    one = fmha.memory_efficient_attention_partial_autograd(q, k, v, op=op)
    assert fmha.merge_attentions_autograd(one) is one._attn and not one.is_bmghk()
    halves = [fmha.memory_efficient_attention_partial_autograd(q, k[:, s], v[:, s], op=op)
              for s in (slice(0, 11), slice(11, None))]
    for merged in (fmha.merge_attentions_autograd(one), fmha.merge_attentions_autograd(*halves)):
        torch.testing.assert_close(merged, full, atol=TOL_OUT[0], rtol=TOL_OUT[1])
        for name, a, b in zip("qkv", torch.autograd.grad((merged * g).sum(), (q, k, v)), want):
            torch.testing.assert_close(a, b, atol=TOL_GRAD[0], rtol=TOL_GRAD[1], msg=lambda m, n=name: f"d{n}: {m}")


def test_partial_apply_undilate():
    """``Partial.apply`` reshapes the output and the lse alike: attention of single-query blocks over F * H
    heads, seen as F times more positions of H heads, equals computing it that way."""
    B, M, F, H, K = 1, 2, 3, 5, 8
    q, k, v = (torch.randn(B, M, F * H, K) for _ in range(3))

    def undilate(x):
        return x.flatten(1, 2).unflatten(1, (M * F, H))

    partial = fmha.memory_efficient_attention_partial_autograd(q, k, v, ab.BlockDiagonalMask.from_seqlens([1] * M))
    expected = fmha.memory_efficient_attention_partial_autograd(
        *(x.reshape(B, M * F, H, K) for x in (q, k, v)), ab.BlockDiagonalMask.from_seqlens([1] * (M * F)))
    undilated = partial.apply(undilate)
    torch.testing.assert_close(undilated._attn, expected._attn)
    torch.testing.assert_close(undilated._lse, expected._lse)
    qg = torch.randn(1, 4, 2, 3, 8)
    grouped = fmha.memory_efficient_attention_partial_autograd(qg, qg, qg)
    sliced = grouped.apply(lambda x: x[:, 1:3])
    assert grouped.is_bmghk() and sliced._attn.shape == (1, 2, 2, 3, 8) and sliced._lse.shape == (1, 2, 3, 2)
    torch.testing.assert_close(sliced._lse, grouped._lse[..., 1:3])
