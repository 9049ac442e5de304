"""``AttentionMask``: an additive attention mask with a causal flag (xFormers' ``attention_mask.py``)."""

from __future__ import annotations

import torch


class AttentionMask:
    """An additive mask: 0 where attention is computed, -inf where it is skipped, any other value biases.

    Shape ``[B | 1, S_to, S_from]`` (a 2-D mask gets a leading 1). ``seq_len`` is the query length
    (``shape[1]``), ``to_seq_len`` the key length (``shape[2]``).

    Args:
        additive_mask: floating-point tensor, ``[S_q, S_k]`` or ``[B, S_q, S_k]``, no grad.
        is_causal: the mask is the causal (lower-triangular, top-left) mask; lets the attention use a
            dedicated causal path (default False).

    Raises:
        ValueError: if the mask is not floating point, requires grad or has fewer than 2 dims.
    """

    def __init__(self, additive_mask: torch.Tensor, is_causal: bool = False) -> None:
        if not additive_mask.is_floating_point():
            raise ValueError(
                f"AttentionMask takes an additive float mask, got dtype={additive_mask.dtype}; "
                "use AttentionMask.from_bool for a boolean mask (True = attend)"
            )
        if additive_mask.requires_grad:
            raise ValueError("AttentionMask values must not require grad; pass mask.detach()")
        if additive_mask.ndim == 2:
            additive_mask = additive_mask.unsqueeze(0)
        if additive_mask.ndim != 3:
            raise ValueError(
                f"AttentionMask expects [S_q, S_k] or [B, S_q, S_k], got shape={tuple(additive_mask.shape)}"
            )
        self.values = additive_mask
        self.is_causal = is_causal
        self.seq_len = additive_mask.shape[1]
        self.to_seq_len = additive_mask.shape[2]

    def to_bool(self) -> torch.Tensor:
        """Boolean form: True where the value is not -inf (attention is computed)."""
        return self.values != float("-inf")

    @classmethod
    def from_bool(cls, x: torch.Tensor) -> AttentionMask:
        """From a boolean pattern, True = attend."""
        if x.dtype != torch.bool:
            raise ValueError(f"from_bool expects a bool tensor, got dtype={x.dtype}; use from_multiplicative")
        additive = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        additive.masked_fill_(~x, float("-inf"))
        return cls(additive)

    @classmethod
    def from_multiplicative(cls, x: torch.Tensor) -> AttentionMask:
        """From a multiplicative (0/1) mask: non-zero = attend."""
        if x.dtype == torch.bool:
            raise ValueError("from_multiplicative expects a numeric 0/1 tensor; use from_bool for a bool tensor")
        return cls.from_bool(x != 0)

    @classmethod
    def make_causal(
        cls,
        seq_len: int,
        to_seq_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> AttentionMask:
        """The causal mask ``[1, seq_len, to_seq_len]``: query i attends keys j <= i (top-left aligned)."""
        to_seq_len = to_seq_len or seq_len
        dtype = dtype or torch.float32
        additive = torch.full((seq_len, to_seq_len), float("-inf"), device=device, dtype=dtype).triu(diagonal=1)
        return cls(additive, is_causal=True)

    def make_crop(self, seq_len: int, to_seq_len: int | None = None) -> AttentionMask:
        """A view of the top-left ``[seq_len, to_seq_len]`` corner (keeps ``is_causal``)."""
        to_seq_len = to_seq_len or seq_len
        return AttentionMask(self.values[:, :seq_len, :to_seq_len], is_causal=self.is_causal)

    def __repr__(self) -> str:
        return f"AttentionMask(shape={tuple(self.values.shape)}, is_causal={self.is_causal})"

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def is_sparse(self) -> bool:
        return False

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def __add__(self, other: AttentionMask) -> AttentionMask:
        """Sum of the additive values: the logical AND of two masks (the result is not flagged causal)."""
        if not isinstance(other, AttentionMask):
            raise TypeError(f"can only add an AttentionMask to an AttentionMask, got {type(other).__name__}")
        return AttentionMask(self.values + other.values, is_causal=False)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AttentionMask:
        """Move / cast; returns ``self`` when nothing changes, and keeps ``is_causal``."""
        device = torch.device(device) if isinstance(device, str) else device
        same_device = device is None or device == self.device
        same_dtype = dtype is None or dtype == self.dtype
        if same_device and same_dtype:
            return self
        return AttentionMask(self.values.to(device=device, dtype=dtype), self.is_causal)
