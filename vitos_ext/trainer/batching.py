"""Tensor batches of the trainer: encoded prompts (text + image), prompt + completion sequences, row selection.

Examples are run through the processor and the results kept in a bounded cache (:class:`PromptEncoder`), then rows
are collated by hand: prompts are LEFT-padded (what generate() needs), completions RIGHT-padded after them, which is
also the layout TRL and verl use for the training forward.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from .data import TrainingExample, build_prompt_text

__all__ = ["EncodedPrompt", "PromptBatch", "SequenceBatch", "PromptEncoder", "DEFAULT_PROMPT_CACHE_BYTES",
           "collate_prompts", "build_sequences", "concat_prompt_batches", "concat_sequence_batches"]


@dataclass
class EncodedPrompt:
    """One processed prompt: input_ids / mm_token_type_ids int64 [L], pixel_values float [n_patches, D],
    image_grid_thw int64 [1, 3]."""

    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Host memory of the four tensors."""
        return sum(t.numel() * t.element_size() for t in (self.input_ids, self.mm_token_type_ids, self.pixel_values,
                                                           self.image_grid_thw))


# default size of PromptEncoder's cache: every prompt of the tiny-phantom preset (~1.4 GB of 112 px scans) fits; a
# Qwen2.5-VL prompt with a 1008 x 1008 image holds ~24 MB of float32 pixel_values, so ~85 of those do
DEFAULT_PROMPT_CACHE_BYTES = 2 * 2**30


@dataclass
class PromptBatch:
    """Left-padded prompts with one image per row.

    Attributes:
        input_ids: int64 [B, Lp]; attention_mask: int64 [B, Lp] (0 at left padding);
        mm_token_type_ids: int64 [B, Lp] (1 at image tokens); pixel_values: float [sum of patches, D] in row order;
        image_grid_thw: int64 [B, 3]; patch_counts: list of B ints (pixel_values rows per image).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    patch_counts: list[int]

    @property
    def size(self) -> int:
        """Number of rows B."""
        return self.input_ids.shape[0]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model's forward()/generate()."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids,
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
        }

    def select(self, rows: torch.Tensor | list[int]) -> "PromptBatch":
        """The rows ``rows`` (int64 [R], repeats allowed) with their images, as a new batch (left padding kept)."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        starts = torch.tensor([0, *self.patch_counts], dtype=torch.int64).cumsum(0)
        chunks = [self.pixel_values[int(starts[r]):int(starts[r + 1])] for r in rows.tolist()]
        pixel_values = torch.cat(chunks) if chunks else self.pixel_values[:0]
        batch = PromptBatch(
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            mm_token_type_ids=self.mm_token_type_ids[rows],
            pixel_values=pixel_values,
            image_grid_thw=self.image_grid_thw[rows],
            patch_counts=[self.patch_counts[r] for r in rows.tolist()],
        )
        return batch.trim_padding()

    def trim_padding(self) -> "PromptBatch":
        """Drop leading columns that are padding in every row."""
        if self.size == 0:
            return self
        used = self.attention_mask.bool().any(0)
        first = int(used.nonzero()[0]) if bool(used.any()) else self.input_ids.shape[1]
        if first == 0:
            return self
        return replace(self, input_ids=self.input_ids[:, first:], attention_mask=self.attention_mask[:, first:],
                       mm_token_type_ids=self.mm_token_type_ids[:, first:])

    def to(self, device: torch.device | str) -> "PromptBatch":
        """The batch on ``device``."""
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       mm_token_type_ids=self.mm_token_type_ids.to(device),
                       pixel_values=self.pixel_values.to(device), image_grid_thw=self.image_grid_thw.to(device))


class PromptEncoder:
    """Runs the processor on examples (prompt text + image) and caches the tensors by a key, least recently used
    first out once the cache holds ``cache_bytes``.

    Args:
        processor: a Qwen2-VL / Qwen2.5-VL style processor (text + images -> input_ids with expanded image tokens,
            pixel_values, image_grid_thw).
        system_prompt: optional system message for every prompt.
        cache_bytes: most host memory the cached tensors may take (0: no cache). A dataset of real scans does not
            fit in memory as processed pixels, so the bound matters beyond toy sizes.
    """

    def __init__(self, processor, system_prompt: str | None = None,
                 cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES):
        if not isinstance(cache_bytes, int) or isinstance(cache_bytes, bool) or cache_bytes < 0:
            raise ValueError(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
        self.processor = processor
        self.system_prompt = system_prompt
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None or tokenizer.pad_token_id is None:
            raise ValueError("processor.tokenizer must have a pad token (pad_token_id is None)")
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.image_token_id = _token_id(processor, "image_token", "<|image_pad|>")
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[object, EncodedPrompt] = OrderedDict()
        self._cached_bytes = 0

    def encode(self, example: TrainingExample, key: object | None = None) -> EncodedPrompt:
        """Process one example (cached under ``key`` when given)."""
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        text = build_prompt_text(self.processor, example.sample, self.system_prompt)
        out = self.processor(text=[text], images=[[example.image]], return_tensors="pt")
        input_ids = out["input_ids"][0]
        mm = out.get("mm_token_type_ids")
        mm = mm[0] if mm is not None else (input_ids == self.image_token_id).long()
        encoded = EncodedPrompt(input_ids, mm, out["pixel_values"], out["image_grid_thw"])
        if key is not None:
            self._remember(key, encoded)
        return encoded

    @property
    def cached_bytes(self) -> int:
        """Host memory the cached prompts take now."""
        return self._cached_bytes

    def _remember(self, key: object, encoded: EncodedPrompt) -> None:
        size = encoded.nbytes
        if size > self.cache_bytes:
            return
        while self._cached_bytes + size > self.cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.nbytes
        self._cache[key] = encoded
        self._cached_bytes += size

    def batch(self, examples: list[TrainingExample], keys: list[object] | None = None) -> PromptBatch:
        """Encode (or fetch) and left-pad a list of examples into a :class:`PromptBatch`."""
        keys = keys if keys is not None else [None] * len(examples)
        return collate_prompts([self.encode(e, k) for e, k in zip(examples, keys)], self.pad_token_id)


def _token_id(processor, attribute: str, default: str) -> int:
    token = getattr(processor, attribute, None) or default
    return int(processor.tokenizer.convert_tokens_to_ids(token))


def collate_prompts(prompts: list[EncodedPrompt], pad_token_id: int) -> PromptBatch:
    """Left-pad encoded prompts into a batch (images concatenated in row order)."""
    if not prompts:
        raise ValueError("prompts must not be empty")
    length = max(p.input_ids.shape[0] for p in prompts)
    batch = len(prompts)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros(batch, length, dtype=torch.int64)
    mm = torch.zeros(batch, length, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        n = prompt.input_ids.shape[0]
        input_ids[row, length - n:] = prompt.input_ids
        attention_mask[row, length - n:] = 1
        mm[row, length - n:] = prompt.mm_token_type_ids
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=mm,
        pixel_values=torch.cat([p.pixel_values for p in prompts]),
        image_grid_thw=torch.cat([p.image_grid_thw for p in prompts]),
        patch_counts=[int(p.pixel_values.shape[0]) for p in prompts],
    )


@dataclass
class SequenceBatch:
    """Prompts followed by completions, the input of a training forward.

    Attributes:
        prompt: the left-padded :class:`PromptBatch` [B, Lp].
        completion_ids: int64 [B, C], right-padded with the pad token.
        completion_mask: int64 [B, C], 1 at real completion tokens (including the end-of-turn token).
    """

    prompt: PromptBatch
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """forward() keyword arguments over the concatenated [B, Lp + C] sequence."""
        prompt = self.prompt
        return {
            "input_ids": torch.cat([prompt.input_ids, self.completion_ids], 1),
            "attention_mask": torch.cat([prompt.attention_mask, self.completion_mask.to(prompt.attention_mask.dtype)], 1),
            "mm_token_type_ids": torch.cat([prompt.mm_token_type_ids, torch.zeros_like(self.completion_ids)], 1),
            "pixel_values": prompt.pixel_values,
            "image_grid_thw": prompt.image_grid_thw,
        }

    def select(self, rows: torch.Tensor | list[int]) -> "SequenceBatch":
        """The given rows as a new batch (completion columns trimmed to the longest kept completion)."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        mask = self.completion_mask[rows]
        width = max(int(mask.sum(1).max()) if mask.numel() else 0, 1)
        return SequenceBatch(self.prompt.select(rows), self.completion_ids[rows, :width], mask[:, :width])


def build_sequences(prompt: PromptBatch, completions: list[torch.Tensor], pad_token_id: int) -> SequenceBatch:
    """Right-pad per-row completion token lists (int64 [n_i], n_i >= 1) after a prompt batch."""
    if len(completions) != prompt.size:
        raise ValueError(f"completions has {len(completions)} rows but the prompt batch has {prompt.size}")
    width = max(max((int(c.numel()) for c in completions), default=1), 1)
    ids = torch.full((prompt.size, width), pad_token_id, dtype=torch.int64)
    mask = torch.zeros(prompt.size, width, dtype=torch.int64)
    for row, tokens in enumerate(completions):
        ids[row, :tokens.numel()] = tokens
        mask[row, :tokens.numel()] = 1
    return SequenceBatch(prompt, ids, mask)


def _pad_columns(tensor: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
    missing = width - tensor.shape[1]
    return torch.nn.functional.pad(tensor, (missing, 0) if left else (0, missing), value=value)


def concat_prompt_batches(batches: list[PromptBatch], pad_token_id: int) -> PromptBatch:
    """The rows of several prompt batches as one batch, in order: token tensors [B_i, L_i] -> [sum B_i, max L_i]
    (re-padded on the left with ``pad_token_id`` / 0), pixel_values, image_grid_thw and patch_counts concatenated."""
    if not batches:
        raise ValueError("batches must not be empty")
    width = max(b.input_ids.shape[1] for b in batches)
    stack = lambda name, value: torch.cat([_pad_columns(getattr(b, name), width, value, left=True)  # noqa: E731
                                          for b in batches])
    return PromptBatch(
        input_ids=stack("input_ids", pad_token_id),
        attention_mask=stack("attention_mask", 0),
        mm_token_type_ids=stack("mm_token_type_ids", 0),
        pixel_values=torch.cat([b.pixel_values for b in batches]),
        image_grid_thw=torch.cat([b.image_grid_thw for b in batches]),
        patch_counts=[count for b in batches for count in b.patch_counts],
    )


def concat_sequence_batches(batches: list[SequenceBatch], pad_token_id: int) -> SequenceBatch:
    """The rows of several sequence batches as one batch: prompts as in :func:`concat_prompt_batches`, completion
    ids / mask [B_i, C_i] -> [sum B_i, max C_i] (re-padded on the right with ``pad_token_id`` / 0)."""
    if not batches:
        raise ValueError("batches must not be empty")
    width = max(b.completion_ids.shape[1] for b in batches)
    return SequenceBatch(
        concat_prompt_batches([b.prompt for b in batches], pad_token_id),
        torch.cat([_pad_columns(b.completion_ids, width, pad_token_id, left=False) for b in batches]),
        torch.cat([_pad_columns(b.completion_mask, width, 0, left=False) for b in batches]),
    )
