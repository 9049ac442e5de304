"""Attention dropout randomness, identical on every operator and device.

The keep/drop decision for score ``(b, head, i, j)`` is a pure function of the seed and those indices:
Philox4x32-10 with key = the 64-bit seed and counter = ``(j, i, b * num_heads + head, 0)``, its first output
turned into a float in [0, 1) exactly as ``triton.language.rand`` does, and the score kept when ``u >= p``.
The Triton kernels call the same Philox in-kernel; this module computes it with integer tensor ops, so the
pure-PyTorch operator drops exactly the same entries (tests compare the two bit for bit), and the backward
regenerates the forward's mask from the seed instead of storing it.

The seed is drawn from torch's default CPU generator, so ``torch.manual_seed`` reproduces a run.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10  # < 2**-31, so that the largest int32 maps below 1.0 in float32


def draw_seed() -> torch.Tensor:
    """A fresh dropout seed ``[1]`` int64 (non-negative, 62 bits) from torch's default generator."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant ``a`` and uint32 values ``b`` (in int64)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo  # each < 2**48: exact in int64
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox_uniform(
    seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, n_rounds: int = 10
) -> torch.Tensor:
    """Uniform float32 in [0, 1) from Philox4x32 with counter ``(c0, c1, c2, 0)`` (broadcast together)."""
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0, c1, c2 = torch.broadcast_tensors(c0.to(torch.int64), c1.to(torch.int64), c2.to(torch.int64))
    c0, c1, c2 = c0 & _MASK32, c1 & _MASK32, c2 & _MASK32
    c3 = torch.zeros_like(c0)
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # reinterpret as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def keep_mask(
    seed: int, p: float, rows: torch.Tensor, cols: torch.Tensor, heads: torch.Tensor
) -> torch.Tensor:
    """Boolean keep mask for query indices ``rows``, key indices ``cols`` and linear heads ``heads``."""
    return philox_uniform(seed, cols, rows, heads) >= p
