"""Random attention inputs for every bias type, for tests and benchmarks.

``create_inputs`` draws query/key/value and a bias of the requested type with random (but valid) structure:
random block partitions for packed sequences, random windows, tensor biases with some ``-inf`` entries,
KV caches with random used lengths (empty ones included), gappy segments anywhere (overlapping too), and paged
caches whose block tables are random permutations of the pages, with unused pages and page sizes that do not
divide the lengths.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from triformers.ops.fmha import attn_bias as ab

#: Every bias type ``memory_efficient_attention`` accepts, in a stable order.
ALL_BIAS_TYPES: tuple[type | None, ...] = (
    type(None),
    torch.Tensor,
    ab.LowerTriangularMask,
    ab.LowerTriangularMaskWithTensorBias,
    ab.LowerTriangularFromBottomRightMask,
    ab.LowerTriangularFromBottomRightLocalAttentionMask,
    ab.LocalAttentionFromBottomRightMask,
    ab.BlockDiagonalMask,
    ab.BlockDiagonalCausalMask,
    ab.BlockDiagonalCausalFromBottomRightMask,
    ab.BlockDiagonalCausalLocalAttentionMask,
    ab.BlockDiagonalCausalLocalAttentionFromBottomRightMask,
    ab.BlockDiagonalPaddedKeysMask,
    ab.BlockDiagonalCausalWithOffsetPaddedKeysMask,
    ab.BlockDiagonalLocalAttentionPaddedKeysMask,
    ab.BlockDiagonalCausalLocalAttentionPaddedKeysMask,
    ab.BlockDiagonalGappyKeysMask,
    ab.BlockDiagonalCausalWithOffsetGappyKeysMask,
    ab.BlockDiagonalLocalAttentionFromBottomRightGappyKeysMask,
    ab.PagedBlockDiagonalPaddedKeysMask,
    ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
    ab.PagedBlockDiagonalCausalLocalPaddedKeysMask,
    ab.PagedBlockDiagonalGappyKeysMask,
    ab.PagedBlockDiagonalCausalWithOffsetGappyKeysMask,
)

#: KV-cache biases (padded, gappy, paged keys): queries packed, keys in a cache.
KV_CACHE_TYPES = ALL_BIAS_TYPES[ALL_BIAS_TYPES.index(ab.BlockDiagonalPaddedKeysMask) :]
PAGED_TYPES = tuple(t for t in KV_CACHE_TYPES if t.__name__.startswith("Paged"))
BLOCK_DIAGONAL_TYPES = (
    ab.BlockDiagonalMask,
    ab.BlockDiagonalCausalMask,
    ab.BlockDiagonalCausalFromBottomRightMask,
    ab.BlockDiagonalCausalLocalAttentionMask,
    ab.BlockDiagonalCausalLocalAttentionFromBottomRightMask,
    *KV_CACHE_TYPES,
)
# Page sizes drawn for paged caches: odd ones (not dividing the lengths, pages straddling the kernels' tiles)
# and a power of two.
PAGE_SIZES = (3, 5, 16)


def bias_name(bias_type: type | None) -> str:
    return "None" if bias_type in (None, type(None)) else bias_type.__name__


@dataclass
class AttentionInputs:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_bias: object

    def tensors(self) -> list[torch.Tensor]:
        out = [self.query, self.key, self.value]
        bias = self.attn_bias
        if isinstance(bias, ab.LowerTriangularMaskWithTensorBias):
            bias = bias._bias
        if isinstance(bias, torch.Tensor):
            out.append(bias)
        return out


def _partition(total: int, parts: int, rng: random.Random, minimum: int = 0) -> list[int]:
    """``parts`` non-negative ints >= ``minimum`` summing to ``total``."""
    base = [minimum] * parts
    rest = total - minimum * parts
    cuts = sorted(rng.randint(0, rest) for _ in range(parts - 1))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, rest])]
    return [x + y for x, y in zip(base, sizes)]


def _tensor_bias(shape, dtype, device, rng_torch: torch.Generator, with_inf: bool) -> torch.Tensor:
    bias = torch.randn(shape, generator=rng_torch, dtype=torch.float32) * 3
    if with_inf and shape[-1] > 1:
        # mask part of the first query rows, as real padding masks do
        drop = torch.rand(shape, generator=rng_torch) < 0.25
        drop[..., 1:, :] = False
        drop[..., 0, 0] = False
        bias = bias.masked_fill(drop, float("-inf"))
    return bias.to(device=device, dtype=dtype)


def create_inputs(
    bias_type: type | None,
    *,
    batch_size: int,
    q_len: int,
    kv_len: int,
    num_heads: int,
    k: int,
    kv: int | None = None,
    num_groups: int = 1,
    fmt: str = "BMHK",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    requires_grad: bool = False,
    bias_requires_grad: bool = False,
    seed: int = 0,
    gqa: bool = False,
    scale_inputs: float = 1.0,
) -> AttentionInputs:
    """Random inputs and a random valid bias of ``bias_type``.

    Block-diagonal types pack ``batch_size`` sequences of random lengths summing to ``batch_size * q_len``
    queries (and keys) into batch 1. ``fmt`` is BMK (one head), BMHK or BMGHK (``num_groups`` groups of
    ``num_heads`` heads). ``gqa`` makes K/V stride-0 expansions over the heads.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    kv = k if kv is None else kv
    bias_type = type(None) if bias_type is None else bias_type
    B, Mq, Mkv = batch_size, q_len, kv_len
    bias = None
    if bias_type in KV_CACHE_TYPES:
        bias, Mq, Mkv = kv_cache_bias(bias_type, B, q_len, kv_len, rng, device=device)
        B = 1
    elif bias_type in BLOCK_DIAGONAL_TYPES:
        bias, Mq, Mkv = _block_diagonal(bias_type, B, q_len, kv_len, rng, device)
        B = 1
    elif bias_type is ab.LowerTriangularMask:
        bias = ab.LowerTriangularMask()
    elif bias_type is ab.LowerTriangularFromBottomRightMask:
        bias = ab.LowerTriangularFromBottomRightMask()
    elif bias_type is ab.LowerTriangularFromBottomRightLocalAttentionMask:
        bias = ab.LowerTriangularFromBottomRightMask().make_local_attention(rng.randint(1, max(1, kv_len)))
    elif bias_type is ab.LocalAttentionFromBottomRightMask:
        bias = ab.LocalAttentionFromBottomRightMask(rng.randint(0, kv_len), rng.randint(0, kv_len))

    H = 1 if fmt == "BMK" else num_heads
    heads = {"BMK": (), "BMHK": (H,), "BMGHK": (num_groups, H)}[fmt]
    if bias_type in (torch.Tensor, ab.LowerTriangularMaskWithTensorBias):
        bias_shape = {"BMK": (B, Mq, Mkv), "BMHK": (B, H, Mq, Mkv), "BMGHK": (B, num_groups, H, Mq, Mkv)}[fmt]
        tensor = _tensor_bias(bias_shape, dtype, device, gen, with_inf=bias_type is torch.Tensor)
        tensor.requires_grad_(bias_requires_grad)
        bias = tensor if bias_type is torch.Tensor else ab.LowerTriangularMask().add_bias(tensor)

    def make(m, dim, kv_side):
        if kv_side and gqa and fmt != "BMK":
            shared = (*heads[:-1], 1)
            x = torch.randn((B, m, *shared, dim), generator=gen) * scale_inputs
            x = x.to(device=device, dtype=dtype).requires_grad_(requires_grad)
            return x.expand((B, m, *heads, dim))
        x = torch.randn((B, m, *heads, dim), generator=gen) * scale_inputs
        return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return AttentionInputs(make(Mq, k, False), make(Mkv, k, True), make(Mkv, kv, True), bias)


def _block_diagonal(bias_type, B: int, q_len: int, kv_len: int, rng: random.Random, device):
    nblocks = rng.randint(1, max(1, min(B * 2, B * q_len)))
    q_seqlen = _partition(B * q_len, nblocks, rng)
    if bias_type in (ab.BlockDiagonalCausalFromBottomRightMask,
                     ab.BlockDiagonalCausalLocalAttentionFromBottomRightMask):
        extra = _partition(max(0, B * kv_len - B * q_len), nblocks, rng)
        kv_seqlen = [a + b for a, b in zip(q_seqlen, extra)]
    else:
        kv_seqlen = _partition(B * kv_len, nblocks, rng)
    base = ab.BlockDiagonalMask.from_seqlens(q_seqlen, kv_seqlen, device=device)
    if bias_type is ab.BlockDiagonalMask:
        bias = base
    elif bias_type is ab.BlockDiagonalCausalMask:
        bias = base.make_causal()
    elif bias_type is ab.BlockDiagonalCausalFromBottomRightMask:
        bias = base.make_causal_from_bottomright()
    elif bias_type is ab.BlockDiagonalCausalLocalAttentionMask:
        # every block must see a key: window > q_len_b - kv_len_b
        low = max([1] + [q - k + 1 for q, k in zip(q_seqlen, kv_seqlen)])
        bias = base.make_local_attention(rng.randint(low, max(low, max(kv_seqlen + [1]))))
    else:
        bias = base.make_local_attention_from_bottomright(rng.randint(1, max(1, max(kv_seqlen + [1]))))
    return bias, sum(q_seqlen), sum(kv_seqlen)


def kv_cache_bias(
    bias_type, B: int, q_len: int, kv_len: int, rng: random.Random, *, device="cpu", page_size: int | None = None
):
    """``(bias, Mq, Mkv)``: a random KV-cache bias of ``bias_type`` for ``B`` sequences of ``B * q_len`` packed
    queries (random lengths, some empty) and up to ``kv_len`` keys each (random used lengths, 0 included).
    Padded: slots of ``kv_len``; gappy: segments of a ``B * kv_len`` key axis, anywhere (overlapping too);
    paged: rows of ``ceil(kv_len / page_size)`` pages, the block table a random permutation of more pages
    than the rows use (``page_size`` drawn from :data:`PAGE_SIZES` unless given)."""
    q_seqlen = _partition(B * q_len, B, rng)
    kv_seqlen = [rng.randint(0, kv_len) for _ in range(B)]
    window = (rng.randint(0, kv_len), rng.randint(0, kv_len))
    name = bias_type.__name__
    if "Paged" in name:
        page_size = page_size or rng.choice(PAGE_SIZES)
        pages = -(-kv_len // page_size)
        spare = rng.randint(1, 3)  # pages no row uses
        order = torch.randperm(B * pages + spare, generator=torch.Generator().manual_seed(rng.randint(0, 2**31)))
        tables = order[: B * pages].view(B, pages).to(device=device, dtype=rng.choice((torch.int32, torch.int64)))
        Mkv = (B * pages + spare) * page_size
        if "Gappy" in name:
            starts = [rng.randint(0, kv_len - n) for n in kv_seqlen]
            bias = bias_type.from_seqlens(q_seqlen, starts, kv_seqlen, tables, page_size, device=device)
        elif bias_type is ab.PagedBlockDiagonalCausalLocalPaddedKeysMask:
            bias = bias_type.from_seqlens_local(
                q_seqlen, kv_seqlen, tables, page_size, max(1, window[0]), device=device
            )
        else:
            bias = bias_type.from_seqlens(q_seqlen, kv_seqlen, tables, page_size, device=device)
        return bias, B * q_len, Mkv
    if "Gappy" in name:
        total = B * kv_len
        starts = [rng.randint(0, total - n) for n in kv_seqlen]
        base = ab.BlockDiagonalGappyKeysMask.from_seqlens(q_seqlen, [*starts, total], kv_seqlen, device=device)
        if bias_type is ab.BlockDiagonalLocalAttentionFromBottomRightGappyKeysMask:
            bias = bias_type(
                q_seqinfo=base.q_seqinfo, k_seqinfo=base.k_seqinfo, window_left=window[0], window_right=window[1]
            )
        else:
            bias = bias_type(q_seqinfo=base.q_seqinfo, k_seqinfo=base.k_seqinfo)
        return bias, B * q_len, total
    if bias_type is ab.BlockDiagonalLocalAttentionPaddedKeysMask:
        bias = bias_type.from_seqlens_local(q_seqlen, kv_len, kv_seqlen, *window, device=device)
    elif bias_type is ab.BlockDiagonalCausalLocalAttentionPaddedKeysMask:
        bias = bias_type.from_seqlens_local(q_seqlen, kv_len, kv_seqlen, max(1, window[0]), device=device)
    else:
        bias = bias_type.from_seqlens(q_seqlen, kv_len, kv_seqlen, device=device)
    return bias, B * q_len, B * kv_len
