"""TRL integration: ViToS rewards with GRPOTrainer's signature, and a token-sparse GRPOTrainer.

    from vitos_ext.integrations.trl import TRL_REWARD_FUNCS, ViToSGRPOTrainer
    trainer = ViToSGRPOTrainer(model=patched_or_plain_vlm, reward_funcs=TRL_REWARD_FUNCS, args=GRPOConfig(...),
                               train_dataset=dataset, processing_class=processor, boxes_column="bbox")
    trainer.train()

Dataset rows are TRL's vision-language rows -- a conversational ``prompt``, an ``image`` (or ``images``) column --
plus ``answer`` / ``options`` / ``bbox`` for the rewards and a boxes column (default ``bbox``) that selects the
visual tokens: normalized ``[[x1, y1, x2, y2], ...]`` applied to every image of the row, or one such list per image.
A row without boxes keeps all of its visual tokens.

Design: :class:`ViToSGRPOTrainer` is ViToS's *token-sparse branch* as a TRL GRPO run. Each prompt carries evidence
boxes (gold ones, or boxes a grounding model produced earlier); the policy generates its G completions with only the
visual tokens inside them (patched generate(): pruned once at prefill, KV cache of kept tokens, original M-RoPE
positions), and the policy-gradient forward (new, old and reference log-probs) sees the same compacted sequence, so
the importance ratios compare like with like. Everything else -- sampling, rewards, group advantages, the clipped
loss, logging -- is TRL's own. Three small overrides carry the boxes: ``_generate_and_score_completions`` reads them
from the rows and stores them with the generation batch (TRL shuffles and splits it, so they travel per row),
``_generate_single_turn`` hands them to generate(), ``_get_per_token_logps_and_entropies`` runs the pruned forward.

Limits versus the reference dual-stream trainer (vitos_ext.trainer): no grounding branch in the same run, no
cross-feedback rewards and no G x G grouping -- TRL's GRPO groups the G completions of one prompt, while ViToS couples
each grounding rollout with G sparse rollouts; use this trainer for stage 2 of the "stages" schedule (sparse branch
from fixed boxes) or to fine-tune answering-from-evidence in an existing TRL setup. The training forward is the
left-padded compacted batch (varlen attention inside with ``attention="auto"`` on CUDA) and materializes logits for
the completion positions ([B, C + 1, V] per chunk) instead of TRL's fused LM head. Not supported: vLLM or
continuous-batching generation, tools / environments, MoE auxiliary losses. PEFT (``peft_config=``) works: the
wrapped model is patched, and the reference (the policy with its adapters disabled) sees the same kept tokens.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import rewards as _rewards
from ..patching import inner_model, is_patched, patch_model
from ..profiling import nvtx_range

try:
    from trl import GRPOTrainer
except ImportError as error:  # pragma: no cover - exercised only without trl installed
    raise ImportError("vitos_ext.integrations.trl needs TRL >= 1.0: pip install 'trl>=1.0' "
                      "(or the vitos_ext[trl] extra)") from error

__all__ = [
    "TRL_REWARD_FUNCS",
    "ViToSGRPOTrainer",
    "completion_logprobs_from_compacted",
    "trl_accuracy_reward",
    "trl_format_reward",
    "trl_iou_reward",
]


# ----------------------------------------------------------------------------------------------------------------
# rewards


def _clean_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Arrow stores a dict column as a struct of every key seen in the dataset: a row with options A-D read from a
    dataset that also has an E option comes back with ``"E": None``. Drop those placeholders."""
    options = kwargs.get("options")
    if isinstance(options, (list, tuple)):
        kwargs = dict(kwargs, options=[{k: v for k, v in o.items() if v is not None} if isinstance(o, Mapping) else o
                                       for o in options])
    return kwargs


def trl_format_reward(prompts, completions, **kwargs) -> list[float]:
    """TRL reward: 1.0 per completion that follows the ViToS output contract, else 0.0.

    Args:
        prompts: TRL's prompts (unused).
        completions: strings or conversational ``[{"role": "assistant", "content": ...}]`` lists.
        **kwargs: dataset columns as lists (optional ``image_size`` to normalize ``bbox_2d`` outputs).
    """
    return _rewards.trl_format_reward(prompts, completions, **kwargs)


def trl_iou_reward(prompts, completions, **kwargs) -> list[float | None]:
    """TRL reward: mean over the gold boxes (column ``bbox``) of the best IoU with a predicted box.

    Rows without gold boxes get None (TRL leaves them out of this reward).
    """
    return _rewards.trl_iou_reward(prompts, completions, **kwargs)


def trl_accuracy_reward(prompts, completions, **kwargs) -> list[float | None]:
    """TRL reward: 1.0 when the answer picks the gold option (column ``answer``, options from column ``options``).

    Arrow-padded option structs (missing letters as None) are cleaned first. Rows without an answer get None.
    """
    return _rewards.trl_accuracy_reward(prompts, completions, **_clean_options(kwargs))


TRL_REWARD_FUNCS = [trl_format_reward, trl_iou_reward, trl_accuracy_reward]


# ----------------------------------------------------------------------------------------------------------------
# log-probs of completion tokens from a compacted forward


def completion_logprobs_from_compacted(
    logits: torch.Tensor,
    source_index: torch.Tensor,
    sequence_length: int,
    completion_ids: torch.Tensor,
    temperature: float = 1.0,
    compute_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of completion tokens from a pruned forward.

    The pruned forward ran on the compacted, left-padded batch [B, L'] (model.vitos_last_prefill.source_index maps
    each of its positions back to the [B, L] input); completions are the last C columns of the input and stay the
    rightmost tokens after compaction, so the last K >= C + 1 positions' logits cover them.

    Args:
        logits: float [B, K, V], logits of the last K positions of the compacted sequence.
        source_index: int64 [B, L'], flat index into the [B * L] input of each compacted position (-1 at padding).
        sequence_length: L, the input's length (prompt + completion columns).
        completion_ids: int64 [B, C], the completion tokens (right-padded).
        temperature: logits are divided by it (the sampling temperature, as TRL does).
        compute_entropy: also return the entropy of each predicted distribution.

    Returns:
        (log_probs float32 [B, C], entropies float32 [B, C] or None), 0 where a completion column has no token.
    """
    batch, width = completion_ids.shape
    kept = logits.shape[1]
    column = source_index % sequence_length - (sequence_length - width)  # completion column, < 0 for prompt tokens
    column = column.masked_fill(source_index < 0, -1)[:, -kept:]
    targets = column[:, 1:]  # the logits at position k predict the token at position k + 1
    valid = targets >= 0
    log_probs = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    token_ids = completion_ids.gather(1, targets.clamp_min(0))
    picked = log_probs.gather(-1, token_ids[..., None])[..., 0]
    slot = torch.where(valid, targets, torch.full_like(targets, width))  # invalid positions go to a scratch column

    def place(values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros(batch, width + 1).scatter(1, slot, values.masked_fill(~valid, 0.0))
        return out[:, :width]

    entropy = place(-(log_probs.exp() * log_probs).sum(-1)) if compute_entropy else None
    return place(picked), entropy


# ----------------------------------------------------------------------------------------------------------------
# the trainer


def _as_box_tensor(value: Any, where: str) -> torch.Tensor:
    try:
        boxes = torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{where} must be [[x1, y1, x2, y2], ...] normalized boxes: {error}") from None
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    if boxes.dim() == 1 and boxes.numel() == 4:
        boxes = boxes[None]
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where} must have shape [n, 4], got {tuple(boxes.shape)}")
    return boxes


def _depth(value: Any) -> int:
    depth = 0
    while isinstance(value, (list, tuple)) and value:
        value, depth = value[0], depth + 1
    return depth + (value.dim() if isinstance(value, torch.Tensor) else 0)


class ViToSGRPOTrainer(GRPOTrainer):
    """TRL GRPOTrainer for the ViToS token-sparse branch: rollouts and training forward keep only the visual tokens
    inside each row's evidence boxes (see the module docstring for the design and its limits).

    Args:
        model: a supported VLM instance (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA; patched here if needed) or a model
            id / path TRL can load (patched after loading).
        reward_funcs, args, train_dataset, eval_dataset, processing_class, **kwargs: as GRPOTrainer.
        boxes_column: dataset column with each row's boxes (normalized, [n, 4] for every image of the row, or one
            [n_i, 4] list per image). Missing / empty = keep all visual tokens of the row.
        vitos_dilate: grow kept regions by this many tokens (>= 0).
        vitos_fuse: fuse dropped tokens into their nearest kept token (ViToS token fusion) instead of dropping them.
        attention: patch_model's attention mode ("auto": varlen attention where a fast backend exists).

    Raises:
        ValueError for generation backends / features the sparse path does not support, naming them.
    """

    def __init__(self, model, reward_funcs, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 *, boxes_column: str = "bbox", vitos_dilate: int = 0, vitos_fuse: bool = False,
                 attention: str = "auto", **kwargs):
        if not isinstance(boxes_column, str) or not boxes_column:
            raise ValueError(f"boxes_column must be a column name, got {boxes_column!r}")
        if not isinstance(vitos_dilate, int) or isinstance(vitos_dilate, bool) or vitos_dilate < 0:
            raise ValueError(f"vitos_dilate must be an int >= 0, got {vitos_dilate!r}")
        if not isinstance(vitos_fuse, bool):
            raise ValueError(f"vitos_fuse must be a bool, got {vitos_fuse!r}")
        if isinstance(model, torch.nn.Module) and not is_patched(model):
            patch_model(model, attention=attention)
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self._check_supported()
        for target in (self.model, self.ref_model):
            if target is not None and not is_patched(self._patched_instance(target)):
                patch_model(self._patched_instance(target), attention=attention)
        self.boxes_column, self.vitos_dilate, self.vitos_fuse = boxes_column, vitos_dilate, vitos_fuse
        self._vitos_rows: list[Any] | None = None  # boxes of the rows being generated / scored / trained on

    # -- set-up --------------------------------------------------------------------------------------------------

    def _check_supported(self) -> None:
        unsupported = {
            "use_vllm": self.use_vllm,
            "use_transformers_continuous_batching": getattr(self, "use_transformers_continuous_batching", False),
            "tools": bool(getattr(self, "tools", None)),
            "environment_factory": getattr(self, "environment_factories", None) is not None,
            "MoE router aux loss": getattr(self, "aux_loss_enabled", False),
        }
        named = [name for name, used in unsupported.items() if used]
        if named:
            raise ValueError(f"ViToSGRPOTrainer does not support {', '.join(named)}: the token-sparse rollouts use "
                             "the patched model's generate() on one rollout batch")

    def _patched_instance(self, model: torch.nn.Module) -> torch.nn.Module:
        """The *ForConditionalGeneration instance under accelerate / DDP / PEFT wrappers."""
        return inner_model(self.accelerator.unwrap_model(model))

    # -- boxes per row and per image -----------------------------------------------------------------------------

    def _row_boxes(self, inputs: list[dict[str, Any]]) -> list[Any]:
        """Per row: float32 [n, 4] (applies to each of its images) or a list of per-image [n_i, 4] tensors."""
        rows = []
        for i, row in enumerate(inputs):
            value = row.get(self.boxes_column)
            where = f"{self.boxes_column}[{i}]"
            if value is None:
                rows.append(torch.zeros(0, 4))
            elif _depth(value) == 3:
                rows.append([_as_box_tensor(v, f"{where}[{j}]") for j, v in enumerate(value)])
            else:
                rows.append(_as_box_tensor(value, where))
        return rows

    def _image_boxes(self, rows: Sequence[Any], num_images: Sequence[int]) -> list[torch.Tensor]:
        """vitos_boxes for a batch: one [n, 4] tensor per image, in image order, on the model's device."""
        device = self.accelerator.device
        boxes = []
        for row, (value, count) in enumerate(zip(rows, num_images)):
            if isinstance(value, list):
                if len(value) != count:
                    raise ValueError(f"{self.boxes_column}: row {row} has {count} image(s) but {len(value)} box lists")
                boxes.extend(v.to(device) for v in value)
            else:
                boxes.extend([value.to(device)] * count)
        return boxes

    def _sparse_kwargs(self, boxes: list[torch.Tensor]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"vitos_boxes": boxes, "vitos_dilate": self.vitos_dilate}
        if self.vitos_fuse:
            kwargs["vitos_fuse"] = True
        return kwargs

    # -- generation ----------------------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        self._vitos_rows = self._row_boxes(inputs)
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            rows, self._vitos_rows = self._vitos_rows, None
        output["vitos_boxes"] = rows  # a per-row list: TRL shuffles and splits it with the tensors
        return output

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        if self._vitos_rows is None or images is None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, *args,
                                                 **kwargs)
        counts = [len(x) if x else 0 for x in images]
        boxes = self._image_boxes(self._vitos_rows, counts)
        with self._generate_with(self._sparse_kwargs(boxes)), nvtx_range("vitos.trl.sparse_generate"):
            result = super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, *args,
                                                   **kwargs)
        pruned = self._patched_instance(self.model).vitos_last_prefill
        if pruned is not None:
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["vitos/kept_ratio"].append(pruned.kept_ratio)
        return result

    @contextlib.contextmanager
    def _generate_with(self, vitos_kwargs: dict[str, Any]):
        """TRL calls ``unwrapped_model.generate(**inputs, generation_config=...)``: add the vitos_* arguments to that
        one call by binding them to the patched instance's generate for the duration of the rollout."""
        model = self._patched_instance(self.model)
        previous = model.__dict__.get("generate")
        model.__dict__["generate"] = functools.partial(previous or model.generate, **vitos_kwargs)
        try:
            yield
        finally:
            if previous is None:
                model.__dict__.pop("generate", None)
            else:
                model.__dict__["generate"] = previous

    # -- training forward ----------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        self._vitos_rows = inputs.get("vitos_boxes")
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._vitos_rows = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **image_inputs):
        rows = self._vitos_rows
        if rows is None or image_inputs.get("num_images") is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **image_inputs)
        unsupported = [k for k in ("pixel_attention_mask", "spatial_shapes", "num_tiles", "image_position_ids")
                       if image_inputs.get(k) is not None]
        if unsupported:
            raise ValueError(f"ViToSGRPOTrainer: image inputs {unsupported} are not supported (Qwen-VL / LLaVA only)")
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies = [], []
        with nvtx_range("vitos.trl.sparse_logprobs"):
            for start in range(0, input_ids.size(0), batch_size):
                end = min(start + batch_size, input_ids.size(0))
                logps, entropies = self._sparse_chunk(model, input_ids, attention_mask, logits_to_keep, start, end,
                                                      rows, image_inputs, compute_entropy)
                all_logps.append(logps)
                all_entropies.append(entropies)
        entropies = torch.cat(all_entropies) if compute_entropy else None
        return torch.cat(all_logps), entropies, None

    def _sparse_chunk(self, model, input_ids, attention_mask, logits_to_keep, start, end, rows, image_inputs,
                      compute_entropy):
        """Log-probs / entropies [end - start, logits_to_keep] of rows start..end through the pruned forward."""
        num_images = list(image_inputs["num_images"])
        chunk_ids = input_ids[start:end]
        model_inputs = {"input_ids": chunk_ids, "attention_mask": attention_mask[start:end],
                        **self._chunk_image_inputs(image_inputs, num_images, start, end)}
        chunk_images = num_images[start:end]
        sparse = sum(chunk_images) > 0
        if sparse:
            model_inputs.update(self._sparse_kwargs(self._image_boxes(rows[start:end], chunk_images)))
        with self.accelerator.autocast():
            logits = model(**model_inputs, use_cache=False, logits_to_keep=logits_to_keep + 1).logits
        length = chunk_ids.shape[1]
        if sparse:
            source_index = self._patched_instance(model).vitos_last_prefill.source_index
        else:  # nothing to prune: the layout is the input's own
            source_index = torch.arange(chunk_ids.numel(), device=chunk_ids.device).view_as(chunk_ids)
            source_index = source_index.masked_fill(attention_mask[start:end] == 0, -1)
        completion_ids = chunk_ids[:, -logits_to_keep:]
        return completion_logprobs_from_compacted(logits, source_index.to(logits.device), length,
                                                  completion_ids.to(logits.device), self.temperature, compute_entropy)

    @staticmethod
    def _chunk_image_inputs(image_inputs: dict[str, Any], num_images: list[int], start: int, end: int) -> dict:
        """The image inputs of rows start..end (Qwen-VL: pixel rows by image_grid_thw; LLaVA: one per image)."""
        first, last = sum(num_images[:start]), sum(num_images[:end])
        out: dict[str, Any] = {}
        pixel_values, grid = image_inputs.get("pixel_values"), image_inputs.get("image_grid_thw")
        if grid is not None and pixel_values is not None:
            patches = grid.prod(-1)
            out["pixel_values"] = pixel_values[int(patches[:first].sum()):int(patches[:last].sum())]
            out["image_grid_thw"] = grid[first:last]
        elif pixel_values is not None:
            out["pixel_values"] = pixel_values[first:last]
        if image_inputs.get("image_sizes") is not None:
            out["image_sizes"] = image_inputs["image_sizes"][first:last]
        for key in ("mm_token_type_ids", "token_type_ids"):
            if image_inputs.get(key) is not None:
                out[key] = image_inputs[key][start:end]
        return out
