"""scaled_dot_product attention inside MultiHeadDispatch against a dense reference written here, and
proof that its fast path is ``triformers.ops.memory_efficient_attention``."""

import math

import pytest
import torch

import triformers.ops
from triformers.components import MultiHeadDispatch, build_attention, build_multi_head_attention
from triformers.components.attention import AttentionMask
from triformers.components.attention.core import scaled_dot_product_attention, sparsify

ATOL, RTOL = 2e-5, 2e-5  # float32


def dense_mha_reference(mha, query, key, value, bool_or_additive=None, causal=False):
    """Independent multi-head attention using the module's projection weights."""
    ip = mha.in_proj_container
    q = query @ ip.q_proj.weight.T + ip.q_proj.bias
    k = key @ ip.k_proj.weight.T + ip.k_proj.bias
    v = value @ ip.v_proj.weight.T + ip.v_proj.bias
    B, Sq, E = q.shape
    Sk, H = k.shape[1], mha.num_heads
    dh = E // H
    q = q.view(B, Sq, H, dh).transpose(1, 2)
    k = k.view(B, Sk, H, dh).transpose(1, 2)
    v = v.view(B, Sk, H, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)  # [B, H, Sq, Sk]
    if bool_or_additive is not None:
        m = bool_or_additive
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape).masked_fill(~m, float("-inf"))
        if m.ndim == 3 and m.shape[0] == B * H:
            m = m.view(B, H, Sq, Sk)
        elif m.ndim == 3:
            m = m[:, None]
        scores = scores + m
    if causal:
        scores = scores.masked_fill(torch.ones(Sq, Sk, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(scores, -1) @ v
    out = out.transpose(1, 2).reshape(B, Sq, -1)
    return out @ mha.proj.weight.T + mha.proj.bias


class Spy:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, q, k, v, attn_bias=None, p=0.0, scale=None, **kw):
        self.calls.append({"q": q.shape, "bias": attn_bias, "p": p})
        return self.fn(q, k, v, attn_bias, p=p, scale=scale, **kw)


@pytest.fixture
def spy(monkeypatch):
    s = Spy(triformers.ops.memory_efficient_attention)
    monkeypatch.setattr(triformers.ops, "memory_efficient_attention", s)
    return s


def _mha(causal=False, dim=42, heads=3):
    mha = build_multi_head_attention(
        {
            "dim_model": dim,
            "num_heads": heads,
            "attention": {"name": "scaled_dot_product", "dropout": 0.0, "causal": causal},
        }
    )
    with torch.no_grad():
        mha.proj.bias.normal_()  # a non-zero output bias, so the reference checks it too
    return mha.eval()


@pytest.mark.parametrize("causal", [False, True])
def test_matches_dense_reference_through_memory_efficient_attention(spy, causal):
    mha = _mha(causal)
    x = torch.randn(2, 17, 42)
    out = mha(x)
    torch.testing.assert_close(out, dense_mha_reference(mha, x, x, x, causal=causal), atol=ATOL, rtol=RTOL)
    assert len(spy.calls) == 1
    bias = spy.calls[0]["bias"]
    if causal:
        assert isinstance(bias, triformers.ops.LowerTriangularMask)
    else:
        assert bias is None


def test_cross_attention_different_lengths(spy):
    mha = _mha()
    q, kv = torch.randn(3, 5, 42), torch.randn(3, 11, 42)
    torch.testing.assert_close(mha(q, kv, kv), dense_mha_reference(mha, q, kv, kv), atol=ATOL, rtol=RTOL)
    assert len(spy.calls) == 1


@pytest.mark.parametrize(
    "kind", ["bool-2d", "additive-2d", "attention_mask", "bool-per-sample", "additive-per-head", "with-causal"]
)
def test_masks_match_dense_reference(spy, kind):
    B, S, H = 2, 13, 3
    mha = _mha(causal=kind == "with-causal", heads=H)
    x = torch.randn(B, S, 42)
    keep = (torch.rand(B * H, S, S) > 0.3) | torch.eye(S, dtype=torch.bool)
    additive = torch.randn(B * H, S, S).masked_fill(~keep, float("-inf"))
    mask = {
        "bool-2d": keep[0],
        "additive-2d": additive[0],
        "attention_mask": AttentionMask(additive[0]),
        "bool-per-sample": keep[:B],
        "additive-per-head": additive,
        "with-causal": additive[0],
    }[kind]
    ref_mask = mask.values[0] if isinstance(mask, AttentionMask) else mask
    expected = dense_mha_reference(mha, x, x, x, ref_mask, causal=kind == "with-causal")
    torch.testing.assert_close(mha(x, att_mask=mask), expected, atol=ATOL, rtol=RTOL)
    assert len(spy.calls) == 1
    bias = spy.calls[0]["bias"]
    assert isinstance(bias, torch.Tensor) and bias.ndim == 4  # [b, heads per mask, Sq, Sk]
    assert bias.shape[-2:] == (S, S)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_key_padding_mask_reaches_the_kernel_unmaterialized(spy, dtype):
    # a [B, Sk] padding mask is one row per sample: the kernel's bias is that row broadcast over the queries
    # (stride 0), not a [B, Sq, Sk] copy
    B, S, H = 2, 13, 3
    mha = _mha(heads=H)
    x = torch.randn(B, S, 42)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, 9:] = False
    mask = keep if dtype == torch.bool else torch.zeros(B, S).masked_fill(~keep, float("-inf"))
    expected = dense_mha_reference(mha, x, x, x, keep[:, None, :].expand(B, S, S))
    torch.testing.assert_close(mha(x, key_padding_mask=mask), expected, atol=ATOL, rtol=RTOL)
    bias = spy.calls[0]["bias"]
    assert isinstance(bias, torch.Tensor) and bias.shape[-2:] == (S, S) and bias.stride(-2) == 0


def test_causal_attention_mask_uses_the_kernel_mask(spy):
    mha = _mha()
    x = torch.randn(2, 9, 42)
    out = mha(x, att_mask=AttentionMask.make_causal(16))  # larger mask: cropped
    torch.testing.assert_close(out, dense_mha_reference(mha, x, x, x, causal=True), atol=ATOL, rtol=RTOL)
    assert isinstance(spy.calls[0]["bias"], triformers.ops.LowerTriangularMask)


def test_sparse_mask_takes_the_sparse_path(spy):
    mha = _mha()
    x = torch.randn(2, 15, 42)
    keep = (torch.rand(15, 15) > 0.8) | torch.eye(15, dtype=torch.bool)
    out = mha(x, att_mask=sparsify(keep))
    torch.testing.assert_close(out, dense_mha_reference(mha, x, x, x, keep), atol=ATOL, rtol=RTOL)
    assert spy.calls == []  # memory_efficient_attention takes no sparse masks


def test_dropout_goes_to_the_kernel(spy):
    attention = build_attention({"name": "scaled_dot_product", "dropout": 0.4})
    mha = MultiHeadDispatch(42, 3, attention).train()
    x = torch.randn(2, 8, 42)
    y1, y2 = mha(x), mha(x)
    assert [c["p"] for c in spy.calls] == [0.4, 0.4]
    assert not torch.allclose(y1, y2)
    mha.eval()
    mha(x)
    assert spy.calls[-1]["p"] == 0.0


def test_gradients_match_dense_reference():
    mha = _mha(causal=True)
    x = torch.randn(2, 10, 42, requires_grad=True)
    w = torch.randn(2, 10, 42)
    (mha(x) * w).sum().backward()
    g = x.grad.clone()
    x.grad = None
    (dense_mha_reference(mha, x, x, x, causal=True) * w).sum().backward()
    torch.testing.assert_close(g, x.grad, atol=1e-4, rtol=1e-4)


def test_core_rejects_a_mask_of_the_wrong_batch():
    q = torch.randn(6, 5, 8)
    with pytest.raises(ValueError, match="does not divide"):
        scaled_dot_product_attention(q, q, q, att_mask=torch.ones(4, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="full sequence lengths"):
        scaled_dot_product_attention(q, q, q, att_mask=torch.ones(3, 3, dtype=torch.bool))
