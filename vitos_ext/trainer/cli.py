"""Command line / preset entry points of the trainer.

    vitos-ext train --preset tiny-phantom [--output-dir DIR] [--seed N] [--report-to tensorboard]
                    [--set key=value ...]
    vitos-ext train --model MODEL_DIR --train-file train.json [--sft-file sft.json] [--eval-file test.json]
                    [--device cuda] [--dtype float32] [--lora-rank 16] [--gradient-checkpointing] [--fsdp]
                    [--report-to tensorboard wandb] [--run-name NAME] [--set key=value ...]

The package CLI calls :func:`train_main` with the arguments after ``train``. ``tiny-phantom`` is the embedded,
offline CPU demonstration: it writes a synthetic phantom dataset, builds the tiny tokenizer / processor / Qwen2.5-VL,
runs SFT warm-up, stage 1 (grounding) and stage 2 (token-sparse), and prints the held-out evaluation table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import REPORT_TARGETS, TrainerConfig
from .data import prepare_training_data
from .distributed import DistributedConfig
from .evaluate import format_eval_table
from .trainer import DualStreamGRPOTrainer

__all__ = ["PRESETS", "PresetSpec", "run_preset", "train_main", "build_parser", "summarize"]

logger = logging.getLogger("vitos_ext.trainer")


@dataclass(frozen=True)
class PresetSpec:
    """An embedded, fully offline training recipe.

    Attributes:
        description: one line for --help.
        train_samples / eval_samples: phantom dataset sizes (train and held-out test use different seeds).
        sft_samples: size of a separate SFT warm-up set (its own seed), so that GRPO samples scans the warm-up
            never saw; 0: the warm-up uses the training scans.
        image_size: phantom image side in pixels; the processor resizes to exactly this (min = max pixels).
        lookalikes: up to this many distractor structures per phantom scan (vitos_ext.data.write_phantom_dataset).
        mimics: up to this many organ-sized structures with another lesion class's texture per phantom scan.
        text_config / vision_config: overrides of the tiny Qwen2.5-VL architecture.
        config: TrainerConfig fields.
    """

    description: str
    train_samples: int
    eval_samples: int
    image_size: int
    lookalikes: int = 0
    mimics: int = 0
    sft_samples: int = 0
    text_config: dict[str, Any] = field(default_factory=dict)
    vision_config: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, PresetSpec] = {
    "tiny-phantom": PresetSpec(
        description="tiny Qwen2.5-VL on synthetic phantom scans, CPU, SFT + stage 1 + stage 2 in < 15 min",
        # 4096 scans: with 512 the SFT warm-up sees each scan ~20 times and memorizes it (training accuracy 0.9,
        # held-out 0.76); the data is free, so the warm-up sees each scan about 8 times instead
        train_samples=4096,
        eval_samples=512,
        image_size=112,
        # head_dim 16 leaves 8 rotary frequencies; with Qwen's theta 1e6 the height/width sections of M-RoPE rotate
        # by < 0.03 rad per token and the model cannot tell visual tokens apart by position (boxes collapse to the
        # image centre). A small theta and more frequencies for height/width make box regression learnable here.
        text_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                     "num_attention_heads": 8, "num_key_value_heads": 4,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 2.0, "mrope_section": [1, 3, 4]}},
        # the shipped tiny vision tower (hidden 32) caps lesion classification near 0.76 held-out accuracy; hidden 64
        # costs little (64 patches per scan) and lifts it to ~0.95
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_heads": 4},
        config=dict(
            schedule="stages",
            # box regression needs the longer warm-up: held-out IoU 0.09-0.15 after 350 steps, 0.33-0.37 after 1000
            sft_steps=1000, sft_batch_size=32, sft_lr=2e-3, sft_warmup_steps=20, sft_sparse_fraction=0.5,
            grounding_steps=40, sparse_steps=30, prompts_per_step=8, group_size=8, sparse_group_size=2,
            updates_per_batch=2, lr=5e-5, sparse_lr=2e-5, epsilon_low=0.2, epsilon_high=0.28, beta=0.0,
            # a low sampling temperature keeps GRPO close to the greedy mode that the evaluation decodes
            temperature=0.7, top_p=1.0, max_new_tokens=80,
            # stage 1 optimizes grounding (IoU, box precision against hedging with extra boxes, format) and keeps
            # the answers right (accuracy weight 1: with 0.25 stage 1 traded held-out accuracy for IoU); at this
            # scale the cross-feedback of a still weak sparse branch is mostly noise for the boxes, and skipping it
            # halves the stage-1 rollouts. Stage 2 uses cross-feedback (accuracy of O_i).
            grounding_rewards={"format": 0.25, "iou": 2.0, "precision": 1.0, "accuracy": 1.0, "cross": 0.0},
            sparse_rewards={"format": 0.25, "accuracy": 1.0, "cross": 0.5, "iou": 0.0},
            # stage 2's rollouts answer ~97% of the training prompts right, so most G x G' groups carry no
            # advantage; dynamic sampling fills each step with groups that do (up to 3 rounds of 8 prompts)
            dynamic_sampling=True, max_sampling_rounds=3,
            # both cores of the 2-core development machine: ~1.4x faster than one thread (results differ from a
            # one-thread run in the last bits, so tables state the thread count)
            eval_batch_size=128, save_every=0, num_threads=2,
        ),
    ),
}


def _write_phantom(data_dir: Path, spec: PresetSpec, seed: int) -> tuple[Path, Path, Path | None]:
    """(train, test, sft or None) JSON files, each split with its own seed: test 2s+2; the scans the warm-up trains
    on 2s+1 (the SFT set when there is one, else the training set), a separate GRPO training set 2s+1 + 10^6."""
    from ..data import write_phantom_dataset

    common = dict(image_size=spec.image_size, lookalikes=spec.lookalikes, mimics=spec.mimics)
    test = write_phantom_dataset(data_dir, spec.eval_samples, seed=2 * seed + 2, split="test", **common)
    if not spec.sft_samples:
        train = write_phantom_dataset(data_dir, spec.train_samples, seed=2 * seed + 1, split="train", **common)
        return train, test, None
    sft = write_phantom_dataset(data_dir, spec.sft_samples, seed=2 * seed + 1, split="sft", **common)
    train = write_phantom_dataset(data_dir, spec.train_samples, seed=2 * seed + 1 + 10**6, split="train", **common)
    return train, test, sft


def _tiny_model_and_processor(spec: PresetSpec, seed: int):
    from ..tiny import build_tiny_model, build_tiny_processor, tiny_qwen2_5_vl_config

    pixels = spec.image_size * spec.image_size
    processor = build_tiny_processor(min_pixels=pixels, max_pixels=pixels)
    overrides = {}
    if spec.text_config:
        overrides["text_config"] = dict(spec.text_config)
    if spec.vision_config:
        overrides["vision_config"] = dict(spec.vision_config)
    config = tiny_qwen2_5_vl_config(processor.tokenizer, **overrides)
    # eager attention: at these sizes it is faster on CPU than SDPA's kernels
    model = build_tiny_model(seed=seed, config=config, attn_implementation="eager")
    return model, processor


def summarize(results: dict[str, dict], wall_seconds: float | None = None) -> str:
    """The evaluation table plus the two claims the tiny preset demonstrates, as Markdown."""
    lines = [format_eval_table(results)]
    sft, stage1, stage2 = (results.get(k) for k in ("after SFT", "after stage 1", "after stage 2"))
    if sft and stage1:
        lines.append(f"\nIoU after stage 1 vs after SFT: {stage1['iou']:.3f} vs {sft['iou']:.3f} "
                     f"({'up' if stage1['iou'] > sft['iou'] else 'NOT up'})")
    if sft and stage2:
        holds = stage2["accuracy_sparse"] >= sft["accuracy_full"] and stage2["kept_ratio"] <= 0.5
        lines.append(f"sparse-token accuracy after stage 2 at {100 * stage2['kept_ratio']:.1f}% of visual tokens vs "
                     f"full-token accuracy after SFT: {stage2['accuracy_sparse']:.3f} vs {sft['accuracy_full']:.3f} "
                     f"({'holds' if holds else 'does NOT hold'})")
    if wall_seconds is not None:
        lines.append(f"wall time: {wall_seconds / 60:.1f} min")
    return "\n".join(lines)


def run_preset(name: str = "tiny-phantom", output_dir: str | Path | None = None, seed: int = 0,
               overrides: dict[str, Any] | None = None, resume: bool = False,
               progress: bool = True) -> dict[str, dict]:
    """Run an embedded preset end to end, offline.

    Args:
        name: a key of :data:`PRESETS`.
        output_dir: where data, checkpoints, metrics.jsonl, curves.png, eval_table.md and ``final/`` (the trained
            model + processor, loadable with vitos_ext.tiny.load_tiny_model) go; default ``outputs/<name>``.
        seed: seeds the data, the model initialization and training.
        overrides: TrainerConfig fields to change (e.g. {"sparse_steps": 5}).
        resume: continue an interrupted run in output_dir from its tracker file.
        progress: show tqdm progress bars.

    Returns:
        Evaluation results by label ("after SFT", "after stage 1", "after stage 2").
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    spec = PRESETS[name]
    started = time.perf_counter()
    output_dir = Path(output_dir) if output_dir is not None else Path("outputs") / name
    config = TrainerConfig.from_dict({**spec.config, "output_dir": str(output_dir), "seed": seed,
                                      "progress": progress, **(overrides or {})})
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    train_file, test_file, sft_file = _write_phantom(output_dir / "data", spec, seed)
    model, processor = _tiny_model_and_processor(spec, seed)
    train_data = prepare_training_data(train_file)
    eval_data = prepare_training_data(test_file)
    sft_data = prepare_training_data(sft_file) if sft_file is not None else None
    trainer = DualStreamGRPOTrainer(model, processor, train_data, config, eval_data=eval_data, sft_data=sft_data)
    results = trainer.train(resume=resume)
    wall = time.perf_counter() - started
    summary = summarize(results, wall)
    (output_dir / "summary.md").write_text(summary + "\n")
    print(summary)
    print(f"final model: {output_dir / 'final'}  (metrics: {output_dir / 'metrics.jsonl'}, curves: "
          f"{output_dir / 'curves.png'})")
    return results


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``vitos-ext train``."""
    parser = argparse.ArgumentParser(prog="vitos-ext train", description="ViToS dual-stream GRPO training")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="an embedded offline recipe (tiny-phantom)")
    parser.add_argument("--model", help="local model folder (with its processor), when not using a preset")
    parser.add_argument("--train-file", help="ViToS JSON training data, when not using a preset")
    parser.add_argument("--sft-file", help="ViToS JSON data of the SFT warm-up (optional; default: --train-file)")
    parser.add_argument("--eval-file", help="held-out ViToS JSON data (optional)")
    parser.add_argument("--config", help="JSON file with TrainerConfig fields")
    parser.add_argument("--output-dir", help="output folder (default outputs/<preset> or from --config)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrainerConfig field; VALUE is JSON (e.g. --set group_size=8)")
    parser.add_argument("--device", default=None,
                        help="with --model: where to train (default cuda:LOCAL_RANK when CUDA is available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_WEIGHT_DTYPES),
                        help="with --model: dtype of the loaded weights (default float32: master weights, with bf16 "
                             "autocast on CUDA, see mixed_precision; bfloat16 weights lose small AdamW updates)")
    parser.add_argument("--lora-rank", type=int, default=0, metavar="R",
                        help="with --model: train LoRA adapters of rank R (needs peft) instead of every weight")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    parser.add_argument("--lora-targets", default=LORA_TARGETS, metavar="REGEX",
                        help="modules that get adapters: a regex fully matching module names (default: the language "
                             "model's attention and MLP projections)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="with --model: recompute each layer's activations in backward (less memory, ~1.3x time)")
    parser.add_argument("--fsdp", action="store_true",
                        help="with --model under torchrun: shard parameters, gradients and optimizer states (FSDP2) "
                             "instead of replicating them (DDP)")
    parser.add_argument("--report-to", nargs="+", choices=(*REPORT_TARGETS, "none"), metavar="TRACKER",
                        help=f"also send the metrics to these trackers ({', '.join(REPORT_TARGETS)}; "
                             "TensorBoard logs go to OUTPUT_DIR/tensorboard)")
    parser.add_argument("--run-name", help="the trackers' run name (default: the output folder's name)")
    parser.add_argument("--resume", action="store_true", help="continue from the output folder's tracker file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _overrides(pairs: list[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string
    return overrides


def _tracker_options(args: argparse.Namespace) -> dict[str, Any]:
    """TrainerConfig fields given by --report-to / --run-name (only those given: a --config file may set them)."""
    options: dict[str, Any] = {}
    if args.report_to is not None:
        options["report_to"] = list(args.report_to)
    if args.run_name is not None:
        options["run_name"] = args.run_name
    return options


# the language model's attention and MLP projections (Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA name them alike); the
# vision tower's MLPs share the projection names, hence the path
LORA_TARGETS = r".*language_model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
_WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# options that only a --model run reads (a preset builds its own model and data)
_MODEL_RUN_OPTIONS = ("model", "train_file", "sft_file", "eval_file", "device", "dtype", "lora_rank", "lora_alpha",
                      "lora_targets", "gradient_checkpointing", "fsdp")


def training_device(name: str | None) -> torch.device:
    """torch.device for ``--device``: None -> cuda when available, else cpu; a bare "cuda" is cuda:LOCAL_RANK (one
    process per GPU under torchrun). Raises pipeline_cli.InferError for a device this machine lacks."""
    from ..pipeline_cli import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _with_lora(model, rank: int, alpha: float | None, targets: str):
    """`model` wrapped by PEFT with LoRA adapters of rank `rank` on the modules whose names fully match `targets`."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("--lora-rank needs peft (pip install peft)") from None
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                        target_modules=targets)
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # e.g. no module matches
        raise ValueError(f"--lora-targets {targets!r}: {error}") from None


def _load_policy(args: argparse.Namespace):
    """(model on its training device, processor) for ``--model`` (a checkpoint folder, or "tiny"), with LoRA adapters
    when ``--lora-rank`` is given."""
    from ..evaluation import load_eval_model
    from ..pipeline_cli import StagePrinter

    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0, got {args.lora_rank}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise ValueError(f"--lora-alpha must be > 0, got {args.lora_alpha}")
    device = training_device(args.device)
    dtype = _WEIGHT_DTYPES[args.dtype]  # bfloat16 with full fine-tuning: the trainer warns about lost updates
    if args.no_progress:  # transformers' own weight-loading bar too
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    model, processor = load_eval_model(args.model, device, dtype, args.seed, StagePrinter(enabled=not args.no_progress))
    if args.gradient_checkpointing:  # non-reentrant: inputs need no requires_grad, also under LoRA
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_rank:
        model = _with_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets)
    return model, processor


def _check_no_model_options(args: argparse.Namespace) -> None:
    """A preset builds its own model and data: options of --model runs would be ignored, so they are refused."""
    parser = build_parser()
    given = ["--" + dest.replace("_", "-") for dest in _MODEL_RUN_OPTIONS
             if getattr(args, dest) != parser.get_default(dest)]
    if given:
        raise ValueError(f"--preset {args.preset} builds its own model and data on the CPU: drop "
                         f"{', '.join(given)} (options of --model runs)")


def _run_custom(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    if not args.model or not args.train_file:
        raise ValueError("without --preset, --model and --train-file are required")
    base = json.loads(Path(args.config).read_text()) if args.config else {}
    if args.output_dir:
        base["output_dir"] = args.output_dir
    config = TrainerConfig.from_dict({**base, "seed": args.seed, "progress": not args.no_progress, **overrides})
    model, processor = _load_policy(args)
    train_data = prepare_training_data(args.train_file)
    eval_data = prepare_training_data(args.eval_file) if args.eval_file else None
    sft_data = prepare_training_data(args.sft_file) if args.sft_file else None
    distributed = DistributedConfig(strategy="fsdp2" if args.fsdp else "ddp")
    trainer = DualStreamGRPOTrainer(model, processor, train_data, config, eval_data=eval_data, sft_data=sft_data,
                                    distributed=distributed)
    results = trainer.train(resume=args.resume)
    if results:
        print(format_eval_table(results))


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of ``vitos-ext train``; returns the process exit code (0 ok, 2 bad arguments, 1 failure)."""
    from ..pipeline_cli import InferError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = {**_tracker_options(args), **_overrides(args.set)}
        if args.config and args.preset:
            overrides = {**json.loads(Path(args.config).read_text()), **overrides}
        if args.preset:
            _check_no_model_options(args)
            run_preset(args.preset, args.output_dir, args.seed, overrides, resume=args.resume,
                       progress=not args.no_progress)
        else:
            _run_custom(args, overrides)
    except (ValueError, FileNotFoundError, InferError) as error:
        print(f"vitos-ext train: error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        print(f"vitos-ext train: stopped: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
