"""vitos_ext: fast token-sparse reasoning for vision-language models (ViToS).

Ops: region_to_patch_mask (boxes -> visual-token mask), compact_tokens (drop/fuse tokens of packed sequences),
varlen_attention (ragged flash attention, Triton on GPU; register_hf_attention() adds it to transformers).
Models: patch_model / unpatch_model (token-sparse forward and generate for HF Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA).
Pipeline: ViToSPipeline (pass 1 grounds evidence boxes, pass 2 answers with only the visual tokens inside them).
"""

from . import reference
from ._library import has_cuda_kernels, is_available
from .models import supported_model_names
from .models.llava import apply_vitos_to_llava, revert_vitos_to_llava
from .models.qwen2_5_vl import apply_vitos_to_qwen2_5_vl, revert_vitos_to_qwen2_5_vl
from .models.qwen2_vl import apply_vitos_to_qwen2_vl, revert_vitos_to_qwen2_vl
from .models.qwen3_vl import apply_vitos_to_qwen3_vl, revert_vitos_to_qwen3_vl
from .hf_attention import HF_ATTENTION_NAME, register_hf_attention
from .integrations.packed import PackedPrunedBatch, prune_packed_batch
from .ops import Compacted, compact_tokens, region_to_patch_mask
from .ops.attention import varlen_attention
from .ops.fused import rms_norm, rotary_embedding, swiglu
from .patching import ImageFeatures, encode_images, is_patched, patch_model, unpatch_model
from .pipeline import DEFAULT_GROUNDING_PROMPT, PIPELINE_STAGES, PipelineFlags, ViToSPipeline, ViToSResult
from .sparsity import (
    PrunedBatch,
    compact_token_values,
    compact_visual_features,
    keep_mask_from_boxes,
    nearest_kept_fusion_map,
    prune_packed,
    prune_padded_batch,
    resolve_fusion,
)

__version__ = "0.1.0"

__all__ = [
    "Compacted",
    "DEFAULT_GROUNDING_PROMPT",
    "HF_ATTENTION_NAME",
    "ImageFeatures",
    "PIPELINE_STAGES",
    "PackedPrunedBatch",
    "PipelineFlags",
    "PrunedBatch",
    "ViToSPipeline",
    "ViToSResult",
    "apply_vitos_to_llava",
    "apply_vitos_to_qwen2_5_vl",
    "apply_vitos_to_qwen2_vl",
    "apply_vitos_to_qwen3_vl",
    "compact_token_values",
    "compact_tokens",
    "compact_visual_features",
    "encode_images",
    "has_cuda_kernels",
    "is_available",
    "is_patched",
    "keep_mask_from_boxes",
    "nearest_kept_fusion_map",
    "patch_model",
    "prune_packed",
    "prune_packed_batch",
    "prune_padded_batch",
    "reference",
    "register_hf_attention",
    "region_to_patch_mask",
    "resolve_fusion",
    "rms_norm",
    "rotary_embedding",
    "revert_vitos_to_llava",
    "revert_vitos_to_qwen2_5_vl",
    "revert_vitos_to_qwen2_vl",
    "revert_vitos_to_qwen3_vl",
    "supported_model_names",
    "swiglu",
    "unpatch_model",
    "varlen_attention",
]
