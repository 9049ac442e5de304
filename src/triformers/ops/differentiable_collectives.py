"""Collectives along the first dim, and the autograd regions of tensor/sequence parallelism (xFormers' API).

The plain functions (not differentiable) gather or reduce-scatter along dim 0, the sequence dim of
sequence-parallel activations: ``gather_along_first_dim`` turns ``[S/world, ...]`` shards into the
``[S, ...]`` tensor on every rank (rank ``r``'s shard at rows ``r·S/world`` onwards), and
``reduce_scatter_along_first_dim`` sums ``[S, ...]`` over the ranks and keeps this rank's ``[S/world, ...]``
block. Their ``*_async`` forms return ``(output, work)``; call ``work.wait()`` before reading ``output``.

The four region functions (Megatron-LM's) are identities and collectives paired with their adjoints, so that
autograd gives every rank the gradient of the global computation:

======================================  ===========================  ===========================
function                                forward                      backward
======================================  ===========================  ===========================
``copy_to_model_parallel_region``       identity                     all-reduce (sum)
``reduce_from_model_parallel_region``   all-reduce (sum, in place)   identity
``gather_from_sequence_parallel_region`` all-gather along dim 0      reduce-scatter along dim 0
``scatter_to_sequence_parallel_region``  reduce-scatter along dim 0   all-gather along dim 0
======================================  ===========================  ===========================

They return their input unchanged when ``process_group`` is None; every function is a no-op (returns its
input, or ``(input, None)``) on a group of one rank. Tensors must live where the group's backend works (CPU
for gloo, CUDA for NCCL).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp, Work

__all__ = [
    "all_reduce",
    "gather_along_first_dim_async",
    "reduce_scatter_along_first_dim_async",
    "gather_along_first_dim",
    "reduce_scatter_along_first_dim",
    "copy_to_model_parallel_region",
    "reduce_from_model_parallel_region",
    "gather_from_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
]

# torch >= 2.12 renamed the flat-tensor collectives (the old names warn); torch 2.4 has only the old ones
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# device type each backend moves tensors of; a mismatch fails deep inside the backend with an obscure message
_BACKEND_DEVICE = {"nccl": "cuda", "gloo": "cpu"}


def check_group(process_group: ProcessGroup | None, tensor: torch.Tensor, fn: str, arg: str = "process_group") -> None:
    """Raise ValueError unless ``process_group`` is a process group whose backend can move ``tensor``."""
    if not isinstance(process_group, ProcessGroup):
        raise ValueError(
            f"{fn} needs a torch.distributed.ProcessGroup as {arg}, got {arg}={process_group!r}; pass "
            f"torch.distributed.group.WORLD for all ranks, or a group from torch.distributed.new_group"
        )
    if process_group.size() == 1:
        return
    backend = str(dist.get_backend(process_group))
    want = _BACKEND_DEVICE.get(backend)
    if want is not None and tensor.device.type != want:
        raise ValueError(
            f"{fn}: {arg} uses the {backend} backend, which moves {want} tensors, but the input is on "
            f"{tensor.device}; move the input to {want} or use a group with a backend for {tensor.device.type}"
        )


def _check_contiguous(x: torch.Tensor, fn: str, arg: str = "input_") -> None:
    if not x.is_contiguous():
        raise ValueError(
            f"{fn} needs a contiguous {arg} (got shape={tuple(x.shape)}, stride={x.stride()}); pass {arg}.contiguous()"
        )


def all_reduce(x: torch.Tensor, *, process_group: ProcessGroup) -> None:
    """Sum ``x`` over the ranks of ``process_group``, in place (contiguous ``x``); nothing on one rank."""
    check_group(process_group, x, "all_reduce")
    _check_contiguous(x, "all_reduce", "x")
    if process_group.size() == 1:
        return
    dist.all_reduce(x, op=ReduceOp.SUM, group=process_group)


def gather_along_first_dim_async(
    input_: torch.Tensor, *, process_group: ProcessGroup
) -> tuple[torch.Tensor, Work | None]:
    """Start an all-gather of ``input_ [S, ...]`` into ``[world·S, ...]`` (rank order along dim 0).

    Returns:
        ``(output, work)``: ``output`` is valid after ``work.wait()``; ``(input_, None)`` on one rank.
    """
    check_group(process_group, input_, "gather_along_first_dim")
    _check_contiguous(input_, "gather_along_first_dim")
    world = process_group.size()
    if world == 1:
        return input_, None
    output = input_.new_empty((input_.shape[0] * world, *input_.shape[1:]))
    work = _all_gather_flat(output, input_, group=process_group, async_op=True)
    return output, work


def reduce_scatter_along_first_dim_async(
    input_: torch.Tensor, *, process_group: ProcessGroup
) -> tuple[torch.Tensor, Work | None]:
    """Start a reduce-scatter (sum) of ``input_ [S, ...]``: this rank gets rows ``[r·S/world, (r+1)·S/world)``.

    Returns:
        ``(output [S/world, ...], work)``; ``(input_, None)`` on one rank.

    Raises:
        ValueError: ``input_.shape[0]`` is not a multiple of the group's size.
    """
    check_group(process_group, input_, "reduce_scatter_along_first_dim")
    _check_contiguous(input_, "reduce_scatter_along_first_dim")
    world = process_group.size()
    if world == 1:
        return input_, None
    if input_.dim() == 0 or input_.shape[0] % world:
        raise ValueError(
            f"reduce_scatter_along_first_dim splits dim 0 of input_ into {world} equal blocks, but "
            f"input_.shape={tuple(input_.shape)}; pad dim 0 to a multiple of the group's size {world}"
        )
    output = input_.new_empty((input_.shape[0] // world, *input_.shape[1:]))
    work = _reduce_scatter_flat(output, input_, op=ReduceOp.SUM, group=process_group, async_op=True)
    return output, work


def gather_along_first_dim(input_: torch.Tensor, *, process_group: ProcessGroup) -> torch.Tensor:
    """All-gather ``input_ [S, ...]`` into ``[world·S, ...]`` (see :func:`gather_along_first_dim_async`)."""
    output, work = gather_along_first_dim_async(input_, process_group=process_group)
    if work is not None:
        work.wait()
    return output


def reduce_scatter_along_first_dim(input_: torch.Tensor, *, process_group: ProcessGroup) -> torch.Tensor:
    """Reduce-scatter ``input_ [S, ...]`` into ``[S/world, ...]`` (see :func:`reduce_scatter_along_first_dim_async`)."""
    output, work = reduce_scatter_along_first_dim_async(input_, process_group=process_group)
    if work is not None:
        work.wait()
    return output


class _CopyToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, process_group):
        ctx.process_group = process_group
        return x

    @staticmethod
    def backward(ctx, grad):
        # a copy: the incoming gradient can be a tensor the caller still holds (y.backward(g))
        grad = grad.clone(memory_format=torch.contiguous_format)
        all_reduce(grad, process_group=ctx.process_group)
        return grad, None


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, process_group):
        all_reduce(x, process_group=process_group)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, process_group):
        ctx.process_group = process_group
        return gather_along_first_dim(x, process_group=process_group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_along_first_dim(grad.contiguous(), process_group=ctx.process_group), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, process_group):
        ctx.process_group = process_group
        return reduce_scatter_along_first_dim(x, process_group=process_group)

    @staticmethod
    def backward(ctx, grad):
        return gather_along_first_dim(grad.contiguous(), process_group=ctx.process_group), None


def copy_to_model_parallel_region(x: torch.Tensor, process_group: ProcessGroup | None) -> torch.Tensor:
    """Identity whose backward sums the gradient over the ranks (enter a column-parallel region)."""
    if process_group is None:
        return x
    check_group(process_group, x, "copy_to_model_parallel_region")
    return _CopyToModelParallelRegion.apply(x, process_group)


def reduce_from_model_parallel_region(x: torch.Tensor, process_group: ProcessGroup | None) -> torch.Tensor:
    """Sum ``x`` over the ranks, in place (leave a row-parallel region); the backward is the identity."""
    if process_group is None:
        return x
    return _ReduceFromModelParallelRegion.apply(x, process_group)


def gather_from_sequence_parallel_region(x: torch.Tensor, process_group: ProcessGroup | None) -> torch.Tensor:
    """All-gather along dim 0; the backward reduce-scatters the gradient."""
    if process_group is None:
        return x
    return _GatherFromSequenceParallelRegion.apply(x, process_group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, process_group: ProcessGroup | None) -> torch.Tensor:
    """Reduce-scatter along dim 0; the backward all-gathers the gradient."""
    if process_group is None:
        return x
    return _ScatterToSequenceParallelRegion.apply(x, process_group)
