"""Regenerate the performance tables of README.md and docs/performance.md from the committed benchmark JSON.

    python scripts/update_readme.py [--check]      # the same as `triformers report benchmarks/results`

Each table sits between ``<!-- BEGIN name -->`` and ``<!-- END name -->``; ``triformers.benchmarks._report``
renders them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from triformers.benchmarks._report import main  # noqa: E402

if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main(["benchmarks/results", *sys.argv[1:]]))
