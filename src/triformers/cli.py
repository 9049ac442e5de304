"""The ``triformers`` console script.

    triformers info                 versions, devices and every operator with its availability
    triformers bench fmha [ARGS]    attention benchmark (python -m triformers.benchmarks.fmha)
    triformers bench layers [ARGS]  fused-layer benchmark (python -m triformers.benchmarks.layers)
    triformers bench attention [ARGS]  attention-zoo benchmark (python -m triformers.benchmarks.attention)
    triformers bench fmha_cpu [ARGS]   CPU attention operators (python -m triformers.benchmarks.fmha_cpu)
"""

from __future__ import annotations

import importlib
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "info":
        from triformers import info

        return info.main(rest)
    if command == "bench":
        if not rest or rest[0].startswith("-"):
            print("usage: triformers bench {fmha,layers} [ARGS]", file=sys.stderr)
            return 2
        try:
            module = importlib.import_module(f"triformers.benchmarks.{rest[0]}")
        except ModuleNotFoundError:
            print(f"triformers bench: unknown benchmark {rest[0]!r}", file=sys.stderr)
            return 2
        return int(module.main(rest[1:]) or 0)
    print(f"triformers: unknown command {command!r}\n\n{__doc__.strip()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
