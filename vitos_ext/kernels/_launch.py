"""What every Triton kernel module of vitos_ext needs at launch time."""

from __future__ import annotations

import os

from torch.library import wrap_triton

# read once, at import, like triton itself: kernels run interpreted on CPU tensors when it is set
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def traceable(kernel):
    """wrap_triton makes a launch visible to torch.compile inside a triton_op; interpreted kernels cannot be
    traced (older torch releases even reject them), so under TRITON_INTERPRET they are launched as they are and the
    ops are registered as opaque custom ops instead (see vitos_ext.ops._registration)."""
    return kernel if INTERPRET else wrap_triton(kernel)
