"""One canonical view of every input layout, for the operators.

Operators see ``q [B, Mq, G, Hg, K]`` and ``k, v [B, Mkv, G, Hk, K|Kv]`` with ``Hk`` either ``Hg`` (every
query head has its own K/V head) or 1 (the ``Hg`` query heads of a group share one K/V head: GQA/MQA).
All are views of the caller's tensors: nothing is copied.

    BMHK, K/V with head stride 0 (MQA)   q.unsqueeze(2): G = 1, Hg = H;  k[:, :, :1].unsqueeze(2): Hk = 1
    BMHK otherwise                       q.unsqueeze(3): G = H, Hg = 1
    BMGHK, K/V with H-stride 0 (GQA)     G, Hg = H; k[:, :, :, :1]: Hk = 1
    BMGHK otherwise                      G, Hg = H, Hk = H

Gradients of shared K/V (and of broadcast biases) are computed once per shared element, i.e. already
summed over the heads (or broadcast positions) that read it. The tensor handed back to autograd for such a
stride-0 input holds that sum at the first of the positions sharing it and zeros at the others (or, for
very large broadcasts, the sum divided by the number of readers and expanded: a view, no copy). Either way,
whatever broadcast produced the input (``expand``, ``broadcast_to``, ...) sums it back on its way to the
base tensor, which thus receives exactly the sum. A stride-0 *leaf* that requires grad gets its true
per-element gradient instead (its heads are then computed separately).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _stride0_shared(x: torch.Tensor, dim: int) -> bool:
    return x.shape[dim] > 1 and x.stride(dim) == 0 and not (x.is_leaf and x.requires_grad)


@dataclass
class Layout5:
    """Canonical 5-D views of one call's inputs (see the module docstring)."""

    q: torch.Tensor  # [B, Mq, G, Hg, K]
    k: torch.Tensor  # [B, Mkv, G, Hk, K]
    v: torch.Tensor  # [B, Mkv, G, Hk, Kv]
    bias: torch.Tensor | None  # [B, G, Hg, Mq, Mkv] (broadcast view) or None
    ndim: int  # 4 (BMHK) or 5 (BMGHK)
    mqa: bool  # BMHK whose heads share K/V: heads live in Hg

    def to5(self, x: torch.Tensor) -> torch.Tensor:
        """A caller-layout tensor ``[B, M, H, X]`` (or 5-D) as ``[B, M, G, Hg, X]``."""
        if self.ndim == 5:
            return x
        return x.unsqueeze(2) if self.mqa else x.unsqueeze(3)

    def from5(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to5`."""
        if self.ndim == 5:
            return x
        return x.squeeze(2) if self.mqa else x.squeeze(3)

    def lse5(self, lse: torch.Tensor) -> torch.Tensor:
        """Caller lse ``[B, H, Mq]`` (or ``[B, G, H, Mq]``) as ``[B, G, Hg, Mq]``."""
        if self.ndim == 5:
            return lse
        return lse.unsqueeze(1) if self.mqa else lse.unsqueeze(2)

    def bias_from5(self, x: torch.Tensor) -> torch.Tensor:
        """A ``[B, G, Hg, Mq, Mkv]``-shaped tensor back to the caller's bias dims."""
        if self.ndim == 5:
            return x
        return x.squeeze(1) if self.mqa else x.squeeze(2)


def expanded_base(x: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``x`` expands over heads, when autograd would hand it ``x``'s gradient summed over them.

    ``x`` is K or V, shared over its head dim (dim 3 of BMGHK, dim 2 of BMHK) by stride 0. When it is a view
    of a tensor that is exactly head 0 (``base.unsqueeze(3).expand(...)`` or ``base.expand(...)`` with a
    size-1 head dim, the usual ways to pass GQA/MQA keys), that base is returned: an operator can send the
    group-summed gradient to it directly, instead of through the view's backward, which materialises an
    expanded gradient and sums it back (0.2-0.3 ms per GQA fw+bw at Hq = 32, Hkv = 8, N = 4096 on an H100).
    None unless autograd would route the same gradient to it: a view autograd tracks (or neither requires
    grad), no hooks or ``retain_grad`` on the view, and never while torch.compile traces."""
    if torch.compiler.is_compiling() or x.ndim not in (4, 5):
        return None
    base = x._base
    if base is None:
        return None
    dim = 2 if x.ndim == 4 else 3
    head = x.select(dim, 0) if x.ndim == 5 else x.narrow(dim, 0, 1)
    if (
        base.requires_grad == x.requires_grad == (x.grad_fn is not None)  # a view autograd tracks
        and base.shape == head.shape
        and base.dtype == head.dtype
        and base.data_ptr() == head.data_ptr()
        and all(a == b for a, b, n in zip(base.stride(), head.stride(), head.shape) if n > 1)
        and not (x.requires_grad and (x.retains_grad or x._backward_hooks))
    ):
        return base
    return None


def kv_shareable(key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether K/V are stride-0 expansions over the query heads that may be read (and differentiated) once."""
    dim = 2 if key.ndim == 4 else 3
    return key.ndim in (4, 5) and _stride0_shared(key, dim) and _stride0_shared(value, dim)


def canonical(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
    share_kv: bool | None = None,
) -> Layout5:
    """Canonical views of BMHK or BMGHK inputs (BMK is turned into BMHK before this).

    ``share_kv`` overrides the stride-0 detection (kernels registered as custom ops receive it from the
    caller, who still knows which tensors are leaves).
    """
    ndim = query.ndim
    if share_kv is None:
        share_kv = kv_shareable(key, value)
    if ndim == 4:
        mqa = share_kv
        if mqa:
            q, k, v = query.unsqueeze(2), key[:, :, :1].unsqueeze(2), value[:, :, :1].unsqueeze(2)
        else:
            q, k, v = query.unsqueeze(3), key.unsqueeze(3), value.unsqueeze(3)
    elif ndim == 5:
        mqa = False
        q, k, v = query, key, value
        if share_kv:
            k, v = key[:, :, :, :1], value[:, :, :, :1]
    else:
        raise ValueError(f"expected BMHK or BMGHK inputs, got query of shape {tuple(query.shape)}")
    bias5 = None
    if bias is not None:
        B, Mq, G, Hg = q.shape[:4]
        full = (B, G * Hg, Mq, key.shape[1]) if ndim == 4 else (B, G, Hg, Mq, key.shape[1])
        expanded = bias.expand(full)
        if ndim == 4:
            bias5 = expanded.unsqueeze(1) if mqa else expanded.unsqueeze(2)
        else:
            bias5 = expanded
    return Layout5(q=q, k=k, v=v, bias=bias5, ndim=ndim, mqa=mqa)


def bias_reduce_dims(bias: torch.Tensor, layout: Layout5, is_leaf: bool | None = None) -> tuple[int, ...]:
    """Dims of the canonical bias ``[B, G, Hg, Mq, Mkv]`` over which its gradient is summed.

    Those are the broadcast (stride-0) dims of the bias as the caller passed it; a leaf keeps its own
    stride-0 dims of size > 1 (it needs the per-element gradient).
    """
    b5 = layout.bias
    is_leaf = bias.is_leaf if is_leaf is None else is_leaf
    dims = []
    caller_shape = list(bias.shape)
    if layout.ndim == 4:  # caller dims [B, H, Mq, Mkv] -> canonical [B, G, Hg, Mq, Mkv]
        head_pos = 2 if layout.mqa else 1
        caller_of = {0: 0, head_pos: 1, 3: 2, 4: 3}
    else:
        caller_of = {d: d for d in range(5)}
    for d in range(5):
        if b5.shape[d] <= 1 or b5.stride(d) != 0:
            continue
        c = caller_of.get(d)
        if c is not None and is_leaf and caller_shape[c] > 1:
            continue
        dims.append(d)
    return tuple(dims)


# How the summed gradient of a broadcast input is handed to autograd, whose broadcast backward (``expand``'s:
# a sum over the broadcast dims) reads it in full. Written into the first position of zeros, that sum is
# fast; as a stride-0 view it is not (torch reduces over the stride-0 dim as its innermost one). H100,
# bf16, K/V gradient [4, 4096, 8, 1, 128] over 4 heads (benchmarks/NOTES.md, "GQA gradients"): zeros 0.168 ms,
# divided and expanded 0.426 ms. The zero fill is used up to these bounds, the view beyond them.
ZERO_FILL_MAX_READERS = 64
ZERO_FILL_MAX_BYTES = 512 << 20


def grad_for_input(g: torch.Tensor, x: torch.Tensor | torch.Size) -> torch.Tensor:
    """The gradient to hand autograd for input ``x`` (or an input of shape ``x``) given ``g``, summed
    (keepdim) over some of x's broadcast dims; see the module docstring for why dividing and expanding is
    exact."""
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(x)
    if tuple(g.shape) == shape:
        return g
    readers = 1
    for gs, xs in zip(g.shape, shape):
        if gs != xs:
            if gs != 1:
                raise RuntimeError(f"gradient of shape {tuple(g.shape)} cannot stand for {shape}")
            readers *= xs
    if readers == 0:
        return g.new_zeros(shape)
    if readers == 1:
        return g.reshape(shape)
    if readers <= ZERO_FILL_MAX_READERS and math.prod(shape) * g.element_size() <= ZERO_FILL_MAX_BYTES:
        out = g.new_zeros(shape)
        out[tuple(slice(0, 1) if gs != xs else slice(None) for gs, xs in zip(g.shape, shape))] = g
        return out
    return (g / readers).expand(shape)


def shared_kv_grad(g5: torch.Tensor, x: torch.Tensor, layout: Layout5, base_shape: torch.Size | None = None
                   ) -> torch.Tensor:
    """Gradient for a caller's key/value ``x`` from its canonical-layout gradient ``[B, Mkv, G, Hk, X]``; with
    ``base_shape`` (of :func:`expanded_base` of ``x``), the gradient for that base instead: the group sum."""
    if layout.ndim == 4:
        g = g5.squeeze(2).reshape(g5.shape[0], g5.shape[1], 1, g5.shape[-1]) if layout.mqa else g5.squeeze(3)
    else:
        g = g5
    if base_shape is not None:
        return g.reshape(base_shape)
    return grad_for_input(g, x)

