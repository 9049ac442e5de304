"""context_parallel(model): a model of our attention components (MultiHeadDispatch over ScaledDotProduct, causal),
run on sharded inputs under the helper on 2 and 4 gloo ranks, gives the outputs and parameter gradients of the
same model run by one process on the whole sequence (float64); activation checkpointing's recomputation is
context-parallel too; attention outside the model, and after ``remove()``, is plain again."""

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import triformers.ops
from triformers.components import MultiHeadDispatch
from triformers.components.attention.scaled_dot_product import ScaledDotProduct
from triformers.distributed import context_parallel
from triformers.ops import fmha

TOL = dict(atol=2e-6, rtol=2e-6)  # float64; the ring's merge and backward read a float32 lse
BATCH, HEADS, DIM = 2, 2, 12  # batch x heads = 4 attention units: all-to-all splits them over 2 or 4 ranks


class TinyDecoder(nn.Module):
    """Learned positions (indexed by global position), causal multi-head attention (recomputed in the
    backward), a linear layer."""

    def __init__(self, seq_len: int) -> None:
        super().__init__()
        self.pos = nn.Embedding(seq_len, DIM)
        self.attn = MultiHeadDispatch(DIM, HEADS, ScaledDotProduct(causal=True))
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = x + self.pos(positions)
        h = h + checkpoint(self.attn, h, use_reentrant=False)
        return self.out(h)


def _model_matches_single_process(rank, world, mode, load_balance):
    seq_len = 2 * world * 3
    torch.manual_seed(0)
    model = TinyDecoder(seq_len).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, seq_len, DIM, generator=g, dtype=torch.float64)
    weight = torch.randn(BATCH, seq_len, DIM, generator=g, dtype=torch.float64)
    ref = model(x, torch.arange(seq_len))
    (ref * weight).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    plain = triformers.ops.memory_efficient_attention
    with context_parallel(model, mode=mode, load_balance=load_balance) as cp:
        assert triformers.ops.memory_efficient_attention is not plain
        out = model(cp.shard(x), cp.positions(seq_len))
        # the loss of the local tokens; the parameters' gradients are summed over the ranks
        (out * cp.shard(weight)).sum().backward()
        torch.testing.assert_close(cp.gather(out), ref, **TOL)
        # attention outside the model's forward is plain: local tokens only
        q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
        torch.testing.assert_close(triformers.ops.memory_efficient_attention(q, q, q), plain(q, q, q), atol=0, rtol=0)
    assert triformers.ops.memory_efficient_attention is plain and fmha.memory_efficient_attention is plain
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad)
        torch.testing.assert_close(p.grad, ref_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")
    # detached: the same model on the local tokens is plain attention again (a different result)
    local = model(x[:, : seq_len // world], torch.arange(seq_len // world))
    torch.testing.assert_close(local, model(x, torch.arange(seq_len))[:, : seq_len // world], **TOL)


@pytest.mark.parametrize("load_balance", ["zigzag", "contiguous"])
@pytest.mark.parametrize("mode", ["ring", "all_to_all"])
def test_model_matches_single_process(ranks, mode, load_balance):
    ranks.run(_model_matches_single_process, mode, load_balance)


class AttentionWithOutputDtype(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return triformers.ops.memory_efficient_attention(x, x, x, output_dtype=torch.float64)


def _refusals_and_warning(rank, world):
    with pytest.raises(ValueError, match="is a RotaryEmbedding"):
        context_parallel(MultiHeadDispatch(DIM, HEADS, ScaledDotProduct(), use_rotary_embeddings=True))
    with pytest.raises(ValueError, match="mode must be one of"):
        context_parallel(nn.Linear(2, 2), mode="ulysses")
    with pytest.raises(ValueError, match="module must be a torch.nn.Module"):
        context_parallel(lambda x: x)
    linear = nn.Linear(3, 3)
    with context_parallel(linear) as cp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        linear(torch.randn(2, 3))
        linear(torch.randn(2, 3))
    assert cp.world_size == world and cp.rank == rank
    assert len([w for w in caught if "made no call of" in str(w.message)]) == 1  # once per helper
    model = AttentionWithOutputDtype()
    with context_parallel(model), pytest.raises(ValueError, match="picks its operators and output dtype"):
        model(torch.randn(1, 2 * world, 2, 8))


def test_refusals_and_warning(ranks):
    ranks.run(_refusals_and_warning)
