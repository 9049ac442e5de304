"""Context-parallel attention on CUDA, bf16 and fp16, against float32 attention on the materialized global mask.

- One GPU: the ring's computation for 4 virtual ranks (each rank's plan, partial attentions on the CUDA
  operators, the merge kernel, the full-lse backward with dense and gappy-key biases), assembled in one process;
  and the one-rank path on an NCCL group of one, which is ``memory_efficient_attention`` bit for bit.
- Two GPUs or more: ring and all-to-all over NCCL, forward and every gradient.
"""

import math

import pytest
import torch
import torch.distributed as dist

from triformers.distributed import context_parallel_attention, gather_sequence, shard_sequence
from triformers.distributed.ring import _block_backward, _block_forward, _merge_rows
from triformers.distributed.ring_plan import global_mask, ring_plan
from triformers.distributed.sharding import rank_ranges
from triformers.distributed.testing import DistributedWorkers
from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha._layout import canonical

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# (atol, rtol) against float32: the output is rounded once; gradients are sums of up to W block shares, each
# rounded to the input dtype by the attention backward
TOL = {torch.bfloat16: (4e-2, 2e-2), torch.float16: (6e-3, 4e-3)}
GRAD_TOL = {torch.bfloat16: (8e-2, 4e-2), torch.float16: (1.5e-2, 1e-2)}
SEQ, HEADS, K = 2048, 8, 128
DOCS = [1, 300, 700, 17, 512, 518]  # documents crossing the ranks' chunks (2048 tokens)


def make_case(kind, dtype, seed, device="cuda", gqa=False):
    g = torch.Generator(device=device).manual_seed(seed)
    batch = 1 if "docs" in kind else 2
    kv_heads = 2 if gqa else HEADS
    q = torch.randn(batch, SEQ, HEADS, K, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(batch, SEQ, kv_heads, K, generator=g, device=device, dtype=dtype) for _ in range(2))
    if gqa:  # BMGHK, K/V shared by the 4 query heads of each group
        q = q.view(batch, SEQ, kv_heads, HEADS // kv_heads, K)
        k, v = (x.unsqueeze(3) for x in (k, v))
    bias = {"none": None, "causal": ab.LowerTriangularMask()}.get(kind)
    if "docs" in kind:
        bias = ab.BlockDiagonalMask.from_seqlens(DOCS, device=device).make_causal()
    return [q, k, v], bias


def expand(x, heads):
    return x if x.ndim == 4 or x.shape[3] == heads else x.expand(-1, -1, -1, heads, -1)


def reference(q, k, v, bias):
    """float32 attention (TF32 off) over the materialized mask; BMHK, or BMGHK with K/V expanded."""
    shape, heads = q.shape, q.shape[-2]
    q, k, v = q.float(), expand(k, heads).float(), expand(v, heads).float()
    if q.ndim == 5:
        q, k, v = (x.flatten(2, 3) for x in (q, k, v))
    mask = torch.zeros(SEQ, SEQ, device=q.device) if bias is None else bias.materialize((SEQ, SEQ), device=q.device)
    scores = torch.einsum("bqhk,bjhk->bhqj", q, k) / math.sqrt(q.shape[-1]) + mask
    out = torch.einsum("bhqj,bjhk->bqhk", torch.softmax(scores, -1), v)
    return out.reshape(*shape[:-1], v.shape[-1])


def check(got, ref, tol, what):
    atol, rtol = tol
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def virtual_ring(q, k, v, bias, world, load_balance, grad):
    """The output and gradients of ``world`` ranks' ring computations, run one rank after the other."""
    layout = canonical(q, k, v, None)
    q5, k5, v5 = layout.q, layout.k.contiguous(), layout.v.contiguous()
    g5 = layout.to5(grad)
    mask = global_mask(bias, SEQ, q.shape[0])
    rows = [torch.cat([torch.arange(a, b) for a, b in rank_ranges(r, world, load_balance, SEQ)]) for r in range(world)]
    shard = [[x[:, idx] for idx in rows] for x in (q5, k5, v5, g5)]
    out = torch.empty(q5.shape, dtype=q.dtype, device=q.device)
    dq = torch.zeros(q5.shape, device=q.device)
    dkv = [torch.zeros(x.shape, device=q.device) for x in (k5, v5)]
    for r in range(world):
        plan = ring_plan(mask, SEQ, world, r, load_balance, q.device)
        acc = None
        blocks = [[shard[1][(r - i) % world], shard[2][(r - i) % world]] for i in range(world)]
        for call, kv in zip(plan, blocks):
            if call is not None:
                part = _block_forward(call, shard[0][r], kv, None)
                acc = part if acc is None else _merge_rows(acc, part, call.q)
        out_r, lse = acc[0].to(q.dtype), acc[1]
        out[:, rows[r]] = out_r
        dq_r = torch.zeros(out_r.shape[:-1] + (q.shape[-1],), device=q.device)
        for i, (call, kv) in enumerate(zip(plan, blocks)):
            if call is not None:
                share = [torch.zeros(x.shape, device=q.device) for x in kv]
                _block_backward(call, shard[3][r], out_r, lse, shard[0][r], kv, None, dq_r, share)
                src = rows[(r - i) % world]
                for total, s in zip(dkv, share):
                    total[:, src] += s
        dq[:, rows[r]] = dq_r
    return layout.from5(out), layout.from5(dq), dkv


@pytest.mark.parametrize("load_balance", ["zigzag", "contiguous"])
@pytest.mark.parametrize("kind", ["none", "causal", "causal_docs"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_virtual_ranks_on_one_gpu(dtype, kind, load_balance):
    for gqa in (False, True) if kind != "none" else (False,):
        (q, k, v), bias = make_case(kind, dtype, seed=len(kind), gqa=gqa)
        leaves = [x.float().requires_grad_() for x in (q, k, v)]
        ref = reference(*leaves, bias)
        grad = torch.randn_like(ref)
        ref.backward(grad)
        out, dq, (dk, dv) = virtual_ring(q, expand(k, q.shape[-2]), expand(v, q.shape[-2]), bias, 4, load_balance,
                                         grad.to(dtype))  # fmt: skip
        what = f"{kind} {load_balance} gqa={gqa}"
        check(out, ref, TOL[dtype], f"{what} out")
        check(dq, leaves[0].grad, GRAD_TOL[dtype], f"{what} dq")
        for name, got, leaf in (("dk", dk, leaves[1]), ("dv", dv, leaves[2])):
            check(got.reshape(leaf.grad.shape), leaf.grad, GRAD_TOL[dtype], f"{what} {name}")


def _one_rank(rank, world):
    (q, k, v), bias = make_case("causal", torch.bfloat16, seed=3)
    out = context_parallel_attention(q, k, v, bias)
    torch.testing.assert_close(out, fmha.memory_efficient_attention(q, k, v, bias), atol=0, rtol=0)


def test_one_rank_nccl_group_is_plain_attention():
    with DistributedWorkers(1, backend="nccl", timeout_s=120) as workers:
        workers.run(_one_rank)


def _over_nccl(rank, world, mode, kind, dtype):
    (q, k, v), bias = make_case(kind, dtype, seed=11, gqa=mode == "ring")
    leaves = [x.float().requires_grad_() for x in (q, k, v)]
    ref = reference(*leaves, bias)
    grad = torch.randn(ref.shape, generator=torch.Generator(device="cuda").manual_seed(12), device="cuda")
    ref.backward(grad)
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    local = [shard_sequence(x) for x in inputs]
    heads = q.shape[-2]
    out = context_parallel_attention(local[0], expand(local[1], heads), expand(local[2], heads), bias, mode=mode)
    out = gather_sequence(out)
    check(out, ref, TOL[dtype], f"{mode} {kind} out")
    out.backward(grad.to(dtype))
    for name, x, leaf in zip(("dq", "dk", "dv"), inputs, leaves):
        check(x.grad, leaf.grad, GRAD_TOL[dtype], f"{mode} {kind} {name}")
    dist.barrier()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 GPUs")
@pytest.mark.parametrize("world", [w for w in (2, 4) if w <= torch.cuda.device_count()])
def test_ring_and_all_to_all_over_nccl(world):
    with DistributedWorkers(world, backend="nccl", timeout_s=300) as workers:
        for mode in ("ring", "all_to_all"):
            for kind in ("causal", "causal_docs"):
                for dtype in TOL:
                    workers.run(_over_nccl, mode, kind, dtype)
