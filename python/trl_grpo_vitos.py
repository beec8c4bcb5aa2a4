"""Token-sparse GRPO with TRL: the ViToS sparse branch as a TRL GRPOTrainer run, offline, on the tiny VLM.

    python python/trl_grpo_vitos.py [--steps 20] [--sft-steps 80] [--model DIR] [--out outputs/trl-grpo]

Each training row is a phantom scan with a multiple-choice question and its gold lesion boxes. The policy (the tiny
Qwen2.5-VL shipped in vitos_ext, patched with vitos_ext.patch_model) answers in the ViToS output contract
``<think>...</think><box>[...]</box><answer>X</answer>`` while seeing only the visual tokens inside the row's boxes:
rollouts, old/new log-probs and the loss all run on the compacted sequence (vitos_ext.integrations.trl.
ViToSGRPOTrainer). Rewards are ViToS's format, IoU and accuracy rewards with TRL's signature.

A randomly initialized model never writes the contract, so every reward is 0 and GRPO has nothing to learn from;
unless ``--model`` points at a trained checkpoint, a short supervised warm-up on the gold outputs (also token-sparse:
the patched forward with the gold boxes) runs first. Everything runs on CPU in a few minutes; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vitos_ext.data.phantom import make_phantom_record  # noqa: E402
from vitos_ext.integrations.trl import TRL_REWARD_FUNCS, ViToSGRPOTrainer  # noqa: E402
from vitos_ext.parsing import format_output  # noqa: E402
from vitos_ext.patching import patch_model  # noqa: E402
from vitos_ext.pipeline import DEFAULT_GROUNDING_PROMPT  # noqa: E402
from vitos_ext.tiny import build_tiny_model, build_tiny_processor, load_tiny_model  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local checkpoint folder (default: the tiny random VLM)")
    parser.add_argument("--out", default="outputs/trl-grpo", help="TRL output_dir (logs, optional final model)")
    parser.add_argument("--samples", type=int, default=64, help="training rows (phantom scans)")
    parser.add_argument("--steps", type=int, default=20, help="GRPO optimizer steps")
    parser.add_argument("--batch", type=int, default=8, help="completions per step (per_device_train_batch_size)")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt (GRPO group size)")
    parser.add_argument("--max-completion-length", type=int, default=96)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--sft-steps", type=int, default=None,
                        help="supervised warm-up steps (default: 80 for a random model, 0 with --model)")
    parser.add_argument("--sft-learning-rate", type=float, default=3e-3)
    parser.add_argument("--dilate", type=int, default=0, help="grow the kept regions by this many tokens")
    parser.add_argument("--image-size", type=int, default=168, help="phantom scan side in pixels (6 x 6 tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", action="store_true", help="save the final model and processor to --out/final")
    args = parser.parse_args(argv)
    if args.batch % args.generations:
        parser.error("--batch must be a multiple of --generations (TRL groups the completions of a prompt)")
    for name in ("samples", "steps", "batch", "generations", "max_completion_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------------------------
# data


def phantom_rows(count: int, seed: int, image_size: int) -> list[dict]:
    """TRL vision-language rows: conversational prompt, image, and the answer / options / gold boxes / gold output."""
    rows = []
    for index in range(count):
        record, image = make_phantom_record(index, seed=seed, image_size=image_size, max_lesions=1)
        question = record["question"].replace("<image>", "").strip()
        rows.append({
            "prompt": [{"role": "user", "content": DEFAULT_GROUNDING_PROMPT.replace("{question}", question)}],
            "image": image,
            "answer": record["answer"],
            "options": record["options"],
            "bbox": record["bbox"],
            "gold_output": format_output(record["think"], record["bbox"], record["answer"]),
        })
    return rows


def to_dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([{k: v for k, v in row.items() if k != "gold_output"} for row in rows])


# ----------------------------------------------------------------------------------------------------------------
# supervised warm-up (token-sparse: the patched forward with the gold boxes)


def user_message(text: str) -> list[dict]:
    """One user turn: the image, then the text (what TRL builds from a row's prompt and image)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def sft_batch(processor, rows: list[dict]) -> dict:
    """Left-padded prompt + gold output, labels only on the output (and its end-of-turn token)."""
    tokenizer = processor.tokenizer
    prompts = [processor.apply_chat_template(user_message(r["prompt"][0]["content"]), add_generation_prompt=True,
                                             tokenize=False) for r in rows]
    targets = [r["gold_output"] + tokenizer.eos_token for r in rows]
    tokenizer.padding_side = "left"
    full = processor(text=[p + t for p, t in zip(prompts, targets)], images=[r["image"] for r in rows],
                     padding=True, return_tensors="pt")
    target_lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets]
    labels = torch.full_like(full["input_ids"], -100)
    for row, length in enumerate(target_lengths):
        labels[row, -length:] = full["input_ids"][row, -length:]
    return {**full, "labels": labels, "vitos_boxes": [torch.tensor(r["bbox"], dtype=torch.float32) for r in rows]}


def sft_warmup(model, processor, rows: list[dict], steps: int, learning_rate: float, batch_size: int,
               seed: int) -> list[float]:
    """Teacher-forced cross-entropy on the gold outputs through the pruned forward; returns the losses."""
    if steps <= 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    batches = [sft_batch(processor, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    losses = []
    model.train()
    for step in range(steps):
        batch = batches[int(torch.randint(len(batches), (1,), generator=generator))]
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            print(f"  sft step {step + 1:>3}/{steps}: loss {losses[-1]:.3f}", flush=True)
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------------------------
# GRPO


def grpo_config(args: argparse.Namespace):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=args.out,
        per_device_train_batch_size=args.batch,
        num_generations=args.generations,
        max_completion_length=args.max_completion_length,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        temperature=1.0,
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def make_trainer(model, processor, dataset, args: argparse.Namespace) -> ViToSGRPOTrainer:
    """A ViToSGRPOTrainer whose rollouts keep only the visual tokens inside each row's gold boxes."""
    return ViToSGRPOTrainer(model=model, reward_funcs=TRL_REWARD_FUNCS, args=grpo_config(args),
                            train_dataset=dataset, processing_class=processor, boxes_column="bbox",
                            vitos_dilate=args.dilate)


def print_history(history: list[dict]) -> None:
    columns = [("step", "step", "d"), ("reward", "reward", ".3f"),
               ("format", "rewards/trl_format_reward/mean", ".3f"), ("iou", "rewards/trl_iou_reward/mean", ".3f"),
               ("accuracy", "rewards/trl_accuracy_reward/mean", ".3f"), ("kept", "vitos/kept_ratio", ".3f"),
               ("loss", "loss", ".4f"), ("len", "completions/mean_length", ".1f")]
    print("  ".join(f"{title:>9}" for title, _, _ in columns))
    for entry in history:
        if "reward" not in entry:
            continue
        cells = [format(entry[key], fmt) if isinstance(entry.get(key), (int, float)) else "-"
                 for _, key, fmt in columns]
        print("  ".join(f"{cell:>9}" for cell in cells))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny tensors: more threads only contend
    if args.model:
        model, processor = load_tiny_model(args.model)
    else:
        model, processor = build_tiny_model(seed=args.seed), build_tiny_processor()
    patch_model(model)
    rows = phantom_rows(args.samples, args.seed, args.image_size)
    sft_steps = args.sft_steps if args.sft_steps is not None else (0 if args.model else 80)
    started = time.perf_counter()
    if sft_steps:
        print(f"token-sparse supervised warm-up: {sft_steps} steps")
        sft_warmup(model, processor, rows, sft_steps, args.sft_learning_rate, args.batch, args.seed)
    print(f"TRL GRPO, token-sparse rollouts (gold boxes, dilate {args.dilate}): {args.steps} steps of "
          f"{args.batch} completions ({args.generations} per prompt)")
    trainer = make_trainer(model, processor, to_dataset(rows), args)
    trainer.train()
    print_history(trainer.state.log_history)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    if args.save:
        trainer.save_model(str(out / "final"))
        processor.save_pretrained(out / "final")
    print(f"done in {time.perf_counter() - started:.0f} s; log history in {out / 'log_history.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
