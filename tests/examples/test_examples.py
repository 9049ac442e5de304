"""The examples' --smoke presets, run as a user would: one subprocess each, on the CPU."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def _env():
    env = dict(os.environ)
    # run the library's torch paths, as on a CPU machine (Triton's interpreter is for testing kernels)
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"  # the suite runs one pytest worker per core
    return env


def _run(args, timeout=300):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    return proc, time.perf_counter() - start


def test_build_model_from_hydra_yaml():
    proc, _ = _run([EXAMPLES / "build_model" / "my_model.py", "--smoke"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "input (2, 64) -> output (2, 64, 32)" in proc.stdout
    for part in ("LocalAttention", "RandomAttention", "NystromAttention", "FavorAttention"):
        assert part in proc.stdout


def test_microgpt_smoke_learns_the_stdlib(tmp_path):
    metrics_file = tmp_path / "metrics.json"
    proc, _ = _run([EXAMPLES / "microGPT.py", "--smoke", "--metrics-json", metrics_file])
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(metrics_file.read_text())
    drop = (m["first_loss"] - m["last_loss"]) / m["first_loss"]
    assert drop >= 0.35, m
    assert "standard library" in proc.stdout
    assert "tok_s=" in proc.stderr  # the progress bar shows loss and tokens/s
    sample = proc.stdout.split("-" * 80)[1]
    assert sample.strip().startswith("def") and len(sample.strip()) > 60


def test_microgpt_trains_on_a_given_file(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    metrics_file = tmp_path / "metrics.json"
    proc, _ = _run([EXAMPLES / "microGPT.py", "--smoke", "--text", text, "--steps", "40", "--prompt", "the ",
                    "--metrics-json", metrics_file])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(text) in proc.stdout
    m = json.loads(metrics_file.read_text())
    assert m["last_loss"] < 0.6 * m["first_loss"]
    proc, _ = _run([EXAMPLES / "microGPT.py", "--smoke", "--text", tmp_path / "missing.txt"])
    assert proc.returncode != 0 and "no such file" in proc.stderr


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    sys.path.insert(0, str(EXAMPLES))
    try:
        from cifar_common import load_cifar10, write_fake_cifar10
    finally:
        sys.path.remove(str(EXAMPLES))
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar10(root, n_train=600, n_test=150)
    (xtr, ytr), (xte, yte) = load_cifar10(root)
    assert xtr.shape[1:] == (3, 32, 32) and xtr.dtype.is_floating_point is False
    assert len(xtr) == len(ytr) and len(xte) == len(yte) == 150
    return root


@pytest.mark.parametrize("script", ["cifar_ViT.py", "cifar_MetaFormer.py"])
def test_cifar_smoke_on_a_stand_in(script, fake_cifar):
    proc, _ = _run([EXAMPLES / script, "--smoke", "--data-dir", fake_cifar, "--epochs", "3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if "test accuracy" in ln)
    first, last = (float(v) for v in line.split(";")[0].replace("loss", "").split("->"))
    assert last < first


def test_cifar_without_data_says_how_to_get_it(tmp_path):
    proc, _ = _run([EXAMPLES / "cifar_ViT.py", "--smoke", "--data-dir", tmp_path])
    assert proc.returncode != 0
    assert "CIFAR-10 was not found" in proc.stderr and "torchvision" in proc.stderr and str(tmp_path) in proc.stderr
