"""A character-level GPT built by the triformers factory (a minGPT homage).

By default it learns the Python standard library's own source code, which every Python installation
carries, so it runs anywhere without a download; ``--text FILE`` trains on any text file instead.

    python examples/microGPT.py                  # full run on the default device
    python examples/microGPT.py --demo           # about a minute: train briefly, print a sample
    python examples/microGPT.py --smoke          # tiny CPU run (the tests use it)
    python examples/microGPT.py --text input.txt --steps 5000 --attention local

The model is an ``xFormer`` encoder stack with causal attention (any registered attention that supports
``causal``), rotary embeddings and the fused MLP, topped by a linear head. Training shows a progress bar
with the loss and tokens/s and ends by printing a sample.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from triformers.factory import xFormer, xFormerConfig

UNKNOWN = "\ufffd"  # stands for the characters too rare to get their own token

PRESETS = {
    "default": dict(layers=6, emb=384, heads=6, block_size=256, batch=64, steps=5000, lr=6e-4, max_chars=None),
    # a time budget (counted after the first step, which compiles the kernels) keeps the demo short: about
    # 45 s of training on a CPU, 40 s on a GPU
    "demo-cpu": dict(layers=3, emb=96, heads=4, block_size=64, batch=32, steps=1000, lr=3e-3, max_chars=1_000_000,
                     max_seconds=45.0, sample_len=300),
    "demo-cuda": dict(layers=4, emb=256, heads=4, block_size=128, batch=64, steps=3000, lr=2e-3,
                      max_chars=4_000_000, max_seconds=40.0, sample_len=500),
    "smoke": dict(layers=2, emb=64, heads=4, block_size=64, batch=32, steps=200, lr=3e-3, max_chars=400_000,
                  device="cpu", sample_len=120),
}  # fmt: skip


def stdlib_text(max_chars: int | None = None) -> str:
    """The concatenated ``.py`` sources of this Python's standard library (sorted paths; site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        parts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    if not parts:
        raise FileNotFoundError(f"no .py files under {root}; pass a text file with --text")
    return "".join(parts)[:max_chars]


class CharTokenizer:
    """Characters seen at least ``min_count`` times get a token; the others share one unknown token."""

    def __init__(self, text: str, min_count: int = 5) -> None:
        counts = Counter(text)
        chars = sorted(c for c, n in counts.items() if n >= min_count)
        self.itos = chars + ([UNKNOWN] if UNKNOWN not in chars else [])
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.unknown = self.stoi[UNKNOWN]

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.stoi.get(c, self.unknown) for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids)


class GPT(nn.Module):
    """Token + position embedding, ``layers`` causal pre-norm blocks (final norm included), linear head."""

    def __init__(self, vocab_size: int, block_size: int, layers: int, emb: int, heads: int,
                 attention: str = "scaled_dot_product", dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.block_size = block_size
        stack = {
            "block_type": "encoder",
            "num_layers": layers,
            "dim_model": emb,
            "residual_norm_style": "pre",
            "position_encoding_config": {"name": "vocab", "seq_len": block_size, "vocab_size": vocab_size,
                                         "dropout": dropout},
            "multi_head_config": {
                "num_heads": heads,
                "residual_dropout": dropout,
                "use_rotary_embeddings": True,
                "attention": {"name": attention, "dropout": dropout, "causal": True, "seq_len": block_size,
                              "window_size": 32, "num_rules": heads},
            },
            "feedforward_config": {"name": "FusedMLP", "dropout": dropout, "activation": "gelu",
                                   "hidden_layer_multiplier": 4},
        }  # fmt: skip
        self.model = xFormer.from_config(xFormerConfig([stack], weight_init="small"))
        self.head = nn.Linear(emb, vocab_size, bias=False)
        nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.model(idx))  # [B, S, vocab]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, n: int, temperature: float = 0.8, top_k: int = 10) -> torch.Tensor:
        for _ in range(n):
            logits = self(idx[:, -self.block_size :])[:, -1] / temperature
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
            idx = torch.cat([idx, torch.multinomial(torch.softmax(logits, -1), 1)], dim=1)
        return idx


def batches(data: torch.Tensor, block_size: int, batch: int, device: torch.device):
    while True:
        starts = torch.randint(0, len(data) - block_size - 1, (batch,))
        x = torch.stack([data[s : s + block_size] for s in starts])
        y = torch.stack([data[s + 1 : s + block_size + 1] for s in starts])
        yield x.to(device), y.to(device)


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--smoke", action="store_true", help="tiny CPU run used by the tests")
    preset.add_argument("--demo", action="store_true", help="about a minute of training, then a sample")
    parser.add_argument("--text", type=Path, help="train on this text file (default: the stdlib sources)")
    for name, kind in (("layers", int), ("emb", int), ("heads", int), ("block-size", int), ("batch", int),
                       ("steps", int), ("lr", float), ("max-chars", int), ("max-seconds", float),
                       ("sample-len", int), ("seed", int)):  # fmt: skip
        parser.add_argument(f"--{name}", type=kind, help="overrides the preset")
    parser.add_argument("--attention", default="scaled_dot_product", help="any registered causal attention")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--prompt", default="def ", help="start of the sample")
    parser.add_argument("--metrics-json", type=Path, help="write first/last loss, seconds and tokens/s here")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    cfg = dict(sample_len=500, seed=0, max_seconds=None, device=None)
    cfg.update(PRESETS["smoke" if args.smoke else f"demo-{device.type}" if args.demo else "default"])
    for key, value in vars(args).items():
        if value is not None and key not in ("smoke", "demo", "text", "metrics_json"):
            cfg[key] = value
    torch.manual_seed(cfg["seed"])
    device = torch.device(cfg["device"] or device)

    if args.text is not None:
        if not args.text.is_file():
            raise SystemExit(f"--text {args.text}: no such file")
        text = args.text.read_text(encoding="utf-8", errors="replace")[: cfg["max_chars"]]
        source = str(args.text)
    else:
        text = stdlib_text(cfg["max_chars"])
        source = f"Python {sysconfig.get_python_version()} standard library sources"
    tok = CharTokenizer(text)
    data = tok.encode(text)
    if len(data) < 2 * cfg["block_size"] + 2:
        raise SystemExit(f"the text has {len(data)} characters; it needs more than {2 * cfg['block_size'] + 2}")
    print(f"{source}: {len(data):,} characters, vocabulary {len(tok.itos)}; device {device}")

    model = GPT(len(tok.itos), cfg["block_size"], cfg["layers"], cfg["emb"], cfg["heads"], cfg["attention"],
                cfg["dropout"]).to(device)  # fmt: skip
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.95))  # fmt: skip
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {cfg['layers']} layers, emb {cfg['emb']}, {cfg['heads']} heads, {n_params:,} parameters")

    split = int(0.9 * len(data))
    train = batches(data[:split], cfg["block_size"], cfg["batch"], device)
    losses: list[float] = []
    start = time.perf_counter()
    warm = start  # reset after the first step, which also compiles (and on a GPU autotunes) the kernels
    tokens_per_step = cfg["batch"] * cfg["block_size"]
    bar = tqdm(range(cfg["steps"]), desc="training", dynamic_ncols=True, mininterval=0.5)
    model.train()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg["steps"], cfg["lr"], warmup=max(1, cfg["steps"] // 20))
        x, y = next(train)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step == 0:
            warm = time.perf_counter()
            bar.write(f"first step (kernel compilation included): {warm - start:.1f} s")
            continue
        elapsed = time.perf_counter() - warm
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_step * step / elapsed:,.0f}")
        if cfg["max_seconds"] is not None and elapsed > cfg["max_seconds"]:
            bar.close()
            print(f"stopping after {step + 1} steps: the {cfg['max_seconds']:.0f} s budget is spent")
            break
    seconds = time.perf_counter() - start
    steady = time.perf_counter() - warm

    model.eval()
    val = batches(data[split:], cfg["block_size"], cfg["batch"], device)
    with torch.no_grad():
        val_loss = sum(nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                       for x, y in (next(val) for _ in range(4))) / 4  # fmt: skip
    last = sum(losses[-10:]) / len(losses[-10:])
    metrics = {
        "first_loss": losses[0], "last_loss": last, "val_loss": val_loss, "steps": len(losses),
        "seconds": seconds, "tokens_per_s": tokens_per_step * (len(losses) - 1) / max(steady, 1e-9),
    }  # fmt: skip
    print(f"loss {losses[0]:.3f} -> {last:.3f} (mean of the last 10 steps; validation {val_loss:.3f}) "
          f"in {seconds:.1f} s, {metrics['tokens_per_s']:,.0f} tokens/s")  # fmt: skip
    prompt = tok.encode(args.prompt)[None].to(device)
    sample = model.generate(prompt, cfg["sample_len"])[0]
    print("-" * 80 + "\n" + tok.decode(sample.tolist()) + "\n" + "-" * 80)
    if args.metrics_json:
        args.metrics_json.write_text(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
