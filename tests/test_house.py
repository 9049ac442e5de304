"""Checks a newcomer can rely on: no import circle inside triformers, no oversized source file.

The import graph is built with ``ast`` from every ``import`` statement in ``src/triformers``, at module level or
inside a function (a deferred import still ties the two modules together): ``from triformers.a import b`` is an
edge to the module ``triformers.a.b`` when that module exists, else to the package ``triformers.a`` (whose
``__init__`` defines ``b``). Importing a submodule runs its parent packages' ``__init__`` first, but that is not
an edge: a package that imports its own submodules would otherwise always be a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "triformers"

# Largest source file, in lines (style.md: "Keep files under ~400 lines").
MAX_LINES = 400
# Files allowed past MAX_LINES, each with its reason. Keep this short: split a file rather than list it.
LONG_FILES_ALLOWED: dict[str, str] = {}


# Circles allowed, each with why it is there and what would break it (none today). The test fails on any other
# circle and on an entry here that no longer is one. Registration circles (a package's __init__ imports the modules
# that register into it) are avoided by a registry module of its own (ops/fmha/_registry.py,
# components/<package>/_registry.py); shared base classes by a private module below both users
# (ops/fmha/_attn_bias_base.py).
KNOWN_CYCLES: dict[frozenset[str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _targets(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The triformers modules an import statement ``node`` of ``module`` loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: resolve against this module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source not in modules:
        return []
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        edges = {t for node in ast.walk(tree) for t in _targets(node, name, is_package, modules)}
        edges.discard(name)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_import_graph_sees_imports():
    """The graph builder finds known edges (module level, function level, and `from package import module`),
    so an empty cycle list below means something."""
    graph = import_graph()
    assert "triformers.ops.fmha._registry" in graph["triformers.ops.fmha.dispatch"]
    assert "triformers.ops.fmha.triton" in graph["triformers.ops.fmha"]
    assert "triformers.ops.fmha._flash_ops" in graph["triformers.ops.fmha.triton"]
    assert "triformers.ops.fmha._triton.launch" in graph["triformers.ops.fmha._flash_ops"]  # inside a function
    assert "triformers.ops.fmha._triton.merge" in graph["triformers.ops.fmha.merge"]  # inside a function


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_new_import_circles():
    cycles = {frozenset(c) for c in _cycles(import_graph())}
    new = cycles - set(KNOWN_CYCLES)
    assert not new, "import circles (break them with a registry or by moving shared code down):\n" + "\n".join(
        " <-> ".join(sorted(c)) for c in new
    )
    gone = set(KNOWN_CYCLES) - cycles
    assert not gone, "KNOWN_CYCLES lists circles that are gone or changed; update it:\n" + "\n".join(
        " <-> ".join(sorted(c)) for c in gone
    )


def test_operators_and_dispatch_out_of_every_circle():
    """The fmha dispatcher, the operators and the autograd glue take part in no circle."""
    in_cycles = set().union(*_cycles(import_graph()))
    core = {f"triformers.ops.fmha.{m}" for m in ("dispatch", "triton", "triton_splitk", "chunked", "sdpa",
                                                  "common", "_registry", "_autograd", "_mask",
                                                  "_flash_ops", "_validation", "_dispatch_key", "_api")}
    assert not core & in_cycles


def test_dispatch_never_imports_the_triton_operators():
    """The operators register themselves into ``_registry``; the dispatcher reads it and imports neither."""
    edges = import_graph()["triformers.ops.fmha.dispatch"]
    assert not edges & {"triformers.ops.fmha.triton", "triformers.ops.fmha.triton_splitk", "triformers.ops.fmha"}


def test_no_source_file_over_max_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    unexpected = {f: n for f, n in long.items() if f not in LONG_FILES_ALLOWED}
    assert not unexpected, f"files over {MAX_LINES} lines (split them into private modules): {unexpected}"
    stale = sorted(set(LONG_FILES_ALLOWED) - set(long))
    assert not stale, f"LONG_FILES_ALLOWED lists files that are short now; remove them: {stale}"
