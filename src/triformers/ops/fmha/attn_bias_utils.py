"""Random attention inputs for every bias type, for tests and benchmarks.

``create_inputs`` draws query/key/value and a bias of the requested type with random (but valid) structure:
random block partitions for packed sequences, random windows, tensor biases with some ``-inf`` entries.
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
    ab.BlockDiagonalCausalWithOffsetPaddedKeysMask,
)

BLOCK_DIAGONAL_TYPES = (
    ab.BlockDiagonalMask,
    ab.BlockDiagonalCausalMask,
    ab.BlockDiagonalCausalFromBottomRightMask,
    ab.BlockDiagonalCausalLocalAttentionMask,
    ab.BlockDiagonalCausalLocalAttentionFromBottomRightMask,
    ab.BlockDiagonalCausalWithOffsetPaddedKeysMask,
)


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
    if bias_type in BLOCK_DIAGONAL_TYPES:
        bias, Mq, Mkv = _block_diagonal(bias_type, B, q_len, kv_len, rng)
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


def _block_diagonal(bias_type, B: int, q_len: int, kv_len: int, rng: random.Random):
    if bias_type is ab.BlockDiagonalCausalWithOffsetPaddedKeysMask:
        q_seqlen = _partition(B * q_len, B, rng)
        kv_seqlen = [rng.randint(0, kv_len) for _ in range(B)]
        bias = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q_seqlen, kv_len, kv_seqlen)
        return bias, B * q_len, B * kv_len
    nblocks = rng.randint(1, max(1, min(B * 2, B * q_len)))
    q_seqlen = _partition(B * q_len, nblocks, rng)
    if bias_type in (ab.BlockDiagonalCausalFromBottomRightMask,
                     ab.BlockDiagonalCausalLocalAttentionFromBottomRightMask):
        extra = _partition(max(0, B * kv_len - B * q_len), nblocks, rng)
        kv_seqlen = [a + b for a, b in zip(q_seqlen, extra)]
    else:
        kv_seqlen = _partition(B * kv_len, nblocks, rng)
    base = ab.BlockDiagonalMask.from_seqlens(q_seqlen, kv_seqlen)
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
