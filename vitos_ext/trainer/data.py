"""Training data for the trainer: validated samples with checked images, chat prompts, SFT targets, data order.

Bad samples never crash a run. Rows are validated by :func:`vitos_ext.data.load_vitos_json` (missing image, box
outside [0, 1], missing answer, ...) and, when the trainer gets them, once more here: an image that cannot be
decoded, a sample without gold boxes (the grounding reward needs them) or without an answer is listed in a
:class:`~vitos_ext.data.ValidationReport` with its reason and skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..data import Sample, SampleList, SkippedRow, ValidationReport, load_image, load_vitos_json, validate_row
from ..parsing import format_output

__all__ = [
    "TrainingExample",
    "TrainingData",
    "DataOrder",
    "prepare_training_data",
    "build_prompt_text",
    "gold_completion",
    "jitter_boxes",
]

_IMAGE_PLACEHOLDER = "<image>"


@dataclass
class TrainingExample:
    """One usable training/evaluation sample: the validated :class:`Sample` and its RGB image.

    The image is decoded from ``sample.image_paths[0]`` each time :attr:`image` is read, unless ``preloaded_image``
    holds it (``prepare_training_data(keep_images=True)``): thousands of decoded scans do not fit in host memory (a
    2048 x 2048 radiograph is 12 MB as RGB), and the trainer's prompt cache keeps what it reuses.
    """

    sample: Sample
    preloaded_image: Image.Image | None = None

    @property
    def image(self) -> Image.Image:
        """The RGB image (PIL), decoded now unless preloaded."""
        if self.preloaded_image is not None:
            return self.preloaded_image
        return load_image(self.sample.image_paths[0])

    @property
    def gold_boxes(self) -> list[list[float]]:
        """Normalized gold evidence boxes [[x1, y1, x2, y2], ...]."""
        return self.sample.boxes


@dataclass
class TrainingData:
    """Examples that passed validation plus the report of every skipped row."""

    examples: list[TrainingExample]
    report: ValidationReport

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TrainingExample:
        return self.examples[index]


def _skip(report: ValidationReport, index: int, reason: str, detail: str = "") -> None:
    report.skipped.append(SkippedRow(index, reason, detail))


def _load_examples(samples: Iterable[Sample], report: ValidationReport, require_boxes: bool,
                   keep_images: bool) -> list[TrainingExample]:
    examples = []
    for sample in samples:
        if not sample.answer or not str(sample.answer).strip():
            _skip(report, sample.index, "missing answer")
            continue
        if require_boxes and not sample.boxes:
            _skip(report, sample.index, "missing bbox", "the grounding reward needs gold boxes")
            continue
        if len(sample.image_paths) != 1:
            _skip(report, sample.index, "unsupported image count",
                  f"{len(sample.image_paths)} images; the trainer uses one image per question")
            continue
        try:  # decoded once here so that an unreadable image is reported now, not in the middle of a run
            image = load_image(sample.image_paths[0])
        except (OSError, ValueError, ImportError) as error:
            _skip(report, sample.index, "unreadable image", f"{sample.image_paths[0]}: {error}")
            continue
        examples.append(TrainingExample(sample, image if keep_images else None))
    return examples


def prepare_training_data(
    source: str | os.PathLike | Sequence[dict] | Sequence[Sample],
    image_root: str | os.PathLike | None = None,
    require_boxes: bool = True,
    keep_images: bool = False,
) -> TrainingData:
    """Load and validate training (or held-out) data; bad rows are reported and skipped, never raised.

    Args:
        source: a ViToS JSON file (see DESIGN.md), a list of row dicts in that format, or already validated
            :class:`~vitos_ext.data.Sample` objects.
        image_root: folder relative image paths resolve against (default: the JSON's folder, or the working
            directory for row dicts).
        require_boxes: skip rows without gold boxes (training needs them; evaluation of accuracy alone does not).
        keep_images: hold every decoded image in memory; by default each image is decoded once here (to report
            unreadable ones) and again when the trainer encodes its prompt.

    Returns:
        :class:`TrainingData`; ``report`` lists every skipped row with its reason ("missing image",
        "box outside [0,1]", "missing answer", "unreadable image", ...). Only one-image questions are used.
    """
    if isinstance(source, (str, os.PathLike)):
        samples = load_vitos_json(source, image_root=image_root, require_boxes=require_boxes)
        report = samples.report
    else:
        rows = list(source)
        report = ValidationReport(source="<in-memory rows>", total=len(rows))
        base = Path(image_root) if image_root is not None else Path.cwd()
        samples = SampleList(report=report)
        for index, row in enumerate(rows):
            if isinstance(row, Sample):
                samples.append(row)
                continue
            try:
                samples.append(validate_row(row, index, base, require_boxes=require_boxes))
            except ValueError as error:
                reason, _, detail = str(error).partition(": ")
                _skip(report, index, reason, detail)
    examples = _load_examples(samples, report, require_boxes, keep_images)
    return TrainingData(examples, report)


# ----------------------------------------------------------------------------------------------------------------
# prompts and targets


def build_prompt_text(processor, sample: Sample, system_prompt: str | None = None) -> str:
    """The chat prompt of a one-image question, with the generation prompt appended.

    The ``<image>`` placeholder (if any) is removed from the question and the image is placed before the text, as
    Qwen2.5-VL's chat format does. Options stored only in ``sample.options`` (not inline) are appended as
    ``"A. text"`` lines.

    Args:
        processor: a Qwen-VL style processor with ``apply_chat_template``.
        sample: the validated sample.
        system_prompt: optional system message.

    Returns:
        str, the rendered prompt (tokenize it together with the image through the processor).
    """
    question = sample.question.replace(_IMAGE_PLACEHOLDER, "").strip()
    if sample.options and not all(f"{letter}." in question for letter in sample.options):
        question += "\n" + "\n".join(f"{letter}. {text}" for letter, text in sample.options.items())
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def gold_completion(sample: Sample, eos_token: str, think: str | None = None) -> str:
    """The SFT target: ``format_output(think, gold boxes, answer)`` followed by the end-of-turn token.

    ``think`` defaults to the sample's ``think`` field (the phantom generator writes one), else a generic sentence.
    """
    reasoning = think if think is not None else str(sample.extra.get("think") or "The evidence is in the box.")
    return format_output(reasoning, sample.boxes, sample.answer) + eos_token


# ----------------------------------------------------------------------------------------------------------------
# data order


class DataOrder:
    """Seeded, resumable order over a dataset: a fresh permutation per epoch, drawn from (seed, epoch) only.

    The state (epoch, position) is all a checkpoint needs to continue the exact same sequence of batches.
    """

    def __init__(self, size: int, seed: int, epoch: int = 0, position: int = 0):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int (the dataset is empty?), got {size!r}")
        self.size, self.seed = size, int(seed)
        self.epoch, self.position = int(epoch), int(position)
        self._permutation = self._permute(self.epoch)

    def _permute(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def next_indices(self, count: int) -> list[int]:
        """The next ``count`` dataset indices (crossing into a new epoch when this one runs out)."""
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive int, got {count!r}")
        indices = []
        while len(indices) < count:
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._permutation = self._permute(self.epoch)
            take = min(count - len(indices), self.size - self.position)
            indices.extend(self._permutation[self.position:self.position + take])
            self.position += take
        return indices

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "position", "seed", "size"}."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a state from :meth:`state_dict` (the dataset size must match)."""
        if int(state["size"]) != self.size:
            raise ValueError(f"checkpoint data order is for {state['size']} samples but the dataset has {self.size}")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._permutation = self._permute(self.epoch)


def jitter_boxes(boxes: list[list[float]], amount: float, generator: torch.Generator) -> list[list[float]]:
    """Randomly moved and resized copies of normalized boxes (augmentation of the token-sparse SFT view, so that the
    sparse branch learns to answer from imperfect boxes like the ones it will get from the grounding branch).

    Each box's centre moves by up to ``amount`` times its width / height, and its width / height are scaled by a
    factor in [1 - amount, 1 + amount]; the result is clipped to [0, 1]. A box that would become empty is kept.

    Args:
        boxes: [[x1, y1, x2, y2], ...] normalized.
        amount: jitter strength in [0, 1]; 0 returns the boxes unchanged.
        generator: torch.Generator for the draws (4 uniforms per box).

    Returns:
        A new list of boxes.
    """
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be in [0, 1], got {amount!r}")
    if amount == 0:
        return [list(box) for box in boxes]
    jittered = []
    for x1, y1, x2, y2 in boxes:
        shift_x, shift_y, scale_x, scale_y = (2 * torch.rand(4, generator=generator, dtype=torch.float64) - 1).tolist()
        width, height = x2 - x1, y2 - y1
        cx, cy = (x1 + x2) / 2 + shift_x * amount * width, (y1 + y2) / 2 + shift_y * amount * height
        half_w, half_h = width * (1 + scale_x * amount) / 2, height * (1 + scale_y * amount) / 2
        box = [min(max(v, 0.0), 1.0) for v in (cx - half_w, cy - half_h, cx + half_w, cy + half_h)]
        jittered.append(box if box[2] > box[0] and box[3] > box[1] else [x1, y1, x2, y2])
    return jittered

