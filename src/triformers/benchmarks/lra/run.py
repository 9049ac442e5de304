"""Training and evaluation of the LRA tasks per attention, the presets, the JSON and the plot.

Each (task, attention) run trains :class:`~.model.LRAClassifier` for the preset's steps (AdamW, linear warm-up
then cosine decay, bf16 autocast on CUDA with ``--bf16``), then measures accuracy on the test split. Records
hold accuracy, the test split's majority-class rate (the accuracy of always answering the commonest label),
training tokens/s (after the first step, which compiles kernels), peak CUDA memory, steps and sizes.

The presets ``quick``, ``cpu`` and ``gpu`` are short schedules, not the paper's (LRA trains ListOps 5000 steps at
batch 32, Pathfinder 62400 steps at batch 256): their accuracies compare attentions under one budget; the JSON
says so in ``env.schedule``. ``paper`` has LRA's schedules and data sizes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from triformers.benchmarks.lra import data as lra_data
from triformers.benchmarks.lra.model import LRAClassifier


@dataclass(frozen=True)
class TaskSpec:
    """One task at one size: data, model and schedule."""

    name: str
    seq_len: int
    num_classes: int
    vocab: int
    n_train: int
    n_test: int
    steps: int
    batch: int
    lr: float = 1e-3
    warmup: int | None = None  # linear warm-up steps (None: a tenth of the steps)
    decay: str = "cosine"  # after the warm-up: "cosine" or "linear" to 0
    dim: int = 64
    heads: int = 2
    layers: int = 2
    dim_mlp: int = 128
    block_size: int = 32
    dual: bool = False
    padded: bool = True  # sequences end in padding (id 0); Pathfinder and Image never do, so nothing is masked
    options: dict = field(default_factory=dict)  # generator settings (ListOpsConfig / PathfinderConfig fields)

    def __post_init__(self) -> None:
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"TaskSpec.decay={self.decay!r}: use 'cosine' or 'linear'")


def _listops(n_train, n_test, seq_len, steps, batch, **options) -> TaskSpec:
    return TaskSpec("listops", seq_len, 10, len(lra_data.LISTOPS_VOCAB), n_train, n_test, steps, batch, options=options)


def _pathfinder(size, n_train, n_test, steps, batch, **options) -> TaskSpec:
    return TaskSpec(f"pathfinder{size}", size * size, 2, 257, n_train, n_test, steps, batch, padded=False,
                    options={"size": size, **options})  # fmt: skip


PRESETS: dict[str, dict[str, TaskSpec]] = {
    # CI: a ListOps of one operator level over 2-4 digits (MAX, MIN) that dense attention learns in seconds
    "quick": {
        "listops": replace(
            _listops(4096, 512, 16, 250, 64, max_depth=1, max_args=4, min_length=4, max_length=6, ops=("[MAX", "[MIN")),
            dim=32,
            layers=1,
            dim_mlp=64,
            block_size=16,
        ),  # fmt: skip
        "pathfinder16": replace(
            _pathfinder(16, 2048, 256, 100, 32, path_length=10, distractors=1, gap=0),
            dim=32,
            layers=1,
            dim_mlp=64,
            block_size=16,
        ),  # fmt: skip
    },
    # a few minutes per attention on a CPU: shallow ListOps of up to 128 tokens, Pathfinder 16 x 16
    "cpu": {
        "listops": _listops(8192, 1024, 128, 600, 32, max_depth=3, max_args=5, min_length=16, max_length=128),
        "pathfinder16": replace(_pathfinder(16, 8192, 1024, 600, 32, path_length=10, distractors=1), block_size=16),
        "image": TaskSpec("image", 1024, 10, 257, 10000, 2000, 300, 32, padded=False),
    },
    # ~6 minutes for 4 attentions on an H200 (bf16): LRA's ListOps (lengths 500-2000, seq 2048) and Pathfinder-32
    "gpu": {
        "listops": _listops(16384, 2048, 2048, 1200, 32),
        "pathfinder32": _pathfinder(32, 50000, 4000, 1600, 128),
        "image": TaskSpec("image", 1024, 10, 257, 50000, 10000, 2000, 128, padded=False),
        "text": TaskSpec("text", 4096, 2, 257, 25000, 5000, 1000, 32),
        "retrieval": TaskSpec("retrieval", 4096, 2, 257, 20000, 5000, 1000, 16, dual=True),
    },
    # LRA's schedules and data sizes: ListOps 96k/2k examples, 5000 steps at batch 32 (~5 minutes for 4
    # attentions on an H200); Pathfinder-32 160k/20k examples, 62400 steps at batch 256 (~8 minutes per attention
    # through --compile on an H200, so it runs only when asked for with --tasks) with the learning-rate schedule
    # of xFormers' LRA config for it (peak 1e-4, 312 warm-up steps, linear decay)
    "paper": {
        "listops": _listops(96000, 2000, 2048, 5000, 32),
        "pathfinder32": replace(_pathfinder(32, 160000, 20000, 62400, 256), lr=1e-4, warmup=312, decay="linear"),
    },
}
DEFAULT_TASKS = {"quick": ("listops",), "cpu": ("listops", "pathfinder16"), "gpu": ("listops", "pathfinder32"),
                 "paper": ("listops",)}  # fmt: skip
DEFAULT_ATTENTIONS = {"quick": ("dense",), "cpu": ("dense", "blocksparse", "nystrom", "linformer"),
                      "gpu": ("dense", "blocksparse", "nystrom", "linformer"),
                      "paper": ("dense", "blocksparse", "nystrom", "linformer")}  # fmt: skip


def load_task(spec: TaskSpec, data_dir, seed: int) -> tuple[lra_data.Split, lra_data.Split]:
    """``(train, test)`` splits of ``spec`` (generated with seeds ``seed`` and ``seed + 1``, or read)."""
    if spec.name == "listops":
        cfg = lra_data.ListOpsConfig(**spec.options)
        return (lra_data.listops(spec.n_train, spec.seq_len, cfg, seed),
                lra_data.listops(spec.n_test, spec.seq_len, cfg, seed + 1))  # fmt: skip
    if spec.name.startswith("pathfinder"):
        cfg = lra_data.PathfinderConfig(**spec.options)
        return lra_data.pathfinder(spec.n_train, cfg, seed), lra_data.pathfinder(spec.n_test, cfg, seed + 1)
    if spec.name == "image":
        return (lra_data.cifar10(data_dir, "train", spec.n_train),
                lra_data.cifar10(data_dir, "test", spec.n_test))  # fmt: skip
    if spec.name == "text":
        return (lra_data.imdb(data_dir, "train", spec.seq_len, spec.n_train),
                lra_data.imdb(data_dir, "test", spec.seq_len, spec.n_test))  # fmt: skip
    if spec.name == "retrieval":
        return (lra_data.aan(data_dir, "train", spec.seq_len, spec.n_train),
                lra_data.aan(data_dir, "test", spec.seq_len, spec.n_test))  # fmt: skip
    raise ValueError(f"unknown LRA task {spec.name!r}")


def _lr(step: int, spec: TaskSpec) -> float:
    """The learning rate of ``step``: linear warm-up to ``spec.lr``, then cosine or linear decay to 0."""
    steps, base, warmup = spec.steps, spec.lr, _warmup(spec)
    if step < warmup:
        return base * (step + 1) / warmup
    done = (step - warmup) / max(1, steps - warmup)
    return base * (1 - done) if spec.decay == "linear" else base * 0.5 * (1 + math.cos(math.pi * done))


def on_device(split: lra_data.Split, device) -> lra_data.Split:
    """``split`` on ``device``, token ids as int16 (vocabularies are below 2**15), so that batches are drawn there
    without a host-to-device copy per step (a copy from pageable memory waits for the GPU to go idle)."""
    if device.type == "cpu":
        return split
    ids2 = split.ids2.to(device, torch.int16) if split.ids2 is not None else None
    return lra_data.Split(split.ids.to(device, torch.int16), split.labels.to(device), ids2)


def _batch(split: lra_data.Split, index: torch.Tensor, device) -> tuple:
    index = index.to(split.ids.device, non_blocking=True)
    second = split.ids2[index].to(device, torch.int64) if split.ids2 is not None else None
    return split.ids[index].to(device, torch.int64), second, split.labels[index].to(device)


@torch.no_grad()
def evaluate(model, split: lra_data.Split, batch: int, device, autocast) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(split), batch):
        ids, ids2, labels = _batch(split, torch.arange(start, min(start + batch, len(split))), device)
        with autocast():
            logits = model(ids, ids2)
        correct += int((logits.argmax(-1) == labels).sum())
    model.train()
    return correct / max(1, len(split))


# the clock of ``deadline`` (a module attribute, so that tests can move time)
_now = time.monotonic


def clock() -> float:
    """Seconds on the clock ``train_one`` compares its ``deadline`` with."""
    return _now()


def train_one(
    spec: TaskSpec, attention: str, train, test, device, bf16: bool, seed: int, progress: bool = True,
    checkpoint: Path | None = None, deadline: float | None = None, checkpoint_every: int = 500,
    compile_backend: str | None = None, retime: int = 0,
) -> dict | None:  # fmt: skip
    """Trains and evaluates one attention on one task; the record.

    With ``checkpoint`` (a file), training resumes from it when it exists and saves to it every
    ``checkpoint_every`` steps; when ``_now()`` passes ``deadline`` it saves and returns None, and a later call
    with the same file continues where it stopped, on the same batches (drawn up front from ``seed``), so that a
    schedule longer than one job's time limit runs in several. ``compile_backend`` (e.g. ``"inductor"``) trains
    through ``torch.compile(model, backend=...)``; the first step of each job then includes the compilation.

    ``retime`` (steps, > 1): once training has finished, the record's tokens/s is measured again over that many
    further steps on the first batches (after one untimed step), from and back to the trained weights and
    optimizer state, so that a run trained while other processes shared the GPU reports its own speed; the
    record keeps the training's own figure as ``tokens_per_s_training``.
    """
    if retime and not 1 < retime <= spec.steps:
        raise ValueError(f"retime={retime}: pass between 2 and the task's {spec.steps} steps")
    torch.manual_seed(seed)
    model = LRAClassifier(attention, spec.vocab, spec.seq_len, spec.num_classes, spec.dim, spec.heads, spec.layers,
                          spec.dim_mlp, spec.dual, spec.block_size, mask_padding=spec.padded).to(device)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    use_bf16 = bf16 and device.type == "cuda"
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model

    def autocast():
        return torch.autocast("cuda", torch.bfloat16, enabled=use_bf16)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # every step's sample indices, drawn up front (step i always trains on the same batch, resumed or not)
    order = torch.randint(len(train), (spec.steps, spec.batch), generator=torch.Generator().manual_seed(seed))
    train, test = on_device(train, device), on_device(test, device)
    order = order.to(train.ids.device)
    # resumable state: next step, seconds and steps timed after each segment's first step, total seconds, jobs
    state = {"step": 0, "timed_seconds": 0.0, "timed_steps": 0, "train_seconds": 0.0, "segments": 0,
             "loss": float("nan"), "peak_memory_mb": 0.0}  # fmt: skip
    if checkpoint is not None and Path(checkpoint).exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        ident = {"task": spec.name, "attention": attention, **_schedule(spec)}
        if {k: saved.get(k) for k in ident} != ident:
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} is of {({k: saved.get(k) for k in ident})}, not {ident}; use "
                "another --checkpoint-dir or delete it"
            )
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]

    def save() -> None:
        Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(checkpoint) + ".tmp")
        torch.save({"task": spec.name, "attention": attention, **_schedule(spec), "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "state": state}, tmp)  # fmt: skip
        tmp.replace(checkpoint)  # a job killed while saving leaves the previous checkpoint whole

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    tokens_per_step = spec.batch * spec.seq_len * (2 if spec.dual else 1)
    first = state["step"]
    bar = tqdm(range(first, spec.steps), desc=f"{spec.name} {attention}", dynamic_ncols=True, mininterval=1.0,
               disable=not progress, initial=first, total=spec.steps)  # fmt: skip
    trains = first < spec.steps  # False: a finished run, re-read (its record re-evaluated, its times kept)
    state["segments"] += trains
    start = warm = time.perf_counter()
    stopped = False

    def train_step(step: int, lr: float) -> torch.Tensor:
        for group in opt.param_groups:
            group["lr"] = lr
        ids, ids2, labels = _batch(train, order[step], device)
        with autocast():
            logits = forward(ids, ids2)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    for step in bar:
        loss = train_step(step, _lr(step, spec))
        if step == 0 or step % 20 == 0 or step == spec.steps - 1:
            state["loss"] = loss.item()
            bar.set_postfix(loss=f"{state['loss']:.3f}")
        if step == first:  # the segment's first step compiles kernels: not timed
            sync()
            warm = time.perf_counter()
        state["step"] = step + 1
        if checkpoint is not None and step + 1 < spec.steps:
            stopped = deadline is not None and _now() >= deadline
            if stopped or (step + 1) % checkpoint_every == 0:
                sync()
                _account(state, start, warm, first, device)
                save()
                if stopped:
                    break
                start = warm = time.perf_counter()
                first = step + 1
    bar.close()
    if stopped:
        return None
    if trains:
        sync()
        _account(state, start, warm, first, device)
        if checkpoint is not None:
            save()
    timed = state["timed_steps"] > 0 and state["timed_seconds"] > 0
    tokens_per_s = tokens_per_step * state["timed_steps"] / state["timed_seconds"] if timed else None
    extra = {}
    if retime:
        extra = {"tokens_per_s_training": tokens_per_s, "retimed_steps": retime}
        tokens_per_s = tokens_per_step * (retime - 1) / _retime(model, opt, train_step, retime, spec.lr, sync)
    accuracy = evaluate(model, test, max(spec.batch, 64), device, autocast)
    counts = torch.bincount(test.labels, minlength=spec.num_classes)
    return {
        "task": spec.name, "attention": attention, "accuracy": accuracy,
        "majority_class": float(counts.max()) / max(1, len(test)), "final_loss": state["loss"],
        **_schedule(spec), "batch": spec.batch, "seq_len": spec.seq_len, "n_train": len(train),
        "n_test": len(test),
        "tokens_per_s": tokens_per_s, **extra, "train_seconds": state["train_seconds"], "jobs": state["segments"],
        "peak_memory_mb": state["peak_memory_mb"] if device.type == "cuda" else None,
        "compile": compile_backend, "params": sum(p.numel() for p in model.parameters()), "bf16": use_bf16,
        "masks_padding": model.masks_padding if spec.padded else None,  # None: the task has no padding
        "model": {"dim": spec.dim, "heads": spec.heads, "layers": spec.layers, "dim_mlp": spec.dim_mlp},
    }  # fmt: skip


def _retime(model, opt, train_step, steps: int, lr: float, sync) -> float:
    """Seconds of ``steps - 1`` training steps (``train_step(i, lr)`` for i < steps) after one untimed step;
    the model's weights and the optimizer's state are put back afterwards."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moments = copy.deepcopy(opt.state_dict())
    train_step(0, lr)
    sync()
    start = time.perf_counter()
    for step in range(1, steps):
        train_step(step, lr)
    sync()
    seconds = time.perf_counter() - start
    model.load_state_dict(weights)
    opt.load_state_dict(moments)
    return seconds


def _schedule(spec: TaskSpec) -> dict:
    """What a checkpoint must share with the run resuming it (and what records say of the schedule); Pathfinder
    adds its generator's version (a checkpoint trained on other images is refused)."""
    schedule = {"steps": spec.steps, "lr": spec.lr, "warmup": _warmup(spec), "decay": spec.decay}
    if spec.name.startswith("pathfinder"):
        schedule["data_version"] = lra_data.PATHFINDER_VERSION
    return schedule


def _warmup(spec: TaskSpec) -> int:
    """Warm-up steps: ``spec.warmup``, or a tenth of the steps (at least 1)."""
    return max(1, spec.steps // 10 if spec.warmup is None else spec.warmup)


def _account(state: dict, start: float, warm: float, first: int, device) -> None:
    """Adds the segment that began at ``start`` (its first step done at ``warm``) to ``state``'s totals."""
    now = time.perf_counter()
    state["train_seconds"] += now - start
    state["timed_seconds"] += now - warm
    state["timed_steps"] += max(0, state["step"] - first - 1)
    if device.type == "cuda":
        state["peak_memory_mb"] = max(state["peak_memory_mb"], torch.cuda.max_memory_allocated(device) / 2**20)
