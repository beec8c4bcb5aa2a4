"""Qwen2-VL: adapter for the token-sparse patch, and the varlen vision attention shared by the Qwen-VL families.

Layout (transformers 5.17 .. 5.24): Qwen2VLForConditionalGeneration.model is a Qwen2VLModel with .visual (vision
tower, blocks[i].attn) and .language_model (Qwen2VLTextModel). Images are split into patches, merged m x m
(config.vision_config.spatial_merge_size) into tokens; image_grid_thw gives (t, h, w) in patches per image. The
language model takes M-RoPE positions [3, B, L] (forward) or [4, B, L] with a text row first (generate).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

from .._tensor_memo import TensorMemo
from ..profiling import nvtx_annotate
from ..ops.fused import rotary_embedding
from . import VLMAdapter, has_accelerate_hook
from .fused_layers import fused_active

__all__ = ["ADAPTER", "QwenVLAdapter", "apply_vitos_to_qwen2_vl", "qwen_vision_varlen_forward",
           "revert_vitos_to_qwen2_vl"]

# every vision block of one tower call gets the same cu_seqlens object (Qwen2.5-VL: two, windows and full images),
# so the longest group is read back once per tower call instead of once per layer
_LONGEST_GROUP = TensorMemo(capacity=4)


def _max_seqlen(cu_seqlens: torch.Tensor) -> int:
    def compute() -> int:
        return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0

    return _LONGEST_GROUP.get((cu_seqlens,), None, compute)


def _use_varlen(module: torch.nn.Module, hidden_states: torch.Tensor) -> bool:
    mode = getattr(module, "_vitos_attention", "model")
    if mode == "varlen":
        return True
    if mode != "auto" or hidden_states.device.type != "cuda":
        return False
    from ..ops.attention import triton_available

    return triton_available(hidden_states.device)


@nvtx_annotate("vitos.vision_attention")
def qwen_vision_varlen_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Qwen-VL vision attention as ONE varlen_attention call over all images / windows of the layer.

    Replaces VisionAttention / Qwen2_5_VLVisionAttention / Qwen3VLVisionAttention.forward on patched instances.
    transformers only passes cu_seqlens to kernels named "flash*" and otherwise loops over images (and, in
    Qwen2.5-VL, over every window) with one SDPA call each; this does the whole layer in one call.

    Args:
        hidden_states: [S, C] patch states of every image in the batch (window-permuted for Qwen2.5-VL).
        cu_seqlens: int32 [N + 1] offsets of the attention groups (images/frames, or windows).
        position_embeddings: (cos, sin), each [S, head_dim] (2-D vision RoPE).
        max_seqlen: longest group if the caller knows it (else read back once per cu_seqlens tensor).

    Returns:
        [S, C], like the module it replaces. Falls back to the module's own forward when the attention mode is
        "auto" and no fast varlen backend exists for the device, or when attention weights are requested.
    """
    if not _use_varlen(self, hidden_states) or kwargs.get("output_attentions"):
        return type(self).forward(self, hidden_states, cu_seqlens=cu_seqlens,
                                  position_embeddings=position_embeddings, max_seqlen=max_seqlen, **kwargs)
    from ..ops.attention import varlen_attention

    seq_length = hidden_states.shape[0]
    query, key, value = (
        self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    )
    cos, sin = position_embeddings
    if fused_active(self, hidden_states, cos, sin):  # one kernel per tensor, same float32 math as the helper below
        query, key = rotary_embedding(query, key, cos, sin, backend="triton")
    else:  # the family module's own rotary helper keeps numerics identical to the model's
        apply_rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
        query, key = apply_rotary(query, key, cos, sin)
    cu_seqlens = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
    longest = int(max_seqlen) if max_seqlen is not None else _max_seqlen(cu_seqlens)
    out = varlen_attention(query, key, value, cu_seqlens, cu_seqlens, longest, longest, causal=False,
                           softmax_scale=self.scaling, check_values=False)
    return self.proj(out.reshape(seq_length, -1))


def qwen_patch_embed_as_linear(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Qwen-VL patch embedding (a Conv3d whose kernel equals its stride) as the equivalent single matmul.

    Replaces the PatchEmbed forward of Qwen2-VL / Qwen2.5-VL / Qwen3-VL on patched instances. Each output is the dot
    product of one flattened (C, T, P, P) patch with the kernel, so F.linear over the flattened weight computes
    the same function; cuDNN's bf16 Conv3d for this shape is far slower than a GEMM on recent GPUs.

    Args:
        hidden_states: [S, C * T * P * P] flattened patches (any float dtype; cast to the weight's dtype).

    Returns:
        [S, embed_dim] in the weight's dtype, like the module it replaces. Falls back to the module's own forward
        when the mode is "auto" on a device without the varlen kernels, when the conv is not a patchify conv, or
        when its weight is not in place (managed by an accelerate hook, or a partitioned ZeRO-3 shard).
    """
    proj = self.proj
    patchify = (tuple(proj.kernel_size) == tuple(proj.stride) and not any(proj.padding)
                and all(d == 1 for d in proj.dilation) and proj.groups == 1)
    # the conv's weight must be in place: an accelerate hook (offloading, device_map) or a ZeRO-3 gather runs only
    # when the conv itself is called, so anything else calls the conv
    weight_ready = (not has_accelerate_hook(proj) and proj.weight.device == hidden_states.device
                    and tuple(proj.weight.shape) == (proj.out_channels, proj.in_channels // proj.groups,
                                                     *proj.kernel_size))
    if not patchify or not weight_ready or not _use_varlen(self, hidden_states):
        return type(self).forward(self, hidden_states)
    weight = proj.weight.reshape(proj.weight.shape[0], -1)
    return F.linear(hidden_states.to(weight.dtype).reshape(-1, weight.shape[1]), weight, proj.bias)


class QwenVLAdapter(VLMAdapter):
    """Qwen2-VL (and the base of Qwen2.5-VL / Qwen3-VL, which share its layout)."""

    name = "qwen2_vl"
    text_position_row = True
    _module = "transformers.models.qwen2_vl.modeling_qwen2_vl"
    _class_names = ("Qwen2VLForConditionalGeneration",)

    def model_classes(self) -> tuple[type, ...]:
        try:
            module = __import__(self._module, fromlist=list(self._class_names))
        except ImportError:
            return ()
        return tuple(getattr(module, name) for name in self._class_names if hasattr(module, name))

    def vision_attention_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return [block.attn for block in self.base_model(model).visual.blocks]

    def vision_attention_forward(self):
        return qwen_vision_varlen_forward

    def vision_forward_replacements(self, model: torch.nn.Module) -> list[tuple[torch.nn.Module, Any]]:
        replacements = super().vision_forward_replacements(model)
        patch_embed = getattr(self.base_model(model).visual, "patch_embed", None)
        if isinstance(getattr(patch_embed, "proj", None), torch.nn.Conv3d):
            replacements.append((patch_embed, qwen_patch_embed_as_linear))
        return replacements

    def merge_size(self, model: torch.nn.Module) -> int:
        return int(model.config.vision_config.spatial_merge_size)

    def video_token_id(self, model: torch.nn.Module) -> int | None:
        return int(model.config.video_token_id)

    def count_images(self, model: torch.nn.Module, inputs: dict[str, Any]) -> int | None:
        grid = inputs.get("image_grid_thw")
        return None if grid is None else int(grid.shape[0])

    def visual_grid(self, model: torch.nn.Module, inputs: dict[str, Any], num_visual: int) -> tuple[torch.Tensor, int]:
        grid = inputs.get("image_grid_thw")
        if grid is None:
            raise ValueError("token pruning needs image_grid_thw (returned by the processor with the images)")
        return grid.to(torch.int64), self.merge_size(model)

    def encode_images(self, model: torch.nn.Module, pixel_values: torch.Tensor, **inputs: Any) -> Any:
        grid = inputs.get("image_grid_thw")
        if grid is None:
            raise ValueError("encode_images needs image_grid_thw for Qwen-VL models")
        return self.base_model(model).get_image_features(pixel_values, grid, return_dict=True)

    def same_images(self, cached_inputs: dict[str, Any], inputs: dict[str, Any]) -> bool:
        cached, grid = cached_inputs.get("image_grid_thw"), inputs.get("image_grid_thw")
        if grid is None or cached is grid:  # the same tensor (e.g. the pipeline's two passes): no read-back
            return True
        return cached is not None and cached.shape == grid.shape and torch.equal(cached.to(grid.device), grid)

    def set_rope_deltas(self, model: torch.nn.Module, pruned: Any) -> None:
        # transformers decodes from the cache at position (valid tokens so far - 1) + rope_deltas when no
        # position_ids are passed: with the compacted cache that must land on max original position + 1
        self.base_model(model).rope_deltas = pruned.rope_deltas


ADAPTER = QwenVLAdapter()


def apply_vitos_to_qwen2_vl(attention: str = "auto", fused_layers: str = "auto") -> None:
    """Patch Qwen2VLForConditionalGeneration before loading: every instance created afterwards is patched
    (vitos_ext.patch_model) as soon as it is constructed. Undo with revert_vitos_to_qwen2_vl()."""
    from ..patching import apply_to_classes

    apply_to_classes(ADAPTER, attention, fused_layers)


def revert_vitos_to_qwen2_vl() -> None:
    """Undo apply_vitos_to_qwen2_vl (instances created meanwhile stay patched; use vitos_ext.unpatch_model)."""
    from ..patching import revert_classes

    revert_classes(ADAPTER)
