"""Tiny VLMs of every supported family, built offline from configs (fp32, CPU), and their inputs built by hand.

Token ids shared by all tiny models: pad 0, bos 1, eos 2, vision_start 3, vision_end 4, image 5, video 6, and
ordinary text tokens from 7 up to VOCAB - 1.

A prompt is a list of segments: ("text", [ids...]) or ("image", size), where size is the image's (h, w) in patches
for the Qwen families (a (1, h, w) grid) and ignored for LLaVA (a fixed side x side token grid), or, for the Qwen
families only, ("video", (t, h, w)): t temporal patches (2 frames each) of h x w patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers

# Tiny tensors: intra-op threads only add contention on the shared 2-core test machine (10-30x slower with 2).
torch.set_num_threads(1)

VOCAB = 96
PAD, BOS, EOS, VISION_START, VISION_END, IMAGE, VIDEO = 0, 1, 2, 3, 4, 5, 6
PATCH = 4  # Qwen patch size (pixels); LLaVA uses the same
TEMPORAL_PATCH = 2
MERGE = 2
LLAVA_IMAGE = 16  # pixels: a 4 x 4 token grid


def _text_config(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=BOS,
                eos_token_id=EOS, pad_token_id=PAD, **extra)


def _mm_ids() -> dict:
    return dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
                vision_end_token_id=VISION_END)


def qwen2_vl_config() -> transformers.Qwen2VLConfig:
    return transformers.Qwen2VLConfig(
        text_config=_text_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, in_channels=3,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH),
        tie_word_embeddings=False, **_mm_ids())


def qwen2_5_vl_config() -> transformers.Qwen2_5_VLConfig:
    return transformers.Qwen2_5_VLConfig(
        text_config=_text_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [2, 3, 3]}),
        # window of 16 px = 2 x 2 tokens: a 4 x 4-token image has 4 windows; block 1 is full attention
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           in_channels=3, patch_size=PATCH, spatial_merge_size=MERGE,
                           temporal_patch_size=TEMPORAL_PATCH, window_size=16, fullatt_block_indexes=[1],
                           tokens_per_second=2),
        tie_word_embeddings=False, **_mm_ids())


def qwen3_vl_config():
    return transformers.Qwen3VLConfig(
        text_config=_text_config(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                               "mrope_section": [2, 3, 3],
                                                               "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           in_channels=3, patch_size=PATCH, spatial_merge_size=MERGE,
                           temporal_patch_size=TEMPORAL_PATCH, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        tie_word_embeddings=False, **_mm_ids())


def llava_config() -> transformers.LlavaConfig:
    return transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=2, image_size=LLAVA_IMAGE,
                                                    patch_size=PATCH, projection_dim=32),
        text_config=transformers.LlamaConfig(**_text_config()),
        image_token_id=IMAGE, vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=False)


@dataclass(frozen=True)
class Family:
    name: str
    model_class: type
    config: object  # a zero-argument config builder

    @property
    def is_llava(self) -> bool:
        return self.name == "llava"


def families() -> list[Family]:
    """Every family the installed transformers has."""
    out = [Family("qwen2_vl", transformers.Qwen2VLForConditionalGeneration, qwen2_vl_config),
           Family("qwen2_5_vl", transformers.Qwen2_5_VLForConditionalGeneration, qwen2_5_vl_config)]
    if hasattr(transformers, "Qwen3VLForConditionalGeneration"):
        out.append(Family("qwen3_vl", transformers.Qwen3VLForConditionalGeneration, qwen3_vl_config))
    out.append(Family("llava", transformers.LlavaForConditionalGeneration, llava_config))
    return out


def build_model(family: Family, seed: int = 0, attn_implementation: str = "eager") -> torch.nn.Module:
    """A randomly initialized tiny model (fp32, eval mode). Larger-than-default init keeps greedy decoding varied."""
    torch.manual_seed(seed)
    config = family.config()
    config._attn_implementation = attn_implementation
    model = family.model_class._from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2 and "embed" not in name:
                parameter.normal_(0.0, 0.08)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # decode a fixed number of tokens
    model.generation_config.bos_token_id = BOS
    return model.eval()


def llava_side(model) -> int:
    return model.config.vision_config.image_size // model.config.vision_config.patch_size


def make_batch(family: Family, model, prompts: list[list[tuple]], seed: int = 0) -> dict:
    """Left-padded inputs for `prompts`, with pixel_values / image_grid_thw / mm_token_type_ids built by hand."""
    generator = torch.Generator().manual_seed(seed)
    rows, grids, pixels, video_grids, video_pixels = [], [], [], [], []
    for prompt in prompts:
        ids = [BOS]
        for kind, value in prompt:
            if kind == "text":
                ids += list(value)
                continue
            if kind == "video":
                t, h, w = value
                video_grids.append([t, h, w])
                video_pixels.append(torch.randn(t * h * w, 3 * TEMPORAL_PATCH * PATCH * PATCH, generator=generator))
                frame = [VIDEO] * (h * w // MERGE ** 2)
                # Qwen3-VL brackets every temporal patch with its own vision start / end (timestamps go between)
                ids += sum(([VISION_START] + frame + [VISION_END] for _ in range(t)), []) \
                    if family.name == "qwen3_vl" else [VISION_START] + frame * t + [VISION_END]
                continue
            if family.is_llava:
                count = llava_side(model) ** 2
                pixels.append(torch.randn(3, LLAVA_IMAGE, LLAVA_IMAGE, generator=generator))
            else:
                h, w = value
                grids.append([1, h, w])
                count = h * w // MERGE ** 2
                pixels.append(torch.randn(h * w, 3 * TEMPORAL_PATCH * PATCH * PATCH, generator=generator))
            ids += [VISION_START] + [IMAGE] * count + [VISION_END]
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, length - len(ids):] = torch.tensor(ids)
        attention_mask[i, length - len(ids):] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pixels:
        batch["pixel_values"] = torch.stack(pixels) if family.is_llava else torch.cat(pixels)
    if not family.is_llava:
        batch["mm_token_type_ids"] = (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()
        if grids:
            batch["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        if video_grids:
            batch["pixel_values_videos"] = torch.cat(video_pixels)
            batch["video_grid_thw"] = torch.tensor(video_grids, dtype=torch.long)
    return batch


def image_grids(family: Family, model, batch: dict) -> torch.Tensor:
    """(t, h, w) per image in patches, and the merge size, as region_to_patch_mask takes them."""
    if family.is_llava:
        side = llava_side(model)
        return torch.tensor([[1, side, side]] * batch["pixel_values"].shape[0]), 1
    return batch["image_grid_thw"], MERGE


def select(batch: dict, index: int, family: Family, model) -> dict:
    """The single-sample batch of row `index` (padding removed), with its own images."""
    keep = batch["attention_mask"][index].bool()
    out = {"input_ids": batch["input_ids"][index, keep][None],
           "attention_mask": batch["attention_mask"][index, keep][None]}
    grids, _ = image_grids(family, model, batch)
    images_per_row = images_per_row_of(batch)
    first = sum(images_per_row[:index])
    mine = range(first, first + images_per_row[index])
    if family.is_llava:
        if len(mine):
            out["pixel_values"] = batch["pixel_values"][first:first + len(mine)]
        return out
    out["mm_token_type_ids"] = batch["mm_token_type_ids"][index, keep][None]
    if len(mine):
        patch_counts = grids.prod(-1).tolist()
        start = sum(patch_counts[:first])
        stop = start + sum(patch_counts[first:first + len(mine)])
        out["pixel_values"] = batch["pixel_values"][start:stop]
        out["image_grid_thw"] = grids[first:first + len(mine)]
    return out


def images_per_row_of(batch: dict) -> list[int]:
    """Images of each row of an image-only batch (one vision start token per image)."""
    starts = (batch["input_ids"] == VISION_START).sum(-1)
    return starts.tolist()
