"""End-to-end GPU benchmark (issue 4): Hugging Face "sdpa" vs the vitos_ext patch on Qwen2.5-VL-7B shapes.

    python3 benchmarks/gpu_e2e.py            # one CUDA GPU, bf16, random weights; < 5 minutes on an H100
    python3 benchmarks/gpu_e2e.py --tiny     # scaled-down config on CPU in fp32: exercises every code path

Model: Qwen2_5_VLForConditionalGeneration built from a config with random weights (no download): hidden 3584,
28 layers, 28 query / 4 KV heads, intermediate 18944, vocab 152064; vision depth 32, hidden 1280, 16 heads,
intermediate 3420, 112 px windows, full attention in blocks 7/15/23/31. Prompt: one 1008x1008 image (72x72 patches ->
1296 visual tokens) inside 64 text tokens, 1360 tokens in all.

Rows (HF = the unpatched model, attn_implementation="sdpa"; vitos = the same weights after
vitos_ext.patch_model(attention="varlen"): vision attention as one varlen call per layer, language model through the
"vitos_varlen" attention, RMSNorm / SwiGLU / rotary as one Triton kernel each on CUDA; the "fused_layers='off'"
rows take those kernels out again):
  vision tower            get_image_features on the image (HF runs one SDPA call per window / image).
  LM prefill, k% kept     HF: the language model + last-token logits on the prompt already compacted to k% of its
                          visual tokens (what HF would spend on a prompt that short: it cannot drop tokens itself).
                          vitos: the patched forward with reused image features and vitos_keep (embedding, pruning,
                          varlen attention, last-token logits): what a token-sparse prefill costs end to end.
  LM only, 77%            both on the identical compacted inputs: isolates the attention backend.
  batch of 8 ragged       8 prompts pruned to 408..1360 tokens. HF: the left-padded compacted batch through SDPA with
                          the padding mask. vitos: the patched forward on the 8 prompts with a per-sample keep mask
                          (its language model runs the kept tokens packed, without padding rows, and hands back the
                          left-padded outputs and KV cache).
  two-pass prefill        vitos: vision once + full prefill (pass 1) + 77% prefill (pass 2), as vitos_ext.ViToSPipeline
                          runs them; HF: one full forward (vision + prefill) of the same prompt.
Timing: median of CUDA events after warm-up (benchmarks/timing.py). Check: max |vitos - HF| / max |HF| of the
last-token logits (vision: of the image features); bf16 random weights give ~1e-2, fp32 ~1e-6. A variant that fails
prints its error in its row and the run continues (exit status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import cuda_median_ms, markdown_table  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class Shapes:
    """A model config and the prompt built around one square image."""

    name: str
    text_config: dict
    vision_config: dict
    image_px: int
    text_before: int  # text tokens before <|vision_start|>
    text_after: int  # text tokens after <|vision_end|>
    batch_lengths: tuple[int, ...]  # prompt lengths of the ragged batch after pruning
    kept_ratios: tuple[float, ...] = (1.0, 0.77, 0.5)
    token_ids: dict = field(default_factory=dict)  # image / video / vision_start / vision_end
    targets: bool = False  # compare with the DESIGN.md targets (7B shapes only)


QWEN2_5_VL_7B = Shapes(
    name="Qwen2.5-VL-7B shapes",
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     hidden_act="silu", use_sliding_window=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, in_channels=3, hidden_act="silu"),
    image_px=1008, text_before=15, text_after=47,
    batch_lengths=(408, 544, 680, 816, 952, 1088, 1224, 1360),
    token_ids=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653),
    targets=True,
)

TINY = Shapes(
    name="tiny shapes (--tiny)",
    text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, rms_norm_eps=1e-6,
                     hidden_act="silu", use_sliding_window=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
    # 56 px windows = 2x2 merged tokens: the windowed layers really run several windows
    vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3],
                       tokens_per_second=2, in_channels=3, hidden_act="silu"),
    image_px=224, text_before=5, text_after=11,
    batch_lengths=(26, 34, 42, 50, 58, 66, 74, 82),
    token_ids=dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503),
)

# DESIGN.md targets on an H100: (text, predicate on (hf_ms, vitos_ms))
TARGETS: dict[str, tuple[str, Callable[[float, float], bool]]] = {
    "vision": ("<= 30 ms (HF 174)", lambda hf, vitos: vitos <= 30.0),
    "prefill 0.77": ("<= 29 ms (HF 30.8)", lambda hf, vitos: vitos <= 29.0),
    "batch": ("<= 160 ms (HF 316 padded)", lambda hf, vitos: vitos <= 160.0),
    "two-pass": ("<= 0.5x HF full forward (202)", lambda hf, vitos: vitos <= 0.5 * hf),
}


def build_config(shapes: Shapes):
    """Qwen2_5_VLConfig of `shapes` (untied embeddings, as the 7B checkpoint)."""
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(text_config=dict(shapes.text_config), vision_config=dict(shapes.vision_config),
                              tie_word_embeddings=False, **shapes.token_ids)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


def build_model(shapes: Shapes, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Randomly initialized Qwen2_5_VLForConditionalGeneration (sdpa attention) created directly on `device`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(build_config(shapes), dtype=dtype,
                                                                attn_implementation="sdpa")
    return model.eval()


def build_prompt(shapes: Shapes, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-style inputs of one prompt: input_ids / attention_mask / mm_token_type_ids int64 [1, L],
    pixel_values [h * w, 3 * tp * p * p] (random, `dtype`), image_grid_thw int64 [1, 3]."""
    vision, ids = shapes.vision_config, shapes.token_ids
    patch, merge = vision["patch_size"], vision["spatial_merge_size"]
    side = shapes.image_px // patch
    if shapes.image_px % (patch * merge):
        raise ValueError(f"image_px must be a multiple of {patch * merge}, got {shapes.image_px}")
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(10, min(ids.values()) - 1, (shapes.text_before + shapes.text_after,), generator=generator)
    visual = side * side // merge ** 2
    input_ids = torch.cat([text[:shapes.text_before], torch.tensor([ids["vision_start_token_id"]]),
                           torch.full((visual,), ids["image_token_id"]), torch.tensor([ids["vision_end_token_id"]]),
                           text[shapes.text_before:]])[None]
    channels = vision["in_channels"] * vision["temporal_patch_size"] * patch * patch
    pixel_values = torch.randn(side * side, channels, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "mm_token_type_ids": (input_ids == ids["image_token_id"]).long().to(device),
        "pixel_values": pixel_values.to(device, dtype),
        "image_grid_thw": torch.tensor([[1, side, side]], device=device),
    }


def repeat_prompt(prompt: dict[str, torch.Tensor], copies: int) -> dict[str, torch.Tensor]:
    """A batch of `copies` identical prompts (and images)."""
    out = {k: prompt[k].repeat(copies, 1) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out["pixel_values"] = prompt["pixel_values"].repeat(copies, 1)
    out["image_grid_thw"] = prompt["image_grid_thw"].repeat(copies, 1)
    return out


def keep_first(visual: int, kept: int, device: torch.device) -> torch.Tensor:
    """bool [visual] keeping `kept` tokens (the top rows of the image: which ones does not change the cost)."""
    if not 0 <= kept <= visual:
        raise ValueError(f"kept must be in [0, {visual}], got {kept}")
    keep = torch.zeros(visual, dtype=torch.bool, device=device)
    keep[:kept] = True
    return keep


def text_inputs(prompt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The prompt without pixel_values (image features are passed precomputed)."""
    return {k: v for k, v in prompt.items() if k != "pixel_values"}


# ----------------------------------------------------------------------------------------------------------------
# measuring


class Timer:
    """Median milliseconds of fn(): CUDA events after warm-up on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps

    def __call__(self, fn: Callable[[], Any]) -> float:
        with torch.no_grad():
            if self.device.type == "cuda":
                return cuda_median_ms(fn, warmup=self.warmup, reps=self.reps)
            for _ in range(self.warmup):
                fn()
            times = []
            for _ in range(max(self.reps, 1)):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)


@dataclass
class Row:
    """One line of the table. key selects the DESIGN.md target (see TARGETS)."""

    stage: str
    key: str = ""
    hf_ms: float | None = None
    vitos_ms: float | None = None
    check: float | None = None
    errors: list[str] = field(default_factory=list)


def guarded(row: Row, what: str, fn: Callable[[], Any]) -> Any:
    """Run fn(); on failure record "what: error" in the row, free what it held and return None."""
    try:
        with torch.no_grad():
            return fn()
    except Exception as error:  # noqa: BLE001 - a failing variant must not stop the benchmark
        message = " ".join(str(error).split())
        row.errors.append(f"{what}: {type(error).__name__}: {message[:160]}")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def relative_difference(got: torch.Tensor | None, want: torch.Tensor | None) -> float | None:
    """max |got - want| / max |want| in float32 (None when either is missing)."""
    if got is None or want is None:
        return None
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def image_features(model, prompt: dict[str, torch.Tensor]) -> torch.Tensor:
    """[visual, hidden] image embeddings of the unpatched model (HF's own vision path)."""
    output = model.model.get_image_features(prompt["pixel_values"], prompt["image_grid_thw"], return_dict=True)
    pooled = output.pooler_output
    return torch.cat(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled


def capture_language_model_inputs(model, call: Callable[[], Any]) -> dict[str, torch.Tensor]:
    """Run a patched forward and return what its language model received after pruning (inputs_embeds,
    attention_mask, position_ids): the compacted, left-padded prompt, to feed HF's own language model the same tokens
    (captured with the packed prefill switched off, since HF's baseline takes the left-padded batch)."""
    import vitos_ext.patching as patching

    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs):  # registered after the patch's pruning hook: sees the compacted inputs
        if not captured:
            captured.update({k: kwargs[k].clone() for k in ("inputs_embeds", "attention_mask", "position_ids")
                             if isinstance(kwargs.get(k), torch.Tensor)})

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    packed_prefill, patching.PACKED_PREFILL = patching.PACKED_PREFILL, False
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
        patching.PACKED_PREFILL = packed_prefill
    if "inputs_embeds" not in captured:
        raise RuntimeError("the language model was not called with inputs_embeds")
    return captured


def language_model_prefill(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Language model over given embeddings (+ KV cache) and the last token's logits [B, V]."""
    output = model.model.language_model(**inputs, use_cache=True)
    return model.lm_head(output.last_hidden_state[:, -1])


def pack_compacted(compacted: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The left-padded compacted batch as one packed row [1, T'] (FlashAttention varlen layout, what verl's
    remove-padding mode and vitos_ext.prune_packed_batch produce): inputs_embeds, position_ids, cu_seq_lens."""
    mask = compacted["attention_mask"].bool()
    lengths = mask.sum(dim=1, dtype=torch.int32)
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    positions = compacted["position_ids"]
    packed_positions = positions[:, mask].unsqueeze(1) if positions.dim() == 3 else positions[mask].unsqueeze(0)
    longest = int(lengths.max())
    return {"inputs_embeds": compacted["inputs_embeds"][mask].unsqueeze(0), "position_ids": packed_positions,
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def packed_prefill(model, packed: dict[str, Any]) -> torch.Tensor:
    """Language model over a packed row (no KV cache: a training / scoring forward) and the last token's logits of
    each sequence [B, V]."""
    output = model.model.language_model(**packed, use_cache=False)
    last_rows = packed["cu_seq_lens_q"][1:].long() - 1
    return model.lm_head(output.last_hidden_state[0, last_rows])


def last_logits(output) -> torch.Tensor:
    return output.logits[:, -1]


# ----------------------------------------------------------------------------------------------------------------
# the benchmark


@dataclass
class Workload:
    """Everything the measurements share."""

    model: Any
    prompt: dict[str, torch.Tensor]
    batch: dict[str, torch.Tensor]
    keeps: dict[float, torch.Tensor]
    batch_keep: torch.Tensor
    visual: int


def build_workload(shapes: Shapes, device: torch.device, dtype: torch.dtype) -> Workload:
    """Model, prompt, 8-prompt batch and keep masks (the ragged batch keeps batch_lengths tokens per prompt)."""
    model = build_model(shapes, device, dtype)
    prompt = build_prompt(shapes, device, dtype)
    visual = int((prompt["input_ids"] == shapes.token_ids["image_token_id"]).sum())
    text = prompt["input_ids"].shape[1] - visual
    keeps = {ratio: keep_first(visual, round(visual * ratio), device) for ratio in shapes.kept_ratios}
    if min(shapes.batch_lengths) < text or max(shapes.batch_lengths) > text + visual:
        raise ValueError(f"batch_lengths must lie in [{text}, {text + visual}]")
    batch_keep = torch.cat([keep_first(visual, length - text, device) for length in shapes.batch_lengths])
    return Workload(model, prompt, repeat_prompt(prompt, len(shapes.batch_lengths)), keeps, batch_keep, visual)


def run(shapes: Shapes, device: torch.device, dtype: torch.dtype, timer: Timer) -> list[Row]:
    """All rows: HF first (unpatched), then the same weights patched. Never raises for a failing variant."""
    from vitos_ext import encode_images, patch_model, unpatch_model

    work = build_workload(shapes, device, dtype)
    model, prompt, batch = work.model, work.prompt, work.batch
    image_inputs = {"image_grid_thw": prompt["image_grid_thw"]}
    ratios = shapes.kept_ratios
    rows = {"vision": Row(f"vision tower, 1 image {shapes.image_px}x{shapes.image_px} ({work.visual} tokens)",
                          "vision"),
            "vision unfused": Row("  same, fused_layers='off' (varlen attention only, eager norms / MLPs / rotary)")}
    for ratio in ratios:
        kept = int(work.keeps[ratio].sum()) + prompt["input_ids"].shape[1] - work.visual
        rows[f"prefill {ratio}"] = Row(f"LM prefill, {100 * ratio:.0f}% visual kept ({kept} tokens)",
                                       f"prefill {ratio}")
    middle = ratios[len(ratios) // 2]
    rows["lm only"] = Row(f"LM only, {100 * middle:.0f}% kept, identical compacted inputs", "lm only")
    rows["lm only unfused"] = Row("  same, fused_layers='off' (eager RMSNorm / SwiGLU / rotary)")
    lengths = shapes.batch_lengths
    rows["batch"] = Row(f"batch of {len(lengths)} ragged pruned prompts ({min(lengths)}..{max(lengths)} tokens)",
                        "batch")
    rows["batch packed"] = Row(f"same batch, packed layout: no padding rows anywhere ({sum(lengths)} tokens)",
                               "batch")
    rows["two-pass"] = Row(f"two-pass prefill: vision once + full + {100 * middle:.0f}% (HF: one full forward)",
                           "two-pass")

    # the compacted prompts the patched model feeds its language model, for HF's baseline on the same tokens
    patch_model(model, attention="varlen")
    features = guarded(rows["vision"], "encode", lambda: encode_images(model, prompt["pixel_values"], **image_inputs))
    batch_features = guarded(rows["batch"], "encode", lambda: encode_images(
        model, batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]))
    compacted = {}
    for ratio in ratios:
        compacted[ratio] = guarded(rows[f"prefill {ratio}"], "capture", lambda r=ratio: capture_language_model_inputs(
            model, lambda: model(**text_inputs(prompt), vitos_image_features=features, vitos_keep=work.keeps[r],
                                 logits_to_keep=1)))
    compacted_batch = guarded(rows["batch"], "capture", lambda: capture_language_model_inputs(
        model, lambda: model(**text_inputs(batch), vitos_image_features=batch_features, vitos_keep=work.batch_keep,
                             logits_to_keep=1)))
    unpatch_model(model)

    reference = _measure_hf(model, prompt, compacted, compacted_batch, rows, ratios, middle, timer)
    patch_model(model, attention="varlen")
    _measure_vitos(model, work, features, batch_features, compacted, compacted_batch, reference, rows, middle,
                   timer)
    unpatch_model(model)
    return list(rows.values())


def _measure_hf(model, prompt, compacted, compacted_batch, rows, ratios, middle, timer: Timer) -> dict[str, Any]:
    """HF sdpa timings; returns its outputs for the checks."""
    reference: dict[str, Any] = {}
    row = rows["vision"]
    row.hf_ms = guarded(row, "HF", lambda: timer(lambda: image_features(model, prompt)))
    reference["vision"] = guarded(row, "HF", lambda: image_features(model, prompt))
    for ratio in ratios:
        row = rows[f"prefill {ratio}"]
        if compacted[ratio] is not None:
            row.hf_ms = guarded(row, "HF", lambda r=ratio: timer(lambda: language_model_prefill(model, compacted[r])))
            reference[ratio] = guarded(row, "HF", lambda r=ratio: language_model_prefill(model, compacted[r]))
    rows["lm only"].hf_ms, reference["lm only"] = rows[f"prefill {middle}"].hf_ms, reference.get(middle)
    row = rows["batch"]
    if compacted_batch is not None:
        row.hf_ms = guarded(row, "HF", lambda: timer(lambda: language_model_prefill(model, compacted_batch)))
        reference["batch"] = guarded(row, "HF", lambda: language_model_prefill(model, compacted_batch))
    row = rows["two-pass"]
    row.hf_ms = guarded(row, "HF", lambda: timer(lambda: model(**prompt, logits_to_keep=1)))
    reference["full"] = guarded(row, "HF", lambda: last_logits(model(**prompt, logits_to_keep=1)))
    return reference


def _measure_vitos(model, work: Workload, features, batch_features, compacted, compacted_batch, reference, rows,
                   middle, timer: Timer) -> None:
    """Patched timings and their checks against the HF outputs."""
    from vitos_ext import encode_images

    prompt, batch = work.prompt, work.batch
    image_inputs = {"image_grid_thw": prompt["image_grid_thw"]}

    def encode():
        return encode_images(model, prompt["pixel_values"], **image_inputs)

    def prefill(inputs, feats, keep=None):
        extra = {} if keep is None else {"vitos_keep": keep}
        return model(**text_inputs(inputs), vitos_image_features=feats, logits_to_keep=1, **extra)

    def two_pass():
        feats = encode()
        pass1 = prefill(prompt, feats)
        prefill(prompt, feats, work.keeps[middle])
        return last_logits(pass1)

    def time_and_check(row, fn, result, want):
        row.vitos_ms = guarded(row, "vitos", lambda: timer(fn))
        row.check = guarded(row, "check", lambda: relative_difference(result(), want))

    def with_and_without_fused_layers(name, fn, result, want):
        time_and_check(rows[name], fn, result, want)
        rows[f"{name} unfused"].hf_ms = rows[name].hf_ms
        with fused_layers_off(model):
            time_and_check(rows[f"{name} unfused"], fn, result, want)

    with_and_without_fused_layers("vision", encode, lambda: torch.cat(list(_pooled(encode()))),
                                  reference.get("vision"))
    for ratio, keep in work.keeps.items():
        row = rows[f"prefill {ratio}"]
        if features is not None:
            row.vitos_ms = guarded(row, "vitos", lambda k=keep: timer(lambda: prefill(prompt, features, k)))
            row.check = guarded(row, "check", lambda k=keep, r=ratio: relative_difference(
                last_logits(prefill(prompt, features, k)), reference.get(r)))
    if compacted.get(middle) is not None:
        lm_only = lambda: language_model_prefill(model, compacted[middle])  # noqa: E731
        with_and_without_fused_layers("lm only", lm_only, lm_only, reference.get("lm only"))
    row = rows["batch"]
    if batch_features is not None:
        row.vitos_ms = guarded(row, "vitos", lambda: timer(lambda: prefill(batch, batch_features, work.batch_keep)))
        row.check = guarded(row, "check", lambda: relative_difference(
            last_logits(prefill(batch, batch_features, work.batch_keep)), reference.get("batch")))
    row = rows["batch packed"]
    row.hf_ms = rows["batch"].hf_ms
    if compacted_batch is not None:
        packed = guarded(row, "pack", lambda: pack_compacted(compacted_batch))
        if packed is not None:
            row.vitos_ms = guarded(row, "vitos", lambda: timer(lambda: packed_prefill(model, packed)))
            row.check = guarded(row, "check", lambda: relative_difference(packed_prefill(model, packed),
                                                                          reference.get("batch")))
    row = rows["two-pass"]
    row.vitos_ms = guarded(row, "vitos", lambda: timer(two_pass))
    row.check = guarded(row, "check", lambda: relative_difference(two_pass(), reference.get("full")))


@contextlib.contextmanager
def fused_layers_off(model):
    """Run the patched model with fused_layers="off" inside the block (back to "auto" after it)."""
    from vitos_ext import patch_model

    patch_model(model, attention="varlen", fused_layers="off")
    try:
        yield
    finally:
        patch_model(model, attention="varlen", fused_layers="auto")


def _pooled(output):
    pooled = output.output.pooler_output
    return pooled if isinstance(pooled, (list, tuple)) else [pooled]


# ----------------------------------------------------------------------------------------------------------------
# report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def table(rows: list[Row], with_targets: bool) -> str:
    """Markdown table of the rows (errors in the row, targets beside the measurements)."""
    header = ["stage", "HF sdpa ms", "vitos ms", "speedup", "DESIGN.md target (H100)", "met", "check"]
    lines = []
    for row in rows:
        target_text, predicate = TARGETS.get(row.key, ("-", None))
        measured = row.hf_ms is not None and row.vitos_ms is not None
        met = "-"
        if predicate is not None and with_targets and measured:
            met = "yes" if predicate(row.hf_ms, row.vitos_ms) else "NO"
        elif predicate is not None and not with_targets:
            met = "n/a"
        speedup = f"{row.hf_ms / row.vitos_ms:.2f}x" if measured and row.vitos_ms > 0 else "-"
        check = "-" if row.check is None else f"{row.check:.1e}"
        vitos = _ms(row.vitos_ms) if not row.errors else f"{_ms(row.vitos_ms)} (error: {'; '.join(row.errors)})"
        lines.append([row.stage, _ms(row.hf_ms), vitos, speedup, target_text, met, check])
    return markdown_table(header, lines)


def _environment(device: torch.device, dtype: torch.dtype, shapes: Shapes) -> str:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return (f"{shapes.name} | {name} | {str(dtype).split('.')[-1]} | torch {torch.__version__} | "
            f"transformers {transformers.__version__} | triton {triton_version}")


def workload_parser(description: str) -> argparse.ArgumentParser:
    """--tiny / --device / --dtype, shared with gpu_profile.py."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", action="store_true", help="scaled-down config (CPU-friendly self-check)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    return parser


def workload_target(args: argparse.Namespace, script: str) -> tuple[Shapes, torch.device, torch.dtype] | None:
    """(shapes, device, dtype) the arguments ask for, or None (after saying why) when CUDA is asked for but absent."""
    shapes = TINY if args.tiny else QWEN2_5_VL_7B
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{script} needs a CUDA device (use --tiny to check the script on CPU)", file=sys.stderr)
        return None
    return shapes, device, getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = workload_parser(__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per variant (default 3, tiny 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per variant (default 10, tiny 3)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print the table; exit status 1 when a variant failed (its error is in its row)."""
    args = parse_args(argv)
    target = workload_target(args, "gpu_e2e.py")
    if target is None:
        return 2
    shapes, device, dtype = target
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    reps = args.reps if args.reps is not None else (3 if args.tiny else 10)
    started = time.perf_counter()
    print(_environment(device, dtype, shapes), flush=True)
    rows = run(shapes, device, dtype, Timer(device, warmup, reps))
    print(table(rows, with_targets=shapes.targets))
    print(f"\nwall time {time.perf_counter() - started:.0f} s (model build included); median of {reps} after "
          f"{warmup} warm-up call(s)")
    return 1 if any(row.errors for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
