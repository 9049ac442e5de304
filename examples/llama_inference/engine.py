"""Continuous batching: a fixed number of decode rows, prompts admitted into free rows as others finish.

Each iteration (1) admits queued prompts into free rows while the page pool can hold them (FIFO; a prompt
gets, up front, the pages for its prompt plus its new tokens, so a running sequence never waits for memory),
(2) prefills the admitted prompts in one packed forward (queries = the prompts, keys = their cache rows;
logits only for each prompt's last token) and samples their first token, (3) runs one decode step over all
``B`` rows (idle rows write to the scratch page and are ignored) and (4) retires the sequences that produced
EOS or their last new token, returning their pages.

The decode step is split-K attention over the paged cache. On a GPU it is captured once in a CUDA graph
(after eager warm-up runs that compile the kernels) and replayed: each step writes the tokens, used lengths
and block tables into the captured tensors in place.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from examples.llama_inference.cache import DecodeInputs, KVCache
from examples.llama_inference.model import Transformer

from triformers._triton import triton_unavailable_reason
from triformers.ops.fmha import triton_splitk

__all__ = ["Sampling", "sample", "Completion", "Stats", "Engine"]

# Eager decode steps before the capture: they compile (and, for the fused layers, time) every kernel of the
# step at its shapes, which a capture cannot do. The first one does it; the other two are margin.
GRAPH_WARMUP_STEPS = 3


@dataclass(frozen=True)
class Sampling:
    """``temperature == 0``: greedy (argmax); otherwise top-p (nucleus) sampling at that temperature."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature={self.temperature} must be >= 0 and top_p={self.top_p} in (0, 1]")


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens ``[N]`` from logits ``[N, V]``: argmax, or a draw from the smallest set of most likely tokens
    whose probabilities sum to ``top_p`` (renormalised)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    p_sorted, order = probs.sort(dim=-1, descending=True)
    outside = p_sorted.cumsum(-1) - p_sorted > sampling.top_p  # mass before a token already reaches top_p
    p_sorted = p_sorted.masked_fill(outside, 0.0)
    choice = torch.multinomial(p_sorted / p_sorted.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, choice)[:, 0]


@dataclass
class Completion:
    """One prompt's result: its generated tokens, why it stopped, and (``keep_logits``) each token's logits."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    finish: str = ""  # "eos" or "length"
    logits: list[torch.Tensor] | None = None


@dataclass
class Stats:
    """Counters and timings of the prefills and decode steps (wall clock, the device synchronised)."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    step_bytes: list[int] = field(default_factory=list)  # weights + KV cache read by each decode step

    def summary(self) -> dict[str, float]:
        """Tokens/s of prefill and decode; the decode step's median time and bandwidth (median of the steps)."""
        gbps = [b / t / 1e9 for b, t in zip(self.step_bytes, self.step_s)]
        return {
            "tokens_per_s_prefill": self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0,
            "tokens_per_s_decode": self.decode_tokens / self.decode_s if self.decode_s else 0.0,
            "decode_step_ms": 1e3 * statistics.median(self.step_s) if self.step_s else 0.0,
            "decode_gbps": statistics.median(gbps) if gbps else 0.0,
        }


@dataclass
class _Seq:
    index: int
    prompt: list[int]
    max_new: int
    pages: list[int]
    out: Completion
    length: int = 0  # tokens in the cache


class Engine:
    """Generates for many prompts with ``cache.batch`` decode rows.

    Args:
        model: the decoder.
        cache: its KV cache (``cache.batch`` rows).
        sampling: greedy by default.
        decode_op: attention operator of the decode steps: ``"auto"`` (split-K on CUDA; on the CPU, split-K
            for quantized caches and the dispatcher's choice otherwise), ``"splitk"``, ``"dispatch"``, or an
            operator class.
        cuda_graphs: capture the decode step in a CUDA graph (CUDA only; needs split-K decoding).
        seed: of the sampling generator.
        keep_logits: keep every generated token's logits (float32, on the host) in the completions.
    """

    def __init__(self, model: Transformer, cache: KVCache, *, sampling: Sampling = Sampling(), decode_op: Any = "auto",
                 cuda_graphs: bool = False, seed: int = 0, keep_logits: bool = False) -> None:  # fmt: skip
        self.model, self.cache, self.sampling, self.keep_logits = model, cache, sampling, keep_logits
        on_cuda = cache.device.type == "cuda"
        if decode_op == "auto":
            decode_op = "splitk" if on_cuda or cache.quantized else "dispatch"
        if decode_op == "splitk":
            why = triton_unavailable_reason(torch.empty(0, device=cache.device))
            if why is not None:
                raise ValueError(
                    f"split-K decoding (which {cache.kv} caches need, or decode_op asked for) cannot run on "
                    f"{cache.device}: {why}; or decode a native cache with the dispatcher's operator "
                    "(decode_op='dispatch')"
                )
            decode_op = cache.splitk_op()
        self.decode_op = None if decode_op == "dispatch" else decode_op
        if cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model and cache on a CUDA device")
        if cuda_graphs and not (isinstance(self.decode_op, type) and issubclass(self.decode_op, triton_splitk.FwOp)):
            raise ValueError("cuda_graphs=True needs split-K decoding (decode_op='splitk'): the captured kernels "
                             "must read the lengths from the tensors updated in place")  # fmt: skip
        self.cuda_graphs = cuda_graphs
        self.generator = torch.Generator(device=cache.device).manual_seed(seed)
        self.stats = Stats()
        self._weight_bytes = model.weight_bytes(cache.batch)  # read by every decode step
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_inputs: DecodeInputs | None = None
        self._graph_logits: torch.Tensor | None = None
        self._eager_steps = 0

    # ---- public -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int],
                 eos_ids: frozenset[int] = frozenset(), progress: Any = None) -> list[Completion]:  # fmt: skip
        """Generates up to ``max_new_tokens`` tokens for every prompt (stopping early at any of ``eos_ids``).

        Args:
            prompts: token ids, each non-empty.
            max_new_tokens: for every prompt, or one number per prompt.
            eos_ids: tokens that end a sequence (they are kept in its completion).
            progress: optional ``tqdm`` bar, advanced by the number of tokens each step generates.

        Returns:
            One :class:`Completion` per prompt, in the prompts' order.

        Raises:
            ValueError: an empty prompt, or one longer than the cache's rows (or pages) can hold.
        """
        max_new = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        self._check(prompts, max_new)
        done: list[Completion | None] = [None] * len(prompts)
        queue = deque(range(len(prompts)))
        rows: list[_Seq | None] = [None] * self.cache.batch
        while queue or any(rows):
            admitted = self._admit(queue, rows, prompts, max_new)
            if admitted:
                self._prefill(rows, admitted, progress)
                self._retire(rows, done, eos_ids)
            if any(rows):
                self._decode(rows, progress)
                self._retire(rows, done, eos_ids)
        return done

    # ---- scheduling -----------------------------------------------------------------------------------------

    def _positions(self, prompt: list[int], max_new_tokens: int) -> int:
        return len(prompt) + max_new_tokens - 1  # the last new token is sampled, never written to the cache

    def _pages(self, prompt: list[int], max_new_tokens: int) -> int:
        return math.ceil(self._positions(prompt, max_new_tokens) / self.cache.page_size) if self.cache.paged else 0

    def _check(self, prompts: list[list[int]], max_new: list[int]) -> None:
        if len(max_new) != len(prompts):
            raise ValueError(f"max_new_tokens has {len(max_new)} entries for {len(prompts)} prompts; give one each")
        limit = min(self.cache.capacity, self.model.args.max_seq_len)
        free_pages = self.cache.pool.available if self.cache.paged else 0
        for i, (p, n) in enumerate(zip(prompts, max_new)):
            if n < 1:
                raise ValueError(f"max_new_tokens={n} for prompt {i}; it must be >= 1")
            if not p:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
            if self._positions(p, n) > limit:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens: with max_new_tokens={n} it needs {self._positions(p, n)} "
                    f"cache positions, more than the {limit} a sequence may use; raise the cache's max_seq_len "
                    "(and the model's) or shorten the prompt"
                )
            if self._pages(p, n) > free_pages:
                raise ValueError(
                    f"prompt {i} needs {self._pages(p, n)} pages of {self.cache.page_size} rows but the pool has "
                    f"{free_pages} free; give the cache more pages"
                )

    def _admit(self, queue: deque, rows: list[_Seq | None], prompts: list[list[int]], max_new: list[int]
               ) -> list[int]:  # fmt: skip
        admitted = []
        while queue and None in rows:
            prompt, n = prompts[queue[0]], max_new[queue[0]]
            need = self._pages(prompt, n)
            if self.cache.paged and need > self.cache.pool.available:
                break  # first in, first served: wait for pages to be returned
            pages = self.cache.pool.allocate(need) if self.cache.paged else []
            b = rows.index(None)
            out = Completion(prompt=prompt, logits=[] if self.keep_logits else None)
            rows[b] = _Seq(index=queue.popleft(), prompt=prompt, max_new=n, pages=pages, out=out)
            admitted.append(b)
        return admitted

    def _retire(self, rows: list[_Seq | None], done: list, eos_ids: frozenset[int]) -> None:
        for b, seq in enumerate(rows):
            if seq is None or not seq.out.tokens:
                continue
            if seq.out.tokens[-1] in eos_ids or len(seq.out.tokens) == seq.max_new:
                seq.out.finish = "eos" if seq.out.tokens[-1] in eos_ids else "length"
                done[seq.index] = seq.out
                if self.cache.paged:
                    self.cache.pool.release(seq.pages)
                rows[b] = None

    def _tables(self, rows: list[_Seq | None]) -> list[list[int]] | None:
        if not self.cache.paged:
            return None
        return [self.cache.table_row(s.pages if s else []) for s in rows]

    # ---- forward passes -------------------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.cache.device.type == "cuda":
            torch.cuda.synchronize(self.cache.device)

    def _accept(self, seqs: list[_Seq], logits: torch.Tensor, progress: Any) -> None:
        tokens = sample(logits, self.sampling, self.generator).tolist()  # also waits for the device
        kept = logits.cpu() if self.keep_logits else None
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            seq.out.tokens.append(tok)
            if kept is not None:
                seq.out.logits.append(kept[i].clone())
        if progress is not None:
            progress.update(len(seqs))

    def _prefill(self, rows: list[_Seq | None], admitted: list[int], progress: Any) -> None:
        self._sync()
        start = time.perf_counter()
        q_lens = [len(rows[b].prompt) if b in admitted else 0 for b in range(len(rows))]
        tokens = torch.tensor([t for b in sorted(admitted) for t in rows[b].prompt], device=self.cache.device)
        step = self.cache.prefill_step(q_lens, self._tables(rows))
        logits = self.model(tokens, self.cache, step)  # [len(admitted), V], rows in slot order
        seqs = [rows[b] for b in sorted(admitted)]
        for seq in seqs:
            seq.length = len(seq.prompt)
        self._accept(seqs, logits, progress)
        self.stats.prefill_s += time.perf_counter() - start
        self.stats.prefill_tokens += int(tokens.numel())

    def _decode(self, rows: list[_Seq | None], progress: Any) -> None:
        self._sync()
        start = time.perf_counter()
        tokens = [s.out.tokens[-1] if s else 0 for s in rows]
        seqlens = [s.length + 1 if s else 1 for s in rows]  # idle rows: one scratch row
        tables = self._tables(rows)
        if self.cuda_graphs and self._eager_steps >= GRAPH_WARMUP_STEPS:
            logits = self._replay(tokens, seqlens, tables)
        else:
            inputs = DecodeInputs(self.cache, tokens, seqlens, tables)
            logits = self.model(inputs.tokens, self.cache, self.cache.decode_step(inputs, self.decode_op))
            self._eager_steps += 1
        active = [s for s in rows if s is not None]
        for seq in active:
            seq.length += 1
        self._accept(active, logits[[b for b, s in enumerate(rows) if s is not None]], progress)
        elapsed = time.perf_counter() - start
        self.stats.decode_s += elapsed
        self.stats.decode_tokens += len(active)
        self.stats.step_s.append(elapsed)
        self.stats.step_bytes.append(self._weight_bytes + sum(seqlens) * self.cache.bytes_per_position())

    def _replay(self, tokens: list[int], seqlens: list[int], tables: list[list[int]] | None) -> torch.Tensor:
        if self._graph is None:
            self._graph_inputs = DecodeInputs.persistent(self.cache, len(tokens))
            self._graph_inputs.update(tokens, seqlens, tables)
            # warm-up on a side stream, as torch.cuda.graph requires; it computes this very step, so its cache
            # writes are the ones the replay makes again
            stream = torch.cuda.Stream(self.cache.device)
            stream.wait_stream(torch.cuda.current_stream(self.cache.device))
            with torch.cuda.stream(stream):
                self._graph_forward()
            torch.cuda.current_stream(self.cache.device).wait_stream(stream)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._graph_logits = self._graph_forward()
        else:
            self._graph_inputs.update(tokens, seqlens, tables)
        self._graph.replay()
        return self._graph_logits

    def _graph_forward(self) -> torch.Tensor:
        inputs = self._graph_inputs
        return self.model(inputs.tokens, self.cache, self.cache.decode_step(inputs, self.decode_op))

    def reset_stats(self) -> None:
        self.stats = Stats()
