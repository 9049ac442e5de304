"""Long Range Arena (Tay et al. 2020) on any registered attention: ``python -m triformers.benchmarks.lra``.

    python -m triformers.benchmarks.lra --quick                        # CI: dense attention, ListOps-quick
    python -m triformers.benchmarks.lra --preset cpu                   # ListOps, Pathfinder-16, 4 attentions
    python -m triformers.benchmarks.lra --preset gpu                   # LRA's ListOps and Pathfinder-32, bf16
    python -m triformers.benchmarks.lra --preset paper                 # the same at LRA's schedule (ListOps)
    python -m triformers.benchmarks.lra --preset paper --tasks pathfinder32 --checkpoint-dir ck --time-limit 500
                                        # a long schedule in jobs of a few minutes: repeat until it exits 0
    python -m triformers.benchmarks.lra --preset paper --compile       # train through torch.compile
    python -m triformers.benchmarks.lra --tasks image --data-dir ~/data --attentions dense,nystrom

ListOps and Pathfinder are generated (seeded); Image (CIFAR-10 python batches), Text (aclImdb) and Retrieval
(LRA's new_aan_pairs TSV) are read from ``--data-dir`` (nothing is downloaded). Writes ``lra.json`` (env and
one record per task and attention: accuracy, majority-class rate, tokens/s, peak memory, steps) and
``lra.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from triformers.benchmarks.lra.run import DEFAULT_ATTENTIONS, DEFAULT_TASKS, PRESETS, clock, load_task, train_one

__all__ = ["PRESETS", "main", "plot", "run"]


def run(
    tasks, attentions, preset: str, *, data_dir=None, device=None, bf16=False, seed=0, steps=None, lr=None,
    progress=True, on_record=None, checkpoint_dir=None, deadline=None, compile_backend=None, retime=0,
) -> list[dict]:  # fmt: skip
    """Records of every (task, attention) of ``preset`` (``steps`` and ``lr`` override the preset's);
    ``on_record(records)`` is called after each one (the command line rewrites its JSON, so that a run cut short
    keeps what it did). With ``checkpoint_dir``, each (task, attention) trains from and saves to its own
    checkpoint there, and when ``run.train_one``'s clock passes ``deadline`` the run stops (saved) and returns
    the records finished so far; run it again with the same folder to go on (finished ones are re-evaluated
    from their final checkpoint, not trained again). ``compile_backend``: train through ``torch.compile``;
    ``retime``: tokens/s measured again over that many steps once a run has finished (``run.train_one``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    specs = []
    for task in tasks:
        if task not in PRESETS[preset]:
            raise ValueError(f"task {task!r} is not in preset {preset!r}; choose from {sorted(PRESETS[preset])}")
        spec = PRESETS[preset][task]
        if steps is not None:
            spec = dataclasses.replace(spec, steps=steps)
        if lr is not None:
            spec = dataclasses.replace(spec, lr=lr)
        specs.append(spec)
    # every split before any training: the generators fork worker processes, which must not follow CUDA's start
    splits = [load_task(spec, data_dir, seed) for spec in specs]
    records = []
    for spec, (train, test) in zip(specs, splits):
        task = spec.name
        for attention in attentions:
            checkpoint = Path(checkpoint_dir) / f"{task}-{attention}.pt" if checkpoint_dir is not None else None
            record = train_one(spec, attention, train, test, device, bf16, seed, progress, checkpoint=checkpoint,
                               deadline=deadline, compile_backend=compile_backend, retime=retime)  # fmt: skip
            if record is None:
                print(f"{task:>12} {attention:>20}: stopped at the time limit, saved to {checkpoint}", flush=True)
                return records
            print(
                f"{task:>12} {attention:>20}: accuracy {record['accuracy']:.3f} (majority class "
                f"{record['majority_class']:.3f}), {record['tokens_per_s'] or 0:,.0f} tokens/s",
                flush=True,
            )
            records.append(record)
            if on_record is not None:
                on_record(records)
    return records


def plot(doc: dict, path) -> None:
    """Accuracy and training tokens/s per task, attentions side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = doc["records"]
    tasks = list(dict.fromkeys(r["task"] for r in records))
    attentions = list(dict.fromkeys(r["attention"] for r in records))
    by_key = {(r["task"], r["attention"]): r for r in records}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(attentions))
    for ax, key, label in ((axes[0], "accuracy", "test accuracy"), (axes[1], "tokens_per_s", "training tokens/s")):
        for i, attention in enumerate(attentions):
            values = [(by_key.get((t, attention)) or {}).get(key) or 0.0 for t in tasks]
            ax.bar([x + i * width for x in range(len(tasks))], values, width, label=attention)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], tasks)
        ax.set_ylabel(label)
    for x, task in enumerate(tasks):
        chance = max(r["majority_class"] for r in records if r["task"] == task)
        axes[0].hlines(chance, x - width / 2, x + 0.8 - width / 2, colors="k", linestyles="--", lw=1)
    axes[0].legend(fontsize=7)
    axes[0].set_title("accuracy (dashed: majority class)")
    axes[1].set_title("training throughput")
    env = doc["env"]
    fig.suptitle(f"LRA, preset {env['preset']} — {env['gpu']} — {env['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triformers.benchmarks.lra", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="sizes and schedule (default: cpu, "
                        "or gpu on CUDA)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the CI preset (under a minute on a CPU)")
    parser.add_argument("--tasks", help="comma-separated: listops, pathfinder16/32, image, text, retrieval")
    parser.add_argument("--attentions", help="comma-separated registered attentions (dense = scaled_dot_product)")
    parser.add_argument("--data-dir", type=Path, help="CIFAR-10 python batches, aclImdb, new_aan_pairs.*.tsv")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lra"), help="folder for lra.json/.png")
    parser.add_argument("--steps", type=int, help="training steps (overrides the preset)")
    parser.add_argument("--lr", type=float, help="peak learning rate (overrides the preset's)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA; on by default with --preset gpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; --quick: 1, its 32-wide "
                        "model ran 10x faster on one thread than on two of a busy 2-core machine)")  # fmt: skip
    parser.add_argument("--checkpoint-dir", type=Path, help="resume from and save to checkpoints here (one per "
                        "task and attention), for schedules longer than one job")  # fmt: skip
    parser.add_argument("--time-limit", type=float, help="with --checkpoint-dir: stop and save after this many "
                        "seconds of training (exit code 3: run again to go on)")  # fmt: skip
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="train through torch.compile (backend: inductor unless given)")  # fmt: skip
    parser.add_argument("--retime", type=int, default=0, metavar="STEPS",
                        help="measure each finished run's training tokens/s again over STEPS steps, from and back "
                        "to its trained state (for runs trained while other jobs shared the GPU)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.time_limit is not None and args.checkpoint_dir is None:
        parser.error("--time-limit needs --checkpoint-dir (where the stopped run is saved)")
    deadline = clock() + args.time_limit if args.time_limit is not None else None
    preset = "quick" if args.quick else args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    threads = args.threads or (1 if preset == "quick" else None)
    tasks = args.tasks.split(",") if args.tasks else DEFAULT_TASKS[preset]
    attentions = args.attentions.split(",") if args.attentions else DEFAULT_ATTENTIONS[preset]
    from triformers.benchmarks._harness import env_info, write_results

    env = env_info()
    env["preset"] = preset
    overridden = args.steps is not None
    env["schedule"] = (
        "LRA's schedule and data sizes (ListOps 5000 steps at batch 32, Pathfinder 62400 at batch 256)"
        if preset == "paper" and not overridden
        else f"short schedule of preset {preset!r} (steps per record in 'steps'), not the paper's (LRA: ListOps "
        "5000 steps at batch 32, Pathfinder 62400 at batch 256): accuracies compare attentions under one budget"
    )
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        records = run(tasks, attentions, preset, data_dir=args.data_dir, device=args.device,
                      bf16=args.bf16 or preset in ("gpu", "paper"), seed=args.seed, steps=args.steps,
                      lr=args.lr, progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir,
                      deadline=deadline, compile_backend=args.compile, retime=args.retime,
                      on_record=lambda done: write_results(args.out / "lra.json", done, env))  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)
    doc = write_results(args.out / "lra.json", records, env)
    plot(doc, args.out / "lra.png")
    print(f"wrote {args.out / 'lra.json'} and {args.out / 'lra.png'}")
    if len(records) < len(tasks) * len(attentions):
        print(f"stopped at --time-limit with {len(records)} of {len(tasks) * len(attentions)} runs finished; run the "
              f"same command again to go on from {args.checkpoint_dir}")  # fmt: skip
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())


def markdown_summary(doc: dict) -> str:
    """Accuracy per task and attention (majority-class rate beside it), for the README."""
    env, records = doc["env"], doc["records"]
    retimed = sorted({r["retimed_steps"] for r in records if r.get("retimed_steps")})
    speed = "tokens/s re-timed | tokens/s in training" if retimed else "tokens/s"
    lines = [
        f"{env.get('gpu')}, torch {env.get('torch')}, commit {env.get('commit')}; preset {env.get('preset')}: "
        f"{env.get('schedule')}.",
        "",
        f"| task | attention | padding masked | steps | lr | accuracy | majority class | {speed} | peak MB |",
        f"| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |{' ---: |' if retimed else ''} ---: |",
    ]
    for r in records:
        lr = f"{r['lr']:g}" if "lr" in r else "-"
        masked = {True: "yes", False: "no", None: "no padding"}[r.get("masks_padding", False)]
        speeds = [r["tokens_per_s"]] + ([r.get("tokens_per_s_training")] if retimed else [])
        lines.append(f"| {r['task']} | {r['attention']} | {masked} | {r['steps']} | {lr} | {r['accuracy']:.3f} | "
                     f"{r['majority_class']:.3f} | {' | '.join(f'{s or 0:,.0f}' for s in speeds)} | "
                     f"{r['peak_memory_mb'] or 0:,.0f} |")
    if retimed:
        lines.append(f"\ntokens/s re-timed: measured again after training, over {'/'.join(map(str, retimed))} "
                     "steps (`--retime`), from the trained state; in training: over all the training's timed steps.")
    if env.get("run_note"):
        lines.append(f"\nRun: {env['run_note']}.")
    return "\n".join(lines)
