"""The `vitos-ext` command line: demo, infer, train, eval.

Every subcommand runs offline: models come from local directories or from configs shipped in the package.
"""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def _train(args: argparse.Namespace) -> int:
    from .trainer.cli import train_main

    return train_main(args.rest)


def _infer(args: argparse.Namespace) -> int:
    from .pipeline_cli import infer_main

    return infer_main(args)


def _eval(args: argparse.Namespace) -> int:
    from .evaluation import eval_main

    return eval_main(args.rest)


# the --adapter option of `infer` and `eval` (both load through pipeline_cli.load_model_and_processor)
ADAPTER_HELP = "local PEFT adapter folder (e.g. a LoRA fine-tune of --model), merged into the weights"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitos-ext", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the main job on an embedded default (no network)")
    demo.add_argument("--out", default="outputs/demo", help="output folder for the PNGs and the JSON summary")
    demo.add_argument("--model", default=None, help="a local checkpoint directory (default: the trained tiny "
                      "phantom model when present, else a tiny random VLM built from the shipped config)")
    demo.add_argument("--image-size", type=int, default=448, help="side of the synthetic scan in pixels")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.set_defaults(run=_demo)

    infer = commands.add_parser("infer", help="two-pass token-sparse answering with a local checkpoint")
    infer.add_argument("--model", required=True, help="local checkpoint directory (e.g. a downloaded Lingshu-7B)")
    infer.add_argument("--image", required=True, action="append", help="PNG/JPEG/DICOM file (repeatable)")
    infer.add_argument("--question", required=True)
    infer.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    infer.add_argument("--device", default=None)
    infer.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    infer.add_argument("--max-new-tokens", type=int, default=256)
    infer.add_argument("--dilate", type=int, default=0, help="grow the kept region by this many tokens")
    infer.add_argument("--fuse", action="store_true", help="fuse each dropped visual token into the nearest kept one")
    infer.add_argument("--attention", default="auto", choices=["auto", "varlen", "model"],
                       help="route attention through vitos varlen kernels (auto: on CUDA only)")
    infer.add_argument("--system-prompt", default=None)
    infer.add_argument("--grounding-prompt", default=None, help="pass-1 instruction (default: the ViToS one)")
    infer.add_argument("--answer-prompt", default=None, help="pass-2 instruction (default: same prompt as pass 1)")
    infer.add_argument("--json", action="store_true", help="print the result as JSON")
    infer.set_defaults(run=_infer)

    train = commands.add_parser("train", help="dual-stream GRPO training (see `vitos-ext train --help`)",
                                add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="multiple-choice VQA evaluation, full vs token-sparse",
                                   add_help=False)
    evaluate.add_argument("rest", nargs=argparse.REMAINDER)
    evaluate.set_defaults(run=_eval)
    return parser


# Subcommands that parse their own arguments: argparse cannot hand a REMAINDER that starts with an option through.
_SELF_PARSING = {"train": lambda argv: _train(argparse.Namespace(rest=argv)),
                 "eval": lambda argv: _eval(argparse.Namespace(rest=argv))}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vitos-ext` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _SELF_PARSING:
        return int(_SELF_PARSING[argv[0]](argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
