"""seqpar on 2 and 4 gloo ranks: the leading / trailing matmuls, forward and every gradient, against one process
computing the whole tensor-parallel product in float64 with autograd from every rank's data.

Inputs and output gradients are small integers and the sizes keep every sum below 256, so results are exact in
every dtype: comparisons are exact. fuse=True (overlapped transfers) and fuse=False (one collective).
"""

import collections
import itertools

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from triformers.checkpoint import checkpoint
from triformers.ops.seqpar import sequence_parallel_leading_matmul, sequence_parallel_trailing_matmul

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shard rows s, middle dims, in features, out features of each weight); S = world * s
SIZES = [(3, (), 13, (5, 1)), (1, (2,), 5, (3,))]


def ints(gen: torch.Generator, *shape, dtype=torch.float32) -> torch.Tensor:
    """Values in {-2, -1, 1, 2}."""
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return (sign * torch.randint(1, 3, shape, generator=gen)).to(dtype)


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.detach().clone().to(dtype or t.dtype).requires_grad_()


def exact(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype != torch.float64 or ref.dtype == torch.float64
    torch.testing.assert_close(got, ref.to(got.dtype), atol=0, rtol=0)


def _leading(rank, world, dtype, size, fuse):
    s, mid, fin, fouts = size
    gen = torch.Generator().manual_seed(20)
    xs = [ints(gen, s, *mid, fin, dtype=dtype) for _ in range(world)]  # sequence shards
    ws = [[ints(gen, fin, f, dtype=dtype) for f in fouts] for _ in range(world)]  # column-parallel, per rank
    gs = [[ints(gen, world * s, *mid, f, dtype=dtype) for f in fouts] for _ in range(world)]  # output gradients

    x_ref = leaf(torch.cat(xs), torch.float64)
    w_ref = [[leaf(w, torch.float64) for w in row] for row in ws]
    y_ref = [[x_ref @ w for w in row] for row in w_ref]
    torch.autograd.backward([y for row in y_ref for y in row], [g.double() for row in gs for g in row])

    x, w = leaf(xs[rank]), [leaf(t) for t in ws[rank]]
    ys = sequence_parallel_leading_matmul(x, w, fuse=fuse, process_group=dist.group.WORLD)
    for y, yr in zip(ys, y_ref[rank]):
        assert y.shape == yr.shape
        exact(y, yr)
    torch.autograd.backward(ys, gs[rank])
    exact(x.grad, x_ref.grad[rank * s : (rank + 1) * s])
    for wi, wr in zip(w, w_ref[rank]):
        exact(wi.grad, wr.grad)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_leading_matmul(ranks, size, dtype, fuse):
    ranks.run(_leading, dtype, size, fuse)


def _trailing(rank, world, dtype, size, fuse):
    s, mid, fin, (fout, *_) = size
    gen = torch.Generator().manual_seed(21)
    xs = [ints(gen, world * s, *mid, fin, dtype=dtype) for _ in range(world)]  # full sequence, in/W features
    ws = [ints(gen, fin, fout, dtype=dtype) for _ in range(world)]  # row-parallel, per rank
    gs = [ints(gen, s, *mid, fout, dtype=dtype) for _ in range(world)]  # gradients of the shards

    x_ref = [leaf(t, torch.float64) for t in xs]
    w_ref = [leaf(t, torch.float64) for t in ws]
    y_ref = sum(x @ w for x, w in zip(x_ref, w_ref)).chunk(world)
    torch.autograd.backward(list(y_ref), [g.double() for g in gs])

    x, w = leaf(xs[rank]), leaf(ws[rank])
    y = sequence_parallel_trailing_matmul(x, w, fuse=fuse, process_group=dist.group.WORLD)
    assert y.shape == y_ref[rank].shape
    exact(y, y_ref[rank])
    y.backward(gs[rank])
    exact(x.grad, x_ref[rank].grad)
    exact(w.grad, w_ref[rank].grad)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_trailing_matmul(ranks, size, dtype, fuse):
    ranks.run(_trailing, dtype, size, fuse)


def _mlp(rank, world, fuse, compiled):
    """leading -> relu -> trailing, eager or compiled (fullgraph), against float64; every gradient."""
    gen = torch.Generator().manual_seed(22)
    s, d, h = 3, 8, 2  # shard rows, model dim, hidden features per rank
    xs = [ints(gen, s, d) for _ in range(world)]
    w1s = [ints(gen, d, h) for _ in range(world)]
    w2s = [ints(gen, h, d) for _ in range(world)]
    gs = [ints(gen, s, d) for _ in range(world)]

    x_ref = leaf(torch.cat(xs), torch.float64)
    w1_ref, w2_ref = [leaf(t, torch.float64) for t in w1s], [leaf(t, torch.float64) for t in w2s]
    y_ref = sum((x_ref @ w1).relu() @ w2 for w1, w2 in zip(w1_ref, w2_ref)).chunk(world)
    torch.autograd.backward(list(y_ref), [g.double() for g in gs])

    group = dist.group.WORLD

    def block(x, w1, w2):
        (hidden,) = sequence_parallel_leading_matmul(x, [w1], fuse=fuse, process_group=group)
        return sequence_parallel_trailing_matmul(hidden.relu(), w2, fuse=fuse, process_group=group)

    fn = torch.compile(block, backend="aot_eager", fullgraph=True) if compiled else block
    x, w1, w2 = leaf(xs[rank]), leaf(w1s[rank]), leaf(w2s[rank])
    y = fn(x, w1, w2)
    exact(y, y_ref[rank])
    y.backward(gs[rank])
    exact(x.grad, x_ref.grad[rank * s : (rank + 1) * s])
    exact(w1.grad, w1_ref[rank].grad)
    exact(w2.grad, w2_ref[rank].grad)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_mlp_eager(ranks, fuse):
    ranks.run(_mlp, fuse, compiled=False)


def test_mlp_compiled(ranks):
    if ranks.world_size != 2:
        pytest.skip("tracing is the same for any number of ranks")
    ranks.run(_mlp, True, compiled=True)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _checkpointed(rank, world, fuse):
    """Under selective checkpointing the default policy keeps the sequence-parallel ops by name (no forward
    communication repeated in the backward); an empty policy recomputes them. Gradients equal eager."""
    gen = torch.Generator().manual_seed(24)
    group = dist.group.WORLD
    x0, w1, w2 = ints(gen, 3, 8), ints(gen, 8, 4), ints(gen, 4, 8)
    g = ints(gen, 3, 8)

    def block(x, w1, w2):
        (hidden,) = sequence_parallel_leading_matmul(x, [w1], fuse=fuse, process_group=group)
        return sequence_parallel_trailing_matmul(hidden.relu(), w2, fuse=fuse, process_group=group)

    results = {}
    for name, policy in [("eager", "eager"), ("default", None), ("nothing", [])]:
        x, a, b = leaf(x0), leaf(w1), leaf(w2)
        y = block(x, a, b) if policy == "eager" else checkpoint(block, x, a, b, policy_fn=policy)
        mode = _CountOps()
        with mode:
            y.backward(g)
        results[name] = (y.detach(), x.grad, a.grad, b.grad, mode.counts)
    lead = "triformers.sequence_parallel_leading_matmul_fwd.default"
    assert results["default"][4][lead] == 0 and results["nothing"][4][lead] == 1
    for name in ("default", "nothing"):
        for got, ref in zip(results[name][:4], results["eager"][:4]):
            exact(got, ref)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_selective_checkpointing(ranks, fuse):
    ranks.run(_checkpointed, fuse)


def _opcheck(rank, world):
    """torch.library.opcheck on the custom ops (schema, fake tensors with their strides, autograd registration)."""
    gen = torch.Generator().manual_seed(23)
    name = dist.group.WORLD.group_name
    lead = torch.ops.triformers.sequence_parallel_leading_matmul_fwd.default
    trail = torch.ops.triformers.sequence_parallel_trailing_matmul_fwd.default
    lead_bwd = torch.ops.triformers.sequence_parallel_leading_matmul_bwd.default
    trail_bwd = torch.ops.triformers.sequence_parallel_trailing_matmul_bwd.default
    for fuse, transposed in itertools.product((True, False), (False, True)):
        # transposed: column-major weights (ColumnParallelLinear passes weight.t()) and a non-contiguous input
        x = (ints(gen, 8, 3).t() if transposed else ints(gen, 3, 8)).requires_grad_()
        ws = [(ints(gen, 5, 8).t() if transposed else ints(gen, 8, 5)).requires_grad_() for _ in range(2)]
        torch.library.opcheck(lead, (x, ws, fuse, name))
        grads = [ints(gen, 3 * world, 5) for _ in ws]
        torch.library.opcheck(lead_bwd, (x.detach(), [w.detach() for w in ws], grads, fuse, name))
        xt = (ints(gen, 8, 2 * world).t() if transposed else ints(gen, 2 * world, 8)).requires_grad_()
        wt = (ints(gen, 5, 8).t() if transposed else ints(gen, 8, 5)).requires_grad_()
        torch.library.opcheck(trail, (xt, wt, fuse, name))
        torch.library.opcheck(trail_bwd, (xt.detach(), wt.detach(), ints(gen, 2, 5), fuse, name))


def test_opcheck(ranks):
    if ranks.world_size != 2:
        pytest.skip("the checks are the same for any number of ranks")
    ranks.run(_opcheck)


def _errors(rank, world):
    group = dist.group.WORLD
    x = torch.ones(3, 8)
    lead, trail = sequence_parallel_leading_matmul, sequence_parallel_trailing_matmul
    with pytest.raises(ValueError, match=r"ws\[1\] is shape=\(5, 4\) torch.float32 on cpu, but x is shape=\(3, 8\)"):
        lead(x, [torch.ones(8, 4), torch.ones(5, 4)], fuse=True, process_group=group)
    with pytest.raises(ValueError, match=r"ws must be a non-empty list"):
        lead(x, torch.ones(8, 4), fuse=True, process_group=group)
    with pytest.raises(ValueError, match=r"fuse must be True or False, got fuse=1"):
        lead(x, [torch.ones(8, 4)], fuse=1, process_group=group)
    with pytest.raises(ValueError, match=r"w is shape=\(8, 4\) torch.float16"):
        trail(x, torch.ones(8, 4, dtype=torch.float16), fuse=False, process_group=group)
    with pytest.raises(ValueError, match=rf"x.shape=\({3 * world + 1}, 8\) cannot be split into {world} equal"):
        trail(torch.ones(3 * world + 1, 8), torch.ones(8, 4), fuse=False, process_group=group)
    with pytest.raises(ValueError, match=r"x must be \[S, \.\.\., in\] with at least 2 dims, got x.shape=\(8,\)"):
        lead(torch.ones(8), [torch.ones(8, 4)], fuse=True, process_group=group)
    with pytest.raises(ValueError, match=r"ProcessGroup as process_group, got process_group=None"):
        trail(x, torch.ones(8, 4), fuse=False, process_group=None)


def test_errors(ranks):
    ranks.run(_errors)
