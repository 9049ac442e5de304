"""The distributed ops over NCCL, one GPU per rank, at real sizes in bf16 and fp16: the overlapped paths (second
CUDA stream, transfers on NCCL's stream) against a float32 computation of the unfused composition.

Every rank draws every rank's inputs from one seed and computes the reference itself (float32, TF32 off).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from triformers.distributed.testing import DistributedWorkers
from triformers.ops import sequence_parallel_fused_ops as spf
from triformers.ops.modpar_layers import ColumnParallelLinear, RowParallelLinear
from triformers.ops.seqpar import sequence_parallel_leading_matmul, sequence_parallel_trailing_matmul

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 GPUs"),
]
# (atol, rtol) of a bf16/fp16 result of unit-variance sums against float32: one rounding of the output, and the
# different summation order of a split matmul (up to a few ulps)
TOL = {torch.bfloat16: (4e-2, 2e-2), torch.float16: (6e-3, 4e-3)}
DTYPES = list(TOL)
S, D = 1000, 2048  # rows per rank (not a power of two), model dim


def _world_sizes():
    n = torch.cuda.device_count()
    return [w for w in (2, 4) if w <= n]


@pytest.fixture(scope="module", params=_world_sizes(), ids=lambda n: f"ranks{n}")
def gpus(request):
    with DistributedWorkers(request.param, backend="nccl", timeout_s=120) as workers:
        yield workers


def randn(gen, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen, device=gen.device) * scale).to(dtype)


def close(got, ref):
    atol, rtol = TOL[got.dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)


def _setup(seed):
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch.Generator(device="cuda").manual_seed(seed)


def _fused_ops(rank, world, dtype, collective):
    gen = _setup(1)
    if collective:
        os.environ[spf.DISABLE_ENV] = "1"
    try:
        xs = [randn(gen, S, D, dtype=dtype) for _ in range(world)]
        ws = [randn(gen, D, D, dtype=dtype, scale=D**-0.5) for _ in range(2)]
        got = spf.fused_allgather_and_linear(xs[rank], ws, group=dist.group.WORLD)
        gathered = torch.cat(xs).float()
        for g, w in zip(got, ws):
            close(g, F.linear(gathered, w.float()))
        xg = [randn(gen, world * S, D, dtype=dtype) for _ in range(world)]
        wr = [randn(gen, D, D, dtype=dtype, scale=(world * D) ** -0.5) for _ in range(world)]
        got = spf.fused_linear_and_reducescatter(xg[rank], wr[rank], group=dist.group.WORLD)
        ref = sum(F.linear(x.float(), w.float()) for x, w in zip(xg, wr))[rank * S : (rank + 1) * S]
        close(got, ref)
        torch.cuda.synchronize()
    finally:
        os.environ.pop(spf.DISABLE_ENV, None)


@pytest.mark.parametrize("collective", [False, True], ids=["overlapped", "collective"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_ops(gpus, dtype, collective):
    gpus.run(_fused_ops, dtype, collective)


def _fp8(rank, world):
    if torch.cuda.get_device_capability() < (8, 9):
        return  # FP8 matmuls need sm89+
    gen = _setup(2)
    f8 = torch.float8_e4m3fn
    xs = [randn(gen, 256, 512, dtype=torch.float32).to(f8) for _ in range(world)]
    w = randn(gen, 512, 512, dtype=torch.float32, scale=0.05).to(f8)
    sx, sw = torch.tensor(0.5, device="cuda"), torch.tensor(2.0, device="cuda")
    got = spf.fused_allgather_and_linear(
        xs[rank], w, group=dist.group.WORLD, scale_scattered_input=sx, scale_weight=sw, out_dtype=torch.bfloat16
    )
    close(got, F.linear(torch.cat(xs).float() * 0.5, w.float() * 2.0))


def test_fp8(gpus):
    gpus.run(_fp8)


def _seqpar(rank, world, dtype, fuse):
    gen = _setup(3)
    h = D // world  # hidden features per rank
    xs = [randn(gen, S, D, dtype=dtype) for _ in range(world)]
    w1s = [randn(gen, D, h, dtype=dtype, scale=D**-0.5) for _ in range(world)]
    w2s = [randn(gen, h, D, dtype=dtype, scale=D**-0.5) for _ in range(world)]
    gs = [randn(gen, S, D, dtype=dtype) for _ in range(world)]
    x_ref = torch.cat(xs).float().requires_grad_()
    w1r = [w.float().requires_grad_() for w in w1s]
    w2r = [w.float().requires_grad_() for w in w2s]
    y_ref = sum((x_ref @ a).relu() @ b for a, b in zip(w1r, w2r)).chunk(world)
    torch.autograd.backward(list(y_ref), [g.float() for g in gs])

    group = dist.group.WORLD
    x, w1, w2 = (t.clone().requires_grad_() for t in (xs[rank], w1s[rank], w2s[rank]))
    (hidden,) = sequence_parallel_leading_matmul(x, [w1], fuse=fuse, process_group=group)
    y = sequence_parallel_trailing_matmul(hidden.relu(), w2, fuse=fuse, process_group=group)
    close(y, y_ref[rank])
    y.backward(gs[rank])
    close(x.grad, x_ref.grad[rank * S : (rank + 1) * S])
    close(w1.grad / S**0.5, w1r[rank].grad / S**0.5)  # sums over S·W rows: compare at unit scale
    close(w2.grad / S**0.5, w2r[rank].grad / S**0.5)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_seqpar_mlp(gpus, dtype, fuse):
    gpus.run(_seqpar, dtype, fuse)


def _modpar_compiled(rank, world):
    """Column -> GELU -> Row with fused sequence parallelism under torch.compile (inductor, fullgraph)."""
    gen = _setup(4)
    group = dist.group.WORLD
    torch.manual_seed(5)
    col = (
        ColumnParallelLinear(D, [4 * D], process_group=group, bias=False, gather_output=False, sequence_parallel=True)
        .cuda()
        .bfloat16()
    )
    row = (
        RowParallelLinear(4 * D, D, process_group=group, bias=False, input_is_parallel=True, sequence_parallel=True)
        .cuda()
        .bfloat16()
    )
    torch.manual_seed(5)  # the full weights the layers drew their slices from, rounded as theirs were
    w1 = torch.nn.init.xavier_normal_(torch.empty(4 * D, D)).cuda().bfloat16().float()
    w2 = torch.nn.init.xavier_normal_(torch.empty(D, 4 * D)).cuda().bfloat16().float()
    x_full = randn(gen, world * S, D, dtype=torch.bfloat16)

    def block(x):
        return row(F.gelu(col(x)[0]))

    y = torch.compile(block, fullgraph=True)(x_full[rank * S : (rank + 1) * S])
    y_ref = F.linear(F.gelu(F.linear(x_full.float(), w1)), w2)[rank * S : (rank + 1) * S]
    close(y, y_ref)


def test_modpar_compiled(gpus):
    gpus.run(_modpar_compiled)
