"""The blocksparse attention component and the sparsity configs on BlockSparseMask (the chunked operator on the
CPU), against dense attention masked by the layout in float64; gradients included."""

import math

import pytest
import torch

from triformers.components.attention import build_attention
from triformers.components.attention import sparsity_config as sc

HEADS, BLOCK, SEQ = 2, 16, 96  # 6 blocks per side

CONFIGS = {
    "fixed": lambda causal: sc.FixedSparsityConfig(
        HEADS, BLOCK, num_local_blocks=2, num_global_blocks=1,
        attention="unidirectional" if causal else "bidirectional"),
    "bigbird": lambda causal: sc.BigBirdSparsityConfig(
        HEADS, BLOCK, different_layout_per_head=True, num_random_blocks=1, num_sliding_window_blocks=1,
        attention="unidirectional" if causal else "bidirectional"),
    "variable": lambda causal: sc.VariableSparsityConfig(
        HEADS, BLOCK, num_random_blocks=1, local_window_blocks=[1, 2], global_block_indices=[0],
        attention="unidirectional" if causal else "bidirectional"),
    "bslongformer": lambda causal: sc.BSLongformerSparsityConfig(
        HEADS, BLOCK, num_sliding_window_blocks=3, global_block_indices=[0],
        attention="unidirectional" if causal else "bidirectional"),
    "dense": lambda causal: sc.DenseSparsityConfig(HEADS, BLOCK),
}


def dense_reference(q, k, v, layout, block, causal, scale=1.0):
    """float64 softmax attention ``[B, H, S, D]`` where the layout (kron-expanded to tokens) allows; rows
    that see nothing give 0."""
    q, k, v = q.double(), k.double(), v.double()
    S = q.shape[2]
    keep = torch.kron(layout.long(), torch.ones(block, block, dtype=torch.long)).bool()[:, :S, :S]
    if causal:
        keep = keep & torch.ones(S, S, dtype=torch.bool).tril()
    s = q @ k.transpose(-1, -2) * (scale / math.sqrt(q.shape[-1]))
    p = torch.softmax(torch.where(keep, s, -1e300), dim=-1) * keep
    return p @ v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_component_on_sparsity_configs(name, causal):
    config = CONFIGS[name](causal)
    layout = config.make_layout(SEQ)
    att = build_attention({"name": "blocksparse", "dropout": 0.0, "layout": layout, "block_size": BLOCK,
                           "causal": causal})
    q, k, v = (torch.randn(2, HEADS, SEQ, 8, requires_grad=True) for _ in range(3))
    out = att(q, k, v, scale=0.7)
    ref = dense_reference(q, k, v, layout, BLOCK, causal, scale=0.7)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g.double())):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


def test_make_mask_materializes_the_layout():
    config = sc.BSLongformerSparsityConfig(HEADS, 32, num_sliding_window_blocks=3)
    mask = config.make_mask(128, causal=True)
    dense = mask.materialize((1, HEADS, 128, 128))[0] == 0
    keep = torch.kron(config.make_layout(128), torch.ones(32, 32, dtype=torch.long)).bool()
    assert torch.equal(dense, keep & torch.ones(128, 128, dtype=torch.bool).tril())


def test_small_blocks_take_the_torch_path_with_a_warning():
    """Blocks below 16 tokens (finer than any kernel tile) still compute the right answer, on the torch path."""
    layout = torch.rand(HEADS, 5, 5) < 0.6
    att = build_attention({"name": "blocksparse", "dropout": 0.0, "layout": layout, "block_size": 4})
    q, k, v = (torch.randn(1, HEADS, 20, 8) for _ in range(3))
    from triformers.components.attention import blocksparse

    blocksparse._WARNED_SMALL_BLOCKS.clear()
    with pytest.warns(UserWarning, match="below 16"):
        out = att(q, k, v)
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, layout, 4, False), atol=2e-5, rtol=2e-5)
