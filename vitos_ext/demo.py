"""The embedded default job: a scan-like image with evidence boxes through the token-sparse ops.

`vitos-ext demo` runs this with no network and no downloads: it renders a synthetic scan with lesions, turns the
lesion boxes into a visual-token mask (region_to_patch_mask), compacts a packed prompt of text + visual tokens with
their M-RoPE positions (compact_tokens, with and without token fusion), checks both against the plain-PyTorch
references, times fused vs eager, and writes a PNG with the kept tokens drawn over the image.

Then the two-pass ViToS pipeline (vitos_ext.pipeline) runs on a tiny VLM: the trained tiny phantom checkpoint when
``outputs/tiny-phantom/final`` (or ``--model``) exists, else a randomly initialized tiny Qwen2.5-VL built from the
shipped config. Inputs are a synthetic phantom scan with a multiple-choice question and, when pydicom is installed,
a real CT slice from pydicom's test data. It prints the boxes, the kept ratio and the stage timings, and draws the
kept tokens over each image. An untrained model rarely writes a valid box (every token is then kept, and the result
says so), so for it pass 2 also runs once with the phantom's true boxes to show the pruning.
"""

from __future__ import annotations

import contextlib
import sys
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


# ----------------------------------------------------------------------------------------------------------------
# the two-pass pipeline on a tiny VLM

TRAINED_TINY_MODEL = Path("outputs/tiny-phantom/final")
PIPELINE_MAX_NEW_TOKENS = 96  # the tiny-phantom preset trains with 80 (two-box outputs run to ~70 tokens)


@dataclass
class PipelineDemoResult:
    """What the pipeline demo ran and found.

    Attributes:
        model_source: which model ran ("--model DIR", the trained checkpoint, or the random tiny VLM).
        trained: False for the random tiny VLM.
        samples: per sample, ViToSResult.as_dict() plus "image" (what it was) and, for the phantom, "gold_answer"
            and "gold_boxes".
        oracle: pass 2 with the phantom's true boxes (untrained model only), as_dict(), else None.
        pngs: kept-token pictures written.
        seconds: wall time of the pipeline demo (model building/loading included).
    """

    model_source: str
    trained: bool
    samples: list[dict]
    oracle: dict | None
    pngs: list[Path]
    seconds: float


def _tiny_vocabulary_size() -> int:
    import json

    from .tiny import TINY_CONFIG_PATH

    return int(json.loads(TINY_CONFIG_PATH.read_text())["text_config"]["vocab_size"])


def _demo_model(model_dir: str | None, device: str, seed: int):
    """(model, processor, source, trained, prompt) for the demo; a tiny-tokenizer checkpoint is prompted with the
    bare question, as the tiny-phantom preset trains it; other checkpoints get the pipeline's default instruction."""
    from .pipeline import DEFAULT_GROUNDING_PROMPT
    from .pipeline_cli import load_model_and_processor, resolve_dtype

    directory = Path(model_dir) if model_dir else (TRAINED_TINY_MODEL if TRAINED_TINY_MODEL.is_dir() else None)
    if directory is None:
        from .tiny import build_tiny_model, build_tiny_processor

        model = build_tiny_model(seed=seed).to(device)
        return model, build_tiny_processor(), "random tiny Qwen2.5-VL (shipped config, untrained)", False, "{question}"
    device = torch.device(device)
    model, processor = load_model_and_processor(directory, resolve_dtype("auto", device), device)
    tiny_tokenizer = len(processor.tokenizer) == _tiny_vocabulary_size()
    source = f"--model {directory}" if model_dir else f"trained tiny checkpoint {directory}"
    return model, processor, source, True, "{question}" if tiny_tokenizer else DEFAULT_GROUNDING_PROMPT


def _fixed_image_side(processor) -> int | None:
    """Side in pixels when the processor resizes every image to one square size (min = max pixels), else None."""
    size = getattr(getattr(processor, "image_processor", None), "size", None)
    low, high = (getattr(size, "shortest_edge", None), getattr(size, "longest_edge", None)) if size else (None, None)
    if low and low == high and int(low ** 0.5) ** 2 == low:
        return int(low ** 0.5)
    return None


def _demo_samples(image_size: int, seed: int) -> list[dict]:
    """The phantom scan (with its true answer and boxes) and, with pydicom, a real CT slice, each with a question."""
    from .data.phantom import make_phantom_record

    record, image = make_phantom_record(seed, seed=seed, image_size=image_size)
    samples = [{"name": f"synthetic phantom scan {image_size}x{image_size} px", "image": image.convert("RGB"),
                "question": record["question"], "gold_answer": record["answer"], "gold_boxes": record["bbox"]}]
    try:
        import pydicom.data

        from .data.images import load_image

        path = pydicom.data.get_testdata_file("CT_small.dcm")
        samples.append({"name": "real CT slice (pydicom CT_small.dcm, 128x128)", "image": load_image(path),
                        "question": record["question"]})
    except ImportError:
        pass
    return samples


def _draw_result(image: Image.Image, result, index: int, path: Path) -> Path:
    """Kept tokens of image `index` of a ViToSResult, drawn over the image as the model saw it (first frame)."""
    seen = image.convert("RGB").resize(result.image_sizes[index])
    _, rows, cols = result.token_grids[index]
    draw_kept_tokens(seen, result.keep_masks[index][: rows * cols], (rows, cols), result.boxes[index]).save(path)
    return path


@contextlib.contextmanager
def _single_thread_if_tiny(model: torch.nn.Module):
    """Tiny models run faster on CPU (and far less noisily on shared machines) with one intra-op thread."""
    previous = torch.get_num_threads()
    parameter = next(model.parameters())
    if parameter.device.type == "cpu" and sum(p.numel() for p in model.parameters()) < 50_000_000:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_pipeline_demo(out_dir: str | Path = "outputs/demo", model_dir: str | None = None, image_size: int = 448,
                      seed: int = 7, device: str | None = None) -> PipelineDemoResult:
    """Run the two-pass pipeline on the embedded default and write `out_dir`/pipeline_kept_tokens_*.png."""
    from .pipeline import ViToSPipeline

    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor, source, trained, prompt = _demo_model(model_dir, device, seed)
    samples = _demo_samples(_fixed_image_side(processor) or image_size, seed)
    with _single_thread_if_tiny(model):
        pipeline = ViToSPipeline(model, processor, max_new_tokens=PIPELINE_MAX_NEW_TOKENS, grounding_prompt=prompt)
        results = pipeline([s["image"] for s in samples], [s["question"] for s in samples])
        oracle = None
        if not trained:
            phantom = samples[0]
            oracle = pipeline(phantom["image"], phantom["question"], boxes=phantom["gold_boxes"])
    pngs = [_draw_result(s["image"], r, 0, out_dir / f"pipeline_kept_tokens_{i}.png")
            for i, (s, r) in enumerate(zip(samples, results))]
    if oracle is not None:
        pngs.append(_draw_result(samples[0]["image"], oracle, 0, out_dir / "pipeline_kept_tokens_true_boxes.png"))
    described = []
    for sample, result in zip(samples, results):
        extra = {k: sample[k] for k in ("gold_answer", "gold_boxes") if k in sample}
        described.append({"image": sample["name"], **extra, **result.as_dict()})
    return PipelineDemoResult(source, trained, described, oracle.as_dict() if oracle else None, pngs,
                              time.perf_counter() - started)


def _boxes_text(boxes: list[list[float]]) -> str:
    return "; ".join("[" + ", ".join(f"{v:.2f}" for v in box) + "]" for box in boxes) if boxes else "none"


def format_pipeline_report(result: PipelineDemoResult) -> str:
    """Human-readable summary of :func:`run_pipeline_demo`."""
    from .pipeline_cli import format_timings

    lines = [f"model: {result.model_source}"]
    for index, sample in enumerate(result.samples):
        lines.append(f"[{index}] {sample['image']}")
        lines.append(f"    predicted boxes: {_boxes_text(sample['boxes'][0])}"
                     + (f"   (true: {_boxes_text(sample['gold_boxes'])})" if "gold_boxes" in sample else ""))
        lines.append(f"    kept visual tokens: {sample['kept_tokens']}/{sample['visual_tokens']} "
                     f"({100 * sample['kept_ratio']:.1f}%)" + ("   <- no valid box: all tokens kept"
                                                              if "no_boxes" in sample["flags"] else ""))
        answer = sample["answer"] if len(sample["answer"]) <= 60 else sample["answer"][:57] + "..."
        lines.append(f"    answer: {answer!r}, option {sample['choice']}"
                     + (f" (true: {sample['gold_answer']})" if "gold_answer" in sample else ""))
        lines.append(f"    flags: {', '.join(sample['flags']) or 'none'}")
    lines.append("    " + format_timings(result.samples[0]["timings_ms"])
                 + f" (batch of {result.samples[0]['batch_size']})")
    if result.oracle is not None:
        oracle = result.oracle
        lines.append(f"pass 2 with the phantom's true boxes {_boxes_text(oracle['boxes'][0])}: kept "
                     f"{oracle['kept_tokens']}/{oracle['visual_tokens']} visual tokens "
                     f"({100 * oracle['kept_ratio']:.1f}%), option {oracle['choice']}")
        lines.append("    " + format_timings(oracle["timings_ms"]))
    lines.append("kept tokens drawn over the images: " + ", ".join(str(p) for p in result.pngs))
    lines.append(f"pipeline demo wall time: {result.seconds:.1f} s")
    return "\n".join(lines)


def main(args) -> int:
    """`vitos-ext demo`: the ops demo, then the two-pass pipeline on a tiny VLM; writes summary.json."""
    import json

    from .pipeline_cli import InferError, model_class_for

    if getattr(args, "model", None):
        try:
            model_class_for(args.model)  # a bad --model fails before any work
        except InferError as error:
            print(f"vitos-ext demo: error: {error}", file=sys.stderr)
            return 2
    print("== token-sparse ops on a synthetic scan ==")
    result = run_ops_demo(args.out, args.image_size, args.seed, device=args.device)
    print(format_ops_report(result))
    summary = {"ops": {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}}

    print("\n== two-pass ViToS pipeline: ground the evidence, then answer from the kept tokens ==")
    try:
        pipeline = run_pipeline_demo(args.out, getattr(args, "model", None), args.image_size, args.seed, args.device)
    except InferError as error:
        print(f"vitos-ext demo: error: {error}", file=sys.stderr)
        return 2
    print(format_pipeline_report(pipeline))
    summary["pipeline"] = {k: ([str(p) for p in v] if k == "pngs" else v) for k, v in pipeline.__dict__.items()}
    path = Path(args.out) / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"summary: {path}")
    return 0
