"""Launch order of a block-sparse grid: heavy programs first.

A block-sparse layout can give a few rows of tiles far more work than the rest: BigBird's and the fixed
pattern's global blocks attend every key (forward, dQ) and are attended by every query (dK/dV). In the
kernels' natural order (query or key tiles fastest, heads, then batch) those programs start wherever their head
falls in the grid; the ones of the last heads start when most of the grid is done and then run alone. Started
first, they overlap with the light ones (longest-processing-time-first scheduling).

:func:`heavy_first` gives the kernels a permutation of their program ids: programs with at least
``HEAVY`` times the mean work first (longest first, every batch element's in turn), then the others in their
natural order, so layouts without heavy rows keep the order that lets co-running programs share K/V (or Q/dO)
through L2. It is built once per layout, tile shape and grid (one host sync, like the tile table itself).
"""

from __future__ import annotations

import torch

from triformers.ops.fmha._mask import BlockSparseSpec

#: A program is heavy when its tiles are at least this many times the grid's mean.
HEAVY = 2.0


def heavy_first(
    spec: BlockSparseSpec, Mq: int, Mkv: int, tile_q: int, tile_k: int, causal: bool, transposed: bool, Z: int,
    num_heads: int, group: int,
) -> torch.Tensor | None:
    """int32 ``[Z * (num_heads // group) * rows]``: the program id each launch slot runs, or None when no
    program is heavy (the natural order stands).

    The grid is ``(z * (num_heads // group) + head group) * rows + row``, ``rows`` the table's rows (query
    tiles, or key tiles when ``transposed``); a program covers ``group`` consecutive heads (a dK/dV program of
    a K/V head shared by ``group`` query heads) and its work is its rows' table entries summed over them.
    """
    key = ("heavy_first", Mq, Mkv, tile_q, tile_k, causal, transposed, Z, num_heads, group)
    if key not in spec._cache:
        table = spec.table(Mq, Mkv, tile_q, tile_k, causal, transposed=transposed)
        spec._cache[key] = _order(table.offsets, Z, num_heads, group)
    return spec._cache[key]


def _order(offsets: torch.Tensor, Z: int, num_heads: int, group: int) -> torch.Tensor | None:
    lens = offsets[:, 1:] - offsets[:, :-1]  # [Hl, rows]
    rows = lens.shape[1]
    work = lens.expand(num_heads, rows).reshape(num_heads // group, group, rows).sum(1).flatten().float()
    heavy = (work >= HEAVY * work.mean()) & (work > 0)
    n_heavy = int(heavy.sum())
    if n_heavy == 0:
        return None
    per_z = torch.argsort(torch.where(heavy, -work, 0.0), stable=True)  # heavy longest first, then in order
    P = work.numel()
    zs = torch.arange(Z, device=offsets.device) * P
    first = (per_z[:n_heavy, None] + zs[None, :]).flatten()  # each heavy program, every batch element in turn
    rest = (zs[:, None] + per_z[None, n_heavy:]).flatten()
    return torch.cat([first, rest]).to(torch.int32)
