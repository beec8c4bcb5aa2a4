"""Held-out evaluation of both ViToS passes: grounding with all visual tokens, then answering with the kept ones.

Pass 1 (full tokens, greedy): IoU of the predicted boxes, accuracy, format. Pass 2 (greedy): the same question with
only the visual tokens inside pass 1's boxes: accuracy and the kept ratio of visual tokens (the two-pass pipeline
ViToS deploys).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .batching import PromptEncoder
from .data import TrainingExample
from .rollout import SamplingSettings, decode_completions, generate_completions, parse_boxes, sparse_selection
from .rollout import vision_geometry
from .scoring import basic_terms

__all__ = ["EvalResult", "evaluate_policy", "format_eval_table"]


@dataclass
class EvalResult:
    """Held-out metrics (means over samples; kept_ratio is the mean per-sample kept fraction of visual tokens)."""

    num_samples: int
    iou: float
    accuracy_full: float
    format_full: float
    accuracy_sparse: float
    format_sparse: float
    kept_ratio: float
    seconds: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat dict with prefixed keys."""
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


@torch.no_grad()
def evaluate_policy(
    model: torch.nn.Module,
    encoder: PromptEncoder,
    examples: list[TrainingExample],
    batch_size: int = 32,
    max_new_tokens: int = 96,
    dilate: int = 0,
    fuse: bool = False,
    no_box_policy: str = "no_visual_tokens",
    cache_keys: list[object] | None = None,
) -> EvalResult:
    """Greedy two-pass evaluation of a patched policy on held-out examples.

    Args:
        model: the patched policy (vitos_ext.patch_model).
        encoder: prompt encoder (its cache is reused across evaluations when cache_keys are given).
        examples: held-out examples with gold boxes and answers.
        batch_size: rows per generate() call.
        max_new_tokens: generation budget of both passes.
        dilate, fuse, no_box_policy: token selection of pass 2 (see rollout.sparse_selection).
        cache_keys: keys for the encoder's cache, one per example.

    Returns:
        :class:`EvalResult`.
    """
    if not examples:
        raise ValueError("examples must not be empty")
    started = time.perf_counter()
    patch_size, merge_size = vision_geometry(model)
    tokenizer = encoder.processor.tokenizer
    device = next(model.parameters()).device
    settings = SamplingSettings(max_new_tokens=max_new_tokens, do_sample=False, batch_size=batch_size)
    keys = cache_keys if cache_keys is not None else [None] * len(examples)
    full_terms, sparse_terms, ratios = [], [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompt = encoder.batch(chunk, keys[start:start + batch_size]).to(device)
        sizes = [(w * patch_size, h * patch_size) for _, h, w in prompt.image_grid_thw.tolist()]
        completions, _ = generate_completions(model, prompt, settings, merge_size=merge_size)
        texts = decode_completions(tokenizer, completions)
        full_terms.append(basic_terms(texts, chunk, sizes))
        boxes = parse_boxes(texts, prompt.image_grid_thw, patch_size)
        selection, kept = sparse_selection(boxes, prompt.image_grid_thw.cpu(), merge_size, dilate, fuse,
                                           no_box_policy)
        selection.keep = selection.keep.to(device)
        sparse_completions, _ = generate_completions(model, prompt, settings, selection, merge_size)
        sparse_terms.append(basic_terms(decode_completions(tokenizer, sparse_completions), chunk, sizes))
        ratios.append(kept)
    mean = lambda parts, i: float(torch.cat([p[i] for p in parts]).mean())  # noqa: E731
    return EvalResult(
        num_samples=len(examples),
        iou=mean(full_terms, 1),
        accuracy_full=mean(full_terms, 2),
        format_full=mean(full_terms, 0),
        accuracy_sparse=mean(sparse_terms, 2),
        format_sparse=mean(sparse_terms, 0),
        kept_ratio=float(torch.cat(ratios).mean()),
        seconds=time.perf_counter() - started,
    )


def format_eval_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table of evaluation results keyed by checkpoint label ("after SFT", "after stage 1", ...)."""
    header = ("| checkpoint | IoU | accuracy (full tokens) | accuracy (sparse tokens) | kept visual tokens "
              "| format (full) | samples |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for label, result in results.items():
        lines.append(
            f"| {label} | {result['iou']:.3f} | {result['accuracy_full']:.3f} | {result['accuracy_sparse']:.3f} "
            f"| {100 * result['kept_ratio']:.1f}% | {result['format_full']:.3f} | {result['num_samples']} |"
        )
    return "\n".join(lines)
