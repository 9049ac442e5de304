"""Sequence sharding for context parallelism: which tokens each rank holds, and the differentiable shard/gather.

A sequence of ``S`` tokens is cut into equal chunks and every rank of a group of ``W`` holds some of them, in
increasing position order:

- ``"contiguous"``: ``W`` chunks, rank ``r`` holds chunk ``r`` (tokens ``[r·S/W, (r+1)·S/W)``);
- ``"zigzag"``: ``2W`` chunks, rank ``r`` holds chunks ``r`` and ``2W-1-r``. Under a causal mask the work of
  a query grows with its position, so pairing an early chunk with a late one gives every rank the same
  amount of attention to compute (with ``"contiguous"`` the last rank does ``2W - 1`` times the first's).

:func:`shard_sequence` takes this rank's tokens of a full tensor and :func:`gather_sequence` rebuilds the full
tensor on every rank; with them ``gather_sequence(context_parallel_attention(shard(q), shard(k), shard(v),
bias))`` equals ``memory_efficient_attention(q, k, v, bias)``. Their gradients follow Megatron-LM's "split" and
"gather" regions:

==================  ==========================================  ==============================================
function            forward                                     backward
==================  ==========================================  ==============================================
``shard_sequence``  keep this rank's tokens                     all-gather: a full tensor replicated on every
                                                                rank gets its complete gradient on every rank
``gather_sequence`` all-gather (every rank: the full tensor)    keep this rank's tokens: the full tensor is
                                                                treated as replicated (no sum over ranks)
==================  ==========================================  ==============================================

:func:`shard_positions` gives the global positions of this rank's tokens, for position embeddings (learned
tables, rotary angles) that must see where a token sits in the whole sequence. On a group of one rank every
function returns its input (``shard_positions``: ``arange(S)``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from triformers.ops.differentiable_collectives import check_group, gather_along_first_dim

__all__ = ["LOAD_BALANCES", "shard_sequence", "gather_sequence", "shard_positions", "resolve_group"]

#: The ways a sequence can be cut over the ranks (see the module docstring).
LOAD_BALANCES = ("zigzag", "contiguous")

try:  # DeviceMesh lives in torch.distributed.device_mesh since torch 2.2
    from torch.distributed.device_mesh import DeviceMesh
except ImportError:  # pragma: no cover
    DeviceMesh = None


def resolve_group(group: Any, fn: str) -> ProcessGroup:
    """The process group named by ``group``: a ``ProcessGroup``, a 1-D ``DeviceMesh``, or None (all ranks).

    Raises:
        ValueError: ``group`` is none of those, a mesh has several dimensions, or ``group=None`` without an
            initialised default group.
    """
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                f"{fn}: group=None means the default process group, but torch.distributed is not initialised; "
                "call torch.distributed.init_process_group() first (torchrun sets its environment) or pass a group"
            )
        return dist.group.WORLD
    if DeviceMesh is not None and isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"{fn}: group is a {group.ndim}-D DeviceMesh {tuple(group.shape)}; pass the 1-D mesh of the "
                "context-parallel dimension, e.g. mesh['cp']"
            )
        return group.get_group()
    if not isinstance(group, ProcessGroup):
        raise ValueError(
            f"{fn}: group must be a torch.distributed.ProcessGroup, a 1-D DeviceMesh or None (all ranks), got "
            f"{type(group).__name__}: {group!r}"
        )
    return group


def check_load_balance(load_balance: str, fn: str) -> None:
    if load_balance not in LOAD_BALANCES:
        raise ValueError(f"{fn}: load_balance must be one of {LOAD_BALANCES}, got load_balance={load_balance!r}")


def num_chunks(world: int, load_balance: str) -> int:
    """How many equal chunks the sequence is cut into."""
    return 2 * world if load_balance == "zigzag" else world


def rank_chunks(rank: int, world: int, load_balance: str) -> tuple[int, ...]:
    """The chunks rank ``rank`` holds, in the order it stores them (increasing positions)."""
    return (rank, 2 * world - 1 - rank) if load_balance == "zigzag" else (rank,)


def layout_order(world: int, load_balance: str) -> list[int]:
    """Global chunk indices in rank-major order: the order of an all-gather of every rank's shard."""
    return [c for r in range(world) for c in rank_chunks(r, world, load_balance)]


def global_order(world: int, load_balance: str) -> list[int]:
    """Positions in :func:`layout_order` of chunks ``0, 1, ...``: indexing gathered chunks with it sorts them."""
    order = layout_order(world, load_balance)
    inverse = [0] * len(order)
    for position, chunk in enumerate(order):
        inverse[chunk] = position
    return inverse


def rank_ranges(rank: int, world: int, load_balance: str, seq_len: int) -> list[tuple[int, int]]:
    """Global token ranges ``[start, stop)`` rank ``rank`` holds, in its storage order."""
    size = seq_len // num_chunks(world, load_balance)
    return [(c * size, (c + 1) * size) for c in rank_chunks(rank, world, load_balance)]


def check_divisible(seq_len: int, world: int, load_balance: str, fn: str, what: str) -> None:
    """Raise ValueError unless ``seq_len`` tokens cut into the layout's equal chunks."""
    n = num_chunks(world, load_balance)
    if seq_len % n:
        fix = f"pad it to a multiple of {n} (e.g. {-(-seq_len // n) * n})"
        if load_balance == "zigzag":
            fix += f", or use load_balance='contiguous' (a multiple of {world})"
        raise ValueError(
            f"{fn}: {what} of {seq_len} tokens cannot be cut into {n} equal chunks, which load_balance="
            f"{load_balance!r} over {world} ranks needs; {fix}"
        )


def _seq_dim(x: torch.Tensor, dim: int, fn: str) -> int:
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"{fn}: dim={dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.ndim


def _take_shard(x: torch.Tensor, dim: int, rank: int, world: int, load_balance: str) -> torch.Tensor:
    """This rank's chunks of the full ``x`` along ``dim``, as a new tensor."""
    parts = [x.narrow(dim, a, b - a) for a, b in rank_ranges(rank, world, load_balance, x.shape[dim])]
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0].clone(memory_format=torch.contiguous_format)


def _all_gather(x_local: torch.Tensor, dim: int, group: ProcessGroup, load_balance: str) -> torch.Tensor:
    """Every rank's shard along ``dim``, assembled in global order."""
    world = group.size()
    rows = x_local.movedim(dim, 0).contiguous()  # [Ml, ...]
    gathered = gather_along_first_dim(rows, process_group=group)  # [W·Ml, ...], rank-major
    if load_balance == "zigzag":
        n = num_chunks(world, load_balance)
        chunks = gathered.view(n, rows.shape[0] * world // n, *rows.shape[1:])
        index = torch.tensor(global_order(world, load_balance), device=chunks.device)
        gathered = chunks.index_select(0, index).flatten(0, 1)
    return gathered.movedim(0, dim)


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, load_balance):
        ctx.dim, ctx.group, ctx.load_balance = dim, group, load_balance
        return _take_shard(x, dim, group.rank(), group.size(), load_balance)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group, ctx.load_balance), None, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, dim, group, load_balance):
        ctx.dim, ctx.group, ctx.load_balance = dim, group, load_balance
        return _all_gather(x_local, dim, group, load_balance)

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        return _take_shard(grad, ctx.dim, group.rank(), group.size(), ctx.load_balance), None, None, None


def shard_sequence(x: torch.Tensor, dim: int = 1, *, group: Any = None, load_balance: str = "zigzag") -> torch.Tensor:
    """This rank's tokens of the full tensor ``x`` (the same on every rank), along the sequence dim ``dim``.

    Args:
        x: the full tensor, e.g. ``[B, S, ...]``; any dtype.
        dim: the sequence dimension (default 1: BMHK, ``[B, S, E]``).
        group: a ``ProcessGroup``, a 1-D ``DeviceMesh``, or None for all ranks.
        load_balance: ``"zigzag"`` (chunks ``r`` and ``2W-1-r``; default) or ``"contiguous"`` (chunk ``r``).

    Returns:
        ``x`` with ``S / W`` tokens along ``dim``: a new tensor (``x`` itself on one rank). Differentiable: the
        backward all-gathers the gradient (see the module docstring).

    Raises:
        ValueError: ``S`` not divisible by the number of chunks (``2W`` for zigzag), a bad ``dim``, group or
            ``load_balance``, or a tensor on a device the group's backend does not serve.
    """
    fn = "shard_sequence"
    group = resolve_group(group, fn)
    check_load_balance(load_balance, fn)
    dim = _seq_dim(x, dim, fn)
    world = group.size()
    if world == 1:
        return x
    check_group(group, x, fn, "group")
    check_divisible(x.shape[dim], world, load_balance, fn, f"x (shape {tuple(x.shape)}) has a sequence (dim {dim})")
    return _Shard.apply(x, dim, group, load_balance)


def gather_sequence(
    x_local: torch.Tensor, dim: int = 1, *, group: Any = None, load_balance: str = "zigzag"
) -> torch.Tensor:
    """The full tensor on every rank, from each rank's shard ``x_local`` (the inverse of :func:`shard_sequence`).

    Args:
        x_local: this rank's shard; every rank passes the same shape.
        dim, group, load_balance: as for :func:`shard_sequence`.

    Returns:
        ``x_local`` with ``W`` times its tokens along ``dim``, in global order (``x_local`` itself on one rank).
        Differentiable: the backward keeps this rank's tokens of the gradient (see the module docstring).

    Raises:
        ValueError: a shard that zigzag cannot hold (an odd number of tokens), a bad ``dim``, group or
            ``load_balance``, or a tensor on a device the group's backend does not serve.
    """
    fn = "gather_sequence"
    group = resolve_group(group, fn)
    check_load_balance(load_balance, fn)
    dim = _seq_dim(x_local, dim, fn)
    world = group.size()
    if world == 1:
        return x_local
    check_group(group, x_local, fn, "group")
    check_divisible(
        x_local.shape[dim] * world, world, load_balance, fn, f"the sequence of {world} shards of {x_local.shape[dim]}"
    )
    return _Gather.apply(x_local, dim, group, load_balance)


def shard_positions(
    seq_len: int, *, group: Any = None, load_balance: str = "zigzag", device: torch.device | str | None = None
) -> torch.Tensor:
    """Global positions (int64 ``[S / W]``) of the tokens :func:`shard_sequence` gives this rank.

    Raises:
        ValueError: ``seq_len`` not divisible by the number of chunks, or a bad group or ``load_balance``.
    """
    fn = "shard_positions"
    group = resolve_group(group, fn)
    check_load_balance(load_balance, fn)
    world = group.size()
    if world > 1:
        check_divisible(seq_len, world, load_balance, fn, "the sequence")
    ranges = rank_ranges(group.rank(), world, load_balance, seq_len) if world > 1 else [(0, seq_len)]
    return torch.cat([torch.arange(a, b, device=device) for a, b in ranges])
