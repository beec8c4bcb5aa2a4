"""What every Triton kernel module of vitos_ext needs at launch time."""

from __future__ import annotations

import functools
import os

import triton
import triton.language as tl
from torch.library import wrap_triton

# read once, at import, like triton itself: kernels run interpreted on CPU tensors when it is set
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def traceable(kernel):
    """wrap_triton makes a launch visible to torch.compile inside a triton_op; interpreted kernels cannot be
    traced (older torch releases even reject them), so under TRITON_INTERPRET they are launched as they are and the
    ops are registered as opaque custom ops instead (see vitos_ext.ops._registration)."""
    if INTERPRET:
        check_interpreter()
        return kernel
    return wrap_triton(kernel)


@triton.jit
def _loop_to_loaded_bound(bound_ptr, out_ptr):
    count = 0
    for _ in range(0, tl.load(bound_ptr)):
        count += 1
    tl.store(out_ptr, count)


@functools.cache
def check_interpreter() -> None:
    """Raise a clear error if Triton's interpreter cannot run our kernels with the installed numpy.

    Triton <= 3.6's interpreter turns a loaded scalar (a one-element array) into a loop bound with int(array), which
    numpy >= 2.4 rejects; every kernel that loops over keys or rows would fail with an opaque InterpreterError. Checked
    once, by running a two-line kernel that does exactly that."""
    import numpy
    import torch

    bound, out = torch.tensor([3], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    try:
        _loop_to_loaded_bound[(1,)](bound, out)
    except Exception as error:  # the interpreter wraps the TypeError in its own InterpreterError
        raise RuntimeError(
            f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run with numpy "
            f"{numpy.__version__}: it converts one-element arrays to Python ints, which numpy >= 2.4 rejects. Install "
            f"numpy<2.4, or a Triton whose interpreter handles it (3.8 does)") from error
    if int(out) != 3:
        raise RuntimeError(f"Triton {triton.__version__}'s interpreter ran a 3-iteration loop {int(out)} times")
