"""Token-sparse verl-style packed (remove-padding) batches, ready for varlen attention.

verl's actor with ``use_remove_padding`` unpads the [B, L] rollout batch into one packed row [1, T] plus
``cu_seqlens`` and hands the model M-RoPE positions as [4, 1, T] (a per-sequence text row, then the three
M-RoPE rows) for Qwen2-VL / Qwen2.5-VL. :func:`prune_packed_batch` does the same unpadding and additionally drops
(or fuses) the visual tokens outside the evidence boxes, so the language model runs on fewer tokens:

    pruned = prune_packed_batch(input_ids, position_ids, image_grid_thw, attention_mask=attention_mask,
                                model=model, pixel_values=pixel_values, vitos_boxes=boxes)
    hidden = model.model.language_model(**pruned.language_model_kwargs()).last_hidden_state   # [1, T', D]
    logits = model.lm_head(hidden)[0]                                                          # [T', V]
    logp = logits.log_softmax(-1).gather(-1, pruned.next_token_labels().clamp_min(0)[:, None])[:, 0]
    logp_padded = pruned.scatter(logp)                                                         # [B, L] again

Rules (DESIGN.md): text tokens are always kept; kept tokens keep their original (M-)RoPE positions (gathered, never
renumbered); an image without a valid box keeps all its tokens; a sequence may lose all its visual tokens but
never its text. Only the text row of a 4-row position tensor is rebuilt (0, 1, 2, ... per compacted sequence),
which is what transformers reads to find packed-sequence boundaries for eager / SDPA attention.

Host syncs: unpadding reads the valid-token indices back once (as every unpad does); counting the visual tokens
and the compaction (its output size) read back once each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..models import adapter_for
from ..ops.attention import cu_seqlens_from_lengths
from ..patching import encode_images
from ..profiling import nvtx_range
from ..sparsity import keep_mask_from_boxes, prune_packed, resolve_fusion, validate_keep, visual_token_counts

__all__ = ["PackedPrunedBatch", "packed_inputs_embeds", "prune_packed_batch"]


@dataclass
class PackedPrunedBatch:
    """The pruned, packed batch returned by :func:`prune_packed_batch`.

    Attributes:
        input_ids: int64 [1, T'], token ids of the kept tokens (a fused visual token keeps its own id).
        inputs_embeds: [1, T', D] kept (or fused) embeddings, or None when no embeddings were given.
        position_ids: int64 [P, 1, T'] for P-row positions (P = 3 M-RoPE, 4 = text row + M-RoPE, text row
            rebuilt per sequence), or [1, T'] for 1-D positions. The RoPE rows are the original positions.
        sequence_positions: int64 [T'], index of each token inside its compacted sequence (0, 1, 2, ...).
        cu_seqlens: int32 [B + 1], offsets of the compacted sequences (one per input sequence, may be shorter).
        max_seqlen: int, longest compacted sequence.
        kept_index: int64 [T'], index of each kept token among the unpruned packed tokens.
        source_index: int64 [T'], flat index of each kept token in the caller's layout ([B * L] for a padded
            input, [T] for a packed one): where :meth:`scatter` puts per-token results back.
        token_keep: bool [T] over the unpruned packed tokens (True = kept or fusion target).
        visual_keep: bool [N] over the visual tokens in packed order (select image-feature rows with it).
        visual_counts, visual_kept_counts: int64 [B], visual tokens per sequence before / after pruning.
        source_shape: (B, L) for a padded input, (T,) for a packed one.
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor | None
    position_ids: torch.Tensor
    sequence_positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    kept_index: torch.Tensor
    source_index: torch.Tensor
    token_keep: torch.Tensor
    visual_keep: torch.Tensor
    visual_counts: torch.Tensor
    visual_kept_counts: torch.Tensor
    source_shape: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        """T': tokens after pruning."""
        return int(self.input_ids.shape[1])

    @property
    def kept_ratio(self) -> float:
        """Kept / all visual tokens over the batch (1.0 without visual tokens). Reads back once."""
        total = int(self.visual_counts.sum())
        return 1.0 if total == 0 else int(self.visual_kept_counts.sum()) / total

    def language_model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a transformers decoder (e.g. ``model.model.language_model``) on this batch.

        Carries ``cu_seq_lens_q/k`` and ``max_length_q/k`` (read by the "vitos_varlen" and flash attention
        implementations) and, for M-RoPE, [4, 1, T'] positions whose text row restarts at every sequence (what
        transformers' eager / SDPA mask builder reads to keep packed sequences apart). With 1-D positions only
        varlen / flash attention separate the sequences: gathered positions have gaps by design.
        Without embeddings the kwargs carry ``input_ids``: the caller then places the kept image-feature rows
        (``features[self.visual_keep]``) at the image tokens, as the model's own forward would.
        """
        positions = self.position_ids
        if positions.dim() == 3 and positions.shape[0] == 3:
            positions = torch.cat([self.sequence_positions.view(1, 1, -1), positions])
        kwargs: dict[str, Any] = dict(
            position_ids=positions, attention_mask=None, use_cache=False,
            cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
            max_length_q=self.max_seqlen, max_length_k=self.max_seqlen,
        )
        if self.inputs_embeds is not None:
            kwargs["inputs_embeds"] = self.inputs_embeds
        else:
            kwargs["input_ids"] = self.input_ids
        return kwargs

    def next_token_labels(self, ignore_index: int = -100) -> torch.Tensor:
        """int64 [T']: the id of the token that follows each kept token in its original sequence.

        ``ignore_index`` where that token was dropped, and at the last token of every sequence. Text tokens are
        never dropped, so every prompt-to-response and response-to-response transition has its label.
        """
        ids = self.input_ids[0]
        labels = torch.full_like(ids, ignore_index)
        if ids.numel() < 2:
            return labels
        follows = self.kept_index[1:] == self.kept_index[:-1] + 1
        last = torch.zeros_like(ids, dtype=torch.bool)
        ends = self.cu_seqlens[1:].long() - 1
        last[ends[ends >= 0]] = True
        valid = follows & ~last[:-1]
        labels[:-1] = torch.where(valid, ids[1:], labels[:-1])
        return labels

    def scatter(self, values: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """Put per-token results back into the caller's layout (like verl's pad_input).

        Args:
            values: [T', ...] one row per kept token (e.g. log-probs [T'] or hidden states [T', D]).
            fill: value at dropped tokens and padding.

        Returns:
            [B, L, ...] for a padded input, [T, ...] for a packed one. Differentiable w.r.t. values.
        """
        if values.shape[0] != self.source_index.shape[0]:
            raise ValueError(f"values must have {self.source_index.shape[0]} rows (one per kept token), "
                             f"got {tuple(values.shape)}")
        rows = math.prod(self.source_shape)
        out = values.new_full((rows, *values.shape[1:]), fill)
        out = out.index_put((self.source_index,), values)
        return out.view(*self.source_shape, *values.shape[1:])


# ----------------------------------------------------------------------------------------------------------
# unpadding
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Packed:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [P, T]
    one_d_positions: bool
    embeds: torch.Tensor | None  # [T, D]
    cu_seqlens: torch.Tensor  # int32 [B + 1]
    source_index: torch.Tensor  # int64 [T]
    source_shape: tuple[int, ...]


def _require_tensor(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _pack(input_ids, position_ids, attention_mask, cu_seqlens, inputs_embeds) -> _Packed:
    _require_tensor(input_ids, "input_ids")
    _require_tensor(position_ids, "position_ids")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an integer tensor of token ids, got {input_ids.dtype}")
    if cu_seqlens is None:
        return _pack_padded(input_ids, position_ids, attention_mask, inputs_embeds)
    if attention_mask is not None:
        raise ValueError("pass attention_mask (padded [B, L] input) or cu_seqlens (packed [1, T] input), not both")
    return _pack_packed(input_ids, position_ids, cu_seqlens, inputs_embeds)


def _pack_padded(input_ids, position_ids, attention_mask, inputs_embeds) -> _Packed:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L] (with attention_mask) or [1, T] / [T] (with cu_seqlens), "
                         f"got {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    if attention_mask is None:
        valid = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        _require_tensor(attention_mask, "attention_mask")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        valid = attention_mask.bool()
    if position_ids.shape == (batch, length):
        positions, one_d = position_ids[None], True
    elif position_ids.dim() == 3 and position_ids.shape[1:] == (batch, length):
        positions, one_d = position_ids, False
    else:
        raise ValueError(f"position_ids must be [P, {batch}, {length}] (P = 3 M-RoPE or 4 with a text row first; "
                         f"verl stores [B, 4, L]: pass position_ids.transpose(0, 1)) or [{batch}, {length}], "
                         f"got {tuple(position_ids.shape)}")
    flat_index = valid.flatten().nonzero().squeeze(1)  # one read-back, as every unpad does
    lengths = valid.sum(1, dtype=torch.int32)
    embeds = None
    if inputs_embeds is not None:
        _require_tensor(inputs_embeds, "inputs_embeds")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[:2] != (batch, length):
            raise ValueError(f"inputs_embeds must be [{batch}, {length}, D], got {tuple(inputs_embeds.shape)}")
        embeds = inputs_embeds.reshape(batch * length, -1).index_select(0, flat_index)
    return _Packed(
        input_ids=input_ids.reshape(-1).index_select(0, flat_index).long(),
        positions=positions.reshape(positions.shape[0], -1).index_select(1, flat_index).long(),
        one_d_positions=one_d,
        embeds=embeds,
        cu_seqlens=cu_seqlens_from_lengths(lengths),
        source_index=flat_index,
        source_shape=(batch, length),
    )


def _pack_packed(input_ids, position_ids, cu_seqlens, inputs_embeds) -> _Packed:
    _require_tensor(cu_seqlens, "cu_seqlens")
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(f"with cu_seqlens, input_ids must be packed [1, T] or [T], got {tuple(input_ids.shape)}")
    total = input_ids.shape[0]
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be an integer tensor [B + 1], got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if position_ids.dim() == 3 and position_ids.shape[1:] == (1, total):
        positions, one_d = position_ids[:, 0], False
    elif position_ids.dim() == 2 and position_ids.shape[1] == total and position_ids.shape[0] in (3, 4):
        positions, one_d = position_ids, False
    elif position_ids.shape in ((1, total), (total,)):
        positions, one_d = position_ids.reshape(1, total), True
    else:
        raise ValueError(f"with packed input_ids, position_ids must be [P, 1, {total}] (verl's layout), "
                         f"[P, {total}] or [1, {total}] / [{total}], got {tuple(position_ids.shape)}")
    embeds = None
    if inputs_embeds is not None:
        _require_tensor(inputs_embeds, "inputs_embeds")
        embeds = inputs_embeds[0] if inputs_embeds.dim() == 3 and inputs_embeds.shape[0] == 1 else inputs_embeds
        if embeds.dim() != 2 or embeds.shape[0] != total:
            raise ValueError(f"inputs_embeds must be [1, {total}, D] or [{total}, D], got {tuple(inputs_embeds.shape)}")
    return _Packed(
        input_ids=input_ids.long(),
        positions=positions.long(),
        one_d_positions=one_d,
        embeds=embeds,
        cu_seqlens=cu_seqlens.to(torch.int32),
        source_index=torch.arange(total, device=input_ids.device),
        source_shape=(total,),
    )


# ----------------------------------------------------------------------------------------------------------
# embeddings and visual tokens
# ----------------------------------------------------------------------------------------------------------


def packed_inputs_embeds(model: torch.nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                         image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
    """Input embeddings with the image features placed at the image tokens, for any layout of input_ids.

    Runs the model's vision tower once (vitos_ext.encode_images) and scatters its rows into the token embeddings,
    as the model's own forward does, but without running the language model.

    Args:
        model: a supported VLM (Qwen2-VL, Qwen2.5-VL, LLaVA), patched or not.
        input_ids: int64 [B, L], [1, T] or [T], containing the image tokens.
        pixel_values: the processor's pixel_values for the images, in image order.
        image_grid_thw: int64 [I, 3] for the Qwen families.

    Returns:
        [*input_ids.shape, D] embeddings in the model's dtype. Differentiable.
    """
    adapter = adapter_for(model)
    if adapter.name == "qwen3_vl":
        raise NotImplementedError("Qwen3-VL adds DeepStack visual features inside its language model; packed "
                                  "pruning of Qwen3-VL is not supported (use patch_model's padded path)")
    image_inputs = {} if image_grid_thw is None else {"image_grid_thw": image_grid_thw}
    with nvtx_range("vitos.integrations.vision"):
        features = encode_images(model, pixel_values, **image_inputs).output.pooler_output
    rows = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    rows = rows.reshape(-1, rows.shape[-1])
    embeds = model.get_input_embeddings()(input_ids)
    image_mask = input_ids == adapter.image_token_id(model)
    count = int(image_mask.sum())
    if count != rows.shape[0]:
        raise ValueError(f"input_ids hold {count} image tokens but the vision tower produced {rows.shape[0]} "
                         "feature rows: pixel_values / image_grid_thw do not match the prompts")
    return embeds.masked_scatter(image_mask[..., None], rows.to(embeds.dtype))


def _box_tensors(vitos_boxes: Any, device: torch.device) -> list[torch.Tensor]:
    """Per-image boxes as float32 [n_i, 4] tensors on `device` (tensors, numpy arrays or nested lists)."""
    if isinstance(vitos_boxes, torch.Tensor) or not isinstance(vitos_boxes, Sequence):
        raise TypeError(f"vitos_boxes must be a list with one [n_i, 4] box set per image, "
                        f"got {type(vitos_boxes).__name__}")
    tensors = []
    for i, boxes in enumerate(vitos_boxes):
        try:
            tensor = torch.as_tensor(boxes, dtype=torch.float32, device=device)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"vitos_boxes[{i}] must be [n, 4] normalized boxes: {error}") from None
        if tensor.numel() == 0:
            tensor = tensor.reshape(0, 4)
        if tensor.dim() != 2 or tensor.shape[1] != 4:
            raise ValueError(f"vitos_boxes[{i}] must have shape [n, 4] (x1, y1, x2, y2), got {tuple(tensor.shape)}")
        tensors.append(tensor)
    return tensors


def _visual_grid(model, image_grid_thw, merge_size, input_ids, num_visual) -> tuple[torch.Tensor | None, int]:
    """(grid_thw int64 [I, 3] or None, merge size) from the model's adapter or from the explicit arguments."""
    if model is not None:
        if num_visual == 0:
            return None, 1
        inputs = {"image_grid_thw": image_grid_thw, "input_ids": input_ids}
        grid, merge = adapter_for(model).visual_grid(model, inputs, num_visual)
        return grid.to(input_ids.device), merge
    if merge_size is None or not isinstance(merge_size, int) or merge_size < 1:
        raise ValueError(f"merge_size must be a positive int when no model is given, got {merge_size!r}")
    if image_grid_thw is None:
        if num_visual:
            raise ValueError(f"input_ids hold {num_visual} image tokens but image_grid_thw is None")
        return None, merge_size
    grid = _require_tensor(image_grid_thw, "image_grid_thw")
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be [I, 3] (t, h, w in patches), got {tuple(grid.shape)}")
    return grid.to(device=input_ids.device, dtype=torch.int64), merge_size


def _check_token_count(grid: torch.Tensor | None, merge: int, num_visual: int) -> None:
    expected = 0 if grid is None else sum(visual_token_counts(grid, merge))
    if expected != num_visual:
        raise ValueError(f"image_grid_thw describes {expected} visual tokens (merge size {merge}) but input_ids "
                         f"hold {num_visual} image tokens")


def _visual_keep(vitos_boxes, vitos_keep, vitos_dilate, grid, merge, num_visual, device) -> torch.Tensor:
    if vitos_boxes is not None and vitos_keep is not None:
        raise ValueError("pass vitos_boxes or vitos_keep, not both")
    if vitos_keep is not None:
        return validate_keep(vitos_keep, num_visual, device)
    if vitos_boxes is None:
        return torch.ones(num_visual, dtype=torch.bool, device=device)
    boxes = _box_tensors(vitos_boxes, device)
    if grid is None:
        if boxes:
            raise ValueError(f"vitos_boxes has {len(boxes)} entries but the batch has no image")
        return torch.zeros(0, dtype=torch.bool, device=device)
    return keep_mask_from_boxes(boxes, grid, merge, vitos_dilate, num_tokens=num_visual)


# ----------------------------------------------------------------------------------------------------------
# the entry point
# ----------------------------------------------------------------------------------------------------------


def prune_packed_batch(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    model: torch.nn.Module | None = None,
    vitos_boxes: Sequence[Any] | None = None,
    vitos_keep: torch.Tensor | None = None,
    vitos_dilate: int = 0,
    vitos_fuse: bool | torch.Tensor | None = None,
    image_token_id: int | None = None,
    merge_size: int | None = None,
    text_position_row: bool | None = None,
) -> PackedPrunedBatch:
    """Unpad a verl-style batch and drop the visual tokens outside the evidence boxes, in one packed row.

    Two input layouts:
      * padded: input_ids int [B, L] with attention_mask [B, L] (left and/or right padding; None = no padding) and
        position_ids int64 [P, B, L] (verl's [B, 4, L] transposed: ``position_ids.transpose(0, 1)``) or [B, L];
      * packed (already unpadded): input_ids [1, T] or [T] with cu_seqlens int [B + 1] and position_ids
        [P, 1, T] (verl's remove-padding layout), [P, T] or [1, T] / [T].
    P = 3 are M-RoPE rows; P = 4 has a text row first (Qwen2-VL / Qwen2.5-VL in verl), rebuilt per compacted
    sequence. Every other row is gathered: kept tokens keep their original rotary positions.

    Args:
        input_ids: token ids (see the layouts).
        position_ids: positions (see the layouts).
        image_grid_thw: int64 [I, 3], (t, h, w) in patches per image in token order (None for LLaVA / no image).
        attention_mask: padded layout only.
        cu_seqlens: packed layout only.
        inputs_embeds: float [B, L, D] / [1, T, D] / [T, D] embeddings with the image features already placed.
            When given, the result carries the pruned (and fused) embeddings; they stay differentiable.
        pixel_values: with ``model`` and no inputs_embeds: the embeddings are computed here
            (:func:`packed_inputs_embeds`, one vision-tower pass).
        model: a supported VLM; supplies image_token_id, merge size and the visual grid (LLaVA) when given.
        vitos_boxes: per image (image_grid_thw order), normalized [x1, y1, x2, y2] boxes: a float tensor / array /
            nested list [n_i, 4] (n_i = 0 keeps the whole image).
        vitos_keep: bool [N] over all N visual tokens in packed order, instead of boxes (any policy).
            Neither boxes nor keep: every token is kept (a full-token pass through the same code path).
        vitos_dilate: grow box regions by this many tokens (>= 0).
        vitos_fuse: True (average dropped tokens into the nearest kept one) or an int64 [N] fusion map; needs
            embeddings (inputs_embeds, or model + pixel_values).
        image_token_id, merge_size: needed when ``model`` is None.
        text_position_row: whether position row 0 is a text row (default: P == 4).

    Returns:
        :class:`PackedPrunedBatch` (input_ids [1, T'], inputs_embeds [1, T', D] or None, position_ids, cu_seqlens
        int32 [B + 1], max_seqlen, kept_index [T'], source_index [T'], ...).

    Raises:
        TypeError / ValueError naming the argument for wrong shapes, dtypes, layouts, image-token counts that do
        not match image_grid_thw, box lists that do not match the images, and fusion without embeddings.
    """
    with nvtx_range("vitos.integrations.prune_packed_batch"):
        with nvtx_range("vitos.integrations.unpad"):
            packed = _pack(input_ids, position_ids, attention_mask, cu_seqlens, inputs_embeds)
        if model is not None:
            image_token_id = adapter_for(model).image_token_id(model)
            if packed.embeds is None and pixel_values is not None:
                embeds = packed_inputs_embeds(model, packed.input_ids, pixel_values, image_grid_thw)
                packed.embeds = embeds
        if image_token_id is None:
            raise ValueError("image_token_id is required when no model is given")
        visual_mask = packed.input_ids == int(image_token_id)
        num_visual = int(visual_mask.sum())  # one read-back: sizes the keep mask
        grid, merge = _visual_grid(model, image_grid_thw, merge_size, packed.input_ids, num_visual)
        _check_token_count(grid, merge, num_visual)
        device = packed.input_ids.device
        with nvtx_range("vitos.integrations.keep_mask"):
            keep = _visual_keep(vitos_boxes, vitos_keep, vitos_dilate, grid, merge, num_visual, device)
        fuse = None
        if vitos_fuse is not None and vitos_fuse is not False:
            if packed.embeds is None:
                raise ValueError("vitos_fuse needs embeddings: pass inputs_embeds, or model and pixel_values")
            fuse = resolve_fusion(vitos_fuse, keep, grid, merge) if grid is not None else None
        return _compact(packed, visual_mask, keep, fuse, text_position_row)


def _compact(packed: _Packed, visual_mask, keep, fuse, text_position_row) -> PackedPrunedBatch:
    rows = packed.positions.shape[0]
    text_row = rows == 4 if text_position_row is None else bool(text_position_row)
    if text_row and packed.one_d_positions:
        raise ValueError("text_position_row needs multi-row position_ids [P, ...]")
    rope = packed.positions[1:] if text_row else packed.positions
    total = packed.input_ids.shape[0]
    hidden = packed.embeds if packed.embeds is not None else packed.positions.new_zeros((total, 0), dtype=torch.float32)
    with nvtx_range("vitos.integrations.compact"):
        compacted = prune_packed(hidden, packed.cu_seqlens, rope, visual_mask, keep, fuse, validate=False)
    kept_rows = compacted.kept_index.shape[0]
    kept_lengths = (compacted.cu_seqlens[1:] - compacted.cu_seqlens[:-1]).long()
    batch = kept_lengths.shape[0]
    sequence = torch.repeat_interleave(torch.arange(batch, device=hidden.device), kept_lengths, output_size=kept_rows)
    sequence_positions = torch.arange(kept_rows, device=hidden.device) - compacted.cu_seqlens.long()[sequence]
    if packed.one_d_positions:
        position_ids = compacted.position_ids.view(1, kept_rows)
    else:
        position_ids = compacted.position_ids
        if text_row:
            position_ids = torch.cat([sequence_positions[None], position_ids])
        position_ids = position_ids.unsqueeze(1)
    token_keep = torch.zeros(total, dtype=torch.bool, device=hidden.device).index_fill_(0, compacted.kept_index, True)
    lengths = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).long()
    source_sequence = torch.repeat_interleave(torch.arange(batch, device=hidden.device), lengths, output_size=total)
    zeros = torch.zeros(batch, dtype=torch.int64, device=hidden.device)
    return PackedPrunedBatch(
        input_ids=packed.input_ids[compacted.kept_index].view(1, kept_rows),
        inputs_embeds=compacted.hidden.unsqueeze(0) if packed.embeds is not None else None,
        position_ids=position_ids,
        sequence_positions=sequence_positions,
        cu_seqlens=compacted.cu_seqlens,
        max_seqlen=int(compacted.max_seqlen),
        kept_index=compacted.kept_index,
        source_index=packed.source_index[compacted.kept_index],
        token_keep=token_keep,
        visual_keep=keep,
        visual_counts=zeros.index_add(0, source_sequence, visual_mask.long()),
        visual_kept_counts=zeros.index_add(0, source_sequence, (visual_mask & token_keep).long()),
        source_shape=packed.source_shape,
    )
