"""Context-parallel attention: exact attention over a sequence sharded across the ranks of a process group.

    out_local = context_parallel_attention(q_local, k_local, v_local, LowerTriangularMask(), group=group)

Each rank passes its shard of the sequence (:func:`~triformers.distributed.shard_sequence`) and the mask of the
*whole* sequence; each gets its shard of the output, which :func:`~triformers.distributed.gather_sequence`
reassembles into ``memory_efficient_attention(q, k, v, bias)``. Two algorithms:

- ``mode="ring"`` (:mod:`~triformers.distributed.ring`): K/V blocks go around the ring while each rank
  computes on the one it holds; blocks the mask hides are skipped. Any head count; memory and compute per
  rank ``O(S/W)`` and ``O(S²/W)``.
- ``mode="all_to_all"`` (:mod:`~triformers.distributed.ulysses`): two all-to-alls around one
  ``memory_efficient_attention`` call per rank over the whole sequence and ``1/W`` of the heads; needs
  ``B · K/V heads`` divisible by ``W``; allows dropout.

``load_balance="zigzag"`` (rank ``r`` holds chunks ``r`` and ``2W-1-r`` of ``2W``) gives every rank the same
causal work; ``"contiguous"`` (chunk ``r`` of ``W``) does not, but needs the sequence divisible by ``W`` only.
The layout must be the one the inputs were sharded with. Every operator of ``memory_efficient_attention`` runs
underneath (chunked on CPU, Triton/SDPA on CUDA), on gloo (CPU tensors) or NCCL (CUDA tensors).

On a group of one rank this is ``memory_efficient_attention`` itself (no merge, no copy). The first call with
each input signature (shapes, dtype, mask kind, options) checks that every rank passes the same (one small
all-gather); later calls trust it. The mask must be the same on every rank; its documents are not compared.
This is plain Python around collectives, not a ``torch.library`` custom op: ``torch.compile`` is not supported,
and a selective-checkpointing policy cannot keep its output by name (recomputing it repeats its transfers).
"""

from __future__ import annotations

import collections
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from triformers.ops.differentiable_collectives import check_group
from triformers.ops.fmha import memory_efficient_attention
from triformers.ops.fmha._layout import kv_shareable
from triformers.ops.fmha.attn_bias import AttentionBias

from .ring import ring_attention
from .ring_plan import check_bias_type, global_mask
from .sharding import check_load_balance, num_chunks, resolve_group
from .ulysses import all_to_all_attention, check_units

__all__ = ["context_parallel_attention", "MODES"]

#: The context-parallel algorithms (see the module docstring).
MODES = ("ring", "all_to_all")
_FN = "context_parallel_attention"
_AGREED_MAX = 256  # input signatures known to agree across ranks, kept per process (oldest forgotten first)
_agreed: collections.OrderedDict = collections.OrderedDict()


def _check_options(mode: str, load_balance: str, p: float) -> None:
    if mode not in MODES:
        raise ValueError(f"{_FN}: mode must be one of {MODES}, got mode={mode!r}")
    check_load_balance(load_balance, _FN)
    if mode == "ring" and p != 0.0:
        raise ValueError(
            f"{_FN}: mode='ring' merges partial attentions, which cannot apply dropout (got p={p}); pass p=0.0 "
            "or use mode='all_to_all'"
        )


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group: ProcessGroup) -> None:
    """Shapes, dtypes, devices and the backend; each failure names the tensor and the fix."""
    shapes = f"query.shape={tuple(query.shape)}, key.shape={tuple(key.shape)}, value.shape={tuple(value.shape)}"
    if query.ndim not in (4, 5) or not query.ndim == key.ndim == value.ndim:
        raise ValueError(
            f"{_FN} takes BMHK [B, M, H, K] or BMGHK [B, M, G, H, K] shards, all of one layout, got {shapes}; "
            "pass BMK inputs as x.unsqueeze(2)"
        )
    if not query.shape[:2] == key.shape[:2] == value.shape[:2]:
        raise ValueError(
            f"{_FN}: query, key and value must be shards of one sequence (self-attention: same batch and local "
            f"length), got {shapes}; shard q, k and v with the same shard_sequence call"
        )
    for name, x in (("key", key), ("value", value)):
        if x.dtype != query.dtype or x.device != query.device:
            raise ValueError(
                f"{_FN}: {name} is {x.dtype} on {x.device} but query is {query.dtype} on {query.device}; give "
                "query, key and value one dtype and device"
            )
    check_group(group, query, _FN, "group")


def _check_ranks_agree(group: ProcessGroup, signature: tuple) -> None:
    """Once per signature: every rank of ``group`` passes the same one (else ValueError on every rank)."""
    key = (getattr(group, "group_name", id(group)), signature)
    if key in _agreed:
        _agreed.move_to_end(key)
        return
    everyone: list[Any] = [None] * group.size()
    dist.all_gather_object(everyone, signature, group=group)
    if any(s != signature for s in everyone):
        listing = "; ".join(f"rank {r}: {s}" for r, s in enumerate(everyone))
        raise ValueError(
            f"{_FN}: the ranks of the group passed different inputs ({listing}); every rank must pass its shard "
            "of the same sequence (same shapes and dtype), the same kind of mask and the same options"
        )
    _agreed[key] = True
    if len(_agreed) > _AGREED_MAX:
        _agreed.popitem(last=False)


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_bias: AttentionBias | None = None,
    p: float = 0.0,
    scale: float | None = None,
    *,
    group: Any = None,
    mode: str = "ring",
    load_balance: str = "zigzag",
) -> torch.Tensor:
    """Exact attention of this rank's queries over the keys of every rank, for a sequence sharded over ``group``.

    Shapes (``M = S / W``: the local length of a global sequence of ``S`` tokens over ``W`` ranks)::

        q [B, M, H, K], k [B, M, H, K], v [B, M, H, Kv] -> [B, M, H, Kv]   (BMHK)
        q [B, M, G, H, K], k/v [B, M, G, H, K|Kv] (K/V expanded over H: GQA) -> [B, M, G, H, Kv]   (BMGHK)

    Args:
        q, k, v: this rank's shard of the sequence (dim 1), as :func:`~triformers.distributed.shard_sequence`
            with the same ``load_balance`` gives it. Shared K/V heads (stride-0 expansions, GQA/MQA) are sent
            as one head per group. Any float dtype the underlying operators take; gradients flow to all three.
        attn_bias: the mask of the *whole* sequence: None, ``LowerTriangularMask`` (causal), or a block-diagonal
            mask (``BlockDiagonalMask``, ``BlockDiagonalCausalMask``; packed documents of batch 1, which may
            cross rank boundaries). Bottom-right causal forms are accepted (the same on a square).
        p: dropout probability; ``mode="all_to_all"`` only.
        scale: multiplies ``q @ k^T``; default ``1 / sqrt(K)``.
        group: a ``ProcessGroup``, a 1-D ``DeviceMesh``, or None (all ranks).
        mode: ``"ring"`` (default) or ``"all_to_all"`` (see the module docstring).
        load_balance: ``"zigzag"`` (default) or ``"contiguous"``: how the sequence was sharded.

    Returns:
        This rank's shard of the output, in the query's layout and dtype.

    Raises:
        ValueError: a local length the layout cannot hold (zigzag: the global length must be a multiple of
            ``2W``), inputs of different shapes, dtypes or devices, tensors the group's backend cannot move, a
            mask that is not one of the above or does not describe the global sequence, ``p > 0`` with the ring,
            ``B · K/V heads`` not divisible by ``W`` with all-to-all, or ranks passing different inputs. Each
            message names the argument and the fix.
    """
    group = resolve_group(group, _FN)
    _check_options(mode, load_balance, p)
    check_bias_type(attn_bias)
    world = group.size()
    if world == 1:
        return memory_efficient_attention(q, k, v, attn_bias, p=p, scale=scale)
    _check_inputs(q, k, v, group)
    rows = q.shape[1]
    if rows * world % num_chunks(world, load_balance):
        raise ValueError(
            f"{_FN}: each rank holds {rows} tokens (query.shape={tuple(q.shape)}), but load_balance='zigzag' gives "
            f"each rank two equal chunks; shard a global sequence whose length is a multiple of 2 x {world} ranks "
            "(pad it), or use load_balance='contiguous'"
        )
    mask = global_mask(attn_bias, rows * world, q.shape[0])
    if mode == "all_to_all":
        check_units(q, k, v, world)
    # what fixes the transfers' sizes and the plan's shape; the documents may change every call, so not them
    signature = (mode, load_balance, tuple(q.shape), tuple(k.shape), tuple(v.shape), str(q.dtype),
                 kv_shareable(k, v), mask.causal, mask.docs is not None)  # fmt: skip
    _check_ranks_agree(group, signature)
    if mode == "ring":
        return ring_attention(q, k, v, mask, scale, group, load_balance)
    return all_to_all_attention(q, k, v, attn_bias, p, scale, group, load_balance)
