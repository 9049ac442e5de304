"""The key under which the dispatcher caches its decisions (:mod:`~triformers.ops.fmha.dispatch`): a tuple of
everything the choice of an operator depends on, or None for inputs it does not cache.

The choice is a pure function of shapes, strides, dtypes, devices, gradient flags, the bias's type and
parameters (a block-diagonal bias's sequence boundaries included), p, scale, output dtype, partial or not,
torch's determinism and SDPA backend switches, all in the key.
"""

from __future__ import annotations

import torch

from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha._mask import KV_CACHE_BIAS_TYPES, PAGED_BIAS_TYPES
from triformers.ops.fmha.common import Inputs

_CACHEABLE_BIAS = (type(None), torch.Tensor, ab.LowerTriangularMask, ab.LowerTriangularFromBottomRightMask,
                   ab.LowerTriangularFromBottomRightLocalAttentionMask, ab.LocalAttentionFromBottomRightMask)


def _tensor_key(x: torch.Tensor) -> tuple:
    return (tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad, x.is_leaf, x.data_ptr() % 16)


def _block_diagonal_key(bias) -> tuple:
    """The parameters of a block-diagonal bias (its type, window and sequence boundaries), computed once per
    bias object."""
    key = bias.__dict__.get("_triformers_key")
    if key is None:
        key = (type(bias), getattr(bias, "_window_size", None), tuple(bias.q_seqinfo.seqstart_py),
               tuple(bias.k_seqinfo.seqstart_py), tuple(getattr(bias.k_seqinfo, "seqlen_py", ())))
        object.__setattr__(bias, "_triformers_key", key)
    return key


def _kv_cache_key(bias) -> tuple:
    """The parameters of a KV-cache bias that operators' support may depend on, computed once per bias object.
    Key lengths are left out where they change in place between calls (padded, paged: decoding steps), and
    kept for gappy keys (the Triton backward refuses overlapping segments); a paged bias adds its page size
    and its table's shape, address and largest page id."""
    key = bias.__dict__.get("_triformers_key")
    if key is None:
        q, k = bias.q_seqinfo, bias.k_seqinfo
        key = (
            type(bias),
            getattr(bias, "_window_size", None),
            getattr(bias, "window_left", None),
            getattr(bias, "window_right", None),
            len(q.seqstart_py),
            q.seqstart_py[-1],
            q.max_seqlen,
            getattr(k, "padding", None),
        )
        if type(bias) in PAGED_BIAS_TYPES:
            key += (bias.page_size, tuple(bias.block_tables.shape), bias.block_tables.data_ptr(), bias._max_page)
        elif isinstance(bias, ab.BlockDiagonalGappyKeysMask):
            key += (tuple(k.seqstart_py), tuple(k.seqlen_py))
        object.__setattr__(bias, "_triformers_key", key)
    return key


def fw_cache_key(inp: Inputs, needs_gradient: bool | None, needs_lse: bool) -> tuple | None:
    """The key of the dispatcher's decision for ``inp`` (``needs_gradient`` None: the check of an explicitly
    chosen operator), or None where it is not cached (under ``torch.compile``, or a bias the key cannot
    describe)."""
    bias = inp.attn_bias
    if torch.compiler.is_compiling():
        return None
    if isinstance(bias, torch.Tensor):
        bias_key = _tensor_key(bias)
    elif type(bias) in _CACHEABLE_BIAS:
        bias_key = (
            type(bias), getattr(bias, "_window_size", None), getattr(bias, "window_left", None),
            getattr(bias, "window_right", None),
        )
    elif type(bias) in KV_CACHE_BIAS_TYPES:
        bias_key = _kv_cache_key(bias)
    elif hasattr(bias, "q_seqinfo") and hasattr(bias, "k_seqinfo"):
        bias_key = _block_diagonal_key(bias)
    else:
        return None
    backends = ()
    if inp.query.device.type == "cuda":
        b = torch.backends.cuda
        backends = (
            b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled(), b.math_sdp_enabled(),
            b.matmul.allow_tf32,
        )
    return (
        needs_gradient, needs_lse, _tensor_key(inp.query), _tensor_key(inp.key), _tensor_key(inp.value), bias_key,
        inp.p, inp.scale, inp.output_dtype, inp.is_partial, torch.are_deterministic_algorithms_enabled(), backends,
    )
