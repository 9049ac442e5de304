"""The attention components behave as code written against xFormers' ``components`` expects:

- ``scaled_dot_product_attention`` with a float ``torch.sparse`` mask (0 / -inf) gives what the dense mask gives;
- ``torch.jit.trace`` of a ``MultiHeadDispatch`` works (its check reruns the call without gradients) and the
  trace computes what the module computes;
- attentions whose pattern is ``[S, S]`` (local, random) say so (``requires_same_k_q_dimensions``), and
  ``MultiHeadDispatch`` refuses them other lengths with a clear error.
"""

import math

import pytest
import torch

from triformers.components import MultiHeadDispatch, build_attention
from triformers.components.attention import ATTENTION_REGISTRY
from triformers.components.attention.core import scaled_dot_product_attention


def _dense_reference(q, k, v, additive):
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) + additive.double()
    return torch.softmax(s, dim=-1) @ v.double()


@pytest.mark.parametrize("mask_batch", [None, 1, 4])
def test_sparse_additive_mask_matches_the_dense_one(mask_batch):
    N, S, D = 4, 13, 8
    q, k, v = (torch.randn(N, S, D) for _ in range(3))
    keep = torch.rand(S, S) > 0.6
    keep |= torch.eye(S, dtype=torch.bool)  # every row sees a key
    if mask_batch is not None:
        keep = keep.expand(mask_batch, S, S).clone()
        keep[-1, 0] = True  # the batches differ
    additive = torch.zeros(keep.shape).masked_fill(~keep, -math.inf)
    dense = scaled_dot_product_attention(q, k, v, additive)
    sparse = scaled_dot_product_attention(q, k, v, additive.to_sparse())
    assert not sparse.isnan().any()
    per_row = additive if additive.ndim == 2 else additive.repeat_interleave(N // additive.shape[0], 0)
    ref = _dense_reference(q, k, v, per_row)
    torch.testing.assert_close(dense.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.double(), ref, atol=1e-5, rtol=1e-5)


def test_bool_sparse_mask_attends_the_stored_pairs():
    N, S, D = 3, 11, 8
    q, k, v = (torch.randn(N, S, D) for _ in range(3))
    keep = (torch.rand(S, S) > 0.7) | torch.eye(S, dtype=torch.bool)
    out = scaled_dot_product_attention(q, k, v, keep.to_sparse())
    additive = torch.zeros(S, S).masked_fill(~keep, -math.inf)
    torch.testing.assert_close(out.double(), _dense_reference(q, k, v, additive), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
@pytest.mark.parametrize("causal", [False, True])
def test_jit_trace_of_multi_head_dispatch(causal):
    attention = build_attention({"name": "scaled_dot_product", "dropout": 0.0, "causal": causal, "seq_len": 16})
    mha = MultiHeadDispatch(dim_model=24, num_heads=3, attention=attention, residual_dropout=0.0).eval()
    x = torch.randn(2, 16, 24)
    traced = torch.jit.trace(mha, (x, x, x))  # check_trace: a second run, without gradients, must match
    y = torch.randn(3, 16, 24)
    torch.testing.assert_close(traced(y, y, y), mha(y, y, y))
    with torch.no_grad():
        torch.jit.trace(mha, (x, x, x))


@pytest.mark.parametrize("name", ["local", "random"])
def test_square_pattern_attentions_require_equal_lengths(name):
    config = {"name": name, "dropout": 0.0, "causal": False, "window_size": 3, "r": 0.5}
    attention = build_attention(config)
    assert attention.requires_same_k_q_dimensions
    mha = MultiHeadDispatch(dim_model=16, num_heads=2, attention=attention, residual_dropout=0.0)
    q, kv = torch.randn(2, 8, 16), torch.randn(2, 12, 16)
    assert mha(q, q, q).shape == q.shape
    with pytest.raises(ValueError, match="needs equal query and key lengths, got 8 and 12"):
        mha(q, kv, kv)


def test_attentions_refusing_other_lengths_say_so():
    """Every registered attention that fails on q_len != k_len sets ``requires_same_k_q_dimensions``."""
    S_Q, S_K, E = 8, 12, 16
    checked = []
    for name in ATTENTION_REGISTRY:
        config = {"name": name, "dropout": 0.0, "seq_len": S_K, "dim_model": E, "num_heads": 2,
                  "layout": torch.ones(2, 1, 1), "block_size": 16, "num_rules": 2, "dim_head": E // 2,
                  "attention_query_mask": torch.rand(S_K, 1) < 0.3}
        try:
            attention = build_attention(config)
        except Exception:  # attentions needing arguments this generic config does not give
            continue
        if attention.requires_same_k_q_dimensions or attention.requires_skip_multi_head:
            continue
        mha = MultiHeadDispatch(dim_model=E, num_heads=2, attention=attention, residual_dropout=0.0)
        q, kv = torch.randn(2, S_Q, E), torch.randn(2, S_K, E)
        mha(q, kv, kv)  # must run: it did not claim equal lengths
        checked.append(name)
    assert {"scaled_dot_product", "favor", "nystrom"} <= set(checked), checked
