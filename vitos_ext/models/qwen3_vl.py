"""Qwen3-VL (when the installed transformers has it): adapter for the token-sparse patch.

Same layout as Qwen2-VL (see qwen2_vl.py), plus DeepStack: the language model also receives
visual_pos_masks [B, L] and deepstack_visual_embeds (one [R, D] tensor per early layer, R = visual tokens, rows in
visual_pos_masks order) which it adds at the visual positions. Pruning compacts both exactly like the hidden states
(dropped rows removed, fused rows averaged into their target).
"""

from __future__ import annotations

from typing import Any

from ..sparsity import compact_token_values, compact_visual_features
from .qwen2_vl import QwenVLAdapter

__all__ = ["ADAPTER", "Qwen3VLAdapter", "apply_vitos_to_qwen3_vl", "revert_vitos_to_qwen3_vl"]


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3VLForConditionalGeneration (dense; the MoE variant is not covered)."""

    name = "qwen3_vl"
    _module = "transformers.models.qwen3_vl.modeling_qwen3_vl"
    _class_names = ("Qwen3VLForConditionalGeneration",)

    def adjust_language_model_kwargs(self, kwargs: dict[str, Any], pruned: Any) -> None:
        visual_pos_masks = kwargs.get("visual_pos_masks")
        if visual_pos_masks is None:
            return
        deepstack = kwargs.get("deepstack_visual_embeds")
        if deepstack is not None:
            kwargs["deepstack_visual_embeds"] = [
                compact_visual_features(features, visual_pos_masks, pruned) for features in deepstack
            ]
        kwargs["visual_pos_masks"] = compact_token_values(visual_pos_masks, pruned, False)

    def pack_language_model_kwargs(self, kwargs: dict[str, Any], rows: Any) -> None:
        # the DeepStack rows follow visual_pos_masks' row-major order, which packing keeps: only the mask moves
        visual_pos_masks = kwargs.get("visual_pos_masks")
        if visual_pos_masks is not None:
            kwargs["visual_pos_masks"] = visual_pos_masks.flatten().index_select(0, rows).unsqueeze(0)


ADAPTER = Qwen3VLAdapter()


def apply_vitos_to_qwen3_vl(attention: str = "auto", fused_layers: str = "auto") -> None:
    """Patch Qwen3VLForConditionalGeneration before loading: every instance created afterwards is patched
    (vitos_ext.patch_model) as soon as it is constructed. Undo with revert_vitos_to_qwen3_vl().

    Raises:
        ImportError when the installed transformers has no Qwen3-VL.
    """
    from ..patching import apply_to_classes

    if not ADAPTER.model_classes():
        raise ImportError("the installed transformers has no Qwen3-VL (transformers.models.qwen3_vl)")
    apply_to_classes(ADAPTER, attention, fused_layers)


def revert_vitos_to_qwen3_vl() -> None:
    """Undo apply_vitos_to_qwen3_vl (instances created meanwhile stay patched; use vitos_ext.unpatch_model)."""
    from ..patching import revert_classes

    if ADAPTER.model_classes():
        revert_classes(ADAPTER)
