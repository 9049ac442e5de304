"""Inputs and operator base classes of memory-efficient attention (the input checks: ``_validation``).

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
from triformers.ops.fmha import _validation
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha._validation import (  # noqa: F401  (_describe and xFormers' common._is_bias_...: re-exported)
    _LAYOUTS,
    _describe,
    _is_bias_type_supported_in_BMK,
)


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
        _validation.validate_inputs(self)

    def _validate_block_diagonal(self, bias: Any) -> None:
        """The checks of a block-diagonal or KV-cache ``bias`` against the inputs alone (part of
        :meth:`validate_inputs`)."""
        _validation.validate_block_diagonal(self, bias)


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
