"""Residual paths, DeepNorm coefficients, reversible layers, simplicial and patch embeddings, input projections."""

import math

import pytest
import torch
from torch import nn

from triformers.components import (
    InputProjection,
    InputProjectionConfig,
    NormalizationType,
    PostNorm,
    PreNorm,
    Residual,
    build_patch_embedding,
)
from triformers.components.residual import get_deepnorm_coefficients
from triformers.components.reversible import ReversibleSequence
from triformers.components.simplicial_embedding import SimplicialEmbedding


class Add(nn.Module):
    def forward(self, a, b=None):
        return 2 * a if b is None else a + b


def _ln(x):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)


@pytest.mark.parametrize("use_triton", [False, True])
def test_pre_and_post_norm(use_triton):
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    pre = Residual(PreNorm(8, Add(), NormalizationType.LayerNorm, use_triton=use_triton))
    torch.testing.assert_close(pre(inputs=[x, y]), x + _ln(x) + _ln(y), atol=1e-4, rtol=1e-4)
    post = PostNorm(8, Residual(Add()), NormalizationType.LayerNorm, use_triton=use_triton)
    torch.testing.assert_close(post(inputs=[x, y]), _ln(x + x + y), atol=1e-4, rtol=1e-4)
    deep = PostNorm(8, Residual(Add(), scale=3.0), "layernorm", use_triton=use_triton)
    torch.testing.assert_close(deep(inputs=[x, y]), _ln(3 * x + x + y), atol=1e-4, rtol=1e-4)
    skip = Residual(PreNorm(8, Add(), NormalizationType.Skip))
    torch.testing.assert_close(skip(inputs=[x]), 3 * x)


def test_pre_norm_normalises_a_shared_input_once():
    calls = []
    pre = PreNorm(8, Add(), "layernorm", use_triton=False)
    pre.norm.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 8)
    pre(inputs=[x, x])
    assert len(calls) == 1


@pytest.mark.parametrize("n,m", [(6, 0), (0, 4), (12, 6)])
def test_deepnorm_coefficients(n, m):
    enc, dec = get_deepnorm_coefficients(n, m)
    if m == 0:
        assert dec is None
        assert math.isclose(enc.alpha, (2 * n) ** 0.25) and math.isclose(enc.beta, (8 * n) ** -0.25)
    elif n == 0:
        assert enc is None
        assert math.isclose(dec.alpha, (2 * m) ** 0.25) and math.isclose(dec.beta, (8 * m) ** -0.25)
    else:
        assert math.isclose(enc.alpha, 0.81 * (n**4 * m) ** (1 / 16))
        assert math.isclose(enc.beta, 0.87 * (n**4 * m) ** (-1 / 16))
        assert math.isclose(dec.alpha, (3 * m) ** 0.25) and math.isclose(dec.beta, (12 * m) ** -0.25)


def _block(d):
    return nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(0.3), nn.Linear(d, d))


def test_reversible_sequence_matches_plain_autograd():
    torch.manual_seed(1)
    d = 6
    pairs = [(_block(d), _block(d)) for _ in range(3)]
    rev = ReversibleSequence(nn.ModuleList([nn.ModuleList(p) for p in pairs])).train()
    x = torch.randn(4, 5, 2 * d, requires_grad=True)
    w = torch.randn(4, 5, 2 * d)

    torch.manual_seed(7)
    y = rev(x)
    (y * w).sum().backward()
    grads = [p.grad.clone() for p in rev.parameters()]
    gx = x.grad.clone()

    # the same computation, differentiated by autograd (same dropout draws: same seed, same call order)
    rev.zero_grad()
    x.grad = None
    torch.manual_seed(7)
    x1, x2 = x.chunk(2, -1)
    for f, g in pairs:
        x1 = x1 + f(x2)
        x2 = x2 + g(x1)
    ref = torch.cat([x1, x2], -1)
    torch.testing.assert_close(y, ref)
    (ref * w).sum().backward()
    torch.testing.assert_close(x.grad, gx, atol=1e-5, rtol=1e-5)
    for a, p in zip(grads, rev.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [None, 0.5])
def test_simplicial_embedding(temperature):
    se = SimplicialEmbedding(L=3, temperature=temperature)
    x = torch.randn(2, 4, 12)
    y = se(x)
    groups = x.view(2, 4, 3, 4) / (temperature or 1.0)
    torch.testing.assert_close(y, torch.softmax(groups, -1).view(2, 4, 12))
    torch.testing.assert_close(y.view(2, 4, 3, 4).sum(-1), torch.ones(2, 4, 3))
    with pytest.raises(ValueError, match="divisible"):
        se(torch.randn(2, 4, 10))


def test_patch_embedding_images_and_token_grids():
    pe = build_patch_embedding({"in_channels": 3, "out_channels": 8, "kernel_size": 3, "stride": 2, "padding": 1})
    img = torch.randn(2, 3, 9, 9)
    y = pe(img)
    conv = pe[1]
    torch.testing.assert_close(y, conv(img).flatten(2).transpose(1, 2))
    assert y.shape == (2, 25, 8)
    tokens = img.flatten(2).transpose(1, 2)  # [B, HW, C]
    torch.testing.assert_close(pe(tokens), y)


@pytest.mark.parametrize("bias", [True, False])
def test_input_projection_fused_self_attention_path(bias):
    ip = InputProjection(
        InputProjectionConfig(8, 6, bias), InputProjectionConfig(8, 6, bias), InputProjectionConfig(8, 10, bias)
    )
    x = torch.randn(2, 3, 8)
    q, k, v = ip(x, x, x)  # one matmul
    torch.testing.assert_close(q, ip.q_proj(x))
    torch.testing.assert_close(k, ip.k_proj(x))
    torch.testing.assert_close(v, ip.v_proj(x))


def test_input_projection_sharing():
    shared = InputProjection(InputProjectionConfig(8, 8, True))
    assert shared.k_proj is shared.q_proj and shared.v_proj is shared.q_proj
    tied = InputProjection(
        InputProjectionConfig(8, 8, True),
        InputProjectionConfig(8, 8, True),
        InputProjectionConfig(8, 8, True),
        use_separate_proj_weight=False,
    )
    assert tied.k_proj.weight is tied.q_proj.weight and tied.k_proj.bias is not tied.q_proj.bias
    with pytest.raises(ValueError, match="ties"):
        InputProjection(
            InputProjectionConfig(8, 8, True),
            InputProjectionConfig(8, 4, True),
            InputProjectionConfig(8, 8, True),
            use_separate_proj_weight=False,
        )
