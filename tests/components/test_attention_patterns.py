"""attention_patterns and the sparsity configs against explicit definitions."""

import pytest
import torch

from triformers.components.attention import attention_patterns as ap
from triformers.components.attention.sparsity_config import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    VariableSparsityConfig,
)


def _coords(H, W):
    idx = torch.arange(H * W)
    return idx // W, idx % W


def test_local_1d_pattern():
    p = ap.local_1d_pattern(11, 5)
    i, j = torch.arange(11)[:, None], torch.arange(11)[None, :]
    assert torch.equal(p, (i - j).abs() <= 2)
    with pytest.raises(ValueError, match="odd"):
        ap.local_1d_pattern(11, 4)


def test_causal_and_random_patterns():
    assert torch.equal(ap.causal_1d_pattern(7), torch.ones(7, 7, dtype=torch.bool).tril())
    r = ap.random_pattern(200, sparsity=0.9)
    assert abs(r.float().mean().item() - 0.1) < 0.01
    with pytest.raises(ValueError):
        ap.random_pattern(5, sparsity=1.0)


def test_2d_distances_and_patterns():
    H, W = 3, 5
    r, c = _coords(H, W)
    dr, dc = (r[:, None] - r[None, :]).float(), (c[:, None] - c[None, :]).float()
    torch.testing.assert_close(ap.local_2d_distance(H, W), torch.sqrt(dr**2 + dc**2))
    torch.testing.assert_close(ap.horizontal_axial_2d_distance(H, W), dr.abs())
    torch.testing.assert_close(ap.vertical_axial_2d_distance(H, W), dc.abs())
    assert torch.equal(ap.local_2d_pattern(H, W, distance=1.5), (dr**2 + dc**2).sqrt() < 1.5)
    assert torch.equal(ap.axial_2d_pattern(H, W), (dr == 0) | (dc == 0))
    torch.testing.assert_close(ap.local_2d_gausian_distribution(H, W, sigma=2), torch.exp(-(dr**2 + dc**2) / (2 * 4)))
    d = ap.local_nd_distance(2, 3, 4, p=1.0)
    assert d.shape == (24, 24) and d.max() == 1 + 2 + 3


@pytest.mark.parametrize("shift", [0, 2])
def test_swin_pattern(shift):
    H, W, ws = 8, 12, 4
    r, c = _coords(H, W)
    wr, wc = torch.div(r - shift, ws, rounding_mode="floor"), torch.div(c - shift, ws, rounding_mode="floor")
    expected = (wr[:, None] == wr[None, :]) & (wc[:, None] == wc[None, :])
    assert torch.equal(ap.swin_attention_pattern(H, W, ws, shift), expected)


def test_dilated_pattern():
    H, W, k = 4, 6, 2
    r, c = _coords(H, W)
    expected = ((r[:, None] - r[None, :]) % k == 0) & ((c[:, None] - c[None, :]) % k == 0)
    assert torch.equal(ap.dilated_2d_pattern(H, W, k), expected)


def test_global_token_pattern():
    m = torch.tensor([False, True, False, False, True])
    p = ap.global_token_pattern(m)
    assert torch.equal(p, m[:, None] | m[None, :])


def test_random_pattern_from_probability_matrix():
    probs = ap.local_nd_gaussian_distribution(6, 6, sigma=1)
    p = ap.random_pattern_from_probability_matrix(probs, nnz=100)
    assert p.sum() == 100


def test_layout_round_trip_and_block_sparsify():
    layout = (torch.rand(2, 3, 3) > 0.5).long()
    pattern = ap.layout_to_pattern(layout, 4)
    assert pattern.shape == (2, 12, 12)
    assert torch.equal(ap.pattern_to_layout(pattern, 4), layout)
    x = torch.randn(5, 2, 12, 12)
    blocks = ap.block_sparsify_tensor(x, layout, 4)
    for idx, (h, i, j) in enumerate(layout.nonzero().tolist()):
        assert torch.equal(blocks[:, idx], x[:, h, i * 4 : (i + 1) * 4, j * 4 : (j + 1) * 4])


def test_alibi_pattern():
    p = ap.alibi_pattern(1.0, (8, 20))
    slopes = torch.tensor([2 ** (-8 * (h + 1) / 8) for h in range(8)])
    assert torch.equal(p, (slopes[:, None, None] * torch.arange(20)[None, None, :]) < 1.0)
    assert ap.alibi_pattern(1.0, (6, 10)).shape == (6, 1, 10)


def test_quick_layouts():
    for fn in (ap.quick_fixed_layout, ap.quick_variable_layout, ap.quick_bigbird_layout, ap.quick_bslongformer_layout):
        layout = fn(3, 16, 128)
        assert layout.shape == (3, 8, 8) and layout.dtype == torch.int64
        assert torch.equal(layout[0], layout[2])  # one layout for every head by default


def test_dense_config():
    assert (DenseSparsityConfig(2, block_size=4).make_layout(20) == 1).all()
    with pytest.raises(ValueError, match="divisible"):
        DenseSparsityConfig(2, block_size=16).make_layout(20)


@pytest.mark.parametrize("attention", ["bidirectional", "unidirectional"])
def test_fixed_config(attention):
    layout = FixedSparsityConfig(
        1, block_size=1, num_local_blocks=4, num_global_blocks=1, attention=attention
    ).make_layout(10)[0]
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    local = i // 4 == j // 4
    if attention == "unidirectional":
        local &= j <= i
    glob = torch.zeros(10, 10, dtype=torch.bool)
    for g in (3, 7, 9):  # last block of each window; the short last window's global block is its last one
        glob[:, g] = True if attention == "bidirectional" else (i[:, 0] >= g)
    assert torch.equal(layout.bool(), local | glob)


def test_variable_config():
    layout = VariableSparsityConfig(
        1,
        block_size=1,
        local_window_blocks=[2, 3],
        global_block_indices=[0],
    ).make_layout(9)[0]
    win = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 3])  # windows of 2, then 3 repeated
    expected = win[:, None] == win[None, :]
    expected[:, 0] = True
    assert torch.equal(layout.bool(), expected)


@pytest.mark.parametrize("attention", ["bidirectional", "unidirectional"])
def test_bigbird_config(attention):
    layout = BigBirdSparsityConfig(
        2,
        block_size=1,
        num_random_blocks=2,
        num_sliding_window_blocks=3,
        num_global_blocks=1,
        attention=attention,
        different_layout_per_head=True,
    ).make_layout(12)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    must = ((i - j).abs() <= 1) | (i == 0) | (j == 0)
    if attention == "unidirectional":
        must &= j <= i
        assert not layout.bool().triu(1).any()
    assert (layout.bool() | ~must).all()
    extra = layout.bool() & ~must
    assert (extra.sum(-1) <= 2).all()


def test_bslongformer_config():
    layout = BSLongformerSparsityConfig(
        1, block_size=1, num_sliding_window_blocks=3, global_block_indices=[2], global_block_end_indices=[4]
    ).make_layout(10)[0]
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    g = (j >= 2) & (j < 4) | (i >= 2) & (i < 4)
    assert torch.equal(layout.bool(), ((i - j).abs() <= 1) | g)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        FixedSparsityConfig(1, num_local_blocks=4, num_global_blocks=3)
    with pytest.raises(NotImplementedError):
        BigBirdSparsityConfig(1, attention="sideways")
    with pytest.raises(ValueError, match="same length"):
        VariableSparsityConfig(1, global_block_indices=[0, 1], global_block_end_indices=[2])
