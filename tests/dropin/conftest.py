"""Shared by the drop-in tests: an environment for fresh interpreters, and the skip where a real xFormers is
installed (the alias then leaves it alone, which the tests check with a fake one)."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _env(**extra: str) -> dict[str, str]:
    """This process's environment for a child interpreter: triformers' sources first on the path (after
    ``extra['PYTHONPATH']``), ``TRIFORMERS_AS_XFORMERS`` unset unless given."""
    env = {k: v for k, v in os.environ.items() if k != "TRIFORMERS_AS_XFORMERS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra.pop("PYTHONPATH", ""), SRC, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def child_env():
    """``child_env(**extra) -> dict``: the environment for a fresh interpreter (see ``_env``)."""
    return _env


@pytest.fixture(scope="session")
def no_real_xformers():
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('xformers') is None)"
    if subprocess.run([sys.executable, "-c", code], env=_env(), timeout=120).returncode == 0:
        pytest.skip("an xFormers installation is importable here: the alias leaves it alone (a fake one tests that)")


@pytest.fixture(scope="module")
def diffusers(no_real_xformers):
    """diffusers, imported after ``triformers.as_xformers`` (diffusers checks for xFormers when it is
    imported); the alias is removed again after the module's tests if it was not there before."""
    alias = sys.modules.get("triformers.as_xformers")
    installed_before = alias is not None and alias._installed_finder() is not None
    if "diffusers" in sys.modules and not installed_before:
        pytest.fail("diffusers was imported in this process before triformers.as_xformers: its xFormers check is stale")
    alias = importlib.import_module("triformers.as_xformers")
    assert alias.install()
    module = importlib.import_module("diffusers")
    assert module.utils.is_xformers_available()
    yield module
    if not installed_before:
        alias.uninstall()
