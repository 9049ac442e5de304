"""Operator registry shared by every operator family (attention, fused ops)."""

from __future__ import annotations

from typing import ClassVar

OPERATORS_REGISTRY: list[type[BaseOperator]] = []


class InputError(ValueError, AssertionError):
    """Invalid arguments; the message says what was wrong and how to fix it.

    A ``ValueError``, and an ``AssertionError`` too: xFormers checks many arguments with ``assert``, so code
    written against it may catch ``AssertionError`` (``pytest.raises(AssertionError)``, ``except
    AssertionError``); either ``except`` clause catches this error.
    """


class BaseOperator:
    """An implementation of one operator category, described by class attributes.

    Attributes:
        NAME: short name shown by ``python -m triformers.info`` and accepted by ``TRIFORMERS_FMHA_OP``.
        OPERATOR_CATEGORY: the family, e.g. ``"memory_efficient_attention"``.
    """

    NAME: ClassVar[str] = "base"
    OPERATOR_CATEGORY: ClassVar[str] = "unknown"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this operator cannot run at all on this installation, or None."""
        return None

    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() is None

    @classmethod
    def operator_flop(cls, *inputs) -> int:
        return -1


def register_operator(cls: type[BaseOperator]) -> type[BaseOperator]:
    """Class decorator adding an operator to :data:`OPERATORS_REGISTRY` (listed by ``triformers info``)."""
    if cls not in OPERATORS_REGISTRY:
        OPERATORS_REGISTRY.append(cls)
    return cls
