"""``tiled_matmul``: the product of two block matrices given as grids of tiles (xFormers' API).

``out[m][n] = Σ_k a[m][k] @ b[k][n]``, where ``a`` is an M×K grid of 2-D tiles and ``b`` a K×N grid; tile
``a[m][k]`` is ``[ms[m], ks[k]]`` and ``b[k][n]`` is ``[ks[k], ns[n]]`` (sizes may differ from one row or
column of tiles to the next, and tiles may have any strides). This is how sequence-parallel code multiplies
the shards it holds or receives without concatenating them first: no copy into one big matrix.

Each output tile is ``torch.mm`` of the first pair followed by in-place ``addmm_`` of the others, on every
device. There is no Triton kernel: xFormers' (which launches the whole grid at once) only pays off for many
small tiles on the GPU, and cuBLAS/oneDNN already run each tile of a sequence-parallel matmul at full speed.
Autograd differentiates :func:`tiled_matmul` through those ops, and ``torch.compile`` traces them.
"""

from __future__ import annotations

import torch

__all__ = ["tiled_matmul", "tiled_matmul_out"]

Grid = list[list[torch.Tensor]]


def _grid_shape(grid: Grid, name: str) -> tuple[int, int]:
    if not isinstance(grid, (list, tuple)) or not all(isinstance(row, (list, tuple)) for row in grid):
        raise ValueError(f"{name} must be a list of lists of 2-D tensors (a grid of tiles), got {type(grid).__name__}")
    cols = {len(row) for row in grid}
    if len(cols) > 1:
        raise ValueError(
            f"{name} is not a regular grid: its rows hold {[len(row) for row in grid]} tiles; give every row "
            f"the same number of tiles"
        )
    for i, row in enumerate(grid):
        for j, t in enumerate(row):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                what = f"shape={tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}[{i}][{j}] must be a 2-D tensor, got {what}")
    return len(grid), (cols.pop() if cols else 0)


def _check(a: Grid, b: Grid) -> tuple[list[int], list[int], list[int]]:
    """The tile sizes ``(ms, ns, ks)`` of a valid product ``a @ b``; ValueError naming the first mismatch."""
    m_tiles, k_tiles = _grid_shape(a, "a")
    kb_tiles, n_tiles = _grid_shape(b, "b")
    if k_tiles == 0 or kb_tiles != k_tiles:
        raise ValueError(
            f"a is a {m_tiles}x{k_tiles} grid of tiles and b a {kb_tiles}x{n_tiles} grid: the product needs as "
            f"many tile columns in a as tile rows in b, at least one"
        )
    ms = [row[0].shape[0] for row in a]
    ks = [t.shape[1] for t in a[0]] if m_tiles else [row[0].shape[0] for row in b]
    ns = [t.shape[1] for t in b[0]]
    ref = a[0][0] if m_tiles else b[0][0]
    for name, grid, rows, cols in (("a", a, ms, ks), ("b", b, ks, ns)):
        for i, row in enumerate(grid):
            for j, t in enumerate(row):
                if tuple(t.shape) != (rows[i], cols[j]):
                    raise ValueError(
                        f"{name}[{i}][{j}].shape={tuple(t.shape)} but its row and column of tiles need "
                        f"({rows[i]}, {cols[j]}) (a[m][k] is [ms[m], ks[k]], b[k][n] is [ks[k], ns[n]])"
                    )
                if t.dtype != ref.dtype or t.device != ref.device:
                    raise ValueError(
                        f"{name}[{i}][{j}] is {t.dtype} on {t.device} but the first tile is {ref.dtype} on "
                        f"{ref.device}; give every tile the same dtype and device"
                    )
    return ms, ns, ks


def tiled_matmul(a: Grid, b: Grid) -> Grid:
    """``out[m][n] = Σ_k a[m][k] @ b[k][n]`` over grids of tiles; differentiable.

    Args:
        a: M×K grid (list of M lists of K tensors), tile ``[m][k]`` of shape ``[ms[m], ks[k]]``.
        b: K×N grid, tile ``[k][n]`` of shape ``[ks[k], ns[n]]``. Same dtype and device as ``a``.

    Returns:
        The M×N grid of output tiles, ``[m][n]`` of shape ``[ms[m], ns[n]]``, contiguous.

    Raises:
        ValueError: irregular grids, tiles that are not 2-D, mismatched sizes, dtypes or devices.
    """
    _check(a, b)
    out = []
    for row in a:
        out_row = []
        for n in range(len(b[0])):
            acc = torch.mm(row[0], b[0][n])
            for k in range(1, len(row)):
                acc = acc.addmm_(row[k], b[k][n])
            out_row.append(acc)
        out.append(out_row)
    return out


def tiled_matmul_out(a: Grid, b: Grid, out: Grid) -> None:
    """:func:`tiled_matmul` written into the tiles of ``out`` (M×N grid of ``[ms[m], ns[n]]``); not differentiable.

    Raises:
        ValueError: as :func:`tiled_matmul`, or ``out`` tiles of the wrong grid, shape, dtype or device.
    """
    ms, ns, _ = _check(a, b)
    _grid_shape(out, "out")
    if len(out) != len(ms) or any(len(row) != len(ns) for row in out):
        raise ValueError(f"out must be a {len(ms)}x{len(ns)} grid of tiles (a's tile rows by b's tile columns)")
    ref = a[0][0] if ms else b[0][0]
    for m, row in enumerate(out):
        for n, t in enumerate(row):
            if tuple(t.shape) != (ms[m], ns[n]) or t.dtype != ref.dtype or t.device != ref.device:
                raise ValueError(
                    f"out[{m}][{n}] is shape={tuple(t.shape)} {t.dtype} on {t.device}; it must be "
                    f"({ms[m]}, {ns[n]}) {ref.dtype} on {ref.device}"
                )
    for m, row in enumerate(a):
        for n in range(len(ns)):
            torch.mm(row[0], b[0][n], out=out[m][n])
            for k in range(1, len(row)):
                out[m][n].addmm_(row[k], b[k][n])
