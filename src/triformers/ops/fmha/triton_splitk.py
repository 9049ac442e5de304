"""``fmha.triton_splitk``: split-K (flash-decoding) attention for few queries against long KV caches.

xFormers' ``triton_splitk`` operator (NAME ``triton_splitKF``): the keys of each sequence are split among
``split_k`` programs per (sequence, K/V head), each computing a partial attention that a second kernel
merges (``_triton/merge.py``), so that one query per sequence still fills the GPU. Forward only (no backward
operator; ``needs_gradient`` only adds the lse to the result).

- Dense batches (no bias, or a causal / local mask from the bottom right) and every KV-cache bias: padded,
  gappy, paged (any page size, pages in any order), their causal and local variants. The kernel reads the
  bias's own device tensors (``q_seqinfo.seqstart``, ``k_seqinfo.seqstart`` / ``seqlen``, ``block_tables``),
  and the grid and split depend only on what stays fixed while decoding (number of sequences, longest query,
  padding or table width), so a captured CUDA graph stays valid when those tensors are updated in place.
- GQA/MQA without copies: K/V expanded over the query heads (stride 0, BMGHK or BMHK) are read once per
  group, the group's query heads being rows of one program.
- Quantized caches dequantized in the kernel: int4 (``key``/``value`` int32 ``[..., D // 8 + NUM_GROUPS]``,
  :func:`~triformers.ops.fmha.quantize.quantize_kv_int4`) and fp8 e4m3 (int32 ``[..., D // 4]`` passed in an
  :class:`InputsFp8` with per-token scales, :func:`~triformers.ops.fmha.quantize.quantize_kv_fp8`).
- Queries: fp16, bf16, fp32; head dims up to 512 (padded to a power of two in registers); custom scale,
  ``output_dtype``, partial attention (float32 output by default). Any number of queries per sequence is
  correct; the dispatcher sends only decoding shapes here.

Shapes (as ``memory_efficient_attention``): out ``[B, Mq, (G,) H, Kv]``; lse float32 ``[B, (G,) H, Mq]``, with
a KV-cache bias the packed ``[1, (G,) H, total_q]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from triformers._triton import device_capability, interpret_mode, is_triton_available, triton_unavailable_reason
from triformers.ops.common import register_operator
from triformers.ops.fmha import _layout, _registry, quantize
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha import triton as triton_op
from triformers.ops.fmha._mask import KV_CACHE_BIAS_TYPES
from triformers.ops.fmha.common import AttentionFwOpBase, Context, Inputs

MAX_HEAD_DIM = 512

# Every KV-cache bias (padded, gappy, paged, their causal and local variants), and the dense masks a decoding
# step with a dense cache uses (causal or local from the bottom right; top-left causal).
_DENSE_BIASES = (
    ab.LowerTriangularMask,
    ab.LowerTriangularFromBottomRightMask,
    ab.LowerTriangularFromBottomRightLocalAttentionMask,
    ab.LocalAttentionFromBottomRightMask,
)
SUPPORTED_BIAS_TYPES: frozenset[type] = frozenset({type(None), *_DENSE_BIASES, *KV_CACHE_BIAS_TYPES})


@dataclass
class InputsFp8(Inputs):
    """:class:`Inputs` with an fp8 e4m3 KV cache.

    ``key``/``value`` are int32 ``[B, Mkv, (G,) H, D // 4]`` (byte ``j`` of word ``w`` is element ``4 w + j``);
    ``k_fp8_scale_shift``/``v_fp8_scale_shift`` int32 ``[B, Mkv, (G,) H]`` (``key.shape[:-1]``) hold per token
    and head an fp16 scale (low half) and shift (high half): value = ``fp8 * scale + shift``.
    """

    k_fp8_scale_shift: torch.Tensor | None = None
    v_fp8_scale_shift: torch.Tensor | None = None


def _launch():
    from triformers.ops.fmha._triton import splitk_launch

    return splitk_launch


def _bias_errors(inp: Inputs) -> list[str]:
    """Checks of a KV-cache bias against the tensors, from its Python-side values (no device sync): the common
    ones of ``Inputs`` (packing, devices, pages against the cache), and no sequence longer than its slot."""
    bias = inp.attn_bias
    try:
        inp._validate_block_diagonal(bias)
    except ValueError as e:
        return [str(e)]
    padding = getattr(bias.k_seqinfo, "padding", None)
    if padding is not None and max(bias.k_seqinfo.seqlen_py, default=0) > padding:
        return [f"kv_seqlen holds {max(bias.k_seqinfo.seqlen_py)} > padding {padding}: a sequence longer than its "
                "slot; raise kv_padding (or the block table's width)"]
    return []


def input_errors(inp: Inputs, num_groups: int = 1) -> list[str]:
    """Why :class:`FwOp` (with ``NUM_GROUPS = num_groups``) would compute nonsense or read out of bounds on
    ``inp``; empty when it can run it."""
    errors = quantize.cache_errors(inp, num_groups)
    if num_groups > 1 and inp.key.dtype == torch.int32 and inp.query.shape[-1] & (inp.query.shape[-1] - 1):
        errors.append(
            f"group-wise int4 (NUM_GROUPS={num_groups}) needs a power-of-two head dim here, got "
            f"query.shape[-1]={inp.query.shape[-1]}"
        )
    if type(inp.attn_bias) not in SUPPORTED_BIAS_TYPES:
        errors.append(
            f"attn_bias of type {type(inp.attn_bias).__name__} is not supported (supported: None, the "
            "KV-cache biases and the bottom-right causal/local masks); use fmha.triton for it"
        )
    elif type(inp.attn_bias) in KV_CACHE_BIAS_TYPES:
        errors += _bias_errors(inp)
    return errors


@register_operator
class FwOp(AttentionFwOpBase):
    """Split-K decoding forward (see the module docstring).

    Class attributes a subclass (or :meth:`get_operator`) may set: ``SPLIT_K`` (None: :meth:`get_split_k`),
    ``BLOCK_M``, ``BLOCK_N``, ``NUM_WARPS``, ``NUM_STAGES`` (None: the table of ``_triton/splitk_launch.py``),
    ``NUM_GROUPS`` (int4 quantization groups per row).
    """

    NAME = "triton_splitKF"
    SUPPORTED_DEVICES: ClassVar[set[str]] = {"cuda", "cpu"}
    CUDA_MINIMUM_COMPUTE_CAPABILITY = (8, 0)
    SUPPORTED_DTYPES: ClassVar[set[torch.dtype]] = {torch.float16, torch.bfloat16, torch.float32}
    SUPPORTED_MAX_K = MAX_HEAD_DIM
    SUPPORTED_ATTN_BIAS_TYPES = SUPPORTED_BIAS_TYPES
    SUPPORTS_DROPOUT = False
    SUPPORTS_CUSTOM_SCALE = True
    SUPPORTS_DIFFERENT_VALUE_EMBED = True
    SUPPORTS_BMGHK = True
    SUPPORTS_OUTPUT_DTYPE = True
    SUPPORTS_PARTIAL = True
    SUPPORTS_QUANTIZED_KV = True
    SPLIT_K: ClassVar[int | None] = None
    MAX_BLOCK_M: ClassVar[int] = 64
    BLOCK_M: ClassVar[int | None] = None
    BLOCK_N: ClassVar[int | None] = None
    NUM_WARPS: ClassVar[int | None] = None
    NUM_STAGES: ClassVar[int | None] = None
    SPLIT_K_EARLY_EXIT: ClassVar[bool] = False  # xFormers' flag; empty splits always exit at once here
    NUM_GROUPS: ClassVar[int] = 1
    # int4 caches with D >= 128: eight interleaved products of the packed values (``_triton/splitk_int4.py``)
    # instead of unpacking each tile into value order; None: the launch table's choice (scripts/tune_splitk.py
    # times both)
    INT4_INTERLEAVED: ClassVar[bool | None] = None
    NUM_GROUPS_VALUES: ClassVar[tuple[int, ...]] = quantize.INT4_GROUPS

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None if is_triton_available() else "triton is not installed"

    @classmethod
    def not_supported_reasons(cls, d: Inputs) -> list[str]:
        reasons = super().not_supported_reasons(d)
        q = d.query
        why = triton_unavailable_reason(q)
        if why is not None and q.device.type in cls.SUPPORTED_DEVICES:
            reasons.append(why)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and interpret_mode():
            reasons.append("bf16 under Triton's interpreter is unreliable (its tl.dot mishandles bf16 operands)")
        if quantize.is_fp8(d) and q.device.type == "cuda" and device_capability(q.device) < (8, 9):
            reasons.append("fp8 caches need a GPU with compute capability >= 8.9 (fp8 conversions)")
        if type(d.attn_bias) in cls.SUPPORTED_ATTN_BIAS_TYPES:
            reasons += input_errors(d, cls.NUM_GROUPS)
        return reasons

    @classmethod
    def get_split_k(cls, B: int, G: int, H: int, Mk: int, Mq: int, page_size: int = 0, is_paged: bool = False) -> int:
        """Splits per (sequence, K/V head): enough programs to fill the GPU, each keeping enough keys.

        Args:
            B: sequences. G, H: groups and K/V heads per group (after the GQA head swap).
            Mk: keys per sequence the grid is built for (padding, or table width times page size).
            Mq: query rows per (sequence, K/V head) (queries times the query heads sharing the K/V head).
            page_size, is_paged: accepted for xFormers' signature; pages do not change the split here.
        """
        launch = _launch()
        sms = launch.num_sms(torch.device("cuda")) if torch.cuda.is_available() else launch.DEFAULT_NUM_SMS
        return launch.split_for(B * G * H, Mk, Mq, sms)

    @classmethod
    @functools.cache
    def get_operator(
        cls,
        splitk: int,
        *,
        block_m: int | None = None,
        block_n: int | None = None,
        num_warps: int | None = None,
        num_stages: int | None = None,
        split_k_early_exit: bool | None = None,
        int4_interleaved: bool | None = None,
    ) -> type[AttentionFwOpBase]:
        """A subclass with ``split_k`` fixed (NAME ``triton_splitK{splitk}``) and optional launch settings."""
        attrs = {"NAME": f"triton_splitK{splitk}", "SPLIT_K": splitk}
        for name, value in (
            ("BLOCK_M", block_m),
            ("BLOCK_N", block_n),
            ("NUM_WARPS", num_warps),
            ("NUM_STAGES", num_stages),
            ("SPLIT_K_EARLY_EXIT", split_k_early_exit),
            ("INT4_INTERLEAVED", int4_interleaved),
        ):
            if value is not None:
                attrs[name] = value
        return type(f"FwOp_S{splitk}", (cls,), attrs)

    @classmethod
    def apply(cls, inp: Inputs, needs_gradient: bool) -> tuple[torch.Tensor, Context | None]:
        """``(out, Context with the lse or None)``; raises ValueError for inputs it would read out of bounds."""
        errors = input_errors(inp, cls.NUM_GROUPS)
        if errors:
            raise ValueError(f"{cls.NAME} cannot run these inputs: " + "; ".join(errors))
        out, lse = _forward(cls, inp)
        return out, (Context(lse=lse, out=out) if needs_gradient else None)


def _forward(op: type[FwOp], inp: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = inp.query, inp.key, inp.value
    if q.ndim == 3:
        q, k, v = q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2)
    fp8 = quantize.is_fp8(inp)
    ks = vs = None
    if fp8:
        ks, vs = inp.k_fp8_scale_shift, inp.v_fp8_scale_shift
        if inp.query.ndim == 3:
            ks, vs = ks.unsqueeze(2), vs.unsqueeze(2)
    L = _layout.canonical(q, k, v, None)
    quant = "fp8" if fp8 else ("int4" if k.dtype == torch.int32 else "none")
    D = q.shape[-1]
    Dv = D if quant != "none" else v.shape[-1]
    out = torch.empty((*inp.query.shape[:-1], Dv), dtype=inp.get_output_dtype(), device=q.device)
    lse = torch.empty((q.shape[0], *q.shape[2:-1], q.shape[1]), dtype=torch.float32, device=q.device)
    out5, lse5 = L.to5(out.view(*q.shape[:-1], Dv)), L.lse5(lse)
    scales = (quantize.canonical_scale_shift(ks, L), quantize.canonical_scale_shift(vs, L)) if fp8 else (None, None)
    _launch().run(op, L, scales, quant, D, Dv, inp.attn_bias, inp.scale_float, out5, lse5)
    return out, lse


FwOp_Map: dict[int, type[AttentionFwOpBase]] = {
    k: FwOp.get_operator(k) for k in (1, 2, 4, 8, 16, 32, 48, 64, 72, 80, 96, 112, 128)
}
FwOp_S1 = FwOp_Map[1]
FwOp_S2 = FwOp_Map[2]
FwOp_S4 = FwOp_Map[4]
FwOp_S8 = FwOp_Map[8]
FwOp_S16 = FwOp_Map[16]
FwOp_S32 = FwOp_Map[32]
FwOp_S64 = FwOp_Map[64]
FwOp_S128 = FwOp_Map[128]


@functools.cache
def _int4_operator(num_groups: int) -> type[FwOp]:
    return type(f"FwOp_G{num_groups}", (FwOp,), {"NUM_GROUPS": num_groups, "NAME": f"triton_splitKF_g{num_groups}"})


def operator_for(inp: Inputs) -> type[FwOp]:
    """:class:`FwOp`, or for an int4 cache of ``g > 1`` groups per row (``key.shape[-1] - D // 8``) its subclass
    with ``NUM_GROUPS = g``: what the dispatcher runs."""
    groups = inp.key.shape[-1] - inp.query.shape[-1] // 8
    if inp.key.dtype == torch.int32 and not quantize.is_fp8(inp) and groups != 1 and groups in quantize.INT4_GROUPS:
        return _int4_operator(groups)
    return FwOp


# TRIFORMERS_FMHA_OP=triton_splitk: this forward, and the Triton backward (which recomputes from the lse)
_registry.register_family("triton_splitk", FwOp, triton_op.BwOp)
_registry.register_decoding("triton_splitk", operator_for)  # the dispatcher's decoding rule


def get_split_k(B: int, G: int, H: int, Mk: int, Mq: int, page_size: int = 0, is_paged: bool = False) -> int:
    """Module-level alias of :meth:`FwOp.get_split_k`."""
    return FwOp.get_split_k(B, G, H, Mk, Mq, page_size, is_paged)


__all__ = [
    "operator_for",
    "FwOp",
    "FwOp_Map",
    "FwOp_S1",
    "FwOp_S2",
    "FwOp_S4",
    "FwOp_S8",
    "FwOp_S16",
    "FwOp_S32",
    "FwOp_S64",
    "FwOp_S128",
    "InputsFp8",
    "get_split_k",
    "SUPPORTED_BIAS_TYPES",
]
