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


# --------------------------------------------------------------------------------------------------
# KV-cache biases: padded, gappy, paged keys
# --------------------------------------------------------------------------------------------------

PADDED_CASES = [([2, 3, 1], [2, 4, 0], 4), ([1], [7], 7), ([0, 5, 3], [3, 5, 9], 11), ([4, 4], [1, 3], 5)]


def _padded_rules(window_left, window_right, window):
    """(bias builder, rule(i, j, nq, nk)) for the padded family; s = nk - nq is each block's shift."""
    return [
        (lambda q, p, k: ab.BlockDiagonalPaddedKeysMask.from_seqlens(q, p, k, device="cpu"),
         lambda i, j, nq, nk: True),
        (lambda q, p, k: ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q, p, k, device="cpu"),
         lambda i, j, nq, nk: j <= i + nk - nq),
        (lambda q, p, k: ab.BlockDiagonalLocalAttentionPaddedKeysMask.from_seqlens_local(
            q, p, k, window_left, window_right, device="cpu"),
         lambda i, j, nq, nk: i + nk - nq - window_left <= j <= i + nk - nq + window_right),
        (lambda q, p, k: ab.BlockDiagonalCausalLocalAttentionPaddedKeysMask.from_seqlens_local(
            q, p, k, window, device="cpu"),
         lambda i, j, nq, nk: i + nk - nq - window + 1 <= j <= i + nk - nq),
    ]


@pytest.mark.parametrize("q_lens,kv_lens,padding", PADDED_CASES)
@pytest.mark.parametrize("windows", [(0, 0, 1), (2, 1, 3)])
def test_padded_family_materialize(q_lens, kv_lens, padding, windows):
    """Block b: queries [q_start_b, q_end_b), keys [b * padding, b * padding + kv_seqlen[b]) and the rule."""
    k_starts = [b * padding for b in range(len(q_lens))]
    shape = (sum(q_lens), len(q_lens) * padding)
    for build, rule in _padded_rules(*windows):
        bias = build(q_lens, padding, kv_lens)
        expected = _blocks(q_lens, k_starts, kv_lens, rule, Mkv=shape[1])
        torch.testing.assert_close(bias.materialize(shape), expected, msg=type(bias).__name__)
        assert bias.materialize((2, 3, *shape)).shape == (2, 3, *shape)
        torch.testing.assert_close(_spec_dense(bias, *shape), expected, msg=type(bias).__name__)
        with pytest.raises(ValueError, match="k shapes wrong"):
            bias.materialize((shape[0], shape[1] + 1))
        with pytest.raises(ValueError, match="q shapes wrong"):
            bias.materialize((shape[0] + 1, shape[1]))


def test_padded_make_local_attention_and_subclassing():
    base = ab.BlockDiagonalPaddedKeysMask.from_seqlens([2, 3], 5, [4, 5], device="cpu")
    local = base.make_local_attention(1, 2)
    assert type(local) is ab.BlockDiagonalLocalAttentionPaddedKeysMask and (local.window_left, local.window_right) == (
        1, 2)
    assert local.k_seqinfo is base.k_seqinfo
    assert issubclass(ab.BlockDiagonalCausalWithOffsetPaddedKeysMask, ab.BlockDiagonalPaddedKeysMask)
    causal = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1], 4, [2], causal_diagonal="x",
                                                                         device="cpu")
    assert causal.causal_diagonal == "x"
    info = causal.k_seqinfo
    assert (info.seqstart_py, info.seqlen_py, info.padding) == ([0, 4], [2], 4)
    assert info.seqstart.tolist() == [0, 4] and info.seqlen.tolist() == [2] and info.seqlen.dtype == torch.int32
    assert (info.max_seqlen, info.min_seqlen) == (2, 2)


GAPPY_CASES = [
    ([2, 3, 1], [0, 7, 12], [6, 3, 1], 14),  # the _GappySeqInfo docstring's layout
    ([3, 0, 2], [5, 0, 5], [4, 2, 6], 11),  # overlapping, out of order, an empty block
    ([1, 4], [9, 2], [0, 3], 10),  # an empty key segment
]


@pytest.mark.parametrize("q_lens,starts,lens,total", GAPPY_CASES)
def test_gappy_family_materialize(q_lens, starts, lens, total):
    """Block b: keys [kv_seqstarts[b], kv_seqstarts[b] + kv_seqlen[b]) anywhere on the key axis."""
    shape = (sum(q_lens), total)
    base = ab.BlockDiagonalGappyKeysMask.from_seqlens(q_lens, [*starts, total], lens, device="cpu")
    cases = [
        (base, lambda i, j, nq, nk: True),
        (ab.BlockDiagonalCausalWithOffsetGappyKeysMask(base.q_seqinfo, base.k_seqinfo),
         lambda i, j, nq, nk: j <= i + nk - nq),
        (ab.BlockDiagonalLocalAttentionFromBottomRightGappyKeysMask.from_seqlens_local_gappy(
            q_lens, [*starts, total], lens, 1, 0, device="cpu"),
         lambda i, j, nq, nk: i + nk - nq - 1 <= j <= i + nk - nq),
    ]
    for bias, rule in cases:
        expected = _blocks(q_lens, starts, lens, rule, Mkv=total)
        torch.testing.assert_close(bias.materialize(shape), expected, msg=type(bias).__name__)
        torch.testing.assert_close(_spec_dense(bias, *shape), expected, msg=type(bias).__name__)
        with pytest.raises(ValueError, match="k shapes wrong"):
            bias.materialize((shape[0], total + 1))


def _paged_dense(q_lens, row_starts, row_ends, tables, page_size, rule, Mkv):
    """The paged mask element by element: query i of block b and logical key t in [start_b, end_b) allowed by
    rule(i, t - start_b, nq, nk), at physical column tables[b][t // page_size] * page_size + t % page_size."""
    out = torch.full((sum(q_lens), Mkv), -math.inf)
    q0 = 0
    for b, nq in enumerate(q_lens):
        nk = row_ends[b] - row_starts[b]
        for i in range(nq):
            for t in range(row_starts[b], row_ends[b]):
                if rule(i, t - row_starts[b], nq, nk):
                    out[q0 + i, tables[b][t // page_size] * page_size + t % page_size] = 0.0
        q0 += nq
    return out


def _spec_dense_paged(bias, Mq, Mkv):
    """The allowed set according to a paged bias's MaskSpec (rows through key_rows), as a -inf/0 matrix."""
    spec = mask_spec(bias)
    out = torch.full((Mq, Mkv), -math.inf)
    for b, (q0, nq, _, nk, off) in enumerate(spec.blocks(Mq, Mkv)):
        allowed = spec.allowed(torch.arange(nq).view(-1, 1), torch.arange(nk).view(1, -1), off)
        rows = spec.key_rows(b, torch.arange(nk), Mkv)
        out[q0:q0 + nq, rows] = torch.where(allowed, 0.0, -math.inf)
    return out


@pytest.mark.parametrize("page_size", [1, 3, 4])
def test_paged_family_materialize(page_size):
    """Paged masks equal the unpaged rule applied to logical keys, mapped through a shuffled block table
    (extra unused pages, int64 and int32 tables)."""
    gen = torch.Generator().manual_seed(page_size)
    q_lens, kv_lens, row_len = [2, 0, 3], [5, 3, 0], 6
    pages = -(-row_len // page_size)
    spare = 2
    for dtype in (torch.int32, torch.int64):
        tables = torch.randperm(3 * pages + spare, generator=gen)[: 3 * pages].view(3, pages).to(dtype)
        Mkv = (3 * pages + spare) * page_size
        shape = (sum(q_lens), Mkv)
        starts = [1, 0, 4]
        cases = [
            (ab.PagedBlockDiagonalPaddedKeysMask.from_seqlens(q_lens, kv_lens, tables, page_size, device="cpu"),
             [0, 0, 0], kv_lens, lambda i, j, nq, nk: True),
            (ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q_lens, kv_lens, tables, page_size,
                                                                              device="cpu"),
             [0, 0, 0], kv_lens, lambda i, j, nq, nk: j <= i + nk - nq),
            (ab.PagedBlockDiagonalCausalLocalPaddedKeysMask.from_seqlens_local(q_lens, kv_lens, tables, page_size, 2,
                                                                               device="cpu"),
             [0, 0, 0], kv_lens, lambda i, j, nq, nk: i + nk - nq - 1 <= j <= i + nk - nq),
            (ab.PagedBlockDiagonalGappyKeysMask.from_seqlens(q_lens, starts, [4, 3, 2], tables, page_size),
             starts, [5, 3, 6], lambda i, j, nq, nk: True),
            (ab.PagedBlockDiagonalCausalWithOffsetGappyKeysMask.from_seqlens(q_lens, starts, [4, 3, 2], tables,
                                                                             page_size),
             starts, [5, 3, 6], lambda i, j, nq, nk: j <= i + nk - nq),
        ]
        for bias, row_starts, row_ends, rule in cases:
            expected = _paged_dense(q_lens, row_starts, row_ends, tables.tolist(), page_size, rule, Mkv)
            torch.testing.assert_close(bias.materialize(shape), expected, msg=type(bias).__name__)
            torch.testing.assert_close(_spec_dense_paged(bias, *shape), expected, msg=type(bias).__name__)
            assert bias._max_page == int(tables.max()) and bias.block_tables is tables
            with pytest.raises(ValueError, match="k shapes wrong"):
                bias.materialize((shape[0], (bias._max_page + 1) * page_size - 1))


def test_paged_gappy_seqinfo_convention():
    """Paged gappy: row-local starts with a trailing -1, end offsets in seqlen (lists and tensors alike)."""
    tables = torch.arange(6, dtype=torch.int32).view(2, 3)
    bias = ab.PagedBlockDiagonalGappyKeysMask.from_seqlens([1, 2], [1, 3], [4, 2], tables, 2)
    k = bias.k_seqinfo
    assert k.seqstart_py == [1, 3, -1] and k.seqlen_py == [5, 5]
    assert k.seqstart.tolist() == [1, 3, -1] and k.seqlen.tolist() == [5, 5]
    assert (k.max_seqlen, k.min_seqlen) == (4, 2) and k.seqstart.device == tables.device


def test_make_paged_equals_from_seqlens():
    """make_paged shares the unpaged bias's tensors and gives the paged bias from_seqlens builds, for padded
    (plain, causal, causal local) and gappy (notional padding) keys."""
    tables = torch.tensor([[4, 1], [0, 3], [2, 5]], dtype=torch.int32)
    q_lens, kv_lens, page_size = [2, 1, 3], [3, 0, 4], 2
    Mkv = 6 * page_size
    for unpaged, paged, extra in [
        (ab.BlockDiagonalPaddedKeysMask.from_seqlens(q_lens, 9, kv_lens, device="cpu"),
         ab.PagedBlockDiagonalPaddedKeysMask, {}),
        (ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q_lens, 9, kv_lens, device="cpu"),
         ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask, {}),
        (ab.BlockDiagonalCausalLocalAttentionPaddedKeysMask.from_seqlens_local(q_lens, 9, kv_lens, 2, device="cpu"),
         ab.PagedBlockDiagonalCausalLocalPaddedKeysMask, {"_window_size": 2}),
    ]:
        made = unpaged.make_paged(tables, page_size, paged)
        assert type(made) is paged and made.k_seqinfo.padding == 4 and made.k_seqinfo.seqlen is unpaged.k_seqinfo.seqlen
        direct = paged._build(q_lens, kv_lens, tables, page_size, "cpu", **extra)
        torch.testing.assert_close(made.materialize((6, Mkv)), direct.materialize((6, Mkv)), msg=paged.__name__)
    notional = 4
    starts, lens = [1, 4, 10], [3, 0, 2]  # rows [0, 4), [4, 8), [8, 12)
    for unpaged_type, paged in [(ab.BlockDiagonalGappyKeysMask, ab.PagedBlockDiagonalGappyKeysMask),
                                (ab.BlockDiagonalCausalWithOffsetGappyKeysMask,
                                 ab.PagedBlockDiagonalCausalWithOffsetGappyKeysMask)]:
        base = ab.BlockDiagonalGappyKeysMask.from_seqlens(q_lens, [*starts, 3 * notional], lens, device="cpu")
        unpaged = unpaged_type(base.q_seqinfo, base.k_seqinfo)
        made = unpaged.make_paged(tables, page_size, notional, paged)
        assert made.k_seqinfo.seqstart_py == [1, 0, 2, -1] and made.k_seqinfo.seqlen_py == [4, 0, 4]
        assert made.k_seqinfo.seqstart.tolist() == [1, 0, 2, -1] and made.k_seqinfo.seqlen.tolist() == [4, 0, 4]
        direct = paged.from_seqlens(q_lens, [1, 0, 2], lens, tables, page_size)
        torch.testing.assert_close(made.materialize((6, Mkv)), direct.materialize((6, Mkv)))


def test_kv_bias_validation():
    P = ab.PagedBlockDiagonalPaddedKeysMask
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    cases = [
        (lambda: ab.BlockDiagonalPaddedKeysMask.from_seqlens([1, 1], 3, [2, 4], device="cpu"),
         r"kv_seqlen\[1\]=4 is more than kv_padding=3"),
        (lambda: ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1], 3, [-1], device="cpu"),
         "kv_seqlen must hold non-negative ints"),
        (lambda: ab.BlockDiagonalPaddedKeysMask.from_seqlens([-2], 3, [1], device="cpu"),
         "q_seqlen must hold non-negative ints"),
        (lambda: ab.BlockDiagonalPaddedKeysMask.from_seqlens([1, 2], 3, [1], device="cpu"),
         "one entry per sequence"),
        (lambda: P.from_seqlens([1, 1], [2, 2], tables.float(), 2, device="cpu"),
         "block_tables must be a 2-D int32 or int64 tensor"),
        (lambda: P.from_seqlens([1, 1], [2, 2], tables[0], 2, device="cpu"), "got a 1-D"),
        (lambda: P.from_seqlens([1, 1], [2, 2], [[0, 1], [2, 3]], 2, device="cpu"), "got list"),
        (lambda: P.from_seqlens([1, 1], [2, 5], tables, 2, device="cpu"),
         r"block_tables is too narrow: sequence 1 ends at logical key 5.*at least 3 columns"),
        (lambda: P.from_seqlens([1, 1], [2, 2], tables - 1, 2, device="cpu"), r"negative page id \(-1\)"),
        (lambda: P.from_seqlens([1, 1, 1], [2, 2, 2], tables, 2, device="cpu"), "has 2 rows"),
        (lambda: P.from_seqlens([1, 1], [2, 2], tables, 0, device="cpu"), "page_size must be a positive int"),
        (lambda: P.from_seqlens([1, 1], [2, 2], tables, 2.0, device="cpu"), "page_size must be a positive int"),
        (lambda: P.from_seqlens([1, 1], [2, 2], tables, True, device="cpu"), "page_size must be a positive int"),
        (lambda: ab.PagedBlockDiagonalGappyKeysMask.from_seqlens([1, 1], [3, 0], [2, 1], tables, 2),
         "too narrow: sequence 0 ends at logical key 5"),
        (lambda: ab.PagedBlockDiagonalGappyKeysMask.from_seqlens([1, 1], [-1, 0], [2, 1], tables, 2),
         "offsets >= 0"),
        (lambda: ab.PagedBlockDiagonalGappyKeysMask(
            ab.BlockDiagonalGappyKeysMask.from_seqlens([1, 1], [0, 2, 4], [2, 1], device="cpu").q_seqinfo,
            ab.BlockDiagonalGappyKeysMask.from_seqlens([1, 1], [0, 2, 4], [2, 1], device="cpu").k_seqinfo,
            tables, 2), "does not hold the paged semantics"),
        (lambda: ab.BlockDiagonalGappyKeysMask.from_seqlens([1, 1], [0, 5, 6], [2, 2], device="cpu"),
         r"key segment 1 = \[5, 7\).*outside the key axis \[0, 6\)"),
        (lambda: ab.BlockDiagonalGappyKeysMask.from_seqlens([1, 1], [0, 5], [2, 2], device="cpu"),
         "kv_seqstarts has 2 entries for 2 sequences; expected 3"),
        (lambda: ab.BlockDiagonalGappyKeysMask.from_seqlens([], [0], [], device="cpu"), "No elements"),
        (lambda: ab.BlockDiagonalLocalAttentionPaddedKeysMask.from_seqlens_local([1], 2, [2], -1, 0, device="cpu"),
         "window_left >= 0"),
        (lambda: ab.BlockDiagonalCausalLocalAttentionPaddedKeysMask.from_seqlens_local([1], 2, [2], 0, device="cpu"),
         "window_size > 0"),
        (lambda: P.from_seqlens([1], [2], tables[:1], -3, device="cpu"), "page_size must be a positive int"),
        (lambda: ab.BlockDiagonalPaddedKeysMask.from_seqlens([1, 1], 4, [1, 2], device="cpu").make_paged(
            tables, 2, ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask),
         "not the paged version of BlockDiagonalPaddedKeysMask; pass paged_type=PagedBlockDiagonalPaddedKeysMask"),
        (lambda: ab.BlockDiagonalGappyKeysMask.from_seqlens([1, 1], [0, 4, 8], [1, 1], device="cpu").make_paged(
            tables, 3, 4, ab.PagedBlockDiagonalGappyKeysMask),
         "Notional padding should be divisible by the page size, but got notional_padding=4, page_size=3."),
        (lambda: ab.BlockDiagonalGappyKeysMask.from_seqlens([1, 1], [0, 1, 8], [1, 1], device="cpu").make_paged(
            tables, 2, 4, ab.PagedBlockDiagonalGappyKeysMask), "outside its notional row"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message):
            build()


def test_device_default_and_to(monkeypatch):
    """from_seqlens puts tensors on CUDA when available, else the CPU; to() returns a new object with every
    tensor moved (sharing kept, validation not redone), or self when nothing moves."""
    assert ab._default_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ab._default_device(None) == torch.device("cuda")
    assert ab._default_device("cpu") == torch.device("cpu")
    monkeypatch.undo()
    tables = torch.tensor([[1, 0]], dtype=torch.int32)
    biases = [
        ab.BlockDiagonalMask.from_seqlens([2, 3], device="cpu"),
        ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1], 4, [3], device="cpu"),
        ab.BlockDiagonalGappyKeysMask.from_seqlens([1], [1, 5], [3], device="cpu"),
        ab.PagedBlockDiagonalCausalLocalPaddedKeysMask.from_seqlens_local([1], [3], tables, 2, 2, device="cpu"),
        ab.LowerTriangularMask().add_bias(torch.randn(1, 1, 2, 2)),
    ]
    for bias in biases:
        assert bias.to("cpu") is bias
        moved = bias.to("meta")
        assert type(moved) is type(bias) and moved is not bias
        tensors = [t for t in vars(moved).values() if isinstance(t, torch.Tensor)]
        for info in (getattr(moved, "q_seqinfo", None), getattr(moved, "k_seqinfo", None)):
            if info is not None:
                tensors += [t for t in vars(info).values() if isinstance(t, torch.Tensor)]
        assert tensors and all(t.device.type == "meta" for t in tensors)
    moved = biases[0].to("meta")
    assert moved.q_seqinfo is moved.k_seqinfo
    assert biases[3].to("meta")._max_page == 1 and biases[3].to("meta")._window_size == 2
    for dense in (ab.LowerTriangularMask(), ab.LocalAttentionFromBottomRightMask(1, 2)):
        assert dense.to("meta") is dense


def test_inplace_updates_keep_storage():
    """from_seqlens_inplace / from_seqlens_padded_inplace overwrite lists and tensors in place (for CUDA
    graphs); max_seqlen bounds them."""
    bias = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([2, 3], 6, [4, 6], device="cpu")
    q_ptr, k_ptr, q_list, k_list = (bias.q_seqinfo.seqstart.data_ptr(), bias.k_seqinfo.seqlen.data_ptr(),
                                    bias.q_seqinfo.seqstart_py, bias.k_seqinfo.seqlen_py)
    bias.q_seqinfo.from_seqlens_inplace([1, 3])
    bias.k_seqinfo.from_seqlens_padded_inplace([2, 5])
    assert bias.q_seqinfo.seqstart_py is q_list and q_list == [0, 1, 4]
    assert bias.k_seqinfo.seqlen_py is k_list and k_list == [2, 5]
    assert bias.q_seqinfo.seqstart.data_ptr() == q_ptr and bias.q_seqinfo.seqstart.tolist() == [0, 1, 4]
    assert bias.k_seqinfo.seqlen.data_ptr() == k_ptr and bias.k_seqinfo.seqlen.tolist() == [2, 5]
    assert (bias.q_seqinfo.max_seqlen, bias.k_seqinfo.max_seqlen) == (3, 6)  # the bounds stay
    expected = _blocks([1, 3], [0, 6], [2, 5], lambda i, j, nq, nk: j <= i + nk - nq, Mkv=12)
    torch.testing.assert_close(bias.materialize((4, 12)), expected)
    with pytest.raises(ValueError, match="exceed max_seqlen=3"):
        bias.q_seqinfo.from_seqlens_inplace([4, 0])
    with pytest.raises(ValueError, match="needs 2 lengths"):
        bias.q_seqinfo.from_seqlens_inplace([1])
    with pytest.raises(ValueError, match="more than kv_padding=6"):
        bias.k_seqinfo.from_seqlens_padded_inplace([7, 0])
    with pytest.raises(ValueError, match="needs 2 lengths"):
        bias.k_seqinfo.from_seqlens_padded_inplace([1, 2, 3])
    with pytest.raises(RuntimeError, match="from_seqlens_padded"):
        ab._PaddedSeqLenInfo.from_seqlens([1])
    with pytest.raises(NotImplementedError):
        ab._GappySeqInfo.from_seqlens([1])


def test_varlen_biases():
    assert ab.VARLEN_BIASES == (ab.BlockDiagonalMask, ab.BlockDiagonalGappyKeysMask, ab.BlockDiagonalPaddedKeysMask,
                                ab.PagedBlockDiagonalPaddedKeysMask, ab.PagedBlockDiagonalGappyKeysMask)
    for name in ab.__all__:
        assert hasattr(ab, name), name
