"""``triformers run SCRIPT.py`` / ``triformers run -m MODULE``: a program that imports xformers runs on
triformers without an edit, as ``python SCRIPT.py`` / ``python -m MODULE`` would run it."""

import json
import subprocess
import sys
import textwrap

import pytest

from triformers import cli

PROGRAM = textwrap.dedent(
    """
    import json, os, sys
    import xformers.ops
    import triformers.ops
    print(json.dumps({
        "same": xformers.ops.memory_efficient_attention is triformers.ops.memory_efficient_attention,
        "name": __name__,
        "argv": sys.argv,
        "path0": os.path.realpath(sys.path[0]),
    }))
    sys.exit(int(os.environ.get("EXIT_CODE", "0")))
    """
)


pytestmark = pytest.mark.usefixtures("no_real_xformers")


def _run(child_env, args: list[str], cwd, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "triformers.cli", "run", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=child_env(**env),
        timeout=300,
    )


def test_run_script(child_env, tmp_path):
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "prog.py").write_text(PROGRAM)
    proc = _run(child_env, [str(folder / "prog.py"), "a", "--flag"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result == {
        "same": True,
        "name": "__main__",
        "argv": [str(folder / "prog.py"), "a", "--flag"],
        "path0": str(folder.resolve()),  # the script's folder, as `python SCRIPT` puts it first
    }


def test_run_module_and_its_exit_code(child_env, tmp_path):
    (tmp_path / "prog.py").write_text(PROGRAM)
    proc = _run(child_env, ["-m", "prog", "x"], cwd=tmp_path, EXIT_CODE="3")
    assert proc.returncode == 3, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["same"] and result["name"] == "__main__"
    assert result["argv"] == [str(tmp_path / "prog.py"), "x"]
    assert result["path0"] == str(tmp_path.resolve())  # the working directory, as `python -m` puts it first


def test_run_an_aliased_module(child_env, tmp_path):
    proc = _run(child_env, ["-m", "xformers.info"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "memory_efficient_attention.chunkedF" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "usage: triformers run"),
        (["-m"], "-m needs a module name"),
        (["no_such_script.py"], "can't open file 'no_such_script.py'"),
    ],
)
def test_run_errors(capsys, args, message):
    assert cli.main(["run", *args]) == 2
    assert message in capsys.readouterr().err


def test_run_missing_module(capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # `run -m` puts the working directory first
    alias = sys.modules.get("triformers.as_xformers")
    installed_before = alias is not None and alias._installed_finder() is not None
    try:
        assert cli.main(["run", "-m", "no_such_module_here"]) == 2
    finally:
        if not installed_before:  # leave this process's import system as it was
            sys.modules["triformers.as_xformers"].uninstall()
    assert "no module named 'no_such_module_here'" in capsys.readouterr().err
