"""Attention patterns: boolean ``[S, S]`` masks (True = attend) and block layouts.

Tokens of an n-d grid of ``sizes`` are numbered in row-major order; distance-based patterns compare
grid coordinates. Layout helpers convert between token patterns and block-sparse layouts
(``[heads, S/block, S/block]``), as used by :mod:`.sparsity_config` and the ``blocksparse`` attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from triformers.components.attention.sparsity_config import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    FixedSparsityConfig,
    VariableSparsityConfig,
)


def _generate_nd_grid(*sizes: int) -> tuple[torch.Tensor, ...]:
    coords = [torch.arange(s) for s in sizes]
    return torch.meshgrid(*coords, indexing="ij")


def local_nd_distance(*sizes: int, p: float = 2.0, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Pairwise p-norm distances between the tokens of a grid, ``[prod(sizes), prod(sizes)]``.

    Args:
        *sizes: grid sizes.
        p: norm of the distance (default 2.0; p=0 counts differing coordinates).
        weights: per-axis scale of the coordinates (default all 1).
    """
    if weights is None:
        weights = (1,) * len(sizes)
    if len(weights) != len(sizes):
        raise ValueError(f"weights has {len(weights)} entries but there are {len(sizes)} sizes; pass one per axis")
    grid = [g.flatten() * w for g, w in zip(_generate_nd_grid(*sizes), weights)]
    coords = torch.stack(grid, dim=1).float()
    return torch.cdist(coords, coords, p=p)


def local_nd_gaussian_distribution(*sizes: int, sigma: float = 1) -> torch.Tensor:
    """``exp(-d² / (2 sigma²))`` over the grid distances (an unnormalised probability matrix)."""
    d = local_nd_distance(*sizes, p=2.0) ** 2
    return torch.exp(-0.5 * sigma ** (-2.0) * d)


def local_nd_pattern(*sizes: int, distance: float, p: float = 2.0) -> torch.Tensor:
    """Tokens attend to the tokens closer than ``distance`` (p-norm on the grid)."""
    return local_nd_distance(*sizes, p=p) < distance


def axial_nd_pattern(*sizes: int) -> torch.Tensor:
    """Tokens attend along every axis through themselves (coordinates differ on at most one axis)."""
    return local_nd_distance(*sizes, p=0) < 2


def random_pattern_from_probability_matrix(dist_matrix: torch.Tensor, nnz: int) -> torch.Tensor:
    """Sample ``nnz`` distinct positions with probabilities proportional to ``dist_matrix``."""
    att = torch.zeros_like(dist_matrix, dtype=torch.bool)
    if dist_matrix.numel() > 2**24:
        # torch.multinomial refuses more than 2^24 categories; sample with numpy in float64 instead
        probs = dist_matrix.double().flatten()
        probs = (probs / probs.sum()).numpy()
        idxs = torch.as_tensor(np.random.choice(probs.size, nnz, p=probs, replace=False))
    else:
        idxs = torch.multinomial(dist_matrix.flatten().float(), nnz, replacement=False)
    att.view(-1)[idxs] = True
    return att


def global_token_pattern(attention_query_mask: torch.Tensor) -> torch.Tensor:
    """Global tokens attend everywhere and are attended by everyone: ``m[i] | m[j]``.

    Args:
        attention_query_mask: 1-D bool, True for the global tokens.
    """
    if attention_query_mask.ndim != 1 or attention_query_mask.dtype != torch.bool:
        raise ValueError(
            f"attention_query_mask must be a 1-D bool tensor, got shape={tuple(attention_query_mask.shape)} "
            f"dtype={attention_query_mask.dtype}"
        )
    m = attention_query_mask[None, :]
    return m | m.transpose(1, 0)


def random_pattern(attn_size: int, sparsity: float) -> torch.Tensor:
    """Each position is kept with probability ``1 - sparsity`` (``0 < sparsity < 1``)."""
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    return torch.rand(attn_size, attn_size) > sparsity


def local_1d_pattern(attn_size: int, window_size: int) -> torch.Tensor:
    """Sliding window: ``|i - j| <= window_size // 2`` (``window_size`` odd: self plus two wings)."""
    if window_size % 2 != 1:
        raise ValueError(f"window_size must be odd (self-attention plus two equal wings), got {window_size}")
    return local_nd_pattern(attn_size, distance=window_size // 2 + 1, p=1.0)


def causal_1d_pattern(attn_size: int) -> torch.Tensor:
    """Lower-triangular: ``j <= i``."""
    return torch.tril(torch.ones(attn_size, attn_size, dtype=torch.bool))


def horizontal_axial_2d_distance(H: int, W: int, p: float = 2.0) -> torch.Tensor:
    """Distance along the rows only (the column coordinate is ignored)."""
    return local_nd_distance(H, W, p=p, weights=(1, 0))


def vertical_axial_2d_distance(H: int, W: int, p: float = 2.0) -> torch.Tensor:
    """Distance along the columns only (the row coordinate is ignored)."""
    return local_nd_distance(H, W, p=p, weights=(0, 1))


def local_2d_distance(H: int, W: int, p: float = 2.0) -> torch.Tensor:
    return local_nd_distance(H, W, p=p)


def local_2d_gausian_distribution(H: int, W: int, sigma: float = 1) -> torch.Tensor:
    """2-D form of :func:`local_nd_gaussian_distribution` (name kept as xFormers spells it)."""
    return local_nd_gaussian_distribution(H, W, sigma=sigma)


local_2d_gaussian_distribution = local_2d_gausian_distribution


def local_2d_pattern(H: int, W: int, distance: float, p: float = 2.0) -> torch.Tensor:
    return local_nd_pattern(H, W, distance=distance, p=p)


def axial_2d_pattern(H: int, W: int) -> torch.Tensor:
    return axial_nd_pattern(H, W)


def swin_attention_pattern(H: int, W: int, window_size: int, shift_size: int = 0) -> torch.Tensor:
    """Swin Transformer windows: tokens attend within their ``window_size``² window.

    With ``shift_size`` the window grid is shifted by that many tokens (token (i, j) is in window
    ``(floor((i - s) / w), floor((j - s) / w))``), which is Swin's cyclic shift plus its mask.
    """
    if H % window_size or W % window_size:
        raise ValueError(f"H={H} and W={W} must be multiples of window_size={window_size}")
    if not 0 <= shift_size < window_size:
        raise ValueError(f"shift_size must be in [0, window_size={window_size}), got {shift_size}")
    i, j = _generate_nd_grid(H, W)
    wi = torch.div(i.flatten() - shift_size, window_size, rounding_mode="floor")
    wj = torch.div(j.flatten() - shift_size, window_size, rounding_mode="floor")
    return (wi[:, None] == wi[None, :]) & (wj[:, None] == wj[None, :])


def dilated_2d_pattern(H: int, W: int, k: int = 2) -> torch.Tensor:
    """Tokens attend to the tokens at row and column offsets that are multiples of ``k``."""
    d_h = local_nd_distance(H, 1, p=1)
    d_w = local_nd_distance(1, W, p=1)
    return torch.kron((d_h.floor() % k == 0).long(), (d_w.floor() % k == 0).long()).bool()


def block_sparsify_tensor(x: torch.Tensor, mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Gather the blocks of ``x`` ``[B, H, S, S]`` selected by ``mask`` ``[H, S/bs, S/bs]``.

    Returns:
        ``[B, nnz, bs, bs]``, in the order of ``mask.nonzero()``.
    """
    h, r, c = mask.nonzero(as_tuple=True)
    blocks = x.unflatten(-2, (-1, block_size)).unflatten(-1, (-1, block_size))  # [B, H, nb, bs, nb, bs]
    blocks = blocks.permute(0, 1, 2, 4, 3, 5)  # [B, H, nb, nb, bs, bs]
    return blocks[:, h, r, c]


def pattern_to_layout(mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """The block layout covering every True of ``mask`` (``[H, S, S]`` or ``[S, S]``), as long 0/1."""
    if mask.ndim not in (2, 3):
        raise ValueError(f"expected a [heads, S, S] or [S, S] mask, got shape={tuple(mask.shape)}")
    squeeze = mask.ndim == 2
    if squeeze:
        mask = mask.unsqueeze(0)
    if mask.shape[-1] % block_size or mask.shape[-2] % block_size:
        raise ValueError(f"mask shape {tuple(mask.shape)} is not divisible by block_size={block_size}")
    layout = torch.nn.functional.max_pool2d(mask.float(), kernel_size=block_size, stride=block_size).long()
    return layout.squeeze(0) if squeeze else layout


def alibi_pattern(threshold: float, mask_shape: Sequence[int]) -> torch.Tensor:
    """ALiBi biases (``slope_h * j``) thresholded: ``[heads, 1, S]`` True where ``bias < threshold``.

    Args:
        threshold: keep the keys whose ALiBi bias is below this.
        mask_shape: ``[heads, S, ...]``.
    """

    def slopes_power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    def get_slopes(n: int) -> list[float]:
        if math.log2(n).is_integer():
            return slopes_power_of_2(n)
        closest = 2 ** math.floor(math.log2(n))
        return slopes_power_of_2(closest) + get_slopes(2 * closest)[0::2][: n - closest]

    heads, maxpos = mask_shape[0], mask_shape[1]
    slopes = torch.tensor(get_slopes(heads))
    alibi = slopes[:, None, None] * torch.arange(maxpos)[None, None, :]  # [heads, 1, S]
    return alibi < threshold


def quick_fixed_layout(num_heads: int, block_size: int, seq_len: int) -> torch.Tensor:
    return FixedSparsityConfig(num_heads=num_heads, block_size=block_size).make_layout(seq_len)


def quick_variable_layout(num_heads: int, block_size: int, seq_len: int) -> torch.Tensor:
    return VariableSparsityConfig(num_heads=num_heads, block_size=block_size).make_layout(seq_len)


def quick_bigbird_layout(num_heads: int, block_size: int, seq_len: int) -> torch.Tensor:
    return BigBirdSparsityConfig(num_heads=num_heads, block_size=block_size).make_layout(seq_len)


def quick_bslongformer_layout(num_heads: int, block_size: int, seq_len: int) -> torch.Tensor:
    return BSLongformerSparsityConfig(num_heads=num_heads, block_size=block_size).make_layout(seq_len)


def layout_to_pattern(layout: torch.Tensor, block_size: int) -> torch.Tensor:
    """Expand a block layout ``[H, S/bs, S/bs]`` to a token pattern ``[H, S, S]`` (same dtype as layout)."""
    return torch.kron(layout, torch.ones(block_size, block_size, dtype=layout.dtype, device=layout.device))
