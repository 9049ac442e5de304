"""``python -m triformers.info`` (also ``triformers info``): versions, devices and every operator.

Like ``python -m xformers.info``: one line per operator, ``available`` or ``unavailable`` with the reason.
"""

from __future__ import annotations

import platform
import sys

import torch

import triformers
from triformers._triton import interpret_mode, is_triton_available


def _register_all_operators() -> None:
    """Imports every module that registers operators (explicit list, no directory scan)."""
    import importlib

    for module in (
        "triformers.ops.fmha",
        "triformers.ops.fmha.triton",
        "triformers.ops.rmsnorm",
        "triformers.ops.swiglu",
        "triformers.ops.indexing",
    ):
        try:
            importlib.import_module(module)
        except ImportError:
            pass


def collect() -> list[tuple[str, str]]:
    """``(name, value)`` rows of the report."""
    from triformers.ops.common import OPERATORS_REGISTRY

    _register_all_operators()
    rows = [
        ("triformers.__version__", triformers.__version__),
        ("python", platform.python_version()),
        ("pytorch.version", torch.__version__),
        ("pytorch.cuda", "available" if torch.cuda.is_available() else "not available"),
    ]
    try:
        import triton

        rows.append(("triton.version", triton.__version__))
    except ImportError:
        rows.append(("triton.version", "not installed"))
    rows.append(("triton.available", str(is_triton_available())))
    rows.append(("triton.interpreter (TRITON_INTERPRET=1)", str(interpret_mode())))
    if torch.cuda.is_available():
        rows.append(("cuda.version", str(torch.version.cuda)))
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            rows.append((f"gpu.{i}", f"{torch.cuda.get_device_name(i)} (sm{cap[0]}{cap[1]})"))
    rows.append(("cpu.threads", str(torch.get_num_threads())))
    for op in OPERATORS_REGISTRY:
        reason = op.unavailable_reason()
        status = "available" if reason is None else f"unavailable ({reason})"
        rows.append((f"{op.OPERATOR_CATEGORY}.{op.NAME}", status))
    return rows


def main(argv: list[str] | None = None) -> int:
    rows = collect()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
