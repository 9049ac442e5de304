"""ColumnParallelLinear / RowParallelLinear on 2 and 4 gloo ranks against one float64 nn.Linear built from the
same full weight (each rank initialises the full weight from the same seed and keeps the slice [rank::W]):
forward and every gradient, with and without sequence parallelism, fused and not.

Weights, inputs and output gradients are small integers (an integer init_method) and the sizes keep every sum
below 256, so results are exact in float32 and bfloat16: comparisons are exact.
"""

import pytest
import torch
import torch.distributed as dist

from triformers.ops.modpar_layers import ColumnParallelLinear, RowParallelLinear

IN, OUTS, S, MID = 13, [8, 4], 3, (2,)  # column layer: in, two weights; sequence rows per rank; middle dims
MODES = [(False, False), (True, False), (True, True)]  # (sequence_parallel, fuse_sequence_parallel)
MODE_IDS = ["tensor-parallel", "seqpar-unfused", "seqpar-fused"]


def ints(gen: torch.Generator | None, *shape, dtype=torch.float32) -> torch.Tensor:
    """Values in {-2, -1, 1, 2} (from the global generator when gen is None)."""
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return (sign * torch.randint(1, 3, shape, generator=gen)).to(dtype)


def int_init(weight: torch.Tensor) -> torch.Tensor:
    """An init_method drawing from the global generator, as torch.nn.init functions do."""
    return weight.copy_(ints(None, *weight.shape))


def exact(got: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(got, ref.to(got.dtype), atol=0, rtol=0)


def full_weights(seed: int, shapes, init=int_init) -> list[torch.Tensor]:
    """The full weights a layer's init draws (same seed, same order), in float64 leaves."""
    torch.manual_seed(seed)
    return [init(torch.empty(shape)).double().requires_grad_() for shape in shapes]


def _column(rank, world, dtype, sequence_parallel, fuse):
    group = dist.group.WORLD
    torch.manual_seed(30)
    layer = ColumnParallelLinear(
        IN,
        OUTS,
        process_group=group,
        bias=False,
        gather_output=False,
        init_method=int_init,
        sequence_parallel=sequence_parallel,
        fuse_sequence_parallel=fuse,
    ).to(dtype)
    fulls = full_weights(30, [(o, IN) for o in OUTS])
    for w, full in zip(layer.weights, fulls):
        exact(w, full[rank::world])

    gen = torch.Generator().manual_seed(31)
    x_full = ints(gen, world * S, *MID, IN, dtype=dtype)
    gs = [[ints(gen, world * S, *MID, o // world, dtype=dtype) for o in OUTS] for _ in range(world)]
    x_ref = x_full.double().requires_grad_()
    ys_ref = [x_ref @ full.t() for full in fulls]  # [S, ..., o]: rank r's outputs are features r::W
    g_full = [torch.stack([gs[r][i] for r in range(world)], -1).flatten(-2).double() for i in range(len(OUTS))]
    torch.autograd.backward(ys_ref, g_full)

    x = (x_full[rank * S : (rank + 1) * S] if sequence_parallel else x_full).clone().requires_grad_()
    ys = layer(x)
    for y, y_ref in zip(ys, ys_ref):
        exact(y, y_ref[..., rank::world])
    torch.autograd.backward(ys, gs[rank])
    exact(x.grad, x_ref.grad[rank * S : (rank + 1) * S] if sequence_parallel else x_ref.grad)
    for w, full in zip(layer.weights, fulls):
        exact(w.grad, full.grad[rank::world])


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_column_parallel(ranks, dtype, mode):
    ranks.run(_column, dtype, *mode)


def _row(rank, world, dtype, sequence_parallel, fuse):
    group = dist.group.WORLD
    fin, fout = 8, 5
    torch.manual_seed(32)
    layer = RowParallelLinear(
        fin,
        fout,
        process_group=group,
        bias=False,
        input_is_parallel=True,
        init_method=int_init,
        sequence_parallel=sequence_parallel,
        fuse_sequence_parallel=fuse,
    ).to(dtype)
    (full,) = full_weights(32, [(fout, fin)])
    exact(layer.weight, full[:, rank::world])

    gen = torch.Generator().manual_seed(33)
    x_full = ints(gen, world * S, *MID, fin, dtype=dtype)
    g = ints(gen, world * S, *MID, fout, dtype=dtype)  # sequence parallel: rank r's rows; else replicated
    x_ref = x_full.double().requires_grad_()
    y_ref = x_ref @ full.t()
    y_ref.backward(g.double())

    x = x_full[..., rank::world].clone().requires_grad_()  # this rank's input features
    y = layer(x)
    rows = slice(rank * S, (rank + 1) * S) if sequence_parallel else slice(None)
    exact(y, y_ref[rows])
    y.backward(g[rows])
    exact(x.grad, x_ref.grad[..., rank::world])
    exact(layer.weight.grad, full.grad[:, rank::world])


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_parallel(ranks, dtype, mode):
    ranks.run(_row, dtype, *mode)


def _mlp(rank, world, sequence_parallel, fuse):
    """Column -> ReLU -> Row equals nn.Sequential(Linear, ReLU, Linear) with the full weights."""
    group, hidden, d = dist.group.WORLD, 8, 6
    kw = dict(
        process_group=group,
        bias=False,
        init_method=int_init,
        sequence_parallel=sequence_parallel,
        fuse_sequence_parallel=fuse,
    )
    torch.manual_seed(34)
    col = ColumnParallelLinear(d, [hidden], gather_output=False, **kw)
    row = RowParallelLinear(hidden, d, input_is_parallel=True, **kw)
    ref = torch.nn.Sequential(
        torch.nn.Linear(d, hidden, bias=False), torch.nn.ReLU(), torch.nn.Linear(hidden, d, bias=False)
    ).double()
    torch.manual_seed(34)  # the full weights the two layers drew their slices from
    with torch.no_grad():
        ref[0].weight.copy_(int_init(torch.empty(hidden, d)))
        ref[2].weight.copy_(int_init(torch.empty(d, hidden)))

    gen = torch.Generator().manual_seed(35)
    x_full, g = ints(gen, world * S, d), ints(gen, world * S, d)
    x_ref = x_full.double().requires_grad_()
    ref(x_ref).backward(g.double())

    rows = slice(rank * S, (rank + 1) * S) if sequence_parallel else slice(None)
    x = x_full[rows].clone().requires_grad_()
    y = row(col(x)[0].relu())
    exact(y, ref(x_ref)[rows])
    y.backward(g[rows])
    exact(x.grad, x_ref.grad[rows])
    exact(col.weights[0].grad, ref[0].weight.grad[rank::world])
    exact(row.weight.grad, ref[2].weight.grad[:, rank::world])


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_mlp_equals_dense(ranks, mode):
    ranks.run(_mlp, *mode)


def _default_init(rank, world):
    """The default init (xavier_normal_ of the full weight) gives disjoint slices of one matrix."""
    group = dist.group.WORLD
    torch.manual_seed(36)
    col = ColumnParallelLinear(12, [8], process_group=group, bias=False, gather_output=False)
    row = RowParallelLinear(8, 12, process_group=group, bias=False, input_is_parallel=True)
    torch.manual_seed(36)
    full_col = torch.nn.init.xavier_normal_(torch.empty(8, 12))
    full_row = torch.nn.init.xavier_normal_(torch.empty(12, 8))
    exact(col.weights[0], full_col[rank::world])
    exact(row.weight, full_row[:, rank::world])


def test_default_init(ranks):
    ranks.run(_default_init)


def _traps(rank, world):
    """The defaults are traps (as in xFormers): each must be overridden explicitly."""
    group = dist.group.WORLD
    ok = dict(process_group=group, bias=False)
    with pytest.raises(TypeError, match=r"out_features to be a list .* got out_features=8; pass out_features=\[8\]"):
        ColumnParallelLinear(4, 8, gather_output=False, **ok)
    with pytest.raises(ValueError, match=r"requires bias=False .* got bias=True; pass bias=False"):
        ColumnParallelLinear(4, [8], process_group=group, gather_output=False)
    with pytest.raises(ValueError, match=r"requires gather_output=False .* got gather_output=True"):
        ColumnParallelLinear(4, [8], **ok)
    with pytest.raises(ValueError, match=rf"multiple of the group's size {world}, got out_features=\[8, {world + 1}\]"):
        ColumnParallelLinear(4, [8, world + 1], gather_output=False, **ok)
    with pytest.raises(ValueError, match=r"RowParallelLinear requires bias=False"):
        RowParallelLinear(8, 4, process_group=group, input_is_parallel=True)
    with pytest.raises(ValueError, match=r"requires input_is_parallel=True .* got input_is_parallel=False"):
        RowParallelLinear(8, 4, **ok)
    with pytest.raises(ValueError, match=rf"in_features must be a positive multiple of the group's size {world}"):
        RowParallelLinear(4 * world + 1, 4, input_is_parallel=True, **ok)


def test_traps(ranks):
    ranks.run(_traps)
