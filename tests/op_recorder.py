"""A dispatch mode that records the aten / custom ops a block of code runs (what the tests count launches with)."""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


class RecordOps(TorchDispatchMode):
    """``with RecordOps("vitos") as ops: ...`` -> ``ops.names`` (op names in call order, e.g. "rotary_embedding")
    and ``ops.calls`` (name -> count); ``namespace`` None records every op."""

    def __init__(self, namespace: str | None = None):
        super().__init__()
        self.namespace = namespace
        self.names: list[str] = []

    @property
    def calls(self) -> dict[str, int]:
        return dict(Counter(self.names))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.namespace is None or func.namespace == self.namespace:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
