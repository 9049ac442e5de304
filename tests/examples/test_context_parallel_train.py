"""The context-parallel training example, run as a user would: one process, then two under torchrun (gloo on the
CPU); the loss of every step matches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "context_parallel_train.py"
# float32 training: the ring merges partial attentions in another order than one attention call, and Adam
# carries the differences (~1e-7 relative per step) through the 8 steps
LOSS_TOL = dict(atol=1e-5, rtol=1e-5)


def _run(args, metrics):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the library's torch paths, as on a CPU machine
    proc = subprocess.run([sys.executable, *map(str, args), "--smoke", "--metrics-json", str(metrics)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(metrics.read_text()), proc.stdout


def test_two_processes_train_like_one(tmp_path):
    single, _ = _run([EXAMPLE], tmp_path / "one.json")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", EXAMPLE]
    cp, out = _run(torchrun, tmp_path / "two.json")
    assert single["world"] == 1 and cp["world"] == 2
    assert "16 of 32 tokens each (ring, zigzag)" in out
    assert len(cp["losses"]) == len(single["losses"]) == 8
    torch.testing.assert_close(torch.tensor(cp["losses"]), torch.tensor(single["losses"]), **LOSS_TOL)
    assert single["losses"][-1] < 0.95 * single["losses"][0]  # it learns
