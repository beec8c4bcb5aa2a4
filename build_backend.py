"""PEP 517 backend: setuptools, with the build environment's torch pinned to the torch the package will run with.

The C++/CUDA extension must be compiled against the same torch as the one it is loaded into (its ABI is not stable
across releases). With build isolation (a plain `pip install .`), pip would otherwise put the newest torch into the
temporary build environment. This backend asks the interpreter that runs the build, outside the isolation, which
torch it has installed and requests exactly that version. `pip install --no-build-isolation .` skips all of this
and builds against the torch already installed.
"""

from __future__ import annotations

import os
import subprocess
import sys

from setuptools.build_meta import *  # noqa: F401,F403  (prepare_metadata_*, build_sdist, ...)

_QUERY = "import importlib.metadata as m; print(m.version('torch'))"


def _target_torch_requirement() -> str:
    # pip hides the target environment's site-packages through PYTHONPATH / PYTHONNOUSERSITE; a child process
    # without them sees the environment the package is being installed into.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    try:
        version = subprocess.run([sys.executable, "-c", _QUERY], env=env, capture_output=True, text=True,
                                 timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        version = ""
    if version:
        return f"torch=={version}"
    return "torch>=2.10"


# setuptools' own hooks would execute setup.py to find setup_requires, and setup.py imports torch: answer directly
# (setup.py declares no setup_requires).
def get_requires_for_build_wheel(config_settings=None):
    return ["wheel", _target_torch_requirement()]


def get_requires_for_build_editable(config_settings=None):
    return ["wheel", _target_torch_requirement()]
