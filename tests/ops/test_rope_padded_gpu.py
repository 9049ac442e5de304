"""rope_padded on the GPU at xFormers' test sizes (head dim 128, padding 18300, 10 query / 2 K/V heads, 2^16-token
prefill), bf16 and fp16: against the float64 reference of ``test_rope_padded.py``, against the torch path on the
same GPU tensors, paged caches, and a decode step captured in a CUDA graph and replayed with ``seqlen`` updated
in place.
"""

import importlib
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from triformers.ops import rope_padded
from triformers.ops.fmha.attn_bias import (
    BlockDiagonalCausalWithOffsetPaddedKeysMask,
    PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

_CPU_TESTS = Path(__file__).with_name("test_rope_padded.py")
_spec = importlib.util.spec_from_file_location("_rope_padded_cpu_tests", _CPU_TESTS)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)  # the float64 reference and checks of the CPU tests
rp_mod = importlib.import_module("triformers.ops.rope_padded")

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16]
HEADS, KV_HEADS, DIM = 10, 2, 128


def _tokens(t, mid, dtype, hq=HEADS, hkv=KV_HEADS, d=DIM):
    return tuple(torch.randn(1, t, *mid, h, d, device=DEV).to(dtype) for h in (hq, hkv, hkv))


def _nan_cache(rows, mid, heads, d, dtype):
    return torch.full((1, rows, *mid, heads, d), math.nan, device=DEV, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adjacents", [True, False], ids=["adj", "halves"])
@pytest.mark.parametrize("internal_dtype", ["", "f64"])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("linear_scale, dynamic", [(1.0, False), (4.0, False), (1.0, True)])
def test_consistency(dtype, adjacents, internal_dtype, groups, linear_scale, dynamic):
    """xFormers' test_consistency sizes: 3 sequences, one ending 5 rows before its slot's end at padding 18300."""
    padding = 18300
    q_lens, kv_lens = [2, 1, 1], [27, padding - 5, padding // 2]
    mid = (groups,) if groups > 1 else ()
    xq, xk, xv = _tokens(sum(q_lens), mid, dtype)
    ck, cv = (_nan_cache(3 * padding, mid, KV_HEADS, DIM, dtype) for _ in range(2))
    bias = BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q_lens, padding, kv_lens, device=DEV)
    kw = {"use_dynamic_scaling": True, **ref.DYNAMIC} if dynamic else {}
    with torch.inference_mode():
        out = rope_padded(xq, xk, xv, ck, cv, bias, linear_scale=linear_scale, adjacents=adjacents,
                          internal_dtype=internal_dtype, **kw)  # fmt: skip
    exp = ref.expected(xq, xk, xv, q_lens, kv_lens, lambda b, p: b * padding + p, linear_scale=linear_scale,
                       dynamic=ref.DYNAMIC if dynamic else None, adjacents=adjacents)  # fmt: skip
    ref.check_call(xq, xk, xv, ck, cv, out, exp, KV_HEADS, internal_dtype=internal_dtype, adjacents=adjacents)


def _both_paths(*args, **kwargs):
    """rope_padded through the kernel and through the torch implementation, on clones of the caches."""
    results = []
    for kernel in (True, False):
        ck, cv = args[3].clone(), args[4].clone()
        with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
            if not kernel:
                mp.setattr(rp_mod, "use_triton", lambda *a: False)
            out = rope_padded(*args[:3], ck, cv, *args[5:], **kwargs)
        results.append((out, ck, cv))
    return results


def _assert_paths_agree(results, dtype, max_angle):
    """Equal cache_v and NaN patterns; out_q and cache_k within one output ulp plus the float32 angle error."""
    (o1, k1, v1), (o2, k2, v2) = results
    assert torch.equal(v1.isnan(), v2.isnan()) and torch.equal(v1.nan_to_num(), v2.nan_to_num())
    assert torch.equal(k1.isnan(), k2.isnan())
    rel = 2 * ref.HALF_ULP[dtype] + 8 * 2.0**-24 * max(1.0, max_angle)
    for a, b in ((o1, o2), (k1.nan_to_num(), k2.nan_to_num())):
        scale = torch.maximum(a.abs(), b.abs()).double().max().item() * math.sqrt(2)
        torch.testing.assert_close(a.double(), b.double(), atol=rel * scale, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_long(dtype):
    """One 2^16-token prompt (xFormers' test_rope_prefill): sampled tokens against the float64 reference, every
    token against the torch path."""
    seqlen, d = 2**16, 32
    xq, xk, xv = _tokens(seqlen, (), dtype, hq=2, hkv=1, d=d)
    ck, cv = (_nan_cache(seqlen + 1, (), 1, d, dtype) for _ in range(2))
    bias = BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([seqlen], seqlen + 1, [seqlen], device=DEV)
    results = _both_paths(xq, xk, xv, ck, cv, bias)
    _assert_paths_agree(results, dtype, seqlen)
    out, k, v = results[0]
    assert k[0, seqlen].isnan().all() and v[0, seqlen].isnan().all() and not v[0, :seqlen].isnan().any()
    torch.testing.assert_close(v[:, :seqlen], xv, atol=0, rtol=0)
    freqs = ref.ref_frequencies(d, 10000.0, None)
    for t in [0, 1, seqlen // 16 + 1, seqlen // 2 + 3, seqlen - 1, *torch.randint(0, seqlen, (60,)).tolist()]:
        kw = {"max_angle": float(t), "what": f"token {t}"}
        ref.assert_rope_close(out[0, t], ref.ref_rope(xq[0, t], t, freqs, 1.0, True), xq[0, t], **kw)
        ref.assert_rope_close(k[0, t], ref.ref_rope(xk[0, t], t, freqs, 1.0, True), xk[0, t], **kw)


def test_wide_heads_and_seqpos():
    """D=4098 (several D-chunks), fp16, out-of-order seqpos and first_seqpos, as in xFormers' tests."""
    seqlen, d = 723, 4098
    xq, xk, xv = _tokens(seqlen, (), torch.float16, hq=2, hkv=1, d=d)
    ck, cv = (_nan_cache(seqlen + 1, (), 1, d, torch.float16) for _ in range(2))
    bias = BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([seqlen], seqlen + 1, [seqlen], device=DEV)
    seqpos = torch.arange(seqlen, device=DEV)
    seqpos[231], seqpos[423] = 934, 134
    for kw in ({"seqpos": seqpos}, {"first_seqpos": torch.tensor([4], device=DEV)}):
        k, v = ck.clone(), cv.clone()
        with torch.inference_mode():
            out = rope_padded(xq, xk, xv, k, v, bias, adjacents=False, **kw)
        exp = ref.expected(xq, xk, xv, [seqlen], [seqlen], lambda b, p: p, adjacents=False, **kw)
        ref.check_call(xq, xk, xv, k, v, out, exp, 1, adjacents=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [16, 256])
def test_paged_matches_padded(dtype, page_size):
    """Llama-style BMGHK (K/V and caches expanded over 4 query heads per group), prefill chunks and decode rows
    of different lengths: the paged cache, read back through the block table, equals the padded cache."""
    groups, hg, padding = 2, 4, 4096
    q_lens, kv_lens = [1, 37, 0, 1, 300], [1, 3000, 17, 4096, 300]
    n_seqs, t, pages_per_row = len(q_lens), sum(q_lens), padding // page_size
    xq = torch.randn(1, t, groups, hg, DIM, device=DEV).to(dtype)
    xk, xv = (torch.randn(1, t, groups, 1, DIM, device=DEV).to(dtype).expand(-1, -1, -1, hg, -1) for _ in range(2))
    n_pages = n_seqs * pages_per_row + 3
    perm = torch.randperm(n_pages, device=DEV)[: n_seqs * pages_per_row].view(n_seqs, -1).to(torch.int32)
    paged = PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q_lens, kv_lens, perm, page_size,
                                                                          device=DEV)  # fmt: skip
    padded = BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q_lens, padding, kv_lens, device=DEV)
    caches = {}
    for name, bias, rows in (("paged", paged, n_pages * page_size), ("padded", padded, n_seqs * padding)):
        ck, cv = (_nan_cache(rows, (groups,), 1, DIM, dtype).expand(-1, -1, -1, hg, -1) for _ in range(2))
        with torch.inference_mode():
            out = rope_padded(xq, xk, xv, ck, cv, bias, theta=500000.0)
        caches[name] = (out, ck, cv)
    # physical rows of the paged cache in logical order: [B * padding]; the pages outside the table stay NaN
    logical = (perm.long()[:, :, None] * page_size + torch.arange(page_size, device=DEV)).flatten()
    unused = torch.ones(n_pages * page_size, dtype=torch.bool, device=DEV)
    unused[logical] = False
    for i, (got, want) in enumerate(zip(caches["paged"], caches["padded"])):
        if i:
            assert got[0, unused].isnan().all()
            got = got[:, logical]
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    exp = ref.expected(xq, xk, xv, q_lens, kv_lens, lambda b, p: b * padding + p, n_kv=1, theta=500000.0)
    ref.check_call(xq, xk, xv, caches["padded"][1], caches["padded"][2], caches["padded"][0], exp, 1)


@pytest.mark.parametrize("paged", [False, True], ids=["padded", "paged"])
def test_cuda_graph_decode(paged):
    """A decode step captured once and replayed: new tokens copied into the captured inputs and
    ``k_seqinfo.seqlen`` incremented in place (its Python list left stale), as the Llama example does."""
    dtype, groups, hg, padding, page_size = torch.bfloat16, 2, 4, 64, 16
    kv_lens = [5, 30, 1]
    n_seqs = len(kv_lens)
    if paged:
        tables = torch.randperm(n_seqs * padding // page_size, device=DEV).view(n_seqs, -1).to(torch.int32)
        bias = PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1] * n_seqs, kv_lens, tables,
                                                                             page_size, device=DEV)  # fmt: skip
        row_of = lambda b, p: tables[b, p // page_size].item() * page_size + p % page_size  # noqa: E731
    else:
        bias = BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1] * n_seqs, padding, kv_lens, device=DEV)
        row_of = lambda b, p: b * padding + p  # noqa: E731
    xq = torch.empty(1, n_seqs, groups, hg, DIM, device=DEV, dtype=dtype)
    kv = torch.empty(2, 1, n_seqs, groups, 1, DIM, device=DEV, dtype=dtype)
    xk, xv = (x.expand(-1, -1, -1, hg, -1) for x in kv)
    ck, cv = (_nan_cache(n_seqs * padding, (groups,), 1, DIM, dtype).expand(-1, -1, -1, hg, -1) for _ in range(2))
    out_q = torch.empty_like(xq)
    with torch.inference_mode():
        for x in (xq, kv):
            x.normal_()
        warm = [_nan_cache(n_seqs * padding, (groups,), 1, DIM, dtype).expand(-1, -1, -1, hg, -1) for _ in range(2)]
        rope_padded(xq, xk, xv, *warm, bias, out_q=out_q, adjacents=False)  # compiles before the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            rope_padded(xq, xk, xv, ck, cv, bias, out_q=out_q, adjacents=False)
        for step in range(4):
            for x in (xq, kv):
                x.normal_()
            graph.replay()
            lens = [n + step for n in kv_lens]
            exp = ref.expected(xq, xk, xv, [1] * n_seqs, lens, row_of, n_kv=1, adjacents=False)
            for row, k_ref, v_ref, t in zip(exp.rows, exp.k, exp.v, range(n_seqs)):
                ref.assert_rope_close(ck[0, row, :, :1], k_ref, xk[0, t, :, :1], max_angle=exp.max_angle,
                                      adjacents=False, what=f"step {step} cache_k row {row}")  # fmt: skip
                assert torch.equal(cv[0, row, :, :1], v_ref)
            ref.assert_rope_close(out_q, exp.out_q, xq, max_angle=exp.max_angle, adjacents=False, what="out_q")
            bias.k_seqinfo.seqlen.add_(1)
    written = torch.zeros(ck.shape[1], dtype=torch.bool, device=DEV)
    for b, n in enumerate(kv_lens):
        for p in range(n - 1, n + 3):
            written[row_of(b, p)] = True
    assert ck[0, ~written].isnan().all() and cv[0, ~written].isnan().all()
    assert not ck[0, written].isnan().any() and list(bias.k_seqinfo.seqlen_py) == kv_lens
