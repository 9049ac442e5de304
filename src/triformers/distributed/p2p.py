"""Point-to-point ring transfers overlapped with compute, on any backend and device.

A ring algorithm (fused all-gather + matmul, reduce-scatter, ring attention) runs W-1 steps: at step ``i`` rank
``r`` sends to ``r+i`` (or ``r+1`` every step) and receives from ``r-i``, and computes on what has arrived while
the next transfer is in flight. Two pieces make that overlap work the same on CPU (gloo) and CUDA (NCCL):

- :func:`ring_step` issues one step's sends and receives as one ``batch_isend_irecv`` (NCCL matches the
  pairs of a step inside one group call, so no ordering of sends and receives can deadlock) and moves raw
  bytes, so any dtype goes over any backend (FP8 over gloo, which has no FP8 type);
- :class:`ComputeStreams` is the ``stream_factory`` handed to compute callbacks: on CUDA it alternates between
  the current stream and a second one and makes them wait for exactly the transfers a chunk needs (the host
  never blocks); on CPU it returns None, for which ``torch.cuda.stream(None)`` is a no-op, and waits on the
  work handles instead.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, Work

__all__ = ["ring_step", "ComputeStreams", "default_stream_factory"]

_SECOND_STREAMS: dict[torch.device, Any] = {}  # one per CUDA device, reused across calls


def ring_step(
    group: ProcessGroup, sends: list[torch.Tensor], dst: int, recvs: list[torch.Tensor], src: int
) -> list[Work]:
    """Start one ring step: send ``sends`` to rank ``dst`` and receive ``recvs`` from rank ``src`` of ``group``.

    Tensors must be contiguous; they are transferred as bytes (``recvs[j]`` must have the byte size of what
    ``src`` sends as its ``j``-th tensor). Every rank of the step must call it with matching peers.

    Returns:
        The work handles; ``sends`` must stay unmodified and ``recvs`` unread until they are waited for.
    """
    gdst, gsrc = dist.get_global_rank(group, dst), dist.get_global_rank(group, src)
    ops = [dist.P2POp(dist.isend, t.view(torch.uint8), gdst, group) for t in sends]
    ops += [dist.P2POp(dist.irecv, t.view(torch.uint8), gsrc, group) for t in recvs]
    return dist.batch_isend_irecv(ops)


class ComputeStreams:
    """``stream_factory()`` for compute callbacks: on CUDA alternately the current stream and a second one.

    Create it after the inputs are written (the second stream waits for the current one here), call
    :meth:`wait` before computing on received data, :meth:`join_last` before sending computed data, and
    :meth:`finish` at the end (the current stream then waits for the second one).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.streams: list[Any] = [None]
        self.last = None
        if self.cuda:
            current = torch.cuda.current_stream(device)
            if device not in _SECOND_STREAMS:
                _SECOND_STREAMS[device] = torch.cuda.Stream(device)
            second = _SECOND_STREAMS[device]
            second.wait_stream(current)  # the inputs were written on the current stream
            self.streams = [current, second]
        self._next = 0

    def __call__(self) -> Any:
        self.last = self.streams[self._next]
        self._next = (self._next + 1) % len(self.streams)
        return self.last

    def wait(self, works: list[Work], timeout_s: float) -> None:
        """Make both streams wait for ``works`` (CUDA: the host does not block) or wait for them (CPU)."""
        if not self.cuda:
            for w in works:
                w.wait(datetime.timedelta(seconds=timeout_s))
            return
        for s in self.streams:
            with torch.cuda.stream(s):
                for w in works:
                    w.wait()

    def join_last(self) -> Any:
        """The stream the last callback ran on, after the other stream's work: issue sends under it (None on
        CPU, and when no callback asked for a stream: the current stream then)."""
        if self.cuda and self.last is not None:
            for s in self.streams:
                if s is not self.last:
                    self.last.wait_stream(s)
        return self.last

    def finish(self) -> None:
        if self.cuda:
            self.streams[0].wait_stream(self.streams[1])


def default_stream_factory(device: torch.device) -> Callable[[], Any]:
    """The ``stream_factory`` of calls without overlap: the current CUDA stream, or None on other devices."""
    if device.type == "cuda":
        return torch.cuda.current_stream
    return lambda: None
