"""Generate with a Llama-architecture model: continuous batching over a paged KV cache, split-K decoding,
CUDA graphs on a GPU. Prints the completions, tokens/s of prefill and decode, and the decode step's memory
bandwidth (bytes of weights + KV cache read per step / step time).

    python -m examples.llama_inference.generate                          # tiny random model (CPU default)
    python -m examples.llama_inference.generate --preset llama3-8b --out run.json   # Llama-3-8B shapes, GPU
    python -m examples.llama_inference.generate --checkpoint DIR --prompt "Hello" --temperature 0.6
    python examples/llama_inference/generate.py --kv-cache int4 --batch 8 --random-prompts 32

Without ``--checkpoint`` the weights are random (seeded) and the tokenizer is byte-level: the text is noise,
the speed is real. ``--checkpoint`` takes a HuggingFace directory (config.json + safetensors) or a Meta one
(params.json + consolidated.*.pth); its tokenizer.json / tokenizer.model is used when present.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `examples.llama_inference` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.llama_inference.cache import KV_KINDS, KVCache  # noqa: E402
from examples.llama_inference.checkpoint import load_checkpoint  # noqa: E402
from examples.llama_inference.engine import Engine, Sampling  # noqa: E402
from examples.llama_inference.model import PRESETS, ModelArgs, Transformer  # noqa: E402
from examples.llama_inference.tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402
from tqdm import tqdm  # noqa: E402

from triformers.benchmarks._harness import git_commit  # noqa: E402

PROMPTS = [
    "The quick brown fox",
    "Paged attention keeps each sequence's keys and values in fixed-size pages, so that",
    "Once upon a time, in a kingdom by the sea, there lived",
    "def fibonacci(n):",
    "Continuous batching admits a new request as soon as another one finishes, which keeps the GPU busy "
    "and the latency of short requests low. The scheduler",
    "1, 1, 2, 3, 5, 8,",
]
# What each preset runs unless the flags say otherwise (random prompts: that many per decode row; 0: the text
# prompts above).
RUNS = {
    "tiny": dict(batch=4, max_new_tokens=48, prompts_per_row=0, prompt_len=(16, 96)),
    # two rounds of prompts of 512-2048 tokens through B rows: steady decoding over ~1-2k-token caches, and
    # admissions into rows freed mid-run
    "llama3-8b": dict(batch=16, max_new_tokens=256, prompts_per_row=2, prompt_len=(512, 2048)),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shapes (random weights)")
    src.add_argument("--config", help="model shapes from JSON (a file or an inline object; ModelArgs fields or a "
                                      "HuggingFace config.json)")  # fmt: skip
    src.add_argument("--checkpoint", type=Path, help="HuggingFace or Meta checkpoint directory")
    src.add_argument("--tokenizer", type=Path, help="tokenizer.json / tokenizer.model (default: the checkpoint's, "
                                                    "else bytes)")  # fmt: skip
    src.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    src.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: bf16 on CUDA, fp32 on the CPU)")
    src.add_argument("--seed", type=int, default=0, help="weights, random prompts and sampling")
    run = p.add_argument_group("generation")
    run.add_argument("--prompt", action="append", help="a prompt (repeat the flag for several)")
    run.add_argument("--random-prompts", type=int, help="that many prompts of random tokens (llama3-8b: 2 per row)")
    run.add_argument("--prompt-len", type=int, nargs=2, metavar=("MIN", "MAX"), help="random prompts' lengths")
    run.add_argument("--batch", type=int, help="decode rows B (concurrent sequences)")
    run.add_argument("--max-new-tokens", type=int)
    run.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens tokens")
    run.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); else top-p sampling")
    run.add_argument("--top-p", type=float, default=0.9)
    cache = p.add_argument_group("cache and kernels")
    cache.add_argument("--kv-cache", choices=KV_KINDS, default="native", help="native: the model's dtype")
    cache.add_argument("--int4-groups", type=int, default=1, help="int4 quantization groups per row")
    cache.add_argument("--page-size", type=int, default=256, help="KV cache page size (0: contiguous cache)")
    cache.add_argument("--num-pages", type=int, help="pages in the pool (default: enough for B full sequences)")
    cache.add_argument("--decode-op", choices=["auto", "splitk", "dispatch"], default="auto",
                       help="decode attention: split-K (auto on CUDA and for quantized caches) or the dispatcher")
    cache.add_argument("--no-cuda-graphs", action="store_true", help="run the decode steps eagerly on a GPU")
    cache.add_argument("--no-warmup", action="store_true", help="skip the warm-up run (kernel compilation) on a GPU")
    p.add_argument("--out", type=Path, help="write the measurements as JSON here")
    p.add_argument("--quiet", action="store_true", help="print the measurements only, not the completions")
    return p.parse_args(argv)


def model_args(a: argparse.Namespace) -> ModelArgs:
    if a.config is None:
        return PRESETS[a.preset]
    text = a.config if a.config.lstrip().startswith("{") else Path(a.config).read_text()
    cfg = json.loads(text)
    return ModelArgs.from_hf_config(cfg) if "hidden_size" in cfg else ModelArgs.from_dict(cfg)


def copy_gbps(device: torch.device, nbytes: int = 1 << 31) -> float:
    """Bandwidth of an eager device-to-device copy of ``nbytes`` (bytes read + written per second / 1e9)."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_prompts(a: argparse.Namespace, tokenizer, vocab_size: int, n_default: int) -> list[list[int]]:
    if a.prompt:
        return [tokenizer.encode(t) for t in a.prompt]
    if a.random_prompts:
        rng = random.Random(a.seed)
        lo, hi = a.prompt_len
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        reserved = set(tokenizer.eos_ids) | set(bos)  # random prompts hold no special tokens
        pool = [t for t in range(vocab_size) if t not in reserved]
        return [bos + rng.choices(pool, k=rng.randint(lo, hi) - len(bos)) for _ in range(a.random_prompts)]
    return [tokenizer.encode(t) for t in (PROMPTS * n_default)[:n_default]]


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    defaults = RUNS[a.preset]
    for key in ("batch", "max_new_tokens", "prompt_len"):
        if getattr(a, key) is None:
            setattr(a, key, defaults[key])
    if a.random_prompts is None:
        a.random_prompts = defaults["prompts_per_row"] * a.batch
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[a.dtype] if a.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(a.seed)

    if a.checkpoint is not None:
        model = load_checkpoint(a.checkpoint, device=device, dtype=dtype)
        has_tok = any((d / f).is_file() for d in (a.checkpoint, a.checkpoint.parent)
                      for f in ("tokenizer.json", "tokenizer.model"))  # fmt: skip
        tokenizer = load_tokenizer(a.tokenizer or (a.checkpoint if has_tok else None))
    else:
        model = Transformer.from_args(model_args(a), device=device, dtype=dtype, seed=a.seed)
        tokenizer = load_tokenizer(a.tokenizer)
    args = model.args
    if isinstance(tokenizer, ByteTokenizer) and args.vocab_size < ByteTokenizer.vocab_size:
        raise SystemExit(f"vocab_size={args.vocab_size} is below the byte tokenizer's {ByteTokenizer.vocab_size}; "
                         "pass --tokenizer")  # fmt: skip
    prompts = make_prompts(a, tokenizer, args.vocab_size, n_default=len(PROMPTS))
    B = min(a.batch, len(prompts))
    longest = max(len(p) for p in prompts) + a.max_new_tokens - 1
    cache = KVCache(args, batch=B, max_seq_len=longest, page_size=a.page_size, num_pages=a.num_pages, kv=a.kv_cache,
                    int4_groups=a.int4_groups, dtype=dtype, device=device)  # fmt: skip
    graphs = device.type == "cuda" and not a.no_cuda_graphs
    engine = Engine(model, cache, sampling=Sampling(a.temperature, a.top_p), decode_op=a.decode_op,
                    cuda_graphs=graphs, seed=a.seed)  # fmt: skip
    eos = frozenset() if a.ignore_eos else tokenizer.eos_ids
    print(f"{args.n_layers} layers, dim {args.dim}, {args.n_heads}/{args.n_kv_heads} heads, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {DTYPE_NAMES[dtype]} on {device}; "
          f"{len(prompts)} prompts through B={B} rows, KV cache {a.kv_cache} "
          f"({'pages of ' + str(a.page_size) if a.page_size else 'contiguous'})")  # fmt: skip

    if device.type == "cuda" and not a.no_warmup:  # compile the kernels (and capture the graph) outside the timing
        engine.generate(prompts[:B], max_new_tokens=min(a.max_new_tokens, 8), eos_ids=frozenset())
        engine.reset_stats()
    with tqdm(total=len(prompts) * a.max_new_tokens, desc="generating", unit="tok", dynamic_ncols=True,
              mininterval=0.5) as bar:  # fmt: skip
        completions = engine.generate(prompts, a.max_new_tokens, eos_ids=eos, progress=bar)

    if not a.quiet:
        for prompt, c in zip(prompts, completions):
            print("-" * 80)
            print(f"{tokenizer.decode(prompt)!r} -> {tokenizer.decode(c.tokens)!r} [{len(c.tokens)}, {c.finish}]")
        print("-" * 80)
    m = engine.stats.summary()
    if device.type == "cuda":  # the ceiling the decode step's bandwidth is compared with, measured here and now
        m["copy_gbps"] = copy_gbps(device)
        m["decode_fraction_of_copy"] = m["decode_gbps"] / m["copy_gbps"]
    print(f"prefill {engine.stats.prefill_tokens} tokens: {m['tokens_per_s_prefill']:,.0f} tokens/s; decode "
          f"{engine.stats.decode_tokens} tokens in {len(engine.stats.step_s)} steps: {m['tokens_per_s_decode']:,.0f} "
          f"tokens/s, {m['decode_step_ms']:.2f} ms/step, {m['decode_gbps']:.4g} GB/s"
          + (f" ({m['decode_fraction_of_copy']:.0%} of a device copy's {m['copy_gbps']:.4g})" if "copy_gbps" in m
             else ""))  # fmt: skip
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "B": B,
        "prompt_lengths": [len(p) for p in prompts],
        "new_tokens": [len(c.tokens) for c in completions],
        **m,
        "config": {"preset": None if a.config or a.checkpoint else a.preset, **args.to_dict()},
        "kv_cache": DTYPE_NAMES[dtype] if a.kv_cache == "native" else a.kv_cache,
        "page_size": a.page_size,
        "dtype": DTYPE_NAMES[dtype],
        "cuda_graphs": graphs,
        "decode_steps": len(engine.stats.step_s),
        "torch": torch.__version__,
        "commit": git_commit(),
    }
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
