"""The ``triformers`` console script.

    triformers info                       versions, devices and every operator with its availability
    triformers bench NAME [--out DIR] [ARGS]
                                          run a benchmark, writing its JSON (env + records) into DIR; NAME is one
                                          of fmha, decode, layers, sparse, sparse-matmul, attention, lra,
                                          context-parallel, fmha-cpu; ARGS go to the benchmark
                                          (`triformers bench NAME --help`)
    triformers plot JSON [--out PNG]      the standard figure of a benchmark JSON (providers side by side, ratio
                                          to the best peer, the ceiling line)
    triformers report [DIR] [--check]     regenerate the performance tables of README.md and docs/performance.md
                                          from the committed JSON in DIR (default benchmarks/results)
    triformers run SCRIPT.py [ARGS]       run a script with `import xformers` resolving to triformers
    triformers run -m MODULE [ARGS]       the same for a module, as `python -m MODULE` (triformers.as_xformers)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import runpy
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
        return _bench(rest)
    if command == "plot":
        from triformers.benchmarks import _plot

        return _plot.main(rest)
    if command == "report":
        from triformers.benchmarks import _report

        return _report.main(rest)
    if command == "run":
        return _run(rest)
    print(f"triformers: unknown command {command!r}\n\n{__doc__.strip()}", file=sys.stderr)
    return 2


# name -> (module under triformers.benchmarks, the JSON file it writes when its own --out takes a file path; None
# when its --out already takes a folder). `triformers bench NAME --out DIR` gives every benchmark a folder.
BENCHMARKS: dict[str, tuple[str, str | None]] = {
    "fmha": ("fmha", None),
    "decode": ("decode", None),
    "layers": ("layers", "layers.json"),
    "sparse": ("sparse", None),
    "sparse-matmul": ("sparse_matmul", "sparse_matmul.json"),
    "attention": ("attention", "attention.json"),
    "lra": ("lra", None),
    "context-parallel": ("context_parallel", "context_parallel.json"),
    "fmha-cpu": ("fmha_cpu", "fmha_cpu.json"),
}
_BENCH_USAGE = f"usage: triformers bench {{{','.join(BENCHMARKS)}}} [--out DIR] [ARGS]"


def _bench(argv: list[str]) -> int:
    """Runs ``triformers.benchmarks.<module>.main`` with ``--out DIR`` turned into what that benchmark takes."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_BENCH_USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, args = argv[0].replace("_", "-"), argv[1:]
    if name not in BENCHMARKS:
        print(f"triformers bench: unknown benchmark {argv[0]!r}\n{_BENCH_USAGE}", file=sys.stderr)
        return 2
    module_name, results_file = BENCHMARKS[name]
    try:
        module = importlib.import_module(f"triformers.benchmarks.{module_name}")
    except ModuleNotFoundError as e:
        if e.name is None or not f"triformers.benchmarks.{module_name}".startswith(e.name):
            raise  # a dependency of the benchmark is missing: show the real error
        print(f"triformers bench: the {name!r} benchmark (triformers.benchmarks.{module_name}) is not part of this "
              "installation", file=sys.stderr)
        return 2
    results_file = getattr(module, "RESULTS_FILE", results_file)
    return int(module.main(_out_to_file(args, results_file) if results_file else args) or 0)


def _out_to_file(args: list[str], results_file: str) -> list[str]:
    """``--out DIR`` (or ``--out=DIR``) -> ``--out DIR/results_file``; a path ending in .json is kept."""
    out = list(args)
    for i, a in enumerate(out):
        if a == "--out" and i + 1 < len(out):
            if not out[i + 1].endswith(".json"):
                out[i + 1] = os.path.join(out[i + 1], results_file)
        elif a.startswith("--out=") and not a.endswith(".json"):
            out[i] = "--out=" + os.path.join(a[len("--out="):], results_file)
    return out


_RUN_USAGE = "usage: triformers run SCRIPT.py [ARGS...]  |  triformers run -m MODULE [ARGS...]"


def _run(argv: list[str]) -> int:
    """Runs a script or module as ``python`` would (``__main__``, ``sys.argv``, ``sys.path[0]``) after
    ``import triformers.as_xformers``; its ``SystemExit`` propagates."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_RUN_USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "-m" and len(argv) < 2:
        print(f"triformers run: -m needs a module name\n{_RUN_USAGE}", file=sys.stderr)
        return 2
    if argv[0] != "-m" and not os.path.exists(argv[0]):
        print(f"triformers run: can't open file {argv[0]!r}: no such file or directory", file=sys.stderr)
        return 2
    import triformers.as_xformers  # noqa: F401  (installs the alias; warns if a real xFormers is importable)

    if argv[0] == "-m":
        module, args = argv[1], argv[2:]
        sys.path[0] = os.getcwd()  # as `python -m` does
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            print(f"triformers run: no module named {module!r}", file=sys.stderr)
            return 2
        sys.argv = [module, *args]  # runpy sets argv[0] to the module's file
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    script, args = argv[0], argv[1:]
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT` does
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
