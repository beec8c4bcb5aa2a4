"""Plumbing shared by the Triton-backed torch.library ops (attention and fused layers): registration, device
checks, the inference fast path."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
# the floating-point dtypes every Triton kernel of the package takes
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_runs_on(kernels: Any, device: torch.device | str) -> bool:
    """Whether a Triton kernel module (None when triton is missing) can run on tensors of `device`: CUDA, or CPU
    under TRITON_INTERPRET=1."""
    if kernels is None:
        return False
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and kernels.INTERPRET)


def triton_unavailable_message(kernels: Any, device: torch.device | str) -> str:
    """Why backend="triton" cannot run on tensors of `device` (for when :func:`triton_runs_on` says so)."""
    if kernels is None:
        return ("backend='triton' needs the triton package, which is not installed (torch wheels for macOS and "
                "Windows ship without it); use backend='reference'")
    return (f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before importing "
            f"vitos_ext); got tensors on {torch.device(device)}")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dim is contiguous (the kernels take any other strides), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


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


def eager_fast_path(*tensors: torch.Tensor) -> bool:
    """Whether an op call may skip the torch.library dispatch and launch its kernels directly.

    A custom op call costs ~10-25 us of host time over its body (dispatcher, Python op wrapper, autograd
    bookkeeping): per layer and per op that adds up in host-bound inference. Skipping it changes nothing when no
    gradient is recorded, nothing traces (torch.compile, fake tensors, dispatch modes such as FlopCounterMode) and
    the inputs are plain tensors (no DTensor / functorch wrappers)."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if type(t) not in _PLAIN_TENSOR_TYPES or (grad and t.requires_grad):
            return False
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
    return True
