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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import SAC_IGNORED_OPS, create_selective_checkpoint_contexts

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
# Ops a policy never keeps and the optimal policy does not count: torch's own list (autograd's detaches, metadata
# queries) and xFormers' additions (tensor literals, profiler markers, the clones torch.compile inserts).
OPS_TO_ALWAYS_SKIP = set(SAC_IGNORED_OPS) | {
    torch.ops.aten.lift_fresh.default,
    torch.ops.profiler._record_function_exit._RecordFunction,
    torch.ops.aten.clone.default,
}
PROFILE_RUNS = 10  # xFormers' count: re-executions timed per operator by get_optimal_checkpoint_policy

Policy = Callable[..., Any]


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


@dataclass
class _OpProfile:
    func: Any
    runtime: float  # seconds per execution
    memory: float  # MiB of new tensors it outputs
    storages: list  # storage addresses of its tensor outputs, to find the parent of an in-place op
    inplace_parent: int | None  # in-place ops: index of the op whose output it mutates (its own: an input)
    view_like: bool
    random: bool


_SDPA_OPS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)


def _is_random(func, args, kwargs) -> bool:
    """Seeded random ops; torch's fused SDPA kernels carry the tag but are deterministic without dropout."""
    if func.overloadpacket.__name__ in _SDPA_OPS:
        names = [a.name for a in func._schema.arguments]
        p = kwargs.get("dropout_p", args[names.index("dropout_p")] if len(args) > names.index("dropout_p") else 0)
        return p != 0
    return torch.Tag.nondeterministic_seeded in func.tags


class _ProfileOperators(TorchDispatchMode):
    """Times each operator (re-executed :data:`PROFILE_RUNS` times, once if it mutates its inputs) and records
    the size of what it outputs, whether it is a view, in place (and on which earlier output) or random."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_OpProfile] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        cuda = any(t.is_cuda for t in tensors)
        mutating = func._schema.is_mutable
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = func(*args, **kwargs)
        runs = 1
        if not mutating:  # re-running an in-place op would change its inputs again
            for _ in range(PROFILE_RUNS):
                func(*args, **kwargs)
            runs += PROFILE_RUNS
        if cuda:
            torch.cuda.synchronize()
        runtime = (time.perf_counter() - start) / runs
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        storages = [t.untyped_storage().data_ptr() for t in outs]
        view_like = func.is_view or torch.Tag.inplace_view in func.tags
        parent = None
        if mutating and func._schema.returns and func._schema.returns[0].alias_info is not None:
            parent = next((i for i, p in enumerate(self.ops) if set(storages) & set(p.storages)), len(self.ops))
        memory = 0.0 if (view_like or parent is not None) else sum(t.nbytes for t in outs) / 2**20
        self.ops.append(_OpProfile(func, runtime, memory, storages, parent, view_like, _is_random(func, args, kwargs)))
        return out


def _analyze_operators(function: Callable[..., Any], *args: Any, **kwargs: Any) -> list[_OpProfile]:
    """Profile every operator of one call (random state restored afterwards), minus :data:`OPS_TO_ALWAYS_SKIP`;
    ``inplace_parent`` indexes the returned list (an in-place op whose parent was dropped is its own parent)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    mode = _ProfileOperators()
    with torch.random.fork_rng(devices=devices), mode:
        function(*args, **kwargs)
    kept = [i for i, op in enumerate(mode.ops) if op.func not in OPS_TO_ALWAYS_SKIP]
    new_index = {old: new for new, old in enumerate(kept)}
    ops = [mode.ops[i] for i in kept]
    for new, op in enumerate(ops):
        if op.inplace_parent is not None:
            op.inplace_parent = new_index.get(op.inplace_parent, new)
    return ops


def get_optimal_checkpoint_policy(function: Callable[..., Any], *args: Any, memory_budget: float) -> Policy:
    """The policy keeping the most runtime within ``memory_budget`` of the memory of keeping everything.

    Args:
        function: the block to checkpoint (usually a module's forward); run once here, its operators profiled.
        *args: its inputs.
        memory_budget: between 0 (recompute everything) and 1 (keep everything).

    Returns:
        A policy for :func:`checkpoint` (valid for calls that dispatch the same operators in the same order).

    Raises:
        RuntimeError: scipy (>= 1.9) is not installed.
        ValueError: ``memory_budget`` outside [0, 1], or a block with no operators.
    """
    _require_milp()
    if not 0 <= memory_budget <= 1:
        raise ValueError(f"memory_budget must be between 0 and 1, got memory_budget={memory_budget}")
    ops = _analyze_operators(function, *args)
    if not ops:
        raise ValueError("the function dispatched no operator to checkpoint; nothing to choose")
    memory = torch.tensor([op.memory for op in ops], dtype=torch.float64)
    runtimes = torch.tensor([op.runtime for op in ops], dtype=torch.float64)
    view_like = [i for i, op in enumerate(ops) if op.view_like]
    random_ops = [i for i, op in enumerate(ops) if op.random]
    inplace = [(i, op.inplace_parent) for i, op in enumerate(ops) if op.inplace_parent is not None]
    # the block's output is kept anyway: the last op that makes a new tensor costs no memory to keep
    skip = set(view_like) | {i for i, _ in inplace}
    last = max((i for i in range(len(ops)) if i not in skip), default=len(ops) - 1)
    memory[last] = 0
    # random ops are recomputed (checkpoint restores the random state), except in a block without tensor inputs,
    # whose recomputation torch cannot reseed on the GPU (pytorch/pytorch#121212)
    force_store_random = not any(isinstance(a, torch.Tensor) for a in tree_leaves(args))
    decision = _optimize_runtime_with_given_memory(
        memory, runtimes, memory_budget * memory.sum().item(), view_like, inplace, random_ops, force_store_random
    )
    return _OptimalPolicy(decision)


def _require_milp():
    try:
        from scipy.optimize import milp  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "get_optimal_checkpoint_policy solves a mixed-integer program with scipy >= 1.9, which is not "
            "installed: pip install scipy (or pip install triformers[checkpoint])"
        ) from e


def _optimize_runtime_with_given_memory(
    memory: torch.Tensor,
    runtimes: torch.Tensor,
    max_memory: float,
    view_like_ops: list[int],
    inplace_ops: list[tuple[int, int]],
    random_ops: list[int],
    force_store_random: bool,
) -> torch.Tensor:
    """Which ops to keep (1) or recompute (0): maximise ``Σ runtime·x`` subject to ``Σ memory·x <= max_memory``.

    Views are recomputed; an in-place op ``(op, parent)`` shares its parent's decision (``op == parent``: the
    first in-place op, on an input, is kept); random ops are recomputed, or kept if ``force_store_random``.
    Raises ValueError when no assignment satisfies the constraints.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = len(runtimes)
    constraints = [LinearConstraint(A=memory.numpy()[None], ub=max_memory)]

    def fix(i: int, value: int) -> None:
        row = torch.zeros(n, dtype=torch.float64)
        row[i] = 1
        constraints.append(LinearConstraint(A=row.numpy()[None], lb=value, ub=value))

    for i in view_like_ops:
        fix(i, 0)
    for op, parent in inplace_ops:
        if op == parent:
            fix(op, 1)
        else:
            row = torch.zeros(n, dtype=torch.float64)
            row[parent], row[op] = 1, -1
            constraints.append(LinearConstraint(A=row.numpy()[None], lb=0, ub=0))
    for i in random_ops:
        fix(i, int(force_store_random))
    res = milp(c=-runtimes.numpy(), constraints=constraints, integrality=torch.ones(n).numpy(), bounds=Bounds(0, 1))
    if not res.success:
        raise ValueError(
            f"no checkpoint policy fits max_memory={max_memory:.3g} MiB ({res.message}): the ops that must be kept "
            f"(random ops of a block without tensor inputs, in-place ops on inputs) need more; raise memory_budget"
        )
    return torch.from_numpy(res.x).round()


class _OptimalPolicy:
    """Keeps the ``i``-th operator of a call iff ``decision[i]`` (ops of :data:`OPS_TO_ALWAYS_SKIP` not counted)."""

    def __init__(self, decision: torch.Tensor) -> None:
        self.decision = [bool(x) for x in decision.tolist()]
        self.counter = 0

    def __call__(self, ctx, func, *args, **kwargs) -> bool:
        if func in OPS_TO_ALWAYS_SKIP:
            return False
        i = self.counter
        self.counter += 1
        if i >= len(self.decision):
            raise RuntimeError(
                f"the checkpointed block dispatched more operators ({i + 1}) than when its policy was computed "
                f"({len(self.decision)}); compute the policy again for these inputs"
            )
        return self.decision[i]


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
