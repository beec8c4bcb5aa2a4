"""Token-sparse log-probs on a verl-style remove-padding batch, through varlen attention.

    python python/verl_packed_example.py [--batch 4] [--device cpu|cuda] [--dilate 0] [--fuse]

What it does, offline, with the tiny Qwen2.5-VL shipped in vitos_ext (random weights):
  1. builds what verl's actor receives for a Qwen2.5-VL rollout batch: input_ids / attention_mask [B, L]
     (left-padded prompts with an image each, right-padded responses), position_ids [B, 4, L] (text row + M-RoPE
     rows from the model's get_rope_index), pixel_values, image_grid_thw, and per-image evidence boxes;
  2. prunes it with vitos_ext.integrations.prune_packed_batch into one packed row [1, T'] + cu_seqlens, keeping only
     the visual tokens inside the boxes (original M-RoPE positions kept);
  3. runs the language model on the packed pruned row with attn_implementation "vitos_varlen" (SDPA with packed
     text positions when that backend is not installed), computes the response log-probs and scatters them back
     to [B, L] the way verl's pad_input does;
  4. checks them against the unpruned-but-masked reference: the padded batch through eager attention with a 4-D
     mask that hides the dropped visual tokens. Pruning a token and masking it out as a key must agree.
Exit status 1 when they disagree beyond the tolerance.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from vitos_ext.data.phantom import make_phantom_record
from vitos_ext.integrations import packed_inputs_embeds, prune_packed_batch
from vitos_ext.parsing import format_output
from vitos_ext.profiling import nvtx_range
from vitos_ext.tiny import build_tiny_model, build_tiny_processor

IMAGE_SIZES = ((112, 112), (168, 112), (140, 196), (224, 168), (112, 224), (196, 196))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="rollouts in the batch")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dilate", type=int, default=0, help="grow the kept regions by this many tokens")
    parser.add_argument("--fuse", action="store_true", help="fuse dropped tokens into the nearest kept one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |log-prob difference| allowed")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    return args


def select_attention(model) -> str:
    """Route the language model through "vitos_varlen" when the backend is installed, else packed SDPA."""
    try:
        from vitos_ext.hf_attention import register_hf_attention
    except ImportError:
        name = "sdpa"  # transformers finds the packed sequences from the restarting text-position row
    else:
        name = register_hf_attention()
    model.model.language_model.config._attn_implementation = name
    return name


def build_remove_padding_batch(processor, model, batch_size: int, seed: int, device: torch.device) -> dict:
    """What verl's actor gets for a Qwen2.5-VL rollout batch, plus the gold evidence boxes of each image."""
    prompts, responses, images, boxes = [], [], [], []
    for index in range(batch_size):
        record, image = make_phantom_record(index, seed=seed, image_size=IMAGE_SIZES[index % len(IMAGE_SIZES)])
        question = record["question"].replace("<image>", "")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        responses.append(format_output(record["think"], record["bbox"], record["answer"]) + "<|im_end|>")
        images.append(image)
        boxes.append(torch.tensor(record["bbox"], dtype=torch.float32))
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    prompt = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    tokenizer.padding_side = "right"
    response = tokenizer(responses, padding=True, return_tensors="pt", add_special_tokens=False)
    input_ids = torch.cat([prompt["input_ids"], response["input_ids"]], 1)
    attention_mask = torch.cat([prompt["attention_mask"], response["attention_mask"]], 1)
    mm_token_type_ids = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(response["input_ids"])], 1)
    rope, _ = model.model.get_rope_index(input_ids, mm_token_type_ids, prompt["image_grid_thw"],
                                         attention_mask=attention_mask)
    text = (attention_mask.cumsum(-1) - 1).clamp_min(0) * attention_mask
    position_ids = torch.cat([text[None], rope]).transpose(0, 1)  # verl keeps [B, 4, L]
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 responses=response["input_ids"], response_mask=response["attention_mask"],
                 pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"])
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["vitos_boxes"] = [b.to(device) for b in boxes]
    return batch


def response_log_probs(model, pruned, response_length: int) -> torch.Tensor:
    """float32 [B, R]: log-probs of the response tokens from the pruned packed forward, scattered back."""
    with nvtx_range("vitos.example.language_model"):
        hidden = model.model.language_model(**pruned.language_model_kwargs()).last_hidden_state[0]
    logits = model.lm_head(hidden).float()
    labels = pruned.next_token_labels()
    picked = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[:, None])[:, 0]
    per_token = pruned.scatter(picked.masked_fill(labels < 0, 0.0))  # [B, L]: log p(token at l + 1)
    return per_token[:, -response_length - 1:-1]


def masked_reference_log_probs(model, batch: dict, pruned, response_length: int) -> torch.Tensor:
    """The same log-probs from the padded, unpruned batch with the dropped tokens masked out of attention."""
    input_ids = batch["input_ids"]
    length = input_ids.shape[1]
    embeds = packed_inputs_embeds(model, input_ids, batch["pixel_values"], batch["image_grid_thw"])
    kept = pruned.scatter(torch.ones(pruned.num_tokens, dtype=torch.bool, device=input_ids.device), False)
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    allowed = causal[None] & kept[:, None, :]
    mask = torch.zeros(allowed.shape, device=input_ids.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    language_model = model.model.language_model
    previous = language_model.config._attn_implementation
    language_model.config._attn_implementation = "eager"  # the custom 4-D mask is applied as is
    try:
        hidden = language_model(inputs_embeds=embeds, attention_mask=mask[:, None],
                                position_ids=batch["position_ids"].transpose(0, 1), use_cache=False).last_hidden_state
    finally:
        language_model.config._attn_implementation = previous
    logits = model.lm_head(hidden[:, -response_length - 1:-1]).float()
    picked = logits.log_softmax(-1).gather(-1, batch["responses"][..., None])[..., 0]
    return picked * batch["response_mask"]


def timed(fn, repeats: int = 3):
    """(result, median milliseconds over `repeats` calls after one warm-up call), CUDA-synchronized."""
    result = fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return result, sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: more threads only contend
    processor = build_tiny_processor()
    model = build_tiny_model(seed=args.seed).to(device)
    attention = select_attention(model)
    batch = build_remove_padding_batch(processor, model, args.batch, args.seed, device)
    response_length = batch["responses"].shape[1]
    prune = dict(attention_mask=batch["attention_mask"], model=model, pixel_values=batch["pixel_values"],
                 vitos_dilate=args.dilate, vitos_fuse=True if args.fuse else None)
    with torch.no_grad():
        full, full_ms = timed(lambda: prune_packed_batch(batch["input_ids"], batch["position_ids"].transpose(0, 1),
                                                         batch["image_grid_thw"], **prune))
        pruned, prune_ms = timed(lambda: prune_packed_batch(
            batch["input_ids"], batch["position_ids"].transpose(0, 1), batch["image_grid_thw"],
            vitos_boxes=batch["vitos_boxes"], **prune))
        _, full_lm_ms = timed(lambda: response_log_probs(model, full, response_length))
        sparse, sparse_lm_ms = timed(lambda: response_log_probs(model, pruned, response_length))
        difference = float("nan")
        if not args.fuse:  # fusion changes the kept embeddings: there is no masked equivalent to compare with
            reference = masked_reference_log_probs(model, batch, pruned, response_length)
            difference = float((sparse * batch["response_mask"] - reference).abs().max())

    valid_tokens = int(batch["attention_mask"].sum())
    print(f"attention: {attention}   device: {device}   batch: {args.batch}   padded [B, L] = "
          f"{tuple(batch['input_ids'].shape)}")
    print(f"{'':28}{'tokens':>10}{'max seqlen':>12}{'LM forward ms':>15}")
    print(f"{'packed, all tokens':28}{valid_tokens:>10}{full.max_seqlen:>12}{full_lm_ms:>15.2f}")
    print(f"{'packed, pruned to boxes':28}{pruned.num_tokens:>10}{pruned.max_seqlen:>12}{sparse_lm_ms:>15.2f}")
    print(f"visual tokens kept: {int(pruned.visual_kept_counts.sum())}/{int(pruned.visual_counts.sum())} "
          f"({pruned.kept_ratio:.1%}); per sequence {pruned.visual_kept_counts.tolist()} of "
          f"{pruned.visual_counts.tolist()}; prune_packed_batch {prune_ms:.2f} ms (incl. vision tower)")
    mean_logp = (sparse * batch["response_mask"]).sum() / batch["response_mask"].sum()
    print(f"mean response log-prob (sparse): {float(mean_logp):.4f}")
    if args.fuse:
        print("token fusion on: no masked reference to compare with")
        return 0
    ok = difference <= args.tolerance
    print(f"max |log-prob(pruned packed) - log-prob(masked reference)| = {difference:.2e} "
          f"({'OK' if ok else 'MISMATCH'}, tolerance {args.tolerance:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
