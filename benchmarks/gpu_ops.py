"""GPU benchmark of the core ops at the DESIGN.md anchor shapes: fused kernels vs the eager references.

    python3 benchmarks/gpu_ops.py          (needs a CUDA device and the CUDA build of vitos_ext)

Prints the device ceilings, then a markdown table with the median time (CUDA events after warm-up), the achieved
bandwidth (fewest bytes: inputs read once, outputs written once) and its share of the measured copy ceiling.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vitos_ext  # noqa: E402
from anchors import MASK_TOKENS, compaction_batch, compaction_bytes, mask_batch  # noqa: E402
from timing import (  # noqa: E402
    copy_ceiling_gbs,
    cuda_graph_median_ms,
    cuda_median_ms,
    markdown_table,
    matmul_ceiling_tflops,
)
from vitos_ext.reference import compact_tokens_reference, region_to_patch_mask_reference  # noqa: E402


def mask_rows():
    boxes, box_image, grid = mask_batch("cuda")
    expected = region_to_patch_mask_reference(boxes, box_image, grid, 2, 1)
    fused = lambda: vitos_ext.region_to_patch_mask(boxes, box_image, grid, 2, 1, num_tokens=MASK_TOKENS)  # noqa: E731
    synced = lambda: vitos_ext.region_to_patch_mask(boxes, box_image, grid, 2, 1)  # noqa: E731
    eager = lambda: region_to_patch_mask_reference(boxes, box_image, grid, 2, 1)  # noqa: E731
    assert torch.equal(fused(), expected) and torch.equal(synced(), expected)
    rows = []
    for name, fn in [("fused, num_tokens given (no sync)", fused), ("fused, size read back", synced),
                     ("eager per-image loop", eager)]:
        rows.append(["region_to_patch_mask 8 img / 10640 tok", name, f"{cuda_median_ms(fn) * 1e3:.1f} us", "-", "-"])
    # the span above includes the host's launch path (Python wrapper, dispatcher, C++ checks, launch); a graph
    # replay shows the device time alone
    rows.append(["region_to_patch_mask 8 img / 10640 tok", "fused, no sync, CUDA-graph replay (device time)",
                 f"{cuda_graph_median_ms(fused) * 1e3:.1f} us", "-", "-"])
    return rows


def compaction_rows(ceiling_gbs):
    rows = []
    for fuse in (False, True):
        hidden, keep, cu, positions, fuse_into = compaction_batch("cuda", fuse=fuse)
        args = (hidden, keep, cu, positions, fuse_into)
        num_bytes = compaction_bytes(hidden, keep, fuse_into)
        expected = compact_tokens_reference(*args)
        got = vitos_ext.compact_tokens(*args)
        assert torch.equal(got.hidden, expected.hidden) and torch.equal(got.position_ids, expected.position_ids)
        kept = expected.hidden.shape[0]
        variants = [
            ("fused (one size read-back)", lambda: vitos_ext.compact_tokens(*args)),
            ("fused, out_capacity (no sync)", lambda: vitos_ext.compact_tokens(*args, out_capacity=kept)),
            ("eager boolean indexing", lambda: compact_tokens_reference(*args)),
        ]
        label = f"compact_tokens 16410->12645 x3584 bf16{' + fusion' if fuse else ''}"
        floor_ms = num_bytes / ceiling_gbs / 1e6
        variants.append(("fused, out_capacity, CUDA-graph replay (device time)",
                         lambda: vitos_ext.compact_tokens(*args, out_capacity=kept)))
        for name, fn in variants:
            ms = cuda_graph_median_ms(fn) if "graph" in name else cuda_median_ms(fn)
            gbs = num_bytes / ms / 1e6
            rows.append([label, name, f"{ms:.3f} ms (floor {floor_ms:.3f})", f"{gbs:.0f} GB/s",
                         f"{100 * gbs / ceiling_gbs:.0f}%"])
    return rows


def main():
    if not torch.cuda.is_available() or not vitos_ext.has_cuda_kernels():
        sys.exit("needs a CUDA device and vitos_ext built with its CUDA kernels")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ceiling = copy_ceiling_gbs()
    print(f"copy ceiling: {ceiling:.0f} GB/s (read + write); bf16 matmul: {matmul_ceiling_tflops():.0f} TFLOP/s")
    rows = mask_rows() + compaction_rows(ceiling)
    print(markdown_table(["op / shape", "implementation", "median time", "bandwidth", "of copy ceiling"], rows))


if __name__ == "__main__":
    main()
