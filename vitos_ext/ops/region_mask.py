"""region_to_patch_mask: evidence boxes -> boolean mask over a VLM's visual tokens (vitos::region_to_patch_mask)."""

from __future__ import annotations

import torch

from .. import _library
from ..profiling import nvtx_range


def region_to_patch_mask(
    boxes: torch.Tensor,
    box_image: torch.Tensor,
    grid_thw: torch.Tensor,
    merge_size: int = 2,
    dilate: int = 0,
    *,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """Mark the visual tokens that lie inside any evidence box of their image.

    Args:
        boxes: float [N, 4], (x1, y1, x2, y2) normalized to [0, 1] of the image (x right, y down); any float dtype
            (rounded to float32). Boxes with a non-finite coordinate, or inverted after clamping to [0, 1], are
            ignored.
        box_image: int64 [N], the image each box belongs to (an image may have zero or many boxes).
        grid_thw: int64 [I, 3], (t, h, w) of each image in patches (Qwen2-VL's image_grid_thw).
        merge_size: patches merged per token along each axis (h and w must be divisible by it).
        dilate: grow the kept cells by this many cells in every direction (a (2k+1) x (2k+1) square), clipped.
        num_tokens: the number of visual tokens, sum(t * h/m * w/m), when the caller knows it (e.g. the row count of
            the image embeddings). On CUDA this avoids the one device->host copy otherwise used to size the output
            and validate values; bad values then fail through a device-side assertion instead of a ValueError.

    Returns:
        bool [num_tokens] on grid_thw's device, in the VLM's token order (image 0 frame 0 row-major, frame 1, ...,
        then image 1, ...). An image with no valid box keeps all its tokens. Every frame uses the same 2-D mask.
    """
    _library.require()
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"region_to_patch_mask: boxes must be a tensor, got {type(boxes).__name__}")
    if not boxes.is_floating_point():
        raise ValueError(f"region_to_patch_mask: boxes must be a floating-point tensor, got {boxes.dtype}")
    if boxes.dtype != torch.float32:  # .to() is a dispatcher round trip (~1.4 us of host time) even when a no-op
        boxes = boxes.to(torch.float32)
    with nvtx_range("vitos.region_to_patch_mask"):
        return torch.ops.vitos.region_to_patch_mask(boxes, box_image, grid_thw, merge_size, dilate, num_tokens)


def _register_fake() -> None:
    @torch.library.register_fake("vitos::region_to_patch_mask")
    def _(boxes, box_image, grid_thw, merge_size=2, dilate=0, num_tokens=None):
        torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: "boxes must have shape [N, 4]")
        torch._check(grid_thw.dim() == 2 and grid_thw.shape[1] == 3, lambda: "grid_thw must have shape [I, 3]")
        size = torch.library.get_ctx().new_dynamic_size() if num_tokens is None else num_tokens
        return grid_thw.new_empty(size, dtype=torch.bool)


if _library.is_available():
    _register_fake()
