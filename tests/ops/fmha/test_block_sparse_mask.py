"""BlockSparseMask: its definition (materialize), the tile tables operators read, and memory_efficient_attention
on the Triton kernels (CPU tensors under Triton's interpreter) and the chunked operator against a float64
dense reference: output, lse and every gradient; odd lengths, blocks finer and coarser than the tiles, per-head
and shared layouts, BMGHK with shared K/V heads, causal, empty rows, empty and full layouts; bad inputs."""

import math

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha import triton as triton_op
from triformers.ops.fmha._mask import block_sparse_spec

TRITON = (fmha.triton.FwOp, fmha.triton.BwOp)
CHUNKED = (fmha.chunked.FwOp, fmha.chunked.BwOp)
OPS = {"triton": TRITON, "chunked": CHUNKED}
# float32: the kernels' float32 accumulation against float64; float16: inputs rounded, P and dS rounded to half
# before their products (as every FlashAttention kernel does)
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3}
GRAD_ATOL = {torch.float32: 1e-4, torch.float16: 1e-2}

needs_triton = pytest.mark.skipif(not triton_op.FwOp.is_available(), reason="triton is not installed")


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.double().movedim(1, -2)  # [B, M, (G,) H, K] -> [B, (G,) H, M, K]


def reference(q, k, v, mask: ab.BlockSparseMask, scale=None):
    """float64 ``(out, lse)`` from the materialized mask; rows that see no key give 0 and -inf."""
    qd, kd, vd = _heads_first(q), _heads_first(k), _heads_first(v)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = qd @ kd.transpose(-1, -2) * scale
    ok = mask.materialize(s.shape, dtype=torch.float64) == 0
    p = torch.softmax(torch.where(ok, s, -1e300), dim=-1) * ok
    lse = torch.logsumexp(torch.where(ok, s, -math.inf), dim=-1)
    return (p @ vd).movedim(-2, 1), lse


def _inputs(fmt, B, Mq, Mkv, G, H, K, Kv, dtype, gqa=False):
    shape = (B, Mq, G, H) if fmt == "BMGHK" else (B, Mq, H)
    q = torch.randn(*shape, K, dtype=dtype)
    kv_heads = shape[2:]
    if gqa:  # one K/V head per group, expanded over the group's query heads (read in place)
        k = torch.randn(B, Mkv, G, 1, K, dtype=dtype).expand(B, Mkv, G, H, K)
        v = torch.randn(B, Mkv, G, 1, Kv, dtype=dtype).expand(B, Mkv, G, H, Kv)
    else:
        k = torch.randn(B, Mkv, *kv_heads, K, dtype=dtype)
        v = torch.randn(B, Mkv, *kv_heads, Kv, dtype=dtype)
    return [t.requires_grad_() if t.is_leaf else t for t in (q, k, v)]


def _leaves(tensors):
    return [t if t.is_leaf else t._base for t in tensors]


def _layout(heads, nq, nk, density=0.5):
    layout = torch.rand(heads, nq, nk) < density
    layout[:, :, 0] |= torch.rand(heads, nq) < 0.5  # a mix of rows with and without the first block
    return layout


# (block_size, Mq, Mkv, layout heads: "per" / "shared", causal, fmt); blocks of 16-128 against 16x16 tiles under
# the interpreter, lengths that are not multiples of the blocks (the last block row and column partial)
CASES = [
    (16, 37, 53, "per", False, "BMHK"),
    (32, 70, 45, "shared", True, "BMHK"),
    (48, 61, 100, "per", True, "BMHK"),
    (64, 67, 131, "shared", False, "BMGHK"),
    (128, 150, 133, "per", False, "BMHK"),
    ((16, 64), 41, 150, "per", True, "BMGHK"),
    ((128, 32), 133, 77, "shared", True, "BMHK"),
]


def _check(op, dtype, case, B=1, G=2, H=2):
    """Output, lse and dQ/dK/dV of ``op`` against :func:`reference` on one :data:`CASES` entry (a query block
    of layout head 0 sees nothing)."""
    block, Mq, Mkv, heads, causal, fmt = case
    K, Kv = 24, 16
    q, k, v = _inputs(fmt, B, Mq, Mkv, G, H, K, Kv, dtype)
    bq, bk = (block, block) if isinstance(block, int) else block
    n_heads = (G * H if fmt == "BMGHK" else H) if heads == "per" else 1
    layout = _layout(n_heads, -(-Mq // bq), -(-Mkv // bk))
    layout[0, 1] = False  # a query block that sees nothing
    mask = ab.BlockSparseMask(layout, block, causal=causal)
    # the partial API returns the lse and is differentiable (its lse unused here: the usual backward)
    out, lse = fmha.memory_efficient_attention_partial(q, k, v, mask, op=OPS[op], output_dtype=dtype)
    ref, ref_lse = reference(q, k, v, mask)
    torch.testing.assert_close(out.double(), ref, atol=ATOL[dtype], rtol=ATOL[dtype])
    lse_ref = ref_lse.reshape(lse.shape)
    assert torch.isneginf(lse_ref).any()
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-4, rtol=1e-4)  # -inf where the row sees nothing
    g = torch.randn_like(out)
    leaves = _leaves((q, k, v))
    grads = torch.autograd.grad(out, leaves, g)
    ref_grads = torch.autograd.grad(ref, leaves, g.double())
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b.double(), atol=GRAD_ATOL[dtype], rtol=GRAD_ATOL[dtype])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
@pytest.mark.parametrize("op", ["triton", "chunked"])
def test_matches_dense_reference(op, case):
    if op == "triton" and not triton_op.FwOp.is_available():
        pytest.skip("triton is not installed")
    _check(op, torch.float32, case)


@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=["32-causal", "16x64-causal-BMGHK"])
@pytest.mark.parametrize("op", ["triton", "chunked"])
def test_matches_dense_reference_half(op, case):
    if op == "triton" and not triton_op.FwOp.is_available():
        pytest.skip("triton is not installed")
    _check(op, torch.float16, case, G=1)


@needs_triton
@pytest.mark.parametrize("layout_kind", ["empty", "full", "diagonal"])
@pytest.mark.parametrize("causal", [False, True])
def test_special_layouts(layout_kind, causal):
    """An empty layout gives output 0, lse -inf and zero gradients (never NaN); a full one equals the dense
    (causal) attention; a block diagonal one equals per-block attention, on both operators."""
    B, M, H, K = 1, 45, 2, 16
    q, k, v = _inputs("BMHK", B, M, M, 1, H, K, K, torch.float32)
    n = -(-M // 16)
    layout = {"empty": torch.zeros(1, n, n), "full": torch.ones(1, n, n), "diagonal": torch.eye(n)[None]}[layout_kind]
    mask = ab.BlockSparseMask(layout.to(torch.int64), 16, causal=causal)
    ref, ref_lse = reference(q, k, v, mask)
    ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref), retain_graph=True)
    for op in (TRITON, CHUNKED):
        out, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, mask, op=op[0])
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
        out = fmha.memory_efficient_attention(q, k, v, mask, op=op)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)
    if layout_kind == "empty":
        assert (out == 0).all() and torch.isneginf(lse).all()
    if layout_kind == "full":
        dense = fmha.memory_efficient_attention(q, k, v, ab.LowerTriangularMask() if causal else None, op=CHUNKED)
        torch.testing.assert_close(out, dense, atol=2e-5, rtol=2e-5)


@needs_triton
@pytest.mark.parametrize("op", ["triton", "chunked"])
def test_gqa_shared_kv_heads_per_head_layout(op):
    """BMGHK with one K/V head per group (expanded): the dK/dV kernel (the chunked operator: its per-head
    gathers) visits each query head's own tiles, and the group's heads add into the shared K/V gradient."""
    q, k, v = _inputs("BMGHK", 1, 50, 70, 2, 3, 16, 16, torch.float32, gqa=True)
    mask = ab.BlockSparseMask(_layout(6, 4, 3, density=0.4), (16, 32))
    out = fmha.memory_efficient_attention(q, k, v, mask, op=OPS[op])
    ref, _ = reference(q, k, v, mask)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    g = torch.randn_like(out)
    leaves = _leaves((q, k, v))
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g.double())):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("op", ["triton", "chunked"])
def test_blocks_a_head_hides_are_never_read(op):
    """NaN in the keys and values of a block that head 0 hides (and head 1 reads): head 0's output and
    gradients stay finite and exact; the chunked operator's per-head gathers pad head 0's shorter block list
    with a zero row, not with the NaN rows."""
    q, k, v = _inputs("BMHK", 1, 32, 48, 1, 2, 16, 16, torch.float32)
    layout = torch.zeros(2, 2, 3, dtype=torch.bool)
    layout[0, :, 0] = True  # head 0: key block 0 only
    layout[1] = True  # head 1: every block
    mask = ab.BlockSparseMask(layout, 16)
    clean = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    k_nan, v_nan = (t.detach().clone() for t in (k, v))
    k_nan[:, 32:, 0], v_nan[:, 32:, 0] = float("nan"), float("nan")  # head 0's own K/V rows of key block 2
    dirty = [clean[0], k_nan.requires_grad_(), v_nan.requires_grad_()]
    out = fmha.memory_efficient_attention(*dirty, mask, op=OPS[op])
    ref, _ = reference(*clean, mask)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, dirty, g)
    ref_grads = torch.autograd.grad(ref, clean, g.double())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


def test_chunked_reads_each_heads_own_blocks():
    """A per-head layout in the chunked operator: each head gathers its own key blocks (no union over heads),
    so its work follows the layout's non-zero blocks."""
    from triformers.ops.fmha._chunk_tiles import HeadRows, Tiles
    from triformers.ops.fmha._mask import mask_spec

    heads, nb, block = 4, 8, 16
    layout = torch.zeros(heads, nb, nb, dtype=torch.bool)
    for h in range(heads):
        layout[h, :, h] = True  # head h: key block h, for every query block
    spec = mask_spec(ab.BlockSparseMask(layout, block))
    tiles = Tiles(spec, nb * block, nb * block, 64, 512, torch.device("cpu"), (heads, 1))
    chunks = [keys for _, q0, q1 in tiles.query_chunks() for keys, _ in tiles.key_chunks(None, q0, q1)]
    assert chunks and all(isinstance(keys, HeadRows) for keys in chunks)
    for keys in chunks:  # one block of rows per head, its own
        assert keys.rows.shape == (heads, block) and keys.pad is None
        assert torch.equal(keys.rows // block, torch.arange(heads)[:, None].expand(heads, block))


@needs_triton
def test_dropout_identical_to_chunked():
    """Both operators draw the same Philox stream over the same visited pairs."""
    q, k, v = _inputs("BMHK", 2, 40, 52, 1, 2, 16, 16, torch.float32)
    mask = ab.BlockSparseMask(_layout(2, 3, 4), 16, causal=True)
    outs = []
    for op in (TRITON, CHUNKED):
        torch.manual_seed(7)
        out = fmha.memory_efficient_attention(q, k, v, mask, p=0.3, op=op)
        outs.append((out, torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=2e-5, rtol=1e-4)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_dispatch_runs_on_cpu():
    """memory_efficient_attention picks an operator for it by itself (the chunked operator on the CPU)."""
    q, k, v = _inputs("BMHK", 1, 33, 33, 1, 2, 8, 8, torch.float32)
    mask = ab.BlockSparseMask(_layout(1, 3, 3), 16)
    out = fmha.memory_efficient_attention(q, k, v, mask)
    torch.testing.assert_close(out.double(), reference(q, k, v, mask)[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("block", [16, (16, 32), (32, 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_materialize_matches_definition(block, causal):
    """0 where layout[h, i // bq, j // bk] (and j <= i when causal), -inf elsewhere; per-head layouts over
    [B, H, ...] and [B, G, H, ...]."""
    bq, bk = (block, block) if isinstance(block, int) else block
    Mq, Mkv = 35, 50
    layout = _layout(6, -(-Mq // bq), -(-Mkv // bk))
    mask = ab.BlockSparseMask(layout, block, causal=causal)
    got = mask.materialize((2, 2, 3, Mq, Mkv), dtype=torch.float64)
    for h in range(6):
        for i in range(Mq):
            for j in range(0, Mkv, 7):
                allowed = bool(layout[h, i // bq, j // bk]) and (j <= i or not causal)
                assert got[1, h // 3, h % 3, i, j] == (0.0 if allowed else -math.inf)
    shared = ab.BlockSparseMask(layout[:1], block, causal=causal).materialize((2, 6, Mq, Mkv))
    assert torch.equal(shared[1, 4], got[0, 0, 0].float())


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_tile_tables(transposed, causal):
    """The tile table lists every tile holding an allowed pair, boundary tiles (some pair masked or past the
    edge) before full ones, against a brute-force count on the materialized mask. The full tiles are exact;
    causal tiles on the diagonal may be listed as boundary tiles without an allowed pair (masked: harmless)."""
    bq, bk, Mq, Mkv, tq, tk = 16, 48, 70, 101, 32, 16
    layout = _layout(2, -(-Mq // bq), -(-Mkv // bk))
    spec = block_sparse_spec(layout, bq, bk)
    table = spec.table(Mq, Mkv, tq, tk, causal, transposed=transposed)
    ok = ab.BlockSparseMask(layout, (bq, bk), causal=causal).materialize((1, 2, Mq, Mkv))[0] == 0
    nq, nk = -(-Mq // tq), -(-Mkv // tk)
    padded = torch.zeros(2, nq * tq, nk * tk, dtype=torch.bool)
    padded[:, :Mq, :Mkv] = ok
    tiles = padded.view(2, nq, tq, nk, tk)
    some, every = tiles.any(4).any(2), tiles.all(4).all(2)
    if transposed:
        some, every = some.transpose(1, 2), every.transpose(1, 2)
    offsets, full_start, cols = table.offsets.tolist(), table.full_start.tolist(), table.cols.tolist()
    for h in range(2):
        for r in range(some.shape[1]):
            lo, mid, hi = offsets[h][r], full_start[h][r], offsets[h][r + 1]
            assert cols[mid:hi] == every[h, r].nonzero().flatten().tolist()
            assert set(cols[lo:hi]) >= set(some[h, r].nonzero().flatten().tolist())
            assert len(set(cols[lo:hi])) == hi - lo
            if not causal:
                assert sorted(cols[lo:hi]) == some[h, r].nonzero().flatten().tolist()


def test_bad_layouts_and_blocks():
    with pytest.raises(ValueError, match="3-D"):
        ab.BlockSparseMask(torch.ones(4, 4))
    with pytest.raises(ValueError, match="other than 0 and 1"):
        ab.BlockSparseMask(torch.full((1, 2, 2), 2))
    with pytest.raises(ValueError, match="float"):
        ab.BlockSparseMask(torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="at least 16"):
        ab.BlockSparseMask(torch.ones(1, 2, 2, dtype=torch.bool), block_size=8)
    with pytest.raises(ValueError, match="at least 16"):
        ab.BlockSparseMask(torch.ones(1, 2, 2, dtype=torch.bool), block_size=(32, 15))


@pytest.mark.parametrize("op", [None, TRITON, CHUNKED], ids=["dispatch", "triton", "chunked"])
def test_layout_that_does_not_fit_the_inputs(op):
    q, k, v = _inputs("BMHK", 1, 40, 40, 1, 2, 8, 8, torch.float32)
    with pytest.raises(ValueError, match=r"need \[H or 1, 3, 3\]"):
        fmha.memory_efficient_attention(q, k, v, ab.BlockSparseMask(torch.ones(1, 2, 3, dtype=torch.bool), 16), op=op)
    with pytest.raises(ValueError, match="3 heads but the inputs have 2"):
        fmha.memory_efficient_attention(q, k, v, ab.BlockSparseMask(torch.ones(3, 3, 3, dtype=torch.bool), 16), op=op)
    meta = ab.BlockSparseMask(torch.ones(1, 3, 3, dtype=torch.bool, device="meta"), 16)
    with pytest.raises(ValueError, match="is on meta but query is on cpu"):
        fmha.memory_efficient_attention(q, k, v, meta, op=op)


@needs_triton
def test_torch_compile_fullgraph():
    """The mask reaches the kernels' custom ops under torch.compile (no graph break), gradients included."""
    q, k, v = _inputs("BMHK", 1, 40, 40, 1, 2, 16, 16, torch.float32)
    mask = ab.BlockSparseMask(_layout(2, 3, 3, density=0.6), 16, causal=True)

    def f(q, k, v):
        return fmha.memory_efficient_attention(q, k, v, mask, op=TRITON)

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(compiled, eager)
    g = torch.randn_like(eager)
    for a, b in zip(torch.autograd.grad(compiled, (q, k, v), g), torch.autograd.grad(eager, (q, k, v), g)):
        torch.testing.assert_close(a, b)
