"""Helpers shared by the fused layers and ops: path choice, autocast dtypes, row views, warnings.

Every fused op takes the Triton path when :func:`triformers._triton.can_run_triton` says its tensors allow
it. CPU tensors without the interpreter take the pure-torch path silently (that is what a CPU user
expects); any other reason (no triton, mixed devices, float64) takes it with a one-time warning, so nothing
silently runs slower than asked.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from triformers import _triton as _T
from triformers._triton import cdiv, interpret_mode, is_triton_available, launch, triton_unavailable_reason

__all__ = ["cdiv", "launch"]  # re-exported for the kernels' launchers

#: dtypes the kernels read and write (they compute in float32).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """``warnings.warn`` each distinct message once per process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def use_triton(op: str, *tensors: torch.Tensor | None) -> bool:
    """Whether ``op`` runs its Triton kernels on ``tensors``; warns once if not, for a surprising reason."""
    # Fast path, checked on every call: CUDA tensors of a kernel dtype (a plain loop: generators cost more).
    seen = False
    for t in tensors:
        if t is not None:
            if not (t.is_cuda and t.dtype in KERNEL_DTYPES):
                break
            seen = True
    else:
        if seen and is_triton_available():
            return True
    present = [t for t in tensors if t is not None]
    reason = triton_unavailable_reason(*present)
    if reason is None:
        bad = sorted({str(t.dtype) for t in present if t.is_floating_point() and t.dtype not in KERNEL_DTYPES})
        if not bad:
            return True
        reason = f"the kernels take float16/bfloat16/float32, got {', '.join(bad)}"
    elif {t.device.type for t in present} == {"cpu"} and "interpreter" in reason:
        return False  # plain CPU use: the torch path is the expected one
    warn_once(f"triformers.{op}: running the pure-torch path because {reason}")
    return False


def device_type(x: torch.Tensor) -> str:
    """``x.device.type`` without building a ``torch.device`` for the common CUDA case."""
    return "cuda" if x.is_cuda else x.device.type


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None when autocast is off there."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[R, N]`` (N = last dim): a view whenever the leading dims merge, whatever the strides.

    Only leading dims that no single stride can describe (e.g. a permuted 3-D tensor) are copied.
    """
    if x.dim() == 2:
        return x
    n = x.shape[-1] if x.dim() > 0 else 1
    try:
        return x.view(-1, n)
    except RuntimeError:
        return x.reshape(-1, n)


def shaped(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t.view(shape)``, or t itself when it has that shape already (a view costs host time)."""
    return t if t.shape == shape else t.view(shape)


@functools.cache
def num_sms(device_index: int | None) -> int:
    """Streaming multiprocessors of the device (a small number under the interpreter, so grids stay small)."""
    if device_index is None or interpret_mode() or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    return num_sms(t.get_device() if t.is_cuda else None)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def autotune_enabled() -> bool:
    """Autotuning runs on the GPU unless ``TRIFORMERS_AUTOTUNE=0`` (e.g. for quick GPU test runs)."""
    return not interpret_mode() and os.environ.get("TRIFORMERS_AUTOTUNE", "1") != "0"


class Tuner:
    """Launches a ``@triton.jit`` kernel with meta-parameters chosen per problem key.

    The first call with a new key times every candidate config (after ``prune``) and keeps the fastest;
    later calls cost one dict lookup on top of the launch. ``triton.autotune`` re-derives its key from
    every argument on each call, which is noticeable for the memory-bound kernels, whose launch cost is
    comparable to their run time at small sizes. Without autotuning (interpreter, ``TRIFORMERS_AUTOTUNE=0``)
    the launcher's ``default`` config runs.

    Args:
        kernel: the ``@triton.jit`` function.
        configs: candidate meta-parameters, e.g. ``{"BLOCK_M": 4, "num_warps": 8}``.
        prune: ``prune(configs, meta) -> configs`` for the call's constexprs ``meta``.
        restore: positions of arguments the kernel writes in place, restored after each timed trial.
    """

    def __init__(self, kernel, configs: list[dict], prune=None, restore: tuple[int, ...] = ()) -> None:
        self.kernel, self.configs, self.prune, self.restore = kernel, configs, prune, restore
        self.enabled = autotune_enabled()
        self._chosen: dict = {}  # key -> (config, meta + config, launch key)
        # (key, dyn_key, device) -> the direct launch: (launch entry of _triton.launch, grid, _key(args))
        self._direct: dict = {}

    def __call__(self, grid, args: tuple, key: tuple, default: dict, meta: dict, dyn_key=None):
        """Launch on ``grid(config)`` (a function of the chosen config) with the constexprs ``meta`` (read, never
        written: callers may pass a cached dict); ``dyn_key`` as for :func:`launch`, with ``key`` (dtypes, flags,
        the sizes the kernel is compiled for) as the static part.

        With a ``dyn_key``, ``key`` and ``dyn_key`` also fix the grid (callers' grids are functions of the
        sizes in them), so a repeated launch goes straight to the C launcher with the grid it had: no config
        lookup, no ``grid`` call, no per-argument key. ``TRIFORMERS_CHECK_LAUNCH_KEYS=1`` verifies both claims
        on every such launch."""
        if dyn_key is not None and _T._FAST_LAUNCH and not _T._hooked(_T._knobs.runtime.launch_enter_hook):
            device = _T._current_device()
            hit = self._direct.get((key, dyn_key, device))
            if hit is not None:
                (run, function, fixed, tail, pointers, descriptors), g, full = hit
                if _T._CHECK_KEYS:
                    self._check(hit, grid, args, key, dyn_key)
                if pointers is not None:
                    args = _T._raw_args(args, pointers, descriptors)
                run(g[0], g[1], g[2], _T._cuda_stream(device), function, *fixed, *args, *tail)
                return None
        entry = self._chosen.get(key)
        if entry is None:
            config = self._tune(grid, args, key, meta) if self.enabled else default
            entry = self._chosen[key] = (config, {**meta, **config}, (id(self.kernel), key, tuple(config.items())))
        config, full, static = entry
        g = grid(config)
        result = launch(self.kernel, g, args, full, static, dyn_key)
        if dyn_key is not None and result is None and _T._FAST_LAUNCH:  # launched directly: the entry is known now
            device = _T._current_device()
            hit = _T._by_dyn_key.get((static, device, dyn_key))
            if hit is not None:
                if len(self._direct) >= _T._MAX_DYN_KEYS:
                    self._direct.clear()
                self._direct[(key, dyn_key, device)] = (hit[0], _T.grid3(g), hit[1])
        return result

    def _check(self, hit, grid, args, key, dyn_key) -> None:
        """``TRIFORMERS_CHECK_LAUNCH_KEYS=1``: the direct launch's argument key and grid are what the full path
        would derive for these arguments."""
        g3 = _T.grid3(grid(self._chosen[key][0]))
        if hit[2] != _T._key(args) or hit[1] != g3:
            name = getattr(self.kernel, "__name__", self.kernel)
            raise AssertionError(
                f"launch of {name}: key {key} dyn_key {dyn_key} was first seen with argument specialisation "
                f"{hit[2]} and grid {hit[1]}, now {_T._key(args)} and {g3}; the caller's dyn_key misses a value"
            )

    def _tune(self, grid, args, key, meta) -> dict:
        from triton.testing import do_bench

        candidates = self.prune(self.configs, meta) if self.prune else self.configs
        saved = {i: args[i].clone() for i in self.restore}
        times = []
        for config in candidates:
            try:
                ms = do_bench(
                    lambda c=config: self.kernel[grid(c)](*args, **meta, **c), warmup=10, rep=40, return_mode="median"
                )
            except Exception:  # a config that does not compile or fit (shared memory, registers): skipped
                ms = float("inf")
            times.append(ms)
            for i, t in saved.items():
                args[i].copy_(t)
        best = min(range(len(candidates)), key=times.__getitem__)
        if times[best] == float("inf"):
            raise RuntimeError(f"no config of {self.kernel.__name__} runs for key {key}")
        if os.environ.get("TRITON_PRINT_AUTOTUNING") == "1":
            print(
                f"tuned {self.kernel.__name__} {key}: {candidates[best]} {times[best]:.4f} ms "
                f"(of {len(candidates)}: {', '.join(f'{t:.4f}' for t in times)})"
            )
        return candidates[best]


def default_tile(block_n: int, elements: int = 4096) -> dict:
    """Meta-parameters of a row kernel that is not autotuned: tiles of ~``elements`` over 4 or 8 warps.

    Correct for every shape; the autotuned configs are the fast ones.
    """
    block_m = max(1, min(64, elements // block_n))
    return {"BLOCK_M": block_m, "num_warps": 8 if block_m * block_n >= 8192 else 4}


def tile_configs() -> list[dict]:
    """Row-kernel candidates: BLOCK_M rows of the BLOCK_N-wide tile, over 4, 8 or 16 warps."""
    return [{"BLOCK_M": bm, "num_warps": w} for bm in (1, 2, 4, 8, 16, 32, 64) for w in (4, 8, 16)]


def prune_by_tile(min_tile: int, max_tile: int, min_per_thread: int, max_per_thread: int, columns=None):
    """A ``prune`` keeping configs whose ``BLOCK_M x columns`` tile and elements per thread fall in the
    given ranges (or the smallest tiles, when none does); ``columns(meta)`` defaults to ``BLOCK_N``."""

    def prune(configs, meta):
        block_n = columns(meta) if columns is not None else meta["BLOCK_N"]
        keep = []
        for c in configs:
            tile = c["BLOCK_M"] * block_n
            per_thread = tile // (32 * c["num_warps"])
            if min_tile <= tile <= max_tile and min_per_thread <= per_thread <= max_per_thread:
                keep.append(c)
        if not keep:
            smallest = min(c["BLOCK_M"] for c in configs)
            keep = [c for c in configs if c["BLOCK_M"] == smallest]
        return keep

    return prune
