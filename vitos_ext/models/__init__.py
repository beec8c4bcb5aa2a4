"""Per-family knowledge for token-sparse HF vision-language models (the Liger-Kernel layout).

Each supported family describes, through a :class:`VLMAdapter`, where its language model and vision attention
live, how its visual tokens are laid out (token grid, merge size) and what extra per-token inputs its language model
takes. vitos_ext/patching.py does the model-agnostic work (hooks, generate() bookkeeping) with these adapters.

Supported: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (when the installed transformers has it) and LLaVA
(LlavaForConditionalGeneration). Family modules import transformers lazily, so a family whose classes are missing
from the installed transformers is simply not listed.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

__all__ = ["VLMAdapter", "adapter_for", "has_accelerate_hook", "supported_adapters", "supported_model_names"]

_FAMILY_MODULES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava")


class VLMAdapter:
    """What the generic patch needs to know about one model family. Subclasses live in vitos_ext/models/<family>.py.

    Attributes:
        name: family name used in messages ("qwen2_5_vl").
        text_position_row: a [4, B, L] position tensor carries text positions in row 0 (Qwen's generate layout).
    """

    name: str = ""
    text_position_row: bool = False

    def model_classes(self) -> tuple[type, ...]:
        """The top-level *ForConditionalGeneration classes of the family (empty if transformers lacks them)."""
        raise NotImplementedError

    def base_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The inner multimodal model (owns get_image_features, the vision tower and the language model)."""
        return model.model

    def language_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The decoder stack that receives inputs_embeds with the image features already placed."""
        return self.base_model(model).language_model

    def language_model_configs(self, model: torch.nn.Module) -> list[Any]:
        """Configs whose attention implementation drives the language model's attention."""
        return [self.language_model(model).config]

    def vision_attention_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Vision attention modules whose forward is replaced by a single varlen call (may be empty)."""
        return []

    def vision_attention_forward(self):
        """The replacement forward (an unbound function taking the attention module first), or None."""
        return None

    def vision_forward_replacements(self, model: torch.nn.Module) -> list[tuple[torch.nn.Module, Any]]:
        """(module, unbound replacement forward) pairs installed while the attention mode is not "model":
        the vision attention modules, plus whatever else of the vision tower a family speeds up."""
        replacement = self.vision_attention_forward()
        if replacement is None:
            return []
        return [(module, replacement) for module in self.vision_attention_modules(model)]

    def image_token_id(self, model: torch.nn.Module) -> int:
        """Token id of the image placeholder tokens in input_ids."""
        return int(model.config.image_token_id)

    def video_token_id(self, model: torch.nn.Module) -> int | None:
        """Token id of the video placeholder tokens, or None for a family without video input."""
        return None

    def count_images(self, model: torch.nn.Module, inputs: dict[str, Any]) -> int | None:
        """Images in a forward/generate call from its inputs (host ints only), or None if it cannot tell."""
        raise NotImplementedError

    def visual_grid(self, model: torch.nn.Module, inputs: dict[str, Any], num_visual: int) -> tuple[torch.Tensor, int]:
        """(grid_thw int64 [I, 3] on the inputs' device, merge_size) describing the visual-token grid."""
        raise NotImplementedError

    def encode_images(self, model: torch.nn.Module, pixel_values: torch.Tensor, **inputs: Any) -> Any:
        """Run the vision tower (+ projector) once; returns the ModelOutput get_image_features returns."""
        raise NotImplementedError

    def feature_rows(self, output: Any) -> int:
        """Number of visual tokens in a get_image_features output (from shapes: no host sync)."""
        pooled = output.pooler_output
        if isinstance(pooled, torch.Tensor):
            return pooled.shape[0] * (pooled.shape[1] if pooled.dim() == 3 else 1)
        return sum(int(p.shape[0]) for p in pooled)

    def same_images(self, cached_inputs: dict[str, Any], inputs: dict[str, Any]) -> bool:
        """Whether precomputed image features (encoded with `cached_inputs`) fit a call with `inputs`."""
        return True

    def adjust_language_model_kwargs(self, kwargs: dict[str, Any], pruned: Any) -> None:
        """Prune family-specific per-token language-model inputs in place (e.g. Qwen3-VL's DeepStack features)."""

    def pack_language_model_kwargs(self, kwargs: dict[str, Any], rows: torch.Tensor) -> None:
        """Carry family-specific per-token [B, L'] inputs (already pruned) into the packed [1, T'] layout in place:
        `rows` is PrunedBatch.packed_rows."""

    def set_rope_deltas(self, model: torch.nn.Module, pruned: Any) -> None:
        """Store per-sample rope deltas for decoding from the compacted cache (Qwen's model.model.rope_deltas)."""


def has_accelerate_hook(module: torch.nn.Module) -> bool:
    """Whether accelerate manages the module (device_map across devices, CPU / disk offload): its hook moves inputs
    and loads the module's own weights only when the module itself is called."""
    return "_hf_hook" in module.__dict__


def supported_adapters() -> list[VLMAdapter]:
    """Adapters of every family whose classes the installed transformers provides."""
    adapters = []
    for module_name in _FAMILY_MODULES:
        module = importlib.import_module(f"{__name__}.{module_name}")
        adapter = module.ADAPTER
        if adapter.model_classes():
            adapters.append(adapter)
    return adapters


def supported_model_names() -> list[str]:
    """Names of the supported top-level model classes in the installed transformers."""
    return [cls.__name__ for adapter in supported_adapters() for cls in adapter.model_classes()]


def adapter_for(model: torch.nn.Module) -> VLMAdapter:
    """The adapter for a model instance (or class).

    Raises:
        TypeError listing the supported classes when the model is not one of them.
    """
    cls = model if isinstance(model, type) else type(model)
    for adapter in supported_adapters():
        if issubclass(cls, adapter.model_classes()):
            return adapter
    raise TypeError(
        f"vitos_ext cannot patch {cls.__name__}: supported models are {', '.join(supported_model_names())} "
        "(pass the *ForConditionalGeneration model, not its inner model)"
    )
