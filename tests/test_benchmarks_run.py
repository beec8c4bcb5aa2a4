"""The pytest-benchmark microbenchmarks (benchmarks/) still run: each benchmark body once, timing disabled, so an API
change cannot leave them broken until someone measures (their own asserts check the results)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_cpu_microbenchmarks_run():
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                          str(BENCHMARKS)], capture_output=True, text=True, timeout=600, cwd=BENCHMARKS.parent)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
