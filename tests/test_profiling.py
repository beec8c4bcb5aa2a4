"""NVTX ranges: pushed and popped around the ops while a profiler listens and a backend exists, a no-op otherwise."""

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
    monkeypatch.setenv("VITOS_NVTX", "1")
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
    monkeypatch.setenv("VITOS_NVTX", "1")
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
    monkeypatch.setenv("VITOS_NVTX", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    profiling._backend.cache_clear()
    try:
        assert profiling._backend() is None
        with profiling.nvtx_range("nothing"):
            pass
    finally:
        profiling._backend.cache_clear()


def _fake_nvtx(monkeypatch, calls):
    fake = types.SimpleNamespace(push_range=lambda name: calls.append(name), pop_range=lambda: calls.append("pop"))
    monkeypatch.setitem(sys.modules, "nvtx", fake)


def _ranges_emitted(monkeypatch, env: dict[str, str]) -> list:
    calls = []
    _fake_nvtx(monkeypatch, calls)
    for name in ("VITOS_NVTX", "NVTX_INJECTION64_PATH"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    profiling._backend.cache_clear()
    try:
        with profiling.nvtx_range("r"):
            pass
    finally:
        profiling._backend.cache_clear()
    return calls


def test_ranges_are_emitted_only_while_a_profiler_listens(monkeypatch):
    """Without an injected NVTX tool nothing is pushed (each push/pop pair costs host time); Nsight's injection
    variable turns ranges on, VITOS_NVTX forces either way."""
    assert _ranges_emitted(monkeypatch, {}) == []
    assert _ranges_emitted(monkeypatch, {"NVTX_INJECTION64_PATH": "/opt/nsight/libToolsInjection64.so"}) == \
        ["r", "pop"]
    assert _ranges_emitted(monkeypatch, {"VITOS_NVTX": "1"}) == ["r", "pop"]
    assert _ranges_emitted(monkeypatch, {"VITOS_NVTX": "0", "NVTX_INJECTION64_PATH": "/x.so"}) == []
    assert _ranges_emitted(monkeypatch, {"VITOS_NVTX": "off"}) == []
