"""`python -m triformers.info` / `triformers info` and the console script's dispatch."""

import subprocess
import sys

import triformers
from triformers import cli, info


def test_info_lists_versions_and_every_operator(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert "triformers.__version__" in out and triformers.__version__ in out
    for name in ("chunkedF", "chunkedB", "sdpaF", "sdpaB", "tritonflashattF", "tritonflashattB"):
        line = next(row for row in out.splitlines() if row.startswith(f"memory_efficient_attention.{name}"))
        assert line.split()[-1] == "available" or "unavailable (" in line


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "triformers.info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "memory_efficient_attention.chunkedF" in proc.stdout


def test_cli(capsys):
    assert cli.main(["info"]) == 0
    assert "pytorch.version" in capsys.readouterr().out
    assert cli.main(["bench"]) == 2
    assert cli.main(["bench", "no_such_bench"]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert cli.main([]) == 0
