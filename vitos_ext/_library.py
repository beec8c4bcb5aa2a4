"""Loads the compiled vitos operators into torch.ops.vitos.

The extension built by setup.py is vitos_ext._C. Setting VITOS_LIBRARY=/path/to/libvitos_ops.so loads a library
built with CMakeLists.txt instead (the two must not both be loaded: they register the same namespace).
"""

from __future__ import annotations

import os

import torch

_load_error: Exception | None = None


def _load() -> None:
    global _load_error
    library = os.environ.get("VITOS_LIBRARY")
    try:
        if library:
            torch.ops.load_library(library)
        else:
            from . import _C  # noqa: F401  (registers the ops on import)
    except (ImportError, OSError) as error:
        _load_error = error


def is_available() -> bool:
    """True when the compiled vitos operators are registered (CPU kernels, plus CUDA ones in a CUDA build)."""
    return _load_error is None


def has_cuda_kernels() -> bool:
    """True when the loaded library carries CUDA kernels of the vitos ops."""
    return is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "vitos::compact_tokens", "CUDA"
    )


def require() -> None:
    """Raise a RuntimeError that says how to build the extension when it is not loaded."""
    if _load_error is not None:
        raise RuntimeError(
            "vitos_ext's compiled operators are not available (vitos_ext._C failed to load: "
            f"{_load_error}). Build them with `pip install --no-build-isolation -e .` from the source tree."
        ) from _load_error


_load()
