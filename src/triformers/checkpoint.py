"""Selective activation checkpointing (xFormers' ``xformers.checkpoint``) on torch's selective-checkpoint contexts.

Plain checkpointing keeps only a block's inputs and recomputes the whole block in the backward. Selective
checkpointing keeps the outputs of the operators a policy names and recomputes the rest: keeping the matmuls
and attention (expensive to recompute, cheap to keep relative to their cost) and recomputing the elementwise
ops (norms, activations, dropout: cheap to recompute, as large as their inputs) saves most of the memory for
a few percent of time::

    from triformers.checkpoint import checkpoint
    y = checkpoint(block, x, policy_fn=["triformers.flash_fwd.default", "aten.mm.default"])

A policy is a list of operators (``torch.ops.aten.mm.default`` objects or their names as printed by
:func:`list_operators`: ``"aten.mm.default"``, or ``"aten.mm"`` for every overload), or a callable
``policy_fn(ctx, func, *args, **kwargs) -> bool`` (True: keep ``func``'s output; a
``torch.utils.checkpoint.CheckpointPolicy`` is accepted too). ``None`` is :data:`DEFAULT_ALLOW_LIST`:
attention (our Triton kernels' ``triformers::flash_fwd`` and torch's fused SDPA kernels), the matmuls, and
the sequence-parallel matmuls of :mod:`triformers.ops.seqpar` / ``sequence_parallel_fused_ops`` (recomputing
them would repeat their communication). Our attention is a ``torch.library`` custom op, so the policy sees it
by name under checkpointing (the fused layers of :mod:`triformers.triton` are not: they are always recomputed,
which is what a policy would choose for them anyway).

:func:`get_optimal_checkpoint_policy` chooses the operators for a memory budget by solving xFormers' 0/1
program (maximise the runtime kept, under ``budget x`` the memory of keeping everything) with scipy's MILP
solver (``pip install scipy``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import create_selective_checkpoint_contexts

from triformers._checkpoint_optimal import (  # noqa: F401  (re-exported)
    OPS_TO_ALWAYS_SKIP,
    PROFILE_RUNS,
    Policy,
    _optimize_runtime_with_given_memory,
    get_optimal_checkpoint_policy,
)

try:  # builds without torch.distributed lack the wrapper base class; it only strips a state-dict prefix
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper
except ImportError:  # pragma: no cover
    ActivationWrapper = None

__all__ = [
    "checkpoint",
    "list_operators",
    "selective_checkpoint_context_fn",
    "selective_checkpoint_wrapper",
    "SelectiveCheckpointWrapper",
    "get_optimal_checkpoint_policy",
    "DEFAULT_ALLOW_LIST",
    "OPS_TO_ALWAYS_SKIP",
]

DEFAULT_ALLOW_LIST = [
    "triformers.flash_fwd.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "triformers.sequence_parallel_leading_matmul_fwd.default",
    "triformers.sequence_parallel_trailing_matmul_fwd.default",
    "triformers.fused_allgather_and_linear.default",
    "triformers.fused_linear_and_reducescatter.default",
    "aten.addmm.default",
    "aten.mm.default",
]


def _op_names(ops: list) -> frozenset[str]:
    names = set()
    for op in ops:
        if isinstance(op, str):
            names.add(op)
        elif isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
            names.add(str(op))
        else:
            raise ValueError(
                f"policy_fn list entries must be operators (torch.ops.aten.mm.default) or their names "
                f"('aten.mm.default', 'aten.mm'), got {op!r} of type {type(op).__name__}"
            )
    return frozenset(names)


def _allow_list_policy(ops: list) -> Policy:
    names = _op_names(ops)

    def policy(ctx, func, *args, **kwargs) -> bool:
        return str(func) in names or str(getattr(func, "overloadpacket", func)) in names

    return policy


def _as_policy(policy_fn: Policy | list | None) -> Policy:
    if policy_fn is None:
        return _allow_list_policy(DEFAULT_ALLOW_LIST)
    if isinstance(policy_fn, (list, tuple)):
        return _allow_list_policy(list(policy_fn))
    if not callable(policy_fn):
        raise ValueError(
            f"policy_fn must be None, a list of operators or a callable policy_fn(ctx, func, *args, **kwargs) -> "
            f"bool, got {policy_fn!r}"
        )
    return policy_fn


def selective_checkpoint_context_fn(policy_fn: Policy | list | None = None):
    """The ``context_fn`` of ``torch.utils.checkpoint.checkpoint`` that keeps what ``policy_fn`` selects.

    Each call makes a fresh copy of the policy (stateful policies, such as the optimal one, count operators
    from the start of every checkpointed call). Cached outputs may be mutated in place by later operators.

    Returns:
        The ``(caching, recomputing)`` context managers of torch's ``create_selective_checkpoint_contexts``.
    """
    policy = copy.deepcopy(_as_policy(policy_fn))
    return create_selective_checkpoint_contexts(policy, allow_cache_entry_mutation=True)


def checkpoint(
    function: Callable[..., Any],
    *args: Any,
    preserve_rng_state: bool = True,
    policy_fn: Policy | list | None = None,
    **kwargs: Any,
) -> Any:
    """``function(*args, **kwargs)`` with selective activation checkpointing (non-reentrant).

    Args:
        function: the block to checkpoint.
        *args, **kwargs: its inputs (``**kwargs`` also go to ``torch.utils.checkpoint.checkpoint``, e.g.
            ``determinism_check``).
        preserve_rng_state: restore the random state before recomputing, so dropout draws the same mask.
        policy_fn: what to keep (see the module docstring); None: :data:`DEFAULT_ALLOW_LIST`.

    Returns:
        What ``function`` returns.
    """
    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state,
        context_fn=functools.partial(selective_checkpoint_context_fn, policy_fn), **kwargs,
    )  # fmt: skip


class _RecordOperators(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.operators: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operators.append(func)
        return func(*args, **(kwargs or {}))


def list_operators(function: Callable[..., Any], *args: Any, **kwargs: Any) -> list:
    """The operators (``OpOverload`` objects, in call order) that ``function(*args, **kwargs)`` dispatches.

    ``str(op)`` is the name a policy list takes, e.g. ``"aten.addmm.default"`` or ``"triformers.flash_fwd.default"``.
    """
    mode = _RecordOperators()
    with mode:
        function(*args, **kwargs)
    return mode.operators


# ------------------------------------------------------------------------------------------------------------
# The optimal policy for a memory budget
# ------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------
# Module wrapper
# ------------------------------------------------------------------------------------------------------------

_Base = ActivationWrapper if ActivationWrapper is not None else torch.nn.Module


class SelectiveCheckpointWrapper(_Base):
    """A module whose forward runs under :func:`checkpoint` with a given policy or one optimal for a budget.

    Exactly one of ``memory_budget`` and ``policy_fn`` must be given. The optimal policy is computed on the
    first forward with gradients and, under ``torch.distributed`` with several ranks, broadcast from rank 0 so
    that every rank keeps the same operators. State-dict keys are the wrapped module's.
    """

    def __init__(
        self, mod: torch.nn.Module, memory_budget: float | None = None, policy_fn: Policy | list | None = None
    ) -> None:
        if (memory_budget is None) == (policy_fn is None):
            raise ValueError(
                f"pass either policy_fn or memory_budget to the selective checkpoint wrapper, got "
                f"memory_budget={memory_budget!r} and policy_fn={policy_fn!r}"
            )
        if ActivationWrapper is not None:
            super().__init__(mod)
        else:  # pragma: no cover
            super().__init__()
            self._checkpoint_wrapped_module = mod
        self.memory_budget = memory_budget
        self.policy_fn = policy_fn

    @torch.compiler.disable
    def _compute_policy(self, *args: Any, **kwargs: Any) -> Policy | list:
        if not torch.is_grad_enabled():
            return []  # nothing is saved without gradients; compute it at the first training step
        policy = get_optimal_checkpoint_policy(
            functools.partial(self._checkpoint_wrapped_module, **kwargs), *args, memory_budget=self.memory_budget
        )
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            holder = [policy]
            dist.broadcast_object_list(holder, src=0)
            policy = holder[0]
        self.policy_fn = policy
        return policy

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        policy = self.policy_fn if self.policy_fn is not None else self._compute_policy(*args, **kwargs)
        return checkpoint(self._checkpoint_wrapped_module, *args, **kwargs, policy_fn=policy)


def selective_checkpoint_wrapper(
    module: torch.nn.Module, memory_budget: float | None = None, policy_fn: Policy | list | None = None
) -> SelectiveCheckpointWrapper:
    """Wrap ``module`` with selective activation checkpointing (see :class:`SelectiveCheckpointWrapper`).

    ``memory_budget`` 0 behaves like plain checkpointing (recompute everything), 1 like no checkpointing.
    """
    return SelectiveCheckpointWrapper(module, memory_budget, policy_fn)
