"""Making a model's attention context-parallel: ``context_parallel(model, group)``.

::

    cp = context_parallel(model, group, mode="ring", load_balance="zigzag")
    x_local = cp.shard(tokens)                        # this rank's tokens, [B, S/W]
    logits = model(x_local, positions=cp.positions(S))  # every attention call is context-parallel
    cp.remove()                                       # or: with context_parallel(model, group) as cp: ...

While ``model`` (or any of its submodules, so activation checkpointing's recomputation too, in whatever thread)
runs its forward, every call of ``triformers.ops.memory_efficient_attention`` (the function the attention
components ``ScaledDotProduct`` and ``MultiHeadDispatch`` call; also reached as ``triformers.ops.fmha.
memory_efficient_attention``) becomes :func:`~triformers.distributed.context_parallel.context_parallel_attention`
on the helper's group:
the inputs are this rank's shard of the sequence and the mask describes the whole sequence, exactly as in a
single-process run of the model on the full sequence. Elsewhere, and in other threads, attention is unchanged.
Only self-attention over the sharded sequence can run this way (no cross-attention, no KV cache).

What the helper does not do, and the caller must:

- shard the inputs (and labels) with :meth:`ContextParallel.shard` (or ``shard_sequence``), and compute the
  loss from the local tokens (summed over the ranks: every rank's loss normalised by the global token count);
- give position-dependent layers the *global* positions of the local tokens, :meth:`ContextParallel.positions`
  (a learned position table, rotary angles). ``RotaryEmbedding`` numbers the positions of its input from 0, so
  a model containing one (``MultiHeadDispatch(use_rotary_embeddings=True)``) is refused;
- sum the parameters' gradients over the group (the parameters are replicated; e.g. DDP over the group with
  each rank's loss the mean over its own tokens).

The routing replaces the ``memory_efficient_attention`` attribute of ``triformers.ops`` and
``triformers.ops.fmha`` while a helper is attached (restored when the last one is removed); a name bound
before, ``from triformers.ops import memory_efficient_attention``, keeps the plain function. A forward of the
model that made no routed call warns once.
"""

from __future__ import annotations

import functools
import importlib
import threading
import warnings
from typing import Any

import torch
from torch import nn

from triformers.ops.fmha import memory_efficient_attention as _plain_attention

from .context_parallel import MODES, context_parallel_attention
from .sharding import check_load_balance, gather_sequence, resolve_group, shard_positions, shard_sequence

__all__ = ["context_parallel", "ContextParallel"]

_ROUTED_MODULES = ("triformers.ops", "triformers.ops.fmha")  # where the attention function is looked up
_state = threading.local()  # .stack: the helpers whose model's forward this thread is running, innermost last
_originals: dict[str, Any] = {}
_attached: list[ContextParallel] = []


def _stack() -> list[ContextParallel]:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


@functools.wraps(_plain_attention)
def _routed_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None, output_dtype=None):
    stack = _stack()
    if not stack:
        return _plain_attention(query, key, value, attn_bias, p, scale, op=op, output_dtype=output_dtype)
    cp = stack[-1]
    if op is not None or output_dtype is not None:
        raise ValueError(
            f"memory_efficient_attention under context_parallel picks its operators and output dtype itself, got "
            f"op={op!r}, output_dtype={output_dtype!r}; drop them, or remove the context-parallel helper"
        )
    cp._calls += 1
    return context_parallel_attention(
        query, key, value, attn_bias, p, scale, group=cp.group, mode=cp.mode, load_balance=cp.load_balance
    )


class ContextParallel:
    """The attachment of :func:`context_parallel` to a module; a context manager that removes it on exit.

    Attributes:
        module, group (``ProcessGroup``), mode, load_balance: as given to :func:`context_parallel`.
    """

    def __init__(self, module: nn.Module, group: Any, mode: str, load_balance: str) -> None:
        fn = "context_parallel"
        if not isinstance(module, nn.Module):
            raise ValueError(f"{fn}: module must be a torch.nn.Module, got {type(module).__name__}")
        if mode not in MODES:
            raise ValueError(f"{fn}: mode must be one of {MODES}, got mode={mode!r}")
        check_load_balance(load_balance, fn)
        # imported here: the components import the operators, whose package imports this one
        from triformers.components.positional_embedding.rotary import RotaryEmbedding

        for name, sub in module.named_modules():
            if isinstance(sub, RotaryEmbedding):
                raise ValueError(
                    f"{fn}: {name or 'the module'} is a RotaryEmbedding, which rotates each rank's shard as if it "
                    "started at position 0; build the attention without it (use_rotary_embeddings=False) and "
                    "rotate q/k at the global positions ContextParallel.positions(S) gives"
                )
        self.module, self.group, self.mode, self.load_balance = module, resolve_group(group, fn), mode, load_balance
        self._calls = 0
        self._entry_calls: list[int] = []
        self._warned = False
        self._handles = []
        for sub in module.modules():
            self._handles.append(sub.register_forward_pre_hook(self._enter))
            self._handles.append(sub.register_forward_hook(self._exit, always_call=True))
        if not _attached:
            for name in _ROUTED_MODULES:
                target = importlib.import_module(name)
                _originals[name] = target.memory_efficient_attention
                target.memory_efficient_attention = _routed_attention
        _attached.append(self)

    @property
    def world_size(self) -> int:
        return self.group.size()

    @property
    def rank(self) -> int:
        return self.group.rank()

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of the full ``x`` (:func:`~triformers.distributed.shard_sequence`)."""
        return shard_sequence(x, dim, group=self.group, load_balance=self.load_balance)

    def gather(self, x_local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The full tensor from every rank's shard (:func:`~triformers.distributed.gather_sequence`)."""
        return gather_sequence(x_local, dim, group=self.group, load_balance=self.load_balance)

    def positions(self, seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Global positions of this rank's tokens (:func:`~triformers.distributed.shard_positions`)."""
        return shard_positions(seq_len, group=self.group, load_balance=self.load_balance, device=device)

    def remove(self) -> None:
        """Detach: the module's attention is plain again (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self in _attached:
            _attached.remove(self)
            if not _attached:
                for name, original in _originals.items():
                    target = importlib.import_module(name)
                    if target.memory_efficient_attention is _routed_attention:
                        target.memory_efficient_attention = original
                _originals.clear()

    def __enter__(self) -> ContextParallel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _enter(self, module: nn.Module, args: Any) -> None:
        _stack().append(self)
        if module is self.module:
            self._entry_calls.append(self._calls)

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = _stack()
        if stack and stack[-1] is self:
            stack.pop()
        if module is self.module and self._entry_calls:
            if self._entry_calls.pop() == self._calls and not self._warned:
                self._warned = True
                warnings.warn(
                    f"context_parallel: a forward of {type(module).__name__} made no call of "
                    "triformers.ops.memory_efficient_attention, so nothing ran context-parallel; does it call "
                    "attention through a name imported before context_parallel() (from triformers.ops import "
                    "memory_efficient_attention), or another attention function?",
                    stacklevel=2,
                )


def context_parallel(
    module: nn.Module, group: Any = None, *, mode: str = "ring", load_balance: str = "zigzag"
) -> ContextParallel:
    """Make ``module``'s attention calls context-parallel over ``group`` (see the module docstring).

    Args:
        module: the model (or the part of it that runs on the sharded sequence).
        group: a ``ProcessGroup``, a 1-D ``DeviceMesh`` (e.g. ``mesh["cp"]``), or None (all ranks).
        mode: ``"ring"`` or ``"all_to_all"`` (:func:`~triformers.distributed.context_parallel_attention`).
        load_balance: ``"zigzag"`` or ``"contiguous"``; :meth:`ContextParallel.shard` shards accordingly.

    Returns:
        The attachment: use it as a context manager, or call ``remove()``; it shards, gathers and gives
        positions with the same group and layout.

    Raises:
        ValueError: not a module, a bad group, mode or load balance, or a ``RotaryEmbedding`` inside.
    """
    return ContextParallel(module, group, mode, load_balance)
