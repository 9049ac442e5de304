"""``import triformers.as_xformers``: code written against xFormers runs on triformers, unchanged.

Import it once, before the client library::

    import triformers.as_xformers  # noqa: F401  (xformers.* now resolves to triformers.*)
    import diffusers

From then on ``import xformers``, ``import xformers.ops``, ``from xformers.ops.fmha import attn_bias`` and every
other ``xformers.<path>`` give triformers' module ``triformers.<path>`` -- the same module object
(``xformers.ops is triformers.ops``), imported on first use, in any order. Where triformers has no module of
xFormers' name, an attribute of that name on the parent package counts: ``xformers.ops.fmha.flash`` is
``triformers.ops.fmha.flash``, our FlashAttention operator module ``fmha.triton``
(docs/differences-from-xformers.md has the table). A path triformers lacks is not found
(``ModuleNotFoundError``; ``importlib.util.find_spec`` answers None).

``importlib.util.find_spec("xformers")`` finds it and ``importlib.metadata`` answers for the distribution
``xformers`` with version :data:`VERSION` (xFormers' API level, then triformers' version as a local label),
so clients that check the installed distribution (diffusers: ``>= 0.0.29``) enable their xFormers paths.
Nothing is written to disk or installed.

An xFormers installation that Python can import is never shadowed silently: the alias warns and leaves it
alone, unless ``TRIFORMERS_AS_XFORMERS=force``. For a script you cannot edit, ``triformers run script.py
ARGS`` or ``triformers run -m module ARGS`` installs the alias first.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import triformers

__all__ = ["VERSION", "install", "uninstall"]

ALIAS = "xformers"
TARGET = "triformers"
ENV_VAR = "TRIFORMERS_AS_XFORMERS"
# the xFormers release whose public API triformers follows (the newest its reference describes); clients compare
# against it (diffusers needs >= 0.0.29), and the local label says which triformers answers
XFORMERS_API_VERSION = "0.0.35"
VERSION = f"{XFORMERS_API_VERSION}+{TARGET}.{triformers.__version__}"
SUMMARY = "triformers answering for xformers (import triformers.as_xformers): xFormers' API on PyTorch and Triton"


def _is_alias(fullname: str) -> bool:
    return fullname == ALIAS or fullname.startswith(ALIAS + ".")


def _target_name(fullname: str) -> str:
    return TARGET + fullname[len(ALIAS) :]


def _alias_name(target: str) -> str:
    return ALIAS + target[len(TARGET) :]


def _resolve(fullname: str) -> importlib.machinery.ModuleSpec | None:
    """The spec of the triformers module that ``fullname`` (``xformers.<path>``) stands for, or None.

    ``triformers.<path>`` when that module exists; else a triformers module that the parent package holds
    under the last name (``triformers.ops.fmha.flash`` is ``triformers.ops.fmha.triton``).
    """
    target = _target_name(fullname)
    module = sys.modules.get(target)
    try:
        spec = module.__spec__ if module is not None else importlib.util.find_spec(target)
    except ModuleNotFoundError:  # a parent package is missing
        return None
    if spec is not None:
        return spec
    parent, _, child = target.rpartition(".")
    held = getattr(sys.modules.get(parent), child, None)
    if isinstance(held, ModuleType) and held.__name__.startswith(TARGET + "."):
        return held.__spec__
    return None


def _register_imported() -> None:
    """Enters every imported ``triformers.*`` module in ``sys.modules`` under its ``xformers.*`` name.

    Importing a submodule sets it as an attribute of its parent package -- unless ``sys.modules`` already
    holds it. Where a package binds a function to its submodule's name (``triformers.checkpoint``,
    ``triformers.ops.rope_padded``), a first ``import xformers.checkpoint`` would otherwise replace the
    function by the module; registered here, the import finds the module and leaves the package alone.
    Nothing is imported.
    """
    for name, module in list(sys.modules.items()):
        if (name == TARGET or name.startswith(TARGET + ".")) and isinstance(module, ModuleType):
            sys.modules.setdefault(_alias_name(name), module)


def _normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


class _Distribution(importlib.metadata.Distribution):
    """The metadata of the ``xformers`` distribution triformers stands in for (held in memory)."""

    def read_text(self, filename: str) -> str | None:
        if filename == "METADATA":
            return (
                "Metadata-Version: 2.1\n"
                f"Name: {ALIAS}\n"
                f"Version: {VERSION}\n"
                f"Summary: {SUMMARY}\n"
                f"Requires-Dist: {TARGET}=={triformers.__version__}\n"
            )
        if filename == "top_level.txt":
            return ALIAS + "\n"
        return None

    def locate_file(self, path: str | os.PathLike[str]) -> Path:
        return Path(triformers.__file__).parent.parent / path


class _Finder(importlib.metadata.DistributionFinder, importlib.abc.Loader):
    """Meta-path finder and loader of ``xformers`` and its submodules, and finder of its distribution.

    The loader hands out triformers' module object itself; the import system sets the alias spec as the
    module's ``__spec__`` on the way, which :meth:`exec_module` puts back.
    """

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if not _is_alias(fullname):
            return None
        resolved = _resolve(fullname)
        if resolved is None:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, self, origin=resolved.origin)
        if resolved.submodule_search_locations is not None:  # a package stays one
            spec.submodule_search_locations = list(resolved.submodule_search_locations)
        spec.loader_state = {"target": resolved.name}
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(spec.loader_state["target"])
        spec.loader_state["own_spec"] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the module ran when triformers imported it; the import system gave it the alias spec on the way
        module.__spec__ = module.__spec__.loader_state["own_spec"]
        _register_imported()

    def get_code(self, fullname: str):
        """The target module's code (``runpy``: ``triformers run -m xformers.info``)."""
        resolved = _resolve(fullname)
        if resolved is None or resolved.loader is None or not hasattr(resolved.loader, "get_code"):
            raise ImportError(f"no code for {fullname!r}", name=fullname)
        return resolved.loader.get_code(resolved.name)

    def find_distributions(self, context=None) -> Iterator[_Distribution]:
        context = importlib.metadata.DistributionFinder.Context() if context is None else context
        # answer on the interpreter's own path only (an explicit path= asks about one folder's distributions)
        if context.path is not sys.path or (context.name is not None and _normalized(context.name) != ALIAS):
            return iter(())
        return iter((_Distribution(),))


def _installed_finder() -> _Finder | None:
    return next((finder for finder in sys.meta_path if isinstance(finder, _Finder)), None)


def _real_xformers() -> str | None:
    """Where an importable xFormers (not this alias) lives, or None."""
    module = sys.modules.get(ALIAS)
    if module is not None:
        return getattr(module, "__file__", None) or repr(module)
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        spec = find_spec(ALIAS, None) if find_spec is not None and not isinstance(finder, _Finder) else None
        if spec is not None:
            return spec.origin or ", ".join(spec.submodule_search_locations or ()) or repr(spec)
    return None


def _forced() -> bool:
    value = os.environ.get(ENV_VAR, "")
    if value not in ("", "force"):
        raise ValueError(
            f"{ENV_VAR}={value!r} is not understood: set it to 'force' to map xformers to triformers even where "
            "xFormers is installed, or unset it"
        )
    return value == "force"


def install() -> bool:
    """Makes ``xformers`` and ``xformers.*`` resolve to triformers (see the module docstring).

    Idempotent. Where Python can import a real xFormers, warns and leaves it alone, unless
    ``TRIFORMERS_AS_XFORMERS=force``; an xFormers that is already imported (``sys.modules``) is never replaced.

    Returns:
        True if the alias is in place after the call.

    Raises:
        ValueError: ``TRIFORMERS_AS_XFORMERS`` has a value other than ``force``.
    """
    if _installed_finder() is not None:
        return True
    forced = _forced()
    if sys.modules.get(ALIAS) is not None:
        warnings.warn(
            f"triformers.as_xformers: xformers is already imported ({_real_xformers()}); the alias is not installed. "
            "Import triformers.as_xformers before anything imports xformers.",
            stacklevel=2,
        )
        return False
    real = _real_xformers()
    if real is not None and not forced:
        warnings.warn(
            f"triformers.as_xformers: an xFormers installation is importable ({real}); leaving it alone. "
            f"Set {ENV_VAR}=force to map xformers to triformers anyway, or uninstall xformers.",
            stacklevel=2,
        )
        return False
    sys.meta_path.insert(0, _Finder())
    importlib.invalidate_caches()
    return True


def uninstall() -> None:
    """Removes the alias: the finder, and every ``xformers`` entry of ``sys.modules`` it made (triformers' own
    modules stay imported). Modules that imported ``xformers`` keep the objects they hold."""
    finder = _installed_finder()
    if finder is None:
        return
    sys.meta_path.remove(finder)
    for name in [name for name in sys.modules if _is_alias(name)]:
        if getattr(sys.modules[name], "__name__", "").startswith(TARGET):
            del sys.modules[name]


install()
