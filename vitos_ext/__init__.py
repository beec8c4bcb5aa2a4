"""vitos_ext: fast token-sparse reasoning for vision-language models (ViToS).

Ops: region_to_patch_mask (boxes -> visual-token mask), compact_tokens (drop/fuse tokens of packed sequences).
"""

from . import reference
from ._library import has_cuda_kernels, is_available
from .ops import Compacted, compact_tokens, region_to_patch_mask

__version__ = "0.1.0"

__all__ = [
    "Compacted",
    "compact_tokens",
    "has_cuda_kernels",
    "is_available",
    "reference",
    "region_to_patch_mask",
]
