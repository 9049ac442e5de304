"""differentiable_collectives on 2 and 4 gloo ranks: each function against the same collective computed by
one process from every rank's data (all ranks draw all ranks' inputs from one seed), forward and gradients.

Inputs are small integers, so every sum is exact in every dtype: comparisons are exact.
"""

import pytest
import torch
import torch.distributed as dist

from triformers.ops import differentiable_collectives as dc

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(3,), (1, 5), (3, 2, 17)]  # shard shapes: odd sizes, 1-D to 3-D


def per_rank(seed: int, world: int, shape, dtype) -> list[torch.Tensor]:
    """One tensor per rank of values in {-2, -1, 1, 2}, the same on every rank for a given seed."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (world, *shape), generator=g) * 2 - 1
    return list((sign * torch.randint(1, 3, (world, *shape), generator=g)).to(dtype).unbind(0))


def _forward_collectives(rank, world, dtype, shape):
    group = dist.group.WORLD
    xs = per_rank(1, world, shape, dtype)
    full = torch.cat(xs)  # [W·s, ...]

    out = dc.gather_along_first_dim(xs[rank].clone(), process_group=group)
    torch.testing.assert_close(out, full, atol=0, rtol=0)
    out, work = dc.gather_along_first_dim_async(xs[rank].clone(), process_group=group)
    work.wait()
    torch.testing.assert_close(out, full, atol=0, rtol=0)

    big = per_rank(2, world, (world * shape[0], *shape[1:]), dtype)  # each rank's [W·s, ...]
    expected = torch.stack(big).sum(0).chunk(world)[rank]
    out = dc.reduce_scatter_along_first_dim(big[rank].clone(), process_group=group)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    out, work = dc.reduce_scatter_along_first_dim_async(big[rank].clone(), process_group=group)
    work.wait()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)

    x = xs[rank].clone()
    dc.all_reduce(x, process_group=group)
    torch.testing.assert_close(x, torch.stack(xs).sum(0), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_collectives(ranks, dtype, shape):
    ranks.run(_forward_collectives, dtype, shape)


def _regions(rank, world, dtype, shape):
    group = dist.group.WORLD
    s = shape[0]
    # copy_to: identity; backward sums every rank's gradient
    x = per_rank(3, world, shape, dtype)[0].requires_grad_()  # replicated input
    grads = per_rank(4, world, shape, dtype)
    y = dc.copy_to_model_parallel_region(x, group)
    torch.testing.assert_close(y, x, atol=0, rtol=0)
    y.backward(grads[rank])
    torch.testing.assert_close(x.grad, torch.stack(grads).sum(0), atol=0, rtol=0)

    # reduce_from: sum (in place); backward identity
    xs = per_rank(5, world, shape, dtype)
    leaf = xs[rank].clone().requires_grad_()
    y = dc.reduce_from_model_parallel_region(leaf * 1, group)
    torch.testing.assert_close(y, torch.stack(xs).sum(0), atol=0, rtol=0)
    y.backward(grads[rank])
    torch.testing.assert_close(leaf.grad, grads[rank], atol=0, rtol=0)

    # gather_from_sequence: all-gather; backward reduce-scatter
    leaf = xs[rank].clone().requires_grad_()
    y = dc.gather_from_sequence_parallel_region(leaf, group)
    torch.testing.assert_close(y, torch.cat(xs), atol=0, rtol=0)
    big_grads = per_rank(6, world, (world * s, *shape[1:]), dtype)
    y.backward(big_grads[rank])
    torch.testing.assert_close(leaf.grad, torch.stack(big_grads).sum(0)[rank * s : (rank + 1) * s], atol=0, rtol=0)

    # scatter_to_sequence: reduce-scatter; backward all-gather (of a non-contiguous gradient too)
    big = per_rank(7, world, (world * s, *shape[1:]), dtype)
    leaf = big[rank].clone().requires_grad_()
    y = dc.scatter_to_sequence_parallel_region(leaf, group)
    torch.testing.assert_close(y, torch.stack(big).sum(0)[rank * s : (rank + 1) * s], atol=0, rtol=0)
    (y * grads[rank]).sum().backward()  # the gradient reaching the region is grads[rank] (a mul's output)
    torch.testing.assert_close(leaf.grad, torch.cat(grads), atol=0, rtol=0)
    y = dc.scatter_to_sequence_parallel_region(leaf, group)
    y.sum().backward()  # a stride-0 gradient of ones
    torch.testing.assert_close(leaf.grad, torch.cat(grads) + 1, atol=0, rtol=0)

    # process_group=None: every region function is the identity
    for region in (
        dc.copy_to_model_parallel_region,
        dc.reduce_from_model_parallel_region,
        dc.gather_from_sequence_parallel_region,
        dc.scatter_to_sequence_parallel_region,
    ):
        assert region(leaf, None) is leaf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_regions_forward_backward(ranks, dtype, shape):
    ranks.run(_regions, dtype, shape)


def _single_rank_group(rank, world):
    """On a group of one rank every function returns its input (async ones with no work)."""
    groups = [dist.new_group([r]) for r in range(world)]  # every rank must create every group
    group = groups[rank]
    x = torch.arange(6.0).view(3, 2)
    assert dc.gather_along_first_dim(x, process_group=group) is x
    assert dc.reduce_scatter_along_first_dim(x, process_group=group) is x
    assert dc.gather_along_first_dim_async(x, process_group=group) == (x, None)
    assert dc.reduce_scatter_along_first_dim_async(x, process_group=group) == (x, None)
    y = x.clone()
    dc.all_reduce(y, process_group=group)
    torch.testing.assert_close(y, x, atol=0, rtol=0)


def test_single_rank_group(ranks):
    ranks.run(_single_rank_group)


def _errors(rank, world):
    group = dist.group.WORLD
    x = torch.ones(world * 3, 4)
    with pytest.raises(ValueError, match=rf"contiguous input_ \(got shape=\(4, {world * 3}\), stride=\(1, 4\)\)"):
        dc.gather_along_first_dim(x.t(), process_group=group)
    with pytest.raises(ValueError, match=r"contiguous x .*\.contiguous\(\)"):
        dc.all_reduce(x.t(), process_group=group)
    with pytest.raises(ValueError, match=rf"input_.shape=\({world * 3 + 1}, 4\).*multiple of the group's size {world}"):
        dc.reduce_scatter_along_first_dim(torch.ones(world * 3 + 1, 4), process_group=group)
    with pytest.raises(ValueError, match=r"ProcessGroup as process_group, got process_group=None.*group.WORLD"):
        dc.gather_along_first_dim(x, process_group=None)
    with pytest.raises(ValueError, match=r"gloo backend, which moves cpu tensors, but the input is on meta"):
        dc.gather_along_first_dim(torch.empty(3, 4, device="meta"), process_group=group)
    with pytest.raises(ValueError, match=r"copy_to_model_parallel_region needs a torch.distributed.ProcessGroup"):
        dc.copy_to_model_parallel_region(x, "world")


def test_errors(ranks):
    ranks.run(_errors)
