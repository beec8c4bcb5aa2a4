"""Rollouts of the two ViToS branches with the (patched) model's generate(): KV cache, temperature / top-p / top-k.

Grounding branch: G rollouts O_i per prompt with all visual tokens. Token-sparse branch: for every O_i, its parsed
boxes select the visual tokens (region_to_patch_mask through vitos_ext.sparsity, optional dilation and token
fusion) and G' rollouts O'_{i,j} answer the same question seeing only those tokens; pruning happens once at the
prefill, so the KV cache holds only kept tokens.

Generation never emits the vision placeholder tokens (they are suppressed): a sampled ``<|image_pad|>`` would make
the completion unusable as model input.

Row-seeded sampling (:class:`RowSeededSampler`, ``generate_completions(..., row_seeds=...)``): each rollout row draws
its tokens from its own counter-based random stream, keyed by (row seed, token index), instead of the process-wide
torch generator. A row's completion then depends only on its seed and its logits -- not on which other rows share
its generate() call, how rows are chunked (``generation_batch_size``) or on which rank it runs. The data-parallel
trainer uses it so that N processes sample the same rollouts as one process with the same global batch (verl gets
the same property from per-request seeds in its inference engine). The distribution is exactly HF's: temperature,
top-k and top-p are applied as in ``generate(do_sample=True)``, then one token is drawn by the Gumbel-max trick.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ..parsing import parse_output
from ..sparsity import image_segments, keep_mask_from_boxes, visual_token_counts
from .batching import PromptBatch, SequenceBatch, build_sequences, concat_sequence_batches
from .logprobs import SparseSelection

__all__ = [
    "SamplingSettings",
    "Rollouts",
    "concat_rollouts",
    "RowSeededSampler",
    "rollout_row_seeds",
    "visual_token_counts",
    "sparse_selection",
    "generate_completions",
    "decode_completions",
    "special_token_ids",
]


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample: do_sample=False is greedy decoding (evaluation). top_k=0 disables top-k."""

    max_new_tokens: int = 96
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int | None = None  # rows per generate() call


@dataclass
class Rollouts:
    """Rollouts of one branch and what scoring / the update need.

    Attributes:
        branch: "grounding" or "sparse".
        sequences: prompts + completions (completion_mask covers tokens up to and including the end-of-turn token).
        texts: decoded completions (special tokens skipped).
        group_ids: int64 [N], the prompt slot in this step's batch: advantages are normalized within a group
            (G rows per prompt for grounding, G x G' rows per prompt for sparse).
        example_ids: dataset index of each row's example.
        parent: int64 [N], for sparse rows the grounding row O_i whose boxes selected the tokens; -1 for grounding.
        truncated: bool [N], the completion hit max_new_tokens without an end-of-turn token.
        boxes: parsed normalized boxes of each completion.
        selection: the visual tokens kept (sparse) or None (all tokens).
        kept_ratio: float32 [N], kept visual tokens / visual tokens per row (1.0 for grounding).
        row_offset: index of the first row in the step's global rollout batch of this branch (data-parallel
            ranks hold contiguous slices; 0 in one process). Row-seeded sampling keys on global rows.
    """

    branch: str
    sequences: SequenceBatch
    texts: list[str]
    group_ids: torch.Tensor
    example_ids: list[int]
    parent: torch.Tensor
    truncated: torch.Tensor
    boxes: list[list[list[float]]]
    selection: SparseSelection | None
    kept_ratio: torch.Tensor
    merge_size: int = 2
    row_offset: int = 0

    @property
    def size(self) -> int:
        """Number of rollouts N."""
        return len(self.texts)

    def select(self, rows: list[int] | torch.Tensor) -> tuple[SequenceBatch, SparseSelection | None]:
        """The training-forward inputs of a subset of rows (the keep mask is cut to their images)."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        selection = None
        if self.selection is not None:
            counts = visual_token_counts(self.sequences.prompt.image_grid_thw, self.merge_size)
            selection = SparseSelection(image_segments(self.selection.keep, counts, rows), self.selection.fuse)
        return self.sequences.select(rows), selection

    def take(self, rows: list[int] | torch.Tensor) -> "Rollouts":
        """A subset of rows as new :class:`Rollouts` (``parent`` still indexes the original grounding rows)."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        sequences, selection = self.select(rows)
        index = rows.tolist()
        return replace(self, sequences=sequences, texts=[self.texts[r] for r in index], group_ids=self.group_ids[rows],
                       example_ids=[self.example_ids[r] for r in index], parent=self.parent[rows],
                       truncated=self.truncated[rows], boxes=[self.boxes[r] for r in index], selection=selection,
                       kept_ratio=self.kept_ratio[rows])


def concat_rollouts(parts: list[Rollouts], pad_token_id: int, parent: torch.Tensor | None = None) -> Rollouts:
    """The rows of several :class:`Rollouts` of one branch as one, in order.

    Args:
        parts: rollouts of the same branch (and, for sparse rollouts, the same fusion setting).
        pad_token_id: the pad token of the re-padded prompts and completions.
        parent: int64 [N] of the result (the parent rows in the matching concatenated grounding rollouts); None
            keeps each part's own ``parent``.

    Returns:
        :class:`Rollouts` whose ``row_offset`` is the first part's.
    """
    if not parts:
        raise ValueError("parts must not be empty")
    branches = {part.branch for part in parts}
    if len(branches) != 1:
        raise ValueError(f"parts must all be rollouts of one branch, got {sorted(branches)}")
    selection = None
    if parts[0].selection is not None:
        if any(part.selection is None or part.selection.fuse != parts[0].selection.fuse for part in parts):
            raise ValueError("parts must all carry a sparse selection with the same fuse setting")
        selection = SparseSelection(torch.cat([part.selection.keep for part in parts]), parts[0].selection.fuse)
    cat_lists = lambda name: [item for part in parts for item in getattr(part, name)]  # noqa: E731
    cat_tensors = lambda name: torch.cat([getattr(part, name) for part in parts])  # noqa: E731
    merged_parent = cat_tensors("parent") if parent is None else torch.as_tensor(parent, dtype=torch.int64)
    if merged_parent.shape[0] != sum(part.size for part in parts):
        raise ValueError(f"parent must have one entry per row ({sum(part.size for part in parts)}), "
                         f"got {merged_parent.shape[0]}")
    return replace(parts[0], sequences=concat_sequence_batches([part.sequences for part in parts], pad_token_id),
                   texts=cat_lists("texts"), group_ids=cat_tensors("group_ids"), example_ids=cat_lists("example_ids"),
                   parent=merged_parent, truncated=cat_tensors("truncated"), boxes=cat_lists("boxes"),
                   selection=selection, kept_ratio=cat_tensors("kept_ratio"))


def special_token_ids(model: torch.nn.Module) -> tuple[list[int], list[int]]:
    """(end-of-turn ids, vision placeholder ids to suppress) from the model's generation config and config."""
    eos = model.generation_config.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    if not eos_ids:
        raise ValueError("model.generation_config.eos_token_id is not set: generation would never stop")
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    suppress = sorted({int(getattr(model.config, n)) for n in names if getattr(model.config, n, None) is not None})
    return eos_ids, suppress


def sparse_selection(
    boxes: list[list[list[float]]],
    grid_thw: torch.Tensor,
    merge_size: int,
    dilate: int = 0,
    fuse: bool = False,
    no_box_policy: str = "no_visual_tokens",
) -> tuple[SparseSelection, torch.Tensor]:
    """Visual tokens each row keeps given its evidence boxes.

    Args:
        boxes: per row (= per image), a list of normalized [x1, y1, x2, y2] boxes (may be empty).
        grid_thw: int64 [B, 3], one image per row.
        merge_size: the vision tower's spatial merge size.
        dilate: grow each box region by this many tokens.
        fuse: ViToS token fusion (dropped tokens averaged into the nearest kept token).
        no_box_policy: rows without a valid box keep "no_visual_tokens" (the sparse branch answers blind, which
            the cross-feedback reward then charges to the grounding rollout) or "all_visual_tokens".

    Returns:
        (SparseSelection with keep bool [sum of visual tokens], kept_ratio float32 [B]).
    """
    if len(boxes) != grid_thw.shape[0]:
        raise ValueError(f"boxes has {len(boxes)} rows but grid_thw has {grid_thw.shape[0]} images")
    tensors = [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]
    counts = visual_token_counts(grid_thw, merge_size)
    keep = keep_mask_from_boxes(tensors, grid_thw, merge_size, dilate, num_tokens=sum(counts))
    ratios, start = [], 0
    for row, count in enumerate(counts):
        if tensors[row].shape[0] == 0 and no_box_policy == "no_visual_tokens":
            keep[start:start + count] = False
        ratios.append(float(keep[start:start + count].sum()) / max(count, 1))
        start += count
    return SparseSelection(keep, fuse), torch.tensor(ratios, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# row-seeded sampling

_MASK32 = 0xFFFFFFFF


def _mul32(x, constant: int):
    """(x * constant) mod 2**32 for 32-bit x (Python int or int64 tensor) without int64 overflow."""
    return (x * (constant & 0xFFFF) + (((x * (constant >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x):
    """A 32-bit avalanche hash (a bijection of [0, 2**32)); works on Python ints and int64 tensors alike."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def rollout_row_seeds(seed: int, step: int, stream: int, rows: torch.Tensor | list[int]) -> torch.Tensor:
    """int64 [R] sampling seeds in [0, 2**32), one per global rollout row, from (run seed, global step, stream, row).

    ``stream`` tells apart the rollout calls of one step (grounding, sparse, the fresh sparse rollouts of
    "alternate"). The same (seed, step, stream, row) always gives the same seed, whatever process computes it.
    """
    key = _mix32(_mix32(_mix32(int(seed)) ^ (int(step) & _MASK32)) ^ (int(stream) & _MASK32))
    rows = torch.as_tensor(rows, dtype=torch.int64)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) > _MASK32):
        raise ValueError("rows must be in [0, 2**32)")
    return _mix32(rows ^ key)


class RowSeededSampler(LogitsProcessor):
    """Samples one token per row from that row's own random stream; returns scores that are 0 at the drawn token and
    -inf elsewhere, so a greedy (do_sample=False) generate() emits exactly the drawn tokens.

    Per step t (tokens generated so far) and row b, a uniform u[b, v] for every vocabulary entry v comes from a hash
    of (row_seeds[b], t, v); the token is argmax_v(warped_scores[b, v] - log(-log u[b, v])) (Gumbel-max), a draw from
    softmax(warped_scores[b]). Warping follows generate(do_sample=True): temperature, then top-k, then top-p.

    Args:
        seeds: int64 [B] per-row seeds (see :func:`rollout_row_seeds`), one per row of the generate() call.
        temperature, top_k, top_p: as in :class:`SamplingSettings`.

    Use one instance per generate() call (it records the prompt width at its first call).
    """

    def __init__(self, seeds: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        if not isinstance(seeds, torch.Tensor) or seeds.dim() != 1 or seeds.dtype != torch.int64:
            raise ValueError("seeds must be an int64 tensor [B]")
        self.seeds = seeds
        self.warpers = []
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
        self._prompt_width: int | None = None
        self._vocab_hash: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != self.seeds.shape[0]:
            raise ValueError(f"RowSeededSampler has {self.seeds.shape[0]} row seeds but generate() runs "
                             f"{scores.shape[0]} rows")
        if self._prompt_width is None:
            self._prompt_width = input_ids.shape[1]
        step = input_ids.shape[1] - self._prompt_width
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        vocab = scores.shape[-1]
        if self._vocab_hash is None or self._vocab_hash.shape[0] != vocab or self._vocab_hash.device != scores.device:
            self._vocab_hash = _mix32(torch.arange(vocab, dtype=torch.int64, device=scores.device) + 0x9E3779B9)
        row_key = _mix32(self.seeds.to(scores.device) ^ _mix32(step + 0x85EBCA6B))
        bits = _mix32(row_key[:, None] ^ self._vocab_hash[None, :]) >> 8  # 24 uniform bits per (row, token)
        uniform = (bits.to(torch.float64) + 0.5) / float(1 << 24)  # in (0, 1)
        gumbel = -torch.log(-torch.log(uniform))
        choice = (scores.to(torch.float64) + gumbel).argmax(dim=-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter_(1, choice, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# generation


def _generation_config(model: torch.nn.Module, settings: SamplingSettings, eos_ids: list[int],
                       suppress_ids: list[int], row_seeded: bool = False) -> GenerationConfig:
    sampling = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    if not settings.do_sample or row_seeded:  # row-seeded sampling draws in its logits processor
        sampling = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    pad = model.generation_config.pad_token_id
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad if pad is not None else eos_ids[0],
        suppress_tokens=suppress_ids or None,
        use_cache=True,
        **sampling,
    )


def _cut_at_eos(row: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, bool]:
    """Completion tokens up to and including the first end-of-turn token; (tokens, truncated)."""
    is_eos = torch.isin(row, torch.tensor(eos_ids, device=row.device))
    if bool(is_eos.any()):
        end = int(is_eos.nonzero()[0]) + 1
        return row[:end], False
    return row, True


@torch.no_grad()
def generate_completions(
    model: torch.nn.Module,
    prompt: PromptBatch,
    settings: SamplingSettings,
    selection: SparseSelection | None = None,
    merge_size: int = 2,
    row_seeds: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sample (or greedily decode) one completion per prompt row.

    Args:
        model: the policy (patched with vitos_ext.patch_model when ``selection`` is given).
        prompt: left-padded prompts on the model's device.
        settings: sampling settings.
        selection: visual tokens to keep per row (token-sparse rollouts) or None.
        merge_size: the vision tower's spatial merge size (to cut the keep mask per generation chunk).
        row_seeds: int64 [B], one seed per row: sample with :class:`RowSeededSampler` (each row from its own
            stream, independent of batching) instead of the global torch generator. Ignored when not sampling.

    Returns:
        (list of B int64 CPU tensors [n_i] ending with the end-of-turn token unless truncated, bool [B] truncated).
    """
    eos_ids, suppress_ids = special_token_ids(model)
    row_seeded = row_seeds is not None and settings.do_sample
    if row_seeded and (row_seeds.dim() != 1 or row_seeds.shape[0] != prompt.size):
        raise ValueError(f"row_seeds must be int64 [{prompt.size}] (one per prompt row), got {tuple(row_seeds.shape)}")
    config = _generation_config(model, settings, eos_ids, suppress_ids, row_seeded)
    chunk = settings.batch_size or prompt.size
    counts = visual_token_counts(prompt.image_grid_thw, merge_size) if selection is not None else None
    completions, truncated = [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, prompt.size, chunk):
            rows = torch.arange(start, min(start + chunk, prompt.size))
            part = prompt.select(rows) if chunk < prompt.size else prompt
            kwargs = {}
            if selection is not None:
                keep = image_segments(selection.keep, counts, rows) if chunk < prompt.size else selection.keep
                kwargs = SparseSelection(keep, selection.fuse).model_kwargs()
            if row_seeded:
                sampler = RowSeededSampler(row_seeds[rows].to(torch.int64), settings.temperature, settings.top_k,
                                           settings.top_p)
                kwargs["logits_processor"] = LogitsProcessorList([sampler])
            output = model.generate(**part.model_inputs(), generation_config=config, **kwargs)
            new_tokens = output[:, part.input_ids.shape[1]:].cpu()
            for row in new_tokens:
                tokens, cut = _cut_at_eos(row, eos_ids)
                completions.append(tokens if tokens.numel() else row[:1])
                truncated.append(cut)
    finally:
        model.train(was_training)
    return completions, torch.tensor(truncated, dtype=torch.bool)


def decode_completions(tokenizer, completions: list[torch.Tensor]) -> list[str]:
    """Decode completions without special tokens (the contract tags are ordinary tokens and stay)."""
    return tokenizer.batch_decode([c.tolist() for c in completions], skip_special_tokens=True)


def parse_boxes(texts: list[str], grid_thw: torch.Tensor, patch_size: int) -> list[list[list[float]]]:
    """Normalized boxes parsed from each completion; Qwen ``bbox_2d`` pixels are normalized by the image the
    model saw (grid * patch size)."""
    boxes = []
    for text, (_, h, w) in zip(texts, grid_thw.tolist()):
        boxes.append(parse_output(text, image_size=(w * patch_size, h * patch_size)).boxes)
    return boxes


def make_rollouts(
    branch: str,
    tokenizer,
    prompt: PromptBatch,
    completions: list[torch.Tensor],
    truncated: torch.Tensor,
    group_ids: torch.Tensor,
    example_ids: list[int],
    parent: torch.Tensor,
    selection: SparseSelection | None,
    kept_ratio: torch.Tensor,
    patch_size: int,
    merge_size: int,
    row_offset: int = 0,
) -> Rollouts:
    """Assemble :class:`Rollouts` from generated completions (decodes and parses them)."""
    texts = decode_completions(tokenizer, completions)
    sequences = build_sequences(prompt, completions, int(tokenizer.pad_token_id))
    rollouts = Rollouts(
        branch=branch,
        sequences=sequences,
        texts=texts,
        group_ids=group_ids,
        example_ids=example_ids,
        parent=parent,
        truncated=truncated,
        boxes=parse_boxes(texts, prompt.image_grid_thw, patch_size),
        selection=selection,
        kept_ratio=kept_ratio,
        merge_size=merge_size,
        row_offset=row_offset,
    )
    return rollouts


def vision_geometry(model: torch.nn.Module) -> tuple[int, int]:
    """(patch_size, spatial_merge_size) of a Qwen-VL style model's vision tower, from its config."""
    vision = getattr(model.config, "vision_config", None)
    patch = getattr(vision, "patch_size", None)
    merge = getattr(vision, "spatial_merge_size", None)
    if patch is None or merge is None:
        raise ValueError(f"{type(model).__name__}: config.vision_config needs patch_size and spatial_merge_size "
                         "(the trainer supports Qwen2-VL / Qwen2.5-VL / Qwen3-VL style models)")
    return int(patch), int(merge)
