"""ViToS rewards: format, grounding IoU, answer accuracy and dual-stream cross-feedback.

Core functions take one output (or one batch of accuracies) and return plain floats / tensors, so any RL framework
can call them. The ``trl_*`` wrappers have TRL ``GRPOTrainer``'s reward signature
``fn(prompts, completions, **kwargs) -> list[float | None]``: dataset columns arrive as keyword lists (one entry
per completion), here ``answer``, ``bbox``, ``options`` and optionally ``image_size`` (the ``(width, height)`` the
model saw, needed only for Qwen2.5-VL ``bbox_2d`` outputs). TRL treats ``None`` as "not applicable to this sample".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .parsing import extract_choice, normalize_options, parse_output

__all__ = [
    "box_iou",
    "format_reward",
    "iou_reward",
    "accuracy_reward",
    "cross_feedback_rewards",
    "completion_text",
    "trl_format_reward",
    "trl_iou_reward",
    "trl_accuracy_reward",
]


# ----------------------------------------------------------------------------------------------------------------
# boxes


def _as_boxes(boxes, name: str) -> torch.Tensor:
    """[K, 4] float tensor from a tensor, array or (nested) list; a single flat box becomes [1, 4]."""
    if isinstance(boxes, torch.Tensor):
        tensor = boxes
    else:
        try:
            tensor = torch.as_tensor(boxes, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"{name} must be a [K, 4] tensor or a list of [x1, y1, x2, y2]: {error}") from None
    if tensor.dim() == 1 and tensor.numel() == 4:
        tensor = tensor.unsqueeze(0)
    if tensor.numel() == 0:
        return tensor.reshape(0, 4).to(torch.float64)
    if tensor.dim() != 2 or tensor.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [K, 4], got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float64)
    return tensor


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of axis-aligned boxes.

    Args:
        a: float tensor [N, 4], boxes (x1, y1, x2, y2) with x1 <= x2, y1 <= y2 (any consistent unit).
        b: float tensor [M, 4], same layout, same device.

    Returns:
        float tensor [N, M] in [0, 1], dtype of ``torch.promote_types(a.dtype, b.dtype)``, computed in at least
        float32. Pairs whose union is empty (two zero-area boxes) get 0, never NaN; inverted boxes count as empty.
    """
    for name, boxes in (("a", a), ("b", b)):
        if not isinstance(boxes, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"{name} must have shape [K, 4], got {tuple(boxes.shape)}")
        if not boxes.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got {boxes.dtype}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    compute_dtype = torch.promote_types(out_dtype, torch.float32)
    a, b = a.to(compute_dtype), b.to(compute_dtype)

    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    size = (bottom_right - top_left).clamp(min=0)
    inter = size[..., 0] * size[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=torch.finfo(compute_dtype).tiny), torch.zeros_like(inter))
    return iou.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# per-output rewards


def format_reward(text: str, image_size: Sequence[float] | None = None) -> float:
    """1.0 when ``text`` follows the output contract (:attr:`ParsedOutput.format_ok`), else 0.0."""
    return 1.0 if parse_output(text, image_size=image_size).format_ok else 0.0


def iou_reward(pred_boxes, gt_boxes) -> float:
    """Mean over ground-truth boxes of the best IoU with any predicted box.

    Args:
        pred_boxes: predicted normalized boxes, [P, 4] tensor or list of [x1, y1, x2, y2] (P may be 0; rows with
            non-finite values are ignored), or a model output string (parsed with
            :func:`~vitos_ext.parsing.parse_output`).
        gt_boxes: ground-truth normalized boxes, [G, 4] tensor or list, G >= 1.

    Returns:
        A float in [0, 1]; 0.0 when nothing was predicted.

    Raises:
        ValueError: ``gt_boxes`` is empty or either argument is not [K, 4].
    """
    if isinstance(pred_boxes, str):
        pred_boxes = parse_output(pred_boxes).boxes
    gt = _as_boxes(gt_boxes, "gt_boxes")
    if gt.shape[0] == 0:
        raise ValueError("gt_boxes must contain at least one box")
    if not torch.isfinite(gt).all():
        raise ValueError("gt_boxes must be finite")
    pred = _as_boxes(pred_boxes, "pred_boxes")
    pred = pred[torch.isfinite(pred).all(dim=1)]  # non-finite predictions are invalid boxes, as in the ops
    if pred.shape[0] == 0:
        return 0.0
    iou = box_iou(gt.to(torch.float64), pred.to(device=gt.device, dtype=torch.float64))
    return float(iou.max(dim=1).values.mean())


def _gold_letter(gold: str, options: dict[str, str]) -> str | None:
    if not isinstance(gold, str):
        return None
    return extract_choice(gold, options)


def _answer_text(text: str) -> str | None:
    """The ``<answer>`` content, or the text after any ``</think>`` when the output has no answer tag."""
    parsed = parse_output(text)
    if parsed.answer is not None:
        return parsed.answer
    if not isinstance(text, str):
        return None
    lowered = text.lower()
    cut = lowered.rfind("</think>")
    return text[cut + len("</think>") :] if cut >= 0 else text


def accuracy_reward(text: str, gold: str, options=None) -> float:
    """1.0 when the output's answer picks the gold option, else 0.0.

    The answer is the ``<answer>`` block (or, without one, the text after ``</think>``); it may be a letter in any
    common form or the option text (see :func:`~vitos_ext.parsing.extract_choice`). ``gold`` may be a letter or the
    option text. Without any option letter to compare (free-text questions), normalized exact text match is used.

    Args:
        text: the model output.
        gold: the gold answer, e.g. ``"C"``.
        options: the question's options (dict letter -> text, list, inline string or None).
    """
    try:
        options = normalize_options(options)
    except ValueError:
        options = {}
    answer = _answer_text(text)
    if answer is None:
        return 0.0
    gold_letter = _gold_letter(gold, options)
    if gold_letter is not None:
        return 1.0 if extract_choice(answer, options) == gold_letter else 0.0
    normalize = lambda s: " ".join(str(s).lower().split()).strip(" .")  # noqa: E731
    return 1.0 if isinstance(gold, str) and gold.strip() and normalize(answer) == normalize(gold) else 0.0


# ----------------------------------------------------------------------------------------------------------------
# dual-stream cross-feedback


def cross_feedback_rewards(grounding_acc, sparse_acc) -> tuple[torch.Tensor, torch.Tensor]:
    """ViToS cross-feedback between the grounding and the token-sparse branch.

    Each grounding rollout O_i is followed by G token-sparse rollouts O'_{i,1..G} that answer using only the
    visual tokens inside O_i's boxes. Good evidence is evidence the sparse branch can answer from, and a sparse
    answer is worth as much as the grounding it relied on:

        grounding reward_i      = mean_j sparse_acc[i, j]
        sparse reward_{i, j}    = grounding_acc[i]

    Args:
        grounding_acc: [N] accuracies (0/1 or in [0, 1]) of the grounding rollouts, tensor or list.
        sparse_acc: [N, G] accuracies of the sparse rollouts, G >= 1; row i belongs to O_i.

    Returns:
        (grounding_reward [N], sparse_reward [N, G]), float tensors (float32 unless an input is float64) on the
        device of ``sparse_acc``.
    """
    grounding = torch.as_tensor(grounding_acc)
    sparse = torch.as_tensor(sparse_acc)
    if grounding.dim() != 1:
        raise ValueError(f"grounding_acc must have shape [N], got {tuple(grounding.shape)}")
    if sparse.dim() != 2 or sparse.shape[1] == 0:
        raise ValueError(f"sparse_acc must have shape [N, G] with G >= 1, got {tuple(sparse.shape)}")
    if sparse.shape[0] != grounding.shape[0]:
        raise ValueError(
            f"sparse_acc has {sparse.shape[0]} rows but grounding_acc has {grounding.shape[0]} entries; they must match"
        )
    dtype = torch.promote_types(torch.promote_types(grounding.dtype, sparse.dtype), torch.float32)
    grounding = grounding.to(device=sparse.device, dtype=dtype)
    sparse = sparse.to(dtype)
    return sparse.mean(dim=1), grounding[:, None].expand_as(sparse).clone()


# ----------------------------------------------------------------------------------------------------------------
# TRL GRPOTrainer wrappers


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type", "text") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return ""


def completion_text(completion) -> str:
    """Text of one TRL completion: a string, or a conversational list of ``{"role", "content"}`` messages.

    For conversations the assistant messages are concatenated; ``content`` may be a string or a list of
    ``{"type": "text", "text": ...}`` parts (non-text parts are skipped).
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content_text(completion.get("content", ""))
    if isinstance(completion, Sequence):
        messages = [m for m in completion if isinstance(m, Mapping)]
        assistant = [m for m in messages if m.get("role", "assistant") == "assistant"] or messages
        return "".join(_content_text(m.get("content", "")) for m in assistant)
    return ""


def _column(kwargs: dict, name: str, count: int, required: bool) -> list:
    values = kwargs.get(name)
    if values is None:
        if required:
            raise ValueError(f"this reward needs the dataset column {name!r} (passed by TRL as a keyword argument)")
        return [None] * count
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
        raise ValueError(f"{name} must be a list with one entry per completion")
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries but there are {count} completions")
    return values


def _image_size(value):
    if value is None:
        return None
    if isinstance(value, Mapping):
        return value.get("width"), value.get("height")
    return value


def trl_format_reward(prompts, completions, **kwargs) -> list[float]:
    """TRL reward: 1.0 per completion that follows the output contract, else 0.0.

    Optional column ``image_size`` ((width, height) per sample) lets ``bbox_2d`` outputs be normalized.
    """
    sizes = _column(kwargs, "image_size", len(completions), required=False)
    return [format_reward(completion_text(c), image_size=_image_size(s)) for c, s in zip(completions, sizes)]


def trl_iou_reward(prompts, completions, **kwargs) -> list[float | None]:
    """TRL reward: grounding IoU (:func:`iou_reward`) of each completion's boxes against column ``bbox``.

    Samples whose ``bbox`` is missing or empty get None (TRL ignores them for this reward). Optional column
    ``image_size`` normalizes Qwen2.5-VL ``bbox_2d`` outputs.
    """
    gold = _column(kwargs, "bbox", len(completions), required=True)
    sizes = _column(kwargs, "image_size", len(completions), required=False)
    rewards: list[float | None] = []
    for completion, boxes, size in zip(completions, gold, sizes):
        if boxes is None or (hasattr(boxes, "__len__") and len(boxes) == 0):
            rewards.append(None)
            continue
        predicted = parse_output(completion_text(completion), image_size=_image_size(size)).boxes
        rewards.append(iou_reward(predicted, boxes))
    return rewards


def trl_accuracy_reward(prompts, completions, **kwargs) -> list[float | None]:
    """TRL reward: answer accuracy (:func:`accuracy_reward`) against column ``answer``, using column
    ``options`` when present. Samples without a gold answer get None.
    """
    gold = _column(kwargs, "answer", len(completions), required=True)
    options = _column(kwargs, "options", len(completions), required=False)
    rewards: list[float | None] = []
    for completion, answer, opts in zip(completions, gold, options):
        if answer is None or (isinstance(answer, float) and math.isnan(answer)) or not str(answer).strip():
            rewards.append(None)
            continue
        rewards.append(accuracy_reward(completion_text(completion), str(answer), opts))
    return rewards
