"""Profile microGPT's training step with ``triformers.profiler``: trace, CUDA memory snapshot, module table.

    python examples/profile_microGPT.py --out profile_out                      # default device, small model
    python examples/profile_microGPT.py --out profile_out --attention local    # sliding-window attention
    python examples/profile_microGPT.py --out p --device cuda --emb 768 --heads 12 --layers 12 --block-size 1024

The model is ``examples/microGPT.py``'s GPT, trained with AdamW on random tokens (the profile does not depend
on the text). Files land in ``--out``; the per-module table is printed and written as ``*_modules.json`` /
``*_modules.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from pathlib import Path

import torch

import triformers.profiler as profiler


def load_gpt():
    """microGPT's ``GPT`` class (examples/microGPT.py, next to this file)."""
    spec = importlib.util.spec_from_file_location("microGPT", Path(__file__).with_name("microGPT.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GPT


SCHEDULES = {
    "default": profiler.DEFAULT_SCHEDULE,
    # the table after one warm-up step (kernels compiled), the trace after it
    "quick": (
        (profiler.MemSnapshotsProfiler, 0, 1),
        (profiler.ModuleTableProfiler, 1, 3),
        (profiler.PyTorchProfiler, 3, 4),
    ),  # fmt: skip
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the profiler's files")
    parser.add_argument("--attention", default="scaled_dot_product", help="any registered causal attention")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=96)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--emb", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="default")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = load_gpt()(args.vocab, args.block_size, args.layers, args.emb, args.heads, args.attention).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = SCHEDULES[args.schedule]
    steps = max(end for _, _, end in schedule) + 1
    autocast = torch.autocast("cuda", torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    with profiler.profile(args.out, model, schedule=schedule) as prof:
        for _ in range(steps):
            x = torch.randint(0, args.vocab, (args.batch, args.block_size + 1), device=device)
            with autocast:
                logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            profiler.step()
    return dict(prof.summary)


if __name__ == "__main__":
    main(sys.argv[1:])
