"""Rewards of both branches, from vitos_ext.rewards, with every term kept separately for logging.

Grounding rollout O_i:   w_f * format + w_iou * IoU + w_p * precision + w_acc * accuracy + w_x * mean_j accuracy(O'_{i,j})
Sparse rollout O'_{i,j}: w_f * format + w_iou * IoU + w_acc * accuracy + w_x * accuracy(O_i)
(the cross terms are vitos_ext.rewards.cross_feedback_rewards). IoU is recall-like (mean over *gold* boxes of the best
IoU with a predicted box), so extra guessed boxes never lower it; the optional box precision term (mean over
*predicted* boxes of the best IoU with a gold box, 0 without boxes) charges for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..parsing import parse_output
from ..rewards import accuracy_reward, box_iou, cross_feedback_rewards, iou_reward
from .config import GroundingRewardWeights, SparseRewardWeights
from .data import TrainingExample

__all__ = ["RewardTerms", "basic_terms", "grounding_rewards", "sparse_rewards", "NonFiniteError"]


_TERM_NAMES = ("format", "iou", "accuracy", "cross", "total", "precision")  # RewardTerms fields, in order


class NonFiniteError(FloatingPointError):
    """A reward, loss or gradient was NaN/inf: training stops and the last good checkpoint is kept."""


@dataclass
class RewardTerms:
    """Per-rollout reward terms, each float32 [N], and their weighted total."""

    format: torch.Tensor
    iou: torch.Tensor
    accuracy: torch.Tensor
    cross: torch.Tensor
    total: torch.Tensor
    precision: torch.Tensor | None = None

    def take(self, rows: torch.Tensor) -> "RewardTerms":
        """The terms of a subset of rollouts (int64 [R])."""
        pick = lambda values: values[rows] if values is not None else None  # noqa: E731
        return RewardTerms(*(pick(getattr(self, name)) for name in _TERM_NAMES))

    @staticmethod
    def concat(parts: list["RewardTerms"]) -> "RewardTerms":
        """The terms of several rollout batches, in order."""
        if not parts:
            raise ValueError("parts must not be empty")
        merged = []
        for name in _TERM_NAMES:
            values = [getattr(part, name) for part in parts]
            merged.append(None if any(v is None for v in values) else torch.cat(values))
        return RewardTerms(*merged)

    def means(self, prefix: str) -> dict[str, float]:
        """Batch means of every term, keys "<prefix>format", ... (for metrics)."""
        names = [name for name in _TERM_NAMES if getattr(self, name) is not None]  # precision is optional
        return {f"{prefix}{name}": float(getattr(self, name).mean()) if getattr(self, name).numel() else 0.0
                for name in names}


def box_precision(pred_boxes: list[list[float]], gold_boxes: list[list[float]]) -> float:
    """Mean over predicted boxes of the best IoU with a gold box (0.0 without predictions or gold boxes)."""
    if not pred_boxes or not gold_boxes:
        return 0.0
    iou = box_iou(torch.tensor(pred_boxes, dtype=torch.float64), torch.tensor(gold_boxes, dtype=torch.float64))
    return float(iou.max(dim=1).values.mean())


def basic_terms(texts: list[str], examples: list[TrainingExample], image_sizes: list[tuple[int, int]]):
    """(format, IoU, accuracy), each float32 [N], of completions against their examples' gold boxes and answer."""
    if not (len(texts) == len(examples) == len(image_sizes)):
        raise ValueError(f"texts, examples and image_sizes must have one entry per rollout; got {len(texts)}, "
                         f"{len(examples)}, {len(image_sizes)}")
    formats, ious, accuracies = [], [], []
    for text, example, size in zip(texts, examples, image_sizes):
        parsed = parse_output(text, image_size=size)
        formats.append(1.0 if parsed.format_ok else 0.0)
        ious.append(iou_reward(parsed.boxes, example.gold_boxes) if example.gold_boxes else 0.0)
        accuracies.append(accuracy_reward(text, example.sample.answer, example.sample.options))
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float32)  # noqa: E731
    return as_tensor(formats), as_tensor(ious), as_tensor(accuracies)


def precision_terms(texts: list[str], examples: list[TrainingExample], image_sizes: list[tuple[int, int]]):
    """Box precision (:func:`box_precision`) of each completion, float32 [N]."""
    values = [box_precision(parse_output(t, image_size=s).boxes, e.gold_boxes)
              for t, e, s in zip(texts, examples, image_sizes)]
    return torch.tensor(values, dtype=torch.float32)


def _check_finite(name: str, terms: RewardTerms) -> None:
    for field in ("format", "iou", "accuracy", "cross", "total", "precision"):
        values = getattr(terms, field)
        if values is None:
            continue
        if not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            raise NonFiniteError(f"{bad} non-finite {name} reward value(s) in the '{field}' term: {values.tolist()}")


def grounding_rewards(
    format_: torch.Tensor,
    iou: torch.Tensor,
    accuracy: torch.Tensor,
    sparse_accuracy: torch.Tensor | None,
    weights: GroundingRewardWeights,
    precision: torch.Tensor | None = None,
) -> RewardTerms:
    """Rewards of the grounding rollouts.

    Args:
        format_, iou, accuracy: float [N] terms of the N grounding rollouts.
        sparse_accuracy: float [N, G'] accuracy of the sparse rollouts of each O_i, or None when no sparse rollouts
            were made (then the cross term is 0 and its weight must be 0).
        weights: the reward weights.
        precision: float [N] box precision, required when weights.precision != 0.

    Returns:
        :class:`RewardTerms` [N]. Raises NonFiniteError on NaN/inf.
    """
    if sparse_accuracy is None:
        if weights.cross != 0:
            raise ValueError("grounding_rewards.cross != 0 needs the sparse rollouts' accuracies")
        cross = torch.zeros_like(accuracy)
    else:
        cross, _ = cross_feedback_rewards(accuracy, sparse_accuracy)
        cross = cross.to(torch.float32)
    total = weights.format * format_ + weights.iou * iou + weights.accuracy * accuracy + weights.cross * cross
    if weights.precision != 0:
        if precision is None:
            raise ValueError("grounding_rewards.precision != 0 needs the box precision term")
        total = total + weights.precision * precision
    terms = RewardTerms(format_, iou, accuracy, cross, total, precision)
    _check_finite("grounding", terms)
    return terms


def sparse_rewards(
    format_: torch.Tensor,
    iou: torch.Tensor,
    accuracy: torch.Tensor,
    grounding_accuracy: torch.Tensor,
    parent: torch.Tensor,
    weights: SparseRewardWeights,
) -> RewardTerms:
    """Rewards of the sparse rollouts.

    Args:
        format_, iou, accuracy: float [M] terms of the M = N * G' sparse rollouts.
        grounding_accuracy: float [N] accuracy of the grounding rollouts.
        parent: int64 [M], the grounding row of each sparse rollout (rows of one parent must be contiguous, G'
            each, as the trainer lays them out).
        weights: the reward weights.

    Returns:
        :class:`RewardTerms` [M]. Raises NonFiniteError on NaN/inf.
    """
    count = grounding_accuracy.shape[0]
    if count == 0 or accuracy.shape[0] % count:
        raise ValueError(f"{accuracy.shape[0]} sparse rollouts cannot be split evenly over {count} grounding rollouts")
    per_parent = accuracy.shape[0] // count
    expected = torch.arange(count).repeat_interleave(per_parent)
    if not torch.equal(parent.cpu(), expected):
        raise ValueError("parent must list each grounding row G' times, contiguously (row-major [N, G'])")
    _, cross = cross_feedback_rewards(grounding_accuracy, accuracy.view(count, per_parent))
    cross = cross.reshape(-1).to(torch.float32)
    total = weights.format * format_ + weights.iou * iou + weights.accuracy * accuracy + weights.cross * cross
    terms = RewardTerms(format_, iou, accuracy, cross, total)
    _check_finite("sparse", terms)
    return terms
