"""KV-cache biases on the GPU with the Triton kernels forced: every padded/gappy/paged class in fp16 and bf16 at
realistic sizes (decoding and prefill blocks, GQA, D = 128), NaN in every unused cache row and page, forward
and every gradient (the paged backward through the chunked operator); page sizes that hold whole key tiles
(loaded as runs of rows) and ones that do not (gathered); paged equal to unpaged; a CUDA graph replayed after
in-place length updates.

Half-precision check as in test_triton_gpu.py: our error against float64 must stay within a small multiple of
the error of PyTorch's attention computed in the same dtype.
"""

import math

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha._mask import mask_spec
from triformers.ops.fmha.attn_bias_utils import KV_CACHE_TYPES, bias_name
from triformers.ops.fmha.reference import ref_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TRITON = fmha.TritonFlashAttentionOp
ERR_RATIO = 3.0
ERR_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Eight sequences: single-token decoding steps, prefill chunks, an empty query block, an empty cache
Q_LENS = [1, 1, 77, 0, 300, 1, 16, 129]
KV_LENS = [1000, 37, 77, 500, 1021, 0, 640, 129]
PADDING = 1024
SPARE_PAGES = 5


def _make_bias(bias_type, page_size: int, seed: int):
    """``(bias, Mkv)``: the sequences above as a bias of ``bias_type`` (tensors on the GPU)."""
    gen = torch.Generator().manual_seed(seed)
    name = bias_type.__name__
    if "Paged" in name:
        pages = -(-PADDING // page_size)
        order = torch.randperm(len(Q_LENS) * pages + SPARE_PAGES, generator=gen)
        tables = order[: len(Q_LENS) * pages].view(len(Q_LENS), pages).to("cuda", torch.int32)
        Mkv = (len(Q_LENS) * pages + SPARE_PAGES) * page_size
        if "Gappy" in name:
            starts = [int(torch.randint(0, PADDING - n + 1, (1,), generator=gen)) for n in KV_LENS]
            return bias_type.from_seqlens(Q_LENS, starts, KV_LENS, tables, page_size), Mkv
        if bias_type is ab.PagedBlockDiagonalCausalLocalPaddedKeysMask:
            return bias_type.from_seqlens_local(Q_LENS, KV_LENS, tables, page_size, 200, device="cuda"), Mkv
        return bias_type.from_seqlens(Q_LENS, KV_LENS, tables, page_size, device="cuda"), Mkv
    total = len(Q_LENS) * PADDING
    if "Gappy" in name:
        starts = [int(torch.randint(0, total - n + 1, (1,), generator=gen)) for n in KV_LENS]
        base = ab.BlockDiagonalGappyKeysMask.from_seqlens(Q_LENS, [*starts, total], KV_LENS, device="cuda")
        if bias_type is ab.BlockDiagonalLocalAttentionFromBottomRightGappyKeysMask:
            return bias_type(base.q_seqinfo, base.k_seqinfo, window_left=150, window_right=40), total
        return bias_type(base.q_seqinfo, base.k_seqinfo), total
    if bias_type is ab.BlockDiagonalLocalAttentionPaddedKeysMask:
        return bias_type.from_seqlens_local(Q_LENS, PADDING, KV_LENS, 150, 40, device="cuda"), total
    if bias_type is ab.BlockDiagonalCausalLocalAttentionPaddedKeysMask:
        return bias_type.from_seqlens_local(Q_LENS, PADDING, KV_LENS, 200, device="cuda"), total
    return bias_type.from_seqlens(Q_LENS, PADDING, KV_LENS, device="cuda"), total


def _unused_rows(bias, Mkv: int) -> torch.Tensor:
    spec = mask_spec(bias)
    used = torch.zeros(Mkv, dtype=torch.bool, device="cuda")
    for b, (_, _, k0, nk, _) in enumerate(spec.blocks(sum(Q_LENS), Mkv)):
        j = torch.arange(nk, device="cuda")
        used[spec.key_rows(b, j, Mkv) if spec.is_paged else k0 + j] = True
    return ~used


def _check_close(ours, lowp, exact, dtype, what):
    err = (ours.double() - exact).abs().max().item()
    ref_err = (lowp.double() - exact).abs().max().item()
    scale = exact.abs().max().item() + 1e-6
    assert math.isfinite(err), f"{what}: non-finite"
    assert err <= ERR_RATIO * ref_err + ERR_FLOOR[dtype] * max(1.0, scale), (
        f"{what}: max error {err:.3e} vs torch {dtype} attention {ref_err:.3e} (max |ref| {scale:.2f})"
    )


def _run(bias, Mkv, dtype, *, backward=True):
    """GQA BMGHK (2 groups of 4 query heads, one K/V head each), D = 128; NaN in every unused cache row."""
    G, H, D = 2, 4, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, sum(Q_LENS), G, H, D, device="cuda", generator=gen).to(dtype).requires_grad_()
    kb = torch.randn(1, Mkv, G, 1, D, device="cuda", generator=gen)
    vb = torch.randn(1, Mkv, G, 1, D, device="cuda", generator=gen)
    unused = _unused_rows(bias, Mkv)
    kb[:, unused], vb[:, unused] = math.nan, math.nan
    kb, vb = kb.to(dtype).requires_grad_(), vb.to(dtype).requires_grad_()

    def expand(t):
        return t.expand(1, Mkv, G, H, D)

    out = fmha.memory_efficient_attention(q, expand(kb), expand(vb), bias, op=TRITON)
    clean = [t.detach().nan_to_num().requires_grad_() for t in (q, kb, vb)]
    exact, _ = ref_attention(clean[0], expand(clean[1]), expand(clean[2]), bias)
    lowp, _ = ref_attention(clean[0], expand(clean[1]), expand(clean[2]), bias, dtype=None)
    _check_close(out, lowp, exact, dtype, "out")
    if not backward:
        return out
    g = torch.randn(out.shape, device="cuda", generator=gen).to(dtype)
    grads = torch.autograd.grad(out, (q, kb, vb), g)
    exact_grads = torch.autograd.grad(exact, clean, g.double())
    lowp_grads = torch.autograd.grad(lowp, clean, g)
    for name, a, b, c in zip(("dq", "dk", "dv"), grads, lowp_grads, exact_grads):
        _check_close(a, b, c.double(), dtype, name)
        if name != "dq":
            assert torch.equal(a[:, unused], torch.zeros_like(a[:, unused])), f"{name} of unused rows"
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias_type", KV_CACHE_TYPES, ids=bias_name)
def test_every_kv_bias(bias_type, dtype):
    """Forward and every gradient; paged classes with 64-key pages (whole key tiles for padded rows)."""
    bias, Mkv = _make_bias(bias_type, 64, seed=KV_CACHE_TYPES.index(bias_type))
    _run(bias, Mkv, dtype)


@pytest.mark.parametrize("page_size", [16, 100, 256])
@pytest.mark.parametrize("bias_type", [ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
                                       ab.PagedBlockDiagonalCausalWithOffsetGappyKeysMask], ids=bias_name)
def test_page_sizes(bias_type, page_size):
    """Pages smaller than a key tile and of sizes that are no power of two (rows gathered), and 256-key pages
    (whole tiles for padded rows); forward only (the backward is the chunked operator's)."""
    bias, Mkv = _make_bias(bias_type, page_size, seed=page_size)
    _run(bias, Mkv, torch.bfloat16, backward=False)


def test_paged_equals_unpaged():
    """The same keys in a padded cache and in shuffled 256-key pages give the same output."""
    unpaged, Mkv = _make_bias(ab.BlockDiagonalCausalWithOffsetPaddedKeysMask, 256, seed=1)
    pages = PADDING // 256
    order = torch.randperm(len(Q_LENS) * pages + SPARE_PAGES, generator=torch.Generator().manual_seed(2))
    tables = order[: len(Q_LENS) * pages].view(len(Q_LENS), pages).to("cuda", torch.int32)
    paged = unpaged.make_paged(tables, 256, ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask)
    q = torch.randn(1, sum(Q_LENS), 8, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, Mkv, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    t = torch.arange(PADDING, device="cuda")
    phys = (tables.long()[:, t // 256] * 256 + t % 256).reshape(-1)
    Mp = (len(Q_LENS) * pages + SPARE_PAGES) * 256
    k_paged = torch.full((1, Mp, 8, 128), math.nan, device="cuda", dtype=k.dtype).index_copy(1, phys, k)
    v_paged = torch.full((1, Mp, 8, 128), math.nan, device="cuda", dtype=v.dtype).index_copy(1, phys, v)
    out = fmha.memory_efficient_attention(q, k, v, unpaged, op=TRITON)
    out_paged = fmha.memory_efficient_attention(q, k_paged, v_paged, paged, op=TRITON)
    torch.testing.assert_close(out_paged, out, atol=0, rtol=0)  # the same tiles in the same order


def test_cuda_graph_replay_after_inplace_updates():
    """A forward captured in a CUDA graph reads the bias's own tensors: updating the lengths in place and
    replaying gives what a fresh bias gives."""
    q_lens, kv_lens = [1] * 8, [900, 37, 512, 1, 700, 64, 1000, 3]
    bias = ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        q_lens, kv_lens, torch.arange(8 * 4, device="cuda", dtype=torch.int32).view(8, 4), 256, device="cuda")
    q = torch.randn(1, 8, 2, 4, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 32 * 256, 2, 1, 128, device="cuda", dtype=torch.bfloat16).expand(1, 32 * 256, 2, 4, 128)
            for _ in range(2))
    fmha.memory_efficient_attention_forward(q, k, v, bias, op=fmha.triton.FwOp)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fmha.memory_efficient_attention_forward(q, k, v, bias, op=fmha.triton.FwOp)
    for step in range(3):
        kv_lens = [n + 1 for n in kv_lens]
        bias.k_seqinfo.seqlen.add_(1)  # the device tensor alone, as a decoding loop does between replays
        graph.replay()
        fresh = ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
            q_lens, kv_lens, bias.block_tables, 256, device="cuda")
        expected = fmha.memory_efficient_attention_forward(q, k, v, fresh, op=fmha.triton.FwOp)
        torch.testing.assert_close(out, expected, atol=0, rtol=0, msg=f"step {step}")
