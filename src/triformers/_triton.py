"""Where Triton kernels can run.

A Triton kernel runs on CUDA tensors, and on CPU tensors when Triton's interpreter is on
(``TRITON_INTERPRET=1``, read when the kernels are defined, so it must be set before triformers is
imported). The interpreter is how the CPU test suite covers every kernel.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

_AVAILABLE: dict[str, bool] = {}


@torch.compiler.assume_constant_result
def is_triton_available() -> bool:
    """True when ``import triton`` works (and ``TRIFORMERS_DISABLE_TRITON`` is not set).

    Evaluated once; ``torch.compile`` treats the answer as a constant.
    """
    if "triton" not in _AVAILABLE:
        ok = os.environ.get("TRIFORMERS_DISABLE_TRITON", "0") != "1"
        if ok:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401
            except Exception:  # ImportError, or a broken install raising anything else
                ok = False
        _AVAILABLE["triton"] = ok
    return _AVAILABLE["triton"]


def interpret_mode() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(*tensors: torch.Tensor) -> str | None:
    """Why Triton kernels cannot run on these tensors, or None when they can."""
    if not is_triton_available():
        return "triton is not installed (pip install triton; Linux x86_64 only)"
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"}:
        return None
    if devices == {"cpu"}:
        if interpret_mode():
            return None
        return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before importing triformers)"
    return f"Triton kernels run on CUDA tensors (got device types {sorted(devices)})"


def can_run_triton(*tensors: torch.Tensor) -> bool:
    return triton_unavailable_reason(*tensors) is None


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device | None = None) -> tuple[int, int]:
    """``torch.cuda.get_device_capability`` of a CUDA device (default: the current one), kept per device:
    torch's own call costs tens of microseconds, more than a kernel launch."""
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _capability(index)


# ---------------------------------------------------------------------------------------------------------
# Launching. ``kernel[grid](*args, **meta)`` costs ~10-20 µs of Python per call in Triton 3.x (binding every
# argument, the cache key, scratch allocation), which is as long as a memory-bound kernel on a 32 MB tensor
# runs. ``launch`` keeps the compiled kernel of each specialisation and calls its C launcher directly.

_compiled: dict = {}
_INT32 = range(-(2**31), 2**31)


def _spec(a):
    """What Triton's JIT specialises an argument on (or a refinement of it): dtype and 16-byte alignment of a
    tensor; for an int, == 1, divisibility by 16 and the integer width; a TMA descriptor's element type and
    block shape; the value of anything else."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() & 15 == 0
    c = a.__class__
    if c.__name__ == "TensorDescriptor":  # element type and block shape: what Triton itself reports
        return triton_specialization(a)
    if c is int:
        return a == 1, a & 15 == 0, a in _INT32, a < 2**63
    if c is float:
        return float
    return c, a


def _key(args: tuple) -> tuple:
    """``tuple(map(_spec, args))`` flattened, in one loop (a function call per argument costs about as long
    as the launch itself): a tensor adds its dtype and alignment, an int a code for its four properties,
    a float the class ``float``, anything else ``_spec``'s answer. Two argument tuples get equal keys
    exactly when their ``_spec``s are equal (a bare dtype and bool come only from a tensor, so the flattening
    cannot shift one argument's entries onto another's)."""
    key = []
    add = key.append
    for a in args:
        c = a.__class__
        if c is int:  # int_code(a), inlined: a call per argument is what this loop avoids
            add(16 if a == 1 else 8 | (a & 15 == 0) | (a in _INT32) << 1 | (a < 2**63) << 2)
        elif c is float:
            add(float)
        elif isinstance(a, torch.Tensor):
            add(a.dtype)
            add(a.data_ptr() & 15 == 0)
        else:
            add(_spec(a))
    return tuple(key)


def int_code(a: int) -> int:
    r"""The entry :func:`_key` makes for an int (for ``dyn_key``\ s holding per-call ints such as seeds)."""
    return 16 if a == 1 else 8 | (a & 15 == 0) | (a in _INT32) << 1 | (a < 2**63) << 2


@functools.cache
def _native_specialize():
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return functools.partial(native_specialize_impl, BaseBackend)


def triton_specialization(a):
    """Triton's own specialisation of a kernel argument (type string and attribute, e.g. ``('i32', 'D')``)."""
    return _native_specialize()(a, False, True, True)


def _fast_launch_enabled() -> bool:
    return not interpret_mode() and os.environ.get("TRIFORMERS_FAST_LAUNCH", "1") != "0"


def _direct_launcher(compiled, kernel, args: tuple, meta: dict):
    """``(launch, function, fixed, tail, pointers, descriptors)``: the compiled kernel's C launcher and CUDA
    function, the launcher's fixed leading arguments, the values of the kernel parameters after the positional
    ones, then how :func:`_raw_args` turns ``args`` into what the C launcher takes (``pointers`` None: the
    arguments go as they are). None where the generic path is needed (kernels that need scratch memory)."""
    run = compiled.run
    if getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
        return None
    defaults = {p.name: p.default for p in kernel.params}
    tail = tuple(meta[n] if n in meta else defaults[n] for n in kernel.arg_names[len(args):])
    fixed = (run.launch_cooperative_grid, run.launch_pdl, None, None, compiled.packed_metadata, None, None, None)
    launcher, descriptors = _unwrap_descriptors(run.launch, args) if RAW_POINTERS else (None, ())
    if launcher is None:  # Triton's own launcher, arguments as they are
        return run.launch, compiled.function, fixed, tail, None, ()
    pointers = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    return launcher, compiled.function, fixed, tail, pointers, descriptors


# Tensors reach the C launcher as their addresses (``data_ptr()``): Triton's launcher otherwise asks the driver
# where each pointer argument lives (``cuPointerGetAttribute``) on every launch. Callers pass CUDA tensors
# of the launch's device only (``triton_unavailable_reason`` and the operators' checks come first).
RAW_POINTERS = True


def _unwrap_descriptors(launch_fn, args: tuple):
    """``(C launcher, ((position, expand), ...) last position first)`` for a launcher that Triton wrapped to
    expand host TMA descriptors (``wrap_handle_tensordesc``: a Python loop over every argument on every
    launch; ``expand`` is its expansion of the descriptor at that position), ``(launch_fn, ())`` for an
    unwrapped one, ``(None, ())`` where the wrapper is not the one this code knows (then it stays in use)."""
    code = getattr(launch_fn, "__code__", None)
    if code is None:  # the C function itself: nothing to expand
        return launch_fn, ()
    try:
        cells = dict(zip(code.co_freevars, (c.cell_contents for c in launch_fn.__closure__ or ())))
        launcher, indices, metas = cells["launcher"], sorted(cells["tensordesc_indices"]), cells["tensordesc_meta"]
        from triton.backends.nvidia.driver import make_tensordesc_arg
    except (KeyError, ValueError, ImportError, TypeError):
        return None, ()
    if len(metas) != len(indices) or any(i >= len(args) or args[i].__class__.__name__ != "TensorDescriptor"
                                         for i in indices):
        return None, ()
    expand = [(i, functools.partial(make_tensordesc_arg, metadata=m)) for i, m in zip(indices, metas)]
    return launcher, tuple(reversed(expand))


def _raw_args(args: tuple, pointers: tuple, descriptors: tuple) -> list:
    """``args`` as the C launcher takes them: tensors at ``pointers`` as their addresses, each descriptor at
    ``descriptors`` expanded as Triton's wrapper expands it (its CUtensorMap, shape and strides)."""
    a = list(args)
    if _CHECK_KEYS:  # what Triton's launcher would have refused (a CPU tensor) or read on another device
        device = _current_device()
        bad = [i for i in pointers if a[i].device.type != "cuda" or a[i].device.index != device]
        if bad:
            raise AssertionError(f"launch arguments {bad} are not on the launch's device cuda:{device}: "
                                 f"{[str(a[i].device) for i in bad]}")
    for i in pointers:
        a[i] = a[i].data_ptr()
    for i, expand in descriptors:  # last first: an expansion does not move the positions before it
        a[i:i + 1] = expand(a[i])
    return a


def launch(kernel, grid: tuple, args: tuple, meta: dict, static_key=None, dyn_key=None):
    """``kernel[grid](*args, **meta)``, through the compiled kernel's C launcher once it is known.

    The first call of a specialisation goes through Triton's JIT (compiling if needed) and keeps the compiled
    kernel; later calls pass the arguments straight to its launcher. ``static_key`` (hashable) stands for
    ``kernel`` and ``meta`` when the caller has one. Keys name kernels by ``id`` (kernels live as long as
    their module): hashing a ``JITFunction`` runs Python code on every lookup. The interpreter, launch hooks
    (profilers) and ``TRIFORMERS_FAST_LAUNCH=0`` take the JIT path.

    ``dyn_key`` (hashable, optional) holds the few values that vary between the caller's launches (sizes,
    strides, the alignment ``data_ptr() & 15`` of tensors it did not allocate itself), chosen so that
    ``static_key`` and ``dyn_key`` together fix what Triton specialises every argument on. Such a launch
    skips building the per-argument key (:func:`_key`, the larger part of the host time of a launch). With
    ``TRIFORMERS_CHECK_LAUNCH_KEYS=1`` every such launch verifies that claim against :func:`_key`.
    """
    if _FAST_LAUNCH is None:
        _init_fast_launch()
    if not _FAST_LAUNCH or _hooked(_knobs.runtime.launch_enter_hook):
        return kernel[grid](*args, **meta)
    device = _current_device()
    static = static_key if static_key is not None else (id(kernel), tuple(meta.items()))
    entry = None
    if dyn_key is not None:
        short = (static, device, dyn_key)
        hit = _by_dyn_key.get(short)
        if hit is not None:
            entry, full = hit
            if _CHECK_KEYS and full != _key(args):
                raise AssertionError(
                    f"launch of {getattr(kernel, '__name__', kernel)}: dyn_key {dyn_key} was first seen with "
                    f"argument specialisation {full}, now {_key(args)}; the caller's dyn_key misses a value"
                )
    if entry is None:
        full = _key(args)
        key = (static, device, full)
        entry = _compiled.get(key)
        if entry is None:
            compiled = kernel[grid](*args, **meta)
            if compiled is not None and not hasattr(compiled, "result"):
                direct = _direct_launcher(compiled, kernel, args, meta)
                if direct is not None:
                    _compiled[key] = direct
            return compiled
        if dyn_key is not None:
            if len(_by_dyn_key) >= _MAX_DYN_KEYS:  # raw sizes in the keys: bounded, refilled as needed
                _by_dyn_key.clear()
            _by_dyn_key[short] = (entry, full)
    run, function, fixed, tail, pointers, descriptors = entry
    if pointers is not None:
        args = _raw_args(args, pointers, descriptors)
    g0, g1, g2 = grid3(grid)
    run(g0, g1, g2, _cuda_stream(device), function, *fixed, *args, *tail)
    return None


def grid3(grid: tuple) -> tuple[int, int, int]:
    """A launch grid of 1-3 dims as the C launcher takes it: three dims, the missing ones 1."""
    n = len(grid)
    return grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1


_by_dyn_key: dict = {}  # (static, device, dyn_key) -> (entry, the _key it stands for)
_MAX_DYN_KEYS = 8192
_CHECK_KEYS = os.environ.get("TRIFORMERS_CHECK_LAUNCH_KEYS", "0") == "1"


_FAST_LAUNCH: bool | None = None  # decided at the first launch (importing triton is not free)
_knobs = None
# torch.cuda.current_device() without its Python lazy-init check: a direct launch follows a JIT launch on CUDA
# tensors, so CUDA is initialised by then.
_current_device = None
_cuda_stream = None  # torch._C._cuda_getCurrentRawStream, set with _current_device


def _hooked(hook) -> bool:
    """Whether a launch hook is installed: a non-empty ``HookChain`` (Triton >= 3.4, where the knob is never
    None) or, in older Triton, any value but None."""
    calls = getattr(hook, "calls", None)
    return bool(calls) if calls is not None else hook is not None


def _init_fast_launch() -> None:
    global _FAST_LAUNCH, _knobs, _current_device, _cuda_stream
    _FAST_LAUNCH = _fast_launch_enabled() and is_triton_available()
    if _FAST_LAUNCH:
        from triton import knobs

        _knobs = knobs
        _current_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)
        _cuda_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for ints (``triton.cdiv`` is a JIT function: costly to call from the host)."""
    return -(-a // b)


def programs_per_sm(n_regs: int, shared: int, num_warps: int, regs_per_sm: int = 65536,
                    smem_per_sm: int = 233472, threads_per_sm: int = 2048, max_blocks: int = 32) -> int:
    """Programs (thread blocks) of a kernel one SM holds at once: registers are given to each warp in units
    of 256 (8 per thread), every block also takes 1 KiB of shared memory for the system (NVIDIA's occupancy
    rules for sm_80-sm_90). At least 1."""
    warp_regs = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = regs_per_sm // (warp_regs * num_warps)
    by_smem = smem_per_sm // (shared + 1024)
    by_threads = threads_per_sm // (32 * num_warps)
    return max(1, min(by_regs, by_smem, by_threads, max_blocks))


def resident_programs(kernel, grid: tuple, args: tuple, meta: dict, device: torch.device) -> int | None:
    """:func:`programs_per_sm` of ``kernel`` compiled for ``args`` and ``meta`` on CUDA ``device``: compiles
    it without launching (``JITFunction.warmup``) and loads it, which gives its register count. None (warned
    once) where this Triton does not expose them."""
    try:
        compiled = kernel.warmup(*args, grid=grid, **meta)
        compiled._init_handles()  # loads the binary: sets n_regs (Triton reads it from the driver at load time)
        n_regs, shared, num_warps = compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps
    except (AttributeError, TypeError) as e:
        if not _WARNED_OCCUPANCY:
            _WARNED_OCCUPANCY.append(True)
            warnings.warn(f"triformers: cannot read a compiled kernel's registers ({e!r}); launch heuristics "
                          "assume their default programs per SM", stacklevel=2)  # fmt: skip
        return None
    props = torch.cuda.get_device_properties(device)
    return programs_per_sm(
        n_regs, shared, num_warps,
        regs_per_sm=getattr(props, "regs_per_multiprocessor", 65536),
        smem_per_sm=getattr(props, "shared_memory_per_multiprocessor", 233472),
        threads_per_sm=getattr(props, "max_threads_per_multi_processor", 2048),
    )  # fmt: skip


_WARNED_OCCUPANCY: list[bool] = []
