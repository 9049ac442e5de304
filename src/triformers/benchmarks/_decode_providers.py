"""Inputs, float32 reference and providers of the decoding benchmark (:mod:`triformers.benchmarks.decode`).

Layouts: triformers takes BMGHK ``q [B, Mq, Hkv, Hq / Hkv, D]`` with K/V ``[B, L, Hkv, 1, D]`` expanded over the
query heads of each group (stride 0, never copied); caches with per-sequence lengths are packed along M
(``[1, B * L, ...]``) with a KV-cache bias. SDPA and flex take ``[B, H, M, D]`` views of the same tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha.reference import ref_attention


@dataclass
class DecodeInputs:
    c: object  # decode.Case
    q5: torch.Tensor  # [B, Mq, Hkv, g, D]
    k_base: torch.Tensor  # [B, L, Hkv, 1, D] (logical cache, bf16)
    v_base: torch.Tensor
    lens: torch.Tensor  # [B] int32
    args: tuple  # what the triformers providers pass: (q, k, v, attn_bias)
    fp8_scales: tuple | None = None  # (k_scale_shift, v_scale_shift) for the fp8 cache
    deq: tuple | None = None  # dequantized (k, v) [B, L, Hkv, 1, D] for the reference


def make_inputs(c, Hq: int, D: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> DecodeInputs:
    gen = torch.Generator(device=device).manual_seed(c.B * 131 + c.L + c.Hkv + c.Mq)
    dt, dev = dtype, device
    g = Hq // c.Hkv

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=dev, dtype=dt)

    q5 = rnd(c.B, c.Mq, c.Hkv, g, D)
    k_base, v_base = rnd(c.B, c.L, c.Hkv, 1, D), rnd(c.B, c.L, c.Hkv, 1, D)
    lens = torch.tensor(c.lens, dtype=torch.int32, device=dev)
    B, L, Mq = c.B, c.L, c.Mq

    def expand(x):  # [..., Hkv, 1, X] -> [..., Hkv, g, X], a stride-0 view
        return x.expand(*x.shape[:-2], g, x.shape[-1])

    if c.cache in ("int4", "fp8"):
        from triformers.ops.fmha import quantize

        if c.cache == "int4":
            kq, vq = quantize.quantize_kv_int4(k_base), quantize.quantize_kv_int4(v_base)
            deq = (quantize.dequantize_kv_int4(kq, dtype=dt), quantize.dequantize_kv_int4(vq, dtype=dt))
            return DecodeInputs(c, q5, k_base, v_base, lens, (q5, expand(kq), expand(vq), None), deq=deq)
        (kq, ks), (vq, vs) = quantize.quantize_kv_fp8(k_base), quantize.quantize_kv_fp8(v_base)
        deq = (quantize.dequantize_kv_fp8(kq, ks, dtype=dt), quantize.dequantize_kv_fp8(vq, vs, dtype=dt))
        scales = (ks.expand(*ks.shape[:-1], g), vs.expand(*vs.shape[:-1], g))
        return DecodeInputs(c, q5, k_base, v_base, lens, (q5, expand(kq), expand(vq), None), fp8_scales=scales,
                            deq=deq)
    if c.cache == "contiguous" and Mq == 1:
        return DecodeInputs(c, q5, k_base, v_base, lens, (q5, expand(k_base), expand(v_base), None))
    q_packed = q5.reshape(1, B * Mq, c.Hkv, g, D)
    if c.cache.startswith("paged"):
        page = c.page_size
        n_pages = B * L // page
        perm = torch.randperm(n_pages, generator=torch.Generator().manual_seed(n_pages)).to(dev)
        # physical page perm[p] holds logical page p (row b's pages are b * L / page ...)
        k_pool, v_pool = (torch.empty(n_pages, page, c.Hkv, 1, D, device=dev, dtype=dt) for _ in range(2))
        k_pool[perm] = k_base.view(n_pages, page, c.Hkv, 1, D)
        v_pool[perm] = v_base.view(n_pages, page, c.Hkv, 1, D)
        block_tables = perm.view(B, L // page).to(torch.int32)
        bias = ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
            q_seqlen=[Mq] * B, kv_seqlen=c.lens, block_tables=block_tables, page_size=page, device=dev)
        k, v = (x.view(1, n_pages * page, c.Hkv, 1, D) for x in (k_pool, v_pool))
        return DecodeInputs(c, q5, k_base, v_base, lens, (q_packed, expand(k), expand(v), bias))
    # padded, or several queries per sequence: the cache packed along M with the KV-cache causal bias
    bias = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        q_seqlen=[Mq] * B, kv_padding=L, kv_seqlen=c.lens, device=dev)
    k, v = (x.view(1, B * L, c.Hkv, 1, D) for x in (k_base, v_base))
    return DecodeInputs(c, q5, k_base, v_base, lens, (q_packed, expand(k), expand(v), bias))


def reference_seq0(inp: DecodeInputs) -> torch.Tensor:
    """Float32 attention of the first sequence: ``[Mq, Hq, D]``."""
    c = inp.c
    n = c.lens[0]
    k, v = inp.deq if inp.deq is not None else (inp.k_base, inp.v_base)
    g = inp.q5.shape[3]
    k0, v0 = (x[:1, :n].expand(1, n, c.Hkv, g, x.shape[-1]) for x in (k, v))
    bias = ab.LowerTriangularFromBottomRightMask() if c.Mq > 1 else None
    with torch.no_grad():
        out, _ = ref_attention(inp.q5[:1], k0, v0, bias, dtype=torch.float32)
    return out.reshape(c.Mq, -1, out.shape[-1])


def check_seq0(out: torch.Tensor, ref: torch.Tensor, inp: DecodeInputs) -> None:
    """``out`` (any layout holding ``[B * Mq, Hq, D]`` in order) against the first sequence's reference."""
    c = inp.c
    got = out.reshape(c.B, c.Mq, -1, out.shape[-1])[0].float()
    err = (got - ref).abs().max().item()
    tol = 2e-2 * max(1.0, ref.abs().max().item())
    if not math.isfinite(err) or err > tol:
        raise AssertionError(f"output differs from the float32 reference by {err:.3g} (tolerance {tol:.3g})")


def _bhmd(inp: DecodeInputs):
    """SDPA/flex views: q ``[B, Hq, Mq, D]``, k/v ``[B, Hkv, L, D]`` (dense logical cache)."""
    c = inp.c
    q = inp.q5.reshape(c.B, c.Mq, -1, inp.q5.shape[-1]).transpose(1, 2)
    k, v = (x.squeeze(3).transpose(1, 2) for x in (inp.k_base, inp.v_base))
    return q, k, v


def _allowed(inp: DecodeInputs) -> torch.Tensor | None:
    """Boolean ``[B, 1, Mq, L]`` mask of allowed keys (None when every key is allowed)."""
    c = inp.c
    if c.cache == "contiguous" and c.Mq == 1:
        return None
    j = torch.arange(c.L, device=inp.q5.device).view(1, 1, 1, -1)
    i = torch.arange(c.Mq, device=inp.q5.device).view(1, 1, -1, 1)
    lens = inp.lens.view(-1, 1, 1, 1)
    return (j < lens) & (j <= lens - c.Mq + i)


def _sdpa(inp: DecodeInputs, backend=None):
    from torch.nn.attention import sdpa_kernel

    if inp.c.cache.startswith("paged"):
        raise NotImplementedError("SDPA has no paged KV cache")
    q, k, v = _bhmd(inp)
    mask = _allowed(inp)
    c = inp.c

    def fn():
        if backend is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(c.B * c.Mq, -1, out.shape[-1])

    return fn


def _flex(inp: DecodeInputs):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    c = inp.c
    if c.cache.startswith("paged"):
        raise NotImplementedError("not measured: flex's paged attention is experimental in torch")
    q, k, v = _bhmd(inp)
    block_mask = None
    if not (c.cache == "contiguous" and c.Mq == 1):
        lens, mq = inp.lens, c.Mq

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < lens[b]) & (kv_idx <= lens[b] - mq + q_idx)

        block_mask = create_block_mask(mask_mod, c.B, None, c.Mq, c.L, device=inp.q5.device)
    compiled = _compiled_flex(flex_attention)

    def fn():
        out = compiled(q, k, v, block_mask=block_mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(c.B * c.Mq, -1, out.shape[-1])

    return fn


_FLEX = {}


def _compiled_flex(flex_attention):
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _triformers(inp: DecodeInputs, op=None):
    q, k, v, bias = inp.args
    c = inp.c
    if inp.fp8_scales is not None:
        from triformers.ops.fmha import triton_splitk

        splitk = op if op is not None else triton_splitk.FwOp

        def fn():
            fp8 = triton_splitk.InputsFp8(query=q, key=k, value=v, attn_bias=bias,
                                          k_fp8_scale_shift=inp.fp8_scales[0], v_fp8_scale_shift=inp.fp8_scales[1])
            return splitk.apply(fp8, needs_gradient=False)[0].reshape(c.B * c.Mq, -1, q.shape[-1])

        return fn

    def fn():
        out = fmha.memory_efficient_attention_forward(q, k, v, bias, op=op)
        return out.reshape(c.B * c.Mq, -1, out.shape[-1])

    return fn


def _copy(inp: DecodeInputs):
    n = inp.c.kv_bytes()
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=inp.q5.device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def provider(name: str, inp: DecodeInputs):
    """A zero-argument callable running one decoding step of ``inp`` with provider ``name``."""
    from torch.nn.attention import SDPBackend

    if name == "triformers":
        return _triformers(inp)
    if name == "triformers_splitk":
        from triformers.ops.fmha import triton_splitk

        return _triformers(inp, triton_splitk.FwOp)
    if name == "triformers_triton":
        return _triformers(inp, fmha.triton.FwOp)
    if name == "sdpa":
        return _sdpa(inp)
    if name == "sdpa_flash":
        return _sdpa(inp, SDPBackend.FLASH_ATTENTION)
    if name == "sdpa_efficient":
        return _sdpa(inp, SDPBackend.EFFICIENT_ATTENTION)
    if name == "flex":
        return _flex(inp)
    if name == "copy":
        return _copy(inp)
    raise ValueError(f"unknown provider {name!r}")
