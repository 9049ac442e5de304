"""A Llama-architecture decoder for inference on triformers' fused operators.

Per layer: ``RMSNorm -> fused wqkv -> rope_padded (RoPE on the new q/k, K/V written into the cache) ->
memory_efficient_attention_forward over the cache (GQA as BMGHK [1, T, Hkv, Hq/Hkv, D], the KV-cache bias) ->
wo``, then ``RMSNorm fused with the residual add -> SwiGLU (gate and up projections packed in one GEMM) ->
down``. Tokens of all sequences of a step are packed along one axis (``[T, dim]``, no padding); the bias says
which cache rows each sequence reads. During prefill the last layer runs its feed-forward, the final norm and
the output projection only on each prompt's last token.

The weights are laid out as HuggingFace's ``LlamaForCausalLM`` (RoPE rotates the feature pairs ``(c, c+D/2)``,
``adjacents=False``); Meta's checkpoints are permuted into that layout on loading (:mod:`checkpoint`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from triformers.ops import RMSNorm, SwiGLU, fmha, rope_padded

if TYPE_CHECKING:
    from examples.llama_inference.cache import KVCache, Step

__all__ = ["ModelArgs", "PRESETS", "Attention", "TransformerBlock", "Transformer"]

# Meta's feed-forward width before the multiplier and rounding: 2/3 of 4 * dim (SwiGLU has three matrices).
FFN_SHRINK = 2 / 3


@dataclass
class ModelArgs:
    """Hyper-parameters of a Llama model (Meta's names; :meth:`from_hf_config` reads HuggingFace's).

    Attributes:
        dim: model width. n_layers, n_heads: depth and query heads. n_kv_heads: K/V heads (GQA), default n_heads.
        vocab_size: embedding rows. head_dim: per-head width, default dim // n_heads.
        intermediate_size: feed-forward width; when None, Meta's rule from ``ffn_dim_multiplier``/``multiple_of``.
        norm_eps: RMSNorm epsilon. rope_theta: RoPE base. rope_scaling: None, or HuggingFace's dict for the
        ``linear`` or ``llama3`` rope types. max_seq_len: longest sequence (prompt + generated tokens).
        tie_word_embeddings: the output projection shares the embedding matrix.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 128256
    ffn_dim_multiplier: float | None = None
    multiple_of: int = 256
    intermediate_size: int | None = None
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 8192
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.intermediate_size is None:
            hidden = int(FFN_SHRINK * 4 * self.dim)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.intermediate_size = self.multiple_of * math.ceil(hidden / self.multiple_of)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; each K/V head must "
                "serve the same number of query heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs of features)")
        rope_kwargs(self)  # validates rope_scaling

    @property
    def heads_per_group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        """From our own field names (``--config`` files); unknown keys raise ValueError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelArgs fields {unknown}; valid fields: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """From a HuggingFace ``config.json`` of a ``LlamaForCausalLM`` (transformers 4.x or 5.x keys).

        Raises:
            ValueError: the config describes something else (another model type, biases, another activation,
                an unsupported rope type).
        """
        if cfg.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type={cfg['model_type']!r}: only Llama checkpoints (model_type 'llama') load here")
        for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if cfg.get(key, ok) != ok:
                raise ValueError(f"config {key}={cfg[key]!r} is not supported (Llama uses {key}={ok!r})")
        rope = dict(cfg.get("rope_parameters") or {})  # transformers 5: theta and scaling in one dict
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = rope or cfg.get("rope_scaling")
        if scaling is not None:
            scaling = dict(scaling)
            scaling["rope_type"] = scaling.pop("type", scaling.get("rope_type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads"),
            vocab_size=cfg["vocab_size"],
            intermediate_size=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim"),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_seq_len=cfg.get("max_position_embeddings", 8192),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The HuggingFace ``config.json`` dict of this model (``LlamaConfig(**d)`` builds it)."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling)
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "intermediate_size": self.intermediate_size,
            "rms_norm_eps": self.norm_eps,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }

    @classmethod
    def from_meta_params(cls, params: dict[str, Any]) -> ModelArgs:
        """From Meta's ``params.json`` (``use_scaled_rope`` is Llama 3.1's rope scaling)."""
        scaling = None
        if params.get("use_scaled_rope"):
            scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}  # fmt: skip
        return cls(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=params["vocab_size"],
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            multiple_of=params.get("multiple_of", 256),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=params.get("max_seq_len", 8192),
        )


def rope_kwargs(args: ModelArgs) -> dict[str, Any]:
    """``rope_padded``'s keyword arguments for ``args`` (HuggingFace's pair layout, its scaling types).

    Raises:
        ValueError: a rope type other than default, linear and llama3.
    """
    kw: dict[str, Any] = {"theta": args.rope_theta, "adjacents": False}
    s = args.rope_scaling
    if s is None:
        return kw
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        kw["linear_scale"] = float(s["factor"])
    elif kind == "llama3":
        kw.update(use_dynamic_scaling=True, dynamic_old_context_len=float(s["original_max_position_embeddings"]),
                  dynamic_scale_factor=float(s["factor"]), dynamic_low_freq_factor=float(s["low_freq_factor"]),
                  dynamic_high_freq_factor=float(s["high_freq_factor"]))  # fmt: skip
    else:
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported; use none, 'linear' or 'llama3' (rope_scaling={s})"
        )
    return kw


PRESETS: dict[str, ModelArgs] = {
    # 3 layers, GQA with 3 query heads per K/V head, head_dim 32: 1.2 M parameters
    "tiny": ModelArgs(dim=192, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=320, multiple_of=64,
                      norm_eps=1e-5, rope_theta=10000.0, max_seq_len=2048),
    # Llama-3-8B's shapes (random weights): the bandwidth run on a GPU
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                           ffn_dim_multiplier=1.3, multiple_of=1024, norm_eps=1e-5, rope_theta=500000.0,
                           max_seq_len=8192),
}  # fmt: skip


class Attention(nn.Module):
    """GQA self-attention over the KV cache; q/k/v in one GEMM (``wqkv``)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.rope = rope_kwargs(args)

    def forward(self, x: torch.Tensor, cache: KVCache, layer: int, step: Step) -> torch.Tensor:
        T, D = x.shape[0], self.head_dim
        G, Hg = self.n_kv_heads, self.n_heads // self.n_kv_heads
        xq, xk, xv = self.wqkv(x).split([self.n_heads * D, G * D, G * D], dim=-1)
        xq = xq.view(1, T, G, Hg, D)
        xk = xk.view(1, T, G, 1, D).expand(1, T, G, Hg, D)  # one K/V head per group, read by its Hg query heads
        xv = xv.view(1, T, G, 1, D).expand(1, T, G, Hg, D)
        cache_k, cache_v = cache.rope_targets(layer, step)
        xq = rope_padded(xq, xk, xv, cache_k, cache_v, step.rope_bias, seqpos=step.seqpos, **self.rope)
        if cache.quantized:
            out = cache.store_and_attend(layer, xq, step)
        else:
            out = fmha.memory_efficient_attention_forward(xq, cache_k, cache_v, step.bias, op=step.op)
        return self.wo(out.reshape(T, self.n_heads * D))  # [T, dim]


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x += attention(norm(x))``, then ``x += feed_forward(norm(x))``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = SwiGLU(args.dim, args.intermediate_size, bias=False)  # w12 = [gate; up], w3 = down
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, cache: KVCache, layer: int, step: Step,
                rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``x`` ``[T, dim]`` is the residual stream, updated in place; with ``rows``, only those rows go on
        past the attention (and only they are returned)."""
        a = self.attention(self.attention_norm(x), cache, layer, step)
        if rows is not None:
            x, a = x[rows], a[rows]
        h = self.ffn_norm.increment_and_forward_(x, a)  # x += a, then the norm, in one pass
        return x.add_(self.feed_forward(h))


class Transformer(nn.Module):
    """The decoder: embedding, ``n_layers`` blocks, final norm and output projection.

    Build it with :meth:`from_args` (random weights, seeded) or :func:`checkpoint.load_checkpoint`.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @classmethod
    def empty(cls, args: ModelArgs, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
              ) -> Transformer:  # fmt: skip
        """A model with uninitialised weights on ``device`` in ``dtype`` (nothing is built on the CPU first)."""
        with torch.device("meta"):
            model = cls(args)
        model = model.to_empty(device=device).to(dtype)
        if args.tie_word_embeddings:
            model.output.weight = model.tok_embeddings.weight
        return model.eval()

    @classmethod
    def from_args(cls, args: ModelArgs, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  seed: int = 0) -> Transformer:  # fmt: skip
        """A model with random weights drawn from ``seed`` (see :meth:`init_weights`)."""
        model = cls.empty(args, device=device, dtype=dtype)
        model.init_weights(seed)
        return model

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Linear weights ~ N(0, 1/fan_in) (unit-scale activations at any depth, logits of spread ~1, so greedy
        choices are far from ties), embeddings ~ N(0, 1), norm scales ~ 1 + N(0, 0.1²) (not all ones, so a
        mix-up of the two norms of a block shows)."""
        gen = torch.Generator(device=self.output.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.1, generator=gen).add_(1.0)
            elif "tok_embeddings" in name:
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)

    def _hf_pieces(self) -> dict[str, torch.Tensor]:
        """HuggingFace name -> the slice of our parameter that holds it."""
        a = self.args
        pieces = {"model.embed_tokens.weight": self.tok_embeddings.weight, "model.norm.weight": self.norm.weight}
        if not a.tie_word_embeddings:
            pieces["lm_head.weight"] = self.output.weight
        sizes = [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim]
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            q, k, v = layer.attention.wqkv.weight.split(sizes)
            gate, up = layer.feed_forward.w12.weight.chunk(2)
            pieces.update({
                p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                p + "self_attn.o_proj.weight": layer.attention.wo.weight,
                p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": layer.feed_forward.w3.weight,
                p + "input_layernorm.weight": layer.attention_norm.weight,
                p + "post_attention_layernorm.weight": layer.ffn_norm.weight,
            })  # fmt: skip
        return pieces

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under ``LlamaForCausalLM``'s names (copies: safe to save or modify)."""
        return {name: t.detach().clone() for name, t in self._hf_pieces().items()}

    @torch.no_grad()
    def from_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copies ``LlamaForCausalLM`` weights in (cast to this model's dtype and device).

        Raises:
            ValueError: missing or unexpected keys, or a shape that does not match ``self.args``.
        """
        pieces = self._hf_pieces()
        ignored = {"lm_head.weight"} if self.args.tie_word_embeddings else set()
        given = {k for k in state_dict if not k.endswith("rotary_emb.inv_freq")} - ignored
        missing, unexpected = sorted(set(pieces) - given), sorted(given - set(pieces))
        if missing or unexpected:
            raise ValueError(
                f"state dict does not match the model: missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}; check that the config "
                "(layers, heads, tie_word_embeddings) matches the weights"
            )
        for name, dst in pieces.items():
            src = state_dict[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"{name} has shape {tuple(src.shape)} but the config gives {tuple(dst.shape)}; the config does "
                    "not describe these weights"
                )
            dst.copy_(src)

    def weight_bytes(self, tokens: int) -> int:
        """Bytes of weights one forward over ``tokens`` tokens reads: every matrix once, ``tokens`` embedding rows."""
        emb = self.tok_embeddings.weight
        total = sum(p.numel() * p.element_size() for p in self.parameters() if p is not emb)
        if self.args.tie_word_embeddings:
            total += emb.numel() * emb.element_size()  # read in full as the output projection
        return total + tokens * emb.shape[1] * emb.element_size()

    def forward(self, tokens: torch.Tensor, cache: KVCache, step: Step) -> torch.Tensor:
        """Logits of the packed new tokens of one step.

        Args:
            tokens: ``[T]`` int64, the new tokens of every sequence, concatenated.
            cache: the KV cache the attention layers write and read.
            step: biases and positions of this step (``KVCache.prefill_step`` / ``decode_step``);
                ``step.logit_rows`` picks the rows whose logits are computed (None: all ``T``).

        Returns:
            ``[len(logit_rows) or T, vocab_size]`` float32 logits.
        """
        x = self.tok_embeddings(tokens)  # [T, dim]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i, step, rows=step.logit_rows if i == last else None)
        return self.output(self.norm(x)).float()
