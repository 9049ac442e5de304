"""sequence_parallel_fused_ops on 2 and 4 gloo ranks: each op against its unfused composition (all-gather then
F.linear, F.linear then reduce-scatter) computed by one process from every rank's data.

Inputs are small integers and the sizes keep every sum below 256, so results are exact in every dtype (bf16
included): comparisons are exact. Each op runs both ways: overlapped P2P (default) and the collective
fallback (TRIFORMERS_DISABLE_FUSED_SEQUENCE_PARALLEL=1).
"""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from triformers.ops import sequence_parallel_fused_ops as spf

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shard rows S, middle dims, in features, out features of each weight)
SIZES = [(3, (), 17, (5,)), (1, (2,), 9, (3, 1))]
MODES = ["overlapped", "collective"]


def ints(gen: torch.Generator, *shape, dtype=torch.float32) -> torch.Tensor:
    """Values in {-2, -1, 1, 2}."""
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return (sign * torch.randint(1, 3, shape, generator=gen)).to(dtype)


class _Mode:
    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __enter__(self):
        if self.mode == "collective":
            os.environ[spf.DISABLE_ENV] = "1"

    def __exit__(self, *exc):
        os.environ.pop(spf.DISABLE_ENV, None)


def _allgather_and_linear(rank, world, dtype, size, mode, as_list, with_out):
    s, mid, fin, fouts = size
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(10)
    xs = [ints(gen, s, *mid, fin, dtype=dtype) for _ in range(world)]  # every rank's shard
    ws = [ints(gen, fout, fin, dtype=dtype) for fout in fouts]  # replicated weights
    gathered = torch.cat(xs)
    expected = [F.linear(gathered.double(), w.double()).to(dtype) for w in ws]
    weight = ws if as_list else ws[0]
    out = None
    if with_out:
        out = [torch.full_like(e, float("nan")) for e in expected]
        out = out if as_list else out[0]
    with _Mode(mode):
        got = spf.fused_allgather_and_linear(xs[rank], weight, group=group, out=out)
    got = got if as_list else [got]
    if with_out:
        assert all(g is o for g, o in zip(got, out if as_list else [out]))
    for g, e in zip(got, expected if as_list else expected[:1]):
        torch.testing.assert_close(g, e, atol=0, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_allgather_and_linear(ranks, size, dtype, mode):
    ranks.run(_allgather_and_linear, dtype, size, mode, as_list=len(size[3]) > 1, with_out=False)


@pytest.mark.parametrize("as_list", [False, True])
def test_allgather_and_linear_out(ranks, as_list):
    ranks.run(_allgather_and_linear, torch.float32, SIZES[1], "overlapped", as_list=as_list, with_out=True)


def _linear_and_reducescatter(rank, world, dtype, size, mode, as_list, with_out):
    s, mid, fin, fouts = size
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(11)
    xs = [ints(gen, world * s, *mid, fin, dtype=dtype) for _ in range(world)]  # every rank's [S, ..., in]
    ws = [[ints(gen, fout, fin, dtype=dtype) for fout in fouts] for _ in range(world)]  # row-parallel: per rank
    expected = [
        sum(F.linear(xs[r].double(), ws[r][j].double()) for r in range(world))[rank * s : (rank + 1) * s].to(dtype)
        for j in range(len(fouts))
    ]
    weight = ws[rank] if as_list else ws[rank][0]
    out = None
    if with_out:
        out = [torch.full_like(e, float("nan")) for e in expected]
        out = out if as_list else out[0]
    with _Mode(mode):
        got = spf.fused_linear_and_reducescatter(xs[rank], weight, group=group, out=out)
    got = got if as_list else [got]
    if with_out:
        assert all(g is o for g, o in zip(got, out if as_list else [out]))
    for g, e in zip(got, expected if as_list else expected[:1]):
        torch.testing.assert_close(g, e, atol=0, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_linear_and_reducescatter(ranks, size, dtype, mode):
    ranks.run(_linear_and_reducescatter, dtype, size, mode, as_list=len(size[3]) > 1, with_out=False)


@pytest.mark.parametrize("as_list", [False, True])
def test_linear_and_reducescatter_out(ranks, as_list):
    ranks.run(_linear_and_reducescatter, torch.float32, SIZES[1], "overlapped", as_list=as_list, with_out=True)


def _fp8(rank, world):
    """FP8 operands with tensor-wise scales (torch._scaled_mm): the transfers move the raw bytes."""
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(12)
    f8 = torch.float8_e4m3fn
    xs = [ints(gen, 16, 16).to(f8) for _ in range(world)]
    w = ints(gen, 16, 16).to(f8)  # K = 16: every sum stays within 256, exact in bf16
    sx, sw = torch.tensor(0.5), torch.tensor(2.0)
    got = spf.fused_allgather_and_linear(
        xs[rank], w, group=group, scale_scattered_input=sx, scale_weight=sw, out_dtype=torch.float32
    )
    expected = F.linear(torch.cat(xs).double() * 0.5, w.double() * 2.0).float()
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    xg = ints(gen, 16 * world, 16).to(f8)
    got = spf.fused_linear_and_reducescatter(
        xg, [w], group=group, scale_gathered_input=sx, scale_weight=[sw], out_dtype=torch.bfloat16
    )
    expected = (world * F.linear(xg.double() * 0.5, w.double() * 2.0))[rank * 16 : (rank + 1) * 16].bfloat16()
    torch.testing.assert_close(got[0], expected, atol=0, rtol=0)


def test_fp8(ranks):
    ranks.run(_fp8)


def _anything_order(rank, world):
    """The callbacks' order: all-gather own shard then r-1, r-2, ...; reduce-scatter r+1, r+2, ..., own last."""
    group = dist.group.WORLD
    x = torch.full((2, 3), float(rank))
    seen = []

    def record_shards(shards, src, stream_factory):
        assert stream_factory() is None  # CPU: no stream
        torch.testing.assert_close(shards[0], torch.full((2, 3), float(src)), atol=0, rtol=0)
        seen.append(src)

    spf.fused_allgather_and_anything([x], record_shards, group=group)
    assert seen == [(rank - i) % world for i in range(world)]

    seen.clear()
    out = torch.empty(2, 3)

    def fill_partial(outs, dst, stream_factory):
        outs[0].fill_(float(10 * rank + dst))
        seen.append(dst)

    spf.fused_anything_and_reducescatter(fill_partial, [out], group=group)
    assert seen == [(rank + i) % world for i in range(1, world)] + [rank]
    torch.testing.assert_close(out, torch.full((2, 3), float(sum(10 * r + rank for r in range(world)))))

    seen.clear()  # no tensors: one call per rank, in rank order
    spf.fused_allgather_and_anything([], lambda ts, r, sf: seen.append((ts, r)), group=group)
    spf.fused_anything_and_reducescatter(lambda ts, r, sf: seen.append((ts, r)), [], group=group)
    assert seen == [([], r) for r in range(world)] * 2


def test_anything_order(ranks):
    ranks.run(_anything_order)


def _overlap(rank, world, mode, flag_dir):
    """Rank 0 computes on its own shard before the last rank has even started sending (no wait for the whole
    all-gather); the collective fallback must wait for every rank. The last rank holds back until rank 0 has
    processed its own shard (rank 0 writes a flag file then) or, where that cannot happen before it sends
    (collective), for ``_HOLD_COLLECTIVE_S``: an order of events, not a duration, is asserted."""
    group = dist.group.WORLD
    flag = os.path.join(flag_dir, f"own-{mode}")
    dist.barrier()
    seen = None
    if rank == world - 1:  # the slow rank: has rank 0 used its own shard before this rank sends anything?
        seen = _wait_for(flag, _HOLD_OVERLAPPED_S if mode == "overlapped" else _HOLD_COLLECTIVE_S)

    def note(shards, src, stream_factory):
        if src == rank == 0:
            open(flag, "w").close()

    with _Mode(mode):
        spf.fused_allgather_and_anything([torch.ones(4, 4)], note, group=group)
    return seen


# How long the last rank holds back: overlapped, until rank 0's flag (bounded only against a hang); collective,
# where rank 0 cannot get its own shard before this rank sends, a short wait that shows the flag does not come.
_HOLD_OVERLAPPED_S = 60.0
_HOLD_COLLECTIVE_S = 0.5


def _wait_for(path: str, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("mode", MODES)
def test_overlap(ranks, mode, tmp_path):
    seen = ranks.run(_overlap, mode, str(tmp_path))[-1]
    assert seen is (mode == "overlapped")


def _compile(rank, world):
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(13)
    xs = [ints(gen, 3, 8) for _ in range(world)]
    w = ints(gen, 5, 8)

    def block(x, w):
        y = spf.fused_allgather_and_linear(x, w, group=group)
        return spf.fused_linear_and_reducescatter(y.relu(), w.t().contiguous(), group=group)

    got = torch.compile(block, backend="aot_eager", fullgraph=True)(xs[rank], w)
    expected = world * F.linear(F.linear(torch.cat(xs), w).relu(), w.t())[rank * 3 : (rank + 1) * 3]
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    name, ws = group.group_name, [w, ints(gen, 2, 8)]  # the custom ops' schemas and fake implementations
    args = (name, 60, None, [None, None], torch.float32)
    torch.library.opcheck(torch.ops.triformers.fused_allgather_and_linear.default, (xs[rank], ws, *args))
    torch.library.opcheck(torch.ops.triformers.fused_linear_and_reducescatter.default, (torch.cat(xs), ws, *args))


def test_compile(ranks):
    if ranks.world_size != 2:
        pytest.skip("tracing is the same for any number of ranks")
    ranks.run(_compile)


def _errors(rank, world):
    group = dist.group.WORLD
    x = torch.ones(3, 8)
    w = torch.ones(5, 8)
    f = spf.fused_allgather_and_linear
    with pytest.raises(ValueError, match=r"weight\[0\] is shape=\(5, 7\) on cpu but must be \[out, 8\]"):
        f(x, torch.ones(5, 7), group=group)
    with pytest.raises(ValueError, match=r"scattered_input must be contiguous .*shape=\(8, 3\)"):
        f(x.t(), w, group=group)
    with pytest.raises(ValueError, match=r"weights of dtype \['torch.float16'\] with scattered_input.dtype="):
        f(x, w.half(), group=group)
    with pytest.raises(ValueError, match=r"pass both scale_scattered_input and scale_weight"):
        f(x, w, group=group, scale_scattered_input=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"scales are for FP8 operands, got scattered_input.dtype=torch.float32"):
        f(x, w, group=group, scale_scattered_input=torch.tensor(1.0), scale_weight=torch.tensor(1.0))
    f8 = torch.float8_e4m3fn
    with pytest.raises(ValueError, match=r"out_dtype is required with FP8"):
        f(x.to(f8), w.to(f8), group=group, scale_scattered_input=torch.tensor(1.0), scale_weight=torch.tensor(1.0))
    with pytest.raises(ValueError, match=rf"out\[0\] is shape=\(3, 5\).*must be a contiguous \({3 * world}, 5\)"):
        f(x, w, group=group, out=torch.empty(3, 5))
    with pytest.raises(ValueError, match=r"out must be one tensor per weight"):
        f(x, [w], group=group, out=torch.empty(3 * world, 5))
    with pytest.raises(ValueError, match=r"needs a torch.distributed.ProcessGroup as group, got group=None"):
        f(x, w, group=None)
    with pytest.raises(ValueError, match=rf"shape=\({3 * world + 1}, 8\) cannot be split into {world} equal blocks"):
        spf.fused_linear_and_reducescatter(torch.ones(3 * world + 1, 8), w, group=group)
    with pytest.raises(ValueError, match=r"my_matmul must be callable"):
        spf.fused_allgather_and_anything([x], None, group=group)
    with pytest.raises(ValueError, match=r"scattered_outputs\[0\] must be contiguous"):
        spf.fused_anything_and_reducescatter(lambda *a: None, [x.t()], group=group)


def test_errors(ranks):
    ranks.run(_errors)
