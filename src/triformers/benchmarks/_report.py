"""The performance tables of the README and docs/performance.md, generated from the committed benchmark JSON.

    triformers report [RESULTS_DIR] [--docs README.md docs/performance.md] [--check]

Each table sits between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in a document; ``SECTIONS`` maps the
name to the benchmark module whose ``markdown_summary(doc)`` renders it and to its JSON under RESULTS_DIR
(default ``benchmarks/results``). Tables are never typed by hand: change the JSON, then run this.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from pathlib import Path

# name -> (module with markdown_summary, JSON files relative to the results folder)
SECTIONS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "decode-h200": ("triformers.benchmarks.decode", ("h200/decode.json",)),
    "llama-h200": (None, ("h200/llama_b1.json", "h200/llama_b64.json")),
    "context-parallel-h200": ("triformers.benchmarks.context_parallel", ("h200/context_parallel_single.json",)),
    "fmha-h100": ("triformers.benchmarks.fmha", ("h100/fmha.json",)),
    "layers-h100": ("triformers.benchmarks.layers", ("h100/layers.json",)),
    "fmha-cpu": ("triformers.benchmarks.fmha_cpu", ("cpu/fmha_cpu.json",)),
    "sparse-h200": ("triformers.benchmarks.sparse", ("h200/sparse.json",)),
    "sparse-cpu": ("triformers.benchmarks.sparse", ("cpu/sparse.json",)),
    "lra-h200": ("triformers.benchmarks.lra", ("h200/lra.json",)),
    "lra-paper-h200": ("triformers.benchmarks.lra", ("h200/lra_paper.json",)),
    "lra-pathfinder32-h200": ("triformers.benchmarks.lra", ("h200/lra_pathfinder32_paper.json",)),
}
DEFAULT_DOCS = ("README.md", "docs/performance.md")


def llama_summary(paths: list[Path]) -> str:
    """The Llama example's runs (``generate.py --out``): tokens/s and the decode step's bandwidth."""
    runs = [json.loads(p.read_text()) for p in paths if p.exists()]
    if not runs:
        return "_No committed run yet._"
    r0 = runs[0]
    c = r0["config"]
    lines = [
        f"{r0['device']}, torch {r0['torch']}, commit {r0['commit']}; Llama-3-8B shapes ({c['n_layers']} layers, dim "
        f"{c['dim']}, {c['n_heads']}/{c['n_kv_heads']} heads) with random weights, {r0['dtype']}, KV cache "
        f"{r0['kv_cache']} in pages of {r0['page_size']}, CUDA graphs {'on' if r0['cuda_graphs'] else 'off'}; "
        "one random prompt per row, greedy decoding. The decode step's bandwidth counts the weights and the KV "
        "cache it reads; the copy is an eager device copy measured in the same run.",
        "",
        "| B | prompt tokens | new tokens | prefill tokens/s | decode tokens/s | decode step ms | decode GB/s | "
        "of copy |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(f"| {r['B']} | {sum(r['prompt_lengths'])} | {sum(r['new_tokens'])} | "
                     f"{r['tokens_per_s_prefill']:,.0f} | {r['tokens_per_s_decode']:,.0f} | "
                     f"{r['decode_step_ms']:.2f} | {r['decode_gbps']:,.0f} | {r['decode_fraction_of_copy']:.0%} |")
    return "\n".join(lines)


def render(name: str, results: Path, root: Path) -> str:
    """The body of section ``name``: the table and its source files (paths relative to ``root``)."""
    module_name, files = SECTIONS[name]
    paths = [results / f for f in files]
    shown = [Path(os.path.relpath(p, root)).as_posix() for p in paths]
    if module_name is None:  # the Llama example writes one flat JSON per run
        names = ", ".join(f"`{s if i == 0 else Path(s).name}`" for i, s in enumerate(shown))
        return llama_summary(paths) + f"\n\nSource: {names}."
    if not paths[0].exists():
        return f"_No committed run yet (`{shown[0]}`)._"
    module = importlib.import_module(module_name)
    return module.markdown_summary(json.loads(paths[0].read_text())) + f"\n\nSource: `{shown[0]}`."


def regenerate(text: str, results: Path, root: Path) -> str:
    """``text`` with every marked section it contains rendered again."""
    for name in SECTIONS:
        pattern = re.compile(rf"(<!-- BEGIN {name} -->).*?(<!-- END {name} -->)", re.S)
        if pattern.search(text):
            body = render(name, results, root)
            text = pattern.sub(lambda m, body=body: m.group(1) + "\n" + body + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triformers report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", default="benchmarks/results", help="folder of the committed JSON")
    parser.add_argument("--docs", nargs="+", default=list(DEFAULT_DOCS),
                        help="documents whose marked sections are rewritten (missing ones are skipped)")
    parser.add_argument("--root", default=".", help="folder the 'Source:' paths are written relative to")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a document is stale")
    args = parser.parse_args(argv)
    results, root = Path(args.results), Path(args.root)
    if not results.is_dir():
        parser.error(f"results folder {str(results)!r} does not exist; pass the folder holding <gpu>/<family>.json")
    stale = []
    for doc in map(Path, args.docs):
        if not doc.exists():
            continue
        text = doc.read_text()
        new = regenerate(text, results, root)
        if new != text:
            stale.append(str(doc))
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print(f"stale performance tables in {', '.join(stale)}: run `triformers report`", file=sys.stderr)
        return 1
    for doc in stale:
        print(f"rewrote {doc}")
    return 0
