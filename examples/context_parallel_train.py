"""Train a character-level GPT with context parallelism: each of N processes holds 1/N of every sequence.

    python examples/context_parallel_train.py --smoke                         # one process: the reference
    torchrun --nproc-per-node 2 examples/context_parallel_train.py --smoke    # 2 processes, gloo on the CPU
    torchrun --nproc-per-node 8 examples/context_parallel_train.py --mode all_to_all   # 8 GPUs, NCCL

The model (token and learned position embeddings, pre-norm blocks of ``MultiHeadDispatch`` over causal
``ScaledDotProduct`` and an ``MLP``, a linear head) learns the Python standard library's sources, as
``microGPT.py`` does. With several processes every one draws the same batches and keeps its tokens of each
sequence (zigzag: chunks r and 2N-1-r of 2N); ``context_parallel(model)`` makes the attention calls ring (or
all-to-all) attention over the processes; the position table is read at the global positions of the local
tokens; the loss of the local tokens is divided by the global token count and the gradients are summed over
the processes. The model thus computes exactly what one process computes on whole sequences, and the loss
curve matches the single-process run step for step (up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from microGPT import CharTokenizer, batches, lr_at, stdlib_text
from torch import nn

from triformers.components import MultiHeadDispatch
from triformers.components.attention.scaled_dot_product import ScaledDotProduct
from triformers.components.feedforward.mlp import MLP
from triformers.distributed import context_parallel

PRESETS = {
    # long sequences are the point of context parallelism: 4096 tokens of 6 heads
    "default": dict(layers=6, emb=384, heads=6, block_size=4096, batch=4, steps=2000, lr=6e-4, max_chars=None),
    # block_size 32 cuts into 2N chunks for N up to 16 processes; batch x heads = 8 units for all-to-all
    "smoke": dict(layers=2, emb=32, heads=2, block_size=32, batch=4, steps=8, lr=3e-3, max_chars=100_000),
}
LOG_EVERY = 10  # steps between progress lines


class Block(nn.Module):
    def __init__(self, emb: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(emb), nn.LayerNorm(emb)
        self.attn = MultiHeadDispatch(emb, heads, ScaledDotProduct(causal=True))
        self.mlp = MLP(emb, dropout=0.0, activation="gelu", hidden_layer_multiplier=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """``[B, M]`` token ids at positions ``[M]`` (global) -> ``[B, M, vocab]`` logits."""

    def __init__(self, vocab: int, block_size: int, layers: int, emb: int, heads: int) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, emb), nn.Embedding(block_size, emb)
        self.blocks = nn.Sequential(*(Block(emb, heads) for _ in range(layers)))
        self.norm, self.head = nn.LayerNorm(emb), nn.Linear(emb, vocab, bias=False)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.tokens(idx) + self.positions(positions)
        return self.head(self.norm(self.blocks(x)))


def setup(device_arg: str | None) -> tuple[torch.device, bool]:
    """The device, and whether this is one of several processes started by torchrun."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    device = torch.device(device_arg or ("cuda" if cuda else "cpu"))
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, distributed


def sum_gradients(params: list[nn.Parameter]) -> None:
    """Sum the replicated parameters' gradients over the processes (one all-reduce)."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for g, reduced in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(reduced.view_as(g))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps of a tiny model on the CPU (the tests)")
    for name, kind in (("layers", int), ("emb", int), ("heads", int), ("block-size", int), ("batch", int),
                       ("steps", int), ("lr", float), ("max-chars", int), ("seed", int)):  # fmt: skip
        parser.add_argument(f"--{name}", type=kind, help="overrides the preset")
    parser.add_argument("--mode", default="ring", choices=["ring", "all_to_all"])
    parser.add_argument("--load-balance", default="zigzag", choices=["zigzag", "contiguous"])
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available; the smoke preset: cpu)")
    parser.add_argument("--metrics-json", type=Path, help="rank 0 writes the loss of every step here")
    args = parser.parse_args(argv)

    cfg = dict(PRESETS["smoke" if args.smoke else "default"], seed=0)
    for key, value in vars(args).items():
        if key in cfg and value is not None:
            cfg[key] = value
    device, distributed = setup(args.device or ("cpu" if args.smoke else None))
    torch.manual_seed(cfg["seed"])  # the same model and batches on every process

    tok = CharTokenizer(text := stdlib_text(cfg["max_chars"]))
    data = tok.encode(text)
    model = GPT(len(tok.itos), cfg["block_size"], cfg["layers"], cfg["emb"], cfg["heads"]).to(device)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    S = cfg["block_size"]
    cp = context_parallel(model, mode=args.mode, load_balance=args.load_balance) if distributed else None
    positions = cp.positions(S, device) if cp else torch.arange(S, device=device)
    world, rank = (cp.world_size, cp.rank) if cp else (1, 0)
    if rank == 0:
        print(f"{len(data):,} characters, vocabulary {len(tok.itos)}; {world} process(es) on {device}, "
              f"{S // world} of {S} tokens each ({args.mode}, {args.load_balance})")  # fmt: skip

    train = batches(data, S, cfg["batch"], device)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(cfg["steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg["steps"], cfg["lr"], warmup=max(1, cfg["steps"] // 20))
        x, y = next(train)  # [B, S], the same on every process
        if cp:
            x, y = cp.shard(x), cp.shard(y)
        logits = model(x, positions)
        # the loss over every token of the batch is the sum over the processes of this
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / (cfg["batch"] * S)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loss = loss.detach()
        if cp:
            sum_gradients(params)
            dist.all_reduce(loss)
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if rank == 0 and (step % LOG_EVERY == 0 or step == cfg["steps"] - 1):
            tokens_s = cfg["batch"] * S * (step + 1) / (time.perf_counter() - start)
            print(f"step {step:5d}  loss {losses[-1]:.4f}  {tokens_s:,.0f} tokens/s")

    metrics = {"losses": losses, "world": world, "mode": args.mode, "load_balance": args.load_balance}
    if rank == 0 and args.metrics_json:
        args.metrics_json.write_text(json.dumps(metrics))
    if cp:
        cp.remove()
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
