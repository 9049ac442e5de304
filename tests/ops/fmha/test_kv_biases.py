"""KV-cache biases (padded, gappy, paged keys) through memory_efficient_attention, on the chunked operator and
the Triton kernels (Triton's interpreter): output, lse and every gradient against float64 attention over the
materialized mask, with NaN in every cache row no block uses (padding, unused pages); empty sequences, odd
lengths, shuffled pages of sizes that do not divide the lengths, GQA through stride-0 K/V; paged equal to
unpaged; in-place length updates; dropout identical on both operators; bad block tables; call-time errors."""

import math

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha import dispatch
from triformers.ops.fmha import triton as triton_op
from triformers.ops.fmha._mask import mask_spec
from triformers.ops.fmha.attn_bias_utils import KV_CACHE_TYPES, PAGED_TYPES, bias_name
from triformers.ops.fmha.reference import ref_attention

CHUNKED = fmha.MemoryEfficientAttentionChunkedOp
TRITON = fmha.TritonFlashAttentionOp
OPS = {"chunked": CHUNKED, "triton": TRITON}
needs_triton = pytest.mark.skipif(not triton_op.FwOp.is_available(), reason="triton is not installed")

# (atol, rtol) per dtype; both operators accumulate in float32 (fp16 rounds outputs and gradients to 11 bits)
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 2e-3)}
TOL_GRAD = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2)}

# Four sequences: queries but no key in use, keys but no query, and two ordinary ones (odd lengths).
Q_LENS = [5, 0, 9, 1]
KV_LENS = [0, 7, 20, 13]
PADDING = 21
# Pages of 5 keys divide neither the lengths nor the padding and straddle the interpreter's 16-key tiles (rows
# gathered one by one); pages of 16 or 32 hold whole key tiles (loaded as runs of rows).
PAGE_SIZE = 5
SPARE_PAGES = 3  # pages no row uses


def _row_pages(page_size: int) -> int:
    return -(-PADDING // page_size)


def _tables(seed: int, dtype=torch.int32, page_size: int = PAGE_SIZE) -> torch.Tensor:
    """A block table whose pages are a random permutation, with spare pages left unused."""
    rows, pages = len(Q_LENS), _row_pages(page_size)
    order = torch.randperm(rows * pages + SPARE_PAGES, generator=torch.Generator().manual_seed(seed))
    return order[: rows * pages].view(rows, pages).to(dtype)


def _make_bias(bias_type, seed: int = 0, page_size: int = PAGE_SIZE):
    """``(bias, Mkv)`` for the four sequences above."""
    name = bias_type.__name__
    if "Paged" in name:
        tables = _tables(seed, torch.int64 if seed % 2 else torch.int32, page_size)
        Mkv = (len(Q_LENS) * _row_pages(page_size) + SPARE_PAGES) * page_size
        if "Gappy" in name:
            return bias_type.from_seqlens(Q_LENS, [2, 0, 1, 4], KV_LENS, tables, page_size), Mkv
        if bias_type is ab.PagedBlockDiagonalCausalLocalPaddedKeysMask:
            return bias_type.from_seqlens_local(Q_LENS, KV_LENS, tables, page_size, 4, device="cpu"), Mkv
        return bias_type.from_seqlens(Q_LENS, KV_LENS, tables, page_size, device="cpu"), Mkv
    if "Gappy" in name:
        total = len(Q_LENS) * PADDING
        # the plain gappy mask overlaps two segments ([25, 32) and [10, 30)): the Triton backward refuses it
        starts = [3, 25, 10, 40] if bias_type is ab.BlockDiagonalGappyKeysMask else [3, 62, 10, 40]
        base = ab.BlockDiagonalGappyKeysMask.from_seqlens(Q_LENS, [*starts, total], KV_LENS, device="cpu")
        if bias_type is ab.BlockDiagonalLocalAttentionFromBottomRightGappyKeysMask:
            return bias_type(base.q_seqinfo, base.k_seqinfo, window_left=2, window_right=1), total
        return bias_type(base.q_seqinfo, base.k_seqinfo), total
    if bias_type is ab.BlockDiagonalLocalAttentionPaddedKeysMask:
        return bias_type.from_seqlens_local(Q_LENS, PADDING, KV_LENS, 3, 2, device="cpu"), len(Q_LENS) * PADDING
    if bias_type is ab.BlockDiagonalCausalLocalAttentionPaddedKeysMask:
        return bias_type.from_seqlens_local(Q_LENS, PADDING, KV_LENS, 4, device="cpu"), len(Q_LENS) * PADDING
    return bias_type.from_seqlens(Q_LENS, PADDING, KV_LENS, device="cpu"), len(Q_LENS) * PADDING


def _used_rows(bias, Mkv: int) -> torch.Tensor:
    """bool ``[Mkv]``: the key rows some block uses (from the bias's own description)."""
    spec = mask_spec(bias)
    used = torch.zeros(Mkv, dtype=torch.bool)
    for b, (_, _, k0, nk, _) in enumerate(spec.blocks(sum(Q_LENS), Mkv)):
        j = torch.arange(nk)
        used[spec.key_rows(b, j, Mkv) if spec.is_paged else k0 + j] = True
    return used


def _inputs(bias, Mkv: int, *, gqa: bool, dtype=torch.float32, seed: int = 0):
    """Leaves ``q, kb, vb`` and the K/V views passed (``kb``/``vb`` expanded over the heads when ``gqa``), every
    unused cache row NaN."""
    gen = torch.Generator().manual_seed(seed)
    Mq, G, H, K, Kv = sum(Q_LENS), 2, 3, 16, 24
    q = torch.randn(1, Mq, G, H, K, generator=gen).to(dtype).requires_grad_()
    heads = 1 if gqa else H
    kb = torch.randn(1, Mkv, G, heads, K, generator=gen)
    vb = torch.randn(1, Mkv, G, heads, Kv, generator=gen)
    unused = ~_used_rows(bias, Mkv)
    kb[:, unused], vb[:, unused] = math.nan, math.nan
    kb, vb = kb.to(dtype).requires_grad_(), vb.to(dtype).requires_grad_()
    expand = (lambda t: t.expand(1, Mkv, G, H, t.shape[-1])) if gqa else (lambda t: t)
    return q, kb, vb, expand


def _close(actual, expected, tol, what):
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol[0], rtol=tol[1],
                               msg=lambda m: f"{what}: {m}")


def _check_against_reference(op, bias, Mkv, *, gqa, dtype=torch.float32):
    q, kb, vb, expand = _inputs(bias, Mkv, gqa=gqa, dtype=dtype)
    out = fmha.memory_efficient_attention(q, expand(kb), expand(vb), bias, op=op)
    clean = [t.detach().nan_to_num().double().requires_grad_() for t in (q, kb, vb)]
    ref, ref_lse = ref_attention(clean[0], expand(clean[1]), expand(clean[2]), bias)
    _close(out, ref, TOL[dtype], "out")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, (q, kb, vb), grad)
    ref_grads = torch.autograd.grad(ref, clean, grad.double())
    unused = ~_used_rows(bias, Mkv)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _close(g, r, TOL_GRAD[dtype], name)
        if name != "dq":  # rows no block uses: exactly zero, whatever they held
            assert torch.equal(g[:, unused], torch.zeros_like(g[:, unused])), f"{name} of unused rows"
    with torch.no_grad():
        _, lse = fmha.memory_efficient_attention_forward_requires_grad(q, expand(kb), expand(vb), bias, op=op[0])
    assert lse.shape == ref_lse.shape == (1, 2, 3, sum(Q_LENS))
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    _close(lse[finite], ref_lse[finite], TOL[dtype], "lse")


@pytest.mark.parametrize("op_name", ["chunked", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("bias_type", KV_CACHE_TYPES, ids=bias_name)
def test_every_kv_bias_against_reference(bias_type, op_name):
    """fp32, BMGHK; GQA (stride-0 K/V) for every other class. The Triton operator runs the paged backward (and
    that of overlapping gappy segments) on the chunked one."""
    bias, Mkv = _make_bias(bias_type, seed=KV_CACHE_TYPES.index(bias_type))
    _check_against_reference(OPS[op_name], bias, Mkv, gqa=KV_CACHE_TYPES.index(bias_type) % 2 == 1)


@needs_triton
@pytest.mark.parametrize("bias_type", [ab.BlockDiagonalCausalWithOffsetGappyKeysMask,
                                       ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask], ids=bias_name)
def test_fp16_triton(bias_type):
    bias, Mkv = _make_bias(bias_type, seed=5)
    _check_against_reference(TRITON, bias, Mkv, gqa=True, dtype=torch.float16)


@needs_triton
@pytest.mark.parametrize("bias_type", [ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
                                       ab.PagedBlockDiagonalGappyKeysMask], ids=bias_name)
def test_paged_with_pages_of_whole_tiles(bias_type):
    """Pages of two 16-key tiles: padded rows load each tile as one run of rows (TMA under the interpreter
    too), gappy rows (unaligned starts) still gather."""
    bias, Mkv = _make_bias(bias_type, seed=3, page_size=32)
    _check_against_reference(TRITON, bias, Mkv, gqa=True)


@pytest.mark.parametrize("op_name", ["chunked", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("paged_type", [ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
                                        ab.PagedBlockDiagonalGappyKeysMask], ids=bias_name)
def test_paged_equals_unpaged(paged_type, op_name):
    """The same keys in a padded cache and scattered into shuffled pages: same output, same gradients (the
    paged dK/dV gathered back through the table)."""
    op = OPS[op_name]
    gappy = paged_type is ab.PagedBlockDiagonalGappyKeysMask
    row_len = _row_pages(PAGE_SIZE) * PAGE_SIZE
    starts = [2, 0, 1, 4] if gappy else [0, 0, 0, 0]
    if gappy:
        unpaged = ab.BlockDiagonalGappyKeysMask.from_seqlens(
            Q_LENS, [b * row_len + s for b, s in enumerate(starts)] + [len(Q_LENS) * row_len], KV_LENS, device="cpu")
        paged = unpaged.make_paged(_tables(7), PAGE_SIZE, row_len, paged_type)
    else:
        unpaged = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(Q_LENS, row_len, KV_LENS, device="cpu")
        paged = paged_type.from_seqlens(Q_LENS, KV_LENS, _tables(7), PAGE_SIZE, device="cpu")
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, sum(Q_LENS), 2, 16, generator=gen, requires_grad=True)
    k_logical = torch.randn(1, len(Q_LENS) * row_len, 2, 16, generator=gen, requires_grad=True)
    v_logical = torch.randn(1, len(Q_LENS) * row_len, 2, 16, generator=gen, requires_grad=True)
    # physical row of logical row b * row_len + t: table[b, t // page] * page + t % page
    t = torch.arange(row_len)
    phys = (paged.block_tables.long()[:, t // PAGE_SIZE] * PAGE_SIZE + t % PAGE_SIZE).reshape(-1)
    Mkv = (len(Q_LENS) * _row_pages(PAGE_SIZE) + SPARE_PAGES) * PAGE_SIZE
    k_paged = torch.full((1, Mkv, 2, 16), math.nan).index_copy(1, phys, k_logical.detach()).requires_grad_()
    v_paged = torch.full((1, Mkv, 2, 16), math.nan).index_copy(1, phys, v_logical.detach()).requires_grad_()
    out = fmha.memory_efficient_attention(q, k_logical, v_logical, unpaged, op=op)
    out_paged = fmha.memory_efficient_attention(q, k_paged, v_paged, paged, op=op)
    torch.testing.assert_close(out_paged, out, atol=1e-6, rtol=1e-6)
    grad = torch.randn(out.shape, generator=gen)
    dq, dk, dv = torch.autograd.grad(out, (q, k_logical, v_logical), grad)
    dq_p, dk_p, dv_p = torch.autograd.grad(out_paged, (q, k_paged, v_paged), grad)
    torch.testing.assert_close(dq_p, dq, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dk_p[:, phys], dk, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dv_p[:, phys], dv, atol=1e-6, rtol=1e-6)
    spare = torch.ones(Mkv, dtype=torch.bool)
    spare[phys] = False
    assert torch.equal(dk_p[:, spare], torch.zeros_like(dk_p[:, spare]))


@pytest.mark.parametrize("op_name", ["chunked", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("bias_type", [ab.BlockDiagonalCausalWithOffsetPaddedKeysMask,
                                       ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask], ids=bias_name)
def test_inplace_length_updates(bias_type, op_name):
    """A bias updated in place (the CUDA-graph way) gives what a fresh bias with the new lengths gives, whether
    updated through from_seqlens_*_inplace or by writing its device tensors directly; the operators read the
    tensors each call, even after caching what they derive from the bias."""
    op = OPS[op_name]
    bias, Mkv = _make_bias(bias_type, seed=2)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, sum(Q_LENS), 2, 16, generator=gen)
    k, v = torch.randn(1, Mkv, 2, 16, generator=gen), torch.randn(1, Mkv, 2, 16, generator=gen)
    fmha.memory_efficient_attention(q, k, v, bias, op=op)  # operators may cache per bias object
    new_q, new_kv = [1, 4, 9, 1], [3, 7, 20, 0]
    bias.q_seqinfo.from_seqlens_inplace(new_q)
    bias.k_seqinfo.from_seqlens_padded_inplace(new_kv)
    if bias_type is ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask:
        fresh = bias_type.from_seqlens(new_q, new_kv, bias.block_tables, PAGE_SIZE, device="cpu")
    else:
        fresh = bias_type.from_seqlens(new_q, PADDING, new_kv, device="cpu")
    expected = fmha.memory_efficient_attention(q, k, v, fresh, op=op)
    torch.testing.assert_close(fmha.memory_efficient_attention(q, k, v, bias, op=op), expected, atol=0, rtol=0)
    bias.k_seqinfo.seqlen.sub_(1).clamp_(min=0)  # the device tensor alone, as a graph replay would see it
    shorter = [max(0, n - 1) for n in new_kv]
    if bias_type is ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask:
        fresh = bias_type.from_seqlens(new_q, shorter, bias.block_tables, PAGE_SIZE, device="cpu")
    else:
        fresh = bias_type.from_seqlens(new_q, PADDING, shorter, device="cpu")
    expected = fmha.memory_efficient_attention(q, k, v, fresh, op=op)
    torch.testing.assert_close(fmha.memory_efficient_attention(q, k, v, bias, op=op), expected, atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("bias_type", [ab.BlockDiagonalLocalAttentionPaddedKeysMask,
                                       ab.PagedBlockDiagonalGappyKeysMask], ids=bias_name)
def test_dropout_identical_on_both_operators(bias_type):
    """Both operators key the dropout mask on the key's row in the key tensor (physical when paged)."""
    bias, Mkv = _make_bias(bias_type, seed=6)
    q, kb, vb, _ = _inputs(bias, Mkv, gqa=False)
    outs, grads = [], []
    for op in (TRITON, CHUNKED):
        torch.manual_seed(11)
        out = fmha.memory_efficient_attention(q, kb, vb, bias, p=0.3, op=op)
        outs.append(out)
        grads.append(torch.autograd.grad(out, (q, kb, vb), torch.ones_like(out)))
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.manual_seed(12)
    assert not torch.allclose(fmha.memory_efficient_attention(q, kb, vb, bias, p=0.3, op=CHUNKED), outs[1])


@pytest.mark.parametrize("page_size", [PAGE_SIZE, 16])
@pytest.mark.parametrize("op_name", ["chunked", pytest.param("triton", marks=needs_triton)])
def test_bad_block_table_stays_inside_the_cache(op_name, page_size, monkeypatch):
    """A table changed in place to pages beyond the cache (after the bias checked it) never makes an operator
    read outside the key tensor (the Triton kernels on the TMA and pointer paths): the call completes with
    finite values."""
    from triformers.ops.fmha._triton import launch

    bias, Mkv = _make_bias(ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask, seed=8, page_size=page_size)
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(1, sum(Q_LENS), 2, 16, generator=gen)
    k, v = torch.randn(1, Mkv, 2, 16, generator=gen), torch.randn(1, Mkv, 2, 16, generator=gen)
    bias.block_tables[2, 1] = 10**6
    bias.block_tables[3, 0] = -7
    for tma in (True, False) if op_name == "triton" else (True,):
        monkeypatch.setattr(launch, "USE_TMA", tma)
        out = fmha.memory_efficient_attention(q, k, v, bias, op=OPS[op_name])
        assert torch.isfinite(out).all()


@needs_triton
@pytest.mark.parametrize("bias_type", [ab.BlockDiagonalCausalLocalAttentionPaddedKeysMask,
                                       ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask], ids=bias_name)
def test_pointer_path(bias_type, monkeypatch):
    """The kernels' pointer path (strides TMA cannot address) masks what lies past each block too."""
    from triformers.ops.fmha._triton import launch

    monkeypatch.setattr(launch, "USE_TMA", False)
    bias, Mkv = _make_bias(bias_type, seed=4, page_size=16)
    _check_against_reference(TRITON, bias, Mkv, gqa=False)


def test_call_time_validation():
    gen = torch.Generator().manual_seed(0)
    padded, Mkv = _make_bias(ab.BlockDiagonalCausalWithOffsetPaddedKeysMask)
    gappy, total = _make_bias(ab.BlockDiagonalGappyKeysMask)
    paged, Mp = _make_bias(ab.PagedBlockDiagonalPaddedKeysMask)
    Mq = sum(Q_LENS)

    def call(bias, Mq=Mq, Mkv=Mkv, batch=1):
        q = torch.randn(batch, Mq, 2, 8, generator=gen)
        k = torch.randn(batch, Mkv, 2, 8, generator=gen)
        return fmha.memory_efficient_attention(q, k, k, bias)

    cases = [
        (lambda: call(padded, Mkv=Mkv - 1), r"describes 84 key positions in total but key.shape\[1\]=83"),
        (lambda: call(gappy, Mkv=total + 2), r"describes 84 key positions in total but key.shape\[1\]=86"),
        (lambda: call(padded, Mq=Mq + 1), r"describes 15 queries in total but query.shape\[1\]=16"),
        (lambda: call(padded, batch=2), "Expected batch_size=1"),
        (lambda: call(paged, Mkv=Mp - 1), rf"key.shape\[1\]={Mp - 1} is not a multiple of page_size=5"),
        (lambda: call(paged, Mkv=(paged._max_page) * PAGE_SIZE),
         rf"block_tables refers to page {paged._max_page} but the cache holds {paged._max_page} pages"),
        (lambda: call(padded.to("meta")),
         r"tensors are on \['meta'\] but query is on cpu; move the bias with attn_bias.to\(query.device\)"),
        (lambda: call(paged.to("meta"), Mkv=Mp), r"attn_bias.to\(query.device\)"),
    ]
    for run, message in cases:
        with pytest.raises(ValueError, match=message):
            run()
    q = torch.randn(Mq, 1, 8)  # BMK
    with pytest.raises(ValueError, match="BMHK format rather than BMK"):
        fmha.memory_efficient_attention(q[None, :, 0], torch.randn(1, Mkv, 8), torch.randn(1, Mkv, 8), padded)


def test_dispatch_and_declared_support():
    """CPU: the chunked operator for every KV-cache bias (SDPA cannot express them); the Triton backward does
    not take paged biases nor overlapping gappy segments, and says so."""
    for bias_type in KV_CACHE_TYPES:
        bias, Mkv = _make_bias(bias_type)
        q = torch.randn(1, sum(Q_LENS), 2, 8, requires_grad=True)
        k = torch.randn(1, Mkv, 2, 8)
        inp = fmha.Inputs(q, k, k, bias)
        for needs_gradient in (False, True):
            assert dispatch.dispatch_fw(inp, needs_gradient=needs_gradient) is fmha.chunked.FwOp, bias_type
        assert dispatch.dispatch_bw(inp) is fmha.chunked.BwOp
        assert fmha.sdpa.FwOp.not_supported_reasons(inp) == [f"attn_bias type is {bias_type.__name__}"]
        assert not triton_op.FwOp.not_supported_reasons(inp) or not triton_op.FwOp.is_available()
        reasons = triton_op.BwOp.not_supported_reasons(inp)
        if bias_type in PAGED_TYPES:
            assert f"attn_bias type is {bias_type.__name__}" in reasons
        elif bias_type is ab.BlockDiagonalGappyKeysMask:
            assert "gappy key segments overlap: their dK/dV would need summing across blocks" in reasons
        elif triton_op.BwOp.is_available():
            assert not reasons
