"""compact_tokens: drop (or fuse) rows of a packed batch, keeping original positions (vitos::compact_tokens)."""

from __future__ import annotations

import torch

from .. import _library
from ..profiling import nvtx_range
from .types import Compacted


def compact_tokens(
    hidden: torch.Tensor,
    keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_ids: torch.Tensor,
    fuse_into: torch.Tensor | None = None,
    *,
    out_capacity: int | None = None,
) -> Compacted:
    """Keep the rows of a packed batch selected by `keep`, in order, with their original position ids.

    Args:
        hidden: [T, D] float32/float16/bfloat16/float64, packed sequences. Differentiable.
        keep: bool [T], rows to keep.
        cu_seqlens: int32 [B + 1], sequence offsets (cu_seqlens[0] == 0, non-decreasing, cu_seqlens[-1] == T).
        position_ids: int64 [P, T] (P = 3 for M-RoPE, 1 for 1-D positions, any P). Gathered, never renumbered.
        fuse_into: int64 [T] or None. For a dropped row j: -1 discards it, k >= 0 fuses it into the kept row k of
            the same sequence: output row of k = (x[k] + sum of the x[j] fused into k) / (1 + their count), summed in
            float32 (float64 for float64 input) in increasing j (bitwise deterministic), cast to hidden.dtype.
            Ignored at kept rows.
        out_capacity: if given, the outputs have exactly this many rows and nothing is read back to the host (no
            device sync): rows past the true count T' = cu_seqlens_out[-1] are padding (hidden 0, position ids 0,
            kept_index -1) and max_seqlen is the upper bound min(out_capacity, T). More than out_capacity kept rows
            is an error (a device-side assertion on CUDA).

    Returns:
        Compacted(hidden [T', D], position_ids int64 [P, T'], cu_seqlens int32 [B + 1], kept_index int64 [T'],
        max_seqlen int). Without out_capacity the CUDA path does exactly one device->host copy (T' and max_seqlen).

    Raises:
        ValueError naming the argument for bad shapes/dtypes, malformed cu_seqlens and invalid fuse_into targets
        (out of range, not kept, or in another sequence); RuntimeError for tensors on different devices.
    """
    _library.require()
    with nvtx_range("vitos.compact_tokens"):
        out = torch.ops.vitos.compact_tokens(hidden, keep, cu_seqlens, position_ids, fuse_into, out_capacity)
    return Compacted(out[0], out[1], out[2], out[3], out[6])


def _register_fake_and_autograd() -> None:
    @torch.library.register_fake("vitos::compact_tokens")
    def _(hidden, keep, cu_seqlens, position_ids, fuse_into=None, out_capacity=None):
        torch._check(hidden.dim() == 2, lambda: "hidden must be 2-D")
        torch._check(position_ids.dim() == 2, lambda: "position_ids must be 2-D")
        ctx = torch.library.get_ctx()
        if out_capacity is None:
            rows = ctx.new_dynamic_size()
            max_seqlen = ctx.new_dynamic_size()
        else:
            rows = out_capacity
            max_seqlen = torch.sym_min(out_capacity, hidden.shape[0])
        return (
            hidden.new_empty(rows, hidden.shape[1]),
            position_ids.new_empty(position_ids.shape[0], rows),
            cu_seqlens.new_empty(cu_seqlens.shape[0]),
            keep.new_empty(rows, dtype=torch.int64),
            keep.new_empty(hidden.shape[0], dtype=torch.int64),
            cu_seqlens.new_empty(rows if fuse_into is not None else 0),
            max_seqlen,
        )

    @torch.library.register_fake("vitos::compact_tokens_backward")
    def _(grad_out, dest_row, fuse_count):
        return grad_out.new_empty(dest_row.shape[0], grad_out.shape[1])

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[4], output[5])  # dest_row, fuse_count

    def backward(ctx, grad_hidden, *unused_grads):
        dest_row, fuse_count = ctx.saved_tensors
        grad = torch.ops.vitos.compact_tokens_backward(grad_hidden.contiguous(), dest_row, fuse_count)
        return grad, None, None, None, None, None

    torch.library.register_autograd("vitos::compact_tokens", backward, setup_context=setup_context)


if _library.is_available():
    _register_fake_and_autograd()
