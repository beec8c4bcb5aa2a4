"""Registration of the Triton-backed torch.library ops (shared by the attention and the fused-layer ops)."""

from __future__ import annotations

from typing import Callable

import torch


def define_triton_op(name: str, fake_fn: Callable, interpret: bool) -> Callable:
    """Decorator registering `fn` as op `name`: a triton_op on real GPUs (torch.compile traces into the kernels,
    which must be launched through wrap_triton), or, under TRITON_INTERPRET (`interpret`), an opaque custom_op with
    `fake_fn` as its fake, because interpreted kernels cannot be traced."""
    def register(fn):
        if interpret:
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fake_fn)
            return op
        return torch.library.triton_op(name, mutates_args=())(fn)
    return register
