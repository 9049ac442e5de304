"""context_parallel_attention on 2 and 4 gloo ranks against attention computed by one process in float64 from the
global mask's definition (forward and the gradients of q, k, v); shard/gather and their gradient conventions;
errors; a rank that fails.

Every rank draws the full inputs from one seed, shards them, and checks what it gets back. The shards go
through ``shard_sequence`` and the output through ``gather_sequence``, whose gradient conventions (all-gather,
keep the local slice) give every rank the complete gradient of the full inputs.
"""

import math
import random

import pytest
import torch
import torch.distributed as dist

from triformers.distributed import context_parallel_attention, gather_sequence, shard_positions, shard_sequence
from triformers.distributed.sharding import LOAD_BALANCES
from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab

DTYPES = [torch.float64, torch.float32, torch.float16]
# Against the float64 reference. The merge of partial attentions and the backward read the lse, which the
# operators keep in float32: float64 results are good to ~1e-7 relative, not 1e-15.
TOL = {
    torch.float64: dict(atol=2e-6, rtol=2e-6),
    torch.float32: dict(atol=3e-5, rtol=3e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),  # outputs and gradients rounded to float16 (eps 1e-3)
}
MASKS = ["none", "causal", "docs", "causal_docs"]
HEADS, K, KV = 4, 5, 3  # heads (K/V heads under GQA, with 2 query heads each); head dims, odd


def chunks_of(rank, world, load_balance):
    """The chunks a rank holds, by the layouts' definition."""
    return [rank, 2 * world - 1 - rank] if load_balance == "zigzag" else [rank]


def positions_of(rank, world, load_balance, seq_len):
    n = 2 * world if load_balance == "zigzag" else world
    size = seq_len // n
    return torch.cat([torch.arange(c * size, (c + 1) * size) for c in chunks_of(rank, world, load_balance)])


def random_docs(seq_len, rng):
    """Document lengths: single tokens, and documents longer than a rank's share (they cross ranks)."""
    lens = []
    while sum(lens) < seq_len:
        lens.append(min(seq_len - sum(lens), rng.choice([1, 2, 4, seq_len // 2 + 1])))
    return lens


def allowed_pairs(kind, seq_len, lens):
    """``[S, S]`` bool: which keys each query may attend, from the definitions."""
    i, j = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
    ok = torch.ones(seq_len, seq_len, dtype=torch.bool)
    if lens is not None:
        doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        ok &= doc[:, None] == doc[None, :]
    if "causal" in kind:
        ok &= j <= i
    return ok


def make_case(seed, world, load_balance, kind, layout, dtype, chunk=None):
    """Full inputs (leaves), the mask object and the allowed pairs."""
    rng = random.Random(seed)
    chunk = chunk or (3 if load_balance == "zigzag" else 5)  # contiguous: an odd local length
    seq_len = chunk * (2 * world if load_balance == "zigzag" else world)
    batch = 1 if "docs" in kind else 2
    g = torch.Generator().manual_seed(seed)
    if layout == "bmhk":
        shapes = [(batch, seq_len, HEADS, K), (batch, seq_len, HEADS, K), (batch, seq_len, HEADS, KV)]
    else:  # GQA: one K/V head per group
        shapes = [(batch, seq_len, HEADS, 2, K), (batch, seq_len, HEADS, 1, K), (batch, seq_len, HEADS, 1, KV)]
    q, k, v = (torch.randn(s, generator=g).to(dtype) for s in shapes)
    lens = random_docs(seq_len, rng) if "docs" in kind else None
    bias = {"none": None, "causal": ab.LowerTriangularMask()}.get(kind)
    if lens is not None:
        bias = ab.BlockDiagonalMask.from_seqlens(lens, device="cpu")
        bias = bias.make_causal() if "causal" in kind else bias
    return (q, k, v), bias, allowed_pairs(kind, seq_len, lens)


def heads(x, n=2):
    """GQA K/V ``[B, M, G, 1, X]`` as read by n query heads per group (stride 0); BMHK unchanged."""
    return x if x.ndim == 4 else x.expand(-1, -1, -1, n, -1)


def reference(q, k, v, allowed, scale=None):
    """Attention in float64 with the mask materialized; BMHK or BMGHK (K/V expanded)."""
    q, k, v = q.double(), heads(k).double(), heads(v).double()
    eq = "bqhk,bjhk->bhqj" if q.ndim == 4 else "bqghk,bjghk->bghqj"
    scores = torch.einsum(eq, q, k) * (scale or 1 / math.sqrt(q.shape[-1]))
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1)
    out_eq = "bhqj,bjhk->bqhk" if q.ndim == 4 else "bghqj,bjghk->bqghk"
    return torch.einsum(out_eq, probs, v)


def leaves(xs, dtype=None):
    return [x.detach().clone().to(dtype or x.dtype).requires_grad_() for x in xs]


def check_case(rank, world, mode, load_balance, kind, layout, dtype, seed):
    tensors, bias, allowed = make_case(seed, world, load_balance, kind, layout, dtype)
    scale = 0.3 if layout == "gqa" else None
    ref_in = leaves(tensors, torch.float64)
    ref = reference(*ref_in, allowed, scale)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1))
    ref.backward(grad_out)

    full = leaves(tensors)
    local = [shard_sequence(x, 1, load_balance=load_balance) for x in full]
    out = context_parallel_attention(
        local[0], heads(local[1]), heads(local[2]), bias, scale=scale, mode=mode, load_balance=load_balance
    )
    assert out.dtype == dtype and out.shape == (*local[0].shape[:-1], KV)
    out = gather_sequence(out, 1, load_balance=load_balance)
    what = f"{mode} {load_balance} {kind} {layout} {dtype}"
    torch.testing.assert_close(out, ref.to(dtype), **TOL[dtype], msg=lambda m: f"{what}: output: {m}")
    out.backward(grad_out.to(dtype))
    for name, x, r in zip("qkv", full, ref_in):
        torch.testing.assert_close(x.grad, r.grad.to(dtype), **TOL[dtype], msg=lambda m, n=name: f"{what}: d{n}: {m}")


def _attention(rank, world, mode, kind):
    combos = [(lb, layout) for lb in LOAD_BALANCES for layout in ("bmhk", "gqa")]
    if world == 2:  # every dtype with every layout
        cases = [(lb, layout, dtype) for lb, layout in combos for dtype in DTYPES]
    else:  # 4 ranks share 2 cores under Triton's interpreter (the merge kernel): one dtype per layout, in turn
        cases = [(lb, layout, DTYPES[n % len(DTYPES)]) for n, (lb, layout) in enumerate(combos)]
    for n, (load_balance, layout, dtype) in enumerate(cases):
        check_case(rank, world, mode, load_balance, kind, layout, dtype, seed=100 * world + n)


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("mode", ["ring", "all_to_all"])
def test_forward_and_gradients_equal_single_process(ranks, mode, kind):
    ranks.run(_attention, mode, kind)


def _masked_nan_is_never_read(rank, world, mode):
    """Blocks the mask hides are never read: a NaN document changes no other document's output or gradients;
    under a causal mask, NaN in the last rank's block (contiguous layout) changes no other rank's output.
    (Inside one block the operators apply the mask to computed scores: NaN there is out of scope.)"""
    seq_len = 2 * world * 3
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, seq_len, HEADS, K, generator=g) for _ in range(3))
    lens = [2, seq_len // 2, seq_len - 2 - seq_len // 2]  # the middle document crosses ranks
    nan_rows = torch.arange(2, 2 + seq_len // 2)
    kept = torch.ones(seq_len, dtype=torch.bool)
    kept[nan_rows] = False
    bias = ab.BlockDiagonalMask.from_seqlens(lens, device="cpu").make_causal()
    ref_in = leaves((q, k, v), torch.float64)
    ref = reference(*ref_in, allowed_pairs("causal_docs", seq_len, lens))
    ref.sum().backward()
    poisoned = [x.index_fill(1, nan_rows, math.nan) for x in (q, k, v)]
    full = leaves(poisoned)
    out = context_parallel_attention(*(shard_sequence(x) for x in full), bias, mode=mode)
    out = gather_sequence(out)
    torch.testing.assert_close(out[:, kept], ref[:, kept].float(), **TOL[torch.float32])
    out.sum().backward()
    for x, r in zip(full, ref_in):
        torch.testing.assert_close(x.grad[:, kept], r.grad[:, kept].float(), **TOL[torch.float32])

    if mode == "ring":
        last = seq_len - seq_len // world  # the last rank's block
        future = [x.index_fill(1, torch.arange(last, seq_len), math.nan) for x in (q, k, v)]
        local = [shard_sequence(x, load_balance="contiguous") for x in future]
        out = context_parallel_attention(*local, ab.LowerTriangularMask(), load_balance="contiguous")
        out = gather_sequence(out, load_balance="contiguous")
        ref = reference(q, k, v, allowed_pairs("causal", seq_len, None))
        torch.testing.assert_close(out[:, :last], ref[:, :last].float(), **TOL[torch.float32])


@pytest.mark.parametrize("mode", ["ring", "all_to_all"])
def test_masked_nan_is_never_read(ranks, mode):
    ranks.run(_masked_nan_is_never_read, mode)


def _gqa_sends_one_head_per_group(rank, world):
    """Shared K/V heads travel as one head per group: the ring's K/V blocks and their gradient accumulators, and
    the all-to-all of k and v."""
    import triformers.distributed.ring as ring_module
    import triformers.distributed.ulysses as ulysses_module

    (q, k, v), bias, _ = make_case(6, world, "zigzag", "causal", "gqa", torch.float32)
    local = leaves([shard_sequence(x) for x in (q, k, v)])
    sent = []
    ring_step, exchange = ring_module.ring_step, ulysses_module._exchange

    def recording_ring_step(group, sends, dst, recvs, src):
        sent.extend(tuple(t.shape) for t in sends)
        return ring_step(group, sends, dst, recvs, src)

    def recording_exchange(send, group):
        sent.append(tuple(send.shape))
        return exchange(send, group)

    ring_module.ring_step, ulysses_module._exchange = recording_ring_step, recording_exchange
    try:
        context_parallel_attention(local[0], heads(local[1]), heads(local[2]), bias).sum().backward()
        rows = q.shape[1] // world
        assert sent and all(s[:4] == (2, rows, HEADS, 1) for s in sent), sent
        sent.clear()
        context_parallel_attention(local[0], heads(local[1]), heads(local[2]), bias, mode="all_to_all").sum().backward()
        units = 2 * HEADS // world  # batch x groups over the ranks
        forward = [(units, rows, 2), (units, rows, 1), (units, rows, 1), (units, rows, 2)]  # q, k, v, out
        assert [s[1:4] for s in sent[:4]] == forward, sent
        assert sorted(s[3] for s in sent[4:]) == [1, 1, 2, 2], sent  # the gradients of out, q, k, v
    finally:
        ring_module.ring_step, ulysses_module._exchange = ring_step, exchange


def test_gqa_sends_one_head_per_group(ranks):
    ranks.run(_gqa_sends_one_head_per_group)


def _all_to_all_dropout(rank, world):
    """Dropout runs with all-to-all: reproducible under torch.manual_seed, not the p = 0 result, and with gradients
    that match a finite difference of the same masks (same seed)."""
    (q, k, v), bias, _ = make_case(4, world, "zigzag", "causal", "bmhk", torch.float64)
    local = leaves([shard_sequence(x) for x in (q, k, v)])
    outs = []
    for _ in range(2):
        torch.manual_seed(1)
        outs.append(context_parallel_attention(*local, bias, p=0.5, mode="all_to_all"))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    assert not torch.allclose(outs[0], context_parallel_attention(*local, bias, mode="all_to_all"))
    outs[0].sum().backward()
    step = 1e-6
    with torch.no_grad():
        torch.manual_seed(1)  # the same dropout masks; the output is linear in v
        slope = context_parallel_attention(local[0], local[1], local[2] + step, bias, p=0.5, mode="all_to_all").sum()
        slope = (slope - outs[1].sum()) / step
    # d(sum of every rank's output) / d(v shifted by step everywhere): the sum of every rank's dv
    total = local[2].grad.sum().reshape(1)
    dist.all_reduce(total)
    total_slope = slope.reshape(1)
    dist.all_reduce(total_slope)
    torch.testing.assert_close(total, total_slope, atol=1e-4, rtol=1e-4)


def test_all_to_all_dropout(ranks):
    ranks.run(_all_to_all_dropout)


def _shard_and_gather(rank, world, load_balance):
    chunk = 3
    seq_len = chunk * (2 * world if load_balance == "zigzag" else world)
    g = torch.Generator().manual_seed(3)
    mine = positions_of(rank, world, load_balance, seq_len)
    assert torch.equal(shard_positions(seq_len, load_balance=load_balance), mine)
    for dim, shape in ((1, (2, seq_len, 3)), (0, (seq_len, 5)), (-1, (3, 2, seq_len))):
        for dtype in (torch.float32, torch.bfloat16, torch.int64):
            x = (torch.randn(shape, generator=g) * 10).to(dtype)
            local = shard_sequence(x, dim, load_balance=load_balance)
            assert torch.equal(local, x.index_select(dim, mine))
            assert torch.equal(gather_sequence(local, dim, load_balance=load_balance), x)
        # shard: the backward all-gathers, so a replicated input gets every rank's gradient
        leaf = torch.randn(shape, generator=g).requires_grad_()
        weights = [torch.randn(local.shape, generator=g) for _ in range(world)]
        (shard_sequence(leaf, dim, load_balance=load_balance) * weights[rank]).sum().backward()
        expected = torch.zeros(shape)
        for r in range(world):
            expected.index_copy_(dim % len(shape), positions_of(r, world, load_balance, seq_len), weights[r])
        torch.testing.assert_close(leaf.grad, expected, atol=0, rtol=0)
        # gather: the backward keeps this rank's slice (the gathered tensor is replicated, not summed)
        part = local.float().detach().requires_grad_()
        weight = torch.randn(shape, generator=g)
        (gather_sequence(part, dim, load_balance=load_balance) * weight).sum().backward()
        torch.testing.assert_close(part.grad, weight.index_select(dim, mine), atol=0, rtol=0)


@pytest.mark.parametrize("load_balance", LOAD_BALANCES)
def test_shard_and_gather(ranks, load_balance):
    ranks.run(_shard_and_gather, load_balance)


def _one_rank_group(rank, world):
    """On a group of one rank everything is the single-process call (the same result, the same tensors)."""
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    group = groups[rank]
    (q, k, v), bias, _ = make_case(5, 1, "zigzag", "causal", "gqa", torch.float32)
    k, v = heads(k), heads(v)
    out = context_parallel_attention(q, k, v, bias, group=group)
    torch.testing.assert_close(out, fmha.memory_efficient_attention(q, k, v, bias), atol=0, rtol=0)
    for lb in LOAD_BALANCES:
        assert shard_sequence(q, group=group, load_balance=lb) is q
        assert gather_sequence(q, group=group, load_balance=lb) is q
    assert torch.equal(shard_positions(7, group=group), torch.arange(7))


def test_one_rank_group_is_plain_attention(ranks):
    ranks.run(_one_rank_group)


def _device_mesh(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    (q, k, v), bias, allowed = make_case(9, world, "zigzag", "causal", "bmhk", torch.float64)
    local = [shard_sequence(x, group=mesh) for x in (q, k, v)]
    out = gather_sequence(context_parallel_attention(*local, bias, group=mesh), group=mesh)
    torch.testing.assert_close(out, reference(q, k, v, allowed), **TOL[torch.float64])
    if world % 2 == 0:
        mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "cp"))
        with pytest.raises(ValueError, match=r"2-D DeviceMesh .* mesh\['cp'\]"):
            context_parallel_attention(*local, bias, group=mesh2)


def test_device_mesh(ranks):
    ranks.run(_device_mesh)


def _errors(rank, world):
    """Each bad input raises ValueError on every rank, naming the argument and the fix."""

    def raises(match, fn, *args, **kwargs):
        with pytest.raises(ValueError, match=match):
            fn(*args, **kwargs)

    cpa = context_parallel_attention
    q, k, v = (torch.randn(2, 6, 4, 5) for _ in range(3))
    raises(r"holds 5 tokens .* multiple of 2 x", cpa, q[:, :5], k[:, :5], v[:, :5])
    cpa(q[:, :5], k[:, :5], v[:, :5], load_balance="contiguous")  # any local length is contiguous
    raises("key is torch.float64 on cpu but query is torch.float32", cpa, q, k.double(), v)
    raises("same batch and local length", cpa, q, k[:, :4], v)
    raises("BMHK", cpa, q[:, :, 0], k[:, :, 0], v[:, :, 0])
    meta = [x.to("meta") for x in (q, k, v)]
    raises("gloo backend, which moves cpu tensors, but the input is on meta", cpa, *meta)
    raises("describes 7 tokens but the global sequence has", cpa, q[:1], k[:1], v[:1],
           ab.BlockDiagonalMask.from_seqlens([3, 4], device="cpu"))  # fmt: skip
    raises("not a mask context parallelism can cut", cpa, q, k, v, torch.zeros(2, 4, 6, 6))
    raises("cannot apply dropout", cpa, q, k, v, p=0.1)
    raises(r"batch 1 x 3 heads = 3 is not divisible", cpa, q[:1, :, :3], k[:1, :, :3], v[:1, :, :3],
           mode="all_to_all")  # fmt: skip
    raises("mode must be one of", cpa, q, k, v, mode="ulysses")
    raises("load_balance must be one of", cpa, q, k, v, load_balance="striped")
    raises("group must be a torch.distributed.ProcessGroup", cpa, q, k, v, group=3)
    raises(r"cannot be cut into .* pad it to a multiple of", shard_sequence, torch.zeros(2, 2 * world + 1))
    raises("dim=3 is out of range", shard_sequence, torch.zeros(2, 2 * world), 3)
    # ranks that disagree (rank 0 holds a different number of tokens) all raise, instead of hanging
    rows = 4 if rank == 0 else 6
    raises("the ranks of the group passed different inputs", cpa, q[:, :rows], k[:, :rows], v[:, :rows])


def test_errors(ranks):
    ranks.run(_errors)


def test_default_group_needs_torch_distributed():
    assert not dist.is_initialized()
    q = torch.randn(1, 4, 2, 8)
    for fn, args in ((context_parallel_attention, (q, q, q)), (shard_sequence, (q,)), (gather_sequence, (q,))):
        with pytest.raises(ValueError, match="torch.distributed is not initialised"):
            fn(*args)


def _fails_during_the_ring(rank, world):
    """Every rank attends once; then the last rank fails while the others wait in the ring for its block."""
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    context_parallel_attention(q, k, v)
    if rank == world - 1:
        raise RuntimeError("this rank failed before its ring step")
    context_parallel_attention(q, k, v)


def test_a_failing_rank_ends_the_run_with_its_error(ranks):
    with pytest.raises(RuntimeError, match="this rank failed before its ring step"):
        ranks.run(_fails_during_the_ring)
    # the waiting ranks are stopped (they exit by themselves), not killed after waiting for the collective timeout
    exitcodes = [p.exitcode for p in ranks._workers._procs]
    assert exitcodes == [0] * ranks.world_size, exitcodes
