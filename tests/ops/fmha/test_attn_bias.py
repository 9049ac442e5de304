"""attn_bias: materialize() against element-by-element constructions from the documented rules,
constructors, validation errors and the packing helpers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha._mask import mask_spec


def _dense(shape, rule):
    """-inf/0 matrix from a python predicate rule(i, j)."""
    Mq, Mkv = shape
    out = torch.full((Mq, Mkv), -math.inf)
    for i in range(Mq):
        for j in range(Mkv):
            if rule(i, j):
                out[i, j] = 0.0
    return out


def _blocks(q_lens, k_starts, k_lens, rule, Mkv=None):
    """-inf/0 matrix for packed blocks: rule(i_local, j_local, nq, nk)."""
    Mq = sum(q_lens)
    Mkv = max([s + n for s, n in zip(k_starts, k_lens)] + [0]) if Mkv is None else Mkv
    out = torch.full((Mq, Mkv), -math.inf)
    q0 = 0
    for nq, k0, nk in zip(q_lens, k_starts, k_lens):
        for i in range(nq):
            for j in range(nk):
                if rule(i, j, nq, nk):
                    out[q0 + i, k0 + j] = 0.0
        q0 += nq
    return out


SHAPES = [(1, 1), (3, 3), (4, 7), (7, 4), (17, 17), (5, 12)]


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_masks(shape):
    Mq, Mkv = shape
    s = Mkv - Mq
    cases = [
        (ab.LowerTriangularMask(), lambda i, j: j <= i),
        (ab.LowerTriangularFromBottomRightMask(), lambda i, j: j <= i + s),
        (ab.LowerTriangularFromBottomRightMask().make_local_attention(3), lambda i, j: i + s - 2 <= j <= i + s),
        (ab.LowerTriangularFromBottomRightLocalAttentionMask(1), lambda i, j: j == i + s),
        (ab.LocalAttentionFromBottomRightMask(1, 2), lambda i, j: i + s - 1 <= j <= i + s + 2),
        (ab.LocalAttentionFromBottomRightMask(0, 0), lambda i, j: j == i + s),
    ]
    for bias, rule in cases:
        torch.testing.assert_close(bias.materialize(shape), _dense(shape, rule), msg=repr(bias))
        # batch dims broadcast
        assert bias.materialize((2, 3, *shape)).shape == (2, 3, *shape)


def test_local_attention_doc_example():
    bias = ab.LocalAttentionFromBottomRightMask(window_left=1, window_right=2)
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)
    torch.testing.assert_close(bias.materialize((4, 4)).exp(), expected)
    expected = torch.tensor(
        [[1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.float32
    )
    torch.testing.assert_close(bias.materialize((4, 5)).exp(), expected)


def test_tensor_bias_mask():
    t = torch.randn(2, 3, 5, 6)
    bias = ab.LowerTriangularMask().add_bias(t)
    assert isinstance(bias, ab.LowerTriangularMaskWithTensorBias)
    torch.testing.assert_close(bias.materialize((2, 3, 5, 6)), t + _dense((5, 6), lambda i, j: j <= i))


def test_dtypes_and_bf16():
    m = ab.LowerTriangularMask().materialize((5, 5), dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16
    torch.testing.assert_close(m.float(), _dense((5, 5), lambda i, j: j <= i))


BLOCK_CASES = [([4, 6], [4, 6]), ([3, 1, 5], [2, 7, 5]), ([1], [9]), ([2, 2, 2, 2], [3, 3, 3, 3])]


@pytest.mark.parametrize("q_lens,k_lens", BLOCK_CASES)
def test_block_diagonal_family(q_lens, k_lens):
    k_starts = [sum(k_lens[:b]) for b in range(len(k_lens))]
    base = ab.BlockDiagonalMask.from_seqlens(q_lens, k_lens)
    shape = (sum(q_lens), sum(k_lens))

    def check(bias, rule):
        torch.testing.assert_close(bias.materialize(shape), _blocks(q_lens, k_starts, k_lens, rule), msg=repr(bias))

    check(base, lambda i, j, nq, nk: True)
    check(base.make_causal(), lambda i, j, nq, nk: j <= i)
    if all(k >= q for q, k in zip(q_lens, k_lens)):
        check(base.make_causal_from_bottomright(), lambda i, j, nq, nk: j <= i + nk - nq)
        check(
            base.make_local_attention_from_bottomright(2),
            lambda i, j, nq, nk: i + (nk - nq) - 1 <= j <= i + (nk - nq),
        )
    else:
        with pytest.raises(ValueError, match="Expected `num_keys >= num_queries`"):
            base.make_causal_from_bottomright()
    window = max(1, max(q - k for q, k in zip(q_lens, k_lens)) + 2)
    check(base.make_local_attention(window), lambda i, j, nq, nk: i - window + 1 <= j <= i)


def test_block_diagonal_pinned_local():
    """xFormers pins this one: each row sees its diagonal and the previous key, within its block."""
    bias = ab.BlockDiagonalMask.from_seqlens([4, 6], [4, 6]).make_local_attention(2)
    expected = _blocks([4, 6], [0, 4], [4, 6], lambda i, j, nq, nk: i - 1 <= j <= i)
    torch.testing.assert_close(bias.materialize((10, 10)), expected)


def test_padded_keys():
    bias = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q_seqlen=[2, 3, 1], kv_padding=4,
                                                                      kv_seqlen=[2, 4, 3])
    expected = _blocks([2, 3, 1], [0, 4, 8], [2, 4, 3], lambda i, j, nq, nk: j <= i + nk - nq, Mkv=12)
    torch.testing.assert_close(bias.materialize((6, 12)), expected)
    with pytest.raises(ValueError, match="k shapes wrong"):
        bias.materialize((6, 11))
    with pytest.raises(ValueError, match="q shapes wrong"):
        bias.materialize((5, 12))
    with pytest.raises(ValueError, match="more than kv_padding"):
        ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1], 2, [3])


def test_constructor_validation():
    with pytest.raises(ValueError, match="window_size > 0"):
        ab.LowerTriangularFromBottomRightLocalAttentionMask(0)
    with pytest.raises(ValueError, match="window_left >= 0"):
        ab.LocalAttentionFromBottomRightMask(-1, 0)
    with pytest.raises(ValueError, match="window_right >= 0"):
        ab.LocalAttentionFromBottomRightMask(0, -2)
    base = ab.BlockDiagonalMask.from_seqlens([5, 2], [1, 4])
    with pytest.raises(ValueError, match="window_size > 0"):
        base.make_local_attention(0)
    with pytest.raises(RuntimeError, match="No keys are attended"):
        base.make_local_attention(3)  # block 0: 5 queries, 1 key, window 3
    with pytest.raises(ValueError, match="one entry per block"):
        ab.BlockDiagonalMask.from_seqlens([1, 2], [3])
    with pytest.raises(ValueError, match="non-negative ints"):
        ab.BlockDiagonalMask.from_seqlens([1, -2])


def test_from_seqlens_shares_seqinfo():
    bias = ab.BlockDiagonalMask.from_seqlens([2, 3, 2])
    assert bias.q_seqinfo is bias.k_seqinfo
    assert bias.q_seqinfo.seqstart_py == [0, 2, 5, 7]
    assert bias.q_seqinfo.seqstart.tolist() == [0, 2, 5, 7]
    assert (bias.q_seqinfo.max_seqlen, bias.q_seqinfo.min_seqlen) == (3, 2)
    assert ab.BlockDiagonalMask.from_seqlens(torch.tensor([2, 3]), [2, 3]).q_seqinfo.seqstart_py == [0, 2, 5]


def test_from_tensor_list_and_split():
    xs = [torch.randn(1, 3, 2, 4), torch.randn(2, 6, 2, 4), torch.randn(1, 2, 2, 4)]
    bias, packed = ab.BlockDiagonalMask.from_tensor_list(xs)
    assert packed.shape == (1, 3 + 12 + 2, 2, 4)
    assert bias.q_seqinfo.seqstart_py == [0, 3, 9, 15, 17]
    parts = bias.split(packed)
    assert [p.shape for p in parts] == [x.shape for x in xs]
    for p, x in zip(parts, xs):
        torch.testing.assert_close(p, x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="packed sequences"):
        bias.split(packed[:, :-1])


def test_from_tensor_lists_qkv():
    qs = [torch.randn(2, 3, 1, 4), torch.randn(1, 5, 1, 4)]
    ks = [torch.randn(2, 4, 1, 4), torch.randn(1, 2, 1, 4)]
    vs = [torch.randn(2, 4, 1, 6), torch.randn(1, 2, 1, 6)]
    bias, q, k, v = ab.BlockDiagonalMask.from_tensor_lists_qkv(qs, ks, vs)
    assert (q.shape[1], k.shape[1], v.shape[1]) == (11, 10, 10)
    assert bias.q_seqinfo.seqstart_py == [0, 3, 6, 11]
    assert bias.k_seqinfo.seqstart_py == [0, 4, 8, 10]
    for a, b in zip(bias.split_queries(q), qs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(bias.split_kv(v), vs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="identical query and key lengths"):
        bias.split(q)
    assert ab.BlockDiagonalMask.from_tensor_lists_qkv(qs, ks)[3] is None


def test_make_conversions_keep_structure():
    base = ab.BlockDiagonalMask.from_seqlens([3, 4], [5, 6])
    base._batch_sizes = [2]
    for made, cls in [
        (base.make_causal(), ab.BlockDiagonalCausalMask),
        (base.make_causal_from_bottomright(), ab.BlockDiagonalCausalFromBottomRightMask),
        (base.make_local_attention(2), ab.BlockDiagonalCausalLocalAttentionMask),
        (base.make_local_attention_from_bottomright(2), ab.BlockDiagonalCausalLocalAttentionFromBottomRightMask),
    ]:
        assert type(made) is cls
        assert made.q_seqinfo is base.q_seqinfo and made.k_seqinfo is base.k_seqinfo
        assert made._batch_sizes == [2]


def test_public_reexports():
    from triformers import ops

    assert ops.fmha.BlockDiagonalMask is ab.BlockDiagonalMask
    assert ops.LowerTriangularMask is ab.LowerTriangularMask
    assert ops.AttentionBias is ab.AttentionBias and ops.AttentionMask is ab.AttentionBias
    assert ops.attn_bias is ab and ops.fmha is fmha
    with pytest.raises(NotImplementedError):
        ab.AttentionBias().materialize((2, 2))


def _spec_dense(bias, Mq, Mkv):
    """The allowed set according to the kernels' MaskSpec, as a -inf/0 matrix."""
    spec = mask_spec(bias)
    out = torch.full((Mq, Mkv), -math.inf)
    for q0, nq, k0, nk, off in spec.blocks(Mq, Mkv):
        i = torch.arange(nq).view(-1, 1)
        j = torch.arange(nk).view(1, -1)
        allowed = spec.allowed(i, j, off)
        out[q0:q0 + nq, k0:k0 + nk] = torch.where(allowed, 0.0, -math.inf)
    return out


@settings(max_examples=60, deadline=None)
@given(
    q_lens=st.lists(st.integers(0, 9), min_size=1, max_size=5),
    extra=st.lists(st.integers(0, 6), min_size=5, max_size=5),
    window=st.integers(1, 8),
    kind=st.sampled_from(["plain", "causal", "causal_br", "local", "local_br", "padded"]),
)
def test_mask_spec_matches_materialize(q_lens, extra, window, kind):
    """The kernels' description of each block-diagonal bias equals its materialization."""
    k_lens = [q + e for q, e in zip(q_lens, extra)]
    base = ab.BlockDiagonalMask.from_seqlens(q_lens, k_lens)
    if kind == "plain":
        bias = base
    elif kind == "causal":
        bias = base.make_causal()
    elif kind == "causal_br":
        bias = base.make_causal_from_bottomright()
    elif kind == "local":
        bias = base.make_local_attention(window)
    elif kind == "local_br":
        bias = base.make_local_attention_from_bottomright(window)
    else:
        padding = max(k_lens) + 1
        bias = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q_lens, padding, k_lens)
    Mq, Mkv = sum(q_lens), bias.k_seqinfo.seqstart_py[-1]
    torch.testing.assert_close(_spec_dense(bias, Mq, Mkv), bias.materialize((Mq, Mkv)))


@pytest.mark.parametrize("shape", SHAPES)
def test_mask_spec_matches_materialize_dense(shape):
    for bias in [
        ab.LowerTriangularMask(),
        ab.LowerTriangularFromBottomRightMask(),
        ab.LowerTriangularFromBottomRightLocalAttentionMask(2),
        ab.LocalAttentionFromBottomRightMask(2, 1),
    ]:
        torch.testing.assert_close(_spec_dense(bias, *shape), bias.materialize(shape), msg=repr(bias))
