"""Registries: decorators, builders from dicts, error messages, and the seed's extension workflow
(a newly registered attention is picked up by the generic tests and the benchmark with no other change)."""

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from triformers.components import (
    ATTENTION_REGISTRY,
    FEEDFORWARD_REGISTRY,
    POSITION_EMBEDDING_REGISTRY,
    build_attention,
    build_feedforward,
    build_positional_embedding,
)
from triformers.components._registry import get_registry_decorator
from triformers.components.attention import Attention, AttentionConfig

REPO = Path(__file__).resolve().parents[2]


@dataclass
class _Cfg(AttentionConfig):
    window: int | None


def _local_registry():
    registry, names = {}, set()
    return registry, get_registry_decorator(registry, names, Attention, AttentionConfig)


def test_register_and_build_from_a_dict():
    registry, register = _local_registry()

    @register("toy", _Cfg)
    class Toy(Attention):
        def __init__(self, dropout=0.0, window=3, *args, **kwargs):
            super().__init__()
            self.window, self.extra = window, kwargs

        def forward(self, q, k, v, *args, **kwargs):
            return q

    assert registry["toy"].constructor is Toy and registry["toy"].config is _Cfg
    from triformers.components._registry import build_from_registry

    built = build_from_registry({"name": "toy", "dropout": 0.1, "unrelated": 5}, registry, "attention")
    assert built.window == 3  # missing field -> the constructor default
    assert "unrelated" not in built.extra  # fields the config does not declare are dropped
    assert build_from_registry({"name": "toy", "window": 9}, registry, "attention").window == 9


def test_duplicates_and_non_subclasses_are_rejected():
    registry, register = _local_registry()

    @register("a", _Cfg)
    class A(Attention):
        def forward(self, q, k, v, *args, **kwargs):
            return q

    with pytest.raises(ValueError, match="duplicate.*'a'"):
        register("a", _Cfg)(type("B", (A,), {}))
    with pytest.raises(ValueError, match="must extend the base class"):
        register("c", _Cfg)(type("C", (), {}))
    with pytest.raises(ValueError, match="already registered under another name"):
        register("d", _Cfg)(type("A", (A,), {}))
    with pytest.raises(ValueError, match="not a dataclass"):
        register("e", dict)


def test_unknown_names_list_the_registry():
    with pytest.raises(KeyError, match="scaled_dot_product"):
        build_attention({"name": "no_such_attention", "dropout": 0.0})
    with pytest.raises(KeyError, match="MLP"):
        build_feedforward({"name": "no_such_ff"})
    with pytest.raises(KeyError, match="vocab"):
        build_positional_embedding({"name": "no_such_pe"})


def test_registries_hold_the_zoo():
    assert len(ATTENTION_REGISTRY) >= 14
    assert {"MLP", "FusedMLP", "Conv2DFeedforward", "MixtureOfExperts"} <= set(FEEDFORWARD_REGISTRY)
    assert {"sine", "vocab", "learnable"} <= set(POSITION_EMBEDDING_REGISTRY)


PLUGIN = textwrap.dedent(
    '''
    """An out-of-tree attention registered exactly as the seed document shows, plus a broken one."""
    from dataclasses import dataclass
    from typing import Optional

    from triformers.components.attention import Attention, AttentionConfig, register_attention
    from triformers.components.attention.core import scaled_dot_product_attention


    @dataclass
    class MyWindowAttentionConfig(AttentionConfig):
        causal: Optional[bool]


    @register_attention("my_window_attention", MyWindowAttentionConfig)
    class MyWindowAttention(Attention):
        def __init__(self, dropout: float, causal: bool = False, *args, **kwargs):
            super().__init__()
            self.causal = causal

        def forward(self, q, k, v, att_mask=None, *args, **kwargs):
            return scaled_dot_product_attention(q, k, v, att_mask=att_mask, causal=self.causal)


    @register_attention("my_leaky_attention", MyWindowAttentionConfig)
    class MyLeakyAttention(MyWindowAttention):
        """Claims causality but looks ahead: the generic tests must catch it."""

        def forward(self, q, k, v, att_mask=None, *args, **kwargs):
            return scaled_dot_product_attention(q, k, v, att_mask=att_mask)
    '''
)


def _env(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env["OMP_NUM_THREADS"] = "1"  # the suite runs one worker per core
    return env


def test_a_new_attention_joins_the_generic_tests_and_the_benchmark(tmp_path):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    report = tmp_path / "report.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "my_plugin", "-q", "-p", "no:cacheprovider",
         str(REPO / "tests/components/test_attentions.py"), "-k", "my_window_attention or my_leaky_attention",
         f"--junitxml={report}"],
        cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    cases = {c.get("name"): c for c in ET.parse(report).getroot().iter("testcase")}
    good = {n: c for n, c in cases.items() if "my_window_attention" in n}
    leaky = {n: c for n, c in cases.items() if "my_leaky_attention" in n}
    assert len(good) >= 8, proc.stdout[-2000:]
    failed = lambda c: c.find("failure") is not None or c.find("error") is not None  # noqa: E731
    assert not any(failed(c) for c in good.values()), proc.stdout[-4000:]
    assert failed(leaky["test_no_look_ahead[my_leaky_attention]"])
    assert proc.returncode == 1  # only the leaky attention failed

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-c", "import my_plugin, sys; from triformers.benchmarks.attention import main; "
         f"sys.exit(main(['--seq-lens', '16', '--dim-model', '24', '--heads', '3', '--rep', '5', '--out', '{out}']))"],
        cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads(out.read_text())["records"]
    names = {r["attention"] for r in records}
    assert {"my_window_attention", "scaled_dot_product"} <= names
    mine = next(r for r in records if r["attention"] == "my_window_attention")
    assert "error" not in mine and mine["fw_ms"] > 0 and mine["fwbw_ms"] > 0 and mine["fwbw_peak_mb"] > 0
