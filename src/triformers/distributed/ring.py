"""Ring attention: K/V blocks passed around the ranks, partial attentions merged with their log-sum-exp.

Forward, on each of the ``W`` ranks (``r``; its queries ``Q``, its K/V block ``KV_r``)::

    step i = 0 .. W-1:   start sending the block held to r+1 and receiving the next one from r-1
                         (out_i, lse_i) = memory_efficient_attention_partial(Q, KV_{r-i}, bias_i)
                         (out, lse) = merge((out, lse), (out_i, lse_i))         # merge_attentions, fp32
                         wait for the transfer

so the transfer of step ``i+1``'s block runs while step ``i`` computes (:func:`~triformers.distributed.p2p.
ring_step`: one ``batch_isend_irecv`` per step; NCCL transfers run on NCCL's stream, which the compute stream
waits for without blocking the host). ``bias_i`` and the rows it covers come from
:func:`~triformers.distributed.ring_plan.ring_plan`: hidden blocks are not computed, partly visible ones only
on the rows and keys that see each other.

Backward, with the *final* ``out`` and ``lse`` (the "full-lse" form xFormers' ``merge_training`` uses):
attention over all keys has ``dS_ij = P_ij (dP_ij - D_i)`` with ``P_ij = exp(s_ij - lse_i)`` and ``D_i =
rowsum(dO_i * O_i)``, and each of these only reads key ``j``'s own block, so
``memory_efficient_attention_backward(dO, O, lse, Q, KV_s, bias_s)`` is block ``s``'s exact share of dQ,
dK_s and dV_s. That needs neither the per-block outputs (O(W) memory) nor a second forward per block (the
alternative: recompute each partial with autograd and backpropagate the merge's lse gradient). The K/V blocks
go around the ring once more; each block's dK/dV accumulator (fp32) travels with it: rank ``r`` computes its
share of the block it holds while the previous rank's accumulator for that block arrives, adds the two and
sends the sum on; after ``W`` steps every accumulator is back at its block's owner. Memory stays O(local):
the inputs, ``out``, ``lse``, two K/V blocks and two accumulators. The backward operators the dispatcher
picks (Triton, chunked) read the ``out`` and ``lse`` they are given; SDPA's, which recomputes its own
forward, comes after chunked, which takes every input, so it is never used here.

Shared K/V heads (GQA/MQA, stride-0 over the query heads) travel as their one head per group and are
expanded for the compute; their gradient is summed over the heads before it travels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup, Work

from triformers.distributed.p2p import ring_step
from triformers.ops.fmha import (
    memory_efficient_attention_backward,
    memory_efficient_attention_partial,
    merge_attentions,
)
from triformers.ops.fmha._layout import canonical, kv_shareable, shared_kv_grad

from .ring_plan import BlockCall, GlobalMask, ring_plan

__all__ = ["Ring", "ring_attention", "ring_forward", "ring_backward"]


class Ring:
    """The neighbours of this rank in ``group``: :meth:`pass_on` sends to ``rank + 1`` and receives from
    ``rank - 1``."""

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group
        self.rank, self.world = group.rank(), group.size()

    def pass_on(self, tensors: Sequence[torch.Tensor]) -> tuple[list[Work], list[torch.Tensor]]:
        """Start sending ``tensors`` (contiguous) on; returns the work handles and the buffers receiving the
        previous rank's tensors of the same shapes, to be read after :meth:`wait`."""
        recvs = [torch.empty_like(t) for t in tensors]
        works = ring_step(self.group, list(tensors), (self.rank + 1) % self.world, recvs, (self.rank - 1) % self.world)
        return works, recvs

    @staticmethod
    def wait(works: list[Work]) -> None:
        """Wait for the transfers: on CPU the host waits (the group's timeout applies); on CUDA the current
        stream waits for NCCL's, and the host does not."""
        for w in works:
            w.wait()


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """A K/V block ``[B, M, G, Hk, X]`` as read by ``heads`` query heads per group (stride 0 when shared)."""
    return x if x.shape[3] == heads else x.expand(-1, -1, -1, heads, -1)


Partial = tuple[torch.Tensor, torch.Tensor]  # (out [B, M, G, H, Kv], lse [B, G, H, M]) of some query rows


def _merge_rows(acc: Partial, part: Partial, rows: slice) -> Partial:
    """``acc`` (every local row) with ``part`` (the rows ``rows``) merged into it."""
    out, lse = acc
    if rows == slice(0, out.shape[1]):
        return merge_attentions([out, part[0]], [lse, part[1]], output_dtype=out.dtype)
    merged_out, merged_lse = merge_attentions(
        [out[:, rows], part[0]], [lse[..., rows], part[1]], output_dtype=out.dtype
    )
    out[:, rows] = merged_out
    lse[..., rows] = merged_lse
    return out, lse


def _block_forward(call: BlockCall, q5: torch.Tensor, kv: Sequence[torch.Tensor], scale: float | None) -> Partial:
    """The partial attention of ``call``'s query rows over its rows of the K/V block ``kv``."""
    heads = q5.shape[3]
    k, v = (_heads(x[:, call.k], heads) for x in kv)
    return memory_efficient_attention_partial(q5[:, call.q], k, v, call.bias, scale=scale)


def ring_forward(
    q5: torch.Tensor, kv: Sequence[torch.Tensor], plan: Sequence[BlockCall | None], ring: Ring, scale: float | None
) -> Partial:
    """``(out fp32/fp64 [B, M, G, H, Kv], lse fp32 [B, G, H, M])`` of the local queries ``q5`` over every
    rank's K/V, this rank's block being ``kv = (k, v)`` (contiguous ``[B, M, G, Hk, X]``)."""
    acc = None
    for i, call in enumerate(plan):
        works, nxt = ring.pass_on(kv) if i + 1 < len(plan) else ([], None)
        if call is not None:
            part = _block_forward(call, q5, kv, scale)
            acc = part if acc is None else _merge_rows(acc, part, call.q)  # step 0 covers every row
        ring.wait(works)
        kv = nxt
    return acc


def _block_backward(
    call: BlockCall,
    grad5: torch.Tensor,
    out5: torch.Tensor,
    lse: torch.Tensor,
    q5: torch.Tensor,
    kv: Sequence[torch.Tensor],
    scale: float | None,
    dq: torch.Tensor,
    dkv: Sequence[torch.Tensor],
) -> None:
    """Adds block ``kv``'s share of the gradients under ``call`` into ``dq`` and ``dkv`` (fp32/fp64)."""
    heads = q5.shape[3]
    rows = call.q
    k, v = (_heads(x[:, call.k], heads) for x in kv)
    grads = memory_efficient_attention_backward(
        grad5[:, rows], out5[:, rows], lse[..., rows].contiguous(), q5[:, rows], k, v, call.bias, scale=scale
    )
    dq[:, rows] += grads[0]
    for acc, g, x in zip(dkv, grads[1:], kv):
        acc[:, call.k] += g if x.shape[3] == heads else g.sum(3, keepdim=True)


def ring_backward(
    grad5: torch.Tensor,
    out5: torch.Tensor,
    lse: torch.Tensor,
    q5: torch.Tensor,
    kv: Sequence[torch.Tensor],
    plan: Sequence[BlockCall | None],
    ring: Ring,
    scale: float | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(dq, [dk, dv])`` (fp32/fp64, shaped like ``q5`` and ``kv``) from the output gradient ``grad5`` and the
    forward's final ``out5``/``lse`` (see the module docstring)."""
    acc_dtype = _acc_dtype(q5)
    dq = torch.zeros(q5.shape, dtype=acc_dtype, device=q5.device)
    incoming: list[torch.Tensor] | None = None  # the accumulator of the block held, from the previous rank
    acc_works: list[Work] = []
    for i, call in enumerate(plan):
        kv_works, nxt = ring.pass_on(kv) if i + 1 < len(plan) else ([], None)
        mine = None
        if call is not None:
            mine = [torch.zeros(x.shape, dtype=acc_dtype, device=x.device) for x in kv]
            _block_backward(call, grad5, out5, lse, q5, kv, scale, dq, mine)
        ring.wait(acc_works)
        if mine is None:  # nothing visible in this block (never at step 0): pass the accumulator on
            mine = incoming
        elif incoming is not None:
            for a, b in zip(mine, incoming):
                a += b
        # on to the next rank; at the last step the block is the next rank's own, and what arrives is ours
        acc_works, incoming = ring.pass_on(mine)
        ring.wait(kv_works)
        kv = nxt
    ring.wait(acc_works)
    return dq, incoming


class _RingAttention(torch.autograd.Function):
    """``(q, k, v) -> out [B, M, G, H, Kv]`` (canonical layout) over the ring; gradients for q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, ring, plan, scale, share_kv):
        layout = canonical(q, k, v, None, share_kv=share_kv)
        kv = [layout.k.contiguous(), layout.v.contiguous()]
        out5, lse = ring_forward(layout.q, kv, plan, ring, scale)
        out5 = out5.to(q.dtype)
        ctx.save_for_backward(q, k, v, *kv, out5, lse)
        ctx.ring, ctx.plan, ctx.scale, ctx.share_kv = ring, plan, scale, share_kv
        return out5

    @staticmethod
    @once_differentiable
    def backward(ctx, grad5):
        q, k, v, k_blk, v_blk, out5, lse = ctx.saved_tensors
        layout = canonical(q, k, v, None, share_kv=ctx.share_kv)
        dq, (dk, dv) = ring_backward(
            grad5.contiguous(), out5, lse, layout.q, [k_blk, v_blk], ctx.plan, ctx.ring, ctx.scale
        )
        dq = layout.from5(dq.to(q.dtype))
        dk = shared_kv_grad(dk.to(k.dtype), k, layout)
        dv = shared_kv_grad(dv.to(v.dtype), v, layout)
        return dq, dk, dv, None, None, None, None


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: GlobalMask,
    scale: float | None,
    group: ProcessGroup,
    load_balance: str,
) -> torch.Tensor:
    """Ring attention of validated BMHK/BMGHK shards (``group`` of two ranks or more); the caller's layout."""
    ring = Ring(group)
    rows = query.shape[1]
    plan = ring_plan(mask, rows * ring.world, ring.world, ring.rank, load_balance, query.device)
    share_kv = kv_shareable(key, value)
    layout = canonical(query, key, value, None, share_kv=share_kv)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        out5 = _RingAttention.apply(query, key, value, ring, plan, scale, share_kv)
    else:
        out5 = ring_forward(layout.q, [layout.k.contiguous(), layout.v.contiguous()], plan, ring, scale)[0]
        out5 = out5.to(query.dtype)
    return layout.from5(out5)
