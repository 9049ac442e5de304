"""Regenerate the README's performance tables from the committed benchmark JSON (never typed by hand).

    python scripts/update_readme.py          # rewrites the marked sections of README.md in place

Each section sits between ``<!-- BEGIN name -->`` and ``<!-- END name -->``.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SECTIONS = {
    "fmha-h100": ("triformers.benchmarks.fmha", "benchmarks/results/h100/fmha.json"),
    "layers-h100": ("triformers.benchmarks.layers", "benchmarks/results/h100/layers.json"),
    "fmha-cpu": ("triformers.benchmarks.fmha_cpu", "benchmarks/results/cpu/fmha_cpu.json"),
}


def render(name: str) -> str:
    module_name, path = SECTIONS[name]
    if not (ROOT / path).exists():
        return f"_No committed run yet (`{path}`)._"
    from triformers.benchmarks._harness import load_results

    module = importlib.import_module(module_name)
    return module.markdown_summary(load_results(ROOT / path)) + f"\n\nSource: `{path}`."


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name in SECTIONS:
        pattern = re.compile(rf"(<!-- BEGIN {name} -->).*?(<!-- END {name} -->)", re.S)
        if pattern.search(text):
            body = render(name)
            text = pattern.sub(lambda m, body=body: m.group(1) + "\n" + body + "\n" + m.group(2), text)
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
