"""Helpers shared by the fused layers and ops: path choice, autocast dtypes, row views, warnings.

Every fused op takes the Triton path when :func:`triformers._triton.can_run_triton` says its tensors allow
it. CPU tensors without the interpreter take the pure-torch path silently (that is what a CPU user
expects); any other reason (no triton, mixed devices, float64) takes it with a one-time warning, so nothing
silently runs slower than asked.
"""

from __future__ import annotations

import functools
import warnings

import torch

from triformers._triton import interpret_mode, triton_unavailable_reason

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
    present = [t for t in tensors if t is not None]
    reason = triton_unavailable_reason(*present)
    if reason is None:
        bad = sorted(
            {str(t.dtype) for t in present if t.is_floating_point() and t.dtype not in KERNEL_DTYPES}
        )
        if not bad:
            return True
        reason = f"the kernels take float16/bfloat16/float32, got {', '.join(bad)}"
    elif {t.device.type for t in present} == {"cpu"} and "interpreter" in reason:
        return False  # plain CPU use: the torch path is the expected one
    warn_once(f"triformers.{op}: running the pure-torch path because {reason}")
    return False


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None when autocast is off there."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[R, N]`` (N = last dim): a view whenever the leading dims merge, whatever the strides.

    Only leading dims that no single stride can describe (e.g. a permuted 3-D tensor) are copied.
    """
    n = x.shape[-1] if x.dim() > 0 else 1
    try:
        return x.view(-1, n)
    except RuntimeError:
        return x.reshape(-1, n)


@functools.cache
def num_sms(device_index: int | None) -> int:
    """Streaming multiprocessors of the device (a small number under the interpreter, so grids stay small)."""
    if device_index is None or interpret_mode() or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    return num_sms(t.device.index if t.is_cuda else None)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def tuned(kernel, configs, key, **autotune_kwargs):
    """``kernel`` autotuned over ``configs`` on the GPU; the plain kernel under the interpreter.

    Under the interpreter every config would run (slowly) for nothing, so launchers name the
    meta-parameters to use there (see :func:`launch`).
    """
    import triton

    if interpret_mode():
        return kernel
    return triton.autotune(configs=configs, key=key, **autotune_kwargs)(kernel)


def launch(kernel, grid, *args, interp: dict, **kwargs):
    """Launch a :func:`tuned` kernel; ``interp`` holds the meta-parameters the interpreter uses."""
    if interpret_mode():
        kwargs = {**interp, **kwargs}
    return kernel[grid](*args, **kwargs)


def prune_by_tile(min_tile: int, max_tile: int, min_per_thread: int, max_per_thread: int):
    """An ``early_config_prune`` keeping configs whose ``BLOCK_M x BLOCK_N`` tile and elements per thread
    fall in the given ranges (falls back to the smallest tile when none does, e.g. for very wide rows)."""

    def prune(configs, named_args, **kwargs):
        block_n = kwargs["BLOCK_N"]
        keep = []
        for c in configs:
            tile = c.kwargs["BLOCK_M"] * block_n
            per_thread = tile // (32 * c.num_warps)
            if min_tile <= tile <= max_tile and min_per_thread <= per_thread <= max_per_thread:
                keep.append(c)
        if not keep:
            smallest = min(c.kwargs["BLOCK_M"] for c in configs)
            keep = [c for c in configs if c.kwargs["BLOCK_M"] == smallest]
        return keep

    return prune
