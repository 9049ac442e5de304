"""Rotary position embeddings (Su et al., RoFormer), applied to queries and keys per head."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with the tables cropped to x's sequence length (dim -2)."""
    cos = cos[..., : x.shape[-2], :]
    sin = sin[..., : x.shape[-2], :]
    return (x * cos) + (rotate_half(x) * sin)


class RotaryEmbedding(torch.nn.Module):
    """Rotates pairs ``(x_i, x_{i + D/2})`` by ``s * theta_i``, ``theta_i = 10000^(-2i/D)``, s the position.

    Shapes: q ``[..., Sq, D]``, k ``[..., Sk, D]`` (D even) -> same shapes. Positions count from 0 for both.

    Args:
        dim_model: the per-head dimension D.
    """

    def __init__(self, dim_model: int, *_, **__) -> None:
        super().__init__()
        if dim_model % 2:
            raise ValueError(
                f"rotary embeddings rotate pairs of features: dim_model must be even, got {dim_model}"
            )
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim_model, 2).float() / dim_model))
        self.register_buffer("inv_freq", inv_freq)
        self._seq_len_cached: int | None = None
        self._cos_cached: torch.Tensor | None = None
        self._sin_cached: torch.Tensor | None = None

    def _update_cos_sin_tables(self, x: torch.Tensor, seq_dimension: int = -2):
        seq_len = x.shape[seq_dimension]
        if (
            seq_len != self._seq_len_cached
            or self._cos_cached is None
            or self._cos_cached.device != x.device
            or self._cos_cached.dtype != x.dtype
        ):
            self._seq_len_cached = seq_len
            t = torch.arange(seq_len, device=x.device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device=x.device, dtype=torch.float32))
            emb = torch.cat((freqs, freqs), dim=-1)  # angles in float32, then cast
            self._cos_cached = emb.cos()[None, None].to(x.dtype)
            self._sin_cached = emb.sin()[None, None].to(x.dtype)
        return self._cos_cached, self._sin_cached

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        longest = q if q.shape[-2] > k.shape[-2] else k
        cos, sin = self._update_cos_sin_tables(longest, seq_dimension=-2)
        return apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)
