"""Tiny offline Qwen2.5-VL: tokenizer round trip, processor consistency, model forward/generate, save/load."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitos_ext.data import make_scan_like_image
from vitos_ext.parsing import format_output, parse_output
from vitos_ext.tiny import (
    CONTRACT_TOKENS,
    SPECIAL_TOKENS,
    TINY_CONFIG_PATH,
    Qwen2_5_VLImageTextProcessor,
    _tiny_config_dict,
    add_mm_token_type_ids,
    build_tiny_model,
    build_tiny_processor,
    build_tiny_tokenizer,
    load_tiny_assets,
    load_tiny_model,
    load_vl_processor,
    save_tiny_assets,
    tiny_qwen2_5_vl_config,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(min_pixels=56 * 56, max_pixels=224 * 224)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=0)


def chat(processor, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def scan(size, seed=0):
    return make_scan_like_image(size, seed=seed).image.convert("RGB")


# ----------------------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_vocabulary_and_single_token_tags(tokenizer):
    assert len(tokenizer) < 512
    for token in (*SPECIAL_TOKENS, *CONTRACT_TOKENS):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left"
    # phantom words are single tokens; unknown words fall back to characters
    assert tokenizer.tokenize("hypodense cyst") == ["hypodense", " ", "cyst"]
    assert tokenizer.tokenize("zq1") == ["z", "q", "1"]


@pytest.mark.parametrize(
    "text",
    [
        format_output("Lesion: ring-enhancing lesion. Location: upper left.", [[0.12, 0.3, 0.45, 0.5]], "C"),
        format_output("two", [[0.0, 0.0, 1.0, 1.0], [0.25, 0.5, 0.75, 0.875]], "B", decimals=3),
        "Odd  spacing,\ttabs\nnewlines; symbols {}()[]!?@#$%^&*_+=~`|\\/\"' and UPPER lower 0123456789",
        '```json\n[{"bbox_2d": [10, 20, 50, 60], "label": "nodule"}]\n```',
    ],
)
def test_tokenizer_round_trips_exactly(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")], skip_special_tokens=True) == text


def test_decoded_generation_parses(tokenizer):
    gold = format_output("Lesion: hyperdense nodule. Location: lower right.", [[0.51, 0.6, 0.66, 0.75]], "A")
    ids = tokenizer(gold + "<|im_end|>", add_special_tokens=False)["input_ids"]
    for skip in (True, False):
        parsed = parse_output(tokenizer.decode(ids, skip_special_tokens=skip))
        assert parsed.format_ok and parsed.answer == "A" and parsed.boxes == [[0.51, 0.6, 0.66, 0.75]]
    assert tokenizer.decode(tokenizer("é✓")["input_ids"], skip_special_tokens=True) == ""  # non-ASCII -> <unk>


def test_chat_template_matches_qwen_layout(processor):
    text = chat(processor, "What kind of lesion is shown?")
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What kind of lesion is shown?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "<answer>A</answer>"},
    ]
    assert processor.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
        "<|im_start|>assistant\n<answer>A</answer><|im_end|>\n"
    )


# ----------------------------------------------------------------------------------------------------------------
# config


def test_shipped_config_matches_tokenizer_and_architecture(tokenizer):
    shipped = json.loads(TINY_CONFIG_PATH.read_text())
    assert shipped == _tiny_config_dict(tokenizer), "regenerate with: python -m vitos_ext.tiny"
    config = tiny_qwen2_5_vl_config(tokenizer)
    text, vision = config.text_config, config.vision_config
    assert text.vocab_size == len(tokenizer)
    head_dim = text.hidden_size // text.num_attention_heads
    assert head_dim == 16 and sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert vision.out_hidden_size == text.hidden_size
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert 0 <= text.eos_token_id < text.vocab_size and 0 <= text.pad_token_id < text.vocab_size
    # windows smaller than a 112 px image's merged grid, so windowed attention really has several windows
    merged_per_window = vision.window_size // (vision.patch_size * vision.spatial_merge_size)
    assert 1 <= merged_per_window < 112 // (vision.patch_size * vision.spatial_merge_size)
    assert list(vision.fullatt_block_indexes) == [vision.depth - 1]


def test_config_overrides_and_errors(tokenizer):
    config = tiny_qwen2_5_vl_config(tokenizer, text_config={"hidden_size": 128, "num_hidden_layers": 3})
    assert config.text_config.hidden_size == 128 and config.text_config.num_hidden_layers == 3
    assert config.vision_config.out_hidden_size == 128  # follows the LM width
    assert config.text_config.num_attention_heads == 4  # untouched keys keep the shipped values
    with pytest.raises(ValueError, match="unknown Qwen2.5-VL config key 'hidden_size'"):
        tiny_qwen2_5_vl_config(tokenizer, hidden_size=3)
    with pytest.raises(ValueError, match="text_config override must be a dict"):
        tiny_qwen2_5_vl_config(tokenizer, text_config=3)
    bigger = build_tiny_tokenizer()
    bigger.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_qwen2_5_vl_config(bigger)


# ----------------------------------------------------------------------------------------------------------------
# processor


def test_processor_outputs_are_consistent(processor, tokenizer):
    images = [scan(112), scan((224, 140), seed=1)]
    texts = [chat(processor, "What kind of lesion is shown?"), chat(processor, "Which?")]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert set(batch) >= {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    grid = batch["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8], [1, 10, 16]]
    assert batch["pixel_values"].shape == (int(grid.prod(dim=1).sum()), 3 * 2 * 14 * 14)
    assert batch["pixel_values"].dtype == torch.float32
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    per_sample = (batch["input_ids"] == image_pad).sum(dim=1)
    assert per_sample.tolist() == (grid.prod(dim=1) // 4).tolist()
    is_image = (batch["input_ids"] == image_pad).to(batch["mm_token_type_ids"].dtype)
    assert torch.equal(batch["mm_token_type_ids"], is_image)
    # left padding: the shorter prompt is padded at the start
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()


def test_add_mm_token_type_ids(processor, tokenizer):
    batch = processor(text=[chat(processor, "Q")], images=[scan(112)], return_tensors="pt")
    expected = batch.pop("mm_token_type_ids")
    add_mm_token_type_ids(batch, processor.image_token_id, processor.video_token_id)
    assert torch.equal(batch["mm_token_type_ids"], expected)
    with pytest.raises(ValueError, match="input_ids"):
        add_mm_token_type_ids({"input_ids": [[1, 2]]}, 5)


def test_processor_argument_errors(processor):
    with pytest.raises(ValueError, match="max_pixels"):
        build_tiny_processor(min_pixels=224 * 224, max_pixels=56 * 56)
    with pytest.raises(ValueError, match="min_pixels"):
        build_tiny_processor(min_pixels=10)


# ----------------------------------------------------------------------------------------------------------------
# model


def test_model_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    first, again, other = build_tiny_model(0), build_tiny_model(0), build_tiny_model(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    params = dict(first.named_parameters())
    assert all(torch.equal(params[name], p) for name, p in again.named_parameters())
    assert any(not torch.equal(params[name], p) for name, p in other.named_parameters())
    assert sum(p.numel() for p in first.parameters()) < 1_000_000


def test_forward_uses_mrope_positions_and_generate_works(model, processor):
    batch = processor(
        text=[chat(processor, "What kind of lesion is shown?"), chat(processor, "Which?")],
        images=[scan(112), scan(112, seed=5)],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    # a 4x4 grid of merged tokens spans 4 positions, so M-RoPE (driven by mm_token_type_ids) shortens by 12
    assert model.model.rope_deltas.flatten().tolist() == [-12, -12]

    generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    prompt_length = batch["input_ids"].shape[1]
    assert generated.shape[0] == 2 and 1 <= generated.shape[1] - prompt_length <= 4
    assert torch.equal(generated[:, :prompt_length], batch["input_ids"])
    text = processor.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)
    assert len(text) == 2 and all(isinstance(t, str) for t in text)
    parse_output(text[0])  # random weights: any string, must not raise


def test_save_and_load_self_contained_checkpoint(tmp_path, model, processor):
    directory = save_tiny_assets(tmp_path / "ckpt", processor=processor, model=model)
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in directory.iterdir()
    }
    loaded_model, loaded_processor = load_tiny_model(directory)
    assert isinstance(loaded_processor, Qwen2_5_VLImageTextProcessor)
    inputs = dict(text=[chat(processor, "Q")], images=[scan(112)], return_tensors="pt")
    original, reloaded = processor(**inputs), loaded_processor(**inputs)
    assert set(original) == set(reloaded) and all(torch.equal(original[k], reloaded[k]) for k in original)
    with torch.no_grad():
        torch.testing.assert_close(loaded_model(**reloaded).logits, model(**original).logits, rtol=0, atol=0)
    assert loaded_model.generation_config.eos_token_id == model.generation_config.eos_token_id

    assets = save_tiny_assets(tmp_path / "assets")  # processor + config only
    assets_processor, config = load_tiny_assets(assets)
    assert config.image_token_id == assets_processor.image_token_id
    assert config.text_config.vocab_size == len(assets_processor.tokenizer)


def test_load_vl_processor_reads_a_hub_style_folder(tmp_path, processor):
    # real checkpoints (e.g. Lingshu-7B) ship preprocessor_config.json + tokenizer files + a chat template
    processor.image_processor.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    loaded = load_vl_processor(tmp_path)
    inputs = dict(text=[chat(processor, "Q")], images=[scan(112)], return_tensors="pt")
    original, reloaded = processor(**inputs), loaded(**inputs)
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    assert "mm_token_type_ids" in reloaded
    with pytest.raises(FileNotFoundError, match="directory"):
        load_vl_processor(tmp_path / "missing")


def test_processor_accepts_numpy_and_grayscale_images(processor):
    gray = make_scan_like_image(112, seed=3).image  # mode "L"
    batch_gray = processor(text=[chat(processor, "Q")], images=[gray], return_tensors="pt")
    batch_rgb = processor(text=[chat(processor, "Q")], images=[gray.convert("RGB")], return_tensors="pt")
    torch.testing.assert_close(batch_gray["pixel_values"], batch_rgb["pixel_values"])
    array = np.asarray(gray.convert("RGB"))
    batch_np = processor(text=[chat(processor, "Q")], images=[array], return_tensors="pt")
    assert batch_np["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert Image.fromarray(array).size == (112, 112)
