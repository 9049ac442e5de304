"""Quantized KV caches for :mod:`~triformers.ops.fmha.triton_splitk`, which dequantizes them in its kernel.

Two formats, xFormers' (int32 words, so that a cache is an ordinary tensor ``[B, M, (G,) H, words]``):

- **int4**, per row (or per group of ``D / num_groups`` values) an affine map of 16 levels onto
  ``[min, max]``: ``x ~ q * scale + shift`` with ``scale = (max - min) / 15``, ``shift = min`` (both fp16).
  A row is ``num_groups`` words of ``scale`` (low 16 bits) | ``shift`` (high 16 bits), then each group's
  ``D / num_groups / 8`` words, nibble ``j`` of word ``w`` being value ``8 w + j`` of the group:
  ``D // 8 + num_groups`` words. Error: at most ``scale / 2`` per value (plus the fp16 rounding of the
  coefficients).
- **fp8** (e4m3), per (token, head): ``shift`` = the row's mean, ``scale = max|x - shift| / 448`` (448 is
  e4m3's largest value), ``x ~ fp8 * scale + shift``. Data: ``D // 4`` words, byte ``j`` of word ``w`` being
  element ``4 w + j``; coefficients in a separate int32 tensor ``[...]`` (the data's shape without its last
  dim), fp16 ``scale`` low | ``shift`` high. Error: e4m3's relative precision (2**-4) times ``|x - shift|``.
"""

from __future__ import annotations

import dataclasses

import torch

from triformers.ops.fmha import _layout

FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
INT4_LEVELS = 15  # nibbles 0..15
INT4_GROUPS = (1, 2, 4, 8)  # scale/shift pairs per int4 row


def _pack_halves(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Two fp16 tensors of one shape as int32 words ``low | high << 16`` (little-endian: ``low`` first)."""
    return torch.stack([low.to(torch.float16), high.to(torch.float16)], dim=-1).view(torch.int32).squeeze(-1)


def _unpack_halves(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_pack_halves`, as float32."""
    halves = words.contiguous().unsqueeze(-1).view(torch.float16).float()
    return halves[..., 0], halves[..., 1]


def _check_head_dim(x: torch.Tensor, multiple: int, name: str, fix: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise ValueError(
            f"{name} expects a floating-point tensor [..., D], got {type(x).__name__} "
            f"{getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
        )
    if x.shape[-1] % multiple or x.shape[-1] == 0:
        raise ValueError(f"{name}: x.shape[-1]={x.shape[-1]} must be a positive multiple of {multiple}; {fix}")


def quantize_kv_int4(x: torch.Tensor, num_groups: int = 1) -> torch.Tensor:
    """int4-quantizes the last dim of ``x`` (xFormers' packing, see the module docstring).

    Args:
        x: ``[..., D]`` float tensor, ``D`` divisible by ``8 * num_groups``.
        num_groups: independent (scale, shift) pairs per row: 1, 2, 4 or 8.

    Returns:
        int32 ``[..., D // 8 + num_groups]``, contiguous.

    Raises:
        ValueError: ``num_groups`` not in (1, 2, 4, 8), or ``D`` not divisible by ``8 * num_groups``.
    """
    if num_groups not in INT4_GROUPS:
        raise ValueError(f"quantize_kv_int4: num_groups={num_groups!r}; use one of {INT4_GROUPS}")
    _check_head_dim(x, 8 * num_groups, "quantize_kv_int4", f"pad the head dim or use fewer groups than {num_groups}")
    D = x.shape[-1]
    xg = x.float().reshape(*x.shape[:-1], num_groups, D // num_groups)  # [..., G, D / G]
    lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    scale = ((hi - lo) / INT4_LEVELS).to(torch.float16)
    shift = lo.to(torch.float16)
    s32 = scale.float()
    levels = torch.where(s32 > 0, (xg - shift.float()) / torch.where(s32 > 0, s32, 1.0) + 0.5, 0.0)
    q = levels.clamp(0, INT4_LEVELS).to(torch.int64)  # [..., G, D / G]
    words = q.reshape(*q.shape[:-1], -1, 8) << (4 * torch.arange(8, device=x.device, dtype=torch.int64))
    words = words.sum(-1)  # nibbles are disjoint bits: the sum is their OR, in [0, 2**32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # [..., G, D / G / 8]
    coeffs = _pack_halves(scale.squeeze(-1), shift.squeeze(-1))  # [..., G]
    return torch.cat([coeffs, words.flatten(-2)], dim=-1).contiguous()


def _int4_parts(x_int4: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(levels [..., G, D / G] int32, scale [..., G, 1], shift [..., G, 1])`` of an int4 cache."""
    if not isinstance(x_int4, torch.Tensor) or x_int4.dtype != torch.int32 or x_int4.shape[-1] <= num_groups:
        raise ValueError(
            f"expected an int32 int4 cache [..., D // 8 + {num_groups}], got "
            f"{getattr(x_int4, 'dtype', type(x_int4).__name__)} {tuple(getattr(x_int4, 'shape', ()))}"
        )
    words = x_int4[..., num_groups:]
    if words.shape[-1] % num_groups:
        raise ValueError(
            f"int4 cache of {x_int4.shape[-1]} words per row: {words.shape[-1]} value words do not split "
            f"into num_groups={num_groups} groups; pass the num_groups it was quantized with"
        )
    nib = (words.unsqueeze(-1) >> (4 * torch.arange(8, device=x_int4.device, dtype=torch.int32))) & 0xF
    levels = nib.reshape(*words.shape[:-1], num_groups, -1)
    scale, shift = _unpack_halves(x_int4[..., :num_groups])
    return levels, scale.unsqueeze(-1), shift.unsqueeze(-1)


def dequantize_kv_int4(x_int4: torch.Tensor, num_groups: int = 1, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The values an int4 cache stands for: ``[..., D]`` in ``dtype`` (computed in float32, rounded once).

    Args:
        x_int4: int32 ``[..., D // 8 + num_groups]`` from :func:`quantize_kv_int4`.
        num_groups: the groups it was quantized with.
        dtype: result dtype (float32 or float64 for a reference without rounding).
    """
    levels, scale, shift = _int4_parts(x_int4, num_groups)
    out = levels.to(torch.float64 if dtype == torch.float64 else torch.float32) * scale + shift
    return out.flatten(-2).to(dtype)


def quantize_kv_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 (e4m3) quantization of the last dim of ``x`` with a scale and shift per row (see the module docstring).

    Args:
        x: ``[..., D]`` float tensor (one row per token and head), ``D`` divisible by 4.

    Returns:
        ``(data, scale_shift)``: int32 ``[..., D // 4]`` and int32 ``[...]``, contiguous.
    """
    _check_head_dim(x, 4, "quantize_kv_fp8", "pad the head dim to a multiple of 4")
    xf = x.float()
    shift = xf.mean(-1, keepdim=True).to(torch.float16)
    dev = (xf - shift.float()).abs().amax(-1, keepdim=True)
    scale = (dev / FP8_E4M3_MAX).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant row: any scale is exact
    xq = ((xf - shift.float()) / scale.float()).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    data = xq.contiguous().view(torch.int32)
    return data, _pack_halves(scale.squeeze(-1), shift.squeeze(-1)).contiguous()


def dequantize_kv_fp8(
    x_fp8: torch.Tensor, scale_shift: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The values an fp8 cache stands for: ``[..., D]`` in ``dtype`` (computed in float32, rounded once).

    Args:
        x_fp8: int32 ``[..., D // 4]`` from :func:`quantize_kv_fp8`.
        scale_shift: int32 ``[...]``, its coefficients.
        dtype: result dtype.
    """
    if not isinstance(x_fp8, torch.Tensor) or x_fp8.dtype != torch.int32:
        raise ValueError(
            f"dequantize_kv_fp8: x_fp8 must be int32 words [..., D // 4], got "
            f"{getattr(x_fp8, 'dtype', type(x_fp8).__name__)}"
        )
    if scale_shift.dtype != torch.int32 or tuple(scale_shift.shape) != tuple(x_fp8.shape[:-1]):
        raise ValueError(
            f"dequantize_kv_fp8: scale_shift must be int32 of x_fp8.shape[:-1] = "
            f"{tuple(x_fp8.shape[:-1])}, got {scale_shift.dtype} {tuple(scale_shift.shape)}"
        )
    values = x_fp8.contiguous().view(torch.float8_e4m3fn)
    scale, shift = _unpack_halves(scale_shift)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (values.to(acc) * scale[..., None].to(acc) + shift[..., None].to(acc)).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# Quantized caches as operator inputs: ``key``/``value`` int32, fp8 scales in ``InputsFp8``
# ---------------------------------------------------------------------------------------------------------


def is_fp8(inp) -> bool:
    """Whether ``inp`` (an ``Inputs``) carries fp8 scales (an ``InputsFp8`` with them set)."""
    return getattr(inp, "k_fp8_scale_shift", None) is not None or getattr(inp, "v_fp8_scale_shift", None) is not None


def _desc(x: torch.Tensor) -> str:
    return f"{tuple(x.shape)} ({x.dtype})"


def cache_errors(inp, num_groups: int | None) -> list[str]:
    """What is wrong with the KV cache of ``inp`` for an operator reading int4 caches of ``num_groups`` groups
    (None: any, read from the shapes): float K/V of another dtype than the query, an int4/fp8 cache whose words do
    not hold ``query.shape[-1]`` values per row, fp8 scales of the wrong shape or given for a float cache."""
    q, k, v = inp.query, inp.key, inp.value
    D = q.shape[-1]
    if k.dtype != torch.int32 and v.dtype != torch.int32:
        if is_fp8(inp):
            return [
                f"k_fp8_scale_shift/v_fp8_scale_shift are given but key.dtype={k.dtype}; an fp8 cache is int32 "
                "words holding 4 values each (quantize_kv_fp8), or pass plain Inputs for a float cache"
            ]
        if k.dtype != q.dtype or v.dtype != q.dtype:
            return [
                f"key.dtype={k.dtype}, value.dtype={v.dtype} but query.dtype={q.dtype}; cast key/value to the "
                "query's dtype (or pass a quantized int32 cache)"
            ]
        return []
    if k.dtype != v.dtype or k.shape[-1] != v.shape[-1]:
        return [
            f"key {_desc(k)} and value {_desc(v)} must both be int32 with the same last dim (one quantized "
            "cache format for both)"
        ]
    if is_fp8(inp):
        errors = []
        if num_groups not in (None, 1):
            errors.append(
                f"Only row-wise fp8 quantization is supported: NUM_GROUPS={num_groups}; use an operator "
                "with NUM_GROUPS = 1"
            )
        if k.shape[-1] * 4 != D:
            errors.append(
                f"fp8 key.shape[-1]={k.shape[-1]} words hold {k.shape[-1] * 4} values per row but "
                f"query.shape[-1]={D}; an fp8 cache has D // 4 words per row (quantize_kv_fp8)"
            )
        for name in ("k_fp8_scale_shift", "v_fp8_scale_shift"):
            s = getattr(inp, name)
            if s is None or s.dtype != torch.int32 or tuple(s.shape) != tuple(k.shape[:-1]) or s.device != q.device:
                got = "None" if s is None else f"{_desc(s)} on {s.device}"
                errors.append(
                    f"FP8 scales have to be provided in BMH or BMGH format: {name} is {got}, expected "
                    f"int32 of key.shape[:-1] = {tuple(k.shape[:-1])} on {q.device} (quantize_kv_fp8)"
                )
            elif _layout.kv_shareable(k, v) and not _layout.kv_shareable(s[..., None], s[..., None]):
                errors.append(
                    f"key/value are shared over the query heads (stride 0) but {name} is not: the scales "
                    "of a shared K/V head are shared too; expand them the same way"
                )
        return errors
    groups = k.shape[-1] - D // 8 if num_groups is None else num_groups
    if groups not in INT4_GROUPS:
        return [
            f"an int4 cache has one of {INT4_GROUPS} scale words per row, but key.shape[-1]={k.shape[-1]} "
            f"with query.shape[-1]={D} leaves {groups}; quantize with quantize_kv_int4(x, num_groups)"
        ]
    if D % (8 * groups):
        return [
            f"query.shape[-1]={D} is not divisible by 8 * NUM_GROUPS = {8 * groups}: int4 packs 8 values per "
            "word in each group; use a head dim that is, or fewer groups"
        ]
    if (k.shape[-1] - groups) * 8 != D:
        return [
            f"int4 key.shape[-1]={k.shape[-1]} words hold (key.shape[-1] - NUM_GROUPS) * 8 = "
            f"{(k.shape[-1] - groups) * 8} values per row (NUM_GROUPS={groups}) but query.shape[-1]={D}; "
            "quantize with quantize_kv_int4(x, num_groups) (D // 8 + num_groups words), or use an operator "
            "whose NUM_GROUPS is the cache's (FwOp.get_operator / a subclass setting NUM_GROUPS)"
        ]
    return []


def canonical_scale_shift(s: torch.Tensor, layout) -> torch.Tensor:
    """An fp8 scale tensor ``[B, Mkv, (G,) H]`` viewed like ``layout``'s canonical K/V ``[B, Mkv, G, Hk]``
    (``layout``: an ``ops.fmha._layout.Layout5``; one head per group when K/V are shared)."""
    x = layout.to5(s[..., None])[..., 0]
    return x[:, :, :, :1] if layout.k.shape[3] == 1 else x


class DequantizedRows:
    """A canonical quantized cache ``[B, Mkv, G, Hk, words]`` seen as the float ``[B, Mkv, G, Hk, D]`` it stands
    for (in ``dtype``), by code that reads it a row slice (or row index tensor) at a time: ``cache[:, rows]``
    dequantizes those rows only. It offers ``shape``, ``dtype`` and that indexing, nothing else of a tensor."""

    def __init__(self, words: torch.Tensor, head_dim: int, scale_shift: torch.Tensor | None, dtype: torch.dtype):
        self.words, self.scale_shift, self.dtype = words, scale_shift, dtype
        self.num_groups = words.shape[-1] - head_dim // 8
        self.shape = torch.Size((*words.shape[:-1], head_dim))

    def __getitem__(self, index) -> torch.Tensor:
        if self.scale_shift is None:
            return dequantize_kv_int4(self.words[index], self.num_groups, self.dtype)
        return dequantize_kv_fp8(self.words[index], self.scale_shift[index], self.dtype)


def dequantized_layout(inp, layout):
    """``layout`` (canonical views of ``inp``) with a quantized K/V replaced by :class:`DequantizedRows`;
    unchanged for a float cache."""
    if layout.k.dtype != torch.int32:
        return layout
    D = inp.query.shape[-1]
    dtype = torch.float64 if inp.query.dtype == torch.float64 else torch.float32  # the operators' accumulation
    ks = vs = None
    if is_fp8(inp):
        ks, vs = (canonical_scale_shift(s, layout) for s in (inp.k_fp8_scale_shift, inp.v_fp8_scale_shift))
    return dataclasses.replace(
        layout, k=DequantizedRows(layout.k, D, ks, dtype), v=DequantizedRows(layout.v, D, vs, dtype)
    )
