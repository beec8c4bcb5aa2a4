"""NVTX ranges for profilers (Nsight Systems / Nsight Compute), free when nobody is listening.

Ranges go through the `nvtx` package when it is installed, else through torch.cuda.nvtx on a CUDA build with a
device; otherwise, and while torch.compile traces, `nvtx_range` does nothing.
"""

from __future__ import annotations

import contextlib
import functools

import torch


@functools.cache
def _backend():
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


@contextlib.contextmanager
def _pushed(push, pop, name: str):
    push(name)
    try:
        yield
    finally:
        pop()


def nvtx_range(name: str):
    """Context manager marking `name` as an NVTX range (a no-op without an NVTX backend or while compiling)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    backend = _backend()
    if backend is None:
        return contextlib.nullcontext()
    return _pushed(backend[0], backend[1], name)


def nvtx_annotate(name: str):
    """Decorator form of :func:`nvtx_range`."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with nvtx_range(name):
                return fn(*args, **kwargs)

        return inner

    return wrap
