"""The attention operators the dispatcher may choose beyond its own fallbacks.

Each operator module registers itself here when the package imports it (``triton.py``: the FlashAttention-style
pair; ``triton_splitk.py``: the decoding forward and its chooser). ``dispatch.py`` reads this module and never
imports an operator module, so neither imports the other. Registration happens when ``triformers.ops.fmha`` is
imported, which always precedes a dispatch (``dispatch.py`` lives in that package).
"""

from __future__ import annotations

from collections.abc import Callable

from triformers.ops.fmha.common import AttentionBwOpBase, AttentionFwOpBase, Inputs

_FAMILIES: dict[str, tuple[type[AttentionFwOpBase], type[AttentionBwOpBase]]] = {}
_DECODING: dict[str, Callable[[Inputs], type[AttentionFwOpBase]]] = {}


def register_family(name: str, fw: type[AttentionFwOpBase], bw: type[AttentionBwOpBase]) -> None:
    """Makes the pair ``(fw, bw)`` selectable as ``TRIFORMERS_FMHA_OP=name`` (and by the dispatcher, by name)."""
    _FAMILIES[name] = (fw, bw)


def family(name: str) -> tuple[type[AttentionFwOpBase], type[AttentionBwOpBase]] | None:
    """The pair registered as ``name``, or None."""
    return _FAMILIES.get(name)


def families() -> dict[str, tuple[type[AttentionFwOpBase], type[AttentionBwOpBase]]]:
    """Every registered pair by name, in registration order."""
    return dict(_FAMILIES)


def register_decoding(name: str, operator_for: Callable[[Inputs], type[AttentionFwOpBase]]) -> None:
    """Registers the function that picks the decoding forward operator for some inputs (split-K)."""
    _DECODING[name] = operator_for


def decoding_operator(inp: Inputs) -> type[AttentionFwOpBase] | None:
    """The registered decoding operator for ``inp`` (the split-K one), or None when none is registered."""
    chooser = _DECODING.get("triton_splitk")
    return None if chooser is None else chooser(inp)
