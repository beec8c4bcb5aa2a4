"""Model-agnostic token sparsity: evidence boxes -> visual-token keep mask -> compacted (pruned) batch.

Everything here works on plain tensors and knows nothing about transformers. The model patches
(vitos_ext/models/*, vitos_ext/patching.py) and the trainer build on these functions:

    keep = keep_mask_from_boxes(vitos_boxes, grid_thw, merge_size=2, num_tokens=n_visual)
    fuse = resolve_fusion(True, keep, grid_thw, merge_size=2)            # optional token fusion
    pruned = prune_padded_batch(inputs_embeds, attention_mask, position_ids, visual_mask, keep, fuse)
    packed = prune_packed(hidden, cu_seqlens, position_ids, visual_mask, keep, fuse)   # varlen layout

Conventions
    * Visual tokens are numbered in the order a VLM scatters image features into its embeddings: row-major over
      the flattened [B, L] batch (equivalently, increasing packed index). This is also image_grid_thw order.
    * Text tokens (everything that is not a visual token) are always kept.
    * Positions are gathered, never renumbered: a kept token keeps its original (M-)RoPE position.

Host syncs: region_to_patch_mask / compact_tokens are given every size they need, except that compact_tokens
reads back the compacted row count and the longest sequence once (it has to: they size the output). Functions that
validate tensors against each other document the one extra read-back they do; the model hooks turn it off
(``validate=False``) because transformers already checked that image tokens and image features agree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .ops import Compacted, compact_tokens, region_to_patch_mask

__all__ = [
    "PrunedBatch",
    "boxes_to_regions",
    "compact_token_values",
    "compact_visual_features",
    "image_segments",
    "keep_mask_from_boxes",
    "nearest_kept_fusion_map",
    "prune_packed",
    "prune_padded_batch",
    "resolve_fusion",
    "validate_fuse",
    "validate_keep",
    "visual_token_counts",
]

# Bound on the elements of one distance block in nearest_kept_fusion_map (int32 -> 64 MiB).
_FUSION_BLOCK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------------------------
# boxes -> keep mask
# ----------------------------------------------------------------------------------------------------------


def visual_token_counts(grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    """Visual tokens per image: t * (h / m) * (w / m) for each row of grid_thw int64 [I, 3] (a host read)."""
    return [int(t * (h // merge_size) * (w // merge_size)) for t, h, w in grid_thw.tolist()]


def image_segments(mask: torch.Tensor, counts: list[int], images: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """The per-image segments ``images`` (in that order, repeats allowed) of a mask over all visual tokens.

    Args:
        mask: [N] over the visual tokens of all images, image after image (any dtype).
        counts: visual tokens per image (:func:`visual_token_counts`), summing to N.
        images: image indices.

    Returns:
        [sum of counts[i] for i in images], same dtype and device as ``mask``.
    """
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    index = images.tolist() if isinstance(images, torch.Tensor) else list(images)
    parts = [mask[starts[i]:starts[i + 1]] for i in index]
    return torch.cat(parts) if parts else mask[:0]


def boxes_to_regions(
    vitos_boxes: Sequence[torch.Tensor], num_images: int, device: torch.device | str | None = None, *,
    argument: str = "vitos_boxes", kind: str = "image",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-image evidence boxes into the (boxes, box_image) pair region_to_patch_mask takes.

    Args:
        vitos_boxes: list/tuple with one floating tensor [n_i, 4] per image (x1, y1, x2, y2 normalized to [0, 1]),
            in image order (image_grid_thw order). n_i may be 0 (that image keeps all its tokens).
        num_images: number of images in the batch; len(vitos_boxes) must equal it.
        device: where the boxes must live (the model's / input_ids' device); None skips the device check.
        argument, kind: the argument name and the visual unit ("image" or "video") the error messages use.

    Returns:
        boxes float32 [N, 4] and box_image int64 [N] (image index of each box), on `device`. No host sync: the box
        counts come from tensor shapes.

    Raises:
        TypeError / ValueError naming ``vitos_boxes`` (or ``vitos_boxes[i]``) for a non-list, non-tensor entries,
        wrong shapes or dtypes, a count that does not match the images, or a tensor on the wrong device.
    """
    if isinstance(vitos_boxes, torch.Tensor) or not isinstance(vitos_boxes, (list, tuple)):
        raise TypeError(
            f"{argument} must be a list with one float tensor [n_i, 4] per {kind}, got {type(vitos_boxes).__name__}"
        )
    if len(vitos_boxes) != num_images:
        raise ValueError(
            f"{argument} has {len(vitos_boxes)} entries but the batch has {num_images} {kind}(s): pass one tensor "
            f"[n_i, 4] per {kind}, in {kind}_grid_thw order (an empty [0, 4] tensor keeps all tokens of that {kind})"
        )
    device = None if device is None else torch.device(device)
    for i, boxes in enumerate(vitos_boxes):
        if not isinstance(boxes, torch.Tensor):
            raise TypeError(f"{argument}[{i}] must be a torch.Tensor [n, 4], got {type(boxes).__name__}")
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{argument}[{i}] must have shape [n, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")
        if not boxes.is_floating_point():
            raise ValueError(f"{argument}[{i}] must be a floating-point tensor of normalized coordinates, "
                             f"got {boxes.dtype}")
        if device is not None and boxes.device != device:
            raise ValueError(f"{argument}[{i}] is on {boxes.device} but the inputs are on {device}: move the boxes "
                             "to the model's device")
    if device is None:
        device = vitos_boxes[0].device if len(vitos_boxes) else torch.device("cpu")
    if not vitos_boxes:
        return torch.zeros(0, 4, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    boxes = torch.cat([b.to(torch.float32) for b in vitos_boxes])
    counts = torch.tensor([b.shape[0] for b in vitos_boxes], dtype=torch.int64)
    box_image = torch.repeat_interleave(torch.arange(len(vitos_boxes)), counts).to(device)
    return boxes, box_image


def keep_mask_from_boxes(
    vitos_boxes: Sequence[torch.Tensor],
    grid_thw: torch.Tensor,
    merge_size: int = 2,
    dilate: int = 0,
    *,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """Visual-token keep mask from per-image evidence boxes (region_to_patch_mask over the whole batch).

    Args:
        vitos_boxes: one floating tensor [n_i, 4] per image (see boxes_to_regions), on grid_thw's device.
        grid_thw: int64 [I, 3], (t, h, w) in patches per image (Qwen2-VL's image_grid_thw; LLaVA: (1, side, side)).
        merge_size: patches merged per token along each axis.
        dilate: grow the kept cells by this many token cells in every direction (>= 0).
        num_tokens: number of visual tokens (e.g. the image-embedding row count). Pass it: on CUDA it avoids a
            device->host copy.

    Returns:
        bool [num_tokens] on grid_thw's device; an image without a valid box keeps all its tokens.
    """
    if not isinstance(dilate, int) or isinstance(dilate, bool) or dilate < 0:
        raise ValueError(f"vitos_dilate must be an int >= 0, got {dilate!r}")
    boxes, box_image = boxes_to_regions(vitos_boxes, grid_thw.shape[0], grid_thw.device)
    return region_to_patch_mask(boxes, box_image, grid_thw, merge_size, dilate, num_tokens=num_tokens)


def validate_keep(vitos_keep: torch.Tensor, num_visual_tokens: int, device: torch.device | str) -> torch.Tensor:
    """Check a user-supplied visual-token keep mask.

    Args:
        vitos_keep: bool [num_visual_tokens], True = keep, over all visual tokens of the batch in order.
        num_visual_tokens: the batch's visual-token count.
        device: the inputs' device.

    Returns:
        vitos_keep (unchanged, contiguous).

    Raises:
        TypeError / ValueError naming ``vitos_keep``.
    """
    if not isinstance(vitos_keep, torch.Tensor):
        raise TypeError(f"vitos_keep must be a bool torch.Tensor over all visual tokens, "
                        f"got {type(vitos_keep).__name__}")
    if vitos_keep.dtype != torch.bool:
        raise TypeError(f"vitos_keep must have dtype torch.bool, got {vitos_keep.dtype}")
    if vitos_keep.dim() != 1 or vitos_keep.numel() != num_visual_tokens:
        raise ValueError(f"vitos_keep must have shape [{num_visual_tokens}] (one entry per visual token of the "
                         f"batch), got {tuple(vitos_keep.shape)}")
    if vitos_keep.device != torch.device(device):
        raise ValueError(f"vitos_keep is on {vitos_keep.device} but the inputs are on {device}")
    return vitos_keep.contiguous()


# ----------------------------------------------------------------------------------------------------------
# token fusion
# ----------------------------------------------------------------------------------------------------------


def nearest_kept_fusion_map(keep: torch.Tensor, grid_thw: torch.Tensor, merge_size: int = 2) -> torch.Tensor:
    """For every dropped visual token, the nearest kept visual token of the same image frame.

    Distance is Euclidean on the (row, col) token grid of the frame; ties go to the lowest index. A frame with no
    kept token discards its tokens (-1).

    Args:
        keep: bool [N] over the visual tokens, in token order (image 0 frame 0 row-major, frame 1, ..., image 1, ...).
        grid_thw: int64 [I, 3] (t, h, w) in patches; h, w divisible by merge_size.
        merge_size: patches merged per token along each axis.

    Returns:
        int64 [N] on keep's device: -1 at kept tokens (and where nothing is kept), else the visual index of the
        fusion target. One host copy of grid_thw (the per-image sizes) is made.
    """
    if keep.dtype != torch.bool or keep.dim() != 1:
        raise ValueError(f"keep must be a 1-D bool tensor, got {keep.dtype} {tuple(keep.shape)}")
    target = torch.full_like(keep, -1, dtype=torch.int64)
    offset = 0
    for t, h, w in grid_thw.tolist():
        rows, cols = h // merge_size, w // merge_size
        count = t * rows * cols
        if offset + count > keep.numel():
            raise ValueError(f"grid_thw describes more visual tokens than keep has ({keep.numel()})")
        frames = keep[offset:offset + count].view(t, rows * cols)
        nearest, has_kept = _nearest_in_frames(frames, rows, cols)
        fused = has_kept & ~frames
        target[offset:offset + count] = torch.where(fused, nearest + offset, torch.full_like(nearest, -1)).flatten()
        offset += count
    if offset != keep.numel():
        raise ValueError(f"grid_thw describes {offset} visual tokens but keep has {keep.numel()}")
    return target


def _nearest_in_frames(frames: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """frames bool [t, S] (S = rows*cols) -> (int64 [t, S] index of the nearest kept cell counted from the first
    frame's start, bool [t, 1] whether the frame keeps anything)."""
    t, size = frames.shape
    device = frames.device
    cell = torch.arange(size, device=device)
    r, c = cell // cols, cell % cols
    nearest = torch.empty(t, size, dtype=torch.int64, device=device)
    block = max(1, _FUSION_BLOCK_ELEMENTS // max(1, t * size))  # query cells per block
    # squared distances are exact in int32 for any realistic grid; non-kept candidates get a larger distance
    far = torch.iinfo(torch.int32).max
    for start in range(0, size, block):
        q = slice(start, min(size, start + block))
        dist = ((r[q, None] - r[None, :]) ** 2 + (c[q, None] - c[None, :]) ** 2).to(torch.int32)
        dist = dist.unsqueeze(0).expand(t, -1, -1).masked_fill(~frames[:, None, :], far)
        nearest[:, q] = dist.argmin(dim=-1)  # first minimum -> lowest index on ties
    frame_start = (torch.arange(t, device=device) * size)[:, None]
    return nearest + frame_start, frames.any(dim=1, keepdim=True)


def validate_fuse(vitos_fuse: torch.Tensor, num_visual_tokens: int, device: torch.device | str) -> torch.Tensor:
    """Check a user-supplied fusion map over visual tokens (-1 = discard, k = fuse into visual token k).

    One device->host read-back checks the value range (targets that are not kept are reported by compact_tokens).

    Raises:
        TypeError / ValueError naming ``vitos_fuse``.
    """
    if vitos_fuse.dtype != torch.int64:
        raise TypeError(f"vitos_fuse must be a bool flag or an int64 tensor over the visual tokens, "
                        f"got dtype {vitos_fuse.dtype}")
    if vitos_fuse.dim() != 1 or vitos_fuse.numel() != num_visual_tokens:
        raise ValueError(f"vitos_fuse must have shape [{num_visual_tokens}] (one entry per visual token), "
                         f"got {tuple(vitos_fuse.shape)}")
    if vitos_fuse.device != torch.device(device):
        raise ValueError(f"vitos_fuse is on {vitos_fuse.device} but the inputs are on {device}")
    if vitos_fuse.numel() and bool(((vitos_fuse < -1) | (vitos_fuse >= num_visual_tokens)).any()):
        raise ValueError(f"vitos_fuse values must be -1 or a visual-token index in [0, {num_visual_tokens})")
    return vitos_fuse.contiguous()


def resolve_fusion(
    vitos_fuse: bool | torch.Tensor | None, keep: torch.Tensor, grid_thw: torch.Tensor, merge_size: int = 2
) -> torch.Tensor | None:
    """Turn the user's ``vitos_fuse`` into a fusion map over visual tokens, or None for plain dropping.

    Args:
        vitos_fuse: None/False (drop), True (fuse each dropped token into its nearest kept token of the same
            image frame, see nearest_kept_fusion_map), or an int64 tensor [N] (-1 = discard, k = target index).
        keep: bool [N] visual keep mask.
        grid_thw: int64 [I, 3], merge_size: the visual token grid (used when vitos_fuse is True).

    Returns:
        int64 [N] or None.
    """
    if vitos_fuse is None or vitos_fuse is False:
        return None
    if vitos_fuse is True:
        return nearest_kept_fusion_map(keep, grid_thw, merge_size)
    if isinstance(vitos_fuse, torch.Tensor):
        return validate_fuse(vitos_fuse, keep.numel(), keep.device)
    raise TypeError(f"vitos_fuse must be a bool or an int64 tensor over the visual tokens, "
                    f"got {type(vitos_fuse).__name__}")


# ----------------------------------------------------------------------------------------------------------
# visual-token maps in token space
# ----------------------------------------------------------------------------------------------------------


def _visual_token_index(visual_mask: torch.Tensor, num_visual: int) -> torch.Tensor:
    """bool [T] -> int64 [num_visual]: token index of each visual token, without a host sync."""
    rank = visual_mask.long().cumsum(0) - 1
    slot = torch.where(visual_mask, rank, torch.full_like(rank, num_visual))  # non-visual -> a scratch slot
    index = torch.full((num_visual + 1,), -1, dtype=torch.int64, device=visual_mask.device)
    index.scatter_(0, slot, torch.arange(visual_mask.numel(), device=visual_mask.device))
    return index[:num_visual]


def _token_maps(
    visual_mask: torch.Tensor, visual_keep: torch.Tensor, visual_fuse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lift visual-token keep / fusion maps to token space: (keep bool [T], fuse_into int64 [T] or None)."""
    visual_index = _visual_token_index(visual_mask, visual_keep.numel())
    keep = ~visual_mask
    keep = keep.index_put((visual_index,), visual_keep)
    if visual_fuse is None:
        return keep, None
    target = visual_index[visual_fuse.clamp_min(0)]
    fuse_visual = torch.where(visual_fuse >= 0, target, torch.full_like(target, -1))
    fuse = torch.full(visual_mask.shape, -1, dtype=torch.int64, device=visual_mask.device)
    return keep, fuse.index_put((visual_index,), fuse_visual)


def _check_visual_count(visual_mask: torch.Tensor, visual_keep: torch.Tensor) -> None:
    count = int(visual_mask.sum())  # one read-back
    if count != visual_keep.numel():
        raise ValueError(f"visual_keep has {visual_keep.numel()} entries but visual_mask marks {count} visual tokens")


def _check_maps(visual_keep: torch.Tensor, visual_fuse: torch.Tensor | None) -> None:
    if visual_keep.dtype != torch.bool or visual_keep.dim() != 1:
        raise ValueError(f"visual_keep must be a 1-D bool tensor, got {visual_keep.dtype} {tuple(visual_keep.shape)}")
    if visual_fuse is not None and (visual_fuse.dtype != torch.int64 or visual_fuse.shape != visual_keep.shape):
        raise ValueError(f"visual_fuse must be int64 with the shape of visual_keep {tuple(visual_keep.shape)}, got "
                         f"{visual_fuse.dtype} {tuple(visual_fuse.shape)}")


# ----------------------------------------------------------------------------------------------------------
# packed (varlen) pruning
# ----------------------------------------------------------------------------------------------------------


def prune_packed(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_ids: torch.Tensor,
    visual_mask: torch.Tensor,
    visual_keep: torch.Tensor,
    visual_fuse: torch.Tensor | None = None,
    *,
    validate: bool = True,
) -> Compacted:
    """Drop (or fuse) visual tokens of packed sequences; the output feeds varlen attention directly.

    Args:
        hidden: [T, D] float, packed sequences (no padding). Differentiable.
        cu_seqlens: int32 [B + 1] sequence offsets.
        position_ids: int64 [P, T] (P = 3 for M-RoPE, 1 for 1-D); gathered, never renumbered.
        visual_mask: bool [T], True at visual (image) tokens.
        visual_keep: bool [N] over the visual tokens in packed order, N = visual_mask.sum().
        visual_fuse: optional int64 [N]: for dropped visual token j, -1 (discard) or the visual index of a kept
            token of the same sequence to average it into.
        validate: check visual_mask.sum() == N (one device->host read-back).

    Returns:
        Compacted(hidden [T', D], position_ids [P, T'], cu_seqlens int32 [B + 1], kept_index int64 [T'],
        max_seqlen int). compact_tokens reads T' and max_seqlen back once.
    """
    _check_maps(visual_keep, visual_fuse)
    if visual_mask.shape != (hidden.shape[0],) or visual_mask.dtype != torch.bool:
        raise ValueError(f"visual_mask must be bool [{hidden.shape[0]}], got {visual_mask.dtype} "
                         f"{tuple(visual_mask.shape)}")
    if validate:
        _check_visual_count(visual_mask, visual_keep)
    keep, fuse = _token_maps(visual_mask, visual_keep, visual_fuse)
    return compact_tokens(hidden, keep, cu_seqlens, position_ids, fuse)


# ----------------------------------------------------------------------------------------------------------
# left-padded batch pruning (generate / HF forward)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PrunedBatch:
    """A compacted, LEFT-padded batch and what callers need to continue from it.

    Attributes:
        inputs_embeds: [B, L', D], kept tokens right-aligned (left padding, zero rows), L' = max kept count. None in
            the copy a patched model keeps as ``model.vitos_last_prefill`` (see without_embeddings).
        attention_mask: [B, L'] (dtype of the input mask, int64 when none was given), 1 at kept tokens.
        position_ids: int64 [P, B, L'], the kept tokens' original positions (0 at padding). When the input carried a
            text-position row (Qwen's [4, B, L] layout in generate), row 0 is rebuilt as the compacted token index.
        kept_counts: int64 [B], tokens per sample after pruning.
        visual_counts, visual_kept_counts: int64 [B], visual tokens per sample before / after pruning.
        next_position: int64 [B], max original (rotary) position + 1: where decoding continues.
        rope_deltas: int64 [B, 1], next_position - kept_counts (Qwen's rope_deltas for the compacted cache).
        source_index: int64 [B, L'], flat index into the original [B * L] batch of each row (-1 at padding).
        token_keep: bool [B * L], token_fuse: int64 [B * L] or None: the token-space maps that were applied (to
            compact other per-token data the same way, see compact_visual_features).
        packed_rows: int64 [T'], T' = kept_counts.sum(): flat index into the [B * L'] layout of every kept token, in
            sample order (the packed layout: inputs_embeds.view(B * L', D)[packed_rows] has no padding row).
    """

    inputs_embeds: torch.Tensor | None
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    kept_counts: torch.Tensor
    visual_counts: torch.Tensor
    visual_kept_counts: torch.Tensor
    next_position: torch.Tensor
    rope_deltas: torch.Tensor
    source_index: torch.Tensor
    token_keep: torch.Tensor
    token_fuse: torch.Tensor | None
    packed_rows: torch.Tensor | None = None

    def without_embeddings(self) -> "PrunedBatch":
        """A copy without inputs_embeds (and so without the autograd graph behind them), cheap to keep around."""
        return replace(self, inputs_embeds=None)

    @property
    def kept_ratio(self) -> float:
        """Kept visual tokens / visual tokens over the batch (1.0 without visual tokens). Reads back once."""
        total = int(self.visual_counts.sum())
        return 1.0 if total == 0 else int(self.visual_kept_counts.sum()) / total

    @property
    def per_sample_kept_ratio(self) -> torch.Tensor:
        """float32 [B]: kept visual tokens / visual tokens of each sample (1.0 for samples without images)."""
        counts = self.visual_counts.clamp_min(1).float()
        return torch.where(self.visual_counts > 0, self.visual_kept_counts.float() / counts, torch.ones_like(counts))


def prune_padded_batch(
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    visual_mask: torch.Tensor,
    visual_keep: torch.Tensor,
    visual_fuse: torch.Tensor | None = None,
    *,
    text_position_row: bool = False,
    validate: bool = True,
) -> PrunedBatch:
    """Prune the visual tokens of a (left- or right-) padded batch at prefill and re-pad it on the left.

    The valid rows of all samples are compacted in one compact_tokens call over the flattened batch (padding rows
    are simply "not kept"), then scattered into a left-padded [B, L', D] tensor.

    Args:
        inputs_embeds: [B, L, D] float, embeddings with image features already placed. Differentiable.
        attention_mask: [B, L] (1 = token, 0 = padding) or None (no padding).
        position_ids: int64 [P, B, L] (or [B, L] for 1-D positions): the positions the model would use.
        visual_mask: bool [B, L], True at visual tokens (never at padding).
        visual_keep: bool [N], N = visual_mask.sum(), over the visual tokens in row-major [B, L] order.
        visual_fuse: optional int64 [N] fusion map over visual tokens (see resolve_fusion).
        text_position_row: position_ids[0] is a text-position row (Qwen's [4, B, L] generate layout); it is rebuilt
            as the compacted token index and excluded from the max-position computation.
        validate: check the visual-token count (one read-back); the model hooks pass False.

    Returns:
        PrunedBatch. Host syncs: compact_tokens' single read-back of (T', L'), plus validate's.
    """
    _check_maps(visual_keep, visual_fuse)
    batch, length, dim = inputs_embeds.shape
    device = inputs_embeds.device
    two_dim_positions = position_ids.dim() == 2
    positions = position_ids[None] if two_dim_positions else position_ids
    if positions.shape[1:] != (batch, length):
        raise ValueError(f"position_ids must be [P, {batch}, {length}] or [{batch}, {length}], "
                         f"got {tuple(position_ids.shape)}")
    if visual_mask.shape != (batch, length) or visual_mask.dtype != torch.bool:
        raise ValueError(f"visual_mask must be bool [{batch}, {length}], got {visual_mask.dtype} "
                         f"{tuple(visual_mask.shape)}")
    if validate:
        _check_visual_count(visual_mask, visual_keep)
    valid = torch.ones_like(visual_mask) if attention_mask is None else attention_mask.bool()

    token_keep, token_fuse = _token_maps(visual_mask.flatten(), visual_keep, visual_fuse)
    row_keep = token_keep & valid.flatten()
    cu_in = torch.arange(batch + 1, device=device, dtype=torch.int32) * length
    flat_positions = positions.reshape(positions.shape[0], batch * length).to(torch.int64)
    packed = compact_tokens(inputs_embeds.reshape(batch * length, dim), row_keep, cu_in, flat_positions, token_fuse)

    kept_counts = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).long()
    new_length = packed.max_seqlen
    dest = _left_padded_destinations(packed.cu_seqlens, kept_counts, new_length, packed.hidden.shape[0])

    embeds = packed.hidden.new_zeros(batch * new_length, dim).index_put((dest,), packed.hidden)
    new_positions = flat_positions.new_zeros(positions.shape[0], batch * new_length)
    new_positions[:, dest] = packed.position_ids
    mask_dtype = torch.int64 if attention_mask is None else attention_mask.dtype
    new_mask = torch.zeros(batch * new_length, dtype=mask_dtype, device=device).index_fill_(0, dest, 1)
    source_index = torch.full((batch * new_length,), -1, dtype=torch.int64, device=device)
    source_index[dest] = packed.kept_index

    new_mask = new_mask.view(batch, new_length)
    new_positions = new_positions.view(-1, batch, new_length)
    rope_rows = positions[1:] if text_position_row else positions
    max_position = rope_rows.masked_fill(~valid[None], torch.iinfo(rope_rows.dtype).min).amax(dim=(0, 2))
    if text_position_row:
        new_positions[0] = (new_mask.long().cumsum(-1) - 1).clamp_min(0).masked_fill(new_mask == 0, 0)
    visual_kept = (visual_mask & token_keep.view(batch, length)).sum(-1)
    return PrunedBatch(
        inputs_embeds=embeds.view(batch, new_length, dim),
        attention_mask=new_mask,
        position_ids=new_positions[0] if two_dim_positions else new_positions,
        kept_counts=kept_counts,
        visual_counts=visual_mask.sum(-1),
        visual_kept_counts=visual_kept,
        next_position=max_position + 1,
        rope_deltas=(max_position + 1 - kept_counts)[:, None],
        source_index=source_index.view(batch, new_length),
        token_keep=token_keep,
        token_fuse=token_fuse,
        packed_rows=dest,
    )


def _left_padded_destinations(
    cu_seqlens: torch.Tensor, lengths: torch.Tensor, new_length: int, total: int
) -> torch.Tensor:
    """Flat index in a left-padded [B, new_length] layout of each packed row (no host sync)."""
    batch = lengths.numel()
    sample = torch.repeat_interleave(torch.arange(batch, device=lengths.device), lengths, output_size=total)
    row = torch.arange(total, device=lengths.device)
    in_sample = row - cu_seqlens.long()[sample]
    return sample * new_length + (new_length - lengths[sample]) + in_sample


def compact_token_values(values: torch.Tensor, pruned: PrunedBatch, fill: int | float = 0) -> torch.Tensor:
    """Carry a per-token tensor (labels, mm_token_type_ids, ...) into the compacted layout.

    Args:
        values: [B, L, ...] aligned with the batch that was pruned.
        pruned: the PrunedBatch of that batch.
        fill: value for padding rows (e.g. -100 for labels).

    Returns:
        [B, L', ...] with values gathered at the kept tokens and `fill` at padding.
    """
    batch, new_length = pruned.source_index.shape
    flat = values.reshape(values.shape[0] * values.shape[1], *values.shape[2:])
    source = pruned.source_index.flatten()
    gathered = flat[source.clamp_min(0)]
    pad = (source < 0).view(-1, *([1] * (flat.dim() - 1)))
    return gathered.masked_fill(pad, fill).view(batch, new_length, *values.shape[2:])


def compact_visual_features(features: torch.Tensor, feature_mask: torch.Tensor, pruned: PrunedBatch) -> torch.Tensor:
    """Apply a pruning (and its fusion) to features that live on a subset of the tokens.

    Used for e.g. Qwen3-VL's DeepStack features, which are added at the visual positions of early layers.

    Args:
        features: [R, D] rows for the tokens where feature_mask is True, in row-major [B, L] order.
        feature_mask: bool [B, L] (must contain every visual token that can be dropped or fused into).
        pruned: the PrunedBatch.

    Returns:
        [R', D]: the rows of the kept tokens (fused rows averaged like the hidden states), in order; this matches
        compact_token_values(feature_mask, pruned, False).
    """
    mask = feature_mask.flatten()
    rows = features.shape[0]
    token_of_row = _visual_token_index(mask, rows)
    row_keep = pruned.token_keep[token_of_row]
    row_fuse = None
    if pruned.token_fuse is not None:
        rank = mask.long().cumsum(0) - 1
        target = pruned.token_fuse[token_of_row]
        row_fuse = torch.where(target >= 0, rank[target.clamp_min(0)], torch.full_like(target, -1))
    cu = torch.tensor([0, rows], dtype=torch.int32, device=features.device)
    dummy_positions = torch.zeros(1, rows, dtype=torch.int64, device=features.device)
    return compact_tokens(features, row_keep, cu, dummy_positions, row_fuse).hidden
