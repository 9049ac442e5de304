"""Positional embeddings: generic checks over the registry, the formulas, rotary embeddings."""

import math

import pytest
import torch

from triformers.components import POSITION_EMBEDDING_REGISTRY, build_positional_embedding
from triformers.components.positional_embedding import RotaryEmbedding, apply_rotary_pos_emb, rotate_half

B, S, E, V = 3, 11, 10, 17
NAMES = sorted(POSITION_EMBEDDING_REGISTRY)


def _inputs(name):
    return torch.randint(0, V, (B, S)) if name == "vocab" else torch.randn(B, S, E)


@pytest.mark.parametrize("name", NAMES)
def test_output_dims_and_batch_order(name):
    pe = build_positional_embedding({"name": name, "dim_model": E, "seq_len": 16, "vocab_size": V}).eval()
    x = _inputs(name)
    y = pe(x)
    assert y.shape == (B, S, E) and torch.isfinite(y).all()
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(pe(x[perm]), y[perm])


def test_sine_formula():
    pe = build_positional_embedding({"name": "sine", "dim_model": E, "seq_len": S})
    x = torch.randn(B, S, E)
    ref = torch.empty(S, E)
    for s in range(S):
        for i in range(E):
            angle = s / 10000 ** (2 * (i // 2) / E)
            ref[s, i] = math.sin(angle) if i % 2 == 0 else math.cos(angle)
    torch.testing.assert_close(pe(x), x + ref, atol=1e-5, rtol=1e-5)
    assert pe(torch.randn(B, S)).shape == (B, S, E)  # [B, S] inputs broadcast over the features


def test_vocab_is_token_plus_position():
    pe = build_positional_embedding({"name": "vocab", "dim_model": E, "seq_len": 16, "vocab_size": V})
    x = torch.randint(0, V, (B, S))
    ref = pe.word_embeddings.weight[x] + pe.position_embeddings.weight[:S][None]
    torch.testing.assert_close(pe(x), ref)
    with pytest.raises(ValueError, match="seq_len"):
        pe(torch.randint(0, V, (B, 17)))


def test_learnable_with_class_token():
    pe = build_positional_embedding({"name": "learnable", "dim_model": E, "seq_len": S, "add_class_token": True})
    with torch.no_grad():
        pe.class_token.normal_()
    x = torch.randn(B, S, E)
    y = pe(x)
    assert y.shape == (B, S + 1, E)
    torch.testing.assert_close(y[:, 0], (pe.class_token + pe.pos_emb[0, 0]).expand(B, E))
    torch.testing.assert_close(y[:, 1:], x + pe.pos_emb[:, 1:])


def test_rotate_half():
    x = torch.arange(6.0)
    torch.testing.assert_close(rotate_half(x), torch.tensor([-3.0, -4.0, -5.0, 0.0, 1.0, 2.0]))


def test_rotary_is_a_complex_rotation():
    """Pair (x_i, x_{i+D/2}) is the complex number x_i + i x_{i+D/2}, multiplied by exp(i s theta_i)."""
    D = 8
    rope = RotaryEmbedding(D)
    q, k = torch.randn(2, 3, 9, D, dtype=torch.float64), torch.randn(2, 3, 5, D, dtype=torch.float64)
    rq, rk = rope(q, k)
    theta = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)

    def reference(x):
        z = torch.complex(x[..., : D // 2], x[..., D // 2 :])
        s = torch.arange(x.shape[-2], dtype=torch.float64)[:, None]
        z = z * torch.exp(1j * s * theta)
        return torch.cat([z.real, z.imag], -1)

    torch.testing.assert_close(rq, reference(q))
    torch.testing.assert_close(rk, reference(k))


def test_rotary_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding(6)
    q, k = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    seq = torch.zeros(1, 1, 12, 6, dtype=torch.float64)

    def score(m, n):
        qs, ks = seq.clone(), seq.clone()
        qs[..., m, :], ks[..., n, :] = q, k
        rq, rk = rope(qs, ks)
        return (rq[..., m, :] * rk[..., n, :]).sum()

    torch.testing.assert_close(score(7, 3), score(5, 1))
    torch.testing.assert_close(score(2, 9), score(3, 10))


def test_apply_rotary_crops_tables():
    cos, sin = torch.randn(1, 1, 10, 4), torch.randn(1, 1, 10, 4)
    x = torch.randn(2, 1, 6, 4)
    torch.testing.assert_close(
        apply_rotary_pos_emb(x, cos, sin), x * cos[..., :6, :] + rotate_half(x) * sin[..., :6, :]
    )
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(5)
