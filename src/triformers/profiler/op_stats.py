"""Per-op and per-module time, FLOPs and bytes moved, measured by one ``TorchDispatchMode``.

:class:`OpStatsMode` sees every aten op (and our custom ops) that runs inside it, forward and backward, and
for each one

- times it alone: the device is synchronized before and after (CUDA), so the time includes its launch but no
  other op's work; the instrumented step is slower than a plain one, its per-op times are not;
- counts its FLOPs with torch's ``FlopCounterMode`` registry extended with :mod:`.flop_formulas` (attention
  over the pairs its mask allows);
- counts the bytes it moves: every distinct tensor element it reads or writes, once (views move nothing, a
  stride-0 broadcast is read once). This is the traffic of an op that reads its inputs and writes its
  outputs once, a lower bound for ops that re-read (tiled matmuls) and an upper bound where caches help.

Each op's FLOPs and bytes add to every module it runs in (:class:`ModuleStack`: inclusive totals, ``Global``
at the top), forward and backward: a backward op counts in the modules whose forward created its autograd
node. A module's time is wall time: the device is synchronized at every op and every forward module boundary,
and the time between two such points goes to the modules open at the first, so kernels launched without an
aten op (our fused Triton layers) and the Python between ops count where they run.

Attention operators that are many torch ops (``fmha.chunked``'s tile loop, the split-K Triton launches) are
counted as one op while the mode is on: their ``apply`` is wrapped for the duration (and restored), timed from
start to end, the bytes of the ops they run add to it, and the FLOPs come from the mask
(:func:`inputs_attention_flops`), not from the tiles the loop happens to compute.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, shape_wrapper

from triformers.profiler.flop_formulas import flop_formulas, inputs_attention_flops

# Ops that only read metadata or allocate: no time or traffic worth a row
_SKIPPED = {
    torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default, torch.ops.aten.empty_like.default,
    torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default, torch.ops.aten.size.default,
    torch.ops.aten.stride.default, torch.ops.aten.sym_size.default, torch.ops.aten.sym_stride.default,
    torch.ops.aten.is_contiguous.default, torch.ops.aten.storage_offset.default, torch.ops.aten.dim.default,
    torch.ops.aten.numel.default, torch.ops.prim.layout.default, torch.ops.prim.device.default,
}  # fmt: skip


@dataclass
class Stats:
    """Totals of a set of op calls.

    Attributes:
        calls: op calls.
        seconds: their time.
        flops: their FLOPs.
        bytes: bytes they read and wrote.
        ideal_seconds: the time their FLOPs take at the device's peak for each op's dtype (the numerator of
            MFU); ops whose dtype has no known peak add nothing.
        dtypes: the dtypes of the ops with FLOPs.
    """

    calls: int = 0
    seconds: float = 0.0
    flops: int = 0
    bytes: int = 0
    ideal_seconds: float = 0.0
    dtypes: set = field(default_factory=set)

    def add(self, other: Stats) -> None:
        self.calls += other.calls
        self.seconds += other.seconds
        self.flops += other.flops
        self.bytes += other.bytes
        self.ideal_seconds += other.ideal_seconds
        self.dtypes |= other.dtypes


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t`` (a stride-0 dim counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _distinct_tensors(values) -> list[torch.Tensor]:
    seen, out = set(), []
    for x in tree_flatten(values)[0]:
        if isinstance(x, torch.Tensor) and x.device.type != "meta":
            try:
                key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
            except RuntimeError:  # no storage (sparse, nested): not counted
                continue
            if key not in seen:
                seen.add(key)
                out.append(x)
    return out


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _flop_dtype(args) -> torch.dtype | None:
    for x in tree_flatten(args)[0]:
        if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.dtype == torch.int8):
            return x.dtype
    return None


class ModuleStack:
    """The modules an op runs in: in the forward, those whose forward is running (global forward hooks); in the
    backward, those whose forward created the autograd node being run. Nodes are numbered in creation order and
    the stack is recorded at every module boundary, so a backward op counts in exactly the modules its forward
    op counted in. Names as ``torch.utils.module_tracker``'s: the root's class, then attribute paths
    (``GPT.model.encoders.0``); ``Global`` holds everything.

    Args:
        on_boundary: called at each boundary before the stack changes (the time up to it goes to the modules
            open before it).
        on_change: called after it changes.
    """

    def __init__(self, on_boundary, on_change) -> None:
        self.on_boundary = on_boundary
        self.on_change = on_change
        self.stack: list[str] = []
        self._names: dict[int, str] = {}
        self._modules: list[nn.Module] = []  # keeps the named modules alive, so that their ids stay theirs
        self._marks: list[int] = []  # autograd sequence numbers at the boundaries
        self._stacks: list[tuple[str, ...]] = []  # the stack from each mark on
        self._handles: list = []

    def name(self, module: nn.Module) -> str:
        """The module's name; the first time a module is met, its descendants not yet named are named after it."""
        if id(module) not in self._names:
            self._names[id(module)] = type(module).__name__
            self._modules.append(module)
            name = self._names[id(module)]
            for sub_name, sub in module.named_modules():
                if id(sub) not in self._names:
                    self._names[id(sub)] = f"{name}.{sub_name}"
                    self._modules.append(sub)
        return self._names[id(module)]

    def _mark(self) -> None:
        seq = torch._C._autograd._get_sequence_nr()  # the number the next node gets
        if self._marks and self._marks[-1] == seq:
            self._stacks[-1] = tuple(self.stack)
        else:
            self._marks.append(seq)
            self._stacks.append(tuple(self.stack))

    def _pre(self, module, args) -> None:
        self.on_boundary()
        self.stack.append(self.name(module))
        self._mark()
        self.on_change()

    def _post(self, module, args, output) -> None:
        self.on_boundary()
        name = self.name(module)
        if name in self.stack:
            del self.stack[len(self.stack) - 1 - self.stack[::-1].index(name)]
        self._mark()
        self.on_change()

    def parents(self) -> tuple[str, ...]:
        if torch._C._current_graph_task_id() == -1:  # not in a backward
            return ("Global", *self.stack)
        node = torch._C._current_autograd_node()
        if node is None:
            return ("Global",)
        index = bisect.bisect_right(self._marks, node._sequence_nr()) - 1
        return ("Global", *(self._stacks[index] if index >= 0 else ()))

    def __enter__(self):
        self._handles = [torch.nn.modules.module.register_module_forward_pre_hook(self._pre),
                         torch.nn.modules.module.register_module_forward_hook(self._post)]  # fmt: skip
        self._mark()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class OpStatsMode(TorchDispatchMode):
    """Collects :class:`Stats` per module (``modules``) and per op name (``ops``) while active.

    Args:
        device: the device whose work is timed (synchronized at every op and module boundary when CUDA).
        peak_tflops: ``dtype -> peak TFLOP/s`` (e.g. ``DeviceLimit.peak_tflops``), or None: no ideal times.
    """

    def __init__(self, device: torch.device | str = "cpu", peak_tflops=None) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.peak_tflops = peak_tflops
        self.registry = {
            **flop_registry,
            **{k: v if getattr(v, "_get_raw", False) else shape_wrapper(v) for k, v in flop_formulas().items()},
        }
        self.modules: dict[str, Stats] = defaultdict(Stats)
        self.ops: dict[str, Stats] = defaultdict(Stats)
        self.tracker = ModuleStack(self._tick, self._refresh)
        self._group: Stats | None = None
        self._hooks = contextlib.ExitStack()
        self._depth = 0
        self._last = 0.0
        self._last_parents: tuple[str, ...] = ("Global",)

    # -- the mode -------------------------------------------------------------------------------------------
    def __enter__(self):
        self._depth += 1
        if self._depth == 1:  # not when re-entered to run a decomposition
            self._hooks.enter_context(self.tracker)
            self._hooks.enter_context(_attention_groups(self))
            self._sync()
            self._last = time.perf_counter()
            self._last_parents = self.tracker.parents()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._tick()
                self._hooks.close()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _refresh(self) -> None:
        self._last_parents = self.tracker.parents()

    def _tick(self) -> float:
        """Gives the time since the last tick to the modules open then (at a module boundary: those open before
        it), and notes the modules open now; returns the time."""
        self._sync()
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        for parent in self._last_parents:
            self.modules[parent].seconds += elapsed
        self._last_parents = self.tracker.parents()
        return now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SKIPPED or isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        packet = func._overloadpacket
        if packet not in self.registry:  # a composite op: count the ops it is made of
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if _is_view(func):
            return func(*args, **kwargs)
        t0 = self._tick()
        out = func(*args, **kwargs)
        seconds = self._tick() - t0
        flops = self.registry[packet](*args, **kwargs, out_val=out) if packet in self.registry else 0
        moved = sum(tensor_bytes(t) for t in _distinct_tensors((args, kwargs, out)))
        dtype = _flop_dtype(args) if flops else None
        self.record(str(packet), Stats(1, seconds, flops, moved, self._ideal(flops, dtype),
                                       {dtype} if dtype else set()))  # fmt: skip
        return out

    def _ideal(self, flops: int, dtype: torch.dtype | None) -> float:
        if not flops or dtype is None or self.peak_tflops is None:
            return 0.0
        peak = self.peak_tflops(dtype)
        return flops / (peak * 1e12) if peak else 0.0

    def record(self, name: str, stats: Stats) -> None:
        """Adds an op's stats to its row and, but for the time (the ticks give it), to every module it runs in;
        inside an attention op counted as one, only its bytes, to that op."""
        if self._group is not None:
            self._group.bytes += stats.bytes
            return
        self.ops[name].add(stats)
        seconds, stats.seconds = stats.seconds, 0.0
        for parent in self.tracker.parents():
            self.modules[parent].add(stats)
        stats.seconds = seconds

    @contextlib.contextmanager
    def counted_as_one(self, name: str, flops: int, dtype: torch.dtype):
        """Ops run inside count as one op ``name`` of ``flops`` FLOPs, timed from start to end (kernels launched
        without an aten op included); their own FLOPs are not counted."""
        if self._group is not None:  # already inside one
            yield
            return
        t0 = self._tick()
        self._group = group = Stats(1, 0.0, flops, 0, 0.0, {dtype})
        try:
            yield
        finally:
            self._group = None
            group.seconds = self._tick() - t0
            group.ideal_seconds = self._ideal(flops, dtype)
            self.record(name, group)


def _attention_targets():
    """``(operator class, is_backward)`` of the attention operators counted as one op."""
    from triformers.ops.fmha import chunked

    targets = [(chunked.FwOp, False), (chunked.BwOp, True)]
    try:
        from triformers.ops.fmha import triton_splitk
    except ImportError:
        return targets
    return [*targets, (triton_splitk.FwOp, False)]


@contextlib.contextmanager
def _attention_groups(mode: OpStatsMode):
    """Wraps the ``apply`` of :func:`_attention_targets` so that each call is one op of ``mode``."""
    restore = []
    for cls, backward in _attention_targets():
        original = cls.__dict__["apply"]
        func = original.__func__

        def apply(klass, *args, _func=func, _backward=backward, **kwargs):
            inp = args[1] if _backward else args[0]  # FwOp.apply(inp, ...), BwOp.apply(ctx, inp, ...)
            name = f"fmha.{klass.NAME}"
            with mode.counted_as_one(name, inputs_attention_flops(inp, _backward), inp.query.dtype):
                return _func(klass, *args, **kwargs)

        cls.apply = classmethod(apply)
        restore.append((cls, original))
    try:
        yield
    finally:
        for cls, original in restore:
            cls.apply = original


def rates(stats: Stats, peak_bandwidth: float | None) -> dict:
    """A row of the table: time, FLOPs, bytes, TFLOP/s, GB/s, MFU and bandwidth fraction of ``stats``."""
    s = stats.seconds
    row = {
        "calls": stats.calls,
        "time_ms": s * 1e3,
        "gflop": stats.flops / 1e9,
        "gb": stats.bytes / 1e9,
        "tflops": stats.flops / s / 1e12 if s > 0 else None,
        "gbps": stats.bytes / s / 1e9 if s > 0 else None,
        "mfu": stats.ideal_seconds / s if s > 0 and stats.ideal_seconds > 0 else None,
        "bw_fraction": None,
        "dtypes": sorted(str(d).removeprefix("torch.") for d in stats.dtypes),
    }
    if s > 0 and peak_bandwidth and math.isfinite(peak_bandwidth):
        row["bw_fraction"] = stats.bytes / s / peak_bandwidth
    return row
