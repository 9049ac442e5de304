"""The optimal selective-checkpoint policy (``triformers.checkpoint.get_optimal_checkpoint_policy``): profile
each operator of a call, then solve xFormers' 0/1 program for the memory budget with ``scipy.optimize.milp``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import SAC_IGNORED_OPS

# Ops a policy never keeps and the optimal policy does not count: torch's own list (autograd's detaches, metadata
# queries) and xFormers' additions (tensor literals, profiler markers, the clones torch.compile inserts).
OPS_TO_ALWAYS_SKIP = set(SAC_IGNORED_OPS) | {
    torch.ops.aten.lift_fresh.default,
    torch.ops.profiler._record_function_exit._RecordFunction,
    torch.ops.aten.clone.default,
}


PROFILE_RUNS = 10  # xFormers' count: re-executions timed per operator by get_optimal_checkpoint_policy


Policy = Callable[..., Any]


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
