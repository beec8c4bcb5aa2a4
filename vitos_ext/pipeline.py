"""ViToSPipeline: two-pass token-sparse answering -- ground the evidence as boxes, then answer from it alone.

    pipe = vitos_ext.ViToSPipeline(model, processor)     # patches the model (vitos_ext.patch_model) if needed
    result = pipe(image, "Which lesion is shown?\\nA. cyst\\nB. nodule")
    result.answer, result.choice, result.boxes, result.kept_ratio, result.timings_ms
    results = pipe([image_a, [image_b, image_c]], [question_a, question_bc])   # batched, 1..n images per sample

Pass 1 (grounding) sees every visual token and is asked for the ViToS output contract
``<think>...</think><box>[[x1,y1,x2,y2], ...]</box><answer>...</answer>`` (normalized coordinates). Qwen2.5-VL's
native ``{"bbox_2d": [...]}`` in pixels of the resized image, and Qwen3-VL's bbox_2d on its 0..1000 grid, are read
as well. Pass 2 (answering) runs the answer prompt keeping only the visual tokens inside those boxes: they are
dropped once at prefill (the KV cache holds only kept tokens; kept tokens keep their M-RoPE positions).

The vision tower runs once per image: its output (vitos_ext.encode_images) serves both prefills through
``vitos_image_features``. A sample's boxes apply to each of its images (the contract names no image). An image
without a valid box keeps all its tokens and the result says so (flag ``"no_boxes"``, ``full_token_images``);
a sample is never pruned to nothing. Every stage is timed (CUDA-synchronized wall clock) and wrapped in an NVTX
range ``vitos.pipeline.<stage>``.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data.images import load_image, to_rgb_image
from .models import adapter_for
from .parsing import extract_choice, normalize_options, parse_output, split_inline_options
from .patching import encode_images, execution_device, inner_model, is_patched, patch_model
from .profiling import nvtx_range
from .sparsity import keep_mask_from_boxes

__all__ = [
    "DEFAULT_GROUNDING_PROMPT",
    "PIPELINE_STAGES",
    "PipelineFlags",
    "ViToSPipeline",
    "ViToSResult",
]

# The instruction of both passes. ViToS trains the token-sparse branch on the same prompt as the grounding branch,
# so pass 2 also answers in the contract and its answer is read from <answer>.
DEFAULT_GROUNDING_PROMPT = (
    "{question}\n"
    "Think first, then find the evidence regions as boxes and answer. Output format: "
    "<think>...</think><box>[[x1,y1,x2,y2], ...]</box><answer>...</answer> with box coordinates normalized to "
    "[0, 1] of the image. If options are given, answer with only the option letter."
)

PIPELINE_STAGES = ("preprocess", "vision", "pass1_prefill", "pass1_decode", "parse", "pass2_prefill",
                   "pass2_decode")

_IMAGE_PLACEHOLDER = "<image>"
_CONTRACT_BLOCK = re.compile(r"<(think|box)>.*?(?:</\1>|$)", re.IGNORECASE | re.DOTALL)
_CONTRACT_TAG = re.compile(r"</?(?:think|box|answer)>", re.IGNORECASE)
# Qwen3-VL writes bbox_2d on a 0..1000 grid whatever the image size (Qwen2-VL / Qwen2.5-VL: resized-image pixels)
_RELATIVE_BBOX_FAMILIES = {"qwen3_vl": (1000.0, 1000.0)}


class PipelineFlags:
    """What a :class:`ViToSResult` may report in ``flags`` (plain strings, JSON friendly)."""

    NO_BOXES = "no_boxes"  # an image got no valid box from pass 1: it kept all its visual tokens
    BBOX_2D = "bbox_2d"  # pass 1 wrote bbox_2d boxes (absolute / 0..1000); they were normalized
    GROUNDING_FORMAT = "grounding_format_error"  # pass 1 did not follow the contract exactly (see problems)
    BOXES_GIVEN = "boxes_given"  # boxes were passed in: pass 1 was skipped
    SHARED_BOXES = "boxes_shared_across_images"  # several images: the sample's boxes applied to each of them
    PASS1_TRUNCATED = "pass1_truncated"  # pass 1 hit max_new_tokens before an end-of-turn token
    PASS2_TRUNCATED = "pass2_truncated"
    NO_ANSWER_TAG = "no_answer_tag"  # pass 2 wrote no <answer> block: the answer is its text without tags


@dataclass
class ViToSResult:
    """The two-pass result of one sample.

    Attributes:
        question: the question as given.
        answer: pass 2's answer: its ``<answer>`` block, else its text without contract tags.
        choice: the option letter ``answer`` picks (options given, or inline in the question), else None.
        boxes: per image of the sample, the normalized ``[x1, y1, x2, y2]`` boxes that selected its tokens.
        kept_ratio: kept / all visual tokens of the sample in pass 2.
        image_kept_ratios: the same per image.
        kept_tokens / visual_tokens: visual-token counts of the sample (after / before pruning).
        grounding_text: pass 1's decoded output (None when boxes were given).
        grounding_answer / grounding_choice: pass 1's own answer (all visual tokens) and its letter.
        answer_text: pass 2's decoded output.
        flags: :class:`PipelineFlags` values that apply.
        problems: why pass 1's output broke the contract (from vitos_ext.parsing.parse_output).
        full_token_images: indices (within the sample) of images that kept all tokens for lack of a valid box.
        timings_ms: wall time per stage of the batch this sample ran in (:data:`PIPELINE_STAGES` + "total").
        batch_size: samples in that batch.
        image_sizes: per image, (width, height) in pixels as the model saw it (after the processor's resize).
        token_grids: per image, (t, H, W) visual-token grid.
        keep_masks: per image, bool CPU tensor [t * H * W] of kept visual tokens (row-major over the grid).
    """

    question: str
    answer: str
    choice: str | None
    boxes: list[list[list[float]]]
    kept_ratio: float
    image_kept_ratios: list[float]
    kept_tokens: int
    visual_tokens: int
    grounding_text: str | None
    grounding_answer: str | None
    grounding_choice: str | None
    answer_text: str
    flags: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    full_token_images: list[int] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    token_grids: list[tuple[int, int, int]] = field(default_factory=list)
    keep_masks: list[torch.Tensor] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (keep masks reduced to kept counts per image)."""
        out = {k: v for k, v in self.__dict__.items() if k != "keep_masks"}
        out["flags"], out["problems"] = list(self.flags), list(self.problems)
        out["image_kept_tokens"] = [int(mask.sum()) for mask in self.keep_masks]
        return out


@dataclass
class _Sample:
    question: str
    images: list[Image.Image]
    options: dict[str, str]
    boxes: list[list[float]] | None  # given boxes (pass 1 skipped), normalized


# ----------------------------------------------------------------------------------------------------------------
# timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StageClock:
    """Wall time of named stages in ms, synchronizing the device around each so GPU work is counted where it runs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ms: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str):
        _synchronize(self.device)
        start = time.perf_counter()
        with nvtx_range(f"vitos.pipeline.{name}"):
            yield
            _synchronize(self.device)
        self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3

    @contextlib.contextmanager
    def generation(self, model: torch.nn.Module, prefix: str):
        """Time one generate() as ``{prefix}_prefill`` (start to the end of the first forward, the prompt pass)
        and ``{prefix}_decode`` (the rest), with an NVTX range for each."""
        marks: dict[str, float] = {}
        ranges: list[Any] = []

        def open_range(name: str) -> None:
            ranges.append(nvtx_range(f"vitos.pipeline.{name}"))
            ranges[-1].__enter__()

        def close_range() -> None:
            if ranges:
                ranges.pop().__exit__(None, None, None)

        def after_forward(module, args, output):
            if "prefill" not in marks:
                _synchronize(self.device)
                marks["prefill"] = time.perf_counter()
                close_range()
                open_range(f"{prefix}_decode")

        _synchronize(self.device)
        start = time.perf_counter()
        open_range(f"{prefix}_prefill")
        handle = model.register_forward_hook(after_forward)
        try:
            yield
            _synchronize(self.device)
        finally:
            handle.remove()
            close_range()
        end = time.perf_counter()
        prefill_end = marks.get("prefill", end)
        self.ms[f"{prefix}_prefill"] = (prefill_end - start) * 1e3
        self.ms[f"{prefix}_decode"] = (end - prefill_end) * 1e3

    def timings(self) -> dict[str, float]:
        out = {name: round(self.ms.get(name, 0.0), 3) for name in PIPELINE_STAGES}
        out["total"] = round((time.perf_counter() - self.started) * 1e3, 3)
        return out


# ----------------------------------------------------------------------------------------------------------------
# input normalization


def _as_image(value: Any, where: str) -> Image.Image:
    """An RGB PIL image from a PIL image, a file path (PNG/JPEG/DICOM) or a numpy array (see to_rgb_image)."""
    if isinstance(value, (str, os.PathLike)):
        return load_image(value)
    if isinstance(value, (Image.Image, np.ndarray)):
        return to_rgb_image(value, where)
    raise TypeError(f"{where} must be a PIL image, a file path or a numpy array, got {type(value).__name__}")


def _image_list(value: Any, where: str) -> list[Image.Image]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f"{where} has no image: every sample needs at least one")
    if len(items) == 1:
        return [_as_image(items[0], where)]
    return [_as_image(item, f"{where}[{j}]") for j, item in enumerate(items)]


def _given_boxes(value: Any, where: str) -> list[list[float]]:
    """Normalized boxes passed by the caller: [[x1, y1, x2, y2], ...] (or a float tensor [n, 4]); may be empty."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{where} must be a list of [x1, y1, x2, y2] boxes, got {type(value).__name__}")
    if len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
        value = [value]  # one flat box
    boxes = []
    for j, box in enumerate(value):
        try:
            coords = [float(v) for v in box]
        except (TypeError, ValueError):
            raise ValueError(f"{where}[{j}] must be 4 numbers, got {box!r}") from None
        if len(coords) != 4 or not all(np.isfinite(coords)) or not all(0.0 <= v <= 1.0 for v in coords):
            raise ValueError(f"{where}[{j}] must be 4 coordinates normalized to [0, 1], got {box!r}")
        if coords[2] < coords[0] or coords[3] < coords[1]:
            raise ValueError(f"{where}[{j}] must have x1 <= x2 and y1 <= y2, got {box!r}")
        boxes.append(coords)
    return boxes


def _per_sample(value: Any, count: int, name: str) -> list[Any]:
    if value is None:
        return [None] * count
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise ValueError(f"{name} must be a list with one entry per question ({count}), got "
                         f"{len(value) if isinstance(value, (list, tuple)) else type(value).__name__}")
    return list(value)


def _samples(images: Any, questions: Any, options: Any, boxes: Any) -> tuple[list[_Sample], bool]:
    """Validate the call's inputs into samples; also says whether the call was a single (unbatched) sample."""
    single = isinstance(questions, str)
    if single:
        questions, images = [questions], [images]
        options = None if options is None else [options]
        boxes = None if boxes is None else [boxes]
    if not isinstance(questions, (list, tuple)) or not questions:
        raise ValueError("questions must be a string or a non-empty list of strings")
    for i, question in enumerate(questions):
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"questions[{i}] must be a non-empty string, got {question!r}")
    if not isinstance(images, (list, tuple)) or len(images) != len(questions):
        got = len(images) if isinstance(images, (list, tuple)) else type(images).__name__
        raise ValueError(f"images must hold one entry (an image or a list of images) per question: "
                         f"{len(questions)} questions, got {got}")
    all_options = _per_sample(options, len(questions), "options")
    all_boxes = _per_sample(boxes, len(questions), "boxes")
    samples = []
    for i, question in enumerate(questions):
        try:
            parsed_options = normalize_options(all_options[i])
        except ValueError as error:
            raise ValueError(f"options[{i}]: {error}") from None
        where = "images" if single else f"images[{i}]"
        given = None if all_boxes[i] is None else _given_boxes(all_boxes[i], "boxes" if single else f"boxes[{i}]")
        samples.append(_Sample(question, _image_list(images[i], where), parsed_options, given))
    if boxes is not None and any(s.boxes is None for s in samples):
        raise ValueError("boxes: give boxes for every sample (an empty list keeps all tokens) or for none")
    return samples, single


# ----------------------------------------------------------------------------------------------------------------
# the pipeline


class ViToSPipeline:
    """Two-pass ViToS inference for a supported VLM: grounding with all visual tokens, answering with the kept ones.

    Args:
        model: a supported *ForConditionalGeneration (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA), or a PEFT model
            wrapping one (the pipeline then runs the wrapped model, whose modules hold the adapters). It is patched in
            place with ``vitos_ext.patch_model(model, attention=attention)`` unless it already is
            (``patched_here`` tells which; ``vitos_ext.unpatch_model`` undoes it).
        processor: its processor (apply_chat_template + text/image call), e.g. from AutoProcessor or
            vitos_ext.tiny.load_vl_processor.
        dilate: grow each kept region by this many tokens in every direction (>= 0).
        fuse: ViToS token fusion: dropped tokens are averaged into the nearest kept one instead of discarded.
        max_new_tokens: generation budget of each pass.
        grounding_prompt: pass-1 user text; ``{question}`` is replaced by the question (+ options lines when options
            are given separately).
        answer_prompt: pass-2 user text, same rules; None = grounding_prompt (one processor call serves both).
        system_prompt: optional system message for both passes.
        batch_size: samples per generate() call (None = all at once).
        attention: patch_model's attention mode when the pipeline patches the model ("auto", "varlen", "model").
        **generate_kwargs: passed to both generate() calls (default greedy: do_sample=False); one sequence per
            sample and pass (no num_beams / num_return_sequences > 1).

    Raises:
        TypeError for an unsupported model (listing the supported ones) or a processor without a tokenizer;
        ValueError for a bad argument, naming it.
    """

    def __init__(self, model: torch.nn.Module, processor: Any, *, dilate: int = 0, fuse: bool = False,
                 max_new_tokens: int = 256, grounding_prompt: str = DEFAULT_GROUNDING_PROMPT,
                 answer_prompt: str | None = None, system_prompt: str | None = None, batch_size: int | None = None,
                 attention: str = "auto", **generate_kwargs: Any):
        model = inner_model(model)  # a PEFT wrapper's LoRA layers live in the wrapped model's modules
        self.adapter = adapter_for(model)
        if not isinstance(dilate, int) or isinstance(dilate, bool) or dilate < 0:
            raise ValueError(f"dilate must be an int >= 0, got {dilate!r}")
        if not isinstance(fuse, bool):
            raise ValueError(f"fuse must be a bool, got {fuse!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        for name, prompt in (("grounding_prompt", grounding_prompt), ("answer_prompt", answer_prompt)):
            if prompt is not None and (not isinstance(prompt, str) or "{question}" not in prompt):
                raise ValueError(f"{name} must be a string containing '{{question}}', got {prompt!r}")
        reserved = sorted(k for k in generate_kwargs if k.startswith("vitos_") or k in ("max_new_tokens", "inputs"))
        if reserved:
            raise ValueError(f"generate_kwargs must not set {reserved}: use the pipeline's own arguments")
        copies = {k: generate_kwargs[k] for k in ("num_beams", "num_return_sequences") if k in generate_kwargs}
        if any(v not in (None, 1) for v in copies.values()):
            # pass 2 reuses pass 1's image features, one copy per sample; generate() would need one per beam
            raise ValueError(f"generate_kwargs {copies}: the pipeline generates one sequence per sample and pass "
                             "(num_beams = num_return_sequences = 1); call the patched model's generate() with "
                             "vitos_boxes for beam search")
        self.tokenizer = getattr(processor, "tokenizer", None)
        if self.tokenizer is None or not hasattr(processor, "apply_chat_template"):
            raise TypeError(f"processor must be a multimodal processor with a tokenizer and a chat template, got "
                            f"{type(processor).__name__}")
        self.patched_here = not is_patched(model)
        if self.patched_here:
            patch_model(model, attention=attention)
        self.model, self.processor = model, processor
        self.dilate, self.fuse, self.max_new_tokens = dilate, fuse, max_new_tokens
        self.grounding_prompt = grounding_prompt
        self.answer_prompt = answer_prompt if answer_prompt is not None else grounding_prompt
        self.system_prompt, self.batch_size = system_prompt, batch_size
        self.generate_kwargs = {"do_sample": False, **generate_kwargs}

    # -- public ------------------------------------------------------------------------------------------------

    def __call__(self, images: Any, questions: str | Sequence[str], *, options: Any = None,
                 boxes: Any = None) -> ViToSResult | list[ViToSResult]:
        """Answer questions about images in two passes.

        Args:
            images: for one question, an image or a list of images; for a list of questions, one such entry per
                question. An image is a PIL image, a file path (PNG/JPEG/DICOM, read with
                vitos_ext.data.load_image) or a numpy array (uint8 [H, W] / [H, W, 3|4], or grayscale [H, W] of
                any bit depth, stretched to 8 bits like 16-bit files; see vitos_ext.data.to_rgb_image).
            questions: a string (one sample) or a list of strings. ``<image>`` placeholders are removed (the
                images are placed before the text, Qwen-VL style). Options may be written inline
                ("A. x" lines) -- then ``choice`` is extracted from them.
            options: per question, options not written in it (dict letter -> text, or a list of texts lettered
                A, B, ...); they are appended to the prompt as "A. text" lines.
            boxes: per question, normalized [[x1, y1, x2, y2], ...] evidence boxes (or a float tensor [n, 4]) to
                use instead of pass 1 (e.g. from a detector); an empty list keeps all tokens.

        Returns:
            A :class:`ViToSResult` for a single question, else a list of them in question order.
        """
        samples, single = _samples(images, questions, options, boxes)
        step = self.batch_size or len(samples)
        results: list[ViToSResult] = []
        for start in range(0, len(samples), step):
            results.extend(self._run_batch(samples[start:start + step]))
        return results[0] if single else results

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (the first stage of a sharded model too; for weights
        offloaded by accelerate, their hook's execution device)."""
        return execution_device(self.model)

    # -- one batch ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _run_batch(self, samples: list[_Sample]) -> list[ViToSResult]:
        clock = _StageClock(self.device)
        with clock.stage("preprocess"):
            pass1_inputs, pass2_inputs = self._prepare(samples)
        with clock.stage("vision"):
            features = encode_images(self.model, pass1_inputs["pixel_values"], **_image_inputs(pass1_inputs))
        grids, merge = self._token_grids(pass1_inputs, features.num_tokens)
        sizes = self._model_image_sizes(grids)
        grounding_texts, pass1_truncated = [None] * len(samples), [False] * len(samples)
        if samples[0].boxes is None:  # boxes are given for all samples or for none
            with clock.generation(self.model, "pass1"):
                sequences = self._generate(pass1_inputs, features)
            grounding_texts, pass1_truncated = self._decode(sequences, pass1_inputs)
        with clock.stage("parse"):
            selections = [self._select(sample, text, sample_sizes) for sample, text, sample_sizes in
                          zip(samples, grounding_texts, _split_by_sample(sizes, samples))]
            keep = self._keep_mask([b for s in selections for b in s.image_boxes], grids, merge, features.num_tokens)
            kept_per_image = _segment_sums(keep, grids, merge)
        with clock.generation(self.model, "pass2"):
            sequences = self._generate(pass2_inputs, features, keep)
        answer_texts, pass2_truncated = self._decode(sequences, pass2_inputs)

        timings = clock.timings()
        images = [_ImageInfo(size, _token_grid(grid, merge), mask, kept) for size, grid, mask, kept in
                  zip(sizes, grids, _split_mask(keep.cpu(), grids, merge), kept_per_image)]
        results = []
        for i, sample_images in enumerate(_split_by_sample(images, samples)):
            truncated = (pass1_truncated[i], pass2_truncated[i])
            results.append(self._result(samples[i], selections[i], grounding_texts[i], answer_texts[i], truncated,
                                        timings, len(samples), sample_images))
        return results

    # -- stages ------------------------------------------------------------------------------------------------

    def _prompt_text(self, template: str, sample: _Sample) -> str:
        question = sample.question.replace(_IMAGE_PLACEHOLDER, "").strip()
        inline = split_inline_options(question)
        if sample.options and not set(sample.options) <= set(inline):
            question += "\n" + "\n".join(f"{letter}. {text}" for letter, text in sample.options.items())
        content = [{"type": "image"} for _ in sample.images]
        content.append({"type": "text", "text": template.replace("{question}", question)})
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": content})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _prepare(self, samples: list[_Sample]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Model inputs of both passes (one processor call when both passes use the same prompt)."""
        pass1_inputs = self._encode_prompts(samples, self.grounding_prompt)
        if self.answer_prompt == self.grounding_prompt:
            return pass1_inputs, pass1_inputs
        return pass1_inputs, self._encode_prompts(samples, self.answer_prompt)

    def _encode_prompts(self, samples: list[_Sample], template: str) -> dict[str, torch.Tensor]:
        """Left-padded processor outputs on the model's device (pixel_values in the model's dtype)."""
        texts = [self._prompt_text(template, sample) for sample in samples]
        images = [image for sample in samples for image in sample.images]
        with _left_padding(self.tokenizer):
            batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        batch = dict(batch)
        if self.adapter.text_position_row and batch.get("mm_token_type_ids") is None:
            # Qwen-VL in transformers 5.x computes M-RoPE positions at prefill only from mm_token_type_ids
            batch["mm_token_type_ids"] = (batch["input_ids"] == self.adapter.image_token_id(self.model)).long()
        if "pixel_values" not in batch:
            raise ValueError("the processor returned no pixel_values: does its chat template place the images?")
        dtype = self.model.dtype
        return {k: (v.to(self.device, dtype=dtype) if k == "pixel_values" and v.is_floating_point()
                    else v.to(self.device)) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def _token_grids(self, inputs: dict[str, torch.Tensor], num_visual: int) -> tuple[list[list[int]], int]:
        """Per image (t, h, w) in patches (host ints) and the merge size, as the patch prunes them."""
        grid, merge = self.adapter.visual_grid(self.model, {**inputs, "image_sizes": None}, num_visual)
        return grid.tolist(), merge

    def _model_image_sizes(self, grids: list[list[int]]) -> list[tuple[int, int]]:
        """(width, height) in pixels of each image as the model saw it: patches x patch size."""
        patch = int(getattr(self.model.config.vision_config, "patch_size"))
        return [(w * patch, h * patch) for _, h, w in grids]

    def _generate(self, inputs: dict[str, torch.Tensor], features, keep: torch.Tensor | None = None) -> torch.Tensor:
        """One generate() over the batch, reusing the encoded images; returns int64 [B, L + new] sequences."""
        model_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
        kwargs = dict(self.generate_kwargs, max_new_tokens=self.max_new_tokens, vitos_image_features=features)
        if kwargs.get("pad_token_id") is None and self.model.generation_config.pad_token_id is None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        if keep is not None:
            kwargs.update(vitos_keep=keep, vitos_fuse=self.fuse)
        output = self.model.generate(**model_inputs, **kwargs)
        return output.sequences if hasattr(output, "sequences") else output

    def _decode(self, sequences: torch.Tensor, inputs: dict[str, torch.Tensor]) -> tuple[list[str], list[bool]]:
        """Completions as text (special tokens skipped) and whether each ran out of tokens before end of turn."""
        new_tokens = sequences[:, inputs["input_ids"].shape[1]:].cpu()
        eos = self.generate_kwargs.get("eos_token_id", self.model.generation_config.eos_token_id)
        eos_ids = [e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        ended = torch.isin(new_tokens, torch.tensor(eos_ids, dtype=new_tokens.dtype)).any(dim=1)
        texts = self.tokenizer.batch_decode(new_tokens.tolist(), skip_special_tokens=True)
        return texts, [bool(eos_ids) and not bool(e) for e in ended]

    def _select(self, sample: _Sample, text: str | None, image_sizes: list[tuple[int, int]]) -> "_Selection":
        """Per-image normalized boxes of one sample, from the given boxes or from pass 1's output."""
        if sample.boxes is not None:
            return _Selection([list(sample.boxes) for _ in sample.images], None, None, "none", False)
        frame = _RELATIVE_BBOX_FAMILIES.get(self.adapter.name)
        # bbox_2d pixels depend on each image's resized size: parse once per image
        parses = [parse_output(text, image_size=frame or size) for size in image_sizes]
        first = parses[0]
        return _Selection([p.boxes for p in parses], first.answer, first.problems, first.box_syntax,
                          not first.format_ok)

    def _keep_mask(self, image_boxes: list[list[list[float]]], grids: list[list[int]], merge: int,
                   num_visual: int) -> torch.Tensor:
        """bool [num_visual] over the batch's visual tokens (an image without boxes keeps all of its tokens)."""
        device = self.device
        tensors = [torch.tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4) for boxes in image_boxes]
        grid = torch.tensor(grids, dtype=torch.int64, device=device)
        return keep_mask_from_boxes(tensors, grid, merge, self.dilate, num_tokens=num_visual)

    def _result(self, sample: _Sample, selection: "_Selection", grounding_text: str | None, answer_text: str,
                truncated: tuple[bool, bool], timings: dict[str, float], batch_size: int,
                images: list["_ImageInfo"]) -> ViToSResult:
        parsed_answer = parse_output(answer_text).answer
        answer = parsed_answer if parsed_answer else _CONTRACT_TAG.sub(" ", _CONTRACT_BLOCK.sub(" ", answer_text))
        answer = " ".join(answer.split())
        options = sample.options or split_inline_options(sample.question)
        kept = sum(image.kept for image in images)
        visual = sum(image.visual for image in images)
        full_images = [j for j, boxes in enumerate(selection.image_boxes) if not boxes]
        return ViToSResult(
            question=sample.question,
            answer=answer,
            choice=extract_choice(answer, options) if options else None,
            boxes=selection.image_boxes,
            kept_ratio=kept / max(visual, 1),
            image_kept_ratios=[image.kept / max(image.visual, 1) for image in images],
            kept_tokens=kept,
            visual_tokens=visual,
            grounding_text=grounding_text,
            grounding_answer=selection.grounding_answer,
            grounding_choice=(extract_choice(selection.grounding_answer, options)
                              if options and selection.grounding_answer else None),
            answer_text=answer_text,
            flags=_flags(sample, selection, bool(full_images), truncated, bool(parsed_answer)),
            problems=tuple(selection.problems or ()),
            full_token_images=full_images,
            timings_ms=dict(timings),
            batch_size=batch_size,
            image_sizes=[image.size for image in images],
            token_grids=[image.grid for image in images],
            keep_masks=[image.mask for image in images],
        )


def _flags(sample: _Sample, selection: "_Selection", any_full_image: bool, truncated: tuple[bool, bool],
           answer_tagged: bool) -> tuple[str, ...]:
    """The PipelineFlags that apply to one sample, in a fixed order."""
    conditions = [
        (PipelineFlags.BOXES_GIVEN, sample.boxes is not None),
        (PipelineFlags.NO_BOXES, any_full_image),
        (PipelineFlags.BBOX_2D, selection.syntax == "bbox_2d"),
        (PipelineFlags.GROUNDING_FORMAT, selection.format_error),
        (PipelineFlags.SHARED_BOXES, len(sample.images) > 1),
        (PipelineFlags.PASS1_TRUNCATED, truncated[0]),
        (PipelineFlags.PASS2_TRUNCATED, truncated[1]),
        (PipelineFlags.NO_ANSWER_TAG, not answer_tagged),
    ]
    return tuple(flag for flag, applies in conditions if applies)


@dataclass
class _ImageInfo:
    size: tuple[int, int]  # (width, height) px as the model saw it
    grid: tuple[int, int, int]  # (t, H, W) tokens
    mask: torch.Tensor  # bool [t * H * W], CPU
    kept: int

    @property
    def visual(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@dataclass
class _Selection:
    """One sample's evidence: normalized boxes per image, and what pass 1 wrote besides them."""

    image_boxes: list[list[list[float]]]
    grounding_answer: str | None
    problems: tuple[str, ...] | None
    syntax: str  # a vitos_ext.parsing.BoxSyntax value
    format_error: bool


# ----------------------------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def _left_padding(tokenizer):
    """Batched generation needs prompts padded on the left; restore the tokenizer's own setting afterwards."""
    previous = getattr(tokenizer, "padding_side", "left")
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def _image_inputs(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: inputs[k] for k in ("image_grid_thw", "image_sizes") if k in inputs}


def _token_grid(grid: list[int], merge: int) -> tuple[int, int, int]:
    t, h, w = grid
    return int(t), int(h) // merge, int(w) // merge


def _token_counts(grids: list[list[int]], merge: int) -> list[int]:
    return [t * (h // merge) * (w // merge) for t, h, w in grids]


def _segment_sums(keep: torch.Tensor, grids: list[list[int]], merge: int) -> list[int]:
    """Kept tokens per image (one read-back for the whole batch)."""
    counts = _token_counts(grids, merge)
    return [int(s) for s in torch.stack([part.sum() for part in keep.split(counts)]).tolist()]


def _split_mask(keep: torch.Tensor, grids: list[list[int]], merge: int) -> list[torch.Tensor]:
    return list(keep.split(_token_counts(grids, merge)))


def _split_by_sample(values: list, samples: list[_Sample]) -> list[list]:
    out, start = [], 0
    for sample in samples:
        out.append(values[start:start + len(sample.images)])
        start += len(sample.images)
    return out
