"""pytest-benchmark: the fused C++ ops against the eager references at the DESIGN.md anchor sizes (CPU).

    pytest benchmarks/test_bench_ops.py --benchmark-columns=median,iqr,ops --benchmark-group-by=group
"""

import pytest
import torch

import vitos_ext
from anchors import compaction_batch, mask_batch
from vitos_ext.reference import compact_tokens_reference, region_to_patch_mask_reference

ROUNDS = dict(rounds=7, warmup_rounds=1, iterations=1)


@pytest.mark.benchmark(group="region_to_patch_mask: 8 images, 10640 tokens")
@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_region_to_patch_mask(benchmark, impl):
    boxes, box_image, grid = mask_batch()
    fn = vitos_ext.region_to_patch_mask if impl == "fused" else region_to_patch_mask_reference
    mask = benchmark.pedantic(fn, args=(boxes, box_image, grid, 2, 1), **ROUNDS)
    assert torch.equal(mask, region_to_patch_mask_reference(boxes, box_image, grid, 2, 1))


@pytest.mark.benchmark(group="compact_tokens: 16410 -> 12645 rows of 3584 bf16")
@pytest.mark.parametrize("fuse", [False, True], ids=["drop", "fuse"])
@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_compact_tokens(benchmark, impl, fuse):
    inputs = compaction_batch(fuse=fuse)
    fn = vitos_ext.compact_tokens if impl == "fused" else compact_tokens_reference
    out = benchmark.pedantic(fn, args=inputs, **ROUNDS)
    assert out.hidden.shape == (12645, 3584)
