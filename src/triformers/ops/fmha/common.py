"""Inputs, validation and operator base classes of memory-efficient attention.

Shapes (xFormers' layouts; note BMHK, not SDPA's BHMK):

    BMK    [B, M, K]          one head
    BMHK   [B, M, H, K]       H heads
    BMGHK  [B, M, G, H, K]    G groups of H query heads sharing one K/V head (GQA); K/V expanded over H

    query [B, Mq, (G,) H, K], key [B, Mkv, (G,) H, K], value [B, Mkv, (G,) H, Kv] -> out [B, Mq, (G,) H, Kv]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from triformers._triton import device_capability
from triformers.ops.common import BaseOperator, InputError
from triformers.ops.fmha import attn_bias as ab

_LAYOUTS = "BMK [B, M, K], BMHK [B, M, H, K] or BMGHK [B, M, G, H, K]"


def _describe(name: str, x: torch.Tensor) -> str:
    return f"{name}.shape={tuple(x.shape)} ({x.dtype}, {x.device.type})"


def _is_bias_type_supported_in_BMK(attn_bias_type: Any) -> bool:
    """Whether BMK ``[B, M, K]`` inputs may come with a bias of this type (others need BMHK)."""
    return attn_bias_type in (type(None), ab.LowerTriangularMask, torch.Tensor)


def check_lastdim_alignment_stride1(reasons: list[str], name: str, x: torch.Tensor, alignment: int) -> None:
    """Appends to ``reasons`` why ``x`` does not suit a kernel that reads its rows in vectors of ``alignment``
    elements: a last dim or row stride that ``alignment`` does not divide, or a last dim that is not contiguous."""
    if x.shape[-1] % alignment != 0:
        reasons.append(f"{name}.shape[-1] % {alignment} != 0")
    elif x.stride(-2) % alignment != 0:
        reasons.append(
            f"{name}.stride(-2) % {alignment} != 0 ({name}.stride() = {x.stride()}); pass {name}.contiguous()"
        )
    if x.stride(-1) > 1:
        reasons.append(f"{name}.stride(-1) > 1 ({name}.stride() = {x.stride()}): you should call `.contiguous()`")


@dataclass
class Inputs:
    """Arguments of one attention call (see :func:`triformers.ops.memory_efficient_attention`)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_bias: torch.Tensor | ab.AttentionBias | None = None
    p: float = 0.0
    scale: float | None = None
    output_dtype: torch.dtype | None = None  # None: see get_output_dtype
    is_partial: bool = False  # attention over part of the keys, to be merged (the lse is an output too)

    @property
    def device(self) -> torch.device:
        return self.query.device

    def get_output_dtype(self) -> torch.dtype:
        """``output_dtype`` if set; else float32 for partial attention (unless the query is float64), so that
        merging does not round the parts; else the query's dtype."""
        if self.output_dtype is not None:
            return self.output_dtype
        if self.is_partial and self.query.dtype != torch.float64:
            return torch.float32
        return self.query.dtype

    @property
    def scale_float(self) -> float:
        return self.query.shape[-1] ** -0.5 if self.scale is None else float(self.scale)

    @property
    def tensor_bias(self) -> torch.Tensor | None:
        """The additive tensor of the bias (a Tensor bias, or LowerTriangularMaskWithTensorBias's), or None."""
        if isinstance(self.attn_bias, torch.Tensor):
            return self.attn_bias
        if isinstance(self.attn_bias, ab.LowerTriangularMaskWithTensorBias):
            return self.attn_bias._bias
        return None

    def get_qkv_in_bmghk(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.query.ndim == 5:
            return self.query, self.key, self.value
        if self.query.ndim == 4:
            return self.query.unsqueeze(2), self.key.unsqueeze(2), self.value.unsqueeze(2)
        return self.query[:, :, None, None], self.key[:, :, None, None], self.value[:, :, None, None]

    def normalize_bmhk(self) -> tuple[int, ...]:
        """Turns BMK inputs into BMHK (H = 1) in place; returns the output shape in the caller's layout."""
        if self.query.ndim not in (3, 4, 5):
            raise InputError(f"Invalid shape for query: {tuple(self.query.shape)}; expected {_LAYOUTS}")
        # a quantized (int32) value holds packed words: the output has the query's head dim
        out_dim = self.query.shape[-1] if self.value.dtype == torch.int32 else self.value.shape[-1]
        output_shape = (*self.query.shape[:-1], out_dim)
        if self.query.ndim == 3:
            self.query, self.key, self.value = (x.unsqueeze(2) for x in (self.query, self.key, self.value))
            if isinstance(self.attn_bias, torch.Tensor):
                self.attn_bias = self.attn_bias.unsqueeze(1)
        return output_shape

    def validate_inputs(self) -> None:
        """Raises :class:`~triformers.ops.common.InputError` (a ValueError, and an AssertionError as xFormers'
        asserts were), naming the tensor, its shape, what was expected and how to fix it."""
        q, k, v = self.query, self.key, self.value
        for name, x in (("query", q), ("key", k), ("value", v)):
            if not isinstance(x, torch.Tensor):
                raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not (q.ndim == k.ndim == v.ndim) or q.ndim not in (3, 4, 5):
            raise InputError(
                "Query/Key/Value should all have BMGHK, BMHK, or BMK shape: got "
                f"{_describe('query', q)}, {_describe('key', k)}, {_describe('value', v)}; "
                f"use one layout for all three: {_LAYOUTS}"
            )
        if not (q.device == k.device == v.device):
            raise InputError(
                f"Query/Key/Value should all be on the same device: query on {q.device}, key on {k.device}, "
                f"value on {v.device}; move them with .to(query.device)"
            )
        if not (q.dtype == k.dtype == v.dtype) and not (k.dtype == v.dtype == torch.int32):
            raise InputError(
                f"Query/Key/Value should all have the same dtype: query {q.dtype}, key {k.dtype}, "
                f"value {v.dtype}; cast them with .to(query.dtype) (or pass a quantized KV cache: int32 key "
                "and value, see ops.fmha.quantize)"
            )
        if not q.is_floating_point():
            raise InputError(f"query.dtype={q.dtype}; attention needs float16, bfloat16 or float32 inputs")
        bias = self.attn_bias
        if q.ndim == 3 and not _is_bias_type_supported_in_BMK(type(bias)):
            raise InputError(
                f"Please provide inputs in BMHK format rather than BMK when using bias type "
                f"`{type(bias).__name__}`: query.unsqueeze(2), key.unsqueeze(2), value.unsqueeze(2)"
            )
        if bias is not None and not isinstance(bias, (torch.Tensor, ab.AttentionBias)):
            raise InputError(
                f"attn_bias must be None, a torch.Tensor or an AttentionBias, got {type(bias).__name__}"
            )
        self._validate_shapes()
        self._validate_tensor_bias()
        if isinstance(bias, ab.VARLEN_BIASES):
            self._validate_block_diagonal(bias)
        if isinstance(bias, ab.BlockSparseMask):
            bias.check_inputs(q, k)
        if not isinstance(self.p, (int, float)) or not 0.0 <= float(self.p) <= 1.0:
            raise InputError(f"Invalid dropout probability: p={self.p!r}; expected 0 <= p <= 1")
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise InputError(f"scale must be a finite float or None, got {self.scale!r}")
        out_dtype = self.output_dtype
        if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
            raise InputError(
                f"output_dtype={out_dtype!r} is not a floating-point torch.dtype; pass e.g. torch.float32, or None "
                f"for the query's dtype ({q.dtype})"
            )
        for name, x in (("query", q), ("key", k), ("value", v)):
            if x.numel() and x.stride(-1) != 1:
                raise InputError(
                    f"{name}.stride(-1)={x.stride(-1)} ({_describe(name, x)}); only the last dimension must "
                    f"be contiguous: pass {name}.contiguous()"
                )

    def _validate_shapes(self) -> None:
        q, k, v = self.query, self.key, self.value
        hint = "HINT: no broadcasting between query and key/value; use key.expand(...) yourself"
        if q.shape[0] != k.shape[0] or q.shape[0] != v.shape[0]:
            raise InputError(
                f"Incompatible shapes for attention inputs: batch sizes differ: {_describe('query', q)}, "
                f"{_describe('key', k)}, {_describe('value', v)}. {hint}"
            )
        if k.shape[1] != v.shape[1]:
            raise InputError(
                f"Incompatible shapes for attention inputs: key has {k.shape[1]} positions but value has "
                f"{v.shape[1]} ({_describe('key', k)}, {_describe('value', v)}); they must match"
            )
        if k.shape[-1] != q.shape[-1] and k.dtype != torch.int32:  # int32: packed words of a quantized cache
            raise InputError(
                f"Incompatible shapes for attention inputs: key.shape[-1]={k.shape[-1]} but "
                f"query.shape[-1]={q.shape[-1]} ({_describe('query', q)}, {_describe('key', k)}); query and "
                "key need the same head dim (value may differ)"
            )
        if q.shape[-1] == 0:
            raise InputError(f"query.shape[-1]=0 ({_describe('query', q)}): the head dim must be positive")
        head_dims = slice(2, q.ndim - 1)
        for name, x in (("key", k), ("value", v)):
            if tuple(x.shape[head_dims]) != tuple(q.shape[head_dims]):
                what = "heads" if q.ndim == 4 else "groups/heads"
                fix = (
                    "expand key/value to the query's head count (key.expand(...): no copy) or use the "
                    "BMGHK layout [B, M, G, H, K] for grouped-query attention"
                )
                raise InputError(
                    f"Incompatible shapes for attention inputs: {name} has {what} {tuple(x.shape[head_dims])} "
                    f"but query has {tuple(q.shape[head_dims])} ({_describe(name, x)}, "
                    f"{_describe('query', q)}); {fix}"
                )

    def _validate_tensor_bias(self) -> None:
        bias = self.tensor_bias
        if bias is None:
            return
        q, k = self.query, self.key
        name = "attn_bias" if isinstance(self.attn_bias, torch.Tensor) else "attn_bias._bias"
        if q.ndim == 3:
            expected = (q.shape[0], q.shape[1], k.shape[1])
            layout = "[B, Mq, Mkv]"
        elif q.ndim == 4:
            expected = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
            layout = "[B, H, Mq, Mkv]"
        else:
            expected = (q.shape[0], q.shape[2], q.shape[3], q.shape[1], k.shape[1])
            layout = "[B, G, H, Mq, Mkv]"
        try:
            ok = bias.ndim == len(expected) and torch.broadcast_shapes(tuple(bias.shape), expected) == expected
        except RuntimeError:
            ok = False
        if not ok:
            raise InputError(
                f"Invalid shape for attention bias: {name}.shape={tuple(bias.shape)}, expected {layout} = "
                f"{expected} or a shape broadcastable to it with the same number of dims (e.g. "
                f"bias[None, :, None, :] for a per-head, per-key bias; .expand({', '.join(map(str, expected))}) "
                "makes a view without copying)"
            )
        if bias.dtype != q.dtype:
            raise InputError(
                f"{name}.dtype={bias.dtype} but query.dtype={q.dtype}; cast the bias: {name}.to(query.dtype)"
            )
        if bias.device != q.device:
            raise InputError(f"{name} is on {bias.device} but query is on {q.device}; move it with .to()")

    def _validate_block_diagonal(self, bias: Any) -> None:
        q, k = self.query, self.key
        kind = type(bias).__name__
        if q.shape[0] != 1:
            raise InputError(
                f"Expected batch_size=1 when using block-diagonal bias {kind}: {_describe('query', q)}; pack "
                "the sequences along M with BlockDiagonalMask.from_tensor_list (or x.reshape(1, -1, ...))"
            )
        q_total = bias.q_seqinfo.seqstart_py[-1]
        if q.shape[1] != q_total:
            raise InputError(
                f"{kind} describes {q_total} queries in total but query.shape[1]={q.shape[1]} "
                f"({_describe('query', q)}); build the bias from the same sequence lengths as the packed query"
            )
        if isinstance(bias, (ab.PagedBlockDiagonalPaddedKeysMask, ab.PagedBlockDiagonalGappyKeysMask)):
            self._validate_paged(bias)
        else:
            k_total = bias.k_seqinfo.seqstart_py[-1]
            if k.shape[1] != k_total:
                raise InputError(
                    f"{kind} describes {k_total} key positions in total but key.shape[1]={k.shape[1]} "
                    f"({_describe('key', k)}); build the bias from the same lengths (and padding) as the keys"
                )
        if not isinstance(bias, ab.BlockDiagonalMask):  # KV-cache biases: operators read their tensors
            tensors = [bias.q_seqinfo.seqstart, bias.k_seqinfo.seqstart, bias.k_seqinfo.seqlen]
            tensors += [bias.block_tables] if hasattr(bias, "block_tables") else []
            if any(t.device != q.device for t in tensors):
                raise InputError(
                    f"{kind}'s tensors are on {sorted({str(t.device) for t in tensors})} but query is on "
                    f"{q.device}; move the bias with attn_bias.to(query.device) (or build it with device=...)"
                )

    def _validate_paged(self, bias: Any) -> None:
        """The cache holds whole pages, and every page id of the table (its largest, kept by the bias) is one."""
        k, kind, page_size = self.key, type(bias).__name__, bias.page_size
        if k.shape[1] % page_size:
            raise InputError(
                f"{kind}: key.shape[1]={k.shape[1]} is not a multiple of page_size={page_size} "
                f"({_describe('key', k)}); the paged cache must hold whole pages [1, num_pages * page_size, ...]"
            )
        if bias._max_page >= k.shape[1] // page_size:
            raise InputError(
                f"{kind}: block_tables refers to page {bias._max_page} but the cache holds "
                f"{k.shape[1] // page_size} pages of {page_size} keys (key.shape[1]={k.shape[1]}); fix block_tables "
                f"or pass a cache of at least {(bias._max_page + 1) * page_size} keys"
            )


@dataclass
class Context:
    """What a forward operator keeps for the backward: ``lse`` float32 ``[B, H, Mq]`` (``[B, G, H, Mq]``
    for BMGHK), the output, and the dropout ``rng_state`` (the seed) when ``p > 0``."""

    lse: torch.Tensor
    out: torch.Tensor
    op_bw: type[AttentionBwOpBase] | None = None
    rng_state: torch.Tensor | None = None

    def get_padded_lse(self, pad_to: int, force_pad_inf: bool = False) -> torch.Tensor:
        pad_amount = (pad_to - (self.lse.shape[-1] % pad_to)) % pad_to
        lse = self.lse
        if pad_amount > 0:
            lse = torch.nn.functional.pad(lse, [0, pad_amount], value=math.inf if force_pad_inf else 0.0)
        return lse


@dataclass
class Gradients:
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    db: torch.Tensor | None = None


def bmk2bmhk(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B * H, M, K]`` -> ``[B, M, H, K]``."""
    if num_heads == 1:
        return tensor.unsqueeze(2)
    return tensor.reshape([-1, num_heads, tensor.shape[1], tensor.shape[2]]).permute((0, 2, 1, 3))


class AttentionOpBase(BaseOperator):
    """An attention operator, described by what it supports.

    ``not_supported_reasons(inputs)`` lists, in plain words, why the operator cannot run these inputs; the
    dispatcher picks the first operator of its priority list with none.
    """

    OPERATOR_CATEGORY: ClassVar[str] = "memory_efficient_attention"
    SUPPORTED_DEVICES: ClassVar[set[str]] = set()
    CUDA_MINIMUM_COMPUTE_CAPABILITY: ClassVar[tuple[int, int]] = (5, 0)
    SUPPORTED_DTYPES: ClassVar[set[torch.dtype]] = set()
    SUPPORTED_MAX_K: ClassVar[float] = 0
    SUPPORTED_ATTN_BIAS_TYPES: ClassVar[frozenset[type] | set[type]] = {type(None)}
    SUPPORTS_DROPOUT: ClassVar[bool] = False
    SUPPORTS_CUSTOM_SCALE: ClassVar[bool] = False
    SUPPORTS_DIFFERENT_VALUE_EMBED: ClassVar[bool] = False
    SUPPORTS_BMGHK: ClassVar[bool] = False
    SUPPORTS_OUTPUT_DTYPE: ClassVar[bool] = False  # writes an output dtype other than the query's
    SUPPORTS_PARTIAL: ClassVar[bool] = False  # partial attention: returns (forward) or takes (backward) lse grads
    SUPPORTS_QUANTIZED_KV: ClassVar[bool] = False  # int32 key/value: a quantized cache (ops.fmha.quantize)
    IS_DETERMINISTIC: ClassVar[bool] = True
    # xFormers' further claims, read by code and tests written against it: the smallest head dim, the newest
    # GPU (None: any), and the lse layout of block-diagonal biases (ours is always packed, [1, (G,) H, total_Mq])
    SUPPORTED_MIN_K: ClassVar[int] = 0
    CUDA_MAXIMUM_COMPUTE_CAPABILITY: ClassVar[tuple[int, int] | None] = None
    VARLEN_LSE_PACKED: ClassVar[bool] = True
    # the batch sizes and head dims xFormers' generic operator tests draw their shapes from
    _TEST_BATCH_SIZES: ClassVar[list[int]] = [1, 300]
    _TEST_K: ClassVar[list[int]] = [32, 128]
    ERROR_ATOL: ClassVar[dict[torch.dtype, float]] = {}
    ERROR_RTOL: ClassVar[dict[torch.dtype, float]] = {}

    @classmethod
    def shape_not_supported_reasons(cls, Mq: int, Mkv: int, K: int, Kv: int) -> list[str]:
        reasons = []
        if not cls.SUPPORTS_DIFFERENT_VALUE_EMBED and K != Kv:
            reasons.append(f"query.shape[-1] != value.shape[-1] ({K} != {Kv})")
        if max(K, Kv) > cls.SUPPORTED_MAX_K:
            reasons.append(f"max(query.shape[-1], value.shape[-1]) = {max(K, Kv)} > {cls.SUPPORTED_MAX_K}")
        return reasons

    @classmethod
    def not_supported_reasons(cls, d: Inputs) -> list[str]:
        q = d.query
        reasons = cls.shape_not_supported_reasons(q.shape[1], d.key.shape[1], q.shape[-1], d.value.shape[-1])
        device_type = q.device.type
        if device_type not in cls.SUPPORTED_DEVICES:
            reasons.append(f"device={device_type} (supported: {', '.join(sorted(cls.SUPPORTED_DEVICES))})")
        elif device_type == "cuda" and device_capability(q.device) < cls.CUDA_MINIMUM_COMPUTE_CAPABILITY:
            reasons.append(
                f"requires a GPU with compute capability >= {cls.CUDA_MINIMUM_COMPUTE_CAPABILITY}, this one has "
                f"{device_capability(q.device)}"
            )
        if q.dtype not in cls.SUPPORTED_DTYPES:
            supported = ", ".join(sorted(str(t).replace("torch.", "") for t in cls.SUPPORTED_DTYPES))
            reasons.append(f"dtype={q.dtype} (supported: {supported})")
        if type(d.attn_bias) not in cls.SUPPORTED_ATTN_BIAS_TYPES:
            reasons.append(f"attn_bias type is {type(d.attn_bias).__name__}")
        if d.p != 0.0 and not cls.SUPPORTS_DROPOUT:
            reasons.append("dropout > 0.0")
        if d.scale is not None and not cls.SUPPORTS_CUSTOM_SCALE:
            reasons.append("has custom scale")
        unavailable = cls.unavailable_reason()
        if unavailable is not None:
            reasons.append(unavailable)
        if not cls.IS_DETERMINISTIC and torch.are_deterministic_algorithms_enabled():
            reasons.append("operator is non-deterministic, but `torch.use_deterministic_algorithms` is set")
        if q.ndim == 5 and not cls.SUPPORTS_BMGHK:
            reasons.append("operator does not support BMGHK format")
        if d.output_dtype is not None and d.output_dtype != q.dtype and not cls.SUPPORTS_OUTPUT_DTYPE:
            reasons.append("Custom output dtype not supported")
        if d.is_partial and not cls.SUPPORTS_PARTIAL:
            reasons.append("Partial attention not supported")
        if d.key.dtype == torch.int32 and not cls.SUPPORTS_QUANTIZED_KV:
            reasons.append("quantized (int32) key/value: fmha.triton_splitk dequantizes them")
        return reasons

    @classmethod
    def supports(cls, d: Inputs) -> bool:
        return not cls.not_supported_reasons(d)


class AttentionFwOpBase(AttentionOpBase):
    """Forward operator: ``apply(inp, needs_gradient) -> (out, Context | None)``.

    Attributes:
        RETURNS_LSE: the operator computes lse (needed by ``memory_efficient_attention_forward_requires_grad``
            and by backward operators that recompute from it), for the inputs ``lse_not_supported_reasons``
            does not refuse.
        NATIVE_AUTOGRAD: the operator's output carries its own autograd graph (``apply_autograd``), used by
            ``memory_efficient_attention`` unless a backward operator other than ``AUTOGRAD_BW`` is asked for.
    """

    RETURNS_LSE: ClassVar[bool] = True
    NATIVE_AUTOGRAD: ClassVar[bool] = False
    AUTOGRAD_BW: ClassVar[type | None] = None  # the backward operator its native autograd runs
    ERROR_ATOL: ClassVar[dict[torch.dtype, float]] = {torch.float: 3e-4, torch.half: 4e-3, torch.bfloat16: 2e-2}
    ERROR_RTOL: ClassVar[dict[torch.dtype, float]] = {torch.float: 2e-5, torch.half: 4e-4, torch.bfloat16: 5e-3}

    @classmethod
    def lse_not_supported_reasons(cls, d: Inputs) -> list[str]:
        """Why the operator cannot return the lse of inputs it otherwise supports: the lse is needed by
        ``memory_efficient_attention_forward_requires_grad``, partial attention, and a backward operator other
        than the one its native autograd runs."""
        if cls.RETURNS_LSE:
            return []
        return [f"{cls.NAME} does not return the logsumexp (the low-level API and other backward operators need it)"]

    @classmethod
    def apply(cls, inp: Inputs, needs_gradient: bool) -> tuple[torch.Tensor, Context | None]:
        raise NotImplementedError()

    @classmethod
    def apply_autograd(cls, inp: Inputs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The output with its autograd graph; ``(out, lse)``, both differentiable, when ``inp.is_partial``."""
        raise NotImplementedError()


class AttentionBwOpBase(AttentionOpBase):
    """Backward operator: ``apply(ctx, inp, grad, grad_lse=None) -> Gradients``.

    ``grad_lse`` (float32, shaped like ``ctx.lse``) is the gradient of the lse output of partial attention;
    only operators with ``SUPPORTS_PARTIAL`` receive it. Since ``d lse_i / d s_ij = P_ij``, it enters the
    usual backward as ``delta_i = rowsum(dO_i * O_i) - grad_lse_i``.
    """

    SUPPORTS_ATTN_BIAS_GRAD: ClassVar[bool] = False
    ERROR_ATOL: ClassVar[dict[torch.dtype, float]] = {torch.float: 9e-4, torch.half: 0.1, torch.bfloat16: 0.9}
    ERROR_RTOL: ClassVar[dict[torch.dtype, float]] = {torch.float: 1e-4, torch.half: 2e-2, torch.bfloat16: 0.1}

    @classmethod
    def not_supported_reasons(cls, d: Inputs) -> list[str]:
        reasons = super().not_supported_reasons(d)
        bias = d.tensor_bias
        if bias is not None and bias.requires_grad and not cls.SUPPORTS_ATTN_BIAS_GRAD:
            reasons.append("computing the gradient of attn_bias is not supported")
        return reasons

    @classmethod
    def apply(cls, ctx: Context, inp: Inputs, grad: torch.Tensor, grad_lse: torch.Tensor | None = None) -> Gradients:
        raise NotImplementedError()


AttentionOp = tuple[type[AttentionFwOpBase] | None, type[AttentionBwOpBase] | None]
