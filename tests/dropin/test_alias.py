"""``import triformers.as_xformers``: ``xformers.*`` resolves to triformers' modules, and the distribution
``xformers`` answers ``importlib.metadata``. The cases run in fresh interpreters (the alias changes the import
system of the process that imports it); only the refusal of a bad ``TRIFORMERS_AS_XFORMERS``, which installs
nothing, runs in this one."""

import json
import subprocess
import sys
import textwrap

import pytest

# xFormers' public module paths (xformers-api.md, xformers-api-wave2.md §6.1); triformers' module of the same
# path, where it exists, must be what the alias gives
MODULE_PATHS = [
    "",
    ".ops",
    ".ops.fmha",
    ".ops.fmha.attn_bias",
    ".ops.fmha.common",
    ".ops.fmha.dispatch",
    ".ops.fmha.triton_splitk",
    ".ops.fmha.merge",
    ".ops.rope_padded",
    ".ops.swiglu_op",
    ".ops.rmsnorm",
    ".ops.unbind",
    ".ops.indexing",
    ".ops.tree_attention",
    ".ops.tiled_matmul",
    ".ops.seqpar",
    ".ops.modpar_layers",
    ".ops.sequence_parallel_fused_ops",
    ".ops.differentiable_collectives",
    ".ops.sp24",
    ".components",
    ".components.attention",
    ".components.feedforward",
    ".components.positional_embedding",
    ".components.multi_head_dispatch",
    ".factory",
    ".factory.model_factory",
    ".factory.block_factory",
    ".helpers.hierarchical_configs",
    ".triton",
    ".sparse",
    ".profiler",
    ".checkpoint",
    ".info",
]
# xFormers' operator modules that triformers answers with its own operators (docs/differences-from-xformers.md)
OPERATOR_MODULES = {
    "flash": "triton",
    "flash3": "triton",
    "cutlass": "triton",
    "cutlass_blackwell": "triton",
    "ck": "triton",
    "small_k": "chunked",
    "decoder": "triton_splitk",
    "ck_decoder": "triton_splitk",
    "ck_splitk": "triton_splitk",
    "merge_training": "merge",
}


def _python(code: str, env: dict[str, str]) -> str:
    """Runs ``code`` in a fresh interpreter; its stdout. Fails the test with its stderr if it fails."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _last_json(stdout: str):
    return json.loads(stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.usefixtures("no_real_xformers")

# One fresh interpreter answers every question about an alias installed the usual way (each interpreter
# start imports torch: seconds); the tests below read its answers.
_FACTS = """
import importlib, importlib.metadata as md, importlib.util, json, sys, types
from pathlib import Path

facts = {"same": {}, "missing": []}
try:
    md.version("xformers")
    facts["before"] = "found"
except md.PackageNotFoundError:
    facts["before"] = "absent"

import triformers.as_xformers as alias
import triformers

facts["lazy"] = "triformers.factory" not in sys.modules  # installing imports none of triformers' subpackages

# distribution metadata, in memory
dist = md.distribution("xformers")
facts["version"] = md.version("xformers")
facts["name"] = dist.metadata["Name"]
facts["requires"] = dist.requires
facts["packages"] = md.packages_distributions().get("xformers")
facts["in_all"] = any(d.metadata["Name"] == "xformers" for d in md.distributions())
facts["find_spec"] = importlib.util.find_spec("xformers") is not None
facts["triformers_version"] = triformers.__version__
facts["on_disk"] = [str(p) for d in sys.path if d and Path(d).is_dir() for p in Path(d).glob("xformers*")]

# module paths: the very module objects of triformers
for path in MODULE_PATHS:
    try:
        ours = importlib.import_module("triformers" + path)
    except ModuleNotFoundError as e:
        if not ("triformers" + path + ".").startswith(e.name + "."):  # one that exists, failed to import
            raise
        facts["missing"].append(path)
        try:
            importlib.import_module("xformers" + path)
            facts["same"][path] = False
        except ModuleNotFoundError:
            facts["same"][path] = True
        continue
    facts["same"][path] = importlib.import_module("xformers" + path) is ours
for name, ours in OPERATOR_MODULES.items():
    module = importlib.import_module("xformers.ops.fmha." + name)
    facts["same"][name] = module is importlib.import_module("triformers.ops.fmha." + ours)
import xformers.ops.fmha.cutlass as cutlass
from xformers.ops.fmha import flash
facts["same"]["from-import"] = cutlass is flash is sys.modules["triformers.ops.fmha.triton"]
facts["same"]["own spec"] = sys.modules["triformers.ops"].__spec__.name == "triformers.ops"

# functions named like their modules survive an import of the module through the alias
import xformers.checkpoint, xformers.ops.rope_padded, xformers.ops.tiled_matmul, xformers.ops.unbind
from xformers.ops import rope_padded
facts["functions kept"] = [
    not isinstance(triformers.checkpoint, types.ModuleType),
    not isinstance(triformers.ops.rope_padded, types.ModuleType),
    not isinstance(triformers.ops.tiled_matmul, types.ModuleType),
    not isinstance(triformers.ops.unbind, types.ModuleType),
    rope_padded is triformers.ops.rope_padded,
]

# a path triformers lacks
facts["missing spec"] = importlib.util.find_spec("xformers.no_such_module") is None
try:
    import xformers.no_such_module
except ModuleNotFoundError as e:
    facts["missing raised"] = e.name

# uninstall, then install again
alias.uninstall()
facts["uninstalled"] = [
    not any(name == "xformers" or name.startswith("xformers.") for name in sys.modules),
    importlib.util.find_spec("xformers") is None,
    "triformers.ops" in sys.modules,
]
try:
    md.version("xformers")
except md.PackageNotFoundError:
    facts["uninstalled"].append(True)
facts["reinstalled"] = alias.install() and importlib.import_module("xformers.ops") is sys.modules["triformers.ops"]
print(json.dumps(facts))
"""


@pytest.fixture(scope="module")
def facts(child_env):
    prelude = f"MODULE_PATHS = {MODULE_PATHS!r}\nOPERATOR_MODULES = {OPERATOR_MODULES!r}\n"
    return _last_json(_python(prelude + _FACTS, child_env()))


def test_every_module_path_resolves_to_the_same_module(facts):
    assert all(facts["same"].values()), {k: v for k, v in facts["same"].items() if not v}
    # the core of xFormers' surface exists in triformers, not only resolves consistently
    core = {"", ".ops", ".ops.fmha", ".ops.fmha.attn_bias", ".components", ".factory", ".triton", ".checkpoint"}
    assert not core & set(facts["missing"])


def test_installing_imports_nothing_more(facts):
    assert facts["lazy"]


def test_submodule_import_keeps_the_functions_packages_export(facts):
    assert all(facts["functions kept"])


def test_missing_path_is_not_found(facts):
    assert facts["missing spec"] and facts["missing raised"] == "xformers.no_such_module"


def test_distribution_metadata_answers_for_xformers_in_memory(facts):
    assert facts["before"] == "absent"
    # diffusers enables its xFormers paths from 0.0.29; a local label names the triformers release
    public, _, local = facts["version"].partition("+")
    assert tuple(int(x) for x in public.split(".")) >= (0, 0, 29)
    assert local == f"triformers.{facts['triformers_version']}"
    assert facts["name"] == "xformers" and facts["packages"] == ["xformers"] and facts["in_all"]
    assert facts["requires"] == [f"triformers=={facts['triformers_version']}"]
    assert facts["find_spec"]
    assert facts["on_disk"] == []


def test_uninstall_restores_the_import_system(facts):
    assert facts["uninstalled"] == [True, True, True, True]
    assert facts["reinstalled"]


def test_alias_after_triformers_was_imported(child_env):
    code = """
    import json, types
    import triformers.ops
    import triformers.as_xformers
    import xformers.checkpoint, xformers.ops.rope_padded
    import triformers
    print(json.dumps([xformers.ops is triformers.ops, not isinstance(triformers.checkpoint, types.ModuleType),
                      not isinstance(triformers.ops.rope_padded, types.ModuleType)]))
    """
    assert _last_json(_python(code, child_env())) == [True, True, True]


@pytest.fixture
def fake_xformers(tmp_path):
    """A directory holding a dummy ``xformers`` package (an installed xFormers, as the import system sees it)."""
    package = tmp_path / "xformers"
    package.mkdir()
    (package / "__init__.py").write_text("REAL = True\n")
    return tmp_path


_REPORT_ALIAS = """
    import json, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        {imports}
    import xformers, triformers
    print(json.dumps({{"real": getattr(xformers, "REAL", False), "alias": xformers is triformers,
                      "warnings": [str(w.message) for w in caught]}}))
"""


def test_a_real_xformers_is_left_alone_with_a_warning(child_env, fake_xformers):
    env = child_env(PYTHONPATH=str(fake_xformers))
    out = _python(_REPORT_ALIAS.format(imports="import triformers.as_xformers"), env=env)
    result = _last_json(out)
    assert result["real"] and not result["alias"]
    (message,) = [w for w in result["warnings"] if "triformers.as_xformers" in w]
    assert str(fake_xformers) in message and "TRIFORMERS_AS_XFORMERS=force" in message


def test_force_maps_xformers_even_where_installed(child_env, fake_xformers):
    env = child_env(PYTHONPATH=str(fake_xformers), TRIFORMERS_AS_XFORMERS="force")
    result = _last_json(_python(_REPORT_ALIAS.format(imports="import triformers.as_xformers"), env=env))
    assert result["alias"] and not result["real"]
    assert not [w for w in result["warnings"] if "triformers.as_xformers" in w]


def test_an_already_imported_xformers_is_never_replaced(child_env, fake_xformers):
    env = child_env(PYTHONPATH=str(fake_xformers), TRIFORMERS_AS_XFORMERS="force")
    imports = "import xformers; import triformers.as_xformers"
    result = _last_json(_python(_REPORT_ALIAS.format(imports=imports), env=env))
    assert result["real"] and not result["alias"]
    assert any("already imported" in w for w in result["warnings"])


def test_unknown_env_value_is_refused(monkeypatch):
    monkeypatch.setenv("TRIFORMERS_AS_XFORMERS", "yes")
    alias = sys.modules.get("triformers.as_xformers")
    with pytest.raises(ValueError, match=r"TRIFORMERS_AS_XFORMERS='yes' is not understood: set it to 'force'"):
        if alias is None:
            import triformers.as_xformers  # noqa: F401  (raises before it installs anything)
        else:
            alias._forced()
    if alias is None:
        assert "triformers.as_xformers" not in sys.modules and "xformers" not in sys.modules
