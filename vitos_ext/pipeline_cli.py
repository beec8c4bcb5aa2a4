"""`vitos-ext infer`: two-pass token-sparse answering with a local checkpoint, offline.

    vitos-ext infer --model /models/Lingshu-7B --image scan.dcm --question "Which finding? A. x B. y" [--json]

Everything is read from local files (``local_files_only`` everywhere; the CLI also sets HF_HUB_OFFLINE): the model
class comes from the checkpoint's config (any family vitos_ext.patch_model supports), the processor from
vitos_ext.tiny.load_vl_processor (no torchvision needed), images from vitos_ext.data.load_image (PNG/JPEG/DICOM).
Images are read before the weights, so a bad path fails in a second rather than after loading 15 GB. Progress goes
to stderr, the result to stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["InferError", "infer_main", "load_images", "load_model_and_processor", "format_result", "resolve_device",
           "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class InferError(Exception):
    """A problem with the user's inputs (missing folder, unsupported model, unreadable image): printed, no trace."""


class StagePrinter:
    """Prints "<what> ..." when a long stage starts and "done in N s" when it ends (to stderr by default)."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled

    def __call__(self, what: str) -> "_Stage":
        return _Stage(self, what)

    def line(self, text: str) -> None:
        if self.enabled:
            print(f"[vitos-ext] {text}", file=self.stream, flush=True)


class _Stage:
    def __init__(self, printer: StagePrinter, what: str):
        self.printer, self.what = printer, what

    def __enter__(self):
        self.started = time.perf_counter()
        self.printer.line(f"{self.what} ...")
        return self

    def __exit__(self, kind, error, trace):
        seconds = time.perf_counter() - self.started
        self.printer.line(f"{self.what}: {'failed' if kind else 'done'} in {seconds:.1f} s")
        return False


# ----------------------------------------------------------------------------------------------------------------
# devices, dtypes, models


def resolve_device(name: str | None) -> torch.device:
    """torch.device from a --device value: None -> cuda when available else cpu. Raises InferError for a device
    this machine lacks."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InferError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype value to a torch dtype; "auto" is bfloat16 on a GPU that has it (else float16) and float32 on CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise InferError(f"--dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


def _checkpoint_dir(directory: str | os.PathLike) -> Path:
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise InferError(f"--model: no such directory: {path}")
    if not (path / "config.json").is_file():
        raise InferError(f"--model: {path} has no config.json (expected a Hugging Face checkpoint folder)")
    return path


def model_class_for(directory: str | os.PathLike):
    """(model class, config) of a local checkpoint, checked against the families vitos_ext supports."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .models import adapter_for, supported_adapters, supported_model_names

    path = _checkpoint_dir(directory)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as error:
        raise InferError(f"--model: cannot read {path / 'config.json'}: {error}") from None
    supported = ", ".join(supported_model_names())
    classes = {cls.__name__: cls for adapter in supported_adapters() for cls in adapter.model_classes()}
    architectures = getattr(config, "architectures", None) or []
    named = [classes[name] for name in architectures if name in classes]
    if named:  # the class the checkpoint was saved from
        return named[0], config
    architecture = (architectures or [type(config).__name__])[0]
    try:  # else what transformers' image-text-to-text auto class would load
        cls = AutoModelForImageTextToText._model_mapping[type(config)]
    except KeyError:
        raise InferError(f"--model: {path} is a {architecture} checkpoint ({config.model_type}); vitos_ext supports "
                         f"{supported}") from None
    try:
        adapter_for(cls)
    except TypeError:
        raise InferError(f"--model: {path} loads as {cls.__name__}; vitos_ext supports {supported}") from None
    return cls, config


def _weights_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))


def load_model_and_processor(directory: str | os.PathLike, dtype: torch.dtype = torch.float32,
                             device: torch.device | str = "cpu", progress: StagePrinter | None = None,
                             adapter: str | os.PathLike | None = None):
    """Load a supported VLM checkpoint and its processor from a local folder, offline.

    Args:
        directory: checkpoint folder (config.json, weights, tokenizer and processor files).
        dtype: parameter dtype.
        device: where the model goes.
        progress: prints the stages (default: silent).
        adapter: optional PEFT adapter folder (adapter_config.json + weights, e.g. a LoRA fine-tune of the
            checkpoint): loaded onto the model and merged into its weights, so inference runs at the base model's
            speed.

    Returns:
        (model in eval mode on `device`, processor).

    Raises:
        InferError: missing folder / config, unsupported architecture, no usable processor, no (readable) weights.
    """
    from safetensors import SafetensorError

    from .tiny import load_vl_processor

    progress = progress if progress is not None else StagePrinter(enabled=False)
    cls, _ = model_class_for(directory)
    path = _checkpoint_dir(directory)
    with progress(f"loading processor from {path}"):
        try:
            processor = load_vl_processor(path)
        except (OSError, ValueError, TypeError) as error:
            raise InferError(f"--model: no usable processor in {path}: {error}") from None
    size = _weights_size(path)
    if not size:
        raise InferError(f"--model: {path} has no weights (no {', '.join('*' + s for s in _WEIGHT_SUFFIXES)} file)")
    with progress(f"loading {cls.__name__} ({size / 1e9:.2f} GB of weights) as {str(dtype).split('.')[-1]} "
                  f"onto {device}"):
        try:
            model = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # unreadable / mismatched weight files
            raise InferError(f"--model: cannot load the weights in {path}: {error}") from None
    if adapter is not None:
        model = _merged_adapter(model, adapter, progress)
    model = model.to(device).eval()
    count = sum(p.numel() for p in model.parameters())
    progress.line(f"{count / 1e9:.2f} B parameters" if count >= 1e8 else f"{count / 1e6:.2f} M parameters")
    return model, processor


def _merged_adapter(model: torch.nn.Module, adapter: str | os.PathLike, progress: StagePrinter) -> torch.nn.Module:
    """`model` with the PEFT adapter in folder `adapter` merged into its weights (the same class comes back)."""
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise InferError(f"--adapter: {path} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        from peft import PeftModel
    except ImportError:
        raise InferError("--adapter needs the peft package: pip install peft") from None
    with progress(f"merging the adapter from {path}"):
        try:
            return PeftModel.from_pretrained(model, path, local_files_only=True).merge_and_unload()
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise InferError(f"--adapter: cannot apply {path} to this checkpoint: {error}") from None


def load_images(paths: list[str]):
    """RGB PIL images from PNG/JPEG/DICOM files; InferError naming the first unreadable one."""
    from .data.images import load_image

    images = []
    for path in paths:
        try:
            images.append(load_image(path))
        except (OSError, ValueError, ImportError) as error:
            raise InferError(f"--image {path}: {error}") from None
    return images


# ----------------------------------------------------------------------------------------------------------------
# output


def _box_text(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in box) + "]"


def format_result(result) -> str:
    """Human-readable summary of a ViToSResult: boxes, kept tokens, answer, pass-1 output, flags, stage timings."""
    lines = [f"question: {result.question.strip()}"]
    for index, boxes in enumerate(result.boxes):
        shown = "; ".join(_box_text(b) for b in boxes) if boxes else "none (all tokens kept)"
        lines.append(f"evidence boxes, image {index} ({result.image_sizes[index][0]}x{result.image_sizes[index][1]} "
                     f"px as seen): {shown}")
    lines.append(f"kept visual tokens: {result.kept_tokens}/{result.visual_tokens} ({100 * result.kept_ratio:.1f}%)")
    choice = f" (option {result.choice})" if result.choice else ""
    lines.append(f"answer: {result.answer}{choice}")
    if result.grounding_text is not None:
        lines.append(f"pass 1 output: {result.grounding_text.strip()}")
    if result.flags:
        lines.append(f"flags: {', '.join(result.flags)}")
    lines.append(format_timings(result.timings_ms))
    return "\n".join(lines)


def format_timings(timings: dict[str, float]) -> str:
    """One line of stage timings in ms."""
    names = [("preprocess", "preprocess"), ("vision", "vision"), ("pass1_prefill", "pass-1 prefill"),
             ("pass1_decode", "pass-1 decode"), ("parse", "parse"), ("pass2_prefill", "pass-2 prefill"),
             ("pass2_decode", "pass-2 decode"), ("total", "total")]
    return "timings (ms): " + " | ".join(f"{label} {timings.get(key, 0.0):.1f}" for key, label in names)


# ----------------------------------------------------------------------------------------------------------------
# entry point


def infer_main(args: Any) -> int:
    """`vitos-ext infer`. Returns the exit status: 0, or 2 after printing a clear error for bad inputs."""
    try:
        return _infer(args)
    except InferError as error:
        print(f"vitos-ext infer: error: {error}", file=sys.stderr)
        return 2


def _infer(args: Any) -> int:
    from .pipeline import DEFAULT_GROUNDING_PROMPT, ViToSPipeline

    progress = StagePrinter()
    if not isinstance(args.question, str) or not args.question.strip():
        raise InferError("--question must not be empty")
    model_class_for(args.model)  # fail on the folder / architecture before anything slow
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    with progress(f"reading {len(args.image)} image(s)"):
        images = load_images(args.image)
    model, processor = load_model_and_processor(args.model, dtype, device, progress, getattr(args, "adapter", None))
    try:
        pipeline = ViToSPipeline(
            model, processor, dilate=args.dilate, fuse=getattr(args, "fuse", False),
            max_new_tokens=args.max_new_tokens,
            grounding_prompt=getattr(args, "grounding_prompt", None) or DEFAULT_GROUNDING_PROMPT,
            answer_prompt=getattr(args, "answer_prompt", None), system_prompt=getattr(args, "system_prompt", None),
            attention=getattr(args, "attention", "auto"))
    except ValueError as error:
        raise InferError(str(error)) from None
    with progress("two-pass inference (grounding, then answering with the kept tokens)"):
        result = pipeline(images, args.question)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(format_result(result))
    return 0
