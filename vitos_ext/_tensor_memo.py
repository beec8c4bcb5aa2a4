"""A tiny memo for values derived from tensors by reading them on the host.

transformers hands the same mask / position / cu_seqlens tensor objects to every layer of one forward. Anything
derived from them through a device read (a host sync) -- unpad indices, packing boundaries, the longest window,
validated offsets -- is computed once per forward with this memo instead of once per layer: a sync per layer stops
the host from queueing layer i+1 while the GPU runs layer i, so host and device times add up.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch


_inference_epoch = 0


def begin_forward() -> None:
    """Mark the start of a model forward. Tensors made under torch.inference_mode() have no in-place version counter,
    so a memo cannot tell whether such a tensor was changed in place since its value was stored; entries keyed on
    them stay valid only until the next call of this (the attention backend's mask function calls it once per
    forward, before the layers)."""
    global _inference_epoch
    if not torch.compiler.is_compiling():
        _inference_epoch += 1


def _version(t: torch.Tensor) -> Hashable:
    return ("inference", _inference_epoch) if t.is_inference() else t._version


class TensorMemo:
    """Remembers the last ``capacity`` values, each keyed by the identity and in-place version of some tensors
    (for inference tensors: the forward, see begin_forward) plus a hashable extra key. Weak references only: a
    memo never keeps a tensor alive. Nothing is stored while torch.compile traces (fake tensors are new objects
    every time)."""

    def __init__(self, capacity: int = 1):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: list[tuple[tuple[weakref.ref, ...], Hashable, Any]] = []

    @staticmethod
    def _key(tensors: Sequence[torch.Tensor], extra: Hashable) -> Hashable:
        return tuple(_version(t) for t in tensors), extra

    def lookup(self, tensors: Sequence[torch.Tensor], extra: Hashable = None) -> tuple[bool, Any]:
        """(True, value) if a value for these very tensors (unmodified since) and ``extra`` is stored, else
        (False, None). Always a miss while torch.compile traces: the entries belong to eager calls, and tracing
        through their weak references and versions would only add guards (or, on some releases, graph breaks)."""
        if torch.compiler.is_compiling():
            return False, None
        key = self._key(tensors, extra)
        for refs, stored_key, value in self._entries:
            if stored_key == key and len(refs) == len(tensors) and all(r() is t for r, t in zip(refs, tensors)):
                return True, value
        return False, None

    def store(self, tensors: Sequence[torch.Tensor], extra: Hashable, value: Any) -> None:
        """Remember ``value`` for these tensors (as they are now) and ``extra``, evicting the oldest entry."""
        if torch.compiler.is_compiling():
            return
        entry = (tuple(weakref.ref(t) for t in tensors), self._key(tensors, extra), value)
        self._entries = [entry] + self._entries[: self.capacity - 1]

    def get(self, tensors: Sequence[torch.Tensor], extra: Hashable, compute: Callable[[], Any]) -> Any:
        """The stored value, or ``compute()`` stored and returned (nothing is stored if it raises)."""
        hit, value = self.lookup(tensors, extra)
        if not hit:
            value = compute()
            self.store(tensors, extra, value)
        return value
