"""Attention FLOPs count the pairs a mask allows: checked against the pairs the materialized bias leaves finite."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from triformers.ops import fmha, memory_efficient_attention
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha._mask import mask_spec
from triformers.profiler import OpStatsMode, attention_flops, flop_formulas
from triformers.profiler.flop_formulas import allowed_pairs, inputs_attention_flops


def materialized_pairs(bias, B: int, H: int, Mq: int, Mkv: int) -> int:
    """Allowed pairs summed over batch and heads, from the dense mask (the reference)."""
    dense = bias.materialize((B, H, Mq, Mkv), dtype=torch.float32)
    return int(torch.isfinite(torch.broadcast_to(dense, (B, H, Mq, Mkv))).sum())


def _block_diagonal():
    return ab.BlockDiagonalCausalMask.from_seqlens([5, 17, 1, 14]), 1, 37, 37


def _padded_keys():
    bias = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([3, 1, 6], kv_padding=19, kv_seqlen=[7, 19, 11])
    return bias, 1, 10, 57


def _block_sparse(causal):
    layout = torch.rand(3, 3, 4, generator=torch.Generator().manual_seed(1)) > 0.4
    return ab.BlockSparseMask(layout, block_size=(16, 24), causal=causal), 2, 37, 83


CASES = {
    "causal": lambda: (ab.LowerTriangularMask(), 2, 37, 53),
    "causal_bottom_right": lambda: (ab.LowerTriangularFromBottomRightMask(), 2, 37, 53),
    "local_causal": lambda: (ab.LowerTriangularFromBottomRightLocalAttentionMask(7), 2, 41, 41),
    "local_window": lambda: (ab.LocalAttentionFromBottomRightMask(window_left=5, window_right=3), 2, 29, 45),
    "block_diagonal": _block_diagonal,
    "padded_keys": _padded_keys,
    "block_sparse": lambda: _block_sparse(False),
    "block_sparse_causal": lambda: _block_sparse(True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_allowed_pairs_match_the_materialized_mask(name):
    bias, B, Mq, Mkv = CASES[name]()
    H = 3
    assert B * allowed_pairs(mask_spec(bias), Mq, Mkv, H) == materialized_pairs(bias, B, H, Mq, Mkv)


def test_attention_flops_formula():
    # 2 products of 2 FLOPs per multiply-add forward; the backward is 5/2 of it when K == Kv
    assert attention_flops(10, 8, 8) == 2 * 10 * 8 * 2
    assert attention_flops(10, 8, 8, backward=True) * 2 == attention_flops(10, 8, 8) * 5
    assert attention_flops(3, 16, 4) == 2 * 3 * 16 + 2 * 3 * 4


def _qkv(B, Mq, Mkv, H, K, Kv, dtype=torch.float32):
    q = torch.randn(B, Mq, H, K, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Mkv, H, K, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Mkv, H, Kv, dtype=dtype, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("name", ["causal", "local_window", "block_diagonal", "block_sparse_causal"])
def test_triton_custom_ops_counted_by_plain_flop_counter(name, monkeypatch):
    """``triformers::flash_fwd`` / ``flash_bwd`` are in torch's global registry: a plain FlopCounterMode counts them."""
    monkeypatch.setenv("TRIFORMERS_FMHA_OP", "triton")
    bias, B, Mq, Mkv = CASES[name]()
    H, K, Kv = 3, 16, 8
    q, k, v = _qkv(B, Mq, Mkv, H, K, Kv)
    with FlopCounterMode(display=False) as counter:
        memory_efficient_attention(q, k, v, bias).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    pairs = materialized_pairs(bias, B, H, Mq, Mkv)
    assert counts == {
        "triformers.flash_fwd": attention_flops(pairs, K, Kv),
        "triformers.flash_bwd": attention_flops(pairs, K, Kv, backward=True),
    }


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_counted_over_allowed_pairs(causal):
    B, H, Mq, Mkv, K = 2, 3, 19, 19, 8
    q, k, v = (torch.randn(B, H, Mq, K, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
    pairs = B * H * (Mq * (Mq + 1) // 2 if causal else Mq * Mkv)
    assert counter.get_total_flops() == attention_flops(pairs, K, K) + attention_flops(pairs, K, K, backward=True)


@pytest.mark.parametrize("name", ["local_causal", "padded_keys", "block_sparse_causal"])
def test_chunked_operator_counted_as_one_op(name):
    """The chunked operator's tile loop counts as one op whose FLOPs are the mask's, not the tiles'."""
    bias, B, Mq, Mkv = CASES[name]()
    H, K, Kv = 3, 8, 8
    q, k, v = _qkv(B, Mq, Mkv, H, K, Kv)
    original = fmha.chunked.FwOp.__dict__["apply"]
    with OpStatsMode("cpu") as mode:
        out = memory_efficient_attention(q, k, v, bias, op=(fmha.chunked.FwOp, fmha.chunked.BwOp))
        out.sum().backward()
    pairs = materialized_pairs(bias, B, H, Mq, Mkv)
    assert mode.ops["fmha.chunkedF"].flops == attention_flops(pairs, K, Kv)
    assert mode.ops["fmha.chunkedB"].flops == attention_flops(pairs, K, Kv, backward=True)
    assert mode.ops["fmha.chunkedF"].calls == mode.ops["fmha.chunkedB"].calls == 1
    assert not any(n in mode.ops for n in ("aten.bmm", "aten.mm", "aten.baddbmm"))  # its matmuls are inside it
    # it reads Q, K, V and writes O at least once
    assert mode.ops["fmha.chunkedF"].bytes >= 4 * (q.numel() + k.numel() + v.numel() + out.numel())
    assert fmha.chunked.FwOp.__dict__["apply"] is original  # restored on exit


def test_inputs_attention_flops_bmghk_and_quantized_width():
    from triformers.ops.fmha.common import Inputs

    q = torch.randn(2, 11, 2, 3, 16)
    k = torch.randn(2, 13, 2, 3, 16)
    v = torch.randn(2, 13, 2, 3, 8)
    inp = Inputs(q, k, v, ab.LowerTriangularFromBottomRightMask())
    pairs = 2 * 6 * sum(min(13, i + 2 + 1) for i in range(11))  # bottom-right: query i sees keys j <= i + 2
    assert inputs_attention_flops(inp) == attention_flops(pairs, 16, 8)
    assert math.isclose(inputs_attention_flops(inp, backward=True), attention_flops(pairs, 16, 8, True))
