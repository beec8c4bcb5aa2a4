"""NVTX ranges: pushed and popped around the ops when a backend exists, a no-op otherwise."""

import sys
import types

import torch

import vitos_ext
from vitos_ext import profiling


def test_ranges_go_through_the_nvtx_package(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(push_range=lambda name: calls.append(("push", name)),
                                 pop_range=lambda: calls.append(("pop",)))
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    profiling._backend.cache_clear()
    try:
        vitos_ext.region_to_patch_mask(torch.tensor([[0.0, 0.0, 0.5, 0.5]]), torch.tensor([0]),
                                       torch.tensor([[1, 4, 4]]))
    finally:
        profiling._backend.cache_clear()
    assert calls == [("push", "vitos.region_to_patch_mask"), ("pop",)]


def test_range_is_popped_on_error(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(push_range=lambda name: calls.append("push"), pop_range=lambda: calls.append("pop"))
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    profiling._backend.cache_clear()
    try:
        with profiling.nvtx_range("boom"):
            raise KeyError("x")
    except KeyError:
        pass
    finally:
        profiling._backend.cache_clear()
    assert calls == ["push", "pop"]


def test_no_backend_is_a_no_op(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvtx", None)  # import fails
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    profiling._backend.cache_clear()
    try:
        assert profiling._backend() is None
        with profiling.nvtx_range("nothing"):
            pass
    finally:
        profiling._backend.cache_clear()
