"""Plain-PyTorch references of every vitos_ext op.

These follow ../DESIGN.md's op semantics literally (per-image and per-row loops where that is clearer) and are the
ground truth the C++/CUDA/Triton kernels are tested against. They are also the "eager" baselines in the benchmarks.
"""

from __future__ import annotations

import math

import torch

from .ops.types import Compacted


def box_cells(box: torch.Tensor, rows: int, cols: int) -> tuple[int, int, int, int] | None:
    """Token-grid cells covered by one normalized box, or None when the box is invalid.

    box: float [4] = (x1, y1, x2, y2), any float dtype (rounded to float32 first). rows, cols: token grid H, W.
    Returns (r_lo, r_hi, c_lo, c_hi), inclusive.
    """
    box = box.to(torch.float32)
    if not bool(torch.isfinite(box).all()):
        return None
    x1, y1, x2, y2 = box.clamp(0.0, 1.0).tolist()
    if x2 < x1 or y2 < y1:
        return None

    def span(lo: float, hi: float, n: int) -> tuple[int, int]:
        # float32 products, as the kernels compute them
        first = min(max(math.floor(_f32(lo * n)), 0), n - 1)
        last = min(max(max(math.ceil(_f32(hi * n)) - 1, first), 0), n - 1)
        return first, last

    r_lo, r_hi = span(y1, y2, rows)
    c_lo, c_hi = span(x1, x2, cols)
    return r_lo, r_hi, c_lo, c_hi


def _f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def region_to_patch_mask_reference(
    boxes: torch.Tensor,
    box_image: torch.Tensor,
    grid_thw: torch.Tensor,
    merge_size: int = 2,
    dilate: int = 0,
) -> torch.Tensor:
    """Reference of vitos_ext.region_to_patch_mask: one image at a time, one box at a time.

    boxes: float [N, 4] normalized (x1, y1, x2, y2); box_image: int64 [N]; grid_thw: int64 [I, 3] in patches.
    Returns bool [sum_i t_i * (h_i / m) * (w_i / m)] on grid_thw's device, in the VLM's token order.
    """
    masks = []
    for image, (t, h, w) in enumerate(grid_thw.tolist()):
        rows, cols = h // merge_size, w // merge_size
        grid = torch.zeros(rows, cols, dtype=torch.bool)
        cells = [box_cells(b, rows, cols) for b in boxes[box_image == image].cpu()]
        cells = [c for c in cells if c is not None]
        if not cells:
            grid[:] = True  # an image with no valid box keeps every token
        for r_lo, r_hi, c_lo, c_hi in cells:
            grid[r_lo : r_hi + 1, c_lo : c_hi + 1] = True
        if cells and dilate > 0:
            pooled = torch.nn.functional.max_pool2d(
                grid[None, None].float(), kernel_size=2 * dilate + 1, stride=1, padding=dilate
            )
            grid = pooled[0, 0] > 0
        masks.append(grid.flatten().repeat(t))
    if not masks:
        return torch.zeros(0, dtype=torch.bool, device=grid_thw.device)
    return torch.cat(masks).to(grid_thw.device)


def compact_tokens_reference(
    hidden: torch.Tensor,
    keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_ids: torch.Tensor,
    fuse_into: torch.Tensor | None = None,
) -> Compacted:
    """Reference of vitos_ext.compact_tokens with eager boolean indexing (differentiable through autograd).

    hidden [T, D] any float dtype; keep bool [T]; cu_seqlens int32 [B + 1]; position_ids int64 [P, T];
    fuse_into int64 [T] or None. Returns Compacted (see vitos_ext.compact_tokens).
    """
    kept_index = keep.nonzero().flatten()
    out = hidden[kept_index]
    if fuse_into is not None:
        out = _fuse_reference(hidden, keep, fuse_into, kept_index)
    kept_before = torch.cat([keep.new_zeros(1, dtype=torch.int64), keep.long().cumsum(0)])
    new_cu = kept_before[cu_seqlens.long()].to(torch.int32)
    lengths = new_cu[1:] - new_cu[:-1]
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return Compacted(out, position_ids[:, kept_index], new_cu, kept_index, max_seqlen)


def _fuse_reference(hidden, keep, fuse_into, kept_index):
    """Mean of each kept row with the dropped rows fused into it, summed in float32 (float64 for float64 input) in
    increasing source order."""
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out_row_of = torch.full((hidden.shape[0],), -1, dtype=torch.int64, device=hidden.device)
    out_row_of[kept_index] = torch.arange(kept_index.numel(), device=hidden.device)
    sources = ((~keep) & (fuse_into >= 0)).nonzero().flatten()
    targets = out_row_of[fuse_into[sources]]
    acc = hidden[kept_index].to(acc_dtype)
    # index_add_ on CPU adds sources one at a time in increasing order: the summation order the kernels use.
    acc = acc.cpu().index_add(0, targets.cpu(), hidden[sources].to(acc_dtype).cpu()).to(hidden.device)
    count = torch.ones(kept_index.numel(), dtype=acc_dtype, device=hidden.device)
    count.index_add_(0, targets, torch.ones_like(targets, dtype=acc_dtype))
    return (acc / count[:, None]).to(hidden.dtype)
