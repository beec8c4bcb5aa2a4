"""The embedded default job: a scan-like image with evidence boxes through the token-sparse ops.

`vitos-ext demo` runs this with no network and no downloads: it renders a synthetic scan with lesions, turns the
lesion boxes into a visual-token mask (region_to_patch_mask), compacts a packed prompt of text + visual tokens with
their M-RoPE positions (compact_tokens, with and without token fusion), checks both against the plain-PyTorch
references, times fused vs eager, and writes a PNG with the kept tokens drawn over the image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from . import reference
from .data.phantom import make_scan_like_image
from .ops import compact_tokens, region_to_patch_mask

PATCH, MERGE = 14, 2  # Qwen2-VL / Qwen2.5-VL vision patching


@dataclass
class OpsDemoResult:
    """What the ops demo measured (times are medians in milliseconds)."""

    image_size: int
    token_grid: tuple[int, int]
    boxes: list[list[float]]
    kept_ratio: float
    kept_tokens: int
    visual_tokens: int
    prompt_rows: int
    compacted_rows: int
    times_ms: dict[str, float]
    png: Path


def median_ms(fn, repeats: int = 15) -> float:
    """Median wall time of fn() in milliseconds (synchronizing CUDA around each call)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def mrope_positions(text_before: int, grid: tuple[int, int], text_after: int) -> torch.Tensor:
    """int64 [3, T] M-RoPE positions of one prompt: text, one image of grid (H, W) tokens, text (Qwen2-VL rule)."""
    rows, cols = grid
    before = torch.arange(text_before).repeat(3, 1)
    t = torch.zeros(rows * cols, dtype=torch.int64)
    h = torch.arange(rows).repeat_interleave(cols)
    w = torch.arange(cols).repeat(rows)
    image = torch.stack([t, h, w]) + text_before
    after = torch.arange(text_after).repeat(3, 1) + int(image.max()) + 1
    return torch.cat([before, image, after], dim=1)


def draw_kept_tokens(image: Image.Image, keep: torch.Tensor, grid: tuple[int, int], boxes) -> Image.Image:
    """RGB picture of `image` with dropped token cells dimmed, kept cells outlined and the boxes drawn in red.

    keep: bool [H * W] token mask of one frame; grid: (H, W) token grid; boxes: normalized [x1, y1, x2, y2] list.
    """
    picture = image.convert("RGB")
    width, height = picture.size
    overlay = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    rows, cols = grid
    for index, kept in enumerate(keep.tolist()):
        r, c = divmod(index, cols)
        cell = (c * width / cols, r * height / rows, (c + 1) * width / cols - 1, (r + 1) * height / rows - 1)
        if kept:
            draw.rectangle(cell, outline=(40, 220, 120, 200))
        else:
            draw.rectangle(cell, fill=(0, 0, 40, 150))
    picture = Image.alpha_composite(picture.convert("RGBA"), overlay)
    draw = ImageDraw.Draw(picture)
    for x1, y1, x2, y2 in boxes:
        draw.rectangle((x1 * width, y1 * height, x2 * width, y2 * height), outline=(255, 60, 60, 255), width=2)
    return picture.convert("RGB")


def run_ops_demo(out_dir: str | Path = "outputs/demo", image_size: int = 448, seed: int = 7, dilate: int = 1,
                 device: str | None = None) -> OpsDemoResult:
    """Run the ops part of the demo and write `out_dir`/kept_tokens.png; returns the measurements."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    scan = make_scan_like_image(image_size, lesions=["hyperdense nodule", "ring-enhancing lesion"], seed=seed)
    grid = (image_size // PATCH // MERGE, image_size // PATCH // MERGE)
    grid_thw = torch.tensor([[1, grid[0] * MERGE, grid[1] * MERGE]], device=device)
    boxes = torch.tensor(scan.boxes, dtype=torch.float32, device=device)
    box_image = torch.zeros(len(scan.boxes), dtype=torch.int64, device=device)
    visual = grid[0] * grid[1]

    keep_visual = region_to_patch_mask(boxes, box_image, grid_thw, MERGE, dilate, num_tokens=visual)
    expected = reference.region_to_patch_mask_reference(boxes, box_image, grid_thw, MERGE, dilate)
    assert torch.equal(keep_visual.cpu(), expected.cpu()), "region_to_patch_mask disagrees with its reference"

    # A packed prompt: 24 text tokens, the image, 40 text tokens; text is always kept.
    text_before, text_after = 24, 40
    keep = torch.cat([torch.ones(text_before, dtype=torch.bool, device=device), keep_visual,
                      torch.ones(text_after, dtype=torch.bool, device=device)])
    rows = keep.numel()
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 1024, generator=generator).to(device=device, dtype=torch.bfloat16)
    positions = mrope_positions(text_before, grid, text_after).to(device)
    cu_seqlens = torch.tensor([0, rows], dtype=torch.int32, device=device)
    fuse_into = nearest_kept_in_prompt(keep)
    out = compact_tokens(hidden, keep, cu_seqlens, positions)
    want = reference.compact_tokens_reference(hidden, keep, cu_seqlens, positions)
    assert torch.equal(out.hidden, want.hidden) and torch.equal(out.position_ids, want.position_ids)
    fused = compact_tokens(hidden, keep, cu_seqlens, positions, fuse_into)
    assert torch.equal(fused.hidden, reference.compact_tokens_reference(hidden, keep, cu_seqlens, positions,
                                                                        fuse_into).hidden)

    times = {
        "mask fused": median_ms(lambda: region_to_patch_mask(boxes, box_image, grid_thw, MERGE, dilate,
                                                             num_tokens=visual)),
        "mask eager": median_ms(lambda: reference.region_to_patch_mask_reference(boxes, box_image, grid_thw,
                                                                                 MERGE, dilate)),
        "compact fused": median_ms(lambda: compact_tokens(hidden, keep, cu_seqlens, positions)),
        "compact eager": median_ms(lambda: reference.compact_tokens_reference(hidden, keep, cu_seqlens, positions)),
        "compact+fusion fused": median_ms(lambda: compact_tokens(hidden, keep, cu_seqlens, positions, fuse_into)),
        "compact+fusion eager": median_ms(
            lambda: reference.compact_tokens_reference(hidden, keep, cu_seqlens, positions, fuse_into)),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "kept_tokens.png"
    draw_kept_tokens(scan.image, keep_visual.cpu(), grid, scan.boxes).save(png)
    kept = int(keep_visual.sum())
    return OpsDemoResult(image_size, grid, scan.boxes, kept / visual, kept, visual, rows, out.hidden.shape[0],
                         times, png)


def nearest_kept_in_prompt(keep: torch.Tensor) -> torch.Tensor:
    """int64 [T] fusion map for one prompt: each dropped row is fused into the closest preceding kept row."""
    index = torch.arange(keep.numel(), device=keep.device)
    return torch.where(keep, index, -1).cummax(0).values


def format_ops_report(result: OpsDemoResult) -> str:
    """Human-readable summary of :func:`run_ops_demo`."""
    t = result.times_ms
    lines = [
        f"image {result.image_size}x{result.image_size} px -> {result.token_grid[0]}x{result.token_grid[1]} "
        f"visual tokens ({result.visual_tokens})",
        "evidence boxes: " + "; ".join("[" + ", ".join(f"{v:.2f}" for v in b) + "]" for b in result.boxes),
        f"kept visual tokens: {result.kept_tokens}/{result.visual_tokens} ({100 * result.kept_ratio:.1f}%)",
        f"packed prompt: {result.prompt_rows} rows -> {result.compacted_rows} rows (positions gathered, not renumbered)",
        f"region_to_patch_mask: fused {t['mask fused'] * 1e3:.0f} us vs eager {t['mask eager'] * 1e3:.0f} us",
        f"compact_tokens:       fused {t['compact fused']:.3f} ms vs eager {t['compact eager']:.3f} ms",
        f"  with token fusion:  fused {t['compact+fusion fused']:.3f} ms vs eager {t['compact+fusion eager']:.3f} ms",
        f"kept tokens drawn over the image: {result.png}",
    ]
    return "\n".join(lines)


def main(args) -> int:
    """`vitos-ext demo`: the ops demo (and, further down, the two-pass pipeline on a tiny VLM)."""
    import json

    print("== token-sparse ops on a synthetic scan ==")
    result = run_ops_demo(args.out, args.image_size, args.seed, device=args.device)
    print(format_ops_report(result))
    summary = {"ops": {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}}
    path = Path(args.out) / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"summary: {path}")
    return 0
