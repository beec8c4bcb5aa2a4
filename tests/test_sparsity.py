"""vitos_ext.sparsity against plain per-sample references (boolean indexing, brute-force nearest search)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitos_ext import reference, sparsity

# ----------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------


def nearest_reference(keep: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """Brute force: for each dropped token scan every token of its frame in index order, keep the first closest."""
    out = torch.full((keep.numel(),), -1, dtype=torch.int64)
    offset = 0
    for t, h, w in grid_thw.tolist():
        rows, cols = h // merge, w // merge
        for frame in range(t):
            start = offset + frame * rows * cols
            for i in range(rows * cols):
                if keep[start + i]:
                    continue
                best, best_d = -1, math.inf
                for j in range(rows * cols):
                    if keep[start + j]:
                        d = (i // cols - j // cols) ** 2 + (i % cols - j % cols) ** 2
                        if d < best_d:
                            best, best_d = start + j, d
                out[start + i] = best
        offset += t * rows * cols
    return out


def prune_reference(embeds, mask, positions, visual_mask, visual_keep, visual_fuse=None):
    """Per-sample boolean indexing; fused rows averaged by hand. Returns per-sample (embeds, positions)."""
    batch, length, _ = embeds.shape
    visual_index = visual_mask.flatten().nonzero().flatten()
    token_keep = ~visual_mask.flatten()
    token_keep[visual_index] = visual_keep
    flat = embeds.reshape(batch * length, -1)
    fused = flat.clone()
    if visual_fuse is not None:
        sums = {}
        for v, target in enumerate(visual_fuse.tolist()):
            if target >= 0 and not visual_keep[v]:
                sums.setdefault(int(visual_index[target]), []).append(int(visual_index[v]))
        for target, sources in sums.items():
            fused[target] = (flat[target] + flat[sources].sum(0)) / (1 + len(sources))
    out = []
    valid = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask.bool()
    for b in range(batch):
        rows = torch.arange(b * length, (b + 1) * length)
        chosen = rows[token_keep[rows] & valid[b]]
        out.append((fused[chosen], positions[:, b, chosen - b * length]))
    return out


def random_batch(seed: int, batch: int = 3, length: int = 12, dim: int = 5, rows: int = 3, left: bool = True):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, length, dim, generator=g)
    lengths = torch.randint(3, length + 1, (batch,), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.long)
    visual = torch.zeros(batch, length, dtype=torch.bool)
    for b, n in enumerate(lengths.tolist()):
        span = slice(length - n, length) if left else slice(0, n)
        mask[b, span] = 1
        region = torch.arange(length)[span]
        visual[b, region[1:-1]] = torch.rand(n - 2, generator=g) < 0.6
    positions = torch.randint(0, 50, (rows, batch, length), generator=g)
    keep = torch.rand(int(visual.sum()), generator=g) < 0.5
    return embeds, mask, positions, visual, keep


# ----------------------------------------------------------------------------------------------------------
# boxes / keep / fuse validation
# ----------------------------------------------------------------------------------------------------------


def test_boxes_to_regions_flattens_in_image_order():
    boxes, owner = sparsity.boxes_to_regions(
        [torch.tensor([[0.1, 0.1, 0.2, 0.2]]), torch.zeros(0, 4), torch.rand(2, 4, dtype=torch.float64)], 3)
    assert boxes.shape == (3, 4) and boxes.dtype == torch.float32
    assert owner.tolist() == [0, 2, 2]


@pytest.mark.parametrize("boxes, count, error, words", [
    (torch.zeros(1, 4), 1, TypeError, "vitos_boxes must be a list"),
    ([torch.zeros(1, 4)], 2, ValueError, "1 entries but the batch has 2 image"),
    ([[0.1, 0.1, 0.2, 0.2]], 1, TypeError, "vitos_boxes[0] must be a torch.Tensor"),
    ([torch.zeros(1, 3)], 1, ValueError, "vitos_boxes[0] must have shape [n, 4]"),
    ([torch.zeros(1, 4, dtype=torch.long)], 1, ValueError, "vitos_boxes[0] must be a floating-point"),
    ([torch.zeros(1, 4, device="meta")], 1, ValueError, "vitos_boxes[0] is on meta"),
])
def test_boxes_to_regions_errors_name_the_argument(boxes, count, error, words):
    with pytest.raises(error) as info:
        sparsity.boxes_to_regions(boxes, count, "cpu")
    assert words in str(info.value)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), dilate=st.integers(0, 2))
def test_keep_mask_from_boxes_matches_reference(seed, dilate):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 8, 12], [2, 6, 4], [1, 4, 4]])
    boxes = [torch.rand(int(n), 4, generator=g) * 1.2 - 0.1 for n in torch.randint(0, 3, (3,), generator=g)]
    boxes = [torch.cat([b[:, :2].minimum(b[:, 2:]), b[:, :2].maximum(b[:, 2:])], 1) for b in boxes]
    got = sparsity.keep_mask_from_boxes(boxes, grid, 2, dilate, num_tokens=24 + 12 + 4)
    flat, owner = sparsity.boxes_to_regions(boxes, 3)
    assert torch.equal(got, reference.region_to_patch_mask_reference(flat, owner, grid, 2, dilate))


def test_visual_token_counts_and_image_segments():
    grid = torch.tensor([[1, 4, 4], [2, 4, 8], [1, 2, 2]])
    counts = sparsity.visual_token_counts(grid, 2)
    assert counts == [4, 16, 1]
    mask = torch.arange(21)
    assert sparsity.image_segments(mask, counts, [2, 0, 2]).tolist() == [20, 0, 1, 2, 3, 20]
    assert sparsity.image_segments(mask, counts, torch.tensor([1])).tolist() == list(range(4, 20))
    assert sparsity.image_segments(mask, counts, []).shape == (0,)


def test_keep_mask_rejects_negative_dilate():
    with pytest.raises(ValueError, match="vitos_dilate"):
        sparsity.keep_mask_from_boxes([torch.zeros(0, 4)], torch.tensor([[1, 4, 4]]), 2, -1)


def test_validate_keep_errors():
    with pytest.raises(TypeError, match="vitos_keep"):
        sparsity.validate_keep([True], 1, "cpu")
    with pytest.raises(TypeError, match="vitos_keep must have dtype torch.bool"):
        sparsity.validate_keep(torch.ones(3), 3, "cpu")
    with pytest.raises(ValueError, match=r"vitos_keep must have shape \[4\]"):
        sparsity.validate_keep(torch.ones(3, dtype=torch.bool), 4, "cpu")
    with pytest.raises(ValueError, match="vitos_keep is on meta"):
        sparsity.validate_keep(torch.ones(3, dtype=torch.bool, device="meta"), 3, "cpu")


def test_validate_fuse_errors():
    keep = torch.tensor([True, False, True])
    with pytest.raises(TypeError, match="vitos_fuse"):
        sparsity.resolve_fusion(torch.tensor([0, 0, 0], dtype=torch.int32), keep, torch.tensor([[1, 2, 6]]), 2)
    with pytest.raises(ValueError, match=r"vitos_fuse must have shape \[3\]"):
        sparsity.resolve_fusion(torch.tensor([0, 0]), keep, torch.tensor([[1, 2, 6]]), 2)
    with pytest.raises(ValueError, match="vitos_fuse values must be -1 or"):
        sparsity.resolve_fusion(torch.tensor([0, 3, 0]), keep, torch.tensor([[1, 2, 6]]), 2)
    with pytest.raises(TypeError, match="vitos_fuse must be a bool"):
        sparsity.resolve_fusion("nearest", keep, torch.tensor([[1, 2, 6]]), 2)
    assert sparsity.resolve_fusion(False, keep, torch.tensor([[1, 2, 6]]), 2) is None


# ----------------------------------------------------------------------------------------------------------
# nearest-kept fusion map
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_nearest_kept_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 10, 8], [3, 4, 6], [1, 2, 2]])
    keep = torch.rand(20 + 18 + 1, generator=g) < 0.3
    assert torch.equal(sparsity.nearest_kept_fusion_map(keep, grid, 2), nearest_reference(keep, grid, 2))


def test_nearest_kept_ties_go_to_lowest_index_and_empty_frames_discard():
    # 1 x 3 grid: kept at 0 and 2, token 1 is equidistant -> 0; second image keeps nothing -> -1
    keep = torch.tensor([True, False, True, False, False])
    grid = torch.tensor([[1, 1, 3], [1, 1, 2]])
    assert sparsity.nearest_kept_fusion_map(keep, grid, 1).tolist() == [-1, 0, -1, -1, -1]


def test_nearest_kept_frames_are_independent():
    # two frames of one 2 x 2 image: frame 0 keeps cell 3, frame 1 keeps cell 0
    keep = torch.tensor([False, False, False, True, True, False, False, False])
    out = sparsity.nearest_kept_fusion_map(keep, torch.tensor([[2, 4, 4]]), 2)
    assert out.tolist() == [3, 3, 3, -1, -1, 4, 4, 4]


def test_nearest_kept_rejects_size_mismatch():
    with pytest.raises(ValueError, match="grid_thw describes"):
        sparsity.nearest_kept_fusion_map(torch.ones(5, dtype=torch.bool), torch.tensor([[1, 4, 4]]), 2)


# ----------------------------------------------------------------------------------------------------------
# padded / packed pruning
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prune_padded_batch_matches_reference(left, rows, fuse, seed):
    embeds, mask, positions, visual, keep = random_batch(seed, rows=rows, left=left)
    visual_fuse = None
    if fuse:  # fuse every dropped visual token into some kept visual token of the same sample
        owner = visual.nonzero()[:, 0]
        visual_fuse = torch.full_like(owner, -1)
        for v in (~keep).nonzero().flatten().tolist():
            candidates = (keep & (owner == owner[v])).nonzero().flatten()
            if len(candidates):
                visual_fuse[v] = candidates[v % len(candidates)]
    pruned = sparsity.prune_padded_batch(embeds, mask, positions, visual, keep, visual_fuse)
    expected = prune_reference(embeds, mask, positions, visual, keep, visual_fuse)
    new_length = max(e.shape[0] for e, _ in expected)
    assert pruned.inputs_embeds.shape == (embeds.shape[0], new_length, embeds.shape[2])
    for b, (rows_expected, pos_expected) in enumerate(expected):
        n = rows_expected.shape[0]
        assert pruned.kept_counts[b] == n
        assert pruned.attention_mask[b].tolist() == [0] * (new_length - n) + [1] * n
        torch.testing.assert_close(pruned.inputs_embeds[b, new_length - n:], rows_expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(pruned.inputs_embeds[b, :new_length - n], torch.zeros(new_length - n, embeds.shape[2]))
        assert torch.equal(pruned.position_ids[:, b, new_length - n:], pos_expected)
        valid = mask[b].bool()
        assert pruned.next_position[b] == positions[:, b, valid].max() + 1
        assert pruned.rope_deltas[b, 0] == positions[:, b, valid].max() + 1 - n
    assert pruned.visual_counts.tolist() == visual.sum(-1).tolist()
    total_kept = int(keep.sum())
    assert pruned.visual_kept_counts.sum() == total_kept
    assert pruned.kept_ratio == pytest.approx(total_kept / keep.numel())


def test_prune_padded_batch_without_mask_and_2d_positions():
    embeds, _, positions, visual, keep = random_batch(3, rows=1)
    pruned = sparsity.prune_padded_batch(embeds, None, positions[0], visual, keep)
    assert pruned.position_ids.dim() == 2
    expected = prune_reference(embeds, None, positions, visual, keep)
    for b, (rows_expected, pos_expected) in enumerate(expected):
        n = rows_expected.shape[0]
        assert torch.equal(pruned.position_ids[b, -n:], pos_expected[0])
    assert pruned.attention_mask.dtype == torch.int64


def test_text_position_row_is_rebuilt_and_excluded_from_max():
    embeds, mask, positions, visual, keep = random_batch(4, rows=4)
    positions[0] = 1000  # a text row must not count as a rotary position
    pruned = sparsity.prune_padded_batch(embeds, mask, positions, visual, keep, text_position_row=True)
    for b in range(embeds.shape[0]):
        n = int(pruned.kept_counts[b])
        length = pruned.attention_mask.shape[1]
        assert pruned.position_ids[0, b, length - n:].tolist() == list(range(n))
        valid = mask[b].bool()
        assert pruned.next_position[b] == positions[1:, b, valid].max() + 1


def test_prune_padded_batch_gradient_matches_indexing():
    embeds, mask, positions, visual, keep = random_batch(5)
    a = embeds.clone().requires_grad_(True)
    b = embeds.clone().requires_grad_(True)
    pruned = sparsity.prune_padded_batch(a, mask, positions, visual, keep)
    weights = torch.randn_like(pruned.inputs_embeds)
    (pruned.inputs_embeds * weights).sum().backward()
    total = 0
    length = pruned.attention_mask.shape[1]
    for i, (rows, _) in enumerate(prune_reference(b, mask, positions, visual, keep)):
        total = total + (rows * weights[i, length - rows.shape[0]:]).sum()
    total.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_prune_padded_batch_validates_visual_count():
    embeds, mask, positions, visual, keep = random_batch(6)
    with pytest.raises(ValueError, match="visual_keep has"):
        sparsity.prune_padded_batch(embeds, mask, positions, visual, torch.cat([keep, keep[:1]]))
    with pytest.raises(ValueError, match="position_ids must be"):
        sparsity.prune_padded_batch(embeds, mask, positions[:, :1], visual, keep)


def test_compact_token_values_and_visual_features():
    embeds, mask, positions, visual, keep = random_batch(7)
    visual_fuse = torch.where(keep, torch.full_like(keep, -1, dtype=torch.int64), torch.full_like(
        keep, -1, dtype=torch.int64))
    owner = visual.nonzero()[:, 0]
    for v in (~keep).nonzero().flatten().tolist():  # fuse each dropped token into the first kept one of its row
        candidates = (keep & (owner == owner[v])).nonzero().flatten()
        if len(candidates):
            visual_fuse[v] = candidates[0]
    pruned = sparsity.prune_padded_batch(embeds, mask, positions, visual, keep, visual_fuse)
    labels = torch.arange(embeds.shape[0] * embeds.shape[1]).view(embeds.shape[:2])
    compact_labels = sparsity.compact_token_values(labels, pruned, -100)
    source = pruned.source_index
    assert torch.equal(compact_labels, torch.where(source >= 0, source, torch.full_like(source, -100)))
    # features on visual tokens only: same rows as pruning the visual positions of a batch of those features
    features = torch.randn(int(visual.sum()), 4)
    scattered = torch.zeros(*visual.shape, 4)
    scattered[visual] = features
    full = sparsity.prune_padded_batch(scattered, mask, positions, visual, keep, visual_fuse)
    kept_visual_mask = sparsity.compact_token_values(visual, pruned, False)
    torch.testing.assert_close(sparsity.compact_visual_features(features, visual, pruned),
                               full.inputs_embeds[kept_visual_mask])


@pytest.mark.parametrize("fuse", [False, True])
def test_prune_packed_matches_reference(fuse):
    embeds, mask, positions, visual, keep = random_batch(8, rows=3)
    valid = mask.bool()
    hidden = embeds[valid]
    packed_positions = positions[:, valid]
    packed_visual = visual[valid]
    cu = torch.nn.functional.pad(valid.sum(-1).cumsum(0), (1, 0)).to(torch.int32)
    visual_fuse = None
    grid_free_fuse = None
    if fuse:
        owner = visual.nonzero()[:, 0]
        grid_free_fuse = torch.full((keep.numel(),), -1, dtype=torch.int64)
        for v in (~keep).nonzero().flatten().tolist():
            candidates = (keep & (owner == owner[v])).nonzero().flatten()
            if len(candidates):
                grid_free_fuse[v] = candidates[-1]
        visual_fuse = grid_free_fuse
    out = sparsity.prune_packed(hidden, cu, packed_positions, packed_visual, keep, visual_fuse)
    expected = prune_reference(embeds, mask, positions, visual, keep, grid_free_fuse)
    assert out.cu_seqlens.tolist() == [0] + torch.tensor([e.shape[0] for e, _ in expected]).cumsum(0).tolist()
    torch.testing.assert_close(out.hidden, torch.cat([e for e, _ in expected]), rtol=1e-6, atol=1e-6)
    assert torch.equal(out.position_ids, torch.cat([p for _, p in expected], dim=1))
    assert out.max_seqlen == max(e.shape[0] for e, _ in expected)


def test_prune_packed_rejects_bad_masks():
    hidden = torch.randn(4, 2)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="visual_mask must be bool"):
        sparsity.prune_packed(hidden, cu, torch.zeros(1, 4, dtype=torch.long), torch.ones(3, dtype=torch.bool),
                              torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="visual_keep must be a 1-D bool"):
        sparsity.prune_packed(hidden, cu, torch.zeros(1, 4, dtype=torch.long), torch.ones(4, dtype=torch.bool),
                              torch.ones(4))
