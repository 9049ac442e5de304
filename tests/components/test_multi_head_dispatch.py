"""MultiHeadDispatch: projections, head folding, rotary embeddings, broadcasting, options and errors."""

import math

import pytest
import torch
from torch import nn

from triformers.components import MultiHeadDispatch, build_attention, build_multi_head_attention
from triformers.components.positional_embedding import RotaryEmbedding

ATOL, RTOL = 2e-5, 2e-5


def _sdp():
    return build_attention({"name": "scaled_dot_product", "dropout": 0.0})


def _reference(mha, q_in, k_in, v_in, rotary=False):
    ip = mha.in_proj_container
    q, k, v = ip.q_proj(q_in), ip.k_proj(k_in), ip.v_proj(v_in)
    B, Sq, _ = q.shape
    H = mha.num_heads
    q = q.view(B, Sq, H, -1).transpose(1, 2)
    k = k.view(B, k.shape[1], H, -1).transpose(1, 2)
    v = v.view(B, v.shape[1], H, -1).transpose(1, 2)
    if rotary:
        q, k = RotaryEmbedding(q.shape[-1])(q, k)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return mha.proj((w @ v).transpose(1, 2).reshape(B, Sq, -1))


def test_rotary_embeddings_inside():
    mha = MultiHeadDispatch(24, 3, _sdp(), use_rotary_embeddings=True)
    x = torch.randn(2, 9, 24)
    torch.testing.assert_close(mha(x), _reference(mha, x, x, x, rotary=True), atol=ATOL, rtol=RTOL)


def test_different_key_and_value_dimensions():
    mha = MultiHeadDispatch(24, 4, _sdp(), dim_key=16, dim_value=36)
    assert mha.proj.in_features == 36
    q, kv = torch.randn(2, 5, 24), torch.randn(2, 7, 24)
    torch.testing.assert_close(mha(q, kv, kv), _reference(mha, q, kv, kv), atol=ATOL, rtol=RTOL)


def test_batch_broadcasting():
    mha = MultiHeadDispatch(24, 3, _sdp())
    q, kv = torch.randn(3, 5, 24), torch.randn(1, 6, 24)
    torch.testing.assert_close(mha(q, kv, kv), mha(q, kv.expand(3, -1, -1), kv.expand(3, -1, -1)))


def test_bias_options_and_custom_output_projection():
    mha = MultiHeadDispatch(24, 3, _sdp(), bias=(False, True, False, False))
    ip = mha.in_proj_container
    assert ip.q_proj.bias is None and ip.k_proj.bias is not None and ip.v_proj.bias is None and mha.proj.bias is None
    assert MultiHeadDispatch(24, 3, _sdp(), bias=False).proj.bias is None
    out = nn.Linear(24, 24, bias=False)
    assert MultiHeadDispatch(24, 3, _sdp(), out_proj=out).proj is out
    default = MultiHeadDispatch(24, 3, _sdp())
    assert (default.proj.bias == 0).all()


def test_shared_projection_weights():
    mha = MultiHeadDispatch(24, 3, _sdp(), use_separate_proj_weight=False)
    ip = mha.in_proj_container
    assert ip.k_proj.weight is ip.q_proj.weight and ip.v_proj.weight is ip.q_proj.weight


def test_head_dimension_attentions_get_split_heads():
    seen = {}

    attention = _sdp()
    attention.requires_head_dimension = True
    original = attention.forward

    def forward(q, k, v, **kw):
        seen["shape"] = q.shape
        return original(q, k, v, **kw)

    attention.forward = forward
    mha = MultiHeadDispatch(24, 3, attention)
    x = torch.randn(2, 5, 24)
    y = mha(x)
    assert seen["shape"] == (2, 3, 5, 8)
    torch.testing.assert_close(y, _reference(mha, x, x, x), atol=ATOL, rtol=RTOL)


def test_build_fills_attention_fields_without_mutating_the_input():
    config = {"dim_model": 24, "num_heads": 3, "attention": {"name": "favor", "dropout": 0.0}}
    mha = build_multi_head_attention(config)
    assert mha.attention.dim_features == 8  # the head dimension
    assert config == {"dim_model": 24, "num_heads": 3, "attention": {"name": "favor", "dropout": 0.0}}
    lam = build_multi_head_attention(
        {"dim_model": 24, "num_heads": 4, "attention": {"name": "lambda", "dropout": 0.0, "seq_len": 9}}
    )
    assert lam.attention.rel_pos_emb.shape == (17, 6)


def test_key_padding_mask_merges_with_per_head_masks():
    mha = MultiHeadDispatch(24, 3, _sdp()).eval()
    x = torch.randn(2, 6, 24)
    per_head = torch.rand(6, 6, 6) > 0.3
    per_head |= torch.eye(6, dtype=torch.bool)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 4] = False
    merged = per_head & keep.repeat_interleave(3, 0)[:, None, :]
    torch.testing.assert_close(mha(x, att_mask=per_head, key_padding_mask=keep), mha(x, att_mask=merged))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MultiHeadDispatch(25, 3, _sdp())
    with pytest.raises(ValueError, match="dim_key"):
        MultiHeadDispatch(24, 3, _sdp(), dim_key=10)
    mha = MultiHeadDispatch(24, 3, build_attention({"name": "scaled_dot_product", "dropout": 0.0, "causal": True}))
    with pytest.raises(ValueError, match="ill-defined"):
        mha(torch.randn(2, 5, 24), torch.randn(2, 7, 24), torch.randn(2, 7, 24))
    with pytest.raises(ValueError, match="key_padding_mask.shape"):
        mha(torch.randn(2, 5, 24), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[batch, sequence, features\]"):
        mha(torch.randn(5, 24))
    lin = build_multi_head_attention(
        {"dim_model": 24, "num_heads": 3, "attention": {"name": "linformer", "dropout": 0.0, "seq_len": 8}}
    )
    with pytest.raises(ValueError, match="equal query and key lengths"):
        lin(torch.randn(2, 5, 24), torch.randn(2, 7, 24), torch.randn(2, 7, 24))
    pool = build_multi_head_attention({"dim_model": 24, "num_heads": 3, "attention": {"name": "pooling"}})
    with pytest.raises(ValueError, match="perfect square"):
        pool(torch.randn(2, 7, 24))
