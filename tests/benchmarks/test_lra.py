"""The LRA benchmark: generated tasks are right, the quick preset learns, the CLI writes its JSON and plot."""

import dataclasses
import json
import math
import pickle
import sys

import numpy as np
import pytest
import torch

from triformers.benchmarks import lra
from triformers.benchmarks.lra import data as lra_data
from triformers.benchmarks.lra.model import LRAClassifier
from triformers.benchmarks.lra.run import PRESETS, load_task, train_one


def _evaluate(tokens: list[str]) -> int:
    """An independent ListOps evaluator over the text form (a stack machine)."""
    ops = {"[MIN": min, "[MAX": max, "[MED": lambda v: int(np.median(v)), "[SM": lambda v: sum(v) % 10}
    stack: list = []
    for tok in tokens:
        if tok in ops:
            stack.append([tok])
        elif tok == "]":
            op, *args = stack.pop()
            value = ops[op](args)
            if not stack:
                return value
            stack[-1].append(value)
        else:
            stack[-1].append(int(tok))
    raise AssertionError("unbalanced expression")


def test_listops_labels_and_lengths():
    cfg = lra_data.ListOpsConfig(max_depth=4, max_args=5, min_length=20, max_length=90)
    split = lra_data.listops(300, 97, cfg, seed=3)
    lengths = (split.ids != 0).sum(1)
    assert int(lengths.min()) >= 20 and int(lengths.max()) <= 90
    assert bool((split.ids[torch.arange(300), lengths - 1] == lra_data.LISTOPS_VOCAB.index("]")).all())
    for row in range(300):
        assert _evaluate(lra_data.listops_text(split.ids[row]).split()) == int(split.labels[row])
    assert len(set(split.labels.tolist())) == 10
    again = lra_data.listops(300, 97, cfg, seed=3)
    assert torch.equal(again.ids, split.ids)  # seeded


def test_pathfinder_images():
    cfg = lra_data.PathfinderConfig(size=20, path_length=12, distractors=1)
    split = lra_data.pathfinder(257, cfg, seed=0)  # two chunks
    assert split.ids.shape == (257, 400)
    assert int(split.ids.min()) >= 1 and int(split.ids.max()) == 256  # pixel + 1; the dots are white
    assert abs(float(split.labels.float().mean()) - 0.5) < 0.05
    images = (split.ids - 1).reshape(-1, 20, 20)
    assert bool(((images == 255).flatten(1).sum(1) >= 2).all())  # two 3x3 dots, clipped at the borders at most
    assert not torch.equal(images[0], images[1])


@pytest.mark.parametrize("size, path_length, distractors", [(32, 22, 2), (20, 12, 1), (16, 10, 1)])
def test_pathfinder_labels_are_the_pixels_connectivity(size, path_length, distractors):
    """With solid paths, an image is positive exactly when its two dots lie in one 8-connected component of
    drawn pixels (an independent reading of the label from the pixels: crossings or touches that join the dots
    of a negative would make it unreadable)."""
    from scipy import ndimage

    cfg = lra_data.PathfinderConfig(size=size, path_length=path_length, distractors=distractors, gap=0)
    split = lra_data.pathfinder(300, cfg, seed=1)
    images = (split.ids - 1).reshape(-1, size, size).numpy()
    joined = []
    for image in images:
        parts, _ = ndimage.label(image > 0, structure=np.ones((3, 3)))
        joined.append(len(set(parts[image == 255].tolist())) == 1)
    assert joined == [bool(v) for v in split.labels.tolist()]


def test_cifar10_from_pickle_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [1, 7, 3]}
        with open(root / name, "wb") as f:
            pickle.dump(batches[name], f)
    test = lra_data.cifar10(tmp_path, "test")
    rgb = batches["test_batch"][b"data"].astype(np.float64).reshape(3, 3, 1024)
    gray = np.rint(0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])
    assert torch.equal(test.ids, torch.from_numpy(gray.astype(np.int64) + 1))
    assert test.labels.tolist() == [1, 7, 3]
    assert len(lra_data.cifar10(tmp_path, "train")) == 15
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        lra_data.cifar10(tmp_path / "missing", "train")


def test_text_and_retrieval_from_files(tmp_path):
    for split, label, text in (("train", "pos", "great film"), ("train", "neg", "dull"), ("test", "pos", "é")):
        folder = tmp_path / "aclImdb" / split / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "0_1.txt").write_text(text, encoding="utf-8")
    train = lra_data.imdb(tmp_path, "train", seq_len=6)
    assert sorted(train.labels.tolist()) == [0, 1]
    row = train.ids[train.labels.tolist().index(1)]
    assert row.tolist() == [b + 1 for b in b"great "]  # truncated to 6 bytes
    assert lra_data.imdb(tmp_path, "test", seq_len=4).ids[0].tolist() == [0xC3 + 1, 0xA9 + 1, 0, 0]
    (tmp_path / "new_aan_pairs.train.tsv").write_text("1\ta\tb\tdoc one\tdoc two\n0.0\tc\td\tx\ty\n")
    pairs = lra_data.aan(tmp_path, "train", seq_len=5)
    assert pairs.labels.tolist() == [1, 0] and pairs.ids2[0].tolist() == [b + 1 for b in b"doc t"]


@pytest.mark.parametrize("attention", ["dense", "blocksparse", "nystrom", "linformer", "favor"])
def test_model_runs_every_attention(attention):
    model = LRAClassifier(attention, vocab=16, seq_len=64, num_classes=10, dim=16, heads=2, layers=1, dim_mlp=32,
                          block_size=16)  # fmt: skip
    ids = torch.randint(1, 16, (3, 64))
    ids[0, 40:] = 0  # padding
    logits = model(ids)
    assert logits.shape == (3, 10) and bool(torch.isfinite(logits).all())
    logits.sum().backward()
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    assert model.embed.weight.grad[1:].abs().sum() > 0


@pytest.mark.parametrize("attention, masks", [("dense", True), ("nystrom", True), ("blocksparse", False),
                                               ("linformer", False)])  # fmt: skip
def test_padding_keys_are_masked_where_the_attention_can(attention, masks):
    # what padding positions hold (their position embeddings) reaches the non-padding outputs only through
    # attention to padding keys: masked, the logits do not move when it changes
    torch.manual_seed(0)
    model = LRAClassifier(attention, vocab=16, seq_len=64, num_classes=10, dim=16, heads=2, layers=2, dim_mlp=32,
                          block_size=16).double()  # fmt: skip
    assert model.masks_padding is masks
    ids = torch.randint(1, 16, (2, 64))
    ids[0, 37:] = 0
    ids[1, 50:] = 0
    before = model(ids)
    with torch.no_grad():
        model.pos[50:] += torch.randn(14, 16, dtype=torch.float64)  # padding in both sequences
    moved = (model(ids) - before).abs().max().item()
    if masks:
        assert moved < 1e-10, moved
    else:
        assert moved > 1e-4, moved


def test_dual_model_for_retrieval():
    model = LRAClassifier("dense", vocab=257, seq_len=32, num_classes=2, dim=16, heads=2, layers=1, dual=True)
    a, b = torch.randint(1, 257, (2, 4, 32))
    assert model(a, b).shape == (4, 2)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `--quick` runs: a 32-wide model is faster on one thread
    yield
    torch.set_num_threads(threads)


def test_quick_preset_dense_learns_listops(one_thread):
    spec = PRESETS["quick"]["listops"]
    train, test = load_task(spec, None, seed=0)
    record = train_one(spec, "dense", train, test, torch.device("cpu"), bf16=False, seed=0, progress=False)
    assert record["majority_class"] < 0.3  # 10 classes, none dominant
    assert record["accuracy"] > record["majority_class"] + 0.3, record


def test_cli_writes_json_and_plot(tmp_path, capsys):
    small = dataclasses.replace(PRESETS["quick"]["listops"], steps=3, n_train=64, n_test=32)
    PRESETS["quick"]["tiny"] = small
    try:
        assert lra.main(["--quick", "--tasks", "tiny", "--attentions", "dense,linformer", "--out", str(tmp_path),
                         "--no-progress"]) == 0  # fmt: skip
    finally:
        del PRESETS["quick"]["tiny"]
    doc = json.loads((tmp_path / "lra.json").read_text())
    assert doc["env"]["preset"] == "quick" and "not the paper's" in doc["env"]["schedule"]
    assert [(r["task"], r["attention"], r["steps"]) for r in doc["records"]] == [
        ("listops", "dense", 3),
        ("listops", "linformer", 3),
    ]
    assert all(0 <= r["accuracy"] <= 1 and r["tokens_per_s"] > 0 for r in doc["records"])
    assert (tmp_path / "lra.png").stat().st_size > 0
    with pytest.raises(ValueError, match="not in preset"):
        lra.main(["--quick", "--tasks", "image", "--out", str(tmp_path)])


class _Clock:
    """A clock that jumps past any deadline after ``ticks`` readings (one per step with a checkpoint)."""

    def __init__(self, ticks: int) -> None:
        self.ticks = ticks

    def __call__(self) -> float:
        self.ticks -= 1
        return 0.0 if self.ticks >= 0 else 1e9


def _quick_task(name: str, **sizes):
    """``(spec, (train, test))`` of a quick-preset task at smaller ``sizes`` (steps, n_train, n_test, ...)."""
    spec = dataclasses.replace(PRESETS["quick"][name], **sizes)
    return spec, load_task(spec, None, seed=0)


def _train_cpu(spec, data, attention="dense", **kwargs):
    """``train_one`` on the CPU in float32, seed 0, no progress bar."""
    return train_one(spec, attention, *data, torch.device("cpu"), False, 0, False, **kwargs)


def test_training_stopped_at_a_deadline_resumes_to_the_same_model(tmp_path, monkeypatch, one_thread):
    lra_run = sys.modules["triformers.benchmarks.lra.run"]  # the package's `run` is the function

    spec, data = _quick_task("listops", steps=24, n_train=256, n_test=64)
    whole = _train_cpu(spec, data, checkpoint=tmp_path / "whole.pt")
    monkeypatch.setattr(lra_run, "_now", _Clock(ticks=9))  # 10 steps (one reading after each), then late
    cut = tmp_path / "cut.pt"
    assert _train_cpu(spec, data, checkpoint=cut, deadline=1.0) is None
    assert torch.load(cut, weights_only=False)["state"]["step"] == 10
    monkeypatch.setattr(lra_run, "_now", _Clock(ticks=10**6))
    resumed = _train_cpu(spec, data, checkpoint=cut, deadline=1.0, checkpoint_every=7)
    a, b = (torch.load(p, weights_only=False) for p in (tmp_path / "whole.pt", cut))
    assert a["state"]["step"] == b["state"]["step"] == 24
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert (resumed["accuracy"], resumed["final_loss"]) == (whole["accuracy"], whole["final_loss"])
    assert (whole["jobs"], resumed["jobs"]) == (1, 2)
    with pytest.raises(ValueError, match="checkpoint .* is of .*'attention': 'dense'"):
        _train_cpu(spec, data, "linformer", checkpoint=cut)
    with pytest.raises(ValueError, match="checkpoint .* is of .*'lr': 0.001.*not .*'lr': 0.0005"):
        _train_cpu(dataclasses.replace(spec, lr=5e-4), data, checkpoint=cut)


def test_pathfinder_checkpoint_of_other_images_is_refused(tmp_path, monkeypatch, one_thread):
    lra_run = sys.modules["triformers.benchmarks.lra.run"]
    spec, data = _quick_task("pathfinder16", steps=2, n_train=64, n_test=16)
    checkpoint = tmp_path / "pf.pt"
    record = _train_cpu(spec, data, checkpoint=checkpoint)
    assert record["data_version"] == lra_data.PATHFINDER_VERSION
    monkeypatch.setattr(lra_run.lra_data, "PATHFINDER_VERSION", lra_data.PATHFINDER_VERSION + 1)
    with pytest.raises(ValueError, match="checkpoint .* is of .*'data_version'"):
        _train_cpu(spec, data, checkpoint=checkpoint)


def test_retime_measures_again_from_and_back_to_the_trained_model(tmp_path, monkeypatch, one_thread):
    lra_run = sys.modules["triformers.benchmarks.lra.run"]
    spec, data = _quick_task("listops", steps=12, n_train=128, n_test=32)
    checkpoint = tmp_path / "r.pt"
    first = _train_cpu(spec, data, checkpoint=checkpoint)
    saved = torch.load(checkpoint, weights_only=False)["model"]
    seen, moved, calls = {}, [], []
    real_evaluate, real_retime = lra_run.evaluate, lra_run._retime

    def evaluate(model, *args):
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        return real_evaluate(model, *args)

    def retime(model, opt, train_step, steps, lr, sync):
        def counted(step, lr):
            calls.append(step)
            out = train_step(step, lr)
            moved.append(any(not torch.equal(v, saved[k]) for k, v in model.state_dict().items()))
            return out

        return real_retime(model, opt, counted, steps, lr, sync)

    monkeypatch.setattr(lra_run, "evaluate", evaluate)
    monkeypatch.setattr(lra_run, "_retime", retime)
    again = _train_cpu(spec, data, checkpoint=checkpoint, retime=5)
    assert calls == [0, 1, 2, 3, 4] and all(moved)  # the timed steps train ...
    for name, value in saved.items():  # ... and the evaluated model is the trained one again
        assert torch.equal(seen[name], value), name
    assert (again["accuracy"], again["final_loss"]) == (first["accuracy"], first["final_loss"])
    assert again["retimed_steps"] == 5 and again["tokens_per_s_training"] == first["tokens_per_s"]
    assert again["tokens_per_s"] > 0 and "retimed_steps" not in first
    with pytest.raises(ValueError, match="retime=1: pass between 2 and the task's 12 steps"):
        _train_cpu(spec, data, checkpoint=checkpoint, retime=1)


def test_learning_rate_schedules():
    lra_run = sys.modules["triformers.benchmarks.lra.run"]
    spec = dataclasses.replace(PRESETS["quick"]["listops"], steps=10, lr=1.0, warmup=2, decay="linear")
    got = [lra_run._lr(step, spec) for step in range(10)]
    want = [0.5, 1.0] + [1 - k / 8 for k in range(8)]  # warm-up, then linear from 1 towards 0 over 8 steps
    assert got == pytest.approx(want)
    cosine = dataclasses.replace(spec, decay="cosine", warmup=None)  # warm-up: a tenth of the steps
    want = [1.0, 1.0, 0.5 * (1 + math.cos(math.pi * 4 / 9))]
    assert [lra_run._lr(s, cosine) for s in (0, 1, 5)] == pytest.approx(want)
    with pytest.raises(ValueError, match="decay"):
        dataclasses.replace(spec, decay="step")


def test_cli_time_limit_stops_and_the_same_command_goes_on(tmp_path, monkeypatch, capsys):
    lra_run = sys.modules["triformers.benchmarks.lra.run"]  # the package's `run` is the function

    PRESETS["quick"]["tiny"] = dataclasses.replace(PRESETS["quick"]["listops"], steps=4, n_train=64, n_test=32)
    argv = ["--quick", "--tasks", "tiny", "--attentions", "dense,linformer", "--out", str(tmp_path), "--no-progress",
            "--checkpoint-dir", str(tmp_path / "ck"), "--time-limit", "10"]  # fmt: skip
    try:
        with pytest.raises(SystemExit):
            lra.main([*argv[:-4], "--time-limit", "10"])
        monkeypatch.setattr(lra_run, "_now", _Clock(ticks=1 + 3 + 2))  # deadline; dense's 3 checks; 2 more
        assert lra.main(argv) == 3
        assert [r["attention"] for r in json.loads((tmp_path / "lra.json").read_text())["records"]] == ["dense"]
        monkeypatch.setattr(lra_run, "_now", _Clock(ticks=10**6))
        assert lra.main(argv) == 0
    finally:
        del PRESETS["quick"]["tiny"]
    records = json.loads((tmp_path / "lra.json").read_text())["records"]
    assert [(r["attention"], r["jobs"]) for r in records] == [("dense", 1), ("linformer", 2)]


def test_compiled_training_matches_eager(one_thread):
    # torch.compile with the aot_eager backend traces the model (attention included) into one graph and runs it
    # with the same kernels: the same losses and accuracy as eager
    spec = dataclasses.replace(PRESETS["quick"]["listops"], steps=6, n_train=128, n_test=64)
    train, test = load_task(spec, None, seed=0)
    cpu = torch.device("cpu")
    eager = train_one(spec, "dense", train, test, cpu, False, 0, False)
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = train_one(spec, "dense", train, test, cpu, False, 0, False, compile_backend="aot_eager")
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # one graph, no break
    assert compiled["compile"] == "aot_eager" and eager["compile"] is None
    assert compiled["accuracy"] == eager["accuracy"]
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], rel=1e-5)


def test_tasks_without_padding_are_not_masked():
    """Pathfinder has no padding token, so its all-true mask is left out (same logits, less work) and its
    records say the task has no padding."""
    spec = PRESETS["quick"]["pathfinder16"]
    train, _ = load_task(spec, None, 0)
    assert not spec.padded and bool((train.ids != 0).all())
    models = []
    for mask_padding in (True, False):
        torch.manual_seed(0)
        models.append(LRAClassifier("dense", vocab=257, seq_len=256, num_classes=2, dim=16, heads=2, layers=1,
                                    mask_padding=mask_padding).double())  # fmt: skip
    assert models[0].masks_padding and not models[1].masks_padding
    torch.testing.assert_close(models[0](train.ids[:4]), models[1](train.ids[:4]))
    assert PRESETS["quick"]["listops"].padded and not PRESETS["gpu"]["image"].padded
    record = {"task": spec.name, "attention": "dense", "masks_padding": None, "steps": 1, "accuracy": 0.5,
              "majority_class": 0.5, "tokens_per_s": None, "peak_memory_mb": None}  # fmt: skip
    assert "| pathfinder16 | dense | no padding |" in lra.markdown_summary({"env": {}, "records": [record]})
    assert "--retime" not in lra.markdown_summary({"env": {}, "records": [record]})
    retimed = {**record, "tokens_per_s": 2000.0, "tokens_per_s_training": 1500.0, "retimed_steps": 300}
    table = lra.markdown_summary({"env": {}, "records": [retimed]})
    assert "over 300 steps (`--retime`)" in table and "| 0.500 | 0.500 | 2,000 | 1,500 | 0 |" in table
    assert table.splitlines()[2].count("|") == table.splitlines()[3].count("|") == table.splitlines()[4].count("|")
