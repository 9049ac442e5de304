"""The attention benchmark's results, from its JSON: record labels, the acceptance ratios, the README table and
the plot (triformers.benchmarks.fmha re-exports them)."""

from __future__ import annotations

from pathlib import Path

from triformers.benchmarks._harness import geomean

PROVIDERS = ["triformers", "triformers_triton", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex", "eager"]


def _label(r: dict) -> str:
    extra = {"dense": "causal" if r["causal"] else "full", "varlen": f"{r.get('docs')} docs",
             "window": f"w={r.get('window')}", "bias": "bias", "gqa": f"Hkv={r.get('Hkv')}"}[r["case"]]
    return f"{r['case']} D={r['D']} N={r['N']} {extra}"


def _fmt(r: dict) -> str:
    res = f"{r['tflops']:7.1f} TFLOP/s ({r['ms']:.3f} ms)" if "tflops" in r else f"error: {r['error']}"
    return f"{_label(r):32s} {r['mode']:4s} {r['provider']:18s} {res}"


def _index(records):
    table = {}
    for r in records:
        if "tflops" in r:
            table[(_label(r), r["mode"], r["provider"])] = r["tflops"]
    return table


def acceptance(doc: dict) -> dict:
    recs = doc["records"]
    t = _index(recs)
    keys = sorted({(_label(r), r["mode"]) for r in recs})

    def ratios(case, mode, ours, theirs):
        out = []
        for label, m in keys:
            if m == mode and label.startswith(case + " "):
                a, b = t.get((label, m, ours)), t.get((label, m, theirs))
                if a and b:
                    out.append(a / b)
        return out

    res = {
        "dense fw triton/flash (geomean)": geomean(ratios("dense", "fw", "triformers_triton", "sdpa_flash")),
        "dense fw triton/cudnn (geomean)": geomean(ratios("dense", "fw", "triformers_triton", "sdpa_cudnn")),
        "dense fwbw triton/flash (geomean)": geomean(ratios("dense", "fwbw", "triformers_triton", "sdpa_flash")),
        "dense fwbw triton/cudnn (geomean)": geomean(ratios("dense", "fwbw", "triformers_triton", "sdpa_cudnn")),
    }
    for label, m in keys:
        if label.startswith("varlen") and m == "fwbw":
            a, b = t.get((label, m, "triformers_triton")), t.get((label, m, "flex"))
            res[f"{label} fwbw triton/flex"] = a / b if a and b else float("nan")
    worst = (float("inf"), None)
    for label, m in keys:
        ours = t.get((label, m, "triformers"))
        others = [v for (lab, mm, p), v in t.items() if lab == label and mm == m and p != "triformers"]
        if ours and others:
            worst = min(worst, (ours / max(others), f"{label} {m}"))
    res["auto / best other provider (minimum over records)"] = worst[0]
    res["auto worst record"] = worst[1]
    return res


def markdown_summary(doc: dict) -> str:
    """README table: TFLOP/s per record and provider, then the acceptance ratios."""
    recs = doc["records"]
    t = _index(recs)
    keys = []
    for r in recs:
        key = (_label(r), r["mode"])
        if key not in keys:
            keys.append(key)
    env = doc["env"]
    lines = [
        f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; bf16, TFLOP/s "
        "(higher is better; '-' = provider has no such support or errored, see the JSON).",
        "",
        "| case | mode | " + " | ".join(PROVIDERS) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in PROVIDERS) + " |",
    ]
    for label, mode in keys:
        cells = [f"{t[(label, mode, p)]:.0f}" if (label, mode, p) in t else "-" for p in PROVIDERS]
        lines.append(f"| {label} | {mode} | " + " | ".join(cells) + " |")
    lines += ["", "| ratio | value |", "| --- | ---: |"]
    for k, v in acceptance(doc).items():
        lines.append(f"| {k} | {v if isinstance(v, str) or v is None else f'{v:.2f}'} |")
    return "\n".join(lines)


def plot(doc: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = _index(doc["records"])
    keys = []
    for r in doc["records"]:
        key = (_label(r), r["mode"])
        if key not in keys:
            keys.append(key)
    fig, axes = plt.subplots(2, 1, figsize=(max(12, len(keys) * 0.6), 10))
    for ax, mode in zip(axes, ("fw", "fwbw")):
        labels = [lab for lab, m in keys if m == mode]
        width = 0.8 / len(PROVIDERS)
        for i, p in enumerate(PROVIDERS):
            vals = [t.get((lab, mode, p), 0.0) for lab in labels]
            ax.bar([x + i * width for x in range(len(labels))], vals, width, label=p)
        ax.set_xticks([x + 0.4 for x in range(len(labels))], labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{mode} — {doc['env']['gpu']}, bf16")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
