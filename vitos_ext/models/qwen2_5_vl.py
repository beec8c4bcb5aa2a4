"""Qwen2.5-VL (Lingshu-7B/32B are Qwen2.5-VL checkpoints): adapter for the token-sparse patch.

Same layout as Qwen2-VL (see qwen2_vl.py). The vision tower alternates windowed and full attention; transformers
runs the windowed layers as one SDPA call per window unless the kernel is "flash*". The patched vision attention
(qwen_vision_varlen_forward) runs every layer, windowed or full, as a single varlen_attention call over the
layer's cu_seqlens (window boundaries for windowed layers).
"""

from __future__ import annotations

from .qwen2_vl import QwenVLAdapter

__all__ = ["ADAPTER", "Qwen2_5_VLAdapter", "apply_vitos_to_qwen2_5_vl", "revert_vitos_to_qwen2_5_vl"]


class Qwen2_5_VLAdapter(QwenVLAdapter):
    """Qwen2_5_VLForConditionalGeneration."""

    name = "qwen2_5_vl"
    _module = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"
    _class_names = ("Qwen2_5_VLForConditionalGeneration",)


ADAPTER = Qwen2_5_VLAdapter()


def apply_vitos_to_qwen2_5_vl(attention: str = "auto", fused_layers: str = "auto") -> None:
    """Patch Qwen2_5_VLForConditionalGeneration before loading: every instance created afterwards is patched
    (vitos_ext.patch_model) as soon as it is constructed. Undo with revert_vitos_to_qwen2_5_vl()."""
    from ..patching import apply_to_classes

    apply_to_classes(ADAPTER, attention, fused_layers)


def revert_vitos_to_qwen2_5_vl() -> None:
    """Undo apply_vitos_to_qwen2_5_vl (instances created meanwhile stay patched; use vitos_ext.unpatch_model)."""
    from ..patching import revert_classes

    revert_classes(ADAPTER)
