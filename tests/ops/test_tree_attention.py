"""TreeAttnMetadata and tree_attention on the CPU (split-K under Triton's interpreter, fp16/fp32, tiny sizes).

Metadata against expectations computed from the choices by other means (digit arithmetic for full trees, brute
force over tuples for any tree). tree_attention against two float64 references: the sheet's path-unrolled one
(every root-to-leaf path appended to its sequence's cache, run with BlockDiagonalCausalWithOffsetPaddedKeysMask)
and dense attention with the materialized tree mask; padded, paged (random block-table permutation) and gappy
caches, NaN in every cache row no sequence uses, random lengths (0 and full included), square and rectangular
trees, BMHK/BMGHK, shared and per-head K/V, int4/fp8 caches, every gradient, which operators run, the CPU
operators, lengths updated in place, every ValueError. ``make_case``, the references and ``check_gradients``
serve the GPU tests too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from triformers.ops import fmha
from triformers.ops import tree_attention as ta
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha import quantize
from triformers.ops.fmha import triton_splitk as sk
from triformers.ops.fmha.reference import ref_attention
from triformers.triton import _common

# (atol, rtol) against float64: fp32 differs by summation order only; fp16 inputs are exact in float64 but the
# kernels round the probabilities to fp16 before P @ V (2**-11 relative).
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3)}
TOL_GRAD = (1e-4, 1e-4)  # float32
PAGE = 16
F16_NAN, FP8_NAN = 0x7E00, 0x7F  # a NaN fp16 (both halves of a scale|shift word) and a NaN e4m3 byte

# The example of xFormers' docstring: a root with 3 children of 3 children each.
DOC_EXAMPLE = [(0,), (0, 0), (0, 1), (0, 2), (1,), (1, 0), (1, 1), (1, 2), (2,), (2, 0), (2, 1), (2, 2)]
# EAGLE's default tree (SafeAILab/EAGLE, model/choices.py: mc_sim_7b_63), 25 nodes, depth 5.
EAGLE_TREE = [
    (0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (0, 0, 0), (0, 0, 1),
    (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0), (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1),
]  # fmt: skip
FULL_TREES = [(1, 1), (1, 4), (4, 1), (3, 2), (2, 3)]  # (depth, branching)


# ---------------------------------------------------------------------------------------------------------
# Trees, independently of the module
# ---------------------------------------------------------------------------------------------------------


def nodes_of(choices) -> list[tuple[int, ...]]:
    """Node i is ``nodes_of(choices)[i]``: the root ``()`` then the choices level by level, each in order."""
    return [(), *sorted(map(tuple, choices), key=lambda c: (len(c), c))]


def tree_allowed(choices) -> torch.Tensor:
    """``[n, n]`` bool: node i sees node j iff j's path is a prefix of i's (itself and the root included)."""
    nodes = nodes_of(choices)
    number = {c: i for i, c in enumerate(nodes)}
    allowed = torch.zeros(len(nodes), len(nodes), dtype=torch.bool)
    for i, c in enumerate(nodes):
        allowed[i, [number[c[:k]] for k in range(len(c) + 1)]] = True
    return allowed


def prefix_matrix(choices) -> torch.Tensor:
    """:func:`tree_allowed` by brute force over all pairs (for the metadata tests)."""
    nodes = nodes_of(choices)
    return torch.tensor([[a[: len(b)] == b for b in nodes] for a in nodes])


def leaf_paths(choices) -> list[list[int]]:
    """The node numbers along each root-to-leaf path."""
    nodes = nodes_of(choices)
    number = {c: i for i, c in enumerate(nodes)}
    parents = {c[:-1] for c in nodes if c}
    return [[number[c[:k]] for k in range(len(c) + 1)] for c in nodes if c not in parents]


# ---------------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------------


def test_docstring_example():
    m = ta.TreeAttnMetadata.from_tree_choices(DOC_EXAMPLE)
    assert m.tree_indices.tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 4, 5, 6]
    assert m.tree_seq_position_ids.tolist() == [0, 1, 1, 1] + [2] * 9
    assert m.tree_seq_position_ids.dtype == torch.int32
    assert m.child_node_indices.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]] + [[0, 0, 0]] * 9
    assert m.num_children_per_node.tolist() == [3] * 4 + [0] * 9
    assert m.candidate_idx.tolist() == [0, 1, 2] * 4
    assert m.parent_node_indices.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert m.num_nodes_per_level.tolist() == [1, 3, 9] and m.subtree_sizes == [1, 4, 13]
    assert [x.tolist() for x in m.num_children_per_node_at_level] == [[3], [3, 3, 3], [0] * 9]
    paths = {tuple(r) for r in m.retrieval_indices.tolist()}
    assert paths == {(0, p, c) for p in (1, 2, 3) for c in range(3 * p + 1, 3 * p + 4)}
    assert m.path_lengths == [3] * 9
    assert torch.equal(m.attention_bias == 0, prefix_matrix(DOC_EXAMPLE))
    assert m.attention_bias[m.attention_bias != 0].eq(-math.inf).all()


@pytest.mark.parametrize("depth,branching", FULL_TREES)
def test_full_tree(depth, branching):
    """Full trees from digit arithmetic: node (d_1..d_l) is number ``sum_{i<l} b^i + int(d, base b)``."""
    b = branching
    choices = ta.construct_full_tree_choices(depth, b)
    m = ta.TreeAttnMetadata.from_tree_choices(choices, torch.float16)
    size = ta.get_full_tree_size(depth + 1, b)
    assert len(choices) + 1 == size == m.attention_bias.shape[0] and m.attention_bias.dtype == torch.float16

    def number(d):
        return sum(b**i for i in range(len(d))) + sum(x * b ** (len(d) - 1 - i) for i, x in enumerate(d))

    assert [number(c) for c in m.tree_choices] == list(range(1, size))
    for c in m.tree_choices:
        n = number(c)
        assert m.tree_seq_position_ids[n] == len(c)
        assert m.parent_node_indices[n - 1] == number(c[:-1])
        assert m.candidate_idx[n - 1] == c[-1]
        assert m.tree_indices[n] == 1 + (len(c) - 1) * b + c[-1]  # every level holds b candidates
    for n, c in enumerate(nodes_of(choices)):
        inner = len(c) < depth
        assert m.num_children_per_node[n] == (b if inner else 0)
        want = [number((*c, j)) - 1 for j in range(b)] if inner else [0] * b
        assert m.child_node_indices[n].tolist() == want
    leaves = digit_strings(b, depth)
    assert {tuple(r) for r in m.retrieval_indices.tolist()} == {
        tuple(number(d[:k]) for k in range(depth + 1)) for d in leaves
    }
    assert m.path_lengths == [depth + 1] * b**depth
    assert m.num_nodes_per_level.tolist() == [b**i for i in range(depth + 1)]
    assert m.subtree_sizes == [ta.get_full_tree_size(i + 1, b) for i in range(depth + 1)]
    assert [x.tolist() for x in m.num_children_per_node_at_level_cpu] == [
        [b if i < depth else 0] * b**i for i in range(depth + 1)
    ]
    assert torch.equal(m.attention_bias == 0, prefix_matrix(choices))


def digit_strings(b, depth):
    return [tuple((k // b**i) % b for i in reversed(range(depth))) for k in range(b**depth)]


@pytest.mark.parametrize(
    "choices",
    [
        EAGLE_TREE,
        DOC_EXAMPLE[::-1],
        ta.construct_tree_choices([4, 3, 2, 1]),
        [(0,), (3,), (3, 5), (3, 2), (0, 7, 1), (0, 7)],
    ],
    ids=["eagle", "shuffled", "branching-4321", "sparse-indices"],
)
def test_any_tree(choices):
    """Every field of any tree by brute force over the tuples (siblings need not be numbered 0, 1, ...)."""
    m = ta.TreeAttnMetadata.from_tree_choices(choices)
    nodes = nodes_of(choices)
    assert list(m.tree_choices) == nodes[1:]
    kids = {c: [i - 1 for i, d in enumerate(nodes) if len(d) == len(c) + 1 and d[:-1] == c] for c in nodes}
    width = max(len(k) for k in kids.values())
    assert m.child_node_indices.shape == (len(nodes), width)
    # Medusa's draft tokens: the root, then per level one candidate per child index up to the level's largest
    depth = max(map(len, nodes))
    widths = [1 + max(d[-1] for d in nodes if len(d) == lv) for lv in range(1, depth + 1)]
    tokens = [None] + [(lv + 1, x) for lv, w in enumerate(widths) for x in range(w)]
    for n, c in enumerate(nodes):
        assert m.tree_seq_position_ids[n] == len(c)
        assert m.num_children_per_node[n] == len(kids[c])
        assert m.child_node_indices[n].tolist() == (kids[c] + kids[c][-1:] * (width - len(kids[c])) or [0] * width)
        if c:
            assert m.parent_node_indices[n - 1] == nodes.index(c[:-1])
            assert m.candidate_idx[n - 1] == kids[c[:-1]].index(n - 1)
            assert m.tree_indices[n] == tokens.index((len(c), c[-1]))
    assert m.tree_indices[0] == 0
    got = [r[:length] for r, length in zip(m.retrieval_indices.tolist(), m.path_lengths)]
    assert sorted(got) == sorted(leaf_paths(choices))
    assert all(x == -1 for r, length in zip(m.retrieval_indices.tolist(), m.path_lengths) for x in r[length:])
    levels = [sum(len(c) == lv for c in nodes) for lv in range(depth + 1)]
    assert m.num_nodes_per_level.tolist() == levels == m.num_nodes_per_level_cpu.tolist()
    assert torch.equal(torch.cat(m.num_children_per_node_at_level), m.num_children_per_node)
    assert torch.equal(m.attention_bias == 0, prefix_matrix(choices))
    assert torch.equal(tree_allowed(choices), prefix_matrix(choices))  # the references' fast version


def test_root_only_tree_and_cache():
    m = ta.TreeAttnMetadata.from_tree_choices([], torch.float64)
    assert m.attention_bias.tolist() == [[0.0]] and m.retrieval_indices.tolist() == [[0]] and m.path_lengths == [1]
    assert m.child_node_indices.tolist() == [[0]] and m.parent_node_indices.numel() == 0
    assert ta.construct_full_tree_choices(0, 3) == [] and ta.get_full_tree_size(1, 5) == 1
    key = tuple(DOC_EXAMPLE)
    a = ta.TreeAttnMetadata.from_tree_choices_cached(key, torch.float16, "cpu")
    assert a is ta.TreeAttnMetadata.from_tree_choices_cached(key, torch.float16, "cpu")
    assert a.attention_bias.dtype == torch.float16 and a.tree_indices.device.type == "cpu"
    assert ta.TreeAttnMetadata.from_tree_choices_cached(key, torch.float32).attention_bias.dtype == torch.float32
    assert ta.construct_tree_choices([2, 3]) == [(0,), (1,)] + [(i, j) for i in range(2) for j in range(3)]


@pytest.mark.parametrize(
    "choices,match",
    [
        ([(0,), (0, 1, 0)], r"holds \(0, 1, 0\) but not its parent \(0, 1\)"),
        ([(0,), (1,), (0,)], r"holds \(0,\) twice"),
        ([(0,), ()], r"holds \(\); each choice is a non-empty tuple"),
        ([(0,), (0, -1)], r"holds \(0, -1\)"),
        ([(0,), "ab"], r"holds 'ab'"),
    ],
)
def test_invalid_choices(choices, match):
    with pytest.raises(ValueError, match=match):
        ta.TreeAttnMetadata.from_tree_choices(choices)


# ---------------------------------------------------------------------------------------------------------
# Inputs and references
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One tree_attention call and what the references need (float64 copies of what the kernels read)."""

    choices: list
    q: torch.Tensor
    spec_k: torch.Tensor
    spec_v: torch.Tensor
    cache_k: torch.Tensor
    cache_v: torch.Tensor
    spec_bias: torch.Tensor
    prefix_bias: object
    q_full64: torch.Tensor  # [B, Tkv, G, H, D]: queries of every node
    spec_k64: torch.Tensor  # [B, Tkv, G, H, D]
    spec_v64: torch.Tensor
    cache_k64: torch.Tensor  # [R, G, Hk, D]: the cache rows, NaN where unused
    cache_v64: torch.Tensor
    rows: list  # rows[b]: int64 tensor, the cache rows of sequence b's keys in order
    Mk: int
    bmhk: bool

    def args(self):
        return (self.q, self.spec_k, self.spec_v, self.cache_k, self.cache_v, self.spec_bias, self.prefix_bias)


def make_case(
    choices,
    B,
    G,
    *,
    H=2,
    D=32,
    Mk=48,
    square=True,
    paged=False,
    dtype=torch.float16,
    kv_lens=None,
    shared_kv=True,
    bmhk=False,
    page_size=PAGE,
    device="cpu",
    seed=0,
) -> Case:
    """Random inputs on ``device`` (every cache row no sequence uses is NaN); ``kv_lens`` default random in
    ``[0, Mk]``; K/V shared over the H query heads of each group (stride 0) when ``shared_kv``."""
    gen = torch.Generator(device).manual_seed(seed)
    Tkv = len(choices) + 1
    Tq = Tkv if square else max(len(choices) // 2, 1)
    Hk = 1 if shared_kv else H

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    q_full = rnd(B, Tkv, G, H, D)
    spec_k, spec_v = rnd(B, Tkv, G, Hk, D), rnd(B, Tkv, G, Hk, D)
    if kv_lens is None:
        kv_lens = torch.randint(0, Mk + 1, (B,), generator=gen, device=device).tolist()
    padded = ab.BlockDiagonalPaddedKeysMask.from_seqlens([Tq] * B, Mk, kv_lens, device=device)
    t = [torch.arange(n, device=device) for n in kv_lens]
    if paged:  # every logical page mapped to a random physical one, two spare pages nobody maps
        per_row, spare, ps = Mk // page_size, 2, page_size
        perm = torch.randperm(B * per_row + spare, generator=gen, device=device)
        table = perm[: B * per_row].view(B, per_row)
        rows = [table[b, t[b] // ps] * ps + t[b] % ps for b in range(B)]
        num_rows, cache_batch = (B * per_row + spare) * ps, 1
        bias = padded.make_paged(table.to(torch.int32), ps, ab.PagedBlockDiagonalPaddedKeysMask)
    else:
        rows = [b * Mk + t[b] for b in range(B)]
        num_rows, cache_batch, bias = B * Mk, B, padded
    ck, cv = rnd(num_rows, G, Hk, D), rnd(num_rows, G, Hk, D)
    unused = torch.ones(num_rows, dtype=torch.bool, device=device)
    unused[torch.cat(rows)] = False
    ck[unused], cv[unused] = math.nan, math.nan

    def as_cache(x):
        return x.view(cache_batch, num_rows // cache_batch, G, Hk, D).expand(-1, -1, -1, H, -1)

    def spec(x):
        return x.expand(B, Tkv, G, H, D)

    meta = ta.TreeAttnMetadata.from_tree_choices(choices, dtype, device)
    inputs = [q_full[:, -Tq:], spec(spec_k), spec(spec_v), as_cache(ck), as_cache(cv)]
    if bmhk:
        assert G == 1
        inputs = [x[:, :, 0] for x in inputs]
    return Case(
        choices,
        *inputs,
        meta.attention_bias[-Tq:],
        bias,
        q_full.double(),
        spec(spec_k.double()),
        spec(spec_v.double()),
        ck.double(),
        cv.double(),
        rows,
        Mk,
        bmhk,
    )


def dense_reference(case: Case, cache_k64=None, cache_v64=None) -> torch.Tensor:
    """``[B, Tq, G, H, D]`` float64: each query over its sequence's cache rows and its tree ancestors."""
    ck = case.cache_k64 if cache_k64 is None else cache_k64
    cv = case.cache_v64 if cache_v64 is None else cache_v64
    B, Tkv, G, H, D = case.q_full64.shape
    Tq = case.spec_bias.shape[0]
    allowed = tree_allowed(case.choices)[-Tq:].to(ck.device)
    outs = []
    for b in range(B):
        k = torch.cat([ck[case.rows[b]].expand(-1, G, H, D), case.spec_k64[b]])
        v = torch.cat([cv[case.rows[b]].expand(-1, G, H, D), case.spec_v64[b]])
        s = torch.einsum("tghd,nghd->ghtn", case.q_full64[b, -Tq:], k) * D**-0.5
        visible = torch.cat([torch.ones(Tq, len(case.rows[b]), dtype=torch.bool, device=ck.device), allowed], 1)
        p = s.masked_fill(~visible, -math.inf).softmax(-1)
        outs.append(torch.einsum("ghtn,nghd->tghd", p, v))
    return torch.stack(outs)


def path_reference(case: Case) -> torch.Tensor:
    """``[B, Tq, G, H, D]`` float64, the sheet's reference: every root-to-leaf path appended to each sequence's
    cache, its nodes as queries of BlockDiagonalCausalWithOffsetPaddedKeysMask (each sees the cache and the path
    up to itself); every node lies on some path."""
    B, Tkv, G, H, D = case.q_full64.shape
    out = torch.full_like(case.q_full64, math.nan)
    for path in leaf_paths(case.choices):
        L, pad = len(path), case.Mk + len(path)
        k, v = (torch.zeros(B, pad, G, H, D, dtype=torch.float64) for _ in range(2))
        for b in range(B):
            n = len(case.rows[b])
            k[b, :n], v[b, :n] = case.cache_k64[case.rows[b]].cpu(), case.cache_v64[case.rows[b]].cpu()
            k[b, n : n + L], v[b, n : n + L] = case.spec_k64[b, path].cpu(), case.spec_v64[b, path].cpu()
        lens = [len(r) + L for r in case.rows]
        bias = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([L] * B, pad, lens, device="cpu")
        q = case.q_full64[:, path].cpu().reshape(1, B * L, G, H, D)
        o, _ = ref_attention(q, k.view(1, B * pad, G, H, D), v.view(1, B * pad, G, H, D), bias)
        out[:, path] = o.view(B, L, G, H, D).to(out.device)
    return out[:, -case.spec_bias.shape[0] :]


def check(out, case: Case, ref, dtype):
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(
        out.unsqueeze(2) if case.bmhk else out, ref.to(out.device), atol=atol, rtol=rtol, check_dtype=False
    )


# ---------------------------------------------------------------------------------------------------------
# tree_attention
# ---------------------------------------------------------------------------------------------------------

needs_splitk = pytest.mark.skipif(not sk.FwOp.is_available(), reason="triton is not installed")


def spy_splitk(monkeypatch) -> list:
    """The split-K operators that run from now on."""
    ran = []
    apply = sk.FwOp.apply.__func__
    monkeypatch.setattr(sk.FwOp, "apply", classmethod(lambda op, inp, **kw: ran.append(op) or apply(op, inp, **kw)))
    return ran


def expected_splitk_runs(case: Case) -> list:
    """What runs on split-K by default: the prefix where select_prefix_op chooses it (else the dispatcher's
    operator), the suffix if split-K takes a tensor bias (else the dispatcher's)."""
    B, Tkv, G = case.q_full64.shape[:3]
    prefix = ta.select_prefix_op(B, G, Tkv, False, case.prefix_bias, case.cache_k.dtype) is not None
    suffix = torch.Tensor in sk.FwOp.SUPPORTED_ATTN_BIAS_TYPES
    return [sk.FwOp] * (prefix + suffix)


@needs_splitk
@pytest.mark.parametrize(
    "choices,B,G,square,paged,dtype,kw",
    [
        (DOC_EXAMPLE, 1, 1, True, False, torch.float16, {"bmhk": True, "kv_lens": [29]}),
        (ta.construct_full_tree_choices(2, 3), 3, 2, False, True, torch.float16, {"kv_lens": [0, 48, 17]}),
        (ta.construct_full_tree_choices(3, 2), 3, 1, True, True, torch.float32, {"shared_kv": False}),
        (ta.construct_full_tree_choices(1, 4), 1, 2, False, False, torch.float32, {"kv_lens": [48]}),
        (ta.construct_full_tree_choices(4, 1), 3, 2, True, False, torch.float16, {}),
        (ta.construct_full_tree_choices(1, 1), 3, 1, False, True, torch.float16, {"bmhk": True}),
        (EAGLE_TREE, 3, 2, False, False, torch.float32, {"shared_kv": False, "D": 24, "Mk": 37}),
        (ta.construct_full_tree_choices(6, 2), 3, 2, False, True, torch.float32, {}),
    ],
    ids=["doc-b1-bmhk", "full23-rect-paged", "full32-paged-mha", "full14-rect", "chain", "full11-rect-paged",
         "eagle-rect-mha", "full62-dispatcher"],
)  # fmt: skip
def test_tree_attention(choices, B, G, square, paged, dtype, kw, monkeypatch):
    case = make_case(choices, B, G, square=square, paged=paged, dtype=dtype, seed=B * 7 + G, **kw)
    ran = spy_splitk(monkeypatch)
    out = ta.tree_attention(*case.args())
    assert ran == expected_splitk_runs(case)
    check(out, case, path_reference(case), dtype)
    check(out, case, dense_reference(case), dtype)


@needs_splitk
@pytest.mark.parametrize("paged", [False, True], ids=["padded", "paged"])
@pytest.mark.parametrize("square", [True, False], ids=["square", "rect"])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("B", [1, 3])
def test_grid(B, G, square, paged):
    """The sheet's grid (B, G, square/rectangular, padded/paged) on a full binary tree of depth 3."""
    case = make_case(ta.construct_full_tree_choices(3, 2), B, G, square=square, paged=paged, seed=B + 5 * G)
    check(ta.tree_attention(*case.args()), case, dense_reference(case), torch.float16)


@needs_splitk
def test_gappy_prefix():
    """A gappy cache: each sequence's keys anywhere in the packed rows (here overlapping another's slot)."""
    B, G, Mk = 3, 2, 40
    case = make_case(DOC_EXAMPLE, B, G, Mk=Mk, dtype=torch.float32, seed=11)
    starts, lens = [70, 3, 41], [9, 30, 0]
    Tq, H, D = case.q.shape[1], case.q.shape[3], case.q.shape[4]
    case.prefix_bias = ab.BlockDiagonalGappyKeysMask.from_seqlens([Tq] * B, [*starts, B * Mk], lens, device="cpu")
    case.rows = [torch.arange(s, s + n) for s, n in zip(starts, lens)]
    used = torch.cat(case.rows)
    caches = []
    for _ in range(2):  # NaN in every row outside the gaps' ranges
        x = torch.full((B * Mk, G, 1, D), math.nan)
        x[used] = torch.randn(len(used), G, 1, D)
        caches.append(x)
    case.cache_k64, case.cache_v64 = (x.double() for x in caches)
    case.cache_k, case.cache_v = (x.view(B, Mk, G, 1, D).expand(-1, -1, -1, H, -1) for x in caches)
    check(ta.tree_attention(*case.args()), case, dense_reference(case), torch.float32)


@needs_splitk
def test_cpu_operators_and_fallback(monkeypatch):
    """The operators' CPU paths give the same: chunked on both parts; without Triton's interpreter the default
    (split-K) falls back to the dispatcher without launching a kernel."""
    case = make_case(ta.construct_full_tree_choices(2, 2), 3, 2, square=False, paged=True, D=40, dtype=torch.float32)
    ref = dense_reference(case)
    chunked = fmha.chunked.FwOp
    check(ta.tree_attention(*case.args(), prefix_op=chunked, suffix_op=chunked), case, ref, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def no_kernel(*args, **kwargs):
        raise AssertionError("split-K ran without Triton's interpreter")

    monkeypatch.setattr(sk.FwOp, "apply", classmethod(no_kernel))
    check(ta.tree_attention(*case.args()), case, ref, torch.float32)


@needs_splitk
def test_length_update_in_place():
    """The CUDA-graph contract: biases built once, the cache lengths updated in the bias's tensor (its Python
    lists stale): the split-K prefix reads the new lengths."""
    case = make_case(DOC_EXAMPLE, 2, 1, kv_lens=[40, 9], dtype=torch.float32)
    ta.tree_attention(*case.args(), prefix_op=sk.FwOp)
    case.prefix_bias.k_seqinfo.seqlen.copy_(torch.tensor([13, 0], dtype=torch.int32))
    case.rows = [case.rows[0][:13], case.rows[1][:0]]
    check(ta.tree_attention(*case.args(), prefix_op=sk.FwOp), case, dense_reference(case), torch.float32)


def check_gradients(case: Case, tol_out, tol_grad) -> None:
    """Gradients of q, spec_k, spec_v, cache_k, cache_v (per-head, float caches) against float64 autograd of
    :func:`dense_reference`; cache rows nobody reads (NaN) get 0."""
    inputs = (case.q, case.spec_k, case.spec_v, case.cache_k, case.cache_v)
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = ta.tree_attention(*leaves, case.spec_bias, case.prefix_bias)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad)
    q64, sk64, sv64, ck64, cv64 = (x.detach().double().nan_to_num().requires_grad_() for x in leaves)
    Tq = case.spec_bias.shape[0]
    case.q_full64 = torch.cat([case.q_full64[:, :-Tq], q64], 1)
    case.spec_k64, case.spec_v64 = sk64, sv64
    ref = dense_reference(case, ck64.flatten(0, 1), cv64.flatten(0, 1))
    ref_grads = torch.autograd.grad(ref, (q64, sk64, sv64, ck64, cv64), grad.double())
    torch.testing.assert_close(out.double(), ref, atol=tol_out[0], rtol=tol_out[1])
    for name, g, r in zip(("q", "spec_k", "spec_v", "cache_k", "cache_v"), grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=tol_grad[0], rtol=tol_grad[1], msg=lambda m, n=name: f"d{n} {m}")
    unused = torch.ones(case.cache_k.shape[0] * case.cache_k.shape[1], dtype=torch.bool, device=out.device)
    unused[torch.cat(case.rows)] = False
    assert grads[3].flatten(0, 1)[unused].eq(0).all() and grads[4].flatten(0, 1)[unused].eq(0).all()


@needs_splitk
@pytest.mark.parametrize("paged", [False, True])
def test_gradients(paged):
    """Float caches are differentiable: the split-K prefix's backward recomputes on the dispatcher's operator."""
    choices = ta.construct_full_tree_choices(2, 2)
    kw = dict(D=16, Mk=32, paged=paged, square=paged, kv_lens=[5, 32], dtype=torch.float32, shared_kv=False)
    check_gradients(make_case(choices, 2, 2, **kw), TOL[torch.float32], TOL_GRAD)


def _poison(words, scales, unused, kind):
    """NaN coefficients and garbage data in the rows nobody reads."""
    if kind == "int4":
        words[unused, ..., :1] = F16_NAN | (F16_NAN << 16)
        words[unused, ..., 1:] = torch.randint(
            -(2**31), 2**31 - 1, words[unused, ..., 1:].shape, dtype=torch.int32, device=words.device
        )
    else:
        words[unused] = FP8_NAN * 0x01010101
        scales[unused] = F16_NAN | (F16_NAN << 16)


@needs_splitk
@pytest.mark.parametrize(
    "kind,groups,paged,bmhk",
    [("int4", 1, True, False), ("int4", 4, False, True), ("fp8", 1, True, False), ("fp8-bytes", 1, False, True)],
)
@pytest.mark.filterwarnings("ignore:tree_attention.autotune=True.:UserWarning")
def test_quantized_cache(kind, groups, paged, bmhk, monkeypatch):
    """int4 (row- and group-wise) and fp8 caches (int32 words, uint8 bytes) against their dequantized values."""
    G = 1 if bmhk else 2
    case = make_case(DOC_EXAMPLE, 3, G, paged=paged, bmhk=bmhk, kv_lens=[31, 0, 48], dtype=torch.float16)
    unused = case.cache_k64.isnan().flatten(1).any(1)
    k, v = (x.nan_to_num().float() for x in (case.cache_k64, case.cache_v64))  # [R, G, 1, D]
    if kind == "int4":
        (kq, ks), (vq, vs) = ((quantize.quantize_kv_int4(x, groups), None) for x in (k, v))
        case.cache_k64, case.cache_v64 = (quantize.dequantize_kv_int4(x, groups, torch.float64) for x in (kq, vq))
    else:
        (kq, ks), (vq, vs) = quantize.quantize_kv_fp8(k), quantize.quantize_kv_fp8(v)
        case.cache_k64, case.cache_v64 = (
            quantize.dequantize_kv_fp8(x, s, torch.float64) for x, s in ((kq, ks), (vq, vs))
        )
    _poison(kq, ks, unused, kind)
    _poison(vq, vs, unused, kind)
    shape = case.cache_k.shape[:2]
    H = case.q.shape[-2]

    def as_cache(x, squeeze=bmhk):
        x = x.view(*shape, *x.shape[1:]).expand(*shape, G, H, *x.shape[3:])
        return x[:, :, 0] if squeeze else x

    scales = None if ks is None else (as_cache(ks), as_cache(vs))
    ck, cv = as_cache(kq), as_cache(vq)
    if kind == "fp8-bytes":
        ck, cv = (as_cache(x.view(torch.uint8)) for x in (kq, vq))
    ran = spy_splitk(monkeypatch)
    autotune = groups > 1  # the int4 variant of the operator select_prefix_op chose keeps its class
    out = ta.tree_attention(
        case.q,
        case.spec_k,
        case.spec_v,
        ck,
        cv,
        case.spec_bias,
        case.prefix_bias,
        autotune=autotune,
        quantized_kv_scales=scales,
    )
    assert len(ran) == 1 and ran[0].NUM_GROUPS == groups and issubclass(ran[0], ta.SplitKAutotune) == autotune
    if groups > 1:  # group-wise int4 is dequantized to fp16 before the products (K and V rounded)
        torch.testing.assert_close(out.unsqueeze(2).double(), dense_reference(case), atol=4e-3, rtol=4e-3)
    else:
        check(out, case, dense_reference(case), torch.float16)


@needs_splitk
def test_autotune(monkeypatch):
    """autotune=True selects SplitKAutotune; where split-K does not autotune it says so once."""
    monkeypatch.setattr(_common, "_warned", set())
    case = make_case(DOC_EXAMPLE, 1, 1, kv_lens=[20], dtype=torch.float32)
    assert issubclass(ta.SplitKAutotune, sk.FwOp) and ta.SplitKAutotune.AUTOTUNE
    if hasattr(sk.FwOp, "AUTOTUNE"):
        out = ta.tree_attention(*case.args(), autotune=True)
    else:
        with pytest.warns(UserWarning, match="does not autotune"):
            out = ta.tree_attention(*case.args(), autotune=True)
    check(out, case, dense_reference(case), torch.float32)


def test_prefix_operator_choice():
    bias = ab.BlockDiagonalPaddedKeysMask.from_seqlens([2], 8, [3], device="cpu")
    use = ta.use_triton_splitk_for_prefix
    assert use(128, 1, 64) and use(64, 2, 64) and not use(129, 1, 64) and not use(16, 1, 65)
    assert use(3, 1, 99) and not use(3, 1, 100) and not use(2, 2, 99) and use(1, 1, 5000)
    select = ta.select_prefix_op
    assert select(16, 1, 65, False, bias, torch.float16) is None  # the dispatcher's choice
    assert select(16, 1, 64, False, bias, torch.float16) is sk.FwOp
    assert select(64, 4, 300, False, bias, torch.float16) is sk.FwOp  # where xFormers runs FA3
    assert select(16, 1, 65, True, bias, torch.int32) is ta.SplitKAutotune  # quantized caches
    assert select(16, 1, 65, False, bias, torch.uint8) is sk.FwOp


def _error_cases():
    case = make_case(DOC_EXAMPLE, 2, 1, kv_lens=[3, 9], Mk=16, D=16, dtype=torch.float32)
    q, sk_, sv, ck, cv, sb, pb = case.args()
    big = torch.randn(2, 20, 1, 2, 16)
    kq, ks = quantize.quantize_kv_fp8(ck.contiguous())
    return [
        ((q[0], sk_, sv, ck, cv, sb, pb), r"all BMHK \[B, M, H, D\] or all BMGHK.*q.shape=\(13, 1, 2, 16\)"),
        ((q, sk_, sv, ck, cv, sb[0], pb), r"spec_attn_bias must be the \[tree_size_q, tree_size_kv\].*\(13,\)"),
        ((q[:, :4], sk_, sv, ck, cv, sb[:, :3], pb), r"spec_attn_bias.shape=\(13, 3\) but q.shape=\(2, 4, 1, 2, 16\)"),
        ((q, sk_[:, :5], sv, ck, cv, sb, pb), r"spec_k.shape=\(2, 5, 1, 2, 16\), expected \(2, 13, 1, 2, 16\)"),
        ((q, sk_, sv.half(), ck, cv, sb, pb), r"spec_v is torch.float16 on cpu, expected torch.float32 on cpu"),
        ((q, sk_, sv, kq, cv, sb, pb), r"cache_v is torch.float32 on cpu, expected torch.int32"),
        ((q, sk_, sv, ck[..., :1, :], cv[..., :1, :], sb, pb), r"with the heads of q"),
        ((q, sk_, sv, ck[..., :8], cv[..., :8], sb, pb), r"another head dim"),
        ((q, sk_, sv, ck, cv, sb, None), r"prefix_attn_bias is NoneType; it must be a KV-cache bias"),
        ((q[:1], sk_[:1], sv[:1], ck, cv, sb, pb), r"query lengths \[13, 13\] but q holds B=1 sequences"),
        ((q, sk_, sv, ck[:1], cv[:1], sb, pb), r"expected B=2 rows"),
        ((q, sk_, sv, big[:, :16], big[:, :16], sb, pb), r"cannot be read as one sequence of 32 keys without a copy"),
        ((q, sk_, sv, ck[:, :12], cv[:, :12], sb, pb), r"kv_padding=16 but cache_k.shape=\(2, 12, 1, 2, 16\)"),
        ((q, sk_, sv, kq.view(torch.uint8), kq.view(torch.uint8), sb, pb), r"is an fp8 cache: pass its quantized"),
        ((q, sk_, sv, ck, cv, sb, pb, None, None, False, (ks, ks)), r"quantized_kv_scales are given but cache_k"),
        ((q, sk_, sv, kq, kq, sb, pb, None, None, False, (ks, ks[:, :3])), r"int32 of cache_k.shape\[:-1\] = \(2, 16"),
    ]


@needs_splitk
def test_errors():
    for args, match in _error_cases():
        with pytest.raises(ValueError, match=match):
            ta.tree_attention(*args)
    case = make_case(DOC_EXAMPLE, 1, 1, kv_lens=[3], Mk=16, D=16, dtype=torch.float32)
    kq, ks = quantize.quantize_kv_fp8(case.cache_k.contiguous())
    with pytest.raises(ValueError, match="no gradient through a quantized cache"):
        ta.tree_attention(
            case.q.requires_grad_(),
            case.spec_k,
            case.spec_v,
            kq,
            kq,
            case.spec_bias,
            case.prefix_bias,
            quantized_kv_scales=(ks, ks),
        )
    paged = make_case(DOC_EXAMPLE, 2, 1, kv_lens=[3, 9], Mk=16, D=16, paged=True, dtype=torch.float32)
    two_rows = [x.expand(2, -1, -1, -1, -1) for x in (paged.cache_k, paged.cache_v)]
    with pytest.raises(ValueError, match=r"a paged cache is one row of pages"):
        ta.tree_attention(*paged.args()[:3], *two_rows, paged.spec_bias, paged.prefix_bias)
