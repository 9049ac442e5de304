"""All-gather + matmul and matmul + reduce-scatter with the communication overlapped by the compute (xFormers' API).

``fused_allgather_and_linear(x, w, group=g)`` equals ``F.linear(all_gather_along_dim0(x), w)`` and
``fused_linear_and_reducescatter(x, w, group=g)`` equals ``reduce_scatter_along_dim0(F.linear(x, w))``, the two
ends of a sequence-parallel block (arXiv:2302.05442). Instead of one collective followed by one big matmul,
the matmul is split by rank (W = the group's size, r = this rank), after Wang et al.:

- all-gather: each step ``i = 1..W-1`` sends our shard to rank ``r+i`` and receives rank ``r-i``'s, all issued
  asynchronously up front; the matmul of our own shard runs first, then each received shard's as soon as it
  has arrived (waiting on that transfer only), in the order they arrive;
- reduce-scatter: the partial product destined to rank ``r+1`` is computed and sent while the one for ``r+2``
  is computed, and so on, our own last; the received partials are summed at the end.

So all but one step's transfer hides behind a matmul. The ``*_anything`` forms take the per-rank computation
as a callback ``my_matmul(tensors, rank, stream_factory)`` (called once per rank, in the order above).

The transfers and streams are :mod:`triformers.distributed.p2p`'s: on CUDA the transfers run on NCCL's stream
and the callbacks alternate between the current stream and a second one (``stream_factory()``), each waiting
for its own chunk only; on CPU (gloo) the same order runs with asynchronous work handles and
``stream_factory()`` returns None (``torch.cuda.stream(None)`` is a no-op, so callbacks written for CUDA run
unchanged). Any dtype (FP8 included) goes over any backend. There is no symmetric-memory (NVLink IPC) path:
``TRIFORMERS_DISABLE_FUSED_SEQUENCE_PARALLEL=1`` switches to one collective (``all_gather`` /
``reduce_scatter``) around the same callbacks, without overlap. On a group of one rank the callback is
called directly.

``fused_allgather_and_linear`` / ``fused_linear_and_reducescatter`` are ``torch.library`` custom ops
(``triformers::fused_allgather_and_linear``, ``triformers::fused_linear_and_reducescatter``), so
``torch.compile(fullgraph=True)`` traces them as one opaque op each (without ``out=``). They are not
differentiable: :mod:`triformers.ops.seqpar` wraps them with their backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from triformers.ops._seqpar_overlap import (  # noqa: F401  (re-exported)
    DEFAULT_TIMEOUT_S,
    DISABLE_ENV,
    MyMatmul,
    _check_tensors,
    _fused_disabled,
    _group_size,
    fused_allgather_and_anything,
    fused_anything_and_reducescatter,
)
from triformers.ops.differentiable_collectives import check_group

__all__ = [
    "fused_allgather_and_linear",
    "fused_allgather_and_anything",
    "fused_linear_and_reducescatter",
    "fused_anything_and_reducescatter",
]


# ------------------------------------------------------------------------------------------------------------
# The linear forms: argument checks, the per-rank matmul, custom ops
# ------------------------------------------------------------------------------------------------------------


def _is_fp8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and torch.finfo(dtype).bits == 8


def _linear_args(
    fn: str, x: torch.Tensor, x_name: str, weight, scale_x, scale_weight, out_dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], torch.dtype]:
    """``(weights, weight scales, output dtype)`` after checking the arguments of a linear form."""
    scale_name = f"scale_{x_name}"
    weights = list(weight) if isinstance(weight, (list, tuple)) else [weight]
    if x.dim() < 2 or not x.is_contiguous():
        raise ValueError(
            f"{fn}: {x_name} must be contiguous with at least 2 dims (got shape={tuple(x.shape)}, "
            f"stride={x.stride()}); pass a [S, ..., in] tensor, .contiguous() if needed"
        )
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] != x.shape[-1] or w.device != x.device:
            what = f"shape={tuple(w.shape)} on {w.device}" if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(
                f"{fn}: weight[{i}] is {what} but must be [out, {x.shape[-1]}] on {x.device} (F.linear's layout: "
                f"{x_name}.shape[-1] = in features)"
            )
    if (scale_x is None) != (scale_weight is None):
        raise ValueError(f"{fn}: pass both {scale_name} and scale_weight (FP8 inputs) or neither")
    if scale_weight is None:
        bad = [str(w.dtype) for w in weights if w.dtype != x.dtype]
        if bad:
            raise ValueError(f"{fn}: weights of dtype {bad} with {x_name}.dtype={x.dtype}; give them one dtype")
        return weights, [None] * len(weights), out_dtype or x.dtype
    scales = list(scale_weight) if isinstance(scale_weight, (list, tuple)) else [scale_weight]
    if isinstance(weight, (list, tuple)) != isinstance(scale_weight, (list, tuple)) or len(scales) != len(weights):
        raise ValueError(f"{fn}: scale_weight must be one tensor per weight, given as weight is (list or tensor)")
    if not _is_fp8(x.dtype) or not all(_is_fp8(w.dtype) for w in weights):
        raise ValueError(
            f"{fn}: scales are for FP8 operands, got {x_name}.dtype={x.dtype} and weight dtypes "
            f"{[str(w.dtype) for w in weights]}; quantize both to an FP8 dtype or drop the scales"
        )
    if out_dtype is None:
        raise ValueError(f"{fn}: out_dtype is required with FP8 operands (e.g. out_dtype=torch.bfloat16)")
    return weights, scales, out_dtype


def _linear_into(x: torch.Tensor, w: torch.Tensor, scale_x, scale_w, out: torch.Tensor) -> None:
    """``out = x @ w.T`` (``x [..., in]``, ``w [out, in]``); FP8 with tensor-wise scales via ``torch._scaled_mm``."""
    if scale_w is None:
        torch.matmul(x, w.t(), out=out)
    else:
        torch._scaled_mm(
            x.flatten(0, -2), w.t(), scale_a=scale_x, scale_b=scale_w, out_dtype=out.dtype, out=out.flatten(0, -2)
        )


def _allgather_and_linear_into(x, weights, scale_x, scales, outs, group, timeout_s) -> None:
    """``outs[j] [W·S, ..., out_j] = linear(all_gather(x), weights[j])``, overlapped."""
    outs = [o.view(group.size(), *x.shape[:-1], -1) for o in outs]  # [W, S, ..., out_j]: one block per source

    def my_matmul(shards, src, stream_factory):
        for w, sw, o in zip(weights, scales, outs):
            with torch.cuda.stream(stream_factory()):
                _linear_into(shards[0], w, scale_x, sw, o[src])

    fused_allgather_and_anything([x], my_matmul, group=group, timeout_s=timeout_s)


def _linear_and_reducescatter_into(x, weights, scale_x, scales, outs, group, timeout_s) -> None:
    """``outs[j] [S/W, ..., out_j] = reduce_scatter(linear(x, weights[j]))``, overlapped."""
    x = x.view(group.size(), x.shape[0] // group.size(), *x.shape[1:])  # [W, S/W, ..., in]: one block per dest

    def my_matmul(partials, dst, stream_factory):
        for w, sw, o in zip(weights, scales, partials):
            with torch.cuda.stream(stream_factory()):
                _linear_into(x[dst], w, scale_x, sw, o)

    fused_anything_and_reducescatter(my_matmul, outs, group=group, timeout_s=timeout_s)


def _resolve_group(name: str) -> ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(name)


@torch.library.custom_op("triformers::fused_allgather_and_linear", mutates_args=())
def _allgather_and_linear_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    group_name: str,
    timeout_s: int,
    scale_x: torch.Tensor | None,
    scales: list[torch.Tensor | None],
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    outs = _allgather_and_linear_fake(x, weights, group_name, timeout_s, scale_x, scales, out_dtype)
    _allgather_and_linear_into(x, weights, scale_x, scales, outs, _resolve_group(group_name), timeout_s)
    return outs


@_allgather_and_linear_op.register_fake
def _allgather_and_linear_fake(x, weights, group_name, timeout_s, scale_x, scales, out_dtype):
    world = _resolve_group(group_name).size()
    return [x.new_empty((world * x.shape[0], *x.shape[1:-1], w.shape[0]), dtype=out_dtype) for w in weights]


@torch.library.custom_op("triformers::fused_linear_and_reducescatter", mutates_args=())
def _linear_and_reducescatter_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    group_name: str,
    timeout_s: int,
    scale_x: torch.Tensor | None,
    scales: list[torch.Tensor | None],
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    outs = _linear_and_reducescatter_fake(x, weights, group_name, timeout_s, scale_x, scales, out_dtype)
    _linear_and_reducescatter_into(x, weights, scale_x, scales, outs, _resolve_group(group_name), timeout_s)
    return outs


@_linear_and_reducescatter_op.register_fake
def _linear_and_reducescatter_fake(x, weights, group_name, timeout_s, scale_x, scales, out_dtype):
    world = _resolve_group(group_name).size()
    return [x.new_empty((x.shape[0] // world, *x.shape[1:-1], w.shape[0]), dtype=out_dtype) for w in weights]


def _out_views(
    fn: str, out, weight, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """The ``out=`` tensors, checked against the expected output shapes, dtype and device."""
    if torch.compiler.is_compiling():
        raise ValueError(f"{fn}: out= is not supported under torch.compile; drop out= and use the returned tensors")
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    if isinstance(out, (list, tuple)) != isinstance(weight, (list, tuple)) or len(outs) != len(shapes):
        raise ValueError(f"{fn}: out must be one tensor per weight, given as weight is (list or tensor)")
    for i, (o, shape) in enumerate(zip(outs, shapes)):
        if tuple(o.shape) != shape or not o.is_contiguous() or o.dtype != dtype or o.device != device:
            raise ValueError(
                f"{fn}: out[{i}] is shape={tuple(o.shape)} {o.dtype} on {o.device} "
                f"(contiguous={o.is_contiguous()}); it must be a contiguous {shape} {dtype} tensor on {device}"
            )
    return outs


def fused_allgather_and_linear(
    scattered_input: torch.Tensor,
    weight: torch.Tensor | list[torch.Tensor],
    *,
    group: ProcessGroup,
    out: torch.Tensor | list[torch.Tensor] | None = None,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    scale_scattered_input: torch.Tensor | None = None,
    scale_weight: torch.Tensor | list[torch.Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
    **private_args_DO_NOT_USE: Any,
) -> torch.Tensor | list[torch.Tensor]:
    """``F.linear(all_gather(scattered_input), w)`` for each weight, the all-gather overlapped with the matmuls.

    Args:
        scattered_input: this rank's shard ``[S, ..., in]``, contiguous.
        weight: ``[out, in]`` or a list of them (one output each, the all-gather shared).
        group: the process group (W ranks).
        out: optional output tensor(s) ``[W·S, ..., out]`` to write into (not under ``torch.compile``).
        timeout_s: longest wait for one transfer (gloo).
        scale_scattered_input, scale_weight: tensor-wise scales of FP8 operands (``torch._scaled_mm``).
        out_dtype: output dtype (default the input's; required with FP8).
        **private_args_DO_NOT_USE: accepted for xFormers compatibility; ignored.

    Returns:
        ``[W·S, ..., out]`` (rank ``r``'s rows at ``r·S`` onwards), or a list of them if ``weight`` is a list.
    """
    fn, x, sx = "fused_allgather_and_linear", scattered_input, scale_scattered_input
    weights, scales, dtype = _linear_args(fn, x, "scattered_input", weight, sx, scale_weight, out_dtype)
    check_group(group, x, fn, "group")
    if out is None:
        outs = _allgather_and_linear_op(x, weights, group.group_name, int(timeout_s), sx, scales, dtype)
    else:
        shapes = [(group.size() * x.shape[0], *x.shape[1:-1], w.shape[0]) for w in weights]
        outs = _out_views(fn, out, weight, shapes, dtype, x.device)
        _allgather_and_linear_into(x, weights, sx, scales, outs, group, timeout_s)
    return outs if isinstance(weight, (list, tuple)) else outs[0]


def fused_linear_and_reducescatter(
    gathered_input: torch.Tensor,
    weight: torch.Tensor | list[torch.Tensor],
    *,
    group: ProcessGroup,
    out: torch.Tensor | list[torch.Tensor] | None = None,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    scale_gathered_input: torch.Tensor | None = None,
    scale_weight: torch.Tensor | list[torch.Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
    **private_args_DO_NOT_USE: Any,
) -> torch.Tensor | list[torch.Tensor]:
    """``reduce_scatter(F.linear(gathered_input, w))`` along dim 0 for each weight, overlapped.

    Args:
        gathered_input: ``[S, ..., in]``, contiguous, ``S`` a multiple of the group's size W.
        weight, group, timeout_s, out_dtype, **private_args_DO_NOT_USE: as :func:`fused_allgather_and_linear`.
        out: optional output tensor(s) ``[S/W, ..., out]``.
        scale_gathered_input, scale_weight: tensor-wise scales of FP8 operands.

    Returns:
        ``[S/W, ..., out]``: the sum over the ranks of their products' rows ``[r·S/W, (r+1)·S/W)`` on rank ``r``
        (a list if ``weight`` is a list).
    """
    fn, x, sx = "fused_linear_and_reducescatter", gathered_input, scale_gathered_input
    weights, scales, dtype = _linear_args(fn, x, "gathered_input", weight, sx, scale_weight, out_dtype)
    check_group(group, x, fn, "group")
    world = group.size()
    if x.shape[0] % world:
        raise ValueError(
            f"{fn}: gathered_input.shape={tuple(x.shape)} cannot be split into {world} equal blocks along dim 0; "
            f"pad dim 0 to a multiple of the group's size"
        )
    if out is None:
        outs = _linear_and_reducescatter_op(x, weights, group.group_name, int(timeout_s), sx, scales, dtype)
    else:
        shapes = [(x.shape[0] // world, *x.shape[1:-1], w.shape[0]) for w in weights]
        outs = _out_views(fn, out, weight, shapes, dtype, x.device)
        _linear_and_reducescatter_into(x, weights, sx, scales, outs, group, timeout_s)
    return outs if isinstance(weight, (list, tuple)) else outs[0]
