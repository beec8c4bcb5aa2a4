"""LLaVA (LlavaForConditionalGeneration; HuatuoGPT-Vision-7B's original design): adapter for the token-sparse patch.

Layout (transformers 5.17 .. 5.24): LlavaForConditionalGeneration.model is a LlavaModel with .vision_tower (a CLIP /
SigLIP-style ViT), .multi_modal_projector and .language_model (any decoder, e.g. LlamaModel). Each image becomes a
fixed grid of side x side tokens (side = image_size // patch_size, merge size 1) when
vision_feature_select_strategy == "default" (the CLS token is dropped). Positions are 1-D, so decoding must be
given explicit positions (max original position + 1 onwards): generate() does that through its position_ids; manual
decoding loops should use model.vitos_last_prefill.next_position.
"""

from __future__ import annotations

from typing import Any

import torch

from . import VLMAdapter

__all__ = ["ADAPTER", "LlavaAdapter", "apply_vitos_to_llava", "revert_vitos_to_llava"]


class LlavaAdapter(VLMAdapter):
    """LlavaForConditionalGeneration with a fixed square token grid per image."""

    name = "llava"
    text_position_row = False

    def model_classes(self) -> tuple[type, ...]:
        try:
            from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration
        except ImportError:
            return ()
        return (LlavaForConditionalGeneration,)

    def language_model_configs(self, model: torch.nn.Module) -> list[Any]:
        # the ViT takes the same attention-implementation switch: its batched, unmasked, non-causal attention maps
        # onto varlen_attention's equal-length rows
        return [self.language_model(model).config, self.base_model(model).vision_tower.config]

    def grid_side(self, model: torch.nn.Module) -> int:
        vision = model.config.vision_config
        return int(vision.image_size) // int(vision.patch_size)

    def count_images(self, model: torch.nn.Module, inputs: dict[str, Any]) -> int | None:
        pixel_values = inputs.get("pixel_values")
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 4:
            return int(pixel_values.shape[0])
        return inputs.get("num_images")

    def visual_grid(self, model: torch.nn.Module, inputs: dict[str, Any], num_visual: int) -> tuple[torch.Tensor, int]:
        strategy = model.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"token pruning on LLaVA needs vision_feature_select_strategy='default' (a square token "
                             f"grid per image); this model uses {strategy!r}")
        if inputs.get("image_sizes") is not None:
            raise ValueError("token pruning on LLaVA does not support variable image_sizes (fixed grids only)")
        side = self.grid_side(model)
        if num_visual % (side * side):
            raise ValueError(f"{num_visual} image tokens is not a whole number of {side}x{side} image grids")
        device = inputs["input_ids"].device
        grid = torch.tensor([1, side, side], dtype=torch.int64, device=device).repeat(num_visual // (side * side), 1)
        return grid, 1

    def encode_images(self, model: torch.nn.Module, pixel_values: torch.Tensor, **inputs: Any) -> Any:
        config = model.config
        extra = {"image_sizes": inputs["image_sizes"]} if inputs.get("image_sizes") is not None else {}
        return self.base_model(model).get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
            **extra,
        )

    def same_images(self, cached_inputs: dict[str, Any], inputs: dict[str, Any]) -> bool:
        pixel_values = inputs.get("pixel_values")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.numel() == 0:
            return True
        return cached_inputs.get("num_images") == pixel_values.shape[0]


ADAPTER = LlavaAdapter()


def apply_vitos_to_llava(attention: str = "auto", fused_layers: str = "auto") -> None:
    """Patch LlavaForConditionalGeneration before loading: every instance created afterwards is patched
    (vitos_ext.patch_model) as soon as it is constructed. Undo with revert_vitos_to_llava()."""
    from ..patching import apply_to_classes

    apply_to_classes(ADAPTER, attention, fused_layers)


def revert_vitos_to_llava() -> None:
    """Undo apply_vitos_to_llava (instances created meanwhile stay patched; use vitos_ext.unpatch_model)."""
    from ..patching import revert_classes

    revert_classes(ADAPTER)
