"""Long Range Arena data: ListOps and Pathfinder generated here (seeded), Image / Text / Retrieval read from
local files (nothing is downloaded).

Every task is a :class:`Split` of token ids ``[N, L]`` (0 is padding; the model ignores it when pooling), labels
``[N]`` and, for Retrieval, a second document ``[N, L]``.

- **ListOps** (Nangia & Bowman 2018; LRA's generator): nested ``[MAX``, ``[MIN``, ``[MED``, ``[SM`` (sum mod 10)
  lists of digits, label = the value (10 classes). LRA: depth <= 10, <= 10 arguments, 500 to 2000 tokens.
- **Pathfinder** (Linsley et al. 2018): an image of curved dashed paths and two marker dots; label = whether one
  path joins the dots. LRA: 32 x 32 pixels as a sequence of 1024 intensities. Drawn here: a path from a random
  point with a random turning walk, distractor paths alike; positives put both dots on the ends of one path,
  negatives on ends of two different paths.
- **Image**: CIFAR-10 in grayscale (LRA's choice), 1024 pixels, from the python-pickle batches
  (``cifar-10-batches-py`` under ``--data-dir``; torchvision is not needed).
- **Text**: IMDB reviews as bytes (LRA: 4000 bytes, binary), from ``aclImdb/{train,test}/{pos,neg}/*.txt``.
- **Retrieval**: ACL Anthology pairs as bytes (LRA: 4000 bytes per document, binary), from LRA's
  ``new_aan_pairs.{train,test}.tsv`` (``label, id1, id2, text1, text2``).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PAD = 0


@dataclass
class Split:
    ids: torch.Tensor  # int64 [N, L]
    labels: torch.Tensor  # int64 [N]
    ids2: torch.Tensor | None = None  # int64 [N, L]: the second document (Retrieval)

    def __len__(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------------------------------------------------
# ListOps
# ------------------------------------------------------------------------------------------------------------
OPS = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_VOCAB = ["<pad>", *map(str, range(10)), *OPS, "]"]  # token id = index
_TOKEN = {t: i for i, t in enumerate(LISTOPS_VOCAB)}
_DIGIT = _TOKEN["0"]


@dataclass(frozen=True)
class ListOpsConfig:
    """ListOps sizes (defaults: LRA's). ``value_p``: the chance that an argument below ``max_depth`` is a digit
    (LRA: 0.75); the root is always an operator."""

    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000
    ops: tuple[str, ...] = OPS
    value_p: float = 0.75


def _apply(op: str, values: list[int]) -> int:
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        ordered, mid = sorted(values), len(values) // 2
        return ordered[mid] if len(values) % 2 else int((ordered[mid - 1] + ordered[mid]) / 2)  # int(np.median)
    return sum(values) % 10


class _TooLong(Exception):
    pass


def _listops_tree(rng: random.Random, depth: int, cfg: ListOpsConfig, count: list[int]) -> tuple[list[int], int]:
    """Tokens and value of a random expression (LRA's recursion); ``count[0]`` counts the tokens drawn and the
    draw is abandoned (:class:`_TooLong`) past ``cfg.max_length``, which rejection would discard anyway."""
    count[0] += 1
    if count[0] > cfg.max_length:
        raise _TooLong
    if depth > 0 and (depth >= cfg.max_depth or rng.random() < cfg.value_p):
        digit = rng.randrange(10)
        return [_DIGIT + digit], digit
    op = rng.choice(cfg.ops)
    tokens, values = [_TOKEN[op]], []
    for _ in range(rng.randint(2, cfg.max_args)):
        sub, value = _listops_tree(rng, depth + 1, cfg, count)
        tokens += sub
        values.append(value)
    count[0] += 1
    tokens.append(_TOKEN["]"])
    return tokens, _apply(op, values)


def _listops_chunk(n: int, seq_len: int, cfg: ListOpsConfig, seed: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = random.Random(f"listops {seed}")  # Python's generator: a third of numpy's cost per scalar draw
    ids = np.zeros((n, seq_len), dtype=np.int64)
    labels = np.zeros(n, dtype=np.int64)
    row = 0
    while row < n:
        try:
            tokens, value = _listops_tree(rng, 0, cfg, [0])
        except _TooLong:
            continue
        if cfg.min_length <= len(tokens) <= cfg.max_length:
            ids[row, : len(tokens)] = tokens
            labels[row] = value
            row += 1
    return ids, labels


# Samples per generator task: each chunk has its own seed (seed, chunk index), so the data do not depend on
# the number of worker processes
CHUNK = 256


def _generate(fn, n: int, seed: int, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(size, *args, (seed, chunk))`` over chunks of :data:`CHUNK` samples, in worker processes when there
    are several chunks and several cores (the generators are pure Python)."""
    sizes = [min(CHUNK, n - start) for start in range(0, n, CHUNK)]
    jobs = [(size, *args, (seed, index)) for index, size in enumerate(sizes)]
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(fn, *zip(*jobs)))
    else:
        parts = [fn(*job) for job in jobs]
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 0), dtype=np.int64)
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(ids), torch.from_numpy(labels)


def listops(n: int, seq_len: int, cfg: ListOpsConfig, seed: int) -> Split:
    """``n`` expressions of ``cfg.min_length`` to ``cfg.max_length`` tokens (drawn until in range, as LRA
    does), padded to ``seq_len``."""
    if cfg.max_length > seq_len:
        raise ValueError(f"ListOps max_length={cfg.max_length} exceeds seq_len={seq_len}")
    return Split(*_generate(_listops_chunk, n, seed, seq_len, cfg))


def listops_text(ids: torch.Tensor) -> str:
    """An expression as text (``[MAX 3 [MIN 4 7 ] ]``), for reading samples."""
    return " ".join(LISTOPS_VOCAB[i] for i in ids.tolist() if i != PAD)


# ------------------------------------------------------------------------------------------------------------
# Pathfinder
# ------------------------------------------------------------------------------------------------------------
# 2: the marked paths keep their distance from every other path. Version 1 let paths cross, so that most
# negative images of the small presets (and ~60 % at 32 x 32) showed the two dots joined by pixels.
PATHFINDER_VERSION = 2


@dataclass(frozen=True)
class PathfinderConfig:
    """Pathfinder drawing (defaults: 32 x 32, LRA's smallest). ``path_length``: steps of one pixel per path;
    ``distractors``: extra paths; ``dash``/``gap``: pixels drawn and skipped along a path (gap 0: solid);
    ``turn``: the largest change of direction per step (radians); ``spacing``: the least distance (in pixels,
    along either axis) between a marked path and any other path, one more between the two marked paths (their
    ends carry the 3 x 3 dots), so that no crossing or touch joins the dots of a negative image (which would make
    its label unreadable from the pixels)."""

    size: int = 32
    path_length: int = 22
    distractors: int = 2
    dash: int = 3
    gap: int = 1
    turn: float = 0.35
    spacing: int = 3


def _walk(rng: np.random.Generator, cfg: PathfinderConfig) -> np.ndarray:
    """Pixel positions ``[path_length + 1, 2]`` of a turning walk kept inside the image (it turns back at the
    borders). Plain floats: a walk is a few dozen scalar steps, where numpy's per-call cost would dominate."""
    lo, hi = 2.0, cfg.size - 3.0  # a margin of 2 pixels
    y, x = (float(v) for v in rng.uniform(lo, hi, size=2))
    angle = float(rng.uniform(0, 2 * math.pi))
    turns = rng.uniform(-cfg.turn, cfg.turn, size=cfg.path_length).tolist()
    points = [(y, x)]
    for turn in turns:
        angle += turn
        dy, dx = math.cos(angle), math.sin(angle)
        if not (lo <= y + dy <= hi and lo <= x + dx <= hi):
            angle += math.pi / 2 + float(rng.uniform(0, math.pi / 2))
            dy, dx = math.cos(angle), math.sin(angle)
            y, x = min(max(y + dy, lo), hi), min(max(x + dx, lo), hi)
        else:
            y, x = y + dy, x + dx
        points.append((y, x))
    return np.rint(np.array(points)).astype(np.int64)


def _draw(image: np.ndarray, path: np.ndarray, cfg: PathfinderConfig) -> None:
    period = cfg.dash + cfg.gap
    for k, (y, x) in enumerate(path):
        if cfg.gap == 0 or k % period < cfg.dash:
            image[y, x] = max(image[y, x], 160)


def _dot(image: np.ndarray, point: np.ndarray) -> None:
    y, x = point
    image[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = 255


def _near(paths: list[np.ndarray], size: int, spacing: int) -> np.ndarray:
    """Pixels closer than ``spacing`` (along both axes) to a point of ``paths``: bool ``[size, size]``."""
    near = np.zeros((size, size), dtype=bool)
    r = spacing - 1
    for path in paths:
        for y, x in path:
            near[max(y - r, 0) : y + r + 1, max(x - r, 0) : x + r + 1] = True
    return near


def _clear_walk(rng: np.random.Generator, cfg: PathfinderConfig, near: np.ndarray, tries: int) -> np.ndarray | None:
    """A walk with no point on ``near``, or None after ``tries`` walks that all touch it."""
    for _ in range(tries):
        path = _walk(rng, cfg)
        if not near[path[:, 0], path[:, 1]].any():
            return path
    return None


def _paths(rng: np.random.Generator, cfg: PathfinderConfig, tries: int = 50) -> list[np.ndarray]:
    """Path 0 (both ends may be marked), path 1 (its end is marked in negatives) and the distractors, each
    redrawn until it keeps ``cfg.spacing`` from the marked paths (distractors may cross one another); the image
    starts again where one finds no room."""
    while True:
        first = _walk(rng, cfg)
        second = _clear_walk(rng, cfg, _near([first], cfg.size, cfg.spacing + 1), tries)
        if second is None:
            continue
        paths, near = [first, second], _near([first, second], cfg.size, cfg.spacing)
        for _ in range(cfg.distractors):
            path = _clear_walk(rng, cfg, near, tries)
            if path is None:
                break
            paths.append(path)
        else:
            return paths


def _pathfinder_chunk(n: int, cfg: PathfinderConfig, seed: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, cfg.size * cfg.size), dtype=np.int64)
    labels = (np.arange(n) % 2).astype(np.int64)
    rng.shuffle(labels)
    for row in range(n):
        image = np.zeros((cfg.size, cfg.size), dtype=np.int64)
        paths = _paths(rng, cfg)
        for path in paths:
            _draw(image, path, cfg)
        _dot(image, paths[0][0])
        _dot(image, paths[0][-1] if labels[row] else paths[1][-1])
        ids[row] = image.reshape(-1) + 1
    return ids, labels


def pathfinder(n: int, cfg: PathfinderConfig, seed: int) -> Split:
    """``n`` images (half positive in each chunk), flattened row by row to ``size**2`` tokens ``pixel + 1``."""
    return Split(*_generate(_pathfinder_chunk, n, seed, cfg))


# ------------------------------------------------------------------------------------------------------------
# Files: CIFAR-10, IMDB, AAN
# ------------------------------------------------------------------------------------------------------------
def _find(data_dir: Path | None, pattern: str, what: str) -> Path:
    hits = sorted(Path(data_dir).rglob(pattern)) if data_dir is not None else []
    if not hits:
        raise FileNotFoundError(
            f"{what}: nothing matching {pattern!r} under --data-dir={data_dir}; this benchmark downloads nothing, "
            "put the files there first (see `python -m triformers.benchmarks.lra --help`)"
        )
    return hits[0]


def cifar10(data_dir: Path | None, split: str, limit: int | None = None) -> Split:
    """CIFAR-10 in grayscale (``0.299 R + 0.587 G + 0.114 B``), tokens ``pixel + 1`` ``[N, 1024]``."""
    root = _find(data_dir, "cifar-10-batches-py", "Image (CIFAR-10)")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    data, labels = [], []
    for name in names:
        with open(root / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data.append(np.asarray(batch[b"data"], dtype=np.float64).reshape(-1, 3, 1024))
        labels += list(batch[b"labels"])
    rgb = np.concatenate(data)[:limit]
    gray = np.rint(0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).astype(np.int64)
    return Split(torch.from_numpy(gray + 1), torch.tensor(labels[: len(gray)], dtype=torch.int64))


def _bytes(texts: list[str], seq_len: int) -> torch.Tensor:
    ids = torch.zeros(len(texts), seq_len, dtype=torch.int64)
    for row, text in enumerate(texts):
        raw = np.frombuffer(text.encode("utf-8")[:seq_len], dtype=np.uint8).astype(np.int64) + 1
        ids[row, : len(raw)] = torch.from_numpy(raw)
    return ids


def imdb(data_dir: Path | None, split: str, seq_len: int, limit: int | None = None) -> Split:
    """IMDB reviews as bytes + 1, truncated to ``seq_len``; label 1 = positive."""
    root = _find(data_dir, "aclImdb", "Text (IMDB)") / split
    files = [(p, label) for label, folder in ((1, "pos"), (0, "neg")) for p in sorted((root / folder).glob("*.txt"))]
    order = np.random.default_rng(0).permutation(len(files))[:limit]
    texts = [files[i][0].read_text(encoding="utf-8", errors="replace") for i in order]
    return Split(_bytes(texts, seq_len), torch.tensor([files[i][1] for i in order], dtype=torch.int64))


def aan(data_dir: Path | None, split: str, seq_len: int, limit: int | None = None) -> Split:
    """ACL Anthology document pairs (LRA's TSV), each document as bytes + 1 truncated to ``seq_len``."""
    path = _find(data_dir, f"new_aan_pairs.{split}.tsv", "Retrieval (AAN)")
    labels, first, second = [], [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 5:
                continue
            labels.append(int(float(cols[0])))
            first.append(cols[3])
            second.append(cols[4])
            if limit is not None and len(labels) >= limit:
                break
    return Split(_bytes(first, seq_len), torch.tensor(labels, dtype=torch.int64), _bytes(second, seq_len))
