"""vitos_ext operators: thin Python wrappers over torch.ops.vitos with fake (meta) and autograd registrations."""

from .compaction import compact_tokens
from .region_mask import region_to_patch_mask
from .types import Compacted

__all__ = ["Compacted", "compact_tokens", "region_to_patch_mask"]
