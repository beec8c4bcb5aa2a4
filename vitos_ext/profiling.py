"""NVTX ranges for profilers (Nsight Systems / Nsight Compute), free when nobody is listening.

Ranges are emitted only while a profiler listens: when an NVTX tool is injected into the process (Nsight Systems and
Nsight Compute set NVTX_INJECTION64_PATH for the program they launch) or when VITOS_NVTX=1; VITOS_NVTX=0 turns them
off. They go through the `nvtx` package when it is installed, else through torch.cuda.nvtx on a CUDA build with a
device. Otherwise, and while torch.compile traces, `nvtx_range` does nothing: a push/pop pair from Python costs
~1-2 us, which adds up over the per-layer calls of a forward when no tool records it.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

__all__ = ["nvtx_range", "nvtx_annotate", "nvtx_enabled"]


def nvtx_enabled() -> bool:
    """Whether ranges are wanted: VITOS_NVTX=1/0 decides; unset, only while an NVTX tool is injected. Read once per
    process, at the first range."""
    choice = os.environ.get("VITOS_NVTX", "").strip().lower()
    if choice in ("1", "true", "yes", "on"):
        return True
    if choice in ("0", "false", "no", "off"):
        return False
    return bool(os.environ.get("NVTX_INJECTION64_PATH"))


@functools.cache
def _backend():
    if not nvtx_enabled():
        return None
    try:
        import nvtx  # the standalone package works without a GPU as well

        return nvtx.push_range, nvtx.pop_range
    except ImportError:
        pass
    try:
        if torch.cuda.is_available():
            return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    except (RuntimeError, AttributeError):  # CPU-only builds of torch have no usable torch.cuda.nvtx
        pass
    return None


class _Pushed:
    """One pushed range (a plain class: cheaper to enter than a generator-based context manager)."""

    __slots__ = ("_push", "_pop", "_name")

    def __init__(self, push, pop, name: str):
        self._push, self._pop, self._name = push, pop, name

    def __enter__(self):
        self._push(self._name)

    def __exit__(self, *exc_info) -> bool:
        self._pop()
        return False


_NO_RANGE = contextlib.nullcontext()


def nvtx_range(name: str):
    """Context manager marking `name` as an NVTX range (a no-op unless a profiler listens; see the module doc)."""
    if torch.compiler.is_compiling():  # first: Dynamo warns about tracing the lru_cache-wrapped _backend()
        return _NO_RANGE
    backend = _backend()
    if backend is None:
        return _NO_RANGE
    return _Pushed(backend[0], backend[1], name)


def nvtx_annotate(name: str):
    """Decorator form of :func:`nvtx_range`."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with nvtx_range(name):
                return fn(*args, **kwargs)

        return inner

    return wrap
