"""Block-table checks shared by the KV-cache biases' ``make_paged`` (``attn_bias_kv``) and the paged biases
(``attn_bias_paged``), which import this module rather than each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

#: The paged bias classes, in the order ``attn_bias_paged`` defines them (it adds them here).
_PAGED_TYPES: list[type] = []

_SHARED_FIELDS = frozenset({"q_seqinfo", "k_seqinfo", "block_tables", "page_size"})


def _check_block_tables(block_tables, page_size, num_rows: int) -> None:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
        raise ValueError(f"page_size must be a positive int (keys per page), got {page_size!r}")
    if (
        not isinstance(block_tables, torch.Tensor)
        or block_tables.ndim != 2
        or block_tables.dtype not in (torch.int32, torch.int64)
    ):
        what = (
            f"a {block_tables.ndim}-D {block_tables.dtype} tensor of shape {tuple(block_tables.shape)}"
            if isinstance(block_tables, torch.Tensor)
            else type(block_tables).__name__
        )
        raise ValueError(
            f"block_tables must be a 2-D int32 or int64 tensor [batch_size, max_num_pages], got {what}; build it "
            "with torch.tensor(pages, dtype=torch.int32)"
        )
    if block_tables.shape[0] != num_rows:
        raise ValueError(
            f"block_tables has {block_tables.shape[0]} rows (shape {tuple(block_tables.shape)}) but the bias "
            f"describes {num_rows} sequences; give it one row of page ids per sequence"
        )


def _check_rows_fit(block_tables: torch.Tensor, page_size: int, ends: Sequence[int]) -> None:
    """Every row's keys (logical end offsets ``ends``) must lie within its ``max_num_pages`` pages."""
    width = block_tables.shape[1]
    for b, end in enumerate(ends):
        if -(-end // page_size) > width:
            need = max(-(-e // page_size) for e in ends)
            raise ValueError(
                f"block_tables is too narrow: sequence {b} ends at logical key {end}, which needs "
                f"ceil({end} / page_size={page_size}) = {-(-end // page_size)} pages, but block_tables has "
                f"{width} per row (shape {tuple(block_tables.shape)}); give it at least {need} columns"
            )


def _largest_page(block_tables: torch.Tensor) -> int:
    """The table's largest page id (one device sync); ValueError on a negative one."""
    if block_tables.numel() == 0:
        return -1
    lo, hi = torch.stack(torch.aminmax(block_tables)).tolist()
    if lo < 0:
        raise ValueError(
            f"block_tables holds a negative page id ({lo}); every entry must be a page index >= 0 (point unused "
            "entries at any valid page, e.g. 0: they are never read)"
        )
    return hi


def _extra_fields(bias, cls: type) -> dict:
    """The fields of ``cls`` beyond the shared four that ``bias`` has too (e.g. ``_window_size``)."""
    return {
        f.name: getattr(bias, f.name)
        for f in dataclasses.fields(cls)
        if f.init and f.name not in _SHARED_FIELDS and hasattr(bias, f.name)
    }


def _check_paged_type(bias, paged_type) -> None:
    if not (isinstance(paged_type, type) and getattr(paged_type, "_UNPAGED_TYPE", None) is type(bias)):
        match = [c.__name__ for c in _PAGED_TYPES if c._UNPAGED_TYPE is type(bias)]
        raise ValueError(
            f"paged_type={getattr(paged_type, '__name__', paged_type)} is not the paged version of "
            f"{type(bias).__name__}"
            + (f"; pass paged_type={match[0]}" if match else f"; {type(bias).__name__} has no paged version")
        )
