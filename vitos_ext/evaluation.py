"""`vitos-ext eval`: multiple-choice medical VQA, full-token vs two-pass token-sparse (ViToS) inference.

    vitos-ext eval --model /models/Lingshu-7B --data bench.json [--out results.json] [--batch-size 8]
    vitos-ext eval --model tiny --data phantom_eval.json --max-new-tokens 32

Data: a JSON list (or JSON lines) of ``{"question", "image", "options", "answer", "dataset"}`` rows (the ViToS
training format with ``image_path`` / ``bbox`` works too). Rows are validated by vitos_ext.data.load_vitos_json:
missing or unreadable images, bad boxes and missing answers are listed and skipped, the run goes on.

Two modes run on the same batches:
  * full: one generate() per batch with every visual token (the base model's usual evaluation; the prompt asks for
    the option letter directly, or for the ViToS output contract with ``--full-prompt vitos``);
  * sparse: vitos_ext.ViToSPipeline -- pass 1 grounds evidence boxes with all tokens, pass 2 answers with only the
    visual tokens inside them (``--gold-boxes`` uses the rows' own boxes instead of pass 1: an oracle bound).
Reported per dataset and overall: accuracy of each mode, relative performance (sparse / full, in %, the paper's
measure), mean kept ratio of visual tokens, pass-1 (grounding) accuracy, and wall time per sample. "average" is the
macro mean over datasets (how the paper averages benchmarks); "overall" pools every sample. Results go to a JSON file
(summary + one record per sample + the validation report) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cli import ADAPTER_HELP
from .data.dataset import Sample, SkippedRow, ValidationReport, load_vitos_json
from .data.images import load_image
from .parsing import extract_choice, parse_output, split_inline_options
from .profiling import nvtx_range
from .rewards import accuracy_reward

__all__ = [
    "DIRECT_PROMPT",
    "EvalItem",
    "EvalResult",
    "FullTokenRunner",
    "Prediction",
    "SparsePipelineRunner",
    "eval_main",
    "evaluate",
    "format_table",
    "is_correct",
    "load_eval_model",
    "summarize",
]

logger = logging.getLogger(__name__)

# The usual multiple-choice VQA instruction of medical VLM benchmarks (LLaVA-Med / Lingshu style evaluations).
DIRECT_PROMPT = "{question}\nAnswer with the option's letter from the given choices directly."
MODES = ("full", "sparse")


# ----------------------------------------------------------------------------------------------------------------
# predictions


@dataclass
class EvalItem:
    """One validated sample with its images loaded (RGB PIL images, in the row's order)."""

    sample: Sample
    images: list[Any]


@dataclass
class Prediction:
    """What one mode answered for one sample.

    Attributes:
        text: the decoded output (pass 2's output for the sparse mode).
        answer: the answer text read from it (the ``<answer>`` block when present).
        choice: the option letter the answer picks, or None.
        seconds: this sample's share of its batch's wall time.
        kept_ratio: kept / all visual tokens (1.0 in the full mode).
        details: mode-specific extras (sparse: boxes, flags, grounding_choice, stage timings in ms).
    """

    text: str
    answer: str | None
    choice: str | None
    seconds: float
    kept_ratio: float = 1.0
    details: dict[str, Any] = field(default_factory=dict)


def is_correct(prediction: Prediction, sample: Sample) -> bool:
    """Multiple choice: the predicted letter is the gold letter. Open questions: normalized text match."""
    if sample.options and sample.answer in sample.options:
        return prediction.choice == sample.answer
    return accuracy_reward(prediction.text, sample.answer, sample.options or None) == 1.0


def _question_text(sample: Sample) -> str:
    """The question without ``<image>`` placeholders, with options appended when they are not written inline."""
    question = sample.question.replace("<image>", "").strip()
    inline = split_inline_options(question)
    if sample.options and not set(sample.options) <= set(inline):
        question += "\n" + "\n".join(f"{letter}. {text}" for letter, text in sample.options.items())
    return question


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FullTokenRunner:
    """Answers a batch with every visual token: one batched, greedy generate() (left padding).

    Args:
        model: a VLM (patched or not: without vitos_* arguments a patched model behaves exactly as unpatched).
        processor: its processor (chat template + text/image call).
        prompt: user text with ``{question}`` (default :data:`DIRECT_PROMPT`).
        max_new_tokens: generation budget.
        system_prompt: optional system message.
    """

    name = "full"

    def __init__(self, model, processor, *, prompt: str = DIRECT_PROMPT, max_new_tokens: int = 256,
                 system_prompt: str | None = None):
        if "{question}" not in prompt:
            raise ValueError(f"prompt must contain '{{question}}', got {prompt!r}")
        self.model, self.processor = model, processor
        self.prompt, self.max_new_tokens, self.system_prompt = prompt, max_new_tokens, system_prompt
        self.tokenizer = processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _messages(self, item: EvalItem) -> list[dict]:
        content = [{"type": "image"} for _ in item.images]
        content.append({"type": "text", "text": self.prompt.replace("{question}", _question_text(item.sample))})
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return messages + [{"role": "user", "content": content}]

    def _inputs(self, items: list[EvalItem]) -> dict[str, torch.Tensor]:
        texts = [self.processor.apply_chat_template(self._messages(item), add_generation_prompt=True, tokenize=False)
                 for item in items]
        images = [image for item in items for image in item.images]
        previous = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # batched generation continues every row at the same column
        try:
            batch = dict(self.processor(text=texts, images=images, padding=True, return_tensors="pt"))
        finally:
            self.tokenizer.padding_side = previous
        image_token = getattr(self.model.config, "image_token_id", None)
        if "mm_token_type_ids" not in batch and "image_grid_thw" in batch and image_token is not None:
            # Qwen-VL in transformers 5.x computes M-RoPE positions at prefill only from mm_token_type_ids
            batch["mm_token_type_ids"] = (batch["input_ids"] == image_token).long()
        dtype = self.model.dtype
        moved = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                floating = key == "pixel_values" and value.is_floating_point()
                moved[key] = value.to(self.device, dtype=dtype) if floating else value.to(self.device)
        return moved

    @torch.no_grad()
    def __call__(self, items: list[EvalItem]) -> list[Prediction]:
        """Predictions for `items`, in order."""
        _synchronize(self.device)
        start = time.perf_counter()
        with nvtx_range("vitos.eval.full"):
            inputs = self._inputs(items)
            kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=False)
            if self.model.generation_config.pad_token_id is None:
                kwargs["pad_token_id"] = self.tokenizer.pad_token_id
            output = self.model.generate(**inputs, **kwargs)
            sequences = output.sequences if hasattr(output, "sequences") else output
            new_tokens = sequences[:, inputs["input_ids"].shape[1]:].cpu().tolist()
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        _synchronize(self.device)
        share = (time.perf_counter() - start) / len(items)
        predictions = []
        for item, text in zip(items, texts):
            parsed = parse_output(text).answer
            answer = parsed if parsed else text.strip()
            options = item.sample.options or split_inline_options(item.sample.question)
            choice = extract_choice(answer, options) if options else None
            predictions.append(Prediction(text=text, answer=answer, choice=choice, seconds=share))
        return predictions


class SparsePipelineRunner:
    """Answers a batch with the two-pass ViToS pipeline (ground with all tokens, answer with the kept ones).

    Args:
        pipeline: a vitos_ext.ViToSPipeline (it patched the model).
        gold_boxes: use each row's own boxes instead of pass 1 (rows without boxes keep all tokens).
    """

    name = "sparse"

    def __init__(self, pipeline, *, gold_boxes: bool = False):
        self.pipeline, self.gold_boxes = pipeline, gold_boxes

    def __call__(self, items: list[EvalItem]) -> list[Prediction]:
        """Predictions for `items`, in order."""
        device = self.pipeline.device
        questions = [item.sample.question for item in items]
        options = [item.sample.options or None for item in items]
        boxes = [list(item.sample.boxes) for item in items] if self.gold_boxes else None
        _synchronize(device)
        start = time.perf_counter()
        with nvtx_range("vitos.eval.sparse"):
            results = self.pipeline([item.images for item in items], questions, options=options, boxes=boxes)
        _synchronize(device)
        share = (time.perf_counter() - start) / len(items)
        predictions = []
        for result in results:
            stages = {name: ms / len(items) for name, ms in result.timings_ms.items()}
            details = {"boxes": result.boxes, "flags": list(result.flags), "grounding_choice": result.grounding_choice,
                       "grounding_answer": result.grounding_answer, "stage_ms": stages,
                       "kept_tokens": result.kept_tokens, "visual_tokens": result.visual_tokens}
            predictions.append(Prediction(text=result.answer_text, answer=result.answer, choice=result.choice,
                                          seconds=share, kept_ratio=result.kept_ratio, details=details))
        return predictions


# ----------------------------------------------------------------------------------------------------------------
# the evaluation loop


@dataclass
class EvalResult:
    """Per-sample records of an evaluation and the rows that could not be evaluated.

    Attributes:
        records: one dict per evaluated sample: index, dataset, answer, and per mode the prediction and
            whether it is correct.
        skipped: rows dropped while running (e.g. an image that failed to decode).
        modes: the modes that ran, in order.
    """

    records: list[dict[str, Any]]
    skipped: list[SkippedRow]
    modes: tuple[str, ...]


def _batches(samples: Sequence[Sample], size: int):
    for start in range(0, len(samples), size):
        yield samples[start:start + size]


def _load_items(samples: Sequence[Sample], loader: Callable[[str], Any]) -> tuple[list[EvalItem], list[SkippedRow]]:
    items, skipped = [], []
    with nvtx_range("vitos.eval.load_images"):
        for sample in samples:
            try:
                items.append(EvalItem(sample, [loader(path) for path in sample.image_paths]))
            except (OSError, ValueError, ImportError) as error:
                skipped.append(SkippedRow(sample.index, "unreadable image", str(error)))
    return items, skipped


def _record(sample: Sample, default_dataset: str, predictions: dict[str, Prediction]) -> dict[str, Any]:
    record: dict[str, Any] = {"index": sample.index, "dataset": sample.dataset or default_dataset,
                              "answer": sample.answer, "images": sample.image_paths}
    for mode, prediction in predictions.items():
        record[mode] = {"correct": is_correct(prediction, sample), "choice": prediction.choice,
                        "answer": prediction.answer, "text": prediction.text, "seconds": prediction.seconds,
                        "kept_ratio": prediction.kept_ratio, **prediction.details}
        if mode == "sparse" and sample.options and sample.answer in sample.options:
            record[mode]["grounding_correct"] = prediction.details.get("grounding_choice") == sample.answer
    return record


def evaluate(samples: Sequence[Sample], runners: dict[str, Callable[[list[EvalItem]], list[Prediction]]], *,
             batch_size: int = 8, default_dataset: str = "data", progress: bool = True,
             image_loader: Callable[[str], Any] = load_image) -> EvalResult:
    """Run every runner (mode name -> callable on a batch of :class:`EvalItem`) over `samples`, batch by batch.

    Args:
        samples: validated samples (vitos_ext.data.load_vitos_json).
        runners: e.g. ``{"full": FullTokenRunner(...), "sparse": SparsePipelineRunner(...)}``; each returns one
            :class:`Prediction` per item, in order.
        batch_size: samples per batch (>= 1).
        default_dataset: dataset name of rows without one.
        progress: show a tqdm progress bar (stderr).
        image_loader: path -> RGB image (default vitos_ext.data.load_image: PNG/JPEG/DICOM).

    Returns:
        :class:`EvalResult`; rows whose images fail to load are skipped and listed, the run goes on.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not runners:
        raise ValueError("runners must name at least one mode")
    records, skipped = [], []
    bar = _progress_bar(len(samples), enabled=progress)
    try:
        for batch in _batches(samples, batch_size):
            items, bad = _load_items(batch, image_loader)
            skipped.extend(bad)
            if items:
                outputs = {mode: runner(items) for mode, runner in runners.items()}
                for i, item in enumerate(items):
                    records.append(_record(item.sample, default_dataset, {m: p[i] for m, p in outputs.items()}))
            bar.update(len(batch))
            bar.set_postfix(_running_accuracy(records, tuple(runners)), refresh=False)
    finally:
        bar.close()
    return EvalResult(records, skipped, tuple(runners))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency of the package, but the loop must not need it
        return _NoBar()
    return tqdm(total=total, desc="eval", unit="sample", dynamic_ncols=True, file=sys.stderr)


def _running_accuracy(records: list[dict], modes: tuple[str, ...]) -> dict[str, str]:
    if not records:
        return {}
    return {mode: f"{100 * sum(r[mode]['correct'] for r in records) / len(records):.1f}%" for mode in modes}


# ----------------------------------------------------------------------------------------------------------------
# summary


def _percent(correct: int, total: int) -> float | None:
    return None if total == 0 else round(100.0 * correct / total, 2)


def _relative(sparse: float | None, full: float | None) -> float | None:
    if sparse is None or full is None or full == 0:
        return None
    return round(100.0 * sparse / full, 2)


def _group_summary(records: list[dict], modes: tuple[str, ...]) -> dict[str, Any]:
    count = len(records)
    summary: dict[str, Any] = {"n": count}
    for mode in modes:
        correct = sum(r[mode]["correct"] for r in records)
        seconds = sum(r[mode]["seconds"] for r in records)
        entry = {"accuracy": _percent(correct, count), "correct": correct,
                 "ms_per_sample": None if count == 0 else round(1e3 * seconds / count, 3)}
        if mode == "sparse":
            entry["kept_ratio"] = None if count == 0 else round(sum(r[mode]["kept_ratio"] for r in records) / count, 4)
            graded = [r[mode]["grounding_correct"] for r in records if "grounding_correct" in r[mode]]
            entry["grounding_accuracy"] = _percent(sum(graded), len(graded))
            stages = [r[mode].get("stage_ms", {}) for r in records]
            names = sorted({name for s in stages for name in s})
            entry["stage_ms_per_sample"] = {n: round(sum(s.get(n, 0.0) for s in stages) / count, 3) for n in names}
        summary[mode] = entry
    if "full" in modes and "sparse" in modes:
        summary["relative_pct"] = _relative(summary["sparse"]["accuracy"], summary["full"]["accuracy"])
    return summary


def _macro_average(groups: dict[str, dict], modes: tuple[str, ...]) -> dict[str, Any]:
    """Mean of the per-dataset numbers (each dataset weighs the same), as the paper averages benchmarks."""
    values = list(groups.values())
    average: dict[str, Any] = {"datasets": len(values)}

    def mean(getter) -> float | None:
        numbers = [getter(v) for v in values]
        numbers = [x for x in numbers if x is not None]
        return round(sum(numbers) / len(numbers), 2) if numbers else None

    for mode in modes:
        average[mode] = {"accuracy": mean(lambda g, m=mode: g[m]["accuracy"])}
        if mode == "sparse":
            average[mode]["kept_ratio"] = mean(lambda g: g["sparse"]["kept_ratio"])
    if "full" in modes and "sparse" in modes:
        average["relative_pct"] = _relative(average["sparse"]["accuracy"], average["full"]["accuracy"])
    return average


def summarize(records: list[dict], modes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, relative performance, kept ratio and time per sample, per dataset and overall.

    Args:
        records: EvalResult.records.
        modes: the modes present in the records ("full", "sparse").

    Returns:
        ``{"datasets": {name: group}, "overall": group, "average": macro}`` where a group is
        ``{"n", "<mode>": {"accuracy" (%), "correct", "ms_per_sample", sparse: "kept_ratio", "grounding_accuracy",
        "stage_ms_per_sample"}, "relative_pct"}`` (relative_pct = sparse accuracy / full accuracy * 100, None when
        the full accuracy is 0 or a mode did not run) and ``average`` is the macro mean over datasets.
    """
    modes = tuple(modes)
    names = sorted({r["dataset"] for r in records})
    groups = {name: _group_summary([r for r in records if r["dataset"] == name], modes) for name in names}
    return {"datasets": groups, "overall": _group_summary(records, modes), "average": _macro_average(groups, modes)}


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(summary: dict[str, Any], modes: Sequence[str]) -> str:
    """A fixed-width text table of :func:`summarize`'s output (accuracies in %, times in ms per sample)."""
    modes = tuple(modes)
    columns = [("dataset", 22, "<"), ("n", 6, ">")]
    if "full" in modes:
        columns += [("full acc", 10, ">")]
    if "sparse" in modes:
        columns += [("sparse acc", 11, ">"), ("pass-1 acc", 11, ">")]
    if "full" in modes and "sparse" in modes:
        columns += [("relative", 10, ">")]
    if "sparse" in modes:
        columns += [("kept", 8, ">")]
    columns += [(f"{mode} ms", 11, ">") for mode in modes]

    def row(name: str, group: dict[str, Any]) -> str:
        cells = [name[:22], _cell(group.get("n"), "d")]
        if "full" in modes:
            cells.append(_cell(group["full"]["accuracy"], ".2f"))
        if "sparse" in modes:
            sparse = group["sparse"]
            cells += [_cell(sparse["accuracy"], ".2f"), _cell(sparse.get("grounding_accuracy"), ".2f")]
        if "full" in modes and "sparse" in modes:
            relative = group.get("relative_pct")
            cells.append("-" if relative is None else f"{relative:.2f}%")
        if "sparse" in modes:
            kept = group["sparse"].get("kept_ratio")
            cells.append("-" if kept is None else f"{100 * kept:.1f}%")
        cells += [_cell(group[mode].get("ms_per_sample"), ".1f") for mode in modes]
        return "  ".join(format(c, f"{align}{width}") for c, (_, width, align) in zip(cells, columns))

    header = "  ".join(format(title, f"{align}{width}") for title, width, align in columns)
    lines = [header, "-" * len(header)]
    lines += [row(name, group) for name, group in summary["datasets"].items()]
    lines.append("-" * len(header))
    lines.append(row("overall (all samples)", summary["overall"]))
    average = summary["average"]
    average_row = {"n": None, **{m: {**average[m], "ms_per_sample": None, "grounding_accuracy": None} for m in modes},
                   "relative_pct": average.get("relative_pct")}
    lines.append(row(f"average ({average['datasets']} datasets)", average_row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# models


def _has_weights(path: Path) -> bool:
    return any(f.is_file() and f.name.endswith((".safetensors", ".bin", ".pt", ".pth")) for f in path.iterdir())


def load_eval_model(spec: str, device: torch.device, dtype: torch.dtype, seed: int = 0, progress=None,
                    adapter: str | Path | None = None):
    """(model in eval mode on `device`, processor) for ``--model`` (and ``--adapter``: a PEFT adapter folder merged
    into the weights).

    Args:
        spec: "tiny" (the embedded tiny Qwen2.5-VL, random weights from `seed`) or a local checkpoint folder. A folder
            written by vitos_ext.tiny.save_tiny_assets without weights gets a randomly initialized model of its config
            (a warning says so).
        device, dtype: where and how to load.
        seed: initialization seed for random weights.
        progress: a pipeline_cli.StagePrinter for long stages (None: silent).

    Raises:
        pipeline_cli.InferError for a missing folder, an unsupported architecture or no usable processor.
    """
    from .pipeline_cli import InferError, load_model_and_processor, model_class_for
    from .tiny import build_tiny_model, build_tiny_processor, load_vl_processor

    weightless = "--adapter needs a --model checkpoint folder with weights (the adapter was trained on them)"
    if spec == "tiny":
        if adapter is not None:
            raise InferError(weightless)
        return build_tiny_model(seed=seed, dtype=dtype).to(device), build_tiny_processor()
    path = Path(spec).expanduser()
    cls, config = model_class_for(path)
    if _has_weights(path):
        return load_model_and_processor(path, dtype, device, progress, adapter)
    if adapter is not None:
        raise InferError(weightless)
    logger.warning("%s has no weights: using a randomly initialized %s (seed %d)", path, cls.__name__, seed)
    try:
        processor = load_vl_processor(path)
    except (OSError, ValueError, TypeError) as error:
        raise InferError(f"--model: no usable processor in {path}: {error}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, dtype=dtype)
    return model.to(device).eval(), processor


# ----------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `vitos-ext eval`."""
    parser = argparse.ArgumentParser(prog="vitos-ext eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="'tiny' (embedded tiny VLM) or a local checkpoint folder")
    parser.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    parser.add_argument("--data", required=True, help="evaluation JSON: {question, image, options, answer, dataset}")
    parser.add_argument("--out", default=None, help="results JSON (default: outputs/eval/<data name>.json)")
    parser.add_argument("--image-root", default=None, help="folder for relative image paths (default: the JSON's)")
    parser.add_argument("--modes", default="full,sparse", help="comma-separated subset of full,sparse")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--full-prompt", choices=("direct", "vitos"), default="direct",
                        help="full mode: ask for the letter directly, or for the ViToS output contract")
    parser.add_argument("--dilate", type=int, default=0, help="sparse mode: grow kept regions by this many tokens")
    parser.add_argument("--fuse", action="store_true", help="sparse mode: fuse dropped tokens into kept ones")
    parser.add_argument("--gold-boxes", action="store_true", help="sparse mode: use the rows' boxes (oracle)")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N valid rows")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--attention", default="auto", choices=["auto", "varlen", "model"],
                        help="patch_model attention mode for the sparse pipeline")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights (tiny / weightless folders)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        parser.error(f"--modes must be a comma-separated subset of {','.join(MODES)}, got {args.modes!r}")
    args.modes = tuple(m for m in MODES if m in modes)
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.dilate < 0:
        parser.error("--dilate must be >= 0")
    return args


def _runners(args, model, processor) -> dict[str, Callable]:
    runners: dict[str, Callable] = {}
    if "full" in args.modes:
        if args.full_prompt == "vitos":
            from .pipeline import DEFAULT_GROUNDING_PROMPT as prompt
        else:
            prompt = DIRECT_PROMPT
        runners["full"] = FullTokenRunner(model, processor, prompt=prompt, max_new_tokens=args.max_new_tokens,
                                          system_prompt=args.system_prompt)
    if "sparse" in args.modes:
        from .pipeline import ViToSPipeline

        pipeline = ViToSPipeline(model, processor, dilate=args.dilate, fuse=args.fuse,
                                 max_new_tokens=args.max_new_tokens, system_prompt=args.system_prompt,
                                 batch_size=args.batch_size, attention=args.attention)
        runners["sparse"] = SparsePipelineRunner(pipeline, gold_boxes=args.gold_boxes)
    return runners


def _report(samples_report: ValidationReport, runtime_skips: list[SkippedRow]) -> dict[str, Any]:
    report = samples_report.to_dict()
    report["skipped_while_running"] = [row.__dict__ for row in runtime_skips]
    return report


def eval_main(argv: Sequence[str] | None = None) -> int:
    """`vitos-ext eval` (argv without the subcommand). Returns 0, or 2 after a clear error for bad inputs."""
    from .pipeline_cli import InferError, StagePrinter, resolve_device, resolve_dtype

    args = _parse(argv)
    progress = StagePrinter(enabled=not args.no_progress)
    try:
        samples = load_vitos_json(args.data, image_root=args.image_root)
    except (FileNotFoundError, ValueError) as error:
        print(f"vitos-ext eval: error: --data: {error}", file=sys.stderr)
        return 2
    # load_vitos_json logs the skipped rows (warning); the JSON keeps them under "validation"
    valid = list(samples)[: args.limit] if args.limit else list(samples)
    if not valid:
        print(f"vitos-ext eval: error: --data: no valid rows in {args.data}", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        with progress(f"loading model {args.model}"):
            model, processor = load_eval_model(args.model, device, dtype, args.seed, progress, args.adapter)
        runners = _runners(args, model, processor)
    except InferError as error:
        print(f"vitos-ext eval: error: {error}", file=sys.stderr)
        return 2

    data_name = Path(args.data).stem
    result = evaluate(valid, runners, batch_size=args.batch_size, default_dataset=data_name,
                      progress=not args.no_progress)
    summary = summarize(result.records, result.modes)
    out = Path(args.out) if args.out else Path("outputs") / "eval" / f"{data_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("no_progress",)}
    settings.update(modes=list(result.modes), device=str(device), dtype=str(dtype).split(".")[-1])
    payload = {"model": args.model, "data": str(Path(args.data).resolve()), "settings": settings,
               "validation": _report(samples.report, result.skipped), "summary": summary, "samples": result.records}
    out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    for row in result.skipped:
        print(f"skipped row {row.index}: {row.reason} ({row.detail})", file=sys.stderr)
    print(format_table(summary, result.modes))
    reasons: dict[str, int] = dict(samples.report.counts())
    for row in result.skipped:
        reasons[row.reason] = reasons.get(row.reason, 0) + 1
    skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items())) or "none"
    print(f"{len(result.records)} samples evaluated; rows skipped: {skipped} (details under 'validation' in {out})")
    return 0
