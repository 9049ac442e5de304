"""The KV cache: paged or contiguous, in the model's dtype or quantized (int4, fp8), and the biases over it.

Layouts (``B`` decode rows, ``Hkv`` K/V heads of ``Hg`` query heads each, head dim ``D``):

* contiguous: row ``b`` owns cache rows ``[b * max_seq_len, (b + 1) * max_seq_len)``; the attention bias is
  ``BlockDiagonalCausalWithOffsetPaddedKeysMask`` with ``kv_padding = max_seq_len``.
* paged (default, pages of 256 rows): pages come from a free-page pool; row ``b``'s block table lists its
  pages, and logical position ``p`` lives at row ``block_tables[b, p // page_size] * page_size +
  p % page_size``. The bias is ``PagedBlockDiagonalCausalWithOffsetPaddedKeysMask``. Page 0 is a scratch
  page: idle decode rows point there, so a decode step always has ``B`` rows (one CUDA graph per batch size).

Each layer's K and V are ``[1, rows, Hkv, 1, W]`` tensors viewed as ``[1, rows, Hkv, Hg, W]`` (stride 0 over the
``Hg`` query heads: GQA as BMGHK, never copied). In the model's dtype ``W = D`` and ``rope_padded`` writes the
new rows straight into the cache. Quantized caches hold int32 words (int4: ``W = D / 8 + groups``, the
per-group fp16 scale|shift words first; fp8: ``W = D / 4`` plus one int32 scale|shift word per row and head):
``rope_padded`` writes the new rows into a small staging buffer in the model's dtype, they are quantized and
copied to their cache rows, and split-K attention dequantizes in its kernel. A prompt's prefill attends to its
fresh K/V in the staging buffer (every prompt starts an empty sequence), so only decoding reads quantized keys.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from triformers.ops import fmha
from triformers.ops.fmha import triton_splitk
from triformers.ops.fmha.attn_bias import (
    BlockDiagonalCausalWithOffsetPaddedKeysMask,
    PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
)
from triformers.ops.fmha.quantize import quantize_kv_fp8, quantize_kv_int4

__all__ = ["KV_KINDS", "SCRATCH_PAGE", "PagePool", "Step", "DecodeInputs", "KVCache"]

KV_KINDS = ("native", "int4", "fp8")
SCRATCH_PAGE = 0  # takes the writes of idle decode rows; never given to a sequence


class PagePool:
    """Free pages of a paged cache. Page :data:`SCRATCH_PAGE` is never handed out."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: a paged cache needs the scratch page and at least one more")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))  # pop() hands out 1, 2, 3, ...

    @property
    def available(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"{n} pages requested but only {len(self._free)} are free; release some first")
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


@dataclass
class Step:
    """What the attention layers of one forward pass need to know about the cache.

    Attributes:
        bias: queries = the new tokens packed, keys = the cache rows (quantized prefill: the staging rows).
        rope_bias: where ``rope_padded`` writes the new K/V: ``bias``, or the staging bias (quantized caches).
        op: attention operator for ``bias`` (None: the dispatcher's choice).
        logit_rows: ``[N]`` rows of the packed tokens whose logits are computed (None: all).
        seqpos: ``[T]`` positions of the new tokens, for ``rope_padded`` writing into the staging rows.
        stage_k, stage_v: staging rows ``[1, S, Hkv, Hg, D]`` (quantized caches).
        stage_rows: ``[N]`` staging rows holding the new tokens (None: all S, in order).
        cache_rows: ``[N]`` the cache rows they are quantized into.
        attend_stage: attention reads the staging K/V instead of the cache (quantized prefill).
    """

    bias: Any
    rope_bias: Any
    op: Any = None
    logit_rows: torch.Tensor | None = None
    seqpos: torch.Tensor | None = None
    stage_k: torch.Tensor | None = None
    stage_v: torch.Tensor | None = None
    stage_rows: torch.Tensor | None = None
    cache_rows: torch.Tensor | None = None
    attend_stage: bool = False


class DecodeInputs:
    """Device inputs of a decode step over all ``B`` rows: tokens, used lengths, block tables, the biases.

    ``DecodeInputs(cache, tokens, seqlens, tables)`` builds them from the values of one step. For CUDA graphs,
    :meth:`persistent` builds them once (biases sized for the longest sequences, so nothing the host derives
    from lengths limits a later step) and :meth:`update` writes each step's values into the same tensors,
    which the captured kernels read.
    """

    def __init__(self, cache: KVCache, tokens: list[int], seqlens: list[int], tables: list[list[int]] | None) -> None:
        dev = cache.device
        self.tokens = torch.tensor(tokens, dtype=torch.long, device=dev)
        B = len(tokens)
        block_tables = None if tables is None else torch.tensor(tables, dtype=torch.int32, device=dev)
        self.bias = cache.bias([1] * B, seqlens, block_tables)
        self.seqlen = self.bias.k_seqinfo.seqlen  # [B] int32, the bias's own tensor
        self.block_tables = getattr(self.bias, "block_tables", None)
        self.stage_bias = self.stage_k = self.stage_v = None
        if cache.quantized:  # one staging row per decode row; positions come from seqpos
            self.stage_bias = BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
                q_seqlen=[1] * B, kv_padding=1, kv_seqlen=[1] * B, device=dev
            )
            self.stage_k, self.stage_v = cache.staging(B)

    @classmethod
    def persistent(cls, cache: KVCache, batch: int) -> DecodeInputs:
        # the largest length and page id any step may bring, so that what the bias derives from them at
        # construction (its longest sequence, its largest page id) bounds every later step's values
        last_page = cache.pool.num_pages - 1 if cache.paged else 0
        tables = None if not cache.paged else [[last_page] * cache.pages_per_seq for _ in range(batch)]
        return cls(cache, [0] * batch, [cache.capacity] * batch, tables)

    def update(self, tokens: list[int], seqlens: list[int], tables: list[list[int]] | None) -> None:
        """Writes one step's values into the device tensors in place (host lists stay as built)."""
        self.tokens.copy_(torch.tensor(tokens, dtype=torch.long), non_blocking=True)
        self.seqlen.copy_(torch.tensor(seqlens, dtype=self.seqlen.dtype), non_blocking=True)
        if tables is not None:
            self.block_tables.copy_(torch.tensor(tables, dtype=self.block_tables.dtype), non_blocking=True)


class KVCache:
    """K/V storage for every layer of a model, and the steps (biases, write positions) that address it.

    Args:
        args: the model's ``ModelArgs``.
        batch: decode rows ``B``.
        max_seq_len: longest sequence a row holds (prompt + new tokens).
        page_size: rows per page (default 256); 0 for the contiguous layout.
        num_pages: pages in the pool, the scratch page included (default: enough for ``B`` sequences of
            ``max_seq_len``).
        kv: ``"native"`` (the model's dtype), ``"int4"`` or ``"fp8"``.
        int4_groups: int4 quantization groups per row (1, 2, 4 or 8).
        dtype, device: of the model.
    """

    def __init__(self, args: Any, *, batch: int, max_seq_len: int, page_size: int = 256, num_pages: int | None = None,
                 kv: str = "native", int4_groups: int = 1, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:  # fmt: skip
        if kv not in KV_KINDS:
            raise ValueError(f"kv={kv!r}; choose one of {KV_KINDS}")
        if batch < 1 or max_seq_len < 1:
            raise ValueError(f"batch={batch} and max_seq_len={max_seq_len} must both be >= 1")
        if page_size < 0:
            raise ValueError(f"page_size={page_size} must be >= 0 (0: contiguous cache)")
        D = args.head_dim
        if kv == "int4" and (int4_groups not in (1, 2, 4, 8) or D % (8 * int4_groups)):
            raise ValueError(
                f"int4 cache: int4_groups={int4_groups} with head_dim={D}; groups must be 1, 2, 4 or 8 and divide "
                "head_dim / 8"
            )
        if kv == "fp8" and D % 4:
            raise ValueError(f"fp8 cache: head_dim={D} must be a multiple of 4 (4 values per int32 word)")
        self.args, self.batch, self.kv, self.int4_groups = args, batch, kv, int4_groups
        self.dtype, self.device = dtype, torch.device(device)
        self.page_size, self.paged = page_size, page_size > 0
        self.max_seq_len = max_seq_len
        if self.paged:
            self.pages_per_seq = math.ceil(max_seq_len / page_size)
            self.pool = PagePool(num_pages if num_pages is not None else batch * self.pages_per_seq + 1)
            self.capacity = self.pages_per_seq * page_size  # positions a block table can address
            rows = self.pool.num_pages * page_size
        else:
            self.capacity = max_seq_len
            rows = batch * max_seq_len
        self.rows = rows
        G, Hg = args.n_kv_heads, args.heads_per_group
        width = {"native": D, "int4": D // 8 + int4_groups, "fp8": D // 4}[kv]
        store = dtype if kv == "native" else torch.int32
        self._k = [torch.zeros(1, rows, G, 1, width, dtype=store, device=device) for _ in range(args.n_layers)]
        self._v = [torch.zeros(1, rows, G, 1, width, dtype=store, device=device) for _ in range(args.n_layers)]
        self.k = [x.expand(1, rows, G, Hg, width) for x in self._k]  # what attention reads
        self.v = [x.expand(1, rows, G, Hg, width) for x in self._v]
        self._k_scale = self._v_scale = None
        self._fp8_checked = False
        if kv == "fp8":  # one fp16 scale | fp16 shift word per (row, K/V head)
            self._k_scale = [torch.zeros(1, rows, G, 1, dtype=torch.int32, device=device) for _ in self._k]
            self._v_scale = [torch.zeros(1, rows, G, 1, dtype=torch.int32, device=device) for _ in self._k]

    @property
    def quantized(self) -> bool:
        return self.kv != "native"

    def storage(self) -> list[torch.Tensor]:
        """Every tensor of the cache (tests fill them with garbage to show that unused rows are never read)."""
        return self._k + self._v + (self._k_scale or []) + (self._v_scale or [])

    def bytes_per_position(self) -> int:
        """Bytes of K and V one position of one sequence takes over all layers (what decoding reads)."""
        per_head = sum(x.shape[-1] * x.element_size() for x in (self._k[0], self._v[0]))
        if self._k_scale is not None:
            per_head += 2 * self._k_scale[0].element_size()
        return per_head * self.args.n_kv_heads * self.args.n_layers

    def table_row(self, pages: list[int]) -> list[int]:
        """A block-table row: ``pages``, then the scratch page up to the table's width."""
        return pages + [SCRATCH_PAGE] * (self.pages_per_seq - len(pages))

    def row(self, b: int, pos: int, table: list[int] | None) -> int:
        """Cache row of position ``pos`` of decode row ``b`` (``table``: its block table, paged layout)."""
        if self.paged:
            return table[pos // self.page_size] * self.page_size + pos % self.page_size
        return b * self.max_seq_len + pos

    def bias(self, q_seqlen: list[int], kv_seqlen: list[int], block_tables: torch.Tensor | None):
        """The KV-cache causal bias over this cache (paged when the cache is)."""
        if self.paged:
            return PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
                q_seqlen, kv_seqlen, block_tables, self.page_size, device=self.device
            )
        return BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
            q_seqlen=q_seqlen, kv_padding=self.max_seq_len, kv_seqlen=kv_seqlen, device=self.device
        )

    def staging(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Staging K and V rows ``[1, rows, Hkv, Hg, D]`` in the model's dtype (quantized caches)."""
        G, Hg, D = self.args.n_kv_heads, self.args.heads_per_group, self.args.head_dim
        return tuple(torch.empty(1, rows, G, 1, D, dtype=self.dtype, device=self.device).expand(1, rows, G, Hg, D)
                     for _ in range(2))  # fmt: skip

    def prefill_step(self, q_lens: list[int], tables: list[list[int]] | None, op: Any = None) -> Step:
        """A step that prefills the prompts of the rows with ``q_lens[b] > 0`` (each starts at position 0; the
        other rows take no tokens); logits are computed for each prompt's last token."""
        dev = self.device
        ends = torch.tensor(q_lens).cumsum(0)
        logit_rows = (ends[torch.tensor(q_lens) > 0] - 1).to(dev)
        if not self.quantized:
            block_tables = None if tables is None else torch.tensor(tables, dtype=torch.int32, device=dev)
            bias = self.bias(q_lens, q_lens, block_tables)
            return Step(bias=bias, rope_bias=bias, op=op, logit_rows=logit_rows)
        lens = [n for n in q_lens if n > 0]
        pad = max(lens)
        stage_bias = BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
            q_seqlen=lens, kv_padding=pad, kv_seqlen=lens, device=dev
        )
        stage_k, stage_v = self.staging(len(lens) * pad)
        stage_rows = [i * pad + j for i, n in enumerate(lens) for j in range(n)]
        cache_rows = [self.row(b, j, None if tables is None else tables[b])
                      for b, n in enumerate(q_lens) for j in range(n)]  # fmt: skip
        return Step(
            bias=stage_bias, rope_bias=stage_bias, logit_rows=logit_rows, stage_k=stage_k, stage_v=stage_v,
            stage_rows=torch.tensor(stage_rows, device=dev), cache_rows=torch.tensor(cache_rows, device=dev),
            attend_stage=True,
        )  # fmt: skip

    def decode_step(self, inputs: DecodeInputs, op: Any = None) -> Step:
        """The step of one decode over ``inputs`` (device work only: it may run inside a CUDA graph capture)."""
        if not self.quantized:
            return Step(bias=inputs.bias, rope_bias=inputs.bias, op=op)
        pos = inputs.seqlen.long() - 1  # [B] position of each row's new token
        if self.paged:
            page = inputs.block_tables.long().gather(1, (pos // self.page_size)[:, None])[:, 0]
            cache_rows = page * self.page_size + pos % self.page_size
        else:
            cache_rows = torch.arange(len(pos), device=pos.device) * self.max_seq_len + pos
        return Step(bias=inputs.bias, rope_bias=inputs.stage_bias, op=op, seqpos=pos.int(), stage_k=inputs.stage_k,
                    stage_v=inputs.stage_v, cache_rows=cache_rows)  # fmt: skip

    def rope_targets(self, layer: int, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """Where ``rope_padded`` writes the new K/V of ``layer``: the cache, or the staging rows."""
        if self.quantized:
            return step.stage_k, step.stage_v
        return self.k[layer], self.v[layer]

    def store_and_attend(self, layer: int, xq: torch.Tensor, step: Step) -> torch.Tensor:
        """Quantized caches: quantize the staged new rows into ``layer``'s cache, then attention.

        Args:
            xq: ``[1, T, Hkv, Hg, D]`` rotated queries.

        Returns:
            ``[1, T, Hkv, Hg, D]``.
        """
        for staged, store, scales in ((step.stage_k, self._k, self._k_scale), (step.stage_v, self._v, self._v_scale)):
            new = staged[0, :, :, 0]  # [S, Hkv, D]
            if step.stage_rows is not None:
                new = new[step.stage_rows]
            if self.kv == "int4":
                data = quantize_kv_int4(new, num_groups=self.int4_groups)
            else:
                data, scale_shift = quantize_kv_fp8(new)
                scales[layer][0].index_copy_(0, step.cache_rows, scale_shift[:, :, None])
            store[layer][0].index_copy_(0, step.cache_rows, data[:, :, None])
        if step.attend_stage:
            return fmha.memory_efficient_attention_forward(xq, step.stage_k, step.stage_v, step.bias)
        if self.kv == "int4":
            return fmha.memory_efficient_attention_forward(xq, self.k[layer], self.v[layer], step.bias, op=step.op)
        G, Hg = self.args.n_kv_heads, self.args.heads_per_group
        inp = triton_splitk.InputsFp8(
            query=xq, key=self.k[layer], value=self.v[layer], attn_bias=step.bias,
            k_fp8_scale_shift=self._k_scale[layer].expand(1, self.rows, G, Hg),
            v_fp8_scale_shift=self._v_scale[layer].expand(1, self.rows, G, Hg),
        )  # fmt: skip
        op = step.op or self.splitk_op()
        if not self._fp8_checked:  # once: apply() itself only refuses inputs it would read out of bounds
            reasons = op.not_supported_reasons(inp)
            if reasons:
                raise ValueError(f"{op.NAME} cannot decode this fp8 cache: " + "; ".join(reasons))
            self._fp8_checked = True
        return op.apply(inp, needs_gradient=False)[0]

    def splitk_op(self) -> type:
        """The split-K decoding operator for this cache (int4: with its quantization groups)."""
        return _int4_op(self.int4_groups) if self.kv == "int4" else triton_splitk.FwOp


@functools.cache
def _int4_op(groups: int) -> type:
    """Split-K with ``NUM_GROUPS = groups`` (xFormers sets int4 groups by subclassing)."""
    if groups == 1:
        return triton_splitk.FwOp
    return type(f"FwOp_int4_g{groups}", (triton_splitk.FwOp,), {"NUM_GROUPS": groups,
                                                                 "NAME": f"triton_splitKF_int4_g{groups}"})
