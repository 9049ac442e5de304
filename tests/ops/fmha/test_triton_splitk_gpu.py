"""fmha.triton_splitk on the GPU at real sizes (bf16 and fp16): the decoding benchmark's shapes (Hq=32, Hkv=8,
D=128, batch reduced), every KV-cache bias with NaN in the unused cache, paged caches of 16- and 256-key pages,
int4/fp8 caches against their dequantized values, several queries per sequence, split counts, the merge
kernel, CUDA-graph capture and replay with lengths updated in place, and the decoding dispatch.

Nothing here times anything: the bandwidth is measured by ``python -m triformers.benchmarks.decode`` and
``scripts/tune_splitk.py``.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha import dispatch, quantize
from triformers.ops.fmha import triton_splitk as sk
from triformers.ops.fmha._triton.merge import merge_partials
from triformers.ops.fmha.common import Inputs
from triformers.ops.fmha.merge import merge_partials_torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

_CPU_TESTS = Path(__file__).with_name("test_triton_splitk.py")
_spec = importlib.util.spec_from_file_location("_triton_splitk_cpu_tests", _CPU_TESTS)
cpu_tests = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # registered: it defines a dataclass
_spec.loader.exec_module(cpu_tests)  # make_kv_case: KV-cache inputs with their float64 reference
KV_BIASES, make_kv_case = cpu_tests.KV_BIASES, cpu_tests.make_kv_case

DTYPES = [torch.bfloat16, torch.float16]
HQ, HKV, D = 32, 8, 128
# Tolerance relative to the largest reference value: the kernel rounds the probabilities that multiply V and
# the output to the dtype (bf16: 2**-9, fp16: 2**-12 relative), errors that partly average out over the keys.
REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
LSE_TOL = 2e-3  # the scores are float32 sums of exact products


def _check(out, lse, ref, ref_lse, dtype):
    scale = ref.abs().max().item() + 1e-3
    err = (out.double() - ref).abs().max().item()
    assert math.isfinite(err) and err <= REL_TOL[dtype] * scale, f"max error {err:.3g} (max |ref| {scale:.3g})"
    assert torch.equal(lse.isneginf(), ref_lse.isneginf())
    lse_err = (lse.double() - ref_lse).nan_to_num(nan=0.0).abs().max().item()
    assert lse_err <= LSE_TOL, f"lse error {lse_err:.3g}"


def _gqa_reference(q, k_base, v_base, lens, causal=False):
    """float64 attention of ``q [B, Mq, G, H, D]`` over ``k_base, v_base [B, L, G, 1, D]`` (never expanded),
    sequence b seeing its first ``lens[b]`` keys (bottom-right causal when ``causal``)."""
    B, Mq = q.shape[:2]
    L = k_base.shape[1]
    s = torch.einsum("bmghd,bngd->bghmn", q.double(), k_base[:, :, :, 0].double()) * q.shape[-1] ** -0.5
    j = torch.arange(L, device=q.device)
    lens_t = torch.tensor(lens, device=q.device)
    allowed = j[None, None, :] < lens_t[:, None, None]  # [B, 1, L]
    if causal:
        i = torch.arange(Mq, device=q.device)
        allowed = allowed & (j[None, None, :] <= (i[None, :, None] + lens_t[:, None, None] - Mq))
    s = s.masked_fill(~allowed[:, None, None], -math.inf)
    lse = torch.logsumexp(s, -1)  # [B, G, H, Mq]
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bghmn,bngd->bmghd", p, v_base[:, :, :, 0].double())
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,L", [(1, 131072), (4, 32768), (16, 8192), (64, 2048), (128, 512)])
def test_benchmark_shapes(B, L, dtype):
    """The decoding benchmark's cases (contiguous cache, one query per sequence), batch reduced where large."""
    g = torch.Generator(device="cuda").manual_seed(B + L)
    q = torch.randn(B, 1, HKV, HQ // HKV, D, device="cuda", dtype=dtype, generator=g)
    kb, vb = (torch.randn(B, L, HKV, 1, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    k, v = kb.expand(B, L, HKV, HQ // HKV, D), vb.expand(B, L, HKV, HQ // HKV, D)
    out, ctx = sk.FwOp.apply(Inputs(q, k, v), needs_gradient=True)
    ref, ref_lse = _gqa_reference(q, kb, vb, [L] * B)
    _check(out, ctx.lse, ref, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [16, 256])
def test_paged_decoding_matches_contiguous(page_size, dtype):
    """Paged cache (shuffled pages of 16 or 256 keys, NaN in every page nobody uses) = its contiguous cache."""
    B, L, G = 8, 4096, HKV
    lens = [L - 7 * b - 1 for b in range(B)]
    g = torch.Generator(device="cuda").manual_seed(page_size)
    q = torch.randn(1, B, G, HQ // G, D, device="cuda", dtype=dtype, generator=g)
    kb, vb = (torch.randn(B, L, G, 1, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    pages = B * L // page_size
    perm = torch.randperm(pages + 5, device="cuda", generator=g)[:pages]
    k_pool = torch.full(((pages + 5) * page_size, G, 1, D), math.nan, device="cuda", dtype=dtype)
    v_pool = k_pool.clone()
    k_pool.view(pages + 5, page_size, G, 1, D)[perm] = kb.reshape(pages, page_size, G, 1, D)
    v_pool.view(pages + 5, page_size, G, 1, D)[perm] = vb.reshape(pages, page_size, G, 1, D)
    for b, n in enumerate(lens):  # NaN in the used pages' unused rows too
        t = torch.arange(n, L, device="cuda")
        rows = perm[b * (L // page_size) + t // page_size] * page_size + t % page_size
        k_pool[rows] = math.nan
        v_pool[rows] = math.nan
    table = perm.view(B, L // page_size).to(torch.int32)
    bias = ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        [1] * B, lens, table, page_size, device="cuda"
    )
    shape = (1, k_pool.shape[0], G, HQ // G, D)
    out, ctx = sk.FwOp.apply(Inputs(q, k_pool[None].expand(shape), v_pool[None].expand(shape), bias), True)
    ref, ref_lse = _gqa_reference(q.view(B, 1, G, HQ // G, D), kb, vb, lens)
    _check(out.view(B, 1, G, HQ // G, D), ctx.lse.view(G, HQ // G, B).permute(2, 0, 1)[..., None], ref, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_type", KV_BIASES, ids=lambda t: t.__name__)
def test_kv_cache_biases(bias_type, dtype):
    """Every KV-cache bias at a few thousand keys, 1..16 queries per sequence, GQA, NaN in unused rows/pages."""
    causal = "Causal" in bias_type.__name__ or "Local" in bias_type.__name__
    q_lens = [1, 16, 5, 1] if causal else [1, 7, 16, 2]
    case = make_kv_case(
        bias_type, q_lens, [3001, 1500, 0, 777], D=D, G=2, H=4, page_size=64, dtype=dtype, device="cuda", seed=7
    )
    out, ctx = sk.FwOp.apply(Inputs(case.query, case.key, case.value, case.bias), True)
    _check(out, ctx.lse, case.ref_out.cuda(), case.ref_lse.cuda(), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["int4", "int4_g8", "fp8"])
def test_quantized(kind, dtype):
    """int4 (row-wise and 8 groups) and fp8 caches against attention over their dequantized values."""
    B, L, G = 4, 8192, HKV
    g = torch.Generator(device="cuda").manual_seed(len(kind))
    q = torch.randn(B, 1, G, HQ // G, D, device="cuda", dtype=dtype, generator=g)
    kb, vb = (torch.randn(B, L, G, 1, D, device="cuda", generator=g) * 2 for _ in range(2))
    op = sk.FwOp
    expand = (B, L, G, HQ // G, -1)
    if kind.startswith("int4"):
        groups = 8 if kind == "int4_g8" else 1
        op = type("S_g", (sk.FwOp,), {"NUM_GROUPS": groups, "NAME": f"splitK_g{groups}"})
        kq, vq = quantize.quantize_kv_int4(kb, groups), quantize.quantize_kv_int4(vb, groups)
        kd, vd = (quantize.dequantize_kv_int4(x, groups, torch.float64) for x in (kq, vq))
        inp = Inputs(q, kq.expand(expand), vq.expand(expand))
    else:
        (kq, ks), (vq, vs) = quantize.quantize_kv_fp8(kb), quantize.quantize_kv_fp8(vb)
        kd, vd = (quantize.dequantize_kv_fp8(x, s, torch.float64) for x, s in ((kq, ks), (vq, vs)))
        inp = sk.InputsFp8(
            q,
            kq.expand(expand),
            vq.expand(expand),
            k_fp8_scale_shift=ks.expand(expand[:-1]),
            v_fp8_scale_shift=vs.expand(expand[:-1]),
        )
    out, ctx = op.apply(inp, True)
    ref, ref_lse = _gqa_reference(q, kd, vd, [L] * B)
    assert out.shape == q.shape
    _check(out, ctx.lse, ref, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_counts_and_many_queries(dtype):
    """Split counts 1, 2, 7, 64 agree; 16 causal queries per sequence (rows of 64 per program)."""
    B, L, Mq = 2, 5000, 16
    q = torch.randn(B, Mq, HKV, HQ // HKV, D, device="cuda", dtype=dtype)
    kb, vb = (torch.randn(B, L, HKV, 1, D, device="cuda", dtype=dtype) for _ in range(2))
    k, v = kb.expand(B, L, HKV, HQ // HKV, D), vb.expand(B, L, HKV, HQ // HKV, D)
    bias = ab.LowerTriangularFromBottomRightMask()
    ref, ref_lse = _gqa_reference(q, kb, vb, [L] * B, causal=True)
    for splits in (1, 2, 7, 64):
        out, ctx = sk.FwOp.get_operator(splits).apply(Inputs(q, k, v, bias), True)
        _check(out, ctx.lse, ref, ref_lse, dtype)


@pytest.mark.parametrize("splits", [None, 16, 31, 32, 33, 48, 100, 128])
def test_every_split_count_at_a_benchmark_shape(splits):
    """B=4, L=32768 (the heuristic picks 33 splits on 132 SMs: the last split gets no keys) for split counts that
    divide the key blocks and counts that leave splits empty."""
    B, L, dtype = 4, 32768, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(B, 1, HKV, HQ // HKV, D, device="cuda", dtype=dtype, generator=g)
    kb, vb = (torch.randn(B, L, HKV, 1, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    k, v = kb.expand(B, L, HKV, HQ // HKV, D), vb.expand(B, L, HKV, HQ // HKV, D)
    op = sk.FwOp if splits is None else sk.FwOp.get_operator(splits)
    out, ctx = op.apply(Inputs(q, k, v), needs_gradient=True)
    ref, ref_lse = _gqa_reference(q, kb, vb, [L] * B)
    per_batch = (out.double() - ref).abs().flatten(1).amax(1).tolist()
    assert max(per_batch) <= REL_TOL[dtype] * (ref.abs().max().item() + 1e-3), f"per-sequence errors {per_batch}"
    _check(out, ctx.lse, ref, ref_lse, dtype)


def test_merge_kernel():
    attn = torch.randn(9, 3, 5, 2, 4, 128, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(9, 3, 2, 4, 5, device="cuda") * 4
    lse[2] = -math.inf
    out = torch.empty(3, 5, 2, 4, 128, device="cuda", dtype=torch.bfloat16)
    lse_out = torch.empty(3, 2, 4, 5, device="cuda")
    merge_partials(attn, lse, out, lse_out)
    ref, ref_lse = merge_partials_torch(attn.double(), lse.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse_out.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_cuda_graph_in_place_lengths():
    """Captured once, replayed after the bias's lengths grow in place (the Python lists stale): each replay
    attends to the new lengths."""
    B, L, G, page = 4, 2048, HKV, 64
    dtype = torch.bfloat16
    q = torch.randn(1, B, G, HQ // G, D, device="cuda", dtype=dtype)
    kb, vb = (torch.randn(B, L, G, 1, D, device="cuda", dtype=dtype) for _ in range(2))
    table = torch.arange(B * L // page, device="cuda", dtype=torch.int32).view(B, L // page)
    lens = [100, 1000, 1, 2000]
    bias = ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1] * B, lens, table, page, device="cuda")
    shape = (1, B * L, G, HQ // G, D)
    k, v = kb.reshape(1, B * L, G, 1, D).expand(shape), vb.reshape(1, B * L, G, 1, D).expand(shape)
    fmha.memory_efficient_attention_forward(q, k, v, bias, op=sk.FwOp)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fmha.memory_efficient_attention_forward(q, k, v, bias, op=sk.FwOp)
    for step in range(3):
        graph.replay()
        now = [n + 5 * step for n in lens]
        ref, _ = _gqa_reference(q.view(B, 1, G, HQ // G, D), kb, vb, now)
        scale = ref.abs().max().item()
        assert (out.view(B, 1, G, HQ // G, D).double() - ref).abs().max().item() <= REL_TOL[dtype] * scale
        bias.k_seqinfo.seqlen.add_(5)


def test_dispatch_decoding():
    """On CUDA without gradients, decoding shapes and quantized caches go to split-K first."""
    q = torch.randn(2, 1, HKV, HQ // HKV, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 4096, HKV, 1, D, device="cuda", dtype=torch.bfloat16).expand(2, 4096, HKV, HQ // HKV, D)
    assert dispatch.fw_priority_list(Inputs(q, k, k), needs_gradient=False)[0] is sk.FwOp
    assert dispatch.fw_priority_list(Inputs(q, k, k), needs_gradient=True)[0] is not sk.FwOp
    long_q = torch.randn(2, 512, HKV, HQ // HKV, D, device="cuda", dtype=torch.bfloat16)
    assert dispatch.fw_priority_list(Inputs(long_q, k, k), needs_gradient=False)[0] is not sk.FwOp
    kq = quantize.quantize_kv_int4(torch.randn(2, 4096, HKV, 1, D, device="cuda"))
    kq = kq.expand(2, 4096, HKV, HQ // HKV, -1)
    out = fmha.memory_efficient_attention_forward(q, kq, kq)
    assert out.shape == q.shape and out.isfinite().all()
