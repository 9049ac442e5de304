"""FAVOR+ feature maps and attention: unbiased softmax-kernel estimates, exact prefix sums when causal."""

import math

import pytest
import torch

from triformers.components import build_attention
from triformers.components.attention.feature_maps import SMHyperbolic, SMOrf, SMReg

MAPS = [SMOrf, SMHyperbolic, SMReg]


@pytest.mark.parametrize("cls", MAPS)
def test_directions_are_orthogonal_within_a_block(cls):
    fm = cls(dim_features=40, iter_before_redraw=None)
    fm(torch.randn(3, 5, 7))
    w = fm.features  # [D, m']
    assert w.shape == (7, fm.dim_feature_map)
    block = w[:, :7]  # the first D directions come from one orthogonal matrix
    gram = block.T @ block
    torch.testing.assert_close(gram - torch.diag(gram.diagonal()), torch.zeros(7, 7), atol=1e-5, rtol=0)
    if cls is SMReg:
        torch.testing.assert_close(w.norm(dim=0), torch.full((w.shape[1],), math.sqrt(7)))


def _average_kernel(fm, q, k, draws):
    est = torch.zeros(q.shape[0], k.shape[0], dtype=torch.float64)
    for _ in range(draws):
        fm.features = None  # a fresh draw
        pk = fm(k)
        pq = fm(q)
        est += pq @ pk.T / draws
    return est


@pytest.mark.parametrize("cls", [SMOrf, SMHyperbolic])
def test_positive_features_are_unbiased(cls):
    """E[phi(q) . phi(k)] = exp(q.k / sqrt(D)), checked as an average over 400 draws."""
    d = 6
    q, k = 0.4 * torch.randn(5, d, dtype=torch.float64), 0.4 * torch.randn(5, d, dtype=torch.float64)
    est = _average_kernel(cls(dim_features=256).double(), q, k, draws=400)
    torch.testing.assert_close(est, torch.exp(q @ k.T / math.sqrt(d)), rtol=0.04, atol=0)


def test_regularized_features_estimate_their_kernel():
    """SMReg's directions have norm sqrt(D): its kernel is E_w cosh(w.(q'+k')) exp(-|q'|²/2 - |k'|²/2) with w
    uniform on that sphere (q' = q D^-1/4), computed here by Monte Carlo over the sphere."""
    d = 6
    q, k = 0.4 * torch.randn(5, d, dtype=torch.float64), 0.4 * torch.randn(5, d, dtype=torch.float64)
    est = _average_kernel(SMReg(dim_features=256).double(), q, k, draws=400)
    qs, ks = q * d**-0.25, k * d**-0.25
    w = torch.randn(100_000, d, dtype=torch.float64)
    w = w / w.norm(dim=1, keepdim=True) * math.sqrt(d)
    y = qs[:, None, :] + ks[None, :, :]  # [5, 5, d]
    sphere = torch.cosh(y @ w.T).mean(-1)
    ref = sphere * torch.exp(-0.5 * (qs * qs).sum(-1))[:, None] * torch.exp(-0.5 * (ks * ks).sum(-1))[None, :]
    torch.testing.assert_close(est, ref, rtol=0.04, atol=0)


def test_redraw_schedule():
    att = build_attention({"name": "favor", "dropout": 0.0, "dim_features": 16, "iter_before_redraw": 2})
    q = torch.randn(2, 5, 4)
    att.train()
    seen = []
    for _ in range(5):
        att(q, q, q)
        seen.append(att.feature_map.features.clone())
    same = [torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    assert same == [True, False, True, False]  # one draw per two forward passes
    att.eval()
    att(q, q, q)
    assert torch.equal(att.feature_map.features, seen[-1])  # no redraw at evaluation


@pytest.mark.parametrize("feature_map", ["sm_orf", "sm_hyp", "sm_reg"])
def test_favor_approximates_softmax_attention(feature_map):
    torch.manual_seed(3)
    att = build_attention({"name": "favor", "dropout": 0.0, "dim_features": 512, "feature_map": feature_map})
    q, k = 0.3 * torch.randn(4, 20, 8), 0.3 * torch.randn(4, 20, 8)
    v = torch.randn(4, 20, 8)
    exact = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    err = (att(q, k, v) - exact).abs().mean() / exact.abs().mean()
    assert err < 0.05


@pytest.mark.parametrize("normalize_inputs", [False, True])
def test_causal_favor_is_the_prefix_sum_formula(normalize_inputs):
    att = build_attention({"name": "favor", "dropout": 0.0, "dim_features": 24, "causal": True})
    att.feature_map.normalize_inputs = normalize_inputs
    q, k, v = torch.randn(3, 11, 8), torch.randn(3, 11, 8), torch.randn(3, 11, 5)
    out = att(q, k, v)
    pk, pq = att.feature_map(k), att.feature_map(q)  # same features (no redraw in this setting)
    ref = torch.empty_like(out)
    for i in range(11):
        num = pq[:, i : i + 1] @ (pk[:, : i + 1].transpose(1, 2) @ v[:, : i + 1])
        den = pq[:, i : i + 1] @ pk[:, : i + 1].sum(1, keepdim=True).transpose(1, 2)
        ref[:, i] = (num / den)[:, 0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_favor_needs_a_dimension():
    with pytest.raises(ValueError, match="dim_features or dim_head"):
        build_attention({"name": "favor", "dropout": 0.0})
    att = build_attention({"name": "favor", "dropout": 0.0, "dim_head": 16})
    assert att.dim_features == 2 * (math.ceil(16 * 5) // 2)


def test_hyperbolic_maps_need_an_even_dimension():
    with pytest.raises(ValueError, match="even"):
        SMReg(dim_features=7)
