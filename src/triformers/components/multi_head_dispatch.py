"""Multi-head attention around any registered attention (xFormers' ``MultiHeadDispatch``)."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from triformers.components._registry import config_to_kwargs
from triformers.components.attention import Attention, build_attention
from triformers.components.attention.attention_mask import AttentionMask
from triformers.components.attention.utils import combine_masks
from triformers.components.in_proj_container import InputProjection, InputProjectionConfig
from triformers.components.positional_embedding.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)


@dataclass
class MultiHeadDispatchConfig:
    dim_model: int
    num_heads: int
    attention: Attention
    bias: Any
    residual_dropout: float
    dim_key: int | None
    dim_value: int | None
    in_proj_container: InputProjection | None
    use_separate_proj_weight: bool | None
    use_rotary_embeddings: bool | None
    out_proj: nn.Module | None


def _fold_heads(t: torch.Tensor, B: int, S: int, H: int, Hs: int) -> torch.Tensor:
    return t.view(B, S, H, Hs).transpose(1, 2).flatten(start_dim=0, end_dim=1)  # [B*H, S, Hs]


def _split_heads(t: torch.Tensor, B: int, S: int, H: int, Hs: int) -> torch.Tensor:
    return t.view(B, S, H, Hs).transpose(1, 2)  # [B, H, S, Hs]


class MultiHeadDispatch(nn.Module):
    """Project q/k/v, split heads, run ``attention`` on every head, merge heads, project out.

    Shapes: query ``[B, Sq, E]``, key/value ``[B, Sk, E]`` (default: the query; a batch of 1 broadcasts)
    -> ``[B, Sq, E]``. The attention receives ``[B*H, S, Dh]`` (or ``[B, H, S, Dh]`` if it asks for the head
    dimension, or the raw inputs if it skips the multi-head machinery).

    Args:
        dim_model: model dimension E (divisible by ``num_heads``).
        num_heads: number of heads H.
        attention: the attention module (see ``build_attention``).
        bias: biases of the (q, k, v, out) projections (default all True; a bool applies to all four).
        residual_dropout: dropout on the output (default 0.0).
        use_separate_proj_weight: False ties the k/v projection weights to q's (default True).
        dim_key: q/k projection size (default E).
        dim_value: v projection size (default E).
        in_proj_container: custom input projections (default built from the above).
        use_rotary_embeddings: rotate q and k per head (default False).
        out_proj: custom output projection (default ``nn.Linear(dim_value, E)``, zero bias).

    Masks: ``att_mask`` bool (True = attend), additive float or AttentionMask, ``[Sq, Sk]``, ``[B, Sq, Sk]``
    or ``[B*H, Sq, Sk]``; ``key_padding_mask`` ``[B, Sk]`` bool (True = keep) or additive. An attention that
    cannot apply a given mask raises instead of ignoring it.
    """

    def __init__(
        self,
        dim_model: int,
        num_heads: int,
        attention: Attention,
        bias: tuple[bool, bool, bool, bool] | bool = (True, True, True, True),
        residual_dropout: float = 0.0,
        use_separate_proj_weight: bool = True,
        dim_key: int | None = None,
        dim_value: int | None = None,
        in_proj_container: InputProjection | None = None,
        use_rotary_embeddings: bool | None = False,
        out_proj: nn.Module | None = None,
        *args,
        **kwargs,
    ) -> None:
        super().__init__()
        if isinstance(bias, bool):
            bias = (bias,) * 4
        bias = tuple(bias)
        if len(bias) != 4:
            raise ValueError(f"bias must be a bool or 4 bools (q, k, v, out), got {bias!r}")
        if num_heads <= 0 or dim_model % num_heads:
            raise ValueError(
                f"dim_model={dim_model} must be a positive multiple of num_heads={num_heads}; each head "
                "works on "
                "dim_model / num_heads features"
            )
        dim_key, dim_value = dim_key or dim_model, dim_value or dim_model
        for name, dim in (("dim_key", dim_key), ("dim_value", dim_value)):
            if dim % num_heads:
                raise ValueError(f"{name}={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dim_key_head = dim_key // num_heads
        self.dim_value = dim_value
        self.dim_model = dim_model
        self.attention = attention
        skip = attention.requires_skip_multi_head
        self.in_proj_container = None
        if attention.requires_input_projection and not skip:
            self.in_proj_container = in_proj_container or InputProjection(
                query_proj_params=InputProjectionConfig(dim_model, dim_key, bias=bias[0]),
                key_proj_params=InputProjectionConfig(dim_model, dim_key, bias=bias[1]),
                value_proj_params=InputProjectionConfig(dim_model, dim_value, bias=bias[2]),
                use_separate_proj_weight=use_separate_proj_weight,
            )
        self.rotary_embeddings = (
            RotaryEmbedding(self.dim_key_head) if use_rotary_embeddings and not skip else None
        )
        self.resid_drop = nn.Dropout(residual_dropout, inplace=False)
        self.proj = None
        if not skip:
            self.proj = out_proj if out_proj is not None else nn.Linear(dim_value, dim_model, bias=bias[3])
            if isinstance(self.proj, nn.Linear) and self.proj.bias is not None:
                nn.init.zeros_(self.proj.bias)

    @classmethod
    def from_config(cls, config: MultiHeadDispatchConfig) -> MultiHeadDispatch:
        return cls(**config_to_kwargs(config))

    def _check_and_merge_masks(self, B, S_Q, S_K, att_mask, key_padding_mask) -> dict[str, Any]:
        attention = self.attention
        name = type(attention).__name__
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (B, S_K):
                raise ValueError(
                    f"key_padding_mask.shape={tuple(key_padding_mask.shape)}; expected (batch, key length) "
                    f"= {(B, S_K)}"
                )
            if not attention.supports_key_padding_mask:
                if not attention.supports_attention_mask:
                    raise ValueError(
                        f"{name} supports neither att_mask nor key_padding_mask; drop the mask or pick "
                        "another attention"
                    )
                kpm = key_padding_mask[:, None, :]  # [B, 1, Sk]
                if isinstance(att_mask, AttentionMask):
                    att_mask = att_mask.values
                if (
                    att_mask is not None
                    and att_mask.ndim == 3
                    and att_mask.shape[0] == B * self.num_heads > B
                ):
                    kpm = kpm.repeat_interleave(self.num_heads, dim=0)
                att_mask = combine_masks(att_mask, kpm)
                key_padding_mask = None
        kwargs: dict[str, Any] = {}
        if att_mask is not None:
            if not attention.supports_attention_mask:
                raise ValueError(
                    f"{name} does not support att_mask (got a mask of shape {tuple(att_mask.shape)}); use an "
                    "attention that does, e.g. scaled_dot_product, local or random"
                )
            kwargs["att_mask"] = att_mask
        if key_padding_mask is not None:
            kwargs["key_padding_mask"] = key_padding_mask
        return kwargs

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        att_mask: torch.Tensor | AttentionMask | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Multi-head attention ``[B, Sq, E] -> [B, Sq, E]`` (see the class docstring for masks)."""
        key = query if key is None else key
        value = query if value is None else value
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.ndim != 3:
                raise ValueError(f"{name} must be [batch, sequence, features], got shape={tuple(t.shape)}")
        if query.shape[0] != key.shape[0] or query.shape[0] != value.shape[0]:
            max_batch = max(query.shape[0], key.shape[0], value.shape[0])
            query, key, value = (x.expand(max_batch, -1, -1) for x in (query, key, value))
        B, S_Q, _ = query.shape
        S_K = key.shape[1]
        attention = self.attention
        if S_Q != S_K:
            if attention.requires_same_k_q_dimensions:
                raise ValueError(
                    f"{type(attention).__name__} needs equal query and key lengths, got {S_Q} and {S_K}; "
                    "pad them"
                )
            if getattr(attention, "causal", False):
                raise ValueError(
                    f"causal attention with query length {S_Q} != key length {S_K} is ill-defined; pad the "
                    "sequences"
                )
        if attention.requires_squared_context and math.isqrt(S_Q) ** 2 != S_Q:
            raise ValueError(
                f"{type(attention).__name__} needs a square token grid: sequence length {S_Q} is not a "
                "perfect square"
            )
        mask_kwargs = self._check_and_merge_masks(B, S_Q, S_K, att_mask, key_padding_mask)

        if attention.requires_skip_multi_head:
            return attention(query, key, value, **mask_kwargs)
        if self.in_proj_container is not None:
            q, k, v = self.in_proj_container(query=query, key=key, value=value)
        else:
            q, k, v = query, key, value
        for name, t in (("projected query", q), ("projected key", k), ("projected value", v)):
            if t.shape[-1] % self.num_heads:
                raise ValueError(
                    f"the {name} has {t.shape[-1]} features, not divisible by {self.num_heads} heads"
                )
        dv = v.shape[-1] // self.num_heads
        dk = k.shape[-1] // self.num_heads
        if self.rotary_embeddings is not None or attention.requires_head_dimension:
            q = _split_heads(q, B, S_Q, self.num_heads, dk)
            k = _split_heads(k, B, S_K, self.num_heads, dk)
            v = _split_heads(v, B, S_K, self.num_heads, dv)
            if self.rotary_embeddings is not None:
                q, k = self.rotary_embeddings(q=q, k=k)
            if not attention.requires_head_dimension:
                q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        else:
            q = _fold_heads(q, B, S_Q, self.num_heads, dk)
            k = _fold_heads(k, B, S_K, self.num_heads, dk)
            v = _fold_heads(v, B, S_K, self.num_heads, dv)

        y = attention(q, k, v, **mask_kwargs)
        y = (
            y.reshape(B, self.num_heads, S_Q, -1).transpose(1, 2).flatten(start_dim=2, end_dim=3)
        )  # [B, Sq, Dv]
        return self.resid_drop(self.proj(y))


def build_multi_head_attention(
    multi_head_config: MultiHeadDispatchConfig | dict[str, Any],
) -> MultiHeadDispatch:
    """Build a MultiHeadDispatch from a config or a dict whose ``attention`` is a module or a dict.

    A dict attention gets ``num_heads``, ``dim_model``, ``dim_head`` and ``dim_features``
    (``dim_model // num_heads``) filled in when absent, then goes through ``build_attention``.
    The input dict is not modified.
    """
    if not isinstance(multi_head_config, MultiHeadDispatchConfig):
        cfg = dict(multi_head_config)
        for f in fields(MultiHeadDispatchConfig):
            cfg.setdefault(f.name, None)
        for required in ("dim_model", "num_heads", "attention"):
            if cfg[required] is None:
                raise ValueError(f"multi-head config is missing {required!r}: {sorted(multi_head_config)}")
        if not isinstance(cfg["attention"], Attention):
            att = copy.copy(dict(cfg["attention"]))
            att.setdefault("num_heads", cfg["num_heads"])
            att.setdefault("dim_model", cfg["dim_model"])
            head_dim = cfg["dim_model"] // cfg["num_heads"]
            if att.get("dim_features") is None:
                att["dim_features"] = head_dim
            if att.get("dim_head") is None:
                att["dim_head"] = head_dim
            cfg["attention"] = build_attention(att)
        known = {f.name for f in fields(MultiHeadDispatchConfig)}
        multi_head_config = MultiHeadDispatchConfig(**{k: v for k, v in cfg.items() if k in known})
    return MultiHeadDispatch.from_config(multi_head_config)
