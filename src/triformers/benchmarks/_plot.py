"""The standard figure of any benchmark JSON (``{"env": ..., "records": [...]}``).

    triformers plot RESULTS.json [--out FIGURE.png]

Top panel per mode: each case's providers side by side, in the record's throughput unit (TFLOP/s or GB/s, higher
is better) or in milliseconds when the records have no throughput (lower is better). A provider that is a
ceiling rather than a peer (``copy``: a device copy of the same bytes) is drawn as a black line over its case.
Bottom panel: our provider's ratio to the best peer (> 1: triformers is faster), with the parity line.
Records without a ``provider`` (e.g. context parallelism's ``ring_fw_ms`` / ``compute_fw_ms``) take each
``*_ms`` field as a provider.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

UNITS = {"tflops": "TFLOP/s", "gbps": "GB/s"}  # throughput fields, first found wins; else "ms"
CEILINGS = ("copy",)  # providers that bound the others rather than compete with them
OURS = "triformers"
# fields that describe a measurement rather than a case
_MEASUREMENTS = {"provider", "ms", "tflops", "gbps", "error", "mode", "graph"}


def _flatten(records: list[dict]) -> list[dict]:
    """Records with a ``provider`` as they are; the others split into one record per ``*_ms`` field."""
    out = []
    for r in records:
        if "provider" in r:
            out.append(r)
            continue
        case = {k: v for k, v in r.items() if not k.endswith("_ms") and not isinstance(v, (dict, list))}
        for k, v in r.items():
            if k.endswith("_ms") and isinstance(v, (int, float)):
                out.append({**case, "provider": k[: -len("_ms")], "ms": v})
    return out


def _metric(records: list[dict]) -> str:
    for key in UNITS:
        if any(key in r for r in records):
            return key
    return "ms"


def _case_keys(records: list[dict]) -> list[str]:
    """The case-describing fields whose value differs between records (in first-seen order)."""
    keys: dict[str, set] = {}
    for r in records:
        for k, v in r.items():
            if k in _MEASUREMENTS or k.startswith("ms_") or k.endswith("bytes") or isinstance(v, (dict, list, float)):
                continue
            keys.setdefault(k, set()).add(v)
    return [k for k, vals in keys.items() if len(vals) > 1]


def _label(r: dict, keys: list[str]) -> str:
    """``dense N=1024 D=64 causal``: strings as they are, flags by name when set, numbers as ``key=value``."""
    parts = []
    for k in keys:
        v = r.get(k)
        if isinstance(v, bool):
            parts += [k] if v else []
        elif v is not None:
            parts.append(str(v) if isinstance(v, str) else f"{k}={v}")
    return " ".join(parts)


def _ours(providers: list[str]) -> str | None:
    return OURS if OURS in providers else next((p for p in providers if p.startswith(OURS)), None)


def ratios(records: list[dict], metric: str) -> dict[str, float]:
    """Our provider's speed over the best peer's, per case label (> 1: ours is faster)."""
    table = _table(records, metric)
    out = {}
    for label, by in table.items():
        ours = _ours(list(by))
        peers = [v for p, v in by.items() if p != ours and not p.startswith(OURS) and p not in CEILINGS]
        if ours is None or not peers:
            continue
        if metric == "ms":
            out[label] = min(peers) / by[ours]
        else:
            out[label] = by[ours] / max(peers)
    return out


def _table(records: list[dict], metric: str) -> dict[str, dict[str, float]]:
    keys = _case_keys(records)
    table: dict[str, dict[str, float]] = {}
    for r in records:
        v = r.get(metric)
        if isinstance(v, (int, float)) and math.isfinite(v) and v > 0:
            table.setdefault(_label(r, keys), {})[r["provider"]] = float(v)
    return table


def plot(doc: dict, path: str | Path, title: str | None = None) -> Path:
    """Draws the standard figure of ``doc`` into ``path`` (PNG) and returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _flatten(doc.get("records", []))
    if not records:
        raise ValueError("the JSON has no records to plot: expected {'env': ..., 'records': [...]} from a benchmark")
    metric = _metric(records)
    modes = list(dict.fromkeys(r.get("mode") for r in records))
    n_cases = max(len(_table([r for r in records if r.get("mode") == m], metric)) for m in modes)
    fig, axes = plt.subplots(2 * len(modes), 1, figsize=(max(10, 0.45 * n_cases), 7.5 * len(modes)),
                             squeeze=False, gridspec_kw={"height_ratios": [3, 1] * len(modes)},
                             layout="constrained")
    env = doc.get("env", {})
    for i, mode in enumerate(modes):
        recs = [r for r in records if r.get("mode") == mode]
        table = _table(recs, metric)
        labels = list(table)
        providers = list(dict.fromkeys(p for by in table.values() for p in by))
        peers = [p for p in providers if p not in CEILINGS]
        ax, rax = axes[2 * i, 0], axes[2 * i + 1, 0]
        width = 0.8 / max(len(peers), 1)
        for j, p in enumerate(peers):
            xs = [x for x, lab in enumerate(labels) if p in table[lab]]
            ax.bar([x + (j - (len(peers) - 1) / 2) * width for x in xs], [table[labels[x]][p] for x in xs],
                   width, label=p)
        for p in providers:
            if p in CEILINGS:
                xs = [x for x, lab in enumerate(labels) if p in table[lab]]
                ax.hlines([table[labels[x]][p] for x in xs], [x - 0.45 for x in xs], [x + 0.45 for x in xs],
                          colors="black", linewidth=2, label=f"{p} (ceiling)")
        unit = UNITS.get(metric, "ms (lower is better)")
        ax.set_ylabel(unit)
        ax.set_xticks(range(len(labels)), [""] * len(labels))
        ax.set_title(title or f"{Path(str(path)).stem}{f' {mode}' if mode else ''} — {env.get('gpu', '?')}, "
                     f"commit {env.get('commit', '?')}")
        ax.legend(fontsize=7, ncol=4)
        r = ratios(recs, metric)
        rax.bar([x for x, lab in enumerate(labels) if lab in r], [r[lab] for lab in labels if lab in r],
                0.6, color="tab:blue")
        rax.axhline(1.0, color="black", linewidth=1)
        rax.set_ylabel(f"{_ours(providers) or OURS} / best peer")
        rax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triformers plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="a benchmark's results file")
    parser.add_argument("--out", help="PNG path (default: beside the JSON, same name)")
    parser.add_argument("--title", help="figure title (default: file name, mode, GPU and commit)")
    args = parser.parse_args(argv)
    src = Path(args.json)
    if not src.is_file():
        parser.error(f"no such results file: {str(src)!r}")
    try:
        doc = json.loads(src.read_text())
    except json.JSONDecodeError as e:
        parser.error(f"{str(src)!r} is not JSON ({e})")
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
        parser.error(f"{str(src)!r} has no 'records' list: plot reads the {{'env', 'records'}} JSON a benchmark "
                     "writes (`triformers bench NAME --out DIR`)")
    out = plot(doc, args.out or src.with_suffix(".png"), args.title)
    print(f"wrote {out}")
    return 0
