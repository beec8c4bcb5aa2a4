"""ViToSPipeline on tiny models of every supported family (fp32, CPU).

Real end-to-end runs use tiny random VLMs with the tiny word tokenizer. Where a test needs pass 1 to write specific
boxes, only pass 1's *text* is scripted (model.generate answers the grounding call with fixed tokens); pass 2 always
runs the real patched generate().
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import vitos_ext.pipeline as pipeline_module
from vitos_ext import is_patched, keep_mask_from_boxes, patch_model
from vitos_ext.data import make_scan_like_image
from vitos_ext.pipeline import PIPELINE_STAGES, PipelineFlags, ViToSPipeline
from vitos_ext.tiny import (
    TINY_CHAT_TEMPLATE,
    TINY_CONFIG_PATH,
    Qwen2_5_VLImageTextProcessor,
    build_tiny_model,
    build_tiny_processor,
    build_tiny_tokenizer,
)

torch.set_num_threads(1)  # tiny tensors: extra threads only add contention on shared CPUs

FAMILIES = ["qwen2_vl", "qwen2_5_vl", *(["qwen3_vl"] if hasattr(transformers, "Qwen3VLForConditionalGeneration")
                                        else []), "llava"]
STEPS = 12
QUESTION = "What kind of lesion is shown?\nA. hyperdense nodule\nB. hypodense cyst"


# ----------------------------------------------------------------------------------------------------------------
# tiny models of each family, all with the tiny tokenizer (special-token ids 0..6)


def _tiny_json() -> dict:
    return json.loads(TINY_CONFIG_PATH.read_text())


def _token_ids() -> dict:
    tiny = _tiny_json()
    return {k: tiny[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}


def _spread_weights(model, seed: int) -> None:
    """Larger-than-default random weights: greedy decoding then depends visibly on which visual tokens are kept."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2 and "embed" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.08)


def _qwen_processor(patch_size: int = 14) -> Qwen2_5_VLImageTextProcessor:
    if patch_size == 14:
        return build_tiny_processor()
    image_processor = getattr(transformers, "Qwen2VLImageProcessorPil", transformers.Qwen2VLImageProcessor)(
        size={"shortest_edge": 64 * 64, "longest_edge": 224 * 224}, patch_size=patch_size, temporal_patch_size=2,
        merge_size=2)
    tokenizer = build_tiny_tokenizer()
    return Qwen2_5_VLImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=tokenizer.chat_template)


def build_family(name: str, seed: int = 0):
    """(model, processor) of a tiny random VLM of family `name` (fp32, eval)."""
    text = dict(_tiny_json()["text_config"])
    ids = _token_ids()
    torch.manual_seed(seed)
    if name == "qwen2_5_vl":
        model, processor = build_tiny_model(seed=seed), build_tiny_processor()
    elif name == "qwen2_vl":
        config = transformers.Qwen2VLConfig(
            text_config=text, tie_word_embeddings=False, **ids,
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, in_channels=3,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2))
        model, processor = transformers.Qwen2VLForConditionalGeneration._from_config(config), _qwen_processor()
    elif name == "qwen3_vl":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        config = transformers.Qwen3VLConfig(
            text_config=dict(text, head_dim=16, rope_parameters=rope), tie_word_embeddings=False, **ids,
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                               num_position_embeddings=64, deepstack_visual_indexes=[0]))
        model, processor = transformers.Qwen3VLForConditionalGeneration._from_config(config), _qwen_processor(16)
    elif name == "llava":
        llama = {k: v for k, v in text.items() if k not in ("rope_parameters", "use_sliding_window")}
        config = transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=2, image_size=56, patch_size=14,
                                                        projection_dim=32),
            text_config=transformers.LlamaConfig(**llama), image_token_id=ids["image_token_id"],
            vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
        model = transformers.LlavaForConditionalGeneration._from_config(config)
        image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 56},
                                                             crop_size={"height": 56, "width": 56})
        processor = transformers.LlavaProcessor(
            image_processor=image_processor, tokenizer=build_tiny_tokenizer(), patch_size=14,
            vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<|image_pad|>",
            chat_template=TINY_CHAT_TEMPLATE)
    else:
        raise ValueError(name)
    _spread_weights(model, seed)
    model.generation_config.eos_token_id = [text["eos_token_id"], text["pad_token_id"]]
    model.generation_config.pad_token_id = text["pad_token_id"]
    model.generation_config.do_sample = False
    return model.eval(), processor


def vision_module(model):
    return model.model.vision_tower if isinstance(model, transformers.LlavaForConditionalGeneration) \
        else model.model.visual


def scans(count: int, size=112, seed: int = 0) -> list[Image.Image]:
    return [make_scan_like_image(size, seed=seed + i).image for i in range(count)]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


# ----------------------------------------------------------------------------------------------------------------
# scripted pass 1: only the grounding call's text is fixed; pass 2 is the real patched generate()


def script_pass1(monkeypatch, model, tokenizer, reply) -> dict[str, int]:
    """Make the grounding generate() return reply(prompt text) + end of turn for every row; count both passes."""
    real = model.generate
    calls = {"pass1": 0, "pass2": 0}
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = model.generation_config.pad_token_id

    def generate(*args, **kwargs):
        if "vitos_keep" in kwargs:
            calls["pass2"] += 1
            return real(*args, **kwargs)
        calls["pass1"] += 1
        input_ids = kwargs["input_ids"]
        rows = [tokenizer(reply(tokenizer.decode(row)), add_special_tokens=False)["input_ids"] + [eos]
                for row in input_ids.tolist()]
        new = torch.full((len(rows), max(map(len, rows))), pad, dtype=input_ids.dtype)
        for i, row in enumerate(rows):
            new[i, :len(row)] = torch.tensor(row)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    return calls


def reply_by_question(replies: dict[str, str]):
    def reply(prompt: str) -> str:
        found = [text for question, text in replies.items() if question in prompt]
        assert len(found) == 1, prompt
        return found[0]

    return reply


def direct_answers(model, processor, images_per_sample, questions, boxes_per_image=None, **vitos) -> list[str]:
    """Pass 2 done by hand: the processor on the same chat prompts, one patched generate() with vitos_boxes."""
    texts = []
    for images, question in zip(images_per_sample, questions):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                   add_generation_prompt=True, tokenize=False))
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, images=[i for images in images_per_sample for i in images], padding=True,
                       return_tensors="pt")
    device = model.get_input_embeddings().weight.device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if boxes_per_image is not None:
        vitos["vitos_boxes"] = [torch.tensor(b, dtype=torch.float32, device=device).reshape(-1, 4)
                                for b in boxes_per_image]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, **vitos)
    return processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------
# real end to end


def test_end_to_end_every_family_runs_the_vision_tower_once(family):
    model, processor = build_family(family)
    pipe = ViToSPipeline(model, processor, max_new_tokens=STEPS, grounding_prompt="{question}")
    images = scans(3)
    calls = []
    handle = vision_module(model).register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        results = pipe([images[0], images[1:]], [QUESTION, "Which region is abnormal?"])
    finally:
        handle.remove()
    assert pipe.patched_here and is_patched(model)
    # one vision call for the whole batch, for both passes, over all three images
    expected_rows = 3 if family == "llava" else int(sum(r.token_grids[j][1] * r.token_grids[j][2] * 4
                                                        for r in results for j in range(len(r.token_grids))))
    assert calls == [expected_rows]
    assert [len(r.boxes) for r in results] == [1, 2]
    for result in results:
        assert isinstance(result.grounding_text, str) and isinstance(result.answer_text, str)
        assert set(result.timings_ms) == {*PIPELINE_STAGES, "total"}
        for stage in ("preprocess", "vision", "pass1_prefill", "pass1_decode", "pass2_prefill", "pass2_decode"):
            assert result.timings_ms[stage] > 0, stage
        assert result.timings_ms["total"] >= sum(result.timings_ms[s] for s in PIPELINE_STAGES) * 0.99
        for j, (mask, grid) in enumerate(zip(result.keep_masks, result.token_grids)):
            assert mask.dtype == torch.bool and mask.numel() == grid[0] * grid[1] * grid[2]
            if not result.boxes[j]:  # an untrained model rarely writes a valid box: then nothing is pruned
                assert bool(mask.all()) and j in result.full_token_images
        assert (PipelineFlags.NO_BOXES in result.flags) == bool(result.full_token_images)
        assert result.kept_tokens == sum(int(m.sum()) for m in result.keep_masks)
        assert result.visual_tokens == sum(m.numel() for m in result.keep_masks)
    assert PipelineFlags.SHARED_BOXES in results[1].flags and PipelineFlags.SHARED_BOXES not in results[0].flags
    json.dumps([r.as_dict() for r in results])  # JSON-ready


def test_real_batch_equals_singles():
    model, processor = build_family("qwen2_5_vl", seed=3)
    pipe = ViToSPipeline(model, processor, max_new_tokens=STEPS, grounding_prompt="{question}")
    images = scans(3, seed=5)
    inputs = [images[0], [images[1], images[2]], images[2]]
    questions = [QUESTION, "Which region is abnormal?", "Is the scan normal?"]
    batched = pipe(inputs, questions)
    singles = [pipe(image, question) for image, question in zip(inputs, questions)]
    for one, many in zip(singles, batched):
        assert one.grounding_text == many.grounding_text and one.answer_text == many.answer_text
        assert one.boxes == many.boxes and one.kept_tokens == many.kept_tokens


def test_static_cache_gives_the_same_results():
    """generate(cache_implementation="static") in both passes: pass 2's pruned prefill fills the first slots of the
    preallocated cache; answers equal the dynamic-cache pipeline's."""
    images, questions = scans(2, seed=5), [QUESTION, "Which region is abnormal?"]
    boxes = [torch.tensor([[0.5, 0.5, 1.0, 1.0]]), torch.tensor([[0.0, 0.1, 0.4, 0.6]])]
    results = []
    for kwargs in ({}, dict(cache_implementation="static")):
        model, processor = build_family("qwen2_5_vl", seed=3)
        pipe = ViToSPipeline(model, processor, max_new_tokens=STEPS, grounding_prompt="{question}", **kwargs)
        results.append(pipe(images, questions, boxes=boxes))
    for dynamic, static in zip(*results):
        assert dynamic.kept_tokens < dynamic.visual_tokens
        assert (static.answer_text, static.kept_tokens) == (dynamic.answer_text, dynamic.kept_tokens)


def test_patched_model_is_not_patched_again():
    model, processor = build_family("qwen2_5_vl")
    patch_model(model)
    pipe = ViToSPipeline(model, processor, max_new_tokens=2)
    assert not pipe.patched_here and is_patched(model)


def test_peft_wrapped_model_runs_the_model_inside():
    from peft import LoraConfig, get_peft_model

    model, processor = build_family("qwen2_5_vl", seed=3)
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pipe = ViToSPipeline(wrapped, processor, max_new_tokens=STEPS, grounding_prompt="{question}")
    assert pipe.model is wrapped.get_base_model() and is_patched(wrapped) and pipe.patched_here
    result = pipe(scans(1, seed=5)[0], QUESTION, boxes=torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
    assert result.kept_tokens < result.visual_tokens


# ----------------------------------------------------------------------------------------------------------------
# pass-1 output -> boxes -> kept tokens


def test_unparseable_or_missing_boxes_keep_all_tokens_and_are_flagged(monkeypatch):
    model, processor = build_family("qwen2_5_vl")
    pipe = ViToSPipeline(model, processor, max_new_tokens=STEPS, grounding_prompt="{question}")
    replies = {
        "first": "<think>round</think><box>[[0.1, 0.2]]</box><answer>B</answer>",  # a box of 2 numbers
        "second": "I cannot tell.",
        "third": "<think>left upper</think><box>[[0.0, 0.0, 0.5, 0.5]]</box><answer>A</answer>",
    }
    script_pass1(monkeypatch, model, processor.tokenizer, reply_by_question(replies))
    questions = [f"{name} {QUESTION}" for name in replies]
    bad, missing, good = pipe(scans(3), questions)
    for result in (bad, missing):
        assert result.boxes == [[]] and result.full_token_images == [0]
        assert result.kept_ratio == 1.0 and bool(result.keep_masks[0].all())
        assert PipelineFlags.NO_BOXES in result.flags and PipelineFlags.GROUNDING_FORMAT in result.flags
    assert any("4 numbers" in p for p in bad.problems)
    assert bad.grounding_answer == "B" and bad.grounding_choice == "B"
    assert missing.grounding_answer is None and missing.grounding_choice is None
    assert good.boxes == [[[0.0, 0.0, 0.5, 0.5]]] and good.problems == ()
    assert not {PipelineFlags.NO_BOXES, PipelineFlags.GROUNDING_FORMAT, PipelineFlags.PASS1_TRUNCATED} & set(good.flags)
    assert good.kept_tokens == 4 and good.visual_tokens == 16 and good.kept_ratio == 0.25  # 2x2 of 4x4 cells
    assert good.grounding_choice == "A" and good.full_token_images == []


def test_bbox_2d_pixels_are_normalized_with_the_resized_image(monkeypatch):
    model, processor = build_family("qwen2_5_vl")
    pipe = ViToSPipeline(model, processor, max_new_tokens=STEPS)
    reply = '```json\n[{"bbox_2d": [77, 35, 231, 105], "label": "lesion"}]\n```'
    script_pass1(monkeypatch, model, processor.tokenizer, lambda prompt: reply)
    original = make_scan_like_image((300, 150), seed=1).image  # resized by the processor to 308 x 140
    result = pipe(original, QUESTION)
    assert result.image_sizes == [(308, 140)] and result.token_grids == [(1, 5, 11)]
    np.testing.assert_allclose(result.boxes[0], [[0.25, 0.25, 0.75, 0.75]], atol=1e-6)  # not /300, /150
    assert PipelineFlags.BBOX_2D in result.flags and PipelineFlags.NO_BOXES not in result.flags
    expected = keep_mask_from_boxes([torch.tensor(result.boxes[0])], torch.tensor([[1, 10, 22]]), 2)
    assert torch.equal(result.keep_masks[0], expected) and 0 < result.kept_ratio < 1


@pytest.mark.skipif("qwen3_vl" not in FAMILIES, reason="transformers without Qwen3-VL")
def test_qwen3_vl_bbox_2d_is_on_a_0_to_1000_grid(monkeypatch):
    model, processor = build_family("qwen3_vl")
    pipe = ViToSPipeline(model, processor, max_new_tokens=STEPS)
    script_pass1(monkeypatch, model, processor.tokenizer, lambda prompt: '{"bbox_2d": [250, 0, 750, 500]}')
    result = pipe(make_scan_like_image((200, 120), seed=2).image, QUESTION)
    np.testing.assert_allclose(result.boxes[0], [[0.25, 0.0, 0.75, 0.5]], atol=1e-6)


@pytest.mark.parametrize("fuse, dilate", [(False, 0), (True, 0), (False, 1)])
def test_pass2_equals_a_direct_patched_generate_with_the_parsed_boxes(monkeypatch, family, fuse, dilate):
    model, processor = build_family(family, seed=3)
    pipe = ViToSPipeline(model, processor, max_new_tokens=STEPS, grounding_prompt="{question}", fuse=fuse,
                         dilate=dilate)
    boxes = {"first": [[0.0, 0.0, 0.4, 0.4]], "second": [[0.5, 0.25, 1.0, 1.0], [0.0, 0.75, 0.25, 1.0]]}
    replies = {q: f"<think>x</think><box>{json.dumps(b)}</box><answer>A</answer>" for q, b in boxes.items()}
    calls = script_pass1(monkeypatch, model, processor.tokenizer, reply_by_question(replies))
    images = scans(3, seed=9)
    per_sample = [[images[0]], images[1:]]
    questions = [f"{q} {QUESTION}" for q in boxes]
    results = pipe(per_sample, questions)
    assert calls == {"pass1": 1, "pass2": 1}
    monkeypatch.undo()  # the real generate() again
    image_boxes = [boxes["first"], boxes["second"], boxes["second"]]  # a sample's boxes apply to each of its images
    want = direct_answers(model, processor, per_sample, questions, image_boxes, vitos_fuse=fuse, vitos_dilate=dilate)
    assert [r.answer_text for r in results] == want
    assert [r.boxes for r in results] == [[boxes["first"]], [boxes["second"], boxes["second"]]]
    assert all(r.kept_ratio < 1.0 for r in results)
    # the comparison can fail: seeing every visual token gives different text
    assert direct_answers(model, processor, per_sample, questions) != want


def test_batch_with_different_kept_counts_equals_singles(monkeypatch):
    model, processor = build_family("qwen2_5_vl", seed=2)
    pipe = ViToSPipeline(model, processor, max_new_tokens=STEPS, grounding_prompt="{question}")
    replies = {"first": "<box>[[0.0, 0.0, 0.3, 0.3]]</box><answer>A</answer>",
               "second": "<box>[[0.2, 0.2, 1.0, 1.0]]</box><answer>B</answer>",
               "third": "no box here"}
    script_pass1(monkeypatch, model, processor.tokenizer, reply_by_question(replies))
    images = scans(4, seed=11)
    inputs = [images[0], images[1:3], images[3]]
    questions = [f"{q} {QUESTION}" for q in replies]
    batched = pipe(inputs, questions)
    assert len({r.kept_tokens for r in batched}) == 3
    for image, question, many in zip(inputs, questions, batched):
        one = pipe(image, question)
        for name in ("answer_text", "answer", "boxes", "kept_tokens", "image_kept_ratios", "flags"):
            assert getattr(one, name) == getattr(many, name), name
        assert all(torch.equal(a, b) for a, b in zip(one.keep_masks, many.keep_masks))
    chunked = ViToSPipeline(model, processor, max_new_tokens=STEPS, grounding_prompt="{question}", batch_size=2)
    again = chunked(inputs, questions)
    assert [r.answer_text for r in again] == [r.answer_text for r in batched]
    assert [r.batch_size for r in again] == [2, 2, 1]


def test_given_boxes_skip_pass_1(monkeypatch):
    model, processor = build_family("qwen2_5_vl")
    pipe = ViToSPipeline(model, processor, max_new_tokens=STEPS, grounding_prompt="{question}")
    calls = script_pass1(monkeypatch, model, processor.tokenizer, lambda prompt: "unused")
    result = pipe(scans(1)[0], QUESTION, boxes=torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
    assert calls == {"pass1": 0, "pass2": 1}
    assert result.grounding_text is None and result.boxes == [[[0.5, 0.5, 1.0, 1.0]]]
    assert PipelineFlags.BOXES_GIVEN in result.flags and result.kept_tokens == 4
    assert result.timings_ms["pass1_prefill"] == 0.0 and result.timings_ms["pass2_prefill"] > 0


def test_options_given_separately_are_added_to_the_prompt_and_picked_from(monkeypatch):
    model, processor = build_family("qwen2_5_vl")
    pipe = ViToSPipeline(model, processor, max_new_tokens=STEPS)
    prompts = []
    script_pass1(monkeypatch, model, processor.tokenizer,
                 lambda prompt: prompts.append(prompt) or "<box>[[0,0,1,1]]</box><answer>hypodense cyst</answer>")
    result = pipe(scans(1)[0], "<image>What kind of lesion is shown?",
                  options={"A": "hyperdense nodule", "B": "hypodense cyst"})
    assert "<image>" not in prompts[0] and "A. hyperdense nodule\nB. hypodense cyst" in prompts[0]
    assert "Output format" in prompts[0]  # the default instruction
    assert result.grounding_choice == "B"
    inline = pipe._prompt_text(pipe.grounding_prompt, pipeline_module._Sample(QUESTION, scans(1), {"A": "x"}, None))
    assert inline.count("A. ") == 1  # options already written in the question are not repeated


def test_answer_prompt_differs_from_the_grounding_prompt(monkeypatch):
    model, processor = build_family("qwen2_5_vl")
    pipe = ViToSPipeline(model, processor, max_new_tokens=STEPS, grounding_prompt="Find boxes: {question}",
                         answer_prompt="Answer: {question}")
    script_pass1(monkeypatch, model, processor.tokenizer,
                 lambda prompt: "<box>[[0,0,0.5,1]]</box><answer>A</answer>" if "Find boxes" in prompt else "??")
    image = scans(1)[0]
    result = pipe(image, QUESTION)
    monkeypatch.undo()
    want = direct_answers(model, processor, [[image]], [f"Answer: {QUESTION}"], [[[0, 0, 0.5, 1]]])
    assert result.answer_text == want[0] and result.kept_ratio == 0.5


def test_stages_are_timed_inside_nvtx_ranges(monkeypatch):
    opened = []

    @contextlib.contextmanager
    def recording_range(name):
        opened.append(name)
        yield

    monkeypatch.setattr(pipeline_module, "nvtx_range", recording_range)
    model, processor = build_family("qwen2_5_vl")
    ViToSPipeline(model, processor, max_new_tokens=4)(scans(1)[0], QUESTION)
    assert opened == [f"vitos.pipeline.{s}" for s in PIPELINE_STAGES]


def test_images_from_files_png_and_dicom(tmp_path):
    pydicom_data = pytest.importorskip("pydicom.data")
    model, processor = build_family("qwen2_5_vl")
    png = tmp_path / "scan.png"
    scans(1)[0].save(png)
    dicom = pydicom_data.get_testdata_file("CT_small.dcm")
    pipe = ViToSPipeline(model, processor, max_new_tokens=4)
    from_files = pipe([str(png), [dicom, np.zeros((64, 96), np.uint8)]], [QUESTION, QUESTION])
    assert from_files[0].image_sizes == [(112, 112)]
    assert len(from_files[1].image_sizes) == 2 and from_files[1].image_sizes[1] == (84, 56)


def test_sixteen_bit_images_in_memory_answer_like_their_files(tmp_path):
    """A 16-bit scan given as a PIL image or an array is read as its PNG file is (range stretched to 8 bits), not
    clipped to white by a plain RGB conversion."""
    model, processor = build_family("qwen2_5_vl")
    gray = np.asarray(scans(1)[0].convert("L")).astype(np.uint16) * 250  # values up to 63750
    png = tmp_path / "scan16.png"
    Image.fromarray(gray).save(png)
    pipe = ViToSPipeline(model, processor, max_new_tokens=4)
    from_file, from_pil, from_array = (pipe(image, QUESTION) for image in (str(png), Image.open(png), gray))
    for result in (from_pil, from_array):
        assert result.answer == from_file.answer and result.boxes == from_file.boxes
        assert result.kept_ratio == from_file.kept_ratio


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_pipeline_on_an_offloaded_model_under_inference_mode(family):
    """A model dispatched by accelerate with offloaded weights (meta until each module runs) takes its inputs on the
    hooks' execution device; served under inference_mode through varlen attention, it answers as in memory."""
    from accelerate import cpu_offload

    model, processor = build_family(family)
    boxes = [[[0.2, 0.2, 0.7, 0.7]]] * 2
    want = ViToSPipeline(model, processor, max_new_tokens=4)(scans(2), [QUESTION, QUESTION], boxes=boxes)
    offloaded = cpu_offload(build_family(family)[0], execution_device=torch.device("cpu"))
    assert offloaded.get_input_embeddings().weight.device.type == "meta"
    with torch.inference_mode():
        got = ViToSPipeline(offloaded, processor, max_new_tokens=4, attention="varlen")(scans(2), [QUESTION, QUESTION],
                                                                                      boxes=boxes)
    assert [r.answer_text for r in got] == [r.answer_text for r in want]
    assert [r.kept_ratio for r in got] == [r.kept_ratio for r in want]


# ----------------------------------------------------------------------------------------------------------------
# errors


def test_bad_arguments_get_clear_errors():
    model, processor = build_family("qwen2_5_vl")
    with pytest.raises(ValueError, match="grounding_prompt"):
        ViToSPipeline(model, processor, grounding_prompt="no placeholder")
    with pytest.raises(ValueError, match="dilate"):
        ViToSPipeline(model, processor, dilate=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ViToSPipeline(model, processor, max_new_tokens=0)
    with pytest.raises(ValueError, match="generate_kwargs"):
        ViToSPipeline(model, processor, vitos_keep=torch.ones(3, dtype=torch.bool))
    for copies in (dict(num_beams=3), dict(num_return_sequences=2)):
        with pytest.raises(ValueError, match=f"{next(iter(copies))}.*one sequence per sample"):
            ViToSPipeline(model, processor, **copies)
    ViToSPipeline(model, processor, num_beams=1, cache_implementation="static")  # allowed
    with pytest.raises(TypeError, match="processor"):
        ViToSPipeline(model, processor.image_processor)
    with pytest.raises(TypeError, match="supported models are"):
        ViToSPipeline(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)),
            processor)

    pipe = ViToSPipeline(model, processor, max_new_tokens=2)
    image = scans(1)[0]
    with pytest.raises(ValueError, match="one entry .* per question"):
        pipe([image], [QUESTION, QUESTION])
    with pytest.raises(ValueError, match=r"images\[1\] has no image"):
        pipe([image, []], [QUESTION, QUESTION])
    with pytest.raises(TypeError, match=r"images\[0\]"):
        pipe([42], [QUESTION])
    with pytest.raises(FileNotFoundError, match="not found"):
        pipe("/no/such/scan.png", QUESTION)
    with pytest.raises(ValueError, match=r"questions\[1\]"):
        pipe([image, image], [QUESTION, " "])
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        pipe(image, QUESTION, boxes=[[0.5, 0.5, 0.2, 1.0]])
    with pytest.raises(ValueError, match="normalized"):
        pipe(image, QUESTION, boxes=[[0, 0, 112, 112]])
    with pytest.raises(ValueError, match="boxes: give boxes for every sample"):
        pipe([image, image], [QUESTION, QUESTION], boxes=[[[0, 0, 1, 1]], None])
    with pytest.raises(ValueError, match=r"options\[0\]"):
        pipe([image], [QUESTION], options=[{"AB": "x"}])


# ----------------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA; benchmarks/gpu_check.sh runs it)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_pipeline_on_cuda_with_varlen_attention_matches_a_direct_generate(monkeypatch, family):
    model, processor = build_family(family, seed=3)
    model = model.to("cuda")
    pipe = ViToSPipeline(model, processor, max_new_tokens=STEPS, grounding_prompt="{question}", attention="varlen")
    script_pass1(monkeypatch, model, processor.tokenizer,
                 lambda prompt: "<box>[[0.25, 0.0, 1.0, 0.5]]</box><answer>A</answer>")
    images = scans(2, seed=4)
    results = pipe([images[0], images[1]], [QUESTION, f"other {QUESTION}"])
    monkeypatch.undo()
    inputs_boxes = [[[0.25, 0.0, 1.0, 0.5]]] * 2
    want = direct_answers(model, processor, [[images[0]], [images[1]]], [QUESTION, f"other {QUESTION}"],
                          inputs_boxes)
    assert [r.answer_text for r in results] == want
    assert all(0 < r.kept_ratio < 1 and r.timings_ms["pass2_prefill"] > 0 for r in results)
