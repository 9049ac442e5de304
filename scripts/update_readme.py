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
    "decode-h200": ("triformers.benchmarks.decode", "benchmarks/results/h200/decode.json"),
    "llama-h200": (None, "benchmarks/results/h200/llama_b1.json"),
    "context-parallel-h200": ("triformers.benchmarks.context_parallel",
                              "benchmarks/results/h200/context_parallel_single.json"),
    "fmha-h100": ("triformers.benchmarks.fmha", "benchmarks/results/h100/fmha.json"),
    "layers-h100": ("triformers.benchmarks.layers", "benchmarks/results/h100/layers.json"),
    "fmha-cpu": ("triformers.benchmarks.fmha_cpu", "benchmarks/results/cpu/fmha_cpu.json"),
}


def llama_summary(paths: list[Path]) -> str:
    """The Llama example's runs (``generate.py --out``): tokens/s and the decode step's bandwidth."""
    import json

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


def render(name: str) -> str:
    module_name, path = SECTIONS[name]
    if name == "llama-h200":
        paths = [ROOT / "benchmarks/results/h200/llama_b1.json", ROOT / "benchmarks/results/h200/llama_b64.json"]
        return llama_summary(paths) + "\n\nSource: `benchmarks/results/h200/llama_b1.json`, `llama_b64.json`."
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
