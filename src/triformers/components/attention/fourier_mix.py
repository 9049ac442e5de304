"""FNet token mixing (Lee-Thorp et al., 2021): the real part of a 2-D Fourier transform."""

from __future__ import annotations

import torch

from triformers.components.attention._registry import register_attention
from triformers.components.attention.base import Attention, AttentionConfig


@register_attention("fourier_mix", AttentionConfig)
class FourierMix(Attention):
    """``Re(FFT2(q))`` over the sequence and feature dims; k and v are ignored.

    Shapes: q ``[N, S, D]`` -> ``[N, S, D]``. No input projection, no masks, mixes every position.

    Args:
        dropout: dropout on the output (default 0.0).
    """

    def __init__(self, dropout: float = 0.0, *_, **__) -> None:
        super().__init__()
        self.attn_drop = torch.nn.Dropout(dropout, inplace=False)
        self.requires_input_projection = False
        self.supports_attention_mask = False

    def forward(self, q: torch.Tensor, *_, **__) -> torch.Tensor:
        with torch.autocast(device_type=q.device.type, enabled=False):
            x = q if q.dtype in (torch.float32, torch.float64) else q.float()  # no half-precision FFT
            att = torch.fft.fft2(x).real.to(q.dtype)
        return self.attn_drop(att)
