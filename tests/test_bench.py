"""The benchmarks are run by hand, not by the suite: each must at least import as its command runs it
(`uv run python bench/NAME.py`, with bench/ first on sys.path), or it breaks unseen when what it
imports moves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_every_benchmark_imports_as_its_command_runs_it() -> None:
    names = sorted(path.stem for path in BENCH.glob("*.py"))
    assert "bench_reads" in names
    imports = "; ".join(f"import {name}" for name in names)
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(BENCH)!r}); {imports}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
