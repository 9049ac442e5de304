"""The fused-layer benchmark's results, from its JSON: the acceptance geomeans against their targets, the README
table and the plot (triformers.benchmarks.layers re-exports them)."""

from __future__ import annotations

import math
from pathlib import Path

from triformers.benchmarks._harness import geomean

PROVIDERS = ["triformers", "torch_eager", "torch_compile", "liger"]


MEMORY_OPS = ["rmsnorm", "layernorm", "softmax", "silu_mul", "dropout_bias_act"]


GEMM_OPS = ["swiglu_mlp", "fused_linear_gelu"]


def _bytes(op: str, M: int, N: int, mode: str, s: int = 2) -> int:
    """Fewest bytes the op moves (element size s): reads + writes of [M, N] tensors, plus parameters."""
    fw = {
        "rmsnorm": 2 * M * N + N,
        "layernorm": 2 * M * N + 2 * N,
        "softmax": 2 * M * N,
        "silu_mul": 3 * M * N,
        "dropout_bias_act": 2 * M * N + N,
    }[op]
    # backward: read x (or y) and dy, write dx (+ the second input's gradient for silu_mul), parameters
    bw = {
        "rmsnorm": 3 * M * N + 2 * N,
        "layernorm": 3 * M * N + 3 * N,
        "softmax": 3 * M * N,
        "silu_mul": 5 * M * N,
        "dropout_bias_act": 3 * M * N + 2 * N,
    }[op]
    return s * (fw if mode == "fw" else fw + bw)


def summary(doc: dict) -> dict:
    """Geometric means of triformers' speed-ups (peer ms / triformers ms) over the records both have."""
    recs = [r for r in doc["records"] if "ms" in r]
    ms = {(r["op"], r["N"], r["mode"], r["provider"]): r["ms"] for r in recs}

    def ratios(peer, mode=None):
        return [
            ms[k[:3] + (peer,)] / v
            for k, v in ms.items()
            if k[3] == "triformers" and (mode is None or k[2] == mode) and k[:3] + (peer,) in ms
        ]

    env = doc["env"]
    peak = env.get("copy_gbps")
    same = {int(k): v for k, v in env.get("copy_gbps_at_bytes", {}).items()}
    mem_fw = [r for r in recs if r["provider"] == "triformers" and r["mode"] == "fw" and "gbps" in r]

    def copy_at(r):  # the copy moving as many bytes as this forward (the peak copy for older runs)
        return same.get(_bytes(r["op"], r["M"], r["N"], "fw"), peak)

    fractions = {f"{r['op']}@{r['N']}": r["gbps"] / copy_at(r) for r in mem_fw} if peak else {}
    of_peak = {f"{r['op']}@{r['N']}": r["gbps"] / peak for r in mem_fw} if peak else {}
    return {
        "fw_vs_torch_compile": geomean(ratios("torch_compile", "fw")),
        "fwbw_vs_torch_compile": geomean(ratios("torch_compile", "fwbw")),
        "fwbw_vs_liger": geomean(ratios("liger", "fwbw")),
        "all_vs_torch_eager": geomean(ratios("torch_eager")),
        "memory_fw_min_fraction_of_copy": min(fractions.values()) if fractions else float("nan"),
        "memory_fw_min_fraction_of_peak_copy": min(of_peak.values()) if of_peak else float("nan"),
        "memory_fw_fraction_of_copy": fractions,
    }


TARGETS = {
    "fw_vs_torch_compile": 0.95,
    "fwbw_vs_torch_compile": 1.0,
    "fwbw_vs_liger": 1.1,
    "all_vs_torch_eager": 1.5,
    "memory_fw_min_fraction_of_copy": 0.85,
}


# reported beside the targets (the 2 GiB copy as the reference instead of the same-size copy)
REPORTED = {"memory_fw_min_fraction_of_peak_copy": "memory-bound fw, lowest fraction of the 2 GiB copy"}


def markdown_summary(doc: dict) -> str:
    """The README table: ms per provider for every case, triformers' throughput, and the acceptance ratios."""
    env = doc["env"]
    rows = {}
    for r in doc["records"]:
        key = (r["op"], r["N"], r["mode"])
        rows.setdefault(key, {})[r["provider"]] = r
    lines = [
        f"{env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}, "
        f"commit {env.get('commit')}; "
        f"bf16; copy bandwidth {env.get('copy_gbps', float('nan')):.0f} GB/s (2 GiB copied). Times in ms (lower "
        "is better). A memory-bound forward's fraction is of the bandwidth of a copy moving as many bytes "
        "(read + write) as it, timed the same way; the fraction of the 2 GiB copy's is in parentheses.",
        "",
        "| op | N | mode | triformers | torch eager | torch.compile | Liger | triformers throughput |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary_fracs = summary(doc)["memory_fw_fraction_of_copy"]
    for (op, N, mode), by in rows.items():
        cells = [f"{by[p]['ms']:.3f}" if p in by and "ms" in by[p] else "–" for p in PROVIDERS]
        t = by.get("triformers", {})
        if "gbps" in t and mode == "fw":
            frac = summary_fracs.get(f"{op}@{N}", float("nan"))
            peak = t["gbps"] / env["copy_gbps"] if env.get("copy_gbps") else float("nan")
            thr = f"{t['gbps']:.0f} GB/s, {100 * frac:.0f} % of copy ({100 * peak:.0f} %)"
        elif "gbps" in t:
            thr = f"{t['gbps']:.0f} GB/s"
        else:
            thr = f"{t['tflops']:.0f} TFLOP/s" if "tflops" in t else "–"
        lines.append(f"| {op} | {N} | {mode} | " + " | ".join(cells) + f" | {thr} |")
    s = summary(doc)
    lines += ["", "| geometric mean of triformers' speed-up | measured | target |", "| --- | --- | --- |"]
    for k, target in TARGETS.items():
        lines.append(f"| {k.replace('_', ' ')} | {s[k]:.2f} | ≥ {target} |")
    for k, label in REPORTED.items():
        lines.append(f"| {label} | {s[k]:.2f} | – |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: str | Path) -> None:
    """Speed-up over torch eager per case and provider, fw and fwbw panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = {(r["op"], r["N"], r["mode"], r["provider"]): r["ms"] for r in doc["records"] if "ms" in r}
    fig, axes = plt.subplots(2, 1, figsize=(14, 8), sharey=False)
    for ax, mode in zip(axes, ("fw", "fwbw")):
        cases = sorted({(k[0], k[1]) for k in ms if k[2] == mode}, key=lambda c: (c[0] in GEMM_OPS, c))
        width = 0.8 / len(PROVIDERS)
        for i, p in enumerate(PROVIDERS):
            vals = [
                ms.get((op, N, mode, "torch_eager"), math.nan) / ms.get((op, N, mode, p), math.nan) for op, N in cases
            ]
            ax.bar([j + i * width for j in range(len(cases))], vals, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([f"{op}\nN={N}" for op, N in cases], fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.set_ylabel(f"{mode}: speed-up over torch eager")
        ax.legend(fontsize=8, ncol=4)
    env = doc["env"]
    fig.suptitle(f"Fused layers, bf16, {env.get('gpu')} (torch {env.get('torch')}, commit {env.get('commit')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
