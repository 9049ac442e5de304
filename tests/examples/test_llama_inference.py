"""examples/llama_inference against transformers' LlamaForCausalLM with the same weights (float32, CPU).

Most tests run the library's CPU paths (torch, chunked attention; Triton's interpreter switched off for them);
the test_kernels_* tests run the Triton kernels under the interpreter, split-K decoding included.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from examples.llama_inference import generate  # noqa: E402
from examples.llama_inference.cache import SCRATCH_PAGE, DecodeInputs, KVCache, PagePool  # noqa: E402
from examples.llama_inference.checkpoint import hf_to_meta, load_checkpoint  # noqa: E402
from examples.llama_inference.engine import Engine, Sampling, sample  # noqa: E402
from examples.llama_inference.model import ModelArgs, Transformer  # noqa: E402
from examples.llama_inference.tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402

from triformers.ops.fmha.quantize import dequantize_kv_fp8, dequantize_kv_int4  # noqa: E402

# float32 end to end; the two implementations differ only in summation order (GEMMs, softmax): measured
# max |Δlogit| 1.4e-6 for logits of spread ~1
ATOL, RTOL = 1e-5, 1e-5
EOS = ByteTokenizer.EOS
# GQA (2 query heads per K/V head), head_dim 16, a feed-forward width that is not a power of two
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, intermediate_size=100,
                 rope_theta=10000.0, max_seq_len=256)  # fmt: skip
PROMPT_LENGTHS = (1, 3, 17, 29, 8)
# int4 (one group: 15 levels over each row's range) and fp8 (e4m3, 3 mantissa bits) caches perturb every
# key/value by up to half a level / 2**-4 of the row's deviation from its mean (checked row by row); through the
# 2 layers and 3 decode steps of the test, the logits (std 1) moved by at most 0.21 (int4) and 0.061 (fp8)
# when measured: the bounds leave a 2.4x margin
QUANT_LOGIT_BOUND = {"int4": 0.5, "fp8": 0.15}


@pytest.fixture
def torch_paths(monkeypatch):
    """The library's CPU paths (torch; attention by the dispatcher), not the Triton kernels under the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _model(args: ModelArgs = ARGS, seed: int = 1) -> Transformer:
    return Transformer.from_args(args, seed=seed)


def _hf(model: Transformer) -> LlamaForCausalLM:
    hf = LlamaForCausalLM(LlamaConfig(**model.args.to_hf_config(), attn_implementation="eager")).eval()
    missing, unexpected = hf.load_state_dict(model.to_hf_state_dict(), strict=False)
    tied = model.args.tie_word_embeddings
    assert not unexpected and missing == (["lm_head.weight"] if tied else [])  # tied: the embedding, shared
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tied
    return hf


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model = _model()
    return model, _hf(model)


def _prompts(lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[ByteTokenizer.BOS] + torch.randint(0, 256, (n - 1,), generator=g).tolist() for n in lengths]


def _generate(model, prompts, max_new, *, batch=2, page_size=16, kv="native", num_pages=None, nan_fill=False,
              **engine_kw):  # fmt: skip
    longest = max(len(p) for p in prompts) + (max(max_new) if isinstance(max_new, list) else max_new)
    cache = KVCache(model.args, batch=batch, max_seq_len=longest, page_size=page_size, kv=kv, num_pages=num_pages)
    if nan_fill:  # rows no sequence wrote must never be read: NaN there (NaN halves for int32 words) changes nothing
        for t in cache.storage():
            t.fill_(float("nan")) if t.is_floating_point() else t.fill_(0x7E007E00)
    return Engine(model, cache, keep_logits=True, **engine_kw).generate(prompts, max_new, eos_ids=frozenset({EOS}))


@torch.inference_mode()
def _hf_generate(hf, prompt, max_new):
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                      output_logits=True, return_dict_in_generate=True, eos_token_id=EOS, pad_token_id=EOS)  # fmt: skip
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits)


# ---- (a) prefill -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 3.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}])  # fmt: skip
@pytest.mark.parametrize("tied", [False, True])
def test_prefill_logits_of_every_position_equal_hf(torch_paths, rope, tied):
    """Packed prompts of different lengths in one forward: every position's logits are HF's."""
    args = ModelArgs(**{**ARGS.to_dict(), "rope_scaling": rope, "tie_word_embeddings": tied})
    model = _model(args)
    hf = _hf(model)
    prompts = _prompts()
    cache = KVCache(args, batch=len(prompts), max_seq_len=32, page_size=8)
    tables = [cache.table_row(cache.pool.allocate(math.ceil(len(p) / 8))) for p in prompts]
    step = cache.prefill_step([len(p) for p in prompts], tables)
    step.logit_rows = None  # every position, not only the prompts' last tokens
    with torch.inference_mode():
        logits = model(torch.tensor([t for p in prompts for t in p]), cache, step)
        ref = torch.cat([hf(torch.tensor([p])).logits[0] for p in prompts])
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=RTOL)


def test_prefill_computes_the_last_token_logits(torch_paths, pair):
    model, hf = pair
    prompts = _prompts()
    out = _generate(model, prompts, 1, batch=len(prompts))  # one prefill of all prompts, no decode step
    with torch.inference_mode():
        ref = torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in prompts])
    torch.testing.assert_close(torch.stack([c.logits[0] for c in out]), ref, atol=ATOL, rtol=RTOL)
    assert [c.tokens for c in out] == [[int(r.argmax())] for r in ref]


# ---- (b) greedy decoding, (c) continuous batching ------------------------------------------------------------


def test_greedy_decoding_equals_hf_generate(torch_paths, pair):
    """20 greedy steps, 5 prompts through 2 rows: each step's logits and every token are HF's (its KV cache)."""
    model, hf = pair
    prompts = _prompts()
    out = _generate(model, prompts, 20, batch=2)
    for prompt, c in zip(prompts, out):
        tokens, logits = _hf_generate(hf, prompt, 20)
        assert c.tokens == tokens
        torch.testing.assert_close(torch.stack(c.logits), logits, atol=ATOL, rtol=RTOL)
    assert sum(len(c.tokens) for c in out) > 80  # EOS (1 of 300 tokens) ended few of them early


def test_continuous_batching_gives_each_sequence_its_tokens_alone(torch_paths, pair):
    """Different new-token budgets make rows free up at different steps, and queued prompts join mid-way."""
    model, _ = pair
    prompts, budgets = _prompts(), [9, 2, 14, 5, 11]
    together = _generate(model, prompts, budgets, batch=3)
    for p, n, c in zip(prompts, budgets, together):
        alone = _generate(model, [p], n, batch=1)[0]
        assert c.tokens == alone.tokens and c.finish == alone.finish
        torch.testing.assert_close(torch.stack(c.logits), torch.stack(alone.logits), atol=ATOL, rtol=RTOL)


def test_admission_waits_for_free_pages(torch_paths, pair):
    """A pool with room for one sequence at a time: rows stay idle until pages come back, tokens unchanged."""
    model, _ = pair
    prompts = _prompts((5, 9, 3))
    roomy = _generate(model, prompts, 6, batch=3, page_size=4)
    tight = _generate(model, prompts, 6, batch=3, page_size=4, num_pages=1 + 4)  # 14 positions: 4 pages
    assert [c.tokens for c in tight] == [c.tokens for c in roomy]


# ---- (d) cache layouts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_paged_cache_equals_contiguous_and_ignores_unused_rows(torch_paths, pair, page_size):
    model, _ = pair
    prompts = _prompts()
    contiguous = _generate(model, prompts, 6, batch=3, page_size=0, nan_fill=True)
    paged = _generate(model, prompts, 6, batch=3, page_size=page_size, nan_fill=True)
    for a, b in zip(contiguous, paged):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=ATOL, rtol=RTOL)


def test_page_pool():
    pool = PagePool(5)
    pages = pool.allocate(3)
    assert SCRATCH_PAGE not in pages and len(set(pages)) == 3 and pool.available == 1
    with pytest.raises(RuntimeError, match="2 pages requested but only 1"):
        pool.allocate(2)
    pool.release(pages)
    assert sorted(pool.allocate(4)) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="num_pages=1"):
        PagePool(1)


# ---- the Triton kernels (interpreter): split-K decoding, quantized caches --------------------------------------


def _forced(model, cache, prompt, forced, op):
    """Logits of the prompt's last token, then of each forced token fed back (teacher forcing), for one sequence."""
    tables = None
    if cache.paged:
        tables = [cache.table_row(cache.pool.allocate(math.ceil((len(prompt) + len(forced)) / cache.page_size)))]
    with torch.inference_mode():
        rows = [model(torch.tensor(prompt), cache, cache.prefill_step([len(prompt)], tables))[0]]
        for i, tok in enumerate(forced):
            inputs = DecodeInputs(cache, [tok], [len(prompt) + i + 1], tables)
            rows.append(model(inputs.tokens, cache, cache.decode_step(inputs, op))[0])
    return torch.stack(rows), tables


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter on the CPU")
def test_kernels_split_k_decoding_equals_hf(pair):
    """Triton RMSNorm, SwiGLU, rope_padded and split-K attention (interpreter): HF's tokens and logits."""
    model, hf = pair
    prompts = _prompts((2, 6))
    out = _generate(model, prompts, 3, batch=2, page_size=16, decode_op="splitk")
    for prompt, c in zip(prompts, out):
        tokens, logits = _hf_generate(hf, prompt, 3)
        assert c.tokens == tokens
        torch.testing.assert_close(torch.stack(c.logits), logits, atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="split-K runs on the CPU under the interpreter")
@pytest.mark.parametrize("kv,groups", [("int4", 1), ("int4", 2), ("fp8", 1)])
def test_kernels_quantized_cache(pair, kv, groups, monkeypatch):
    """The quantized cache holds the native cache's rows to within the format's error, at the same places
    (through the block table), and decoding from it stays within the stated bound of the native logits."""
    model, hf = pair
    prompt, forced = _prompts((7,))[0], [5, 77, 250]
    quant = KVCache(ARGS, batch=1, max_seq_len=16, page_size=4, num_pages=8, kv=kv, int4_groups=groups)
    quant.pool.allocate(2)  # the sequence's pages are not the first ones
    logits_q, tables = _forced(model, quant, prompt, forced, op=quant.splitk_op())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    native = KVCache(ARGS, batch=1, max_seq_len=16, page_size=0)
    logits_n, _ = _forced(model, native, prompt, forced, op=None)
    # rows the two runs computed from the same inputs: the prompt's in every layer; the decoded tokens' in the
    # first layer only (deeper layers see the quantized attention's output)
    for layer in range(ARGS.n_layers):
        n = len(prompt) + (len(forced) if layer == 0 else 0)
        rows = torch.tensor([quant.row(0, p, tables[0]) for p in range(n)])
        for store, scales, ref in ((quant._k, quant._k_scale, native._k), (quant._v, quant._v_scale, native._v)):
            x = ref[layer][0, :n, :, 0]  # [n, Hkv, D]
            if kv == "int4":  # half a level of the row's 15 (a group's is finer), plus fp16 rounding of coefficients
                got = dequantize_kv_int4(store[layer][0, rows, :, 0], num_groups=groups, dtype=torch.float32)
                bound = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 15 / 2 * 1.01 + 1e-3
            else:  # e4m3 rounds to 3 mantissa bits: 2**-4 of the largest deviation from the row's mean
                got = dequantize_kv_fp8(store[layer][0, rows, :, 0], scales[layer][0, rows, :, 0], torch.float32)
                bound = (x - x.mean(-1, keepdim=True)).abs().amax(-1, keepdim=True) * 2**-4 * 1.05 + 1e-3
            assert ((got - x).abs() <= bound).all()
    # the prefill attends the fresh K/V in the model's dtype: the native logits
    torch.testing.assert_close(logits_q[0], logits_n[0], atol=ATOL, rtol=RTOL)
    assert (logits_q - logits_n).abs().max() <= QUANT_LOGIT_BOUND[kv]


# ---- checkpoints, configs, tokenizers ---------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False])
def test_load_hf_checkpoint(torch_paths, pair, tmp_path, safe):
    model, hf = pair
    hf.save_pretrained(tmp_path, safe_serialization=safe)
    loaded = load_checkpoint(tmp_path)
    assert loaded.args == model.args
    for name, t in model.state_dict().items():
        assert loaded.state_dict()[name].equal(t), name


def test_load_meta_checkpoint_in_two_shards(pair, tmp_path):
    """Meta's format (adjacent-pair q/k order, model-parallel shards) loads into the same weights."""
    model, _ = pair
    meta = hf_to_meta(model.to_hf_state_dict(), ARGS)
    dims = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    for shard in range(2):
        part = {k: v if v.ndim == 1 else v.chunk(2, dim=dims[k.split(".")[-2]])[shard].clone()
                for k, v in meta.items()}  # fmt: skip
        torch.save(part, tmp_path / f"consolidated.{shard:02d}.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 100,
              "ffn_dim_multiplier": 0.5,
              "norm_eps": 1e-5, "rope_theta": 10000.0, "max_seq_len": 256}  # fmt: skip
    (tmp_path / "params.json").write_text(json.dumps(params))
    loaded = load_checkpoint(tmp_path)
    assert loaded.args.intermediate_size == 100 and loaded.args.vocab_size == 300
    for name, t in model.state_dict().items():
        assert loaded.state_dict()[name].equal(t), name


def test_meta_permutation_preserves_attention_scores(pair):
    """Meta's q/k rows rotated on adjacent pairs give the scores HF's permuted rows give rotated on halves."""
    model, _ = pair
    sd, D, H = model.to_hf_state_dict(), ARGS.head_dim, ARGS.n_heads
    meta = hf_to_meta(sd, ARGS)
    x, pos = torch.randn(5, ARGS.dim, dtype=torch.float64), torch.arange(5, dtype=torch.float64)
    angle = pos[:, None] * ARGS.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # [5, D/2]
    rot = torch.polar(torch.ones_like(angle), angle)[:, None]

    def scores(wq, wk, adjacent):
        q, k = (x @ w.double().T for w in (wq, wk))
        q, k = q.view(5, H, D), k.view(5, ARGS.n_kv_heads, D).repeat_interleave(H // ARGS.n_kv_heads, 1)
        if adjacent:  # pairs (2c, 2c + 1)
            q, k = q.view(5, -1, D // 2, 2), k.view(5, -1, D // 2, 2)
        else:  # pairs (c, c + D/2)
            q, k = q.view(5, -1, 2, D // 2).transpose(-1, -2), k.view(5, -1, 2, D // 2).transpose(-1, -2)
        qc, kc = (torch.view_as_complex(t.contiguous()) * rot for t in (q, k))
        return torch.einsum("ihd,jhd->hij", qc, kc.conj()).real

    prefix = "model.layers.0.self_attn."
    hf_scores = scores(sd[prefix + "q_proj.weight"], sd[prefix + "k_proj.weight"], False)
    meta_scores = scores(meta["layers.0.attention.wq.weight"], meta["layers.0.attention.wk.weight"], True)
    torch.testing.assert_close(meta_scores, hf_scores)


def test_config_round_trips_and_legacy_keys():
    args = ModelArgs(**{**ARGS.to_dict(), "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args
    legacy = {**args.to_hf_config(), "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    del legacy["rope_parameters"]
    assert ModelArgs.from_hf_config(legacy).rope_theta == 5e5
    assert ModelArgs.from_hf_config(LlamaConfig(**args.to_hf_config()).to_dict()) == args
    assert ModelArgs.from_dict(args.to_dict()) == args


def test_errors_name_the_problem(torch_paths, pair, tmp_path):
    model, _ = pair
    with pytest.raises(ValueError, match="n_heads=6 is not a multiple of n_kv_heads=4"):
        ModelArgs(dim=48, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="model_type='mistral'"):
        ModelArgs.from_hf_config({**ARGS.to_hf_config(), "model_type": "mistral"})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        ModelArgs(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="unknown ModelArgs fields \\['hidden'\\]"):
        ModelArgs.from_dict({"hidden": 3})
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        load_checkpoint(tmp_path)
    sd = model.to_hf_state_dict()
    with pytest.raises(ValueError, match="missing \\['model.norm.weight'\\]"):
        model.from_hf_state_dict({k: v for k, v in sd.items() if k != "model.norm.weight"})
    with pytest.raises(ValueError, match="lm_head.weight has shape \\(299, 64\\)"):
        model.from_hf_state_dict({**sd, "lm_head.weight": sd["lm_head.weight"][:-1]})
    with pytest.raises(ValueError, match="kv='int8'"):
        KVCache(ARGS, batch=1, max_seq_len=8, kv="int8")
    with pytest.raises(ValueError, match="int4_groups=4 with head_dim=16"):
        KVCache(ARGS, batch=1, max_seq_len=8, kv="int4", int4_groups=4)
    engine = Engine(model, KVCache(ARGS, batch=1, max_seq_len=8, page_size=4))
    with pytest.raises(ValueError, match="prompt 1 has 7 tokens: with max_new_tokens=3 it needs 9 cache positions"):
        engine.generate([[1], [1] * 7], 3)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], 3)
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model and cache on a CUDA device"):
        Engine(model, KVCache(ARGS, batch=1, max_seq_len=8), cuda_graphs=True)
    with pytest.raises(ValueError, match="split-K decoding .* cannot run on cpu: CPU tensors need Triton"):
        Engine(model, KVCache(ARGS, batch=1, max_seq_len=8, kv="int4"))


def test_tokenizers(tmp_path):
    byte = load_tokenizer(None)
    text = "naïve café: ∑ 1 + 2"
    assert byte.decode(byte.encode(text)) == text and byte.encode(text)[0] == ByteTokenizer.BOS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = ["the quick brown fox jumps over the lazy dog", "paged attention with a key value cache"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 7]}))
    hf_tok = load_tokenizer(tmp_path)
    ids = hf_tok.encode("the lazy cache")
    assert ids[0] == 0 and hf_tok.decode(ids) == "the lazy cache" and hf_tok.eos_ids == {1, 7}
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=30, character_coverage=1.0)  # fmt: skip
    (tmp_path / "sp.model").rename(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").unlink()
    sp = load_tokenizer(tmp_path)
    assert sp.decode(sp.encode("the lazy dog")) == "the lazy dog" and sp.encode("dog")[0] == sp.bos_id
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "a" / "b")  # neither it nor its parent has one


def test_top_p_sampling_stays_in_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    drawn = sample(logits, Sampling(temperature=1.0, top_p=0.75), g)
    counts = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert counts[2:].sum() == 0  # 0.5 + 0.3 already reach 0.75
    torch.testing.assert_close(counts[:2], torch.tensor([0.625, 0.375]), atol=0.04, rtol=0)
    assert sample(logits, Sampling(), g).eq(0).all()
    with pytest.raises(ValueError, match="top_p=0"):
        Sampling(temperature=1.0, top_p=0)


# ---- the command line -----------------------------------------------------------------------------------------


def test_command_line_writes_the_measurements(torch_paths, tmp_path, capsys):
    out = tmp_path / "run.json"
    generate.main(["--max-new-tokens", "5", "--batch", "2", "--out", str(out)])
    m = json.loads(out.read_text())
    assert m["device"] == "cpu" and m["B"] == 2 and m["kv_cache"] == "fp32" and m["page_size"] == 256
    assert len(m["prompt_lengths"]) == len(m["new_tokens"]) == 6 and all(0 < n <= 5 for n in m["new_tokens"])
    for key in ("tokens_per_s_decode", "tokens_per_s_prefill", "decode_step_ms", "decode_gbps"):
        assert m[key] > 0, key
    assert m["config"]["preset"] == "tiny" and m["config"]["dim"] == 192 and m["commit"]
    printed = capsys.readouterr()
    assert "tokens/s" in printed.out and "GB/s" in printed.out and "generating" in printed.err  # tqdm's bar


def test_command_line_as_a_script():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "examples/llama_inference/generate.py", "--page-size", "0", "--random-prompts", "3",
           "--prompt-len", "4", "9", "--temperature", "0.8", "--config", json.dumps(ARGS.to_dict()), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 prompts through B=3 rows" in proc.stdout and "contiguous" in proc.stdout
