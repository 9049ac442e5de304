"""fmha.triton_splitk and the merge kernel under Triton's interpreter (fp16/fp32): dense, GQA/MQA and every
KV-cache bias against a float64 reference built from the logical caches, NaN in every unused row and page,
split counts, output dtype, partial mode, lse layout, int4/fp8 caches against their dequantized values, and
every ValueError. ``make_kv_case`` builds the inputs; the GPU tests use it at real sizes."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha import dispatch, quantize
from triformers.ops.fmha import triton_splitk as sk
from triformers.ops.fmha._triton.merge import merge_partials
from triformers.ops.fmha.common import Inputs
from triformers.ops.fmha.merge import merge_partials_torch
from triformers.ops.fmha.reference import ref_attention

pytestmark = pytest.mark.skipif(not sk.FwOp.is_available(), reason="triton is not installed")

# (out atol, out rtol, lse atol) against float64: fp32 is exact products and sums; fp16 rounds the output and the
# probabilities that multiply V (2**-11 relative).
TOL = {torch.float32: (3e-5, 3e-5, 3e-5), torch.float16: (2e-3, 2e-3, 1e-4), torch.bfloat16: (2e-2, 2e-2, 2e-3)}
WL, WR, WINDOW = 3, 2, 5  # local windows of the local biases
F16_NAN, FP8_NAN = 0x7E00, 0x7F  # a NaN fp16 (both halves of a scale|shift word) and a NaN e4m3 byte

PADDED = (
    ab.BlockDiagonalPaddedKeysMask,
    ab.BlockDiagonalCausalWithOffsetPaddedKeysMask,
    ab.BlockDiagonalLocalAttentionPaddedKeysMask,
    ab.BlockDiagonalCausalLocalAttentionPaddedKeysMask,
)
GAPPY = (
    ab.BlockDiagonalGappyKeysMask,
    ab.BlockDiagonalCausalWithOffsetGappyKeysMask,
    ab.BlockDiagonalLocalAttentionFromBottomRightGappyKeysMask,
)
PAGED = (
    ab.PagedBlockDiagonalPaddedKeysMask,
    ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
    ab.PagedBlockDiagonalCausalLocalPaddedKeysMask,
)
PAGED_GAPPY = (ab.PagedBlockDiagonalGappyKeysMask, ab.PagedBlockDiagonalCausalWithOffsetGappyKeysMask)
KV_BIASES = PADDED + GAPPY + PAGED + PAGED_GAPPY


def _rule(bias_type):
    """The dense mask each sequence sees (bottom-right within its keys)."""
    name = bias_type.__name__
    if "CausalLocal" in name:
        return ab.LowerTriangularFromBottomRightLocalAttentionMask(WINDOW)
    if "Local" in name:
        return ab.LocalAttentionFromBottomRightMask(WL, WR)
    if "Causal" in name:
        return ab.LowerTriangularFromBottomRightMask()
    return None


@dataclass
class KVCase:
    """Inputs of one call and their float64 reference (out in the query's layout, lse as the operator packs
    it), and which cache rows some sequence reads (all others hold NaN)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    bias: object
    ref_out: torch.Tensor
    ref_lse: torch.Tensor
    used_rows: torch.Tensor  # bool [rows]: rows some sequence reads


def _reference(q, k_log, v_log, bias_type, q_lens, scale=None):
    """Per-sequence float64 attention over the logical keys, packed as the operator returns it."""
    outs, lses, start = [], [], 0
    for b, n in enumerate(q_lens):
        qb = q[:, start : start + n].double()
        out, lse = ref_attention(qb, k_log[b], v_log[b], _rule(bias_type), scale=scale)
        outs.append(out)
        lses.append(lse)
        start += n
    return torch.cat(outs, 1), torch.cat(lses, -1)


def make_kv_case(
    bias_type,
    q_lens,
    kv_lens,
    *,
    D=32,
    Dv=None,
    G=2,
    H=2,
    gqa=True,
    bmhk=False,
    page_size=16,
    dtype=torch.float16,
    device="cpu",
    seed=0,
    scale=None,
) -> KVCase:
    """Random inputs for a KV-cache ``bias_type`` with ``q_lens[b]`` queries and ``kv_lens[b]`` keys per
    sequence; every cache row (and page) no sequence uses holds NaN. BMGHK ``[1, M, G, H, D]`` with K/V shared
    over the ``H`` query heads of each group when ``gqa`` (stride 0); with ``bmhk``, group 0 alone as BMHK."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    B, Hk = len(q_lens), 1 if gqa else H

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if bias_type in PADDED:
        padding = max(kv_lens) + 3  # slots not a multiple of any key block
        rows = [list(range(b * padding, b * padding + n)) for b, n in enumerate(kv_lens)]
        total = B * padding
    elif bias_type in GAPPY:
        starts, pos = [], 2
        for n in kv_lens:
            starts.append(pos)
            pos += n + rng.randint(1, 9)
        total = pos + 1
        rows = [list(range(s, s + n)) for s, n in zip(starts, kv_lens)]
    else:
        offsets = [rng.randint(0, 2 * page_size) if bias_type in PAGED_GAPPY else 0 for _ in kv_lens]
        width = max(-(-(o + n) // page_size) for o, n in zip(offsets, kv_lens)) + 1
        num_pages = B * width + 3  # spare pages nobody maps
        perm = torch.randperm(num_pages, generator=gen)[: B * width].reshape(B, width)
        table = perm.to(torch.int32).to(device)
        rows = [
            [int(perm[b, t // page_size]) * page_size + t % page_size for t in range(o, o + n)]
            for b, (o, n) in enumerate(zip(offsets, kv_lens))
        ]
        total = num_pages * page_size
    k_phys, v_phys = (rnd(1, total, G, Hk, d).to(dtype).double() for d in (D, Dv))  # the values the kernel reads
    used = torch.zeros(total, dtype=torch.bool)
    for r in rows:
        used[r] = True
    k_log = [k_phys[:, r].expand(1, len(r), G, H, D) for r in rows]
    v_log = [v_phys[:, r].expand(1, len(r), G, H, Dv) for r in rows]
    q = rnd(1, sum(q_lens), G, H, D).to(dtype)
    ref_out, ref_lse = _reference(q, k_log, v_log, bias_type, q_lens, scale)
    k_phys[:, ~used] = math.nan
    v_phys[:, ~used] = math.nan
    k, v = k_phys.to(dtype).to(device).expand(1, total, G, H, D), v_phys.to(dtype).to(device).expand(1, total, G, H, Dv)
    if bias_type in PADDED:
        bias = _padded_bias(bias_type, q_lens, padding, kv_lens, device)
    elif bias_type in GAPPY:
        seqstarts = [*starts, total]
        if bias_type is ab.BlockDiagonalLocalAttentionFromBottomRightGappyKeysMask:
            bias = bias_type.from_seqlens_local_gappy(q_lens, seqstarts, kv_lens, WL, WR, device=device)
        else:
            bias = bias_type.from_seqlens(q_lens, seqstarts, kv_lens, device=device)
    elif bias_type in PAGED_GAPPY:
        bias = bias_type.from_seqlens(q_lens, offsets, kv_lens, table, page_size, device=device)
    elif bias_type is ab.PagedBlockDiagonalCausalLocalPaddedKeysMask:
        bias = bias_type.from_seqlens_local(q_lens, kv_lens, table, page_size, WINDOW, device=device)
    else:
        bias = bias_type.from_seqlens(q_lens, kv_lens, table, page_size, device=device)
    q = q.to(device)
    if bmhk:  # G = 1: BMHK views of the same data
        q, k, v, ref_out = q[:, :, 0], k[:, :, 0], v[:, :, 0], ref_out[:, :, 0]
        ref_lse = ref_lse[:, 0]
    return KVCase(q, k, v, bias, ref_out, ref_lse, used)


def _padded_bias(bias_type, q_lens, padding, kv_lens, device):
    if bias_type is ab.BlockDiagonalLocalAttentionPaddedKeysMask:
        return bias_type.from_seqlens_local(q_lens, padding, kv_lens, WL, WR, device=device)
    if bias_type is ab.BlockDiagonalCausalLocalAttentionPaddedKeysMask:
        return bias_type.from_seqlens_local(q_lens, padding, kv_lens, WINDOW, device=device)
    return bias_type.from_seqlens(q_lens, padding, kv_lens, device=device)


def check(out, lse, ref_out, ref_lse, dtype):
    atol, rtol, lse_atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out.double(), atol=atol, rtol=rtol)
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert torch.equal(lse.isneginf(), ref_lse.isneginf()), "rows without keys must have lse -inf, the others finite"
    torch.testing.assert_close(lse.double().nan_to_num(neginf=0), ref_lse.nan_to_num(neginf=0), atol=lse_atol, rtol=0)


def run(op, inp):
    out, ctx = op.apply(inp, needs_gradient=True)
    return out, ctx.lse


# ---------------------------------------------------------------------------------------------------------
# merge kernel
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("K", [1, 40])
def test_merge_partials(dtype, K):
    """Strided views in and out, parts without keys (-inf, their rows NaN), rows no part saw, odd K."""
    S, B, M, G, H = 3, 2, 17, 2, 3
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    attn = torch.randn(S, B, G, H, M, K + 3, dtype=dtype).permute(0, 1, 4, 2, 3, 5)[..., :K]
    lse = torch.randn(S, B, M, H, G, dtype=lse_dtype).permute(0, 1, 4, 3, 2) * 3
    lse[0, 0, :, :, :5] = -math.inf
    attn[0, 0, :5] = math.nan
    lse[:, 1, 1, 2, 3] = -math.inf
    attn[:, 1, 3, 1, 2] = math.nan
    out = torch.empty(B, M, H, G, K + 1, dtype=dtype).transpose(2, 3)[..., :K]
    lse_out = torch.empty(B, M, G, H, dtype=lse_dtype).permute(0, 2, 3, 1)
    merge_partials(attn, lse, out, lse_out)
    # float64 reference: out = sum_s exp(lse_s) attn_s / sum_s exp(lse_s), on the parts that saw keys
    w = torch.exp(lse.double()).permute(0, 1, 4, 2, 3)[..., None]  # [S, B, M, G, H, 1]
    num = torch.where(w > 0, w * attn.double(), 0.0).sum(0)
    den = w.sum(0)
    ref = torch.where(den > 0, num / den.clamp_min(1e-300), 0.0)
    ref_lse = torch.log(den.squeeze(-1)).permute(0, 2, 3, 1)
    tol = {torch.float16: 2e-3, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    assert torch.isneginf(lse_out[1, 1, 2, 3]) and out[1, 3, 1, 2].eq(0).all()
    torch.testing.assert_close(lse_out.double(), ref_lse, atol=tol, rtol=tol)
    t_out, t_lse = merge_partials_torch(attn, lse)
    torch.testing.assert_close(t_out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(t_lse.double(), ref_lse, atol=tol, rtol=tol)
    out2 = torch.empty_like(out)
    merge_partials(attn, lse, out2, None)
    assert torch.equal(out2, out)


def test_merge_partials_recovers_attention():
    """Attention over key chunks, merged, equals attention over all keys (an empty chunk included)."""
    q, k, v = torch.randn(2, 5, 3, 24), torch.randn(2, 41, 3, 24), torch.randn(2, 41, 3, 24)
    cuts = [0, 13, 13, 30, 41]
    parts = [ref_attention(q, k[:, a:b], v[:, a:b]) for a, b in zip(cuts, cuts[1:])]
    attn = torch.stack([o.unsqueeze(2) for o, _ in parts])  # [S, B, M, 1, H, K]
    lse = torch.stack([lse_.unsqueeze(1) for _, lse_ in parts])  # [S, B, 1, H, M]
    out, lse_out = torch.empty(2, 5, 1, 3, 24, dtype=torch.float64), torch.empty(2, 1, 3, 5, dtype=torch.float64)
    merge_partials(attn, lse, out, lse_out)
    ref, ref_lse = ref_attention(q, k, v)
    torch.testing.assert_close(out[:, :, 0], ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse_out[:, 0], ref_lse, atol=1e-12, rtol=1e-12)


def test_merge_partials_errors():
    attn, lse = torch.randn(2, 1, 3, 1, 2, 8), torch.randn(2, 1, 1, 2, 3)
    with pytest.raises(ValueError, match=r"lse.shape=\(2, 1, 1, 2, 3\)"):
        merge_partials(attn, lse.transpose(-1, -2), torch.empty(1, 3, 1, 2, 8), None)
    with pytest.raises(ValueError, match="float32 or float64"):
        merge_partials(attn, lse.half(), torch.empty(1, 3, 1, 2, 8), None)
    with pytest.raises(ValueError, match=r"out.stride\(-1\)=2"):
        merge_partials(attn, lse, torch.empty(1, 3, 1, 2, 16)[..., ::2], None)


# ---------------------------------------------------------------------------------------------------------
# dense batches
# ---------------------------------------------------------------------------------------------------------


def _dense(B, Mq, Mkv, G, H, D, layout, dtype, Dv=None):
    """q and K/V for ``layout``: "mha" (BMHK), "mqa" (BMHK, K/V stride 0 over heads), "gqa" (BMGHK)."""
    Dv = Dv or D
    if layout == "gqa":
        kb, vb = torch.randn(B, Mkv, G, 1, D), torch.randn(B, Mkv, G, 1, Dv)
        return (
            torch.randn(B, Mq, G, H, D).to(dtype),
            kb.to(dtype).expand(B, Mkv, G, H, D),
            vb.to(dtype).expand(B, Mkv, G, H, Dv),
        )
    heads = G * H
    if layout == "mqa":
        kb, vb = torch.randn(B, Mkv, 1, D), torch.randn(B, Mkv, 1, Dv)
        return (
            torch.randn(B, Mq, heads, D).to(dtype),
            kb.to(dtype).expand(B, Mkv, heads, D),
            vb.to(dtype).expand(B, Mkv, heads, Dv),
        )
    return tuple(torch.randn(B, n, heads, d).to(dtype) for n, d in ((Mq, D), (Mkv, D), (Mkv, Dv)))


@pytest.mark.parametrize(
    "layout,dtype,Mq,D,Dv,bias",
    [
        ("gqa", torch.float16, 1, 64, 64, None),
        ("gqa", torch.float32, 3, 40, 24, ab.LowerTriangularFromBottomRightMask()),
        ("mqa", torch.float16, 5, 128, 128, ab.LowerTriangularFromBottomRightLocalAttentionMask(7)),
        ("mha", torch.float16, 16, 32, 32, ab.LocalAttentionFromBottomRightMask(4, 1)),
        ("mha", torch.float32, 2, 256, 256, ab.LowerTriangularMask()),
    ],
)
def test_dense(layout, dtype, Mq, D, Dv, bias):
    q, k, v = _dense(2, Mq, 67, 2, 3, D, layout, dtype, Dv)
    out, lse = run(sk.FwOp.get_operator(3), Inputs(q, k, v, bias, scale=0.3))
    ref, ref_lse = ref_attention(q, k, v, bias, scale=0.3)
    check(out, lse, ref, ref_lse, dtype)


def test_split_counts_agree_and_bmk():
    """split_k 1, 2, 3, 7 (FwOp.get_operator) give the reference; BMK inputs keep their layout."""
    q, k, v = torch.randn(3, 2, 20), torch.randn(3, 83, 20), torch.randn(3, 83, 20)
    ref, ref_lse = ref_attention(q, k, v)
    outs = []
    for splits in (1, 2, 3, 7):
        out, lse = run(sk.FwOp.get_operator(splits), Inputs(q, k, v))
        check(out, lse, ref, ref_lse, torch.float32)
        outs.append(out)
    assert out.shape == q.shape and lse.shape == (3, 1, 2)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=1e-6)


def test_output_dtype_partial_and_empty_keys():
    q, k, v = _dense(2, 3, 50, 1, 2, 16, "gqa", torch.float16)
    ref, ref_lse = ref_attention(q, k, v)
    out, _ = sk.FwOp.apply(Inputs(q, k, v, output_dtype=torch.float32), False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=1e-3)
    out, lse = fmha.memory_efficient_attention_partial(q, k, v, op=sk.FwOp_S2)
    assert out.dtype == torch.float32 and lse.shape == (2, 1, 2, 3)
    check(out, lse, ref, ref_lse, torch.float16)
    out, lse = run(sk.FwOp, Inputs(q, k[:, :0], v[:, :0]))
    assert out.eq(0).all() and lse.isneginf().all()


# ---------------------------------------------------------------------------------------------------------
# KV-cache biases
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_type", KV_BIASES, ids=lambda t: t.__name__)
def test_kv_cache_biases(bias_type):
    """Every KV-cache bias: decoding rows (1 query), several queries, an empty cache; NaN in unused rows."""
    causal = "Causal" in bias_type.__name__ or "Local" in bias_type.__name__
    q_lens = [1, 4, 2, 1] if causal else [1, 3, 1, 2]
    kv_lens = [37, 71, 0, 20]
    case = make_kv_case(bias_type, q_lens, kv_lens, seed=hash(bias_type.__name__) % 1000)
    for splits in (1, 3):
        out, lse = run(sk.FwOp.get_operator(splits), Inputs(case.query, case.key, case.value, case.bias))
        check(out, lse, case.ref_out, case.ref_lse, torch.float16)


@pytest.mark.parametrize("page_size", [16, 24, 64])
def test_paged_page_sizes_bmhk_mha(page_size):
    """Pages of one or several key blocks, and of a size no key block divides (rows gathered one by one);
    BMHK with one K/V head per query head (no sharing)."""
    case = make_kv_case(
        ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
        [2, 1, 3],
        [150, 9, 64],
        D=24,
        gqa=False,
        bmhk=True,
        page_size=page_size,
        dtype=torch.float32,
        seed=page_size,
    )
    out, lse = run(sk.FwOp_S2, Inputs(case.query, case.key, case.value, case.bias))
    check(out, lse, case.ref_out, case.ref_lse, torch.float32)


def test_in_place_length_update():
    """A bias whose device lengths change in place (CUDA-graph decoding): the kernel reads the new ones."""
    q_lens, kv_lens = [1, 1], [30, 50]
    case = make_kv_case(ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask, q_lens, [31, 52])
    op = sk.FwOp_S2
    run(op, Inputs(case.query, case.key, case.value, case.bias))  # caches the launch arguments
    case.bias.k_seqinfo.seqlen.copy_(torch.tensor(kv_lens, dtype=torch.int32))  # the Python lists stay stale
    out, lse = run(op, Inputs(case.query, case.key, case.value, case.bias))
    table = case.bias.block_tables
    k_log = [
        case.key[:, [int(table[b, t // 16]) * 16 + t % 16 for t in range(n)]].double() for b, n in enumerate(kv_lens)
    ]
    v_log = [
        case.value[:, [int(table[b, t // 16]) * 16 + t % 16 for t in range(n)]].double() for b, n in enumerate(kv_lens)
    ]
    ref, ref_lse = _reference(case.query, k_log, v_log, type(case.bias), q_lens)
    check(out, lse, ref, ref_lse, torch.float16)
    # a table entry pointing past the cache (written after the host-side check): the kernel reads nothing there
    table[1, 0] = 1 << 30
    out, lse = run(op, Inputs(case.query, case.key, case.value, case.bias))
    assert out.isfinite().all() and lse.isfinite().all()


# ---------------------------------------------------------------------------------------------------------
# quantized caches
# ---------------------------------------------------------------------------------------------------------


def _int4_op(groups, interleaved=False):
    attrs = {"NUM_GROUPS": groups, "NAME": f"S2_{groups}", "INT4_INTERLEAVED": interleaved}
    return type(f"S2_{groups}", (sk.FwOp_S2,), attrs)


@pytest.mark.parametrize("interleaved", [False, True], ids=["unpacked", "interleaved"])
@pytest.mark.parametrize(
    "groups,dtype,D",
    [(1, torch.float16, 64), (2, torch.float32, 64), (4, torch.float16, 64), (8, torch.float16, 64),
     # fp16 queries at D >= 128: the joined unpacking, or the eight interleaved products (splitk_int4)
     (1, torch.float16, 128), (2, torch.float16, 128), (8, torch.float16, 256)],
)
def test_int4_dense(groups, dtype, D, interleaved):
    B, Mq, Mkv, G, H = 2, 2, 45, 2, 2
    q = torch.randn(B, Mq, G, H, D).to(dtype)
    kq = quantize.quantize_kv_int4(torch.randn(B, Mkv, G, 1, D) * 2, groups)
    vq = quantize.quantize_kv_int4(torch.randn(B, Mkv, G, 1, D) + 1, groups)
    k, v = (quantize.dequantize_kv_int4(x, groups, torch.float64).expand(B, Mkv, G, H, D) for x in (kq, vq))
    bias = ab.LowerTriangularFromBottomRightMask()
    op = _int4_op(groups, interleaved)
    out, lse = run(op, Inputs(q, kq.expand(B, Mkv, G, H, -1), vq.expand(B, Mkv, G, H, -1), bias))
    ref, ref_lse = ref_attention(q, k, v, bias)
    assert out.shape == q.shape and out.dtype == dtype
    if groups == 1:
        check(out, lse, ref, ref_lse, dtype)
    else:  # group-wise caches are dequantized to the query dtype before the products (K and V rounded)
        torch.testing.assert_close(out.double(), ref, atol=4e-3, rtol=4e-3)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-3, rtol=0)


def _poison_int4(x: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """NaN scale and shift (and random nibbles) in the rows no sequence reads."""
    x = x.clone()
    x[:, ~used, ..., :1] = F16_NAN | (F16_NAN << 16)
    x[:, ~used, ..., 1:] = torch.randint(-(2**31), 2**31 - 1, x[:, ~used, ..., 1:].shape, dtype=torch.int32)
    return x


@pytest.mark.parametrize("kind,D", [("int4", 32), ("fp8", 32), ("int4", 128), ("int4-interleaved", 128)])
def test_quantized_paged(kind, D):
    """A paged quantized cache (pages of 16, shuffled) with NaN coefficients and data in every unused row."""
    bias_type = ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask
    case = make_kv_case(bias_type, [1, 3, 2], [40, 61, 0], D=D, dtype=torch.float32, seed=3)
    used = case.used_rows
    clean_k, clean_v = (x[:, :, :, :1].nan_to_num() for x in (case.key, case.value))  # [1, rows, G, 1, D]
    q = case.query.half()
    if kind.startswith("int4"):
        kq, vq = quantize.quantize_kv_int4(clean_k), quantize.quantize_kv_int4(clean_v)
        k_deq, v_deq = (quantize.dequantize_kv_int4(x, 1, torch.float64) for x in (kq, vq))
        kq, vq = _poison_int4(kq, used), _poison_int4(vq, used)
        G, H = q.shape[2:4]
        inp = Inputs(q, kq.expand(*kq.shape[:3], H, -1), vq.expand(*vq.shape[:3], H, -1), case.bias)
    else:
        (kq, ks), (vq, vs) = quantize.quantize_kv_fp8(clean_k), quantize.quantize_kv_fp8(clean_v)
        k_deq, v_deq = (quantize.dequantize_kv_fp8(x, s, torch.float64) for x, s in ((kq, ks), (vq, vs)))
        for x in (kq, vq):
            x[:, ~used] = FP8_NAN * 0x01010101
        for s in (ks, vs):
            s[:, ~used] = F16_NAN | (F16_NAN << 16)
        G, H = q.shape[2:4]
        inp = sk.InputsFp8(
            q,
            kq.expand(*kq.shape[:3], H, -1),
            vq.expand(*vq.shape[:3], H, -1),
            case.bias,
            k_fp8_scale_shift=ks.expand(*ks.shape[:3], H),
            v_fp8_scale_shift=vs.expand(*vs.shape[:3], H),
        )
    table = case.bias.block_tables
    rows = [[int(table[b, t // 16]) * 16 + t % 16 for t in range(n)] for b, n in enumerate([40, 61, 0])]
    k_log = [k_deq[:, r].expand(1, len(r), G, H, D) for r in rows]
    v_log = [v_deq[:, r].expand(1, len(r), G, H, D) for r in rows]
    ref, ref_lse = _reference(q, k_log, v_log, bias_type, [1, 3, 2])
    op = sk.FwOp.get_operator(2, int4_interleaved=kind == "int4-interleaved")
    out, lse = run(op, inp)
    check(out, lse, ref, ref_lse, torch.float16)


# ---------------------------------------------------------------------------------------------------------
# errors, dispatch
# ---------------------------------------------------------------------------------------------------------


def test_errors():
    q = torch.randn(1, 2, 2, 64, dtype=torch.float16)
    kq = quantize.quantize_kv_int4(torch.randn(1, 40, 2, 64))
    with pytest.raises(ValueError, match=r"\(key.shape\[-1\] - NUM_GROUPS\) \* 8 = 56"):
        sk.FwOp.apply(Inputs(q, kq[..., 1:], kq[..., 1:]), False)
    with pytest.raises(ValueError, match=r"query.shape\[-1\]=56 is not divisible by 8 \* NUM_GROUPS = 64"):
        _int4_op(8).apply(Inputs(q[..., :56], kq, kq), False)
    kf, ks = quantize.quantize_kv_fp8(torch.randn(1, 40, 2, 64))
    with pytest.raises(ValueError, match=r"FP8 scales have to be provided in BMH or BMGH format: k_fp8_scale_shift"):
        sk.FwOp.apply(sk.InputsFp8(q, kf, kf, k_fp8_scale_shift=ks[:, :, :1], v_fp8_scale_shift=ks), False)
    with pytest.raises(ValueError, match="Only row-wise fp8"):
        _int4_op(2).apply(sk.InputsFp8(q, kf, kf, k_fp8_scale_shift=ks, v_fp8_scale_shift=ks), False)
    with pytest.raises(ValueError, match=r"fp8 key.shape\[-1\]=16 words hold 64 values per row but query"):
        sk.FwOp.apply(sk.InputsFp8(q[..., :32], kf, kf, k_fp8_scale_shift=ks, v_fp8_scale_shift=ks), False)
    with pytest.raises(ValueError, match="k_fp8_scale_shift/v_fp8_scale_shift are given but key.dtype"):
        sk.FwOp.apply(sk.InputsFp8(q, q, q, k_fp8_scale_shift=ks, v_fp8_scale_shift=ks), False)
    with pytest.raises(ValueError, match="BlockDiagonalMask is not supported"):
        sk.FwOp.apply(Inputs(q, q, q, ab.BlockDiagonalMask.from_seqlens([2], device="cpu")), False)
    case = make_kv_case(ab.PagedBlockDiagonalPaddedKeysMask, [1, 1], [20, 30])
    with pytest.raises(ValueError, match=r"block_tables refers to page \d+ but the cache holds 2 pages"):
        sk.FwOp.apply(Inputs(case.query, case.key[:, :32], case.value[:, :32], case.bias), False)
    with pytest.raises(ValueError, match=r"is not a multiple of page_size=16"):
        sk.FwOp.apply(Inputs(case.query, case.key[:, :-1], case.value[:, :-1], case.bias), False)
    with pytest.raises(ValueError, match=r"describes 2 queries in total but query.shape\[1\]=1"):
        sk.FwOp.apply(Inputs(case.query[:, :1], case.key, case.value, case.bias), False)
    q1, k1 = torch.randn(1, 2, 2, 16), torch.randn(1, 16, 2, 16)
    meta = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1, 1], 8, [3, 5], device="meta")
    with pytest.raises(ValueError, match=r"tensors are on \['meta'\] but query is on cpu; move the bias with"):
        sk.FwOp.apply(Inputs(q1, k1, k1, meta), False)
    padded = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1, 1], 8, [3, 5], device="cpu")
    padded.k_seqinfo.seqlen_py[1] = 9  # as an in-place update past the slot would leave it
    with pytest.raises(ValueError, match="kv_seqlen holds 9 > padding 8"):
        sk.FwOp.apply(Inputs(q1, k1, k1, padded), False)


def test_forced_operator_reasons_and_dispatch():
    """An unsupported call names the problem (ValueError through memory_efficient_attention); int32 caches
    go to split-K; the decoding rule is a function of shapes."""
    q = torch.randn(1, 2, 2, 64, dtype=torch.float16)
    kq = quantize.quantize_kv_int4(torch.randn(1, 40, 2, 64))
    with pytest.raises(ValueError, match="NUM_GROUPS=1"):
        fmha.memory_efficient_attention_forward(q, kq[..., 1:], kq[..., 1:], op=sk.FwOp)
    with pytest.raises(ValueError, match="dropout"):
        fmha.memory_efficient_attention_forward(q, q, q, p=0.5, op=sk.FwOp)
    out = fmha.memory_efficient_attention_forward(q, kq, kq)  # dispatched: only split-K reads int32 caches
    assert out.shape == q.shape
    assert dispatch.fw_priority_list(Inputs(q, kq, kq), False) == [sk.FwOp, fmha.chunked.FwOp]
    kq4 = quantize.quantize_kv_int4(torch.randn(1, 40, 2, 64), 4)
    assert dispatch.fw_priority_list(Inputs(q, kq4, kq4), False)[0].NUM_GROUPS == 4
    assert dispatch.is_decoding(Inputs(q, torch.empty(1, 4096, 2, 64), None))
    assert not dispatch.is_decoding(Inputs(torch.empty(1, 64, 2, 64), torch.empty(1, 4096, 2, 64), None))
    n = dispatch.SPLITK_MAX_Q
    assert dispatch.is_decoding(Inputs(torch.empty(1, n, 2, 64), torch.empty(1, 4096, 2, 64), None))
    assert not dispatch.is_decoding(Inputs(torch.empty(1, n + 1, 2, 64), torch.empty(1, 4096, 2, 64), None))
    assert not dispatch.is_decoding(Inputs(q, torch.empty(1, 100, 2, 64), None))
    bias = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1, 1], 1024, [5, 9], device="cpu")
    assert dispatch.is_decoding(Inputs(q, torch.empty(1, 2048, 2, 64), None, bias))
