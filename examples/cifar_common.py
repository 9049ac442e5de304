"""CIFAR-10 data and the training loop shared by cifar_ViT.py and cifar_MetaFormer.py.

The data is read from the ``cifar-10-batches-py`` folder that torchvision's ``CIFAR10`` downloads (the
python-pickle release of the dataset), so training needs no torchvision. ``write_fake_cifar10`` writes a
generated stand-in in the same format (the tests use it).
"""

from __future__ import annotations

import argparse
import math
import pickle
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)

HOW_TO_GET = """CIFAR-10 was not found in {root}.
Get it with torchvision (install the build matching your torch, e.g.
  pip install torchvision --index-url https://download.pytorch.org/whl/cpu):
  python -c "import torchvision; torchvision.datasets.CIFAR10('{data_dir}', download=True)"
or without it:
  curl -O https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz && tar xzf cifar-10-python.tar.gz -C {data_dir}
then pass --data-dir {data_dir}."""


def _read(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for f in files:
        with open(f, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long)


def load_cifar10(data_dir: str | Path) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((train_images uint8 [50000, 3, 32, 32], train_labels), (test_images, test_labels))``.

    Raises:
        SystemExit: with download instructions when the files are missing.
    """
    root = Path(data_dir) / FOLDER
    train_files = [root / f for f in TRAIN_FILES if (root / f).exists()]
    test_files = [root / f for f in TEST_FILES]
    if not train_files or not all(f.exists() for f in test_files):
        raise SystemExit(HOW_TO_GET.format(root=root, data_dir=data_dir))
    return _read(train_files), _read(test_files)


def write_fake_cifar10(data_dir: str | Path, n_train: int = 500, n_test: int = 100, seed: int = 0) -> Path:
    """A learnable stand-in in CIFAR-10's on-disk format: noisy images whose class sets a colour and a
    stripe pattern. Returns the folder written."""
    rng = np.random.default_rng(seed)
    root = Path(data_dir) / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    colours = rng.integers(40, 215, size=(10, 3))

    def batch(n: int) -> dict:
        labels = rng.integers(0, 10, size=n)
        x = rng.normal(0, 30, size=(n, 3, 32, 32)) + colours[labels][:, :, None, None]
        x[:, :, :, ::2] += (labels[:, None, None, None] - 4.5) * 6  # class-dependent stripes
        return {"data": np.clip(x, 0, 255).astype(np.uint8).reshape(n, -1), "labels": labels.tolist()}

    per_file = math.ceil(n_train / len(TRAIN_FILES))
    for name in TRAIN_FILES:
        with open(root / name, "wb") as fh:
            pickle.dump(batch(per_file), fh)
    with open(root / TEST_FILES[0], "wb") as fh:
        pickle.dump(batch(n_test), fh)
    return root


def prepare(images: torch.Tensor, device: torch.device, augment: bool) -> torch.Tensor:
    """uint8 ``[B, 3, 32, 32]`` -> normalised float; with ``augment`` random 4-pixel crops and flips."""
    x = images.to(device).float().div_(255)
    if augment:
        B = x.shape[0]
        padded = nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
        dx, dy = torch.randint(0, 9, (2,)).tolist()  # one shift per batch keeps this a cheap slice
        x = padded[:, :, dy : dy + 32, dx : dx + 32]
        flip = torch.rand(B, device=device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return (x - MEAN.to(device)) / STD.to(device)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py (default: data)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps on at most 512 images")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)


def train_and_evaluate(model: nn.Module, args: argparse.Namespace, epochs: int, batch: int, lr: float,
                       weight_decay: float, betas: tuple[float, float], limit: int | None = None) -> dict:  # fmt: skip
    """Train with AdamW (linear warmup, cosine decay) and report the test accuracy."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    (x_train, y_train), (x_test, y_test) = load_cifar10(args.data_dir)
    if limit is not None:
        x_train, y_train, x_test, y_test = x_train[:limit], y_train[:limit], x_test[: limit // 4], y_test[: limit // 4]
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / batch)
    total = epochs * steps_per_epoch
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))),
    )
    print(f"{len(x_train):,} training / {len(x_test):,} test images on {device}; "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")  # fmt: skip
    losses, start = [], time.perf_counter()
    bar = tqdm(total=total, desc="training", dynamic_ncols=True, mininterval=0.5)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            x, y = prepare(x_train[idx], device, augment=True), y_train[idx].to(device)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss.item():.3f}", img_s=f"{batch * len(losses) / (time.perf_counter() - start):,.0f}"
            )
    bar.close()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x_test), 500):
            logits = model(prepare(x_test[i : i + 500], device, augment=False))
            correct += (logits.argmax(-1).cpu() == y_test[i : i + 500]).sum().item()
    metrics = {"first_loss": losses[0], "last_loss": sum(losses[-5:]) / len(losses[-5:]),
               "test_accuracy": correct / len(x_test), "seconds": time.perf_counter() - start}  # fmt: skip
    print(
        f"loss {metrics['first_loss']:.3f} -> {metrics['last_loss']:.3f}; "
        f"test accuracy {100 * metrics['test_accuracy']:.1f}% in {metrics['seconds']:.1f} s"
    )
    return metrics
