"""Merging partial attentions (``merge_attentions``), with gradients, and xFormers' merge_training API.

Attention of a query over keys split into ``S`` disjoint parts, each giving an output ``O_s`` and its
log-sum-exp ``L_s`` (:func:`~triformers.ops.fmha.memory_efficient_attention_partial`), is recovered exactly
(arXiv 2402.05099)::

    w_s = exp(L_s - L)      L = log sum_s exp(L_s)      O = sum_s w_s O_s

A part with ``L_s = -inf`` (it saw no key) contributes nothing; a row whose parts are all ``-inf`` gives 0 and
``L = -inf``, never NaN.

Gradients (xFormers raises on backward through a merge; here it runs)::

    dO_s = w_s dO      dL_s = w_s (dL + <O_s, dO> - <O, dO>),    <O, dO> = sum_s w_s <O_s, dO>

``<O, dO>`` is summed from the parts in float32 (float64 for float64 inputs), so a merged output rounded to
a narrow ``output_dtype`` does not enter the lse gradients. The backward is a few torch operations over the
parts (memory-bound, like the forward).

Paths: the forward runs the Triton kernel of ``_triton/merge.py`` (one launch for all parts) on CUDA and
under Triton's interpreter, and torch operations on other devices. Parts are read in place when they are
equally spaced views of one buffer (the stacked form, ``unbind`` or slices of one tensor); separate tensors
are stacked into one buffer first (one copy). Eager calls with gradients go through an
``autograd.Function``; ``torch.compile`` sees the custom op ``triformers::merge_attentions`` (fake
implementation and registered autograd), so ``fullgraph=True`` traces it without a break.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable

from triformers._triton import triton_unavailable_reason
from triformers.ops.fmha import _api
from triformers.ops.fmha.attn_bias import AttentionBias
from triformers.ops.fmha.common import AttentionFwOpBase, AttentionOp
from triformers.triton._common import warn_once

_LSE_DTYPES = (torch.float32, torch.float64)
_FIX_LAYOUT = (
    "pass parts as returned by memory_efficient_attention_partial: attn [B, M, (G,) H, K] with lse [B, (G,) H, M], "
    "or stacked, attn [S, B, M, (G,) H, K] with lse [S, B, (G,) H, M]"
)

# ------------------------------------------------------------------------------------------------------
# Validation: every input form as lists of BMGHK parts
# ------------------------------------------------------------------------------------------------------


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _as_list(name: str, x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"{name}.shape={_shape(x)} holds no part; the first dim counts the parts (S >= 1)")
        return list(x.unbind(0))
    if not isinstance(x, Sequence) or not all(isinstance(t, torch.Tensor) for t in x):
        raise ValueError(f"{name} must be a tensor or a sequence of tensors, got {type(x).__name__}; {_FIX_LAYOUT}")
    if len(x) == 0:
        raise ValueError(f"{name} is empty; merging needs at least one part")
    return list(x)


def _parts(attn_split, lse_split) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """``(attn parts [B, M, G, H, K], lse parts [B, G, H, M], bmhk)``, validated (views, no copies)."""
    attn, lse = _as_list("attn_split", attn_split), _as_list("lse_split", lse_split)
    if len(attn) != len(lse):
        raise ValueError(
            f"Incompatible number of LSE and attention chunks: attn_split has {len(attn)} parts, lse_split "
            f"{len(lse)}; pass one lse per attention part"
        )
    bmhk = attn[0].ndim == 4
    for i, (a, m) in enumerate(zip(attn, lse)):
        if a.ndim not in (4, 5) or m.ndim != a.ndim - 1:
            raise ValueError(
                f"Incompatible input shapes for chunk {i}: attn.shape={_shape(a)}, lse.shape={_shape(m)}; {_FIX_LAYOUT}"
            )
        if (a.ndim == 4) != bmhk:
            raise ValueError(
                f"All chunks must be either BMHK or BMGHK: chunk 0 has attn.shape={_shape(attn[0])}, chunk {i} "
                f"attn.shape={_shape(a)}"
            )
    a0, l0 = attn[0], lse[0]
    expected = (a0.shape[0], *a0.shape[2:-1], a0.shape[1])
    if _shape(l0) != expected:
        raise ValueError(
            f"Incompatible input shapes: attn.shape={_shape(a0)} [B, M, (G,) H, K] needs lse.shape={expected} "
            f"[B, (G,) H, M], got lse.shape={_shape(l0)} (chunk 0); {_FIX_LAYOUT}"
        )
    for i in range(1, len(attn)):
        for what, x, ref in (("attention", attn[i], a0), ("LSE", lse[i], l0)):
            if x.shape != ref.shape:
                raise ValueError(
                    f"Incompatible input shapes for {what} chunk {i}: shape {_shape(x)}, but chunk 0 has "
                    f"{_shape(ref)}; every part must have the same shape"
                )
    _check_dtypes(attn, lse)
    if bmhk:
        attn, lse = [a.unsqueeze(2) for a in attn], [m.unsqueeze(1) for m in lse]
    return attn, lse, bmhk


def _check_dtypes(attn: list[torch.Tensor], lse: list[torch.Tensor]) -> None:
    a0, l0 = attn[0], lse[0]
    for name, parts, ok, fix in (
        ("attn_split", attn, a0.is_floating_point(), "attention outputs are floating point"),
        ("lse_split", lse, l0.dtype in _LSE_DTYPES, "pass lse.float(): it must be float32 or float64"),
    ):
        if not ok:
            raise ValueError(f"{name} has dtype {parts[0].dtype} (shape {_shape(parts[0])}); {fix}")
        for i, x in enumerate(parts):
            if x.dtype != parts[0].dtype or x.device != a0.device:
                raise ValueError(
                    f"{name} chunk {i} is {x.dtype} on {x.device} but attn_split chunk 0 is on {a0.device} and "
                    f"{name} chunk 0 is {parts[0].dtype}; give every part one dtype and device"
                )


# ------------------------------------------------------------------------------------------------------
# Forward and backward over stacked parts
# ------------------------------------------------------------------------------------------------------


def _stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """``[S, ...]``: a view when the parts are equally spaced views of one buffer, else a stacked copy."""
    first = parts[0]
    if len(parts) == 1:
        return first.unsqueeze(0)
    if torch.compiler.is_compiling() or type(first) is not torch.Tensor:
        # traced tensors (fake or functional, also in a compiled backward) have no storage to compare; the
        # compiler fuses the copy
        return torch.stack(parts)
    step = parts[1].storage_offset() - first.storage_offset()
    ptr = first.untyped_storage().data_ptr()
    same_buffer = step >= 0 and all(
        x.shape == first.shape
        and x.stride() == first.stride()
        and x.untyped_storage().data_ptr() == ptr
        and x.storage_offset() - first.storage_offset() == i * step
        for i, x in enumerate(parts)
    )
    if same_buffer:
        return first.as_strided((len(parts), *first.shape), (step, *first.stride()), first.storage_offset())
    return torch.stack(parts)


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _use_kernel(x: torch.Tensor) -> bool:
    """Whether the Triton kernel merges ``x``'s parts: on CUDA and under the interpreter; plain CPU tensors
    take the torch path silently, anything else with a one-time warning."""
    reason = triton_unavailable_reason(x)
    if reason is None:
        return True
    if x.device.type != "cpu" or "interpreter" not in reason:
        warn_once(f"triformers merge_attentions: merging with torch operations because {reason}")
    return False


def merge_partials_torch(
    attn: torch.Tensor, lse: torch.Tensor, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge of ``_triton.merge.merge_partials`` in torch operations (any device, no Triton):
    ``attn [S, B, M, G, H, K]``, ``lse [S, B, G, H, M]`` -> ``(out [B, M, G, H, K] in out_dtype (default
    attn's), lse_out [B, G, H, M] in lse's dtype)``."""
    out_dtype = out_dtype or attn.dtype
    acc = _acc_dtype(attn, lse)
    lse_a = lse.to(acc)
    lse_max = lse_a.amax(0)
    ref = torch.where(lse_max == -math.inf, 0.0, lse_max)
    w = torch.exp(lse_a - ref)  # [S, B, G, H, M]
    w_sum = w.sum(0)
    wt = w.permute(0, 1, 4, 2, 3).unsqueeze(-1)  # [S, B, M, G, H, 1]
    # a part without keys may hold anything: its weight 0 must win over a NaN there
    num = torch.where(wt > 0, wt * attn.to(acc), 0.0).sum(0)
    empty = w_sum == 0
    out = num / torch.where(empty, 1.0, w_sum).permute(0, 3, 1, 2).unsqueeze(-1)
    lse_out = torch.where(empty, -math.inf, ref + torch.log(torch.where(empty, 1.0, w_sum)))
    return out.to(out_dtype), lse_out.to(lse.dtype)


def _merge_forward(
    attn: list[torch.Tensor], lse: list[torch.Tensor], out_dtype: torch.dtype, write_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out [B, M, G, H, K], lse_out [B, G, H, M] or None)`` of validated BMGHK parts."""
    a, m = _stacked(attn), _stacked(lse)
    if not _use_kernel(a):
        out, lse_out = merge_partials_torch(a, m, out_dtype)
        return out, lse_out if write_lse else None
    from triformers.ops.fmha._triton.merge import merge_partials

    if a.stride(-1) != 1:
        a = a.contiguous()
    S, B, M, G, H, K = a.shape
    out = torch.empty((B, M, G, H, K), dtype=out_dtype, device=a.device)
    lse_out = torch.empty((B, G, H, M), dtype=m.dtype, device=a.device) if write_lse else None
    merge_partials(a, m, out, lse_out)
    return out, lse_out


def _merge_backward(
    attn: Sequence[torch.Tensor],
    lse: Sequence[torch.Tensor],
    lse_out: torch.Tensor,
    grad_out: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
    """Gradients of the parts (module docstring); ``None`` for the attention parts when ``grad_out`` is."""
    a, m = _stacked(list(attn)), _stacked(list(lse))
    acc = _acc_dtype(a, m)
    lse_a, ref = m.to(acc), lse_out.to(acc)
    w = torch.where(lse_a == -math.inf, 0.0, torch.exp(lse_a - torch.where(ref == -math.inf, 0.0, ref)))
    g = torch.zeros_like(w) if grad_lse is None else grad_lse.to(acc).expand_as(w)
    dattn: list[torch.Tensor | None] = [None] * len(attn)
    if grad_out is not None:
        go = grad_out.to(acc)  # [B, M, G, H, K]
        wt = w.permute(0, 1, 4, 2, 3).unsqueeze(-1)  # [S, B, M, G, H, 1]
        dattn = [x.to(p.dtype) for x, p in zip((wt * go).unbind(0), attn)]
        dots = (torch.where(wt > 0, a.to(acc), 0.0) * go).sum(-1).permute(0, 1, 3, 4, 2)  # <O_s, dO> [S, B, G, H, M]
        g = g + dots - (w * dots).sum(0)
    dlse = [x.to(p.dtype) for x, p in zip((w * g).unbind(0), lse)]
    return dattn, dlse


class _MergeFn(torch.autograd.Function):
    """Eager autograd of a merge: ``(out_dtype, S, *attn parts, *lse parts) -> (out, lse_out)``."""

    @staticmethod
    def forward(ctx, out_dtype, n, *parts):
        out, lse_out = _merge_forward(list(parts[:n]), list(parts[n:]), out_dtype, True)
        ctx.save_for_backward(*parts, lse_out)
        ctx.n = n
        ctx.set_materialize_grads(False)
        return out, lse_out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        *parts, lse_out = ctx.saved_tensors
        dattn, dlse = _merge_backward(parts[: ctx.n], parts[ctx.n :], lse_out, grad_out, grad_lse)
        return None, None, *dattn, *dlse


@torch.library.custom_op("triformers::merge_attentions", mutates_args=())
def merge_op(
    attn: list[torch.Tensor], lse: list[torch.Tensor], out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, M, G, H, K], lse_out [B, G, H, M])`` of BMGHK parts (what ``torch.compile`` traces)."""
    return _merge_forward(attn, lse, out_dtype, True)


@merge_op.register_fake
def _merge_op_fake(attn, lse, out_dtype):
    return attn[0].new_empty(attn[0].shape, dtype=out_dtype), lse[0].new_empty(lse[0].shape)


def _merge_op_setup(ctx, inputs, output):
    attn, lse, _ = inputs
    ctx.n = len(attn)
    ctx.save_for_backward(*attn, *lse, output[1])


def _merge_op_backward(ctx, grad_out, grad_lse):
    *parts, lse_out = ctx.saved_tensors
    dattn, dlse = _merge_backward(parts[: ctx.n], parts[ctx.n :], lse_out, grad_out, grad_lse)
    dattn = [torch.zeros_like(p) if d is None else d for d, p in zip(dattn, parts)]
    return dattn, dlse, None


merge_op.register_autograd(_merge_op_backward, setup_context=_merge_op_setup)


# ------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------


def merge_attentions(
    attn_split: torch.Tensor | Sequence[torch.Tensor],
    lse_split: torch.Tensor | Sequence[torch.Tensor],
    write_lse: bool = True,
    output_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Combines attentions computed over disjoint parts of the keys into attention over all of them.

    ``Out = sum_s Out_s exp(LSE_s) / sum_s exp(LSE_s)``, ``LSE = log sum_s exp(LSE_s)`` (arXiv 2402.05099),
    computed stably; parts whose lse is ``-inf`` contribute nothing, and rows without any key give 0.
    Differentiable with respect to every part and its lse (xFormers raises on backward).

    Args:
        attn_split: the parts' outputs: a sequence of ``[B, M, (G,) H, K]`` tensors, or one stacked
            ``[S, B, M, (G,) H, K]`` tensor. Any float dtype, any head dim; only the last dim needs stride 1
            to be read in place.
        lse_split: their log-sum-exps (float32 or float64): ``[B, (G,) H, M]`` each, or stacked
            ``[S, B, (G,) H, M]``.
        write_lse: whether to return the merged lse (must be True when the inputs require grad).
        output_dtype: dtype of the merged output (default: the parts').

    Returns:
        ``(out [B, M, (G,) H, K], lse [B, (G,) H, M] in lse_split's dtype, or None without write_lse)``.

    Raises:
        ValueError: parts of different shapes, dtypes or devices, lse shapes that do not match the parts
            (each message names the argument, its shape and the fix), or ``write_lse=False`` with inputs that
            require grad.
    """
    attn, lse, bmhk = _parts(attn_split, lse_split)
    requires_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (*attn, *lse))
    if requires_grad and not write_lse:
        raise ValueError("write_lse should be true if inputs require gradients (pass write_lse=True).")
    if output_dtype is not None and not (isinstance(output_dtype, torch.dtype) and output_dtype.is_floating_point):
        raise ValueError(
            f"output_dtype={output_dtype!r} is not a floating-point torch.dtype; pass e.g. torch.float32 "
            "or None for the parts' dtype"
        )
    out_dtype = output_dtype or attn[0].dtype
    if torch.compiler.is_compiling():
        out, lse_out = merge_op(attn, lse, out_dtype)
        lse_out = lse_out if write_lse else None
    elif requires_grad:
        out, lse_out = _MergeFn.apply(out_dtype, len(attn), *attn, *lse)
    else:
        out, lse_out = _merge_forward(attn, lse, out_dtype, write_lse)
    if bmhk:
        out = out.squeeze(2)
        lse_out = None if lse_out is None else lse_out.squeeze(1)
    return out, lse_out


# ------------------------------------------------------------------------------------------------------
# xFormers' merge_training API, on the differentiable partial attention and merge above
# ------------------------------------------------------------------------------------------------------


class Partial:
    """A partial attention ``(attn, lse)``, as returned by :func:`memory_efficient_attention_partial_autograd`,
    to be merged by :func:`merge_attentions_autograd`. Use the methods, not the attributes."""

    def __init__(self, attn: torch.Tensor, lse: torch.Tensor) -> None:
        self._attn = attn  # [B, M, (G,) H, K]
        self._lse = lse  # [B, (G,) H, M]

    def is_bmghk(self) -> bool:
        return self._attn.ndim == 5

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Partial:
        """Applies ``fn`` to the attention output as if this were a tensor (e.g. ``lambda x: x[:, a:b]`` to
        slice the queries), and to the lse seen as ``[B, M, (G,) H, 1]``. ``fn`` takes BMHK (or BMGHK)
        tensors and must leave the last dim alone (the lse has none)."""
        attn = fn(self._attn)
        if self.is_bmghk():
            lse = fn(self._lse.permute(0, 3, 1, 2).unsqueeze(-1)).squeeze(-1).permute(0, 2, 3, 1)
        else:
            lse = fn(self._lse.permute(0, 2, 1).unsqueeze(-1)).squeeze(-1).permute(0, 2, 1)
        return type(self)(attn, lse)


def memory_efficient_attention_partial_autograd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: torch.Tensor | AttentionBias | None = None,
    p: float = 0.0,
    scale: float | None = None,
    *,
    op: AttentionOp | type[AttentionFwOpBase] | None = None,
    output_dtype: torch.dtype | None = None,
) -> Partial:
    """:func:`~triformers.ops.fmha.memory_efficient_attention_partial` as a :class:`Partial` (same arguments);
    gradients flow through :func:`merge_attentions_autograd` to query, key and value."""
    return Partial(
        *_api.memory_efficient_attention_partial(
            query, key, value, attn_bias, p, scale, op=op, output_dtype=output_dtype
        )
    )


def merge_attentions_autograd(*partials: Partial) -> torch.Tensor:
    """The merged attention output of ``partials`` (one partial: its own output), with gradients.

    Raises:
        ValueError: no partials.
    """
    if not partials:
        raise ValueError("No partials to merge: pass at least one Partial")
    if len(partials) == 1:
        return partials[0]._attn
    return merge_attentions([x._attn for x in partials], [x._lse for x in partials])[0]
