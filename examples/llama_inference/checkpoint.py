"""Loading Llama weights from disk: HuggingFace directories and Meta's original format. Nothing is downloaded.

* HuggingFace: ``config.json`` plus ``*.safetensors`` (read with the ``safetensors`` package) or
  ``pytorch_model*.bin``.
* Meta: ``params.json`` plus ``consolidated.NN.pth`` (several files: model-parallel shards, concatenated
  back). Meta's q/k projections order each head's features for RoPE on adjacent pairs; they are permuted
  into HuggingFace's half-split order (``adjacents=False``), as transformers' own converter does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from examples.llama_inference.model import ModelArgs, Transformer

__all__ = ["load_checkpoint", "meta_to_hf", "hf_to_meta", "read_hf_weights", "read_meta_weights"]

# Meta shard layout: column-parallel matrices are split along dim 0, row-parallel ones along dim 1; norms are
# replicated. The embedding is split along the vocabulary (Llama 3) or the features (Llama 2): told by its shape.
_META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's adjacent-pair feature order of q/k rows -> HuggingFace's half-split order, per head."""
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`_permute`."""
    out, dim = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)


_META_LAYER = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_META_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}  # fmt: skip


def meta_to_hf(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Meta names and q/k feature order -> ``LlamaForCausalLM``'s (``rope.freqs`` is dropped)."""
    out = {hf: sd[meta] for meta, hf in _META_TOP.items() if meta in sd}
    for i in range(args.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        out[h + "self_attn.q_proj.weight"] = _permute(sd[m + "attention.wq.weight"], args.n_heads)
        out[h + "self_attn.k_proj.weight"] = _permute(sd[m + "attention.wk.weight"], args.n_kv_heads)
        for meta, hf in _META_LAYER.items():
            out[h + hf] = sd[m + meta]
    return out


def hf_to_meta(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Inverse of :func:`meta_to_hf` (writes Meta-format checkpoints, e.g. in tests)."""
    out = {meta: sd[hf] for meta, hf in _META_TOP.items() if hf in sd}
    for i in range(args.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        out[m + "attention.wq.weight"] = _unpermute(sd[h + "self_attn.q_proj.weight"], args.n_heads)
        out[m + "attention.wk.weight"] = _unpermute(sd[h + "self_attn.k_proj.weight"], args.n_kv_heads)
        for meta, hf in _META_LAYER.items():
            out[m + meta] = sd[h + hf]
    return out


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HuggingFace directory's ``*.safetensors`` (or ``pytorch_model*.bin``) files.

    Raises:
        FileNotFoundError: no weight files. ImportError: safetensors files without the ``safetensors`` package.
    """
    files = sorted(directory.glob("*.safetensors"))
    sd: dict[str, torch.Tensor] = {}
    if files:
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"{directory} holds .safetensors weights: pip install safetensors") from e
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{directory} has config.json but no *.safetensors or pytorch_model*.bin weights")
    for f in files:
        sd.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
    return sd


def read_meta_weights(directory: Path, dim: int) -> dict[str, torch.Tensor]:
    """Meta's ``consolidated.NN.pth`` shards of ``directory``, concatenated back into whole tensors."""
    files = sorted(directory.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{directory} has params.json but no consolidated.*.pth weights")
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    if len(shards) == 1:
        return shards[0]
    sd = {}
    for name, first in shards[0].items():
        kind = name.split(".")[-2]
        if first.ndim < 2:
            sd[name] = first  # replicated
        elif kind == "tok_embeddings":
            sd[name] = torch.cat([s[name] for s in shards], dim=0 if first.shape[1] == dim else 1)
        else:
            sd[name] = torch.cat([s[name] for s in shards], dim=_META_SPLIT_DIM[kind])
    return sd


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    max_seq_len: int | None = None) -> Transformer:  # fmt: skip
    """A model with the weights of a HuggingFace or Meta checkpoint directory.

    Args:
        path: a directory with ``config.json`` (HuggingFace) or ``params.json`` (Meta).
        device, dtype: where the model lives (weights are cast as they are copied in).
        max_seq_len: overrides the longest sequence of the config (Meta's params.json has none).

    Raises:
        FileNotFoundError: neither config file, or no weights. ValueError: weights that do not fit the config.
    """
    path = Path(path)
    if (path / "config.json").is_file():
        args = ModelArgs.from_hf_config(json.loads((path / "config.json").read_text()))
        sd = read_hf_weights(path)
    elif (path / "params.json").is_file():
        params = json.loads((path / "params.json").read_text())
        meta = read_meta_weights(path, params["dim"])
        if params.get("vocab_size", -1) <= 0:  # Llama 2 writes -1: the tokenizer's size, as the embedding has
            params["vocab_size"] = meta["tok_embeddings.weight"].shape[0]
        args = ModelArgs.from_meta_params(params)
        args.tie_word_embeddings = "output.weight" not in meta  # Llama 3.2's small models share the embedding
        sd = meta_to_hf(meta, args)
    else:
        raise FileNotFoundError(f"{path} has neither config.json (HuggingFace) nor params.json (Meta)")
    if max_seq_len is not None:
        args.max_seq_len = max_seq_len
    model = Transformer.empty(args, device=device, dtype=dtype)
    model.from_hf_state_dict(sd)
    return model
