"""Differentiable sequence-parallel matmuls: the entry and exit of a tensor-parallel block (xFormers' API).

With sequence parallelism, activations outside a tensor-parallel block are sharded along the sequence (dim 0):
each of the W ranks holds ``[S/W, ..., d]``. The block's first matmul needs the whole sequence and its last
one produces partial sums of the whole sequence:

- ``sequence_parallel_leading_matmul(x, ws)``: ``[all_gather(x) @ w for w in ws]`` (column-parallel weights
  ``w [in, out_local]``; ``x @ w`` layout, not ``F.linear``'s), ``[S/W, ..., in] -> [S, ..., out_local]``;
- ``sequence_parallel_trailing_matmul(x, w)``: ``reduce_scatter(x @ w)`` (row-parallel ``w [in_local, out]``),
  ``[S, ..., in_local] -> [S/W, ..., out]``.

Backward (``x`` flattened to ``[rows, in]``, ``g`` the output gradients):

- leading: ``dx = reduce_scatter(Σ_i g_i @ w_iᵀ)``, ``dw_i = all_gather(x)ᵀ @ g_i``;
- trailing: ``dx = all_gather(g) @ wᵀ``, ``dw = xᵀ @ all_gather(g)``.

``fuse=True`` runs every collective through :mod:`~triformers.ops.sequence_parallel_fused_ops` (transfers
overlapped chunk by chunk with the matmuls, forward and backward); ``fuse=False`` issues one collective and
overlaps it with the independent matmul of the backward (the all-gather of ``x`` with the ``dx`` matmul, the
reduce-scatter of ``dx`` with the ``dw`` matmul). Both run on CPU (gloo) and CUDA (NCCL).

Forward and backward are ``torch.library`` custom ops (``triformers::sequence_parallel_leading_matmul_fwd``,
``..._bwd``, ``triformers::sequence_parallel_trailing_matmul_fwd``, ``..._bwd``) with fake implementations and
a registered autograd formula: eager autograd and ``torch.compile(fullgraph=True)`` both see one opaque op per
direction, and selective checkpointing can keep their outputs by name (recomputing them would repeat the
communication).
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from triformers.ops.differentiable_collectives import (
    check_group,
    gather_along_first_dim,
    gather_along_first_dim_async,
    reduce_scatter_along_first_dim,
    reduce_scatter_along_first_dim_async,
)
from triformers.ops.sequence_parallel_fused_ops import (
    _resolve_group,
    fused_allgather_and_anything,
    fused_allgather_and_linear,
    fused_anything_and_reducescatter,
    fused_linear_and_reducescatter,
)
from triformers.ops.tiled_matmul import tiled_matmul, tiled_matmul_out

__all__ = ["sequence_parallel_leading_matmul", "sequence_parallel_trailing_matmul"]


class _InOrder:
    """Serialises in-place accumulations into one tensor from alternating CUDA streams; nothing on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.event = torch.cuda.Event() if device.type == "cuda" else None

    def __enter__(self) -> None:
        if self.event is not None:
            self.event.wait()  # the stream entered last waits for the previous accumulation

    def __exit__(self, *exc_info: object) -> None:
        if self.event is not None:
            self.event.record()


def _dense(grad: torch.Tensor) -> torch.Tensor:
    """Gradients with zero strides (broadcast, e.g. from ``torch.library.opcheck``) as real tensors."""
    return grad.clone(memory_format=torch.contiguous_format) if 0 in grad.stride() else grad.contiguous()


# ------------------------------------------------------------------------------------------------------------
# Leading matmul: all-gather then column-parallel matmuls
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("triformers::sequence_parallel_leading_matmul_fwd", mutates_args=())
def _leading_fwd(
    scattered_input: torch.Tensor, weights: list[torch.Tensor], fuse: bool, process_group_name: str
) -> list[torch.Tensor]:
    group = _resolve_group(process_group_name)
    x = scattered_input.contiguous()
    if fuse:
        return fused_allgather_and_linear(x, [w.t() for w in weights], group=group)
    gathered = gather_along_first_dim(x, process_group=group)
    return tiled_matmul([[gathered]], [list(weights)])[0]


@_leading_fwd.register_fake
def _leading_fwd_fake(scattered_input, weights, fuse, process_group_name):
    rows = scattered_input.shape[0] * _resolve_group(process_group_name).size()
    return [scattered_input.new_empty((rows, w.shape[1])) for w in weights]


@torch.library.custom_op("triformers::sequence_parallel_leading_matmul_bwd", mutates_args=())
def _leading_bwd(
    scattered_input: torch.Tensor,
    weights: list[torch.Tensor],
    grad_outputs: list[torch.Tensor],
    fuse: bool,
    process_group_name: str,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    group = _resolve_group(process_group_name)
    world = group.size()
    x = scattered_input.contiguous()
    grads = [_dense(g) for g in grad_outputs]  # [rows, out_i]
    if fuse:
        grad_x = torch.empty_like(x)
        grad_ws = [torch.zeros_like(w) for w in weights]  # laid out as the weights (as the fake says)
        grad_blocks = [g.tensor_split(world, dim=0) for g in grads]

        def grad_x_matmul(outs, dst, stream_factory):  # this rank's contribution to dst's dx rows
            with torch.cuda.stream(stream_factory()):
                tiled_matmul_out([[gb[dst] for gb in grad_blocks]], [[w.t()] for w in weights], out=[[outs[0]]])

        fused_anything_and_reducescatter(grad_x_matmul, [grad_x], group=group)
        orders = [_InOrder(x.device) for _ in weights]

        def grad_w_matmul(shards, src, stream_factory):  # dw_i += x_srcᵀ @ g_i[src rows], one stream at a time
            for gb, gw, order in zip(grad_blocks, grad_ws, orders):
                with torch.cuda.stream(stream_factory()), order:
                    gw.t().addmm_(gb[src].t(), shards[0])

        fused_allgather_and_anything([x], grad_w_matmul, group=group)
        return grad_x, grad_ws
    gathered, work = gather_along_first_dim_async(x, process_group=group)
    grad_gathered = tiled_matmul([grads], [[w.t()] for w in weights])[0][0]  # Σ_i g_i @ w_iᵀ
    if work is not None:
        work.wait()
    grad_x, work = reduce_scatter_along_first_dim_async(grad_gathered, process_group=group)
    grad_ws = [torch.empty_like(w) for w in weights]
    tiled_matmul_out([[g.t()] for g in grads], [[gathered]], out=[[gw.t()] for gw in grad_ws])  # dw_iᵀ = g_iᵀ @ x
    if work is not None:
        work.wait()
    return grad_x, grad_ws


@_leading_bwd.register_fake
def _leading_bwd_fake(scattered_input, weights, grad_outputs, fuse, process_group_name):
    grad_x = torch.empty_like(scattered_input, memory_format=torch.contiguous_format)
    return grad_x, [torch.empty_like(w) for w in weights]


def _leading_setup_context(ctx, inputs, output):
    scattered_input, weights, fuse, process_group_name = inputs
    ctx.save_for_backward(scattered_input, *weights)
    ctx.fuse, ctx.process_group_name = fuse, process_group_name


def _leading_backward(ctx, grad_outputs):
    scattered_input, *weights = ctx.saved_tensors
    grad_x, grad_ws = _leading_bwd(scattered_input, weights, list(grad_outputs), ctx.fuse, ctx.process_group_name)
    return grad_x, grad_ws, None, None


_leading_fwd.register_autograd(_leading_backward, setup_context=_leading_setup_context)


# ------------------------------------------------------------------------------------------------------------
# Trailing matmul: row-parallel matmul then reduce-scatter
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("triformers::sequence_parallel_trailing_matmul_fwd", mutates_args=())
def _trailing_fwd(
    gathered_input: torch.Tensor, weight: torch.Tensor, fuse: bool, process_group_name: str
) -> torch.Tensor:
    group = _resolve_group(process_group_name)
    x = gathered_input.contiguous()
    if fuse:
        return fused_linear_and_reducescatter(x, weight.t(), group=group)
    return reduce_scatter_along_first_dim(torch.matmul(x, weight), process_group=group)


@_trailing_fwd.register_fake
def _trailing_fwd_fake(gathered_input, weight, fuse, process_group_name):
    rows = gathered_input.shape[0] // _resolve_group(process_group_name).size()
    return gathered_input.new_empty((rows, weight.shape[1]))


@torch.library.custom_op("triformers::sequence_parallel_trailing_matmul_bwd", mutates_args=())
def _trailing_bwd(
    gathered_input: torch.Tensor, weight: torch.Tensor, grad_output: torch.Tensor, fuse: bool, process_group_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    group = _resolve_group(process_group_name)
    world = group.size()
    x = gathered_input.contiguous()
    grad = _dense(grad_output)  # [rows/W, out]
    if fuse:
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight)  # laid out as the weight (as the fake says)
        x_blocks, grad_x_blocks = x.tensor_split(world, dim=0), grad_x.tensor_split(world, dim=0)
        order = _InOrder(x.device)

        def grads_matmul(shards, src, stream_factory):  # src's rows: dx = g_src @ wᵀ, dw += x_srcᵀ @ g_src
            with torch.cuda.stream(stream_factory()):
                torch.matmul(shards[0], weight.t(), out=grad_x_blocks[src])
            with torch.cuda.stream(stream_factory()), order:
                grad_w.t().addmm_(shards[0].t(), x_blocks[src])

        fused_allgather_and_anything([grad], grads_matmul, group=group)
        return grad_x, grad_w
    grad_gathered = gather_along_first_dim(grad, process_group=group)
    grad_w = torch.empty_like(weight)
    torch.mm(grad_gathered.t(), x, out=grad_w.t())  # dwᵀ = gᵀ @ x
    return torch.matmul(grad_gathered, weight.t()), grad_w


@_trailing_bwd.register_fake
def _trailing_bwd_fake(gathered_input, weight, grad_output, fuse, process_group_name):
    return torch.empty_like(gathered_input, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _trailing_setup_context(ctx, inputs, output):
    gathered_input, weight, fuse, process_group_name = inputs
    ctx.save_for_backward(gathered_input, weight)
    ctx.fuse, ctx.process_group_name = fuse, process_group_name


def _trailing_backward(ctx, grad_output):
    gathered_input, weight = ctx.saved_tensors
    grad_x, grad_w = _trailing_bwd(gathered_input, weight, grad_output, ctx.fuse, ctx.process_group_name)
    return grad_x, grad_w, None, None


_trailing_fwd.register_autograd(_trailing_backward, setup_context=_trailing_setup_context)


# ------------------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------------------


def _check(
    fn: str, x: torch.Tensor, ws: list[torch.Tensor], fuse: bool, process_group: ProcessGroup, w_name: str
) -> int:
    check_group(process_group, x, fn)
    if not isinstance(fuse, bool):
        raise ValueError(f"{fn}: fuse must be True or False, got fuse={fuse!r}")
    if x.dim() < 2:
        raise ValueError(f"{fn}: x must be [S, ..., in] with at least 2 dims, got x.shape={tuple(x.shape)}")
    for i, w in enumerate(ws):
        if w.dim() != 2 or w.shape[0] != x.shape[-1] or w.dtype != x.dtype or w.device != x.device:
            raise ValueError(
                f"{fn}: {w_name.format(i=i)} is shape={tuple(w.shape)} {w.dtype} on {w.device}, but x is "
                f"shape={tuple(x.shape)} {x.dtype} on {x.device}; weights are [in, out] (x @ w) with "
                f"in = x.shape[-1] = {x.shape[-1]}, in x's dtype and device"
            )
    return process_group.size()


def sequence_parallel_leading_matmul(
    x: torch.Tensor, ws: list[torch.Tensor], *, fuse: bool, process_group: ProcessGroup
) -> list[torch.Tensor]:
    """``[all_gather(x) @ w for w in ws]``, differentiable: enter a tensor-parallel block from sequence shards.

    Args:
        x: this rank's sequence shard ``[S/W, ..., in]``.
        ws: column-parallel weights ``[in, out_i]`` (``x @ w`` layout), one output each.
        fuse: overlap the communication chunk by chunk with the matmuls (see the module docstring).
        process_group: the W ranks sharing the sequence.

    Returns:
        ``[S, ..., out_i]`` for each weight: the full sequence (rank ``r``'s rows at ``r·S/W`` onwards).
    """
    if not isinstance(ws, (list, tuple)) or not ws:
        raise ValueError(
            f"sequence_parallel_leading_matmul: ws must be a non-empty list of [in, out] weights, "
            f"got {type(ws).__name__}"
        )
    _check("sequence_parallel_leading_matmul", x, list(ws), fuse, process_group, "ws[{i}]")
    outs = _leading_fwd(x.flatten(0, -2), list(ws), fuse, process_group.group_name)
    return [o.view(-1, *x.shape[1:-1], w.shape[1]) for o, w in zip(outs, ws)]


def sequence_parallel_trailing_matmul(
    x: torch.Tensor, w: torch.Tensor, *, fuse: bool, process_group: ProcessGroup
) -> torch.Tensor:
    """``reduce_scatter(x @ w)`` along dim 0, differentiable: leave a tensor-parallel block as sequence shards.

    Args:
        x: the full sequence ``[S, ..., in_local]``, ``S`` a multiple of the group's size W.
        w: this rank's row-parallel weight ``[in_local, out]``.
        fuse, process_group: as :func:`sequence_parallel_leading_matmul`.

    Returns:
        ``[S/W, ..., out]``: rows ``[r·S/W, (r+1)·S/W)`` of ``x @ w`` summed over the ranks.
    """
    fn = "sequence_parallel_trailing_matmul"
    world = _check(fn, x, [w], fuse, process_group, "w")
    if x.shape[0] % world:
        raise ValueError(
            f"{fn}: x.shape={tuple(x.shape)} cannot be split into {world} equal sequence blocks along dim 0; "
            f"pad the sequence to a multiple of the group's size"
        )
    out = _trailing_fwd(x.flatten(0, -2), w, fuse, process_group.group_name)
    return out.view(-1, *x.shape[1:-1], w.shape[1])
