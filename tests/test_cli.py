"""`triformers bench`, `triformers plot` and `triformers report`."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from triformers import cli
from triformers.benchmarks import _plot, _report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _fake_benchmark(monkeypatch, module: str, **attrs) -> list:
    """Installs ``triformers.benchmarks.<module>`` recording the argv its main receives."""
    calls: list = []
    fake = types.ModuleType(f"triformers.benchmarks.{module}")
    fake.main = lambda argv: calls.append(list(argv)) or 0
    for k, v in attrs.items():
        setattr(fake, k, v)
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    return calls


@pytest.mark.parametrize("name", sorted(cli.BENCHMARKS))
def test_bench_out_is_a_folder_for_every_benchmark(monkeypatch, name):
    module, results_file = cli.BENCHMARKS[name]
    calls = _fake_benchmark(monkeypatch, module)
    assert cli.main(["bench", name, "--out", "some/dir", "--quick"]) == 0
    expected = "some/dir" if results_file is None else f"some/dir/{results_file}"
    assert calls == [["--out", expected, "--quick"]]


def test_bench_results_file_declared_by_the_module(monkeypatch):
    calls = _fake_benchmark(monkeypatch, "sparse", RESULTS_FILE="sparse.json")
    assert cli.main(["bench", "sparse", "--out=d", "--quick"]) == 0
    assert cli.main(["bench", "sparse", "--out", "x/explicit.json"]) == 0
    assert calls == [["--out=d/sparse.json", "--quick"], ["--out", "x/explicit.json"]]


def test_bench_unknown_and_missing(monkeypatch, capsys):
    assert cli.main(["bench", "nonsense"]) == 2
    assert "unknown benchmark 'nonsense'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "triformers.benchmarks.lra", None)  # import fails: module not installed
    assert cli.main(["bench", "lra", "--quick"]) == 2
    assert "not part of this installation" in capsys.readouterr().err


def test_bench_attention_runs_and_writes_json(tmp_path):
    argv = ["bench", "attention", "--out", str(tmp_path), "--attentions", "scaled_dot_product", "--seq-lens", "16",
            "--batch", "1", "--dim-model", "32", "--heads", "2", "--rep", "1", "--device", "cpu"]
    assert cli.main(argv) == 0
    doc = json.loads((tmp_path / "attention.json").read_text())
    assert doc["env"]["gpu"] == "cpu" and "commit" in doc["env"]
    assert {r["attention"] for r in doc["records"]} == {"scaled_dot_product"}


def test_plot_a_committed_json(tmp_path):
    """decode.json: two modes of cases, peers, ours and the copy ceiling."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig.png"
    assert cli.main(["plot", str(RESULTS / "h200" / "decode.json"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_records_without_provider():
    """Context parallelism's records carry one ``*_ms`` field per variant: each becomes a provider."""
    recs = [{"seq_len": 1024, "ring_fw_ms": 6.0, "compute_fw_ms": 5.0, "ranks": [{"ring_fw": [6.0]}]},
            {"seq_len": 4096, "ring_fw_ms": 50.0, "compute_fw_ms": 60.0, "ranks": []}]
    flat = _plot._flatten(recs)
    assert {(r["seq_len"], r["provider"], r["ms"]) for r in flat} == {
        (1024, "ring_fw", 6.0), (1024, "compute_fw", 5.0), (4096, "ring_fw", 50.0), (4096, "compute_fw", 60.0)}
    assert _plot._table(flat, "ms") == {"seq_len=1024": {"ring_fw": 6.0, "compute_fw": 5.0},
                                        "seq_len=4096": {"ring_fw": 50.0, "compute_fw": 60.0}}


def test_plot_ratio_to_the_best_peer():
    """The bottom panel's numbers: ours over the best peer, ceilings excluded, ms inverted."""
    recs = [
        {"case": "a", "provider": "triformers", "gbps": 300.0},
        {"case": "a", "provider": "triformers_splitk", "gbps": 900.0},  # ours too: never a peer
        {"case": "a", "provider": "sdpa", "gbps": 200.0},
        {"case": "a", "provider": "flex", "gbps": 250.0},
        {"case": "a", "provider": "copy", "gbps": 1000.0},  # a ceiling: never a peer
        {"case": "b", "provider": "triformers", "gbps": 100.0},
        {"case": "b", "provider": "sdpa", "error": "unsupported"},
    ]
    assert _plot.ratios(recs, _plot._metric(recs)) == {"a": pytest.approx(300.0 / 250.0)}
    ms = [{"n": 1, "provider": "triformers", "ms": 2.0}, {"n": 1, "provider": "eager", "ms": 3.0},
          {"n": 2, "provider": "triformers", "ms": 4.0}, {"n": 2, "provider": "eager", "ms": 2.0}]
    assert _plot.ratios(ms, "ms") == {"n=1": pytest.approx(1.5), "n=2": pytest.approx(0.5)}


def test_plot_rejects_a_file_without_records(tmp_path, capsys):
    bad = tmp_path / "llama.json"
    shutil.copy(RESULTS / "h200" / "llama_b1.json", bad)  # a flat run summary, not benchmark records
    with pytest.raises(SystemExit):
        cli.main(["plot", str(bad)])
    assert "no 'records' list" in capsys.readouterr().err


def _docs_copy(tmp_path) -> list[Path]:
    docs = []
    for name in _report.DEFAULT_DOCS:
        if (ROOT / name).exists():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            docs.append(Path(shutil.copy(ROOT / name, tmp_path / name)))
    return docs


def test_report_regenerates_the_committed_tables_identically(tmp_path, monkeypatch):
    docs = _docs_copy(tmp_path)
    before = [d.read_text() for d in docs]
    assert sum(t.count("<!-- BEGIN ") for t in before) == len(_report.SECTIONS)  # every table is somewhere
    monkeypatch.chdir(ROOT)
    assert cli.main(["report", "benchmarks/results", "--docs", *map(str, docs), "--check"]) == 0
    assert cli.main(["report", "benchmarks/results", "--docs", *map(str, docs)]) == 0
    assert [d.read_text() for d in docs] == before


def test_report_rewrites_a_stale_table(tmp_path, monkeypatch):
    docs = _docs_copy(tmp_path)
    target = next(d for d in docs if "<!-- BEGIN fmha-cpu -->" in d.read_text())
    fresh = target.read_text()
    start = fresh.index("<!-- BEGIN fmha-cpu -->") + len("<!-- BEGIN fmha-cpu -->")
    end = fresh.index("<!-- END fmha-cpu -->")
    target.write_text(fresh[:start] + "\n| typed by hand |\n" + fresh[end:])
    monkeypatch.chdir(ROOT)
    assert cli.main(["report", "benchmarks/results", "--docs", str(target), "--check"]) == 1
    assert target.read_text() != fresh
    assert cli.main(["report", "benchmarks/results", "--docs", str(target)]) == 0
    assert target.read_text() == fresh


def test_report_needs_the_results_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["report", str(tmp_path / "nowhere")])
    assert "does not exist" in capsys.readouterr().err
