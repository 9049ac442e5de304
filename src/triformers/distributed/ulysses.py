"""All-to-all ("Ulysses", arXiv:2309.14509) context-parallel attention: heads scattered, sequence gathered.

Every rank holds ``S / W`` tokens of all heads. One ``all_to_all_single`` per tensor gives every rank the whole
sequence (in global order: zigzag chunks are put back in place) of ``1 / W`` of the attention units, it runs
:func:`~triformers.ops.memory_efficient_attention` on them with the global mask as it is, and a second
all-to-all sends each token's output back to its rank. The units are the batch elements times the K/V heads
(the groups of GQA, each with its query heads; the heads otherwise), so ``B · K/V heads`` must be divisible by
``W``; the local call sees them as the groups of one batch element, which every mask supported here allows
(block-diagonal masks have batch 1). Shared K/V heads (stride-0 GQA/MQA) travel as one head per group.

In the forward each rank sends (and receives) ``(W-1)/W`` of each of its q, k, v and output shards, and
computes ``1/W`` of the attention; unlike the ring nothing overlaps, but every rank does the same work whatever
the mask. The backward makes the same exchanges, in reverse, of the gradients around the attention's own
backward. Dropout works (``p > 0``): each rank draws the masks of its units.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from triformers.ops.fmha import memory_efficient_attention
from triformers.ops.fmha._layout import canonical, kv_shareable

from .sharding import global_order, layout_order, num_chunks

__all__ = ["all_to_all_attention"]


def _exchange(send: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``all_to_all_single`` of a contiguous ``[W, ...]`` tensor, as bytes (every dtype over every backend)."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv.view(torch.uint8), send.view(torch.uint8), group=group)
    return recv


def _reorder(x: torch.Tensor, dim: int, order: list[int], chunks: int) -> torch.Tensor:
    """``x`` with its ``dim`` cut into ``chunks`` equal chunks, taken in ``order``."""
    shape = x.shape
    x = x.unflatten(dim, (chunks, shape[dim] // chunks))
    x = x.index_select(dim, torch.tensor(order, device=x.device))
    return x.flatten(dim, dim + 1)


def _seq_to_heads(x: torch.Tensor, group: ProcessGroup, load_balance: str) -> torch.Tensor:
    """``[B, Ml, G, Hx, X]`` shards of the sequence -> ``[1, S, B·G/W, Hx, X]``: this rank's units, every token."""
    B, Ml, G, Hx, X = x.shape
    world = group.size()
    units = B * G // world
    send = x.permute(0, 2, 1, 3, 4).reshape(world, units, Ml, Hx, X).contiguous()  # [W (dst), U/W, Ml, Hx, X]
    recv = _exchange(send, group)  # [W (the tokens' rank), U/W, Ml, Hx, X]
    y = recv.transpose(0, 1).flatten(1, 2)  # [U/W, S, Hx, X] in rank-major chunk order
    if load_balance == "zigzag":
        y = _reorder(y, 1, global_order(world, load_balance), num_chunks(world, load_balance))
    return y.transpose(0, 1).unsqueeze(0)


def _heads_to_seq(y: torch.Tensor, group: ProcessGroup, load_balance: str, batch: int) -> torch.Tensor:
    """Inverse of :func:`_seq_to_heads`: ``[1, S, B·G/W, Hx, X]`` -> ``[B, Ml, G, Hx, X]`` (contiguous)."""
    _, S, units, Hx, X = y.shape
    world = group.size()
    z = y[0].transpose(0, 1)  # [U/W, S, Hx, X]
    if load_balance == "zigzag":
        z = _reorder(z, 1, layout_order(world, load_balance), num_chunks(world, load_balance))
    send = z.unflatten(1, (world, S // world)).transpose(0, 1).contiguous()  # [W (dst), U/W, Ml, Hx, X]
    recv = _exchange(send, group)  # [W (the units' rank), U/W, Ml, Hx, X] = [B, G, Ml, Hx, X]
    return recv.view(batch, units * world // batch, S // world, Hx, X).transpose(1, 2).contiguous()


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, load_balance):
        ctx.group, ctx.load_balance, ctx.batch = group, load_balance, x.shape[0]
        return _seq_to_heads(x, group, load_balance)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group, ctx.load_balance, ctx.batch), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group, load_balance, batch):
        ctx.group, ctx.load_balance = group, load_balance
        return _heads_to_seq(y, group, load_balance, batch)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad.contiguous(), ctx.group, ctx.load_balance), None, None, None


def check_units(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, world: int) -> None:
    """Raise ValueError unless the batch times the K/V heads splits over ``world`` ranks."""
    layout = canonical(query, key, value, None, share_kv=kv_shareable(key, value))
    B, _, G = layout.q.shape[:3]
    if (B * G) % world:
        heads = "K/V heads (GQA groups)" if layout.k.shape[3] == 1 and layout.q.shape[3] > 1 else "heads"
        raise ValueError(
            f"context_parallel_attention(mode='all_to_all') gives each rank 1/{world} of the batch x {heads}, "
            f"but batch {B} x {G} {heads} = {B * G} is not divisible by the {world} ranks (query.shape="
            f"{tuple(query.shape)}, key.shape={tuple(key.shape)}); use mode='ring', or a batch x head count "
            f"divisible by {world}"
        )


def all_to_all_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias,
    p: float,
    scale: float | None,
    group: ProcessGroup,
    load_balance: str,
) -> torch.Tensor:
    """All-to-all attention of validated BMHK/BMGHK shards (checked by :func:`check_units`); caller's layout."""
    layout = canonical(query, key, value, None, share_kv=kv_shareable(key, value))
    heads = layout.q.shape[3]
    q, k, v = (_SeqToHeads.apply(x, group, load_balance) for x in (layout.q, layout.k, layout.v))
    if k.shape[3] != heads:  # shared K/V: one head per group travelled; read it for every query head
        k, v = (x.expand(-1, -1, -1, heads, -1) for x in (k, v))
    out = memory_efficient_attention(q, k, v, attn_bias, p=p, scale=scale)  # [1, S, B·G/W, H, Kv]
    return layout.from5(_HeadsToSeq.apply(out, group, load_balance, query.shape[0]))
