"""The overlapped collectives under the sequence-parallel fused ops: ``fused_allgather_and_anything`` and
``fused_anything_and_reducescatter`` (``triformers.ops.sequence_parallel_fused_ops`` re-exports them)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed import ProcessGroup, Work

from triformers.distributed.p2p import ComputeStreams, default_stream_factory, ring_step
from triformers.ops.differentiable_collectives import _all_gather_flat, _reduce_scatter_flat, check_group

DISABLE_ENV = "TRIFORMERS_DISABLE_FUSED_SEQUENCE_PARALLEL"
DEFAULT_TIMEOUT_S = 60 * 60  # xFormers' default: a transfer that waits this long has a dead peer

MyMatmul = Callable[[list[torch.Tensor], int, Callable[[], Any]], None]


def _group_size(group: ProcessGroup, fn: str) -> int:
    if not isinstance(group, ProcessGroup):
        raise ValueError(
            f"{fn} needs a torch.distributed.ProcessGroup as group, got group={group!r}; pass "
            f"torch.distributed.group.WORLD for all ranks, or a group from torch.distributed.new_group"
        )
    return group.size()


def _fused_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "0") == "1"


def _check_tensors(tensors: list[torch.Tensor], fn: str, name: str) -> None:
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError(f"{fn}: {name} must be a list of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if not t.is_contiguous() or t.dim() == 0:
            raise ValueError(
                f"{fn}: {name}[{i}] must be contiguous with at least one dim (got shape={tuple(t.shape)}, "
                f"stride={t.stride()}); pass .contiguous()"
            )
        if t.device != tensors[0].device:
            raise ValueError(f"{fn}: {name}[{i}] is on {t.device} but {name}[0] on {tensors[0].device}")


def fused_allgather_and_anything(
    scattered_inputs: list[torch.Tensor],
    my_matmul: MyMatmul,
    *,
    group: ProcessGroup,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    **private_args_DO_NOT_USE: Any,
) -> None:
    """All-gather ``scattered_inputs`` along dim 0 and hand each rank's shards to ``my_matmul`` as they arrive.

    Args:
        scattered_inputs: this rank's contiguous shards (any shapes and dtypes, one device).
        my_matmul: called as ``my_matmul(shards, src_rank, stream_factory)`` once per rank of the group, with
            ``shards`` the tensors of ``src_rank`` (same shapes as ``scattered_inputs``): own rank first, then
            ``r-1, r-2, ...``. Run the work under ``torch.cuda.stream(stream_factory())``. With no inputs it is
            called as ``my_matmul([], rank, stream_factory)`` for every rank.
        group: the process group.
        timeout_s: the longest wait for one transfer (gloo; NCCL uses the group's timeout).
        **private_args_DO_NOT_USE: accepted for xFormers compatibility (its symmetric-memory switches); ignored.
    """
    if not callable(my_matmul):
        raise ValueError(f"fused_allgather_and_anything: my_matmul must be callable, got {my_matmul!r}")
    _check_tensors(scattered_inputs, "fused_allgather_and_anything", "scattered_inputs")
    world = _group_size(group, "fused_allgather_and_anything")
    if not scattered_inputs:
        for src in range(world):
            my_matmul([], src, default_stream_factory(torch.device("cpu")))
        return
    device = scattered_inputs[0].device
    check_group(group, scattered_inputs[0], "fused_allgather_and_anything", "group")
    rank = group.rank()
    if world == 1:
        my_matmul(list(scattered_inputs), 0, default_stream_factory(device))
    elif _fused_disabled():
        gathered = [si.new_empty((world, *si.shape)) for si in scattered_inputs]
        for si, gi in zip(scattered_inputs, gathered):  # bytes, in the concatenated form every backend takes
            _all_gather_flat(gi.flatten(0, 1).view(torch.uint8), si.view(torch.uint8), group=group)
        for src in range(world):
            my_matmul([gi[src] for gi in gathered], src, default_stream_factory(device))
    else:
        streams = ComputeStreams(device)
        received: dict[int, tuple[list[torch.Tensor], list[Work]]] = {}
        for i in range(1, world):
            src = (rank - i) % world
            bufs = [torch.empty_like(si) for si in scattered_inputs]
            received[src] = (bufs, ring_step(group, scattered_inputs, (rank + i) % world, bufs, src))
        my_matmul(list(scattered_inputs), rank, streams)
        for i in range(1, world):
            bufs, works = received[(rank - i) % world]
            streams.wait(works, timeout_s)  # this step's send and receive
            my_matmul(bufs, (rank - i) % world, streams)
        streams.finish()


def fused_anything_and_reducescatter(
    my_matmul: MyMatmul,
    scattered_outputs: list[torch.Tensor],
    *,
    group: ProcessGroup,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    **private_args_DO_NOT_USE: Any,
) -> None:
    """Compute each rank's partial outputs with ``my_matmul``, send them as they are done, sum what this rank gets.

    Args:
        my_matmul: called as ``my_matmul(outputs, dst_rank, stream_factory)`` once per rank of the group; it must
            write into ``outputs`` (fresh tensors shaped like ``scattered_outputs``) this rank's contribution to
            ``dst_rank``'s result: ``r+1, r+2, ...`` first, own rank last. With no outputs it is called as
            ``my_matmul([], rank, stream_factory)`` for every rank.
        scattered_outputs: contiguous tensors receiving the sum over the ranks of their contributions to us.
        group, timeout_s, **private_args_DO_NOT_USE: as :func:`fused_allgather_and_anything`.
    """
    if not callable(my_matmul):
        raise ValueError(f"fused_anything_and_reducescatter: my_matmul must be callable, got {my_matmul!r}")
    _check_tensors(scattered_outputs, "fused_anything_and_reducescatter", "scattered_outputs")
    world = _group_size(group, "fused_anything_and_reducescatter")
    if not scattered_outputs:
        for dst in range(world):
            my_matmul([], dst, default_stream_factory(torch.device("cpu")))
        return
    device = scattered_outputs[0].device
    check_group(group, scattered_outputs[0], "fused_anything_and_reducescatter", "group")
    rank = group.rank()
    if world == 1:
        my_matmul(list(scattered_outputs), 0, default_stream_factory(device))
        return
    staged = [so.new_empty((world, *so.shape)) for so in scattered_outputs]  # [W, ...]: row j from rank j
    if _fused_disabled():
        for dst in range(world):
            my_matmul([st[dst] for st in staged], dst, default_stream_factory(device))
        for st, so in zip(staged, scattered_outputs):
            _reduce_scatter_flat(so, st.flatten(0, 1), group=group)
        return
    streams = ComputeStreams(device)
    works: list[Work] = []
    sent = []  # partial outputs kept alive until their transfer is done
    for i in range(1, world):
        dst, src = (rank + i) % world, (rank - i) % world
        partial = [torch.empty_like(so) for so in scattered_outputs]
        my_matmul(partial, dst, streams)
        with torch.cuda.stream(streams.join_last()):  # send once the partial is written
            works += ring_step(group, partial, dst, [st[src] for st in staged], src)
        sent.append(partial)
    my_matmul([st[rank] for st in staged], rank, streams)
    streams.finish()
    streams.wait(works, timeout_s)
    for st, so in zip(staged, scattered_outputs):
        torch.sum(st, dim=0, out=so)
