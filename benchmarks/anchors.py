"""The DESIGN.md anchor workloads, shared by the CPU microbenchmarks and the GPU benchmark scripts."""

from __future__ import annotations

import torch

# 8 images, 10640 visual tokens after 2x2 merging: token grids (H, W) of a realistic mix of aspect ratios.
MASK_TOKEN_GRIDS = [(36, 36), (35, 38), (30, 44), (34, 40), (32, 42), (38, 35), (40, 34), (26, 50)]
MASK_TOKENS = sum(h * w for h, w in MASK_TOKEN_GRIDS)  # 10640

# Compaction: 8 packed prompts of text + visual tokens, 16410 rows -> 12645 kept rows of hidden size 3584.
COMPACT_ROWS, COMPACT_KEPT, HIDDEN = 16410, 12645, 3584


def mask_batch(device="cpu", boxes_per_image=3, seed=0):
    """(boxes float32 [N,4], box_image int64 [N], grid_thw int64 [8,3]) for the 8-image anchor."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 2 * h, 2 * w] for h, w in MASK_TOKEN_GRIDS])
    count = len(MASK_TOKEN_GRIDS) * boxes_per_image
    corner = torch.rand(count, 2, generator=g) * 0.7
    size = 0.1 + torch.rand(count, 2, generator=g) * 0.25
    boxes = torch.cat([corner, (corner + size).clamp(max=1.0)], dim=1)
    box_image = torch.arange(count) % len(MASK_TOKEN_GRIDS)
    return boxes.to(device), box_image.to(device), grid.to(device)


def compaction_batch(device="cpu", dtype=torch.bfloat16, fuse=False, seed=0):
    """(hidden [16410, 3584], keep, cu_seqlens, position_ids [3, T], fuse_into or None): 12645 rows kept.

    Text rows are always kept; a random subset of the visual rows makes up the rest. With fuse=True every dropped
    row is fused into the nearest preceding kept row of its sequence.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = [COMPACT_ROWS // 8 + (1 if i < COMPACT_ROWS % 8 else 0) for i in range(8)]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    visual = torch.zeros(COMPACT_ROWS, dtype=torch.bool)
    for b in range(8):  # visual tokens are the middle 65% of each prompt
        start, length = int(cu[b]), lengths[b]
        visual[start + length // 5 : start + length // 5 + int(length * 0.65)] = True
    keep = ~visual
    shuffled_visual = visual.nonzero().flatten()[torch.randperm(int(visual.sum()), generator=g)]
    keep[shuffled_visual[: COMPACT_KEPT - int(keep.sum())]] = True
    hidden = torch.randn(COMPACT_ROWS, HIDDEN, generator=g, dtype=torch.float32).to(dtype)
    positions = torch.arange(COMPACT_ROWS).repeat(3, 1)
    fuse_into = None
    if fuse:
        last_kept = torch.where(keep, torch.arange(COMPACT_ROWS), -1).cummax(0).values
        starts = torch.repeat_interleave(cu[:-1].long(), torch.tensor(lengths))
        fuse_into = torch.where(last_kept >= starts, last_kept, -1)
    moved = [hidden, keep, cu, positions, fuse_into]
    return tuple(t if t is None else t.to(device) for t in moved)


def compaction_bytes(hidden, keep, fuse_into=None) -> int:
    """Fewest bytes a compaction must move: kept rows (and fused sources) read once, kept rows written once."""
    row = hidden.shape[1] * hidden.element_size()
    kept = int(keep.sum())
    sources = int(((~keep) & (fuse_into >= 0)).sum()) if fuse_into is not None else 0
    return (2 * kept + sources) * row
