"""Runs a Triton cross-compilation script for Hopper (sm_90) in a subprocess without the interpreter.

conftest.py sets TRITON_INTERPRET=1 on machines without a GPU, and triton reads it at import: the real compiler
pipeline (TTGIR, PTX, ptxas) therefore needs a fresh interpreter process. No GPU is needed to compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def compile_report(script: str) -> dict:
    """Run `script` (which prints one JSON line last) with TRITON_INTERPRET=0 and the repository importable."""
    pytest.importorskip("triton.backends.nvidia")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
