"""Base class and config of every attention mechanism (xFormers' ``components/attention/base.py``)."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from triformers.components._registry import config_to_kwargs


@dataclass
class AttentionConfig:
    """Fields every attention config has.

    Attributes:
        name: registered name of the attention, e.g. ``"scaled_dot_product"``.
        dropout: dropout probability on the attention weights.
    """

    name: str
    dropout: float


class Attention(nn.Module, metaclass=ABCMeta):
    """An attention mechanism, called by :class:`MultiHeadDispatch` on per-head tensors.

    Unless ``requires_head_dimension`` is set, q/k/v arrive with the heads folded into the batch:
    ``[B*H, S, Dh]``; with it, ``[B, H, S, Dh]``. Subclasses set these flags in ``__init__``:

    - ``requires_input_projection`` (True): MultiHeadDispatch projects q/k/v first.
    - ``requires_head_dimension`` (False): receive ``[B, H, S, Dh]`` instead of ``[B*H, S, Dh]``.
    - ``requires_separate_masks`` (False): masks are passed separately, not merged.
    - ``requires_same_k_q_dimensions`` (False): query and key must have the same sequence length.
    - ``requires_skip_multi_head`` (False): the attention gets the raw ``[B, S, E]`` inputs and owns
      the whole multi-head computation (its output is MultiHeadDispatch's output).
    - ``requires_squared_context`` (False): the sequence length must be a perfect square (2-D tokens).
    - ``supports_attention_mask`` (True): ``forward`` takes ``att_mask``.
    - ``supports_key_padding_mask`` (False): ``forward`` takes ``key_padding_mask``.

    Constructors accept ``*args, **kwargs`` so one config dict can feed several attentions.
    """

    def __init__(self, dropout: float | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.requires_input_projection = True
        self.requires_head_dimension = False
        self.requires_separate_masks = False
        self.requires_same_k_q_dimensions = False
        self.requires_skip_multi_head = False
        self.requires_squared_context = False
        self.supports_attention_mask = True
        self.supports_key_padding_mask = False

    @classmethod
    def from_config(cls, config: AttentionConfig) -> Attention:
        """Build from a config: only its non-None fields reach the constructor."""
        return cls(**config_to_kwargs(config))

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _maybe_pad_sequence(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Zero-pad the sequence dim (-2) of ``x`` up to ``mask.shape[-1]``."""
        pad = mask.shape[-1] - x.shape[-2]
        if pad > 0:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad), mode="constant", value=0.0)
        return x
