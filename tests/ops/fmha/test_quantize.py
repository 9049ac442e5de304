"""KV-cache quantization helpers: the exact int4 and fp8 packing (against slow bit-by-bit packers written
here from the format's description), round-trip error bounds, the errors; and quantized caches on the
pure-PyTorch chunked operator (which dequantizes each key chunk as it reads it) against float64 attention
over the dequantized cache."""

import struct

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha import quantize
from triformers.ops.fmha.common import Inputs
from triformers.ops.fmha.reference import ref_attention
from triformers.ops.fmha.triton_splitk import InputsFp8


def _f16_bits(x: float) -> int:
    return struct.unpack("<H", struct.pack("<e", x))[0]


def _word(value: int) -> int:
    """An unsigned 32-bit word as the int32 torch stores."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _slow_int4(row: torch.Tensor, groups: int) -> list[int]:
    """One row of xFormers' int4 format: per group fp16 scale = (max - min) / 15 (low half) | fp16 shift = min
    (high half), then 8 nibbles per word, nibble j of word w = level of value 8 w + j of the group, level =
    int((x - shift) / scale + 0.5) computed in float32."""
    size = row.numel() // groups
    coeffs, words = [], []
    for g in range(groups):
        vals = row[g * size : (g + 1) * size].float()
        scale = ((vals.max() - vals.min()) / 15).half()
        shift = vals.min().half()
        coeffs.append(_word(_f16_bits(float(scale)) | _f16_bits(float(shift)) << 16))
        levels = [
            0 if float(scale) == 0 else min(15, max(0, int((v - shift.float()) / scale.float() + 0.5))) for v in vals
        ]
        for w in range(size // 8):
            words.append(_word(sum(levels[8 * w + j] << (4 * j) for j in range(8))))
    return coeffs + words


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_int4_packing_is_xformers_layout(groups):
    x = torch.randn(3, 2, 64) * torch.tensor([1.0, 5.0])[None, :, None] + 0.5
    x[0, 0] = 2.5  # a constant row: scale 0, every level 0
    packed = quantize.quantize_kv_int4(x, groups)
    assert packed.dtype == torch.int32 and packed.shape == (3, 2, 64 // 8 + groups) and packed.is_contiguous()
    for idx in ((0, 0), (1, 1), (2, 0)):
        assert packed[idx].tolist() == _slow_int4(x[idx], groups), idx


@pytest.mark.parametrize("groups", [1, 8])
def test_int4_round_trip(groups):
    """Every value within half a level (plus the fp16 rounding of shift and scale) of its original."""
    x = torch.randn(5, 7, 3, 128) * 3
    deq = quantize.dequantize_kv_int4(quantize.quantize_kv_int4(x, groups), groups, torch.float64)
    xg = x.double().reshape(5, 7, 3, groups, -1)
    scale = (xg.amax(-1, keepdim=True) - xg.amin(-1, keepdim=True)) / 15
    err = (deq.reshape(xg.shape) - xg).abs()
    assert (err <= scale * 0.5 * (1 + 2e-3) + 2e-3 * xg.abs().amax(-1, keepdim=True)).all()
    assert deq.dtype == torch.float64 and deq.shape == x.shape
    bf = quantize.dequantize_kv_int4(quantize.quantize_kv_int4(x, groups), groups)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.double(), deq, atol=0.05, rtol=2**-8)


def test_fp8_packing_is_bytes_of_words():
    """Byte j of word w is element 4 w + j (e4m3 of (x - mean) / (max|x - mean| / 448)); the coefficient word
    is fp16 scale (low half) | fp16 shift (high half)."""
    x = torch.randn(4, 3, 32) * 2 + 1
    data, scale_shift = quantize.quantize_kv_fp8(x)
    assert data.dtype == scale_shift.dtype == torch.int32
    assert data.shape == (4, 3, 8) and scale_shift.shape == (4, 3)
    for idx in ((0, 0), (3, 2)):
        row = x[idx].float()
        shift = row.mean().half()
        scale = ((row - shift.float()).abs().max() / 448).half()
        codes = ((row - shift.float()) / scale.float()).to(torch.float8_e4m3fn).view(torch.uint8).tolist()
        words = [_word(sum(codes[4 * w + j] << (8 * j) for j in range(4))) for w in range(8)]
        assert data[idx].tolist() == words
        assert int(scale_shift[idx]) == _word(_f16_bits(float(scale)) | _f16_bits(float(shift)) << 16)


def test_fp8_round_trip():
    """Within e4m3's half ulp (2**-4 relative to |x - shift|) of the original, plus its subnormal step."""
    x = torch.randn(6, 5, 2, 64) * 4 - 1
    data, scale_shift = quantize.quantize_kv_fp8(x)
    deq = quantize.dequantize_kv_fp8(data, scale_shift, torch.float64)
    shift = x.double().mean(-1, keepdim=True)
    spread = (x.double() - shift).abs().amax(-1, keepdim=True)
    err = (deq - x.double()).abs()
    assert (err <= 2**-4 * (x.double() - shift).abs() * (1 + 1e-2) + 2**-9 * spread / 448 * 2 + 1e-3 * spread).all()
    constant = torch.full((2, 16), 0.75)
    d2 = quantize.dequantize_kv_fp8(*quantize.quantize_kv_fp8(constant), torch.float32)
    assert torch.equal(d2, constant)


def test_errors():
    x = torch.randn(2, 3, 40)
    with pytest.raises(ValueError, match="num_groups=3"):
        quantize.quantize_kv_int4(x, 3)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=40 must be a positive multiple of 16"):
        quantize.quantize_kv_int4(x, 2)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=42 must be a positive multiple of 4"):
        quantize.quantize_kv_fp8(torch.randn(2, 42))
    with pytest.raises(ValueError, match="floating-point tensor"):
        quantize.quantize_kv_fp8(torch.ones(2, 8, dtype=torch.int32))
    packed = quantize.quantize_kv_int4(torch.randn(2, 64))
    with pytest.raises(ValueError, match="expected an int32 int4 cache"):
        quantize.dequantize_kv_int4(packed.float())
    with pytest.raises(ValueError, match="do not split into num_groups=2"):
        quantize.dequantize_kv_int4(packed[..., :7], 2)
    data, ss = quantize.quantize_kv_fp8(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"scale_shift must be int32 of x_fp8.shape\[:-1\] = \(2, 3\)"):
        quantize.dequantize_kv_fp8(data, ss[:, :2])


@pytest.mark.parametrize("kind", ["int4", "int4_g4", "fp8"])
def test_chunked_reads_quantized_caches(kind):
    """fmha.chunked on int4 (groups read from the shapes) and fp8 caches, GQA shared, causal from the bottom
    right, against float64 attention over the dequantized cache."""
    B, Mq, Mkv, G, H, D = 2, 3, 700, 2, 3, 64  # more keys than one chunk of the chunked operator
    q = torch.randn(B, Mq, G, H, D)
    kb, vb = torch.randn(B, Mkv, G, 1, D) * 2, torch.randn(B, Mkv, G, 1, D) + 1
    expand = (B, Mkv, G, H, -1)
    bias = ab.LowerTriangularFromBottomRightMask()
    if kind == "fp8":
        (kq, ks), (vq, vs) = quantize.quantize_kv_fp8(kb), quantize.quantize_kv_fp8(vb)
        kd, vd = (quantize.dequantize_kv_fp8(x, s, torch.float64) for x, s in ((kq, ks), (vq, vs)))
        inp = InputsFp8(
            q,
            kq.expand(expand),
            vq.expand(expand),
            bias,
            k_fp8_scale_shift=ks.expand(expand[:-1]),
            v_fp8_scale_shift=vs.expand(expand[:-1]),
        )
    else:
        groups = 4 if kind == "int4_g4" else 1
        kq, vq = quantize.quantize_kv_int4(kb, groups), quantize.quantize_kv_int4(vb, groups)
        kd, vd = (quantize.dequantize_kv_int4(x, groups, torch.float64) for x in (kq, vq))
        inp = Inputs(q, kq.expand(expand), vq.expand(expand), bias)
    assert fmha.chunked.FwOp.not_supported_reasons(inp) == []
    out, ctx = fmha.chunked.FwOp.apply(inp, needs_gradient=True)
    ref, ref_lse = ref_attention(q, kd.expand(B, Mkv, G, H, D), vd.expand(B, Mkv, G, H, D), bias)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ctx.lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


def test_chunked_refuses_malformed_caches():
    q = torch.randn(1, 2, 2, 64)
    kq = quantize.quantize_kv_int4(torch.randn(1, 30, 2, 64))
    reasons = fmha.chunked.FwOp.not_supported_reasons(Inputs(q, kq[..., :-1], kq[..., :-1]))
    assert any("leaves 0" in r for r in reasons), reasons
    kq3 = torch.cat([kq[..., :2], kq], -1)  # 11 words for D = 64: 3 coefficient words, no such int4 format
    with pytest.raises(ValueError, match=r"an int4 cache has one of \(1, 2, 4, 8\) scale words per row"):
        fmha.memory_efficient_attention_forward(q, kq3, kq3, op=fmha.chunked.FwOp)
    kf, ks = quantize.quantize_kv_fp8(torch.randn(1, 30, 1, 64))
    shared = InputsFp8(
        q,
        kf.expand(1, 30, 2, 16),
        kf.expand(1, 30, 2, 16),
        k_fp8_scale_shift=ks.repeat(1, 1, 2),
        v_fp8_scale_shift=ks.expand(1, 30, 2),
    )
    assert any("shared over the query heads" in r for r in fmha.chunked.FwOp.not_supported_reasons(shared))
