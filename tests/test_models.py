"""patch_model on tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL / LLaVA models (fp32, CPU), against unpatched models and a
hand-written pruned decoder that uses only the unpatched modules."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers
from packaging.version import Version

import vitos_ext.patching as patching
from model_fixtures import (
    IMAGE,
    VIDEO,
    VISION_END,
    VISION_START,
    build_model,
    families,
    image_grids,
    images_per_row_of,
    make_batch,
    select,
)
from test_sparsity import nearest_reference
from vitos_ext import reference
from vitos_ext.models import adapter_for, supported_model_names

FAMILIES = families()
STEPS = 5
PROMPTS = [
    [("text", [7, 8, 9]), ("image", (8, 8)), ("text", [10, 11, 12])],
    [("text", [13]), ("image", (4, 8)), ("text", [14, 15]), ("image", (8, 4)), ("text", [16])],
]
# one entry per image, in image order: different kept counts per sample
BOXES = [
    torch.tensor([[0.0, 0.0, 0.5, 0.5]]),
    torch.tensor([[0.5, 0.0, 1.0, 1.0]]),
    torch.tensor([[0.0, 0.0, 0.2, 0.3], [0.6, 0.6, 1.0, 1.0]]),
]


@pytest.fixture(params=FAMILIES, ids=lambda f: f.name)
def family(request):
    return request.param


def greedy(model, batch, steps=STEPS, **kwargs):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kwargs)
    return out.sequences[:, -steps:], torch.stack(out.logits, dim=1)


def boxes_of(batch_index: int) -> list[torch.Tensor]:
    return BOXES[:1] if batch_index == 0 else BOXES[1:]


def cache_of(output):
    return output.cache if "cache" in output else output.past_key_values


def cache_keyword(function) -> str:
    """transformers 5.24 renamed past_key_values to cache (5.17 has only past_key_values)."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


# ----------------------------------------------------------------------------------------------------------
# the hand-written reference: kept embeddings + gathered positions, decoded token by token, unpatched modules only
# ----------------------------------------------------------------------------------------------------------


def reference_greedy(family, model, sample, boxes, steps=STEPS, fuse=False, video_boxes=None):
    """Single sample (no padding). Returns (tokens [steps], logits [steps, V]). Video tokens are all kept, or, with
    video_boxes (one [n, 4] tensor per video), those inside each video's boxes in every frame."""
    base = model.model
    ids = sample["input_ids"]
    visual, video = ids[0] == IMAGE, ids[0] == VIDEO
    videos = sample.get("pixel_values_videos")
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
        video_deepstack = []
        if videos is not None:  # videos are never pruned: their features go in at their positions, all kept
            video_features = base.get_video_features(videos, sample["video_grid_thw"], return_dict=True)
            embeds[0, video] = torch.cat(list(video_features.pooler_output))
            video_deepstack = [f if isinstance(f, torch.Tensor) else torch.cat(f)
                               for f in getattr(video_features, "deepstack_features", None) or []]
        if family.is_llava:
            features = base.get_image_features(
                pixel_values=sample["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy, return_dict=True)
        else:
            features = base.get_image_features(sample["pixel_values"], sample["image_grid_thw"], return_dict=True)
        embeds[0, visual] = torch.cat(list(features.pooler_output))
        deepstack = None
        if family.name == "qwen3_vl":
            # per-image tuples in transformers 5.24, one [N, D] tensor per layer in 5.17
            deepstack = [f if isinstance(f, torch.Tensor) else torch.cat(f) for f in features.deepstack_features]

        grids, merge = image_grids(family, model, sample)
        flat, owner = torch.cat(boxes), torch.repeat_interleave(torch.arange(len(boxes)),
                                                                 torch.tensor([len(b) for b in boxes]))
        keep = reference.region_to_patch_mask_reference(flat, owner, grids, merge)
        visual_rows = [embeds[0, visual]] + (deepstack or [])
        if fuse:
            targets = nearest_reference(keep, grids, merge)
            visual_rows = [_fuse_rows(rows, keep, targets) for rows in visual_rows]
        embeds[0, visual] = visual_rows[0]

        if family.is_llava:
            positions = torch.arange(ids.shape[1])[None]
        else:
            positions, _ = base.get_rope_index(ids, mm_token_type_ids=sample["mm_token_type_ids"],
                                               image_grid_thw=sample["image_grid_thw"],
                                               video_grid_thw=sample.get("video_grid_thw"),
                                               attention_mask=sample["attention_mask"])
        token_keep = ~visual
        token_keep[visual] = keep
        if video_boxes is not None:
            owner = torch.repeat_interleave(torch.arange(len(video_boxes)), torch.tensor([len(b) for b in video_boxes]))
            token_keep[video] = reference.region_to_patch_mask_reference(torch.cat(video_boxes), owner,
                                                                         sample["video_grid_thw"], merge)
        lm_kwargs = {}
        if deepstack is not None:  # DeepStack rows follow the image and video positions in sequence order
            union = visual | video
            joint = []
            for layer, image_rows in enumerate(visual_rows[1:]):
                rows = image_rows.new_zeros(int(union.sum()), image_rows.shape[-1])
                rows[visual[union]] = image_rows
                if video_deepstack:
                    rows[video[union]] = video_deepstack[layer]
                joint.append(rows[token_keep[union]])
            lm_kwargs = {"visual_pos_masks": union[token_keep][None], "deepstack_visual_embeds": joint}
        kept = int(token_keep.sum())
        out = base.language_model(inputs_embeds=embeds[:, token_keep], position_ids=positions[..., token_keep],
                                  attention_mask=torch.ones(1, kept, dtype=torch.long), use_cache=True, **lm_kwargs)
        next_position = int(positions.max()) + 1
        logits = [model.lm_head(out.last_hidden_state[:, -1])]
        tokens = [logits[-1].argmax(-1)]
        for step in range(steps - 1):
            shape = (1, 1) if family.is_llava else (3, 1, 1)
            out = base.language_model(
                inputs_embeds=base.get_input_embeddings()(tokens[-1][:, None]),
                position_ids=torch.full(shape, next_position + step),
                attention_mask=torch.ones(1, kept + step + 1, dtype=torch.long),
                **{cache_keyword(base.language_model.forward): cache_of(out)}, use_cache=True)
            logits.append(model.lm_head(out.last_hidden_state[:, -1]))
            tokens.append(logits[-1].argmax(-1))
    return torch.cat(tokens), torch.cat(logits)


def ref_kept(family, model, sample, boxes) -> int:
    grids, merge = image_grids(family, model, sample)
    flat = torch.cat(boxes)
    owner = torch.repeat_interleave(torch.arange(len(boxes)), torch.tensor([len(b) for b in boxes]))
    keep = reference.region_to_patch_mask_reference(flat, owner, grids, merge)
    return int((sample["input_ids"] != IMAGE).sum()) + int(keep.sum())


def _fuse_rows(rows, keep, targets):
    fused = rows.clone()
    for target in targets[~keep].unique().tolist():
        if target < 0:
            continue
        sources = ((targets == target) & ~keep).nonzero().flatten()
        fused[target] = (rows[target] + rows[sources].sum(0)) / (1 + len(sources))
    return fused


# ----------------------------------------------------------------------------------------------------------
# no vitos arguments: identical to the unpatched model
# ----------------------------------------------------------------------------------------------------------


def test_no_vitos_arguments_is_identical_to_unpatched(family):
    plain, patched = build_model(family), patching.patch_model(build_model(family))
    batch = make_batch(family, plain, PROMPTS)
    with torch.no_grad():
        expected, got = plain(**batch).logits, patched(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    tokens_expected, logits_expected = greedy(plain, batch)
    tokens_got, logits_got = greedy(patched, batch)
    assert torch.equal(tokens_got, tokens_expected)
    torch.testing.assert_close(logits_got, logits_expected, rtol=0, atol=1e-5)
    assert patched.vitos_last_prefill is None


def test_forward_signature_keeps_transformers_features(family):
    model = patching.patch_model(build_model(family))
    parameters = inspect.signature(model.forward).parameters
    original = inspect.signature(family.model_class.forward).parameters
    assert set(original) - {"self"} <= set(parameters)
    assert {"vitos_boxes", "vitos_keep", "vitos_dilate", "vitos_fuse", "vitos_image_features"} <= set(parameters)
    features = inspect.signature(model.model.get_image_features).parameters
    assert list(features) == list(inspect.signature(model.model.__class__.get_image_features).parameters)[1:]


# ----------------------------------------------------------------------------------------------------------
# pruned generation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fuse", [False, True], ids=["drop", "fuse"])
def test_pruned_generate_matches_hand_written_reference(family, fuse):
    model = patching.patch_model(build_model(family))
    plain = build_model(family)
    batch = make_batch(family, model, PROMPTS)
    for index in range(2):
        sample = select(batch, index, family, model)
        tokens, logits = greedy(model, sample, vitos_boxes=boxes_of(index), vitos_fuse=fuse)
        ref_tokens, ref_logits = reference_greedy(family, plain, sample, boxes_of(index), fuse=fuse)
        assert tokens[0].tolist() == ref_tokens.tolist()
        torch.testing.assert_close(logits[0], ref_logits, rtol=0, atol=1e-5)
        assert model.vitos_last_prefill.kept_counts.tolist() == [ref_kept(family, model, sample, boxes_of(index))]
        _, unpruned_logits = greedy(model, sample)
        assert model.vitos_last_prefill is None  # an unpruned prefill leaves no stale statistics
        assert not torch.allclose(unpruned_logits[:, 0], logits[:, 0], atol=1e-3)  # pruning changed the input


def test_decoding_continues_after_the_max_original_position(family):
    """A prompt that ends inside an image: its last token is not at the largest M-RoPE position (for Qwen), and the
    boxes drop that last token; decoding still continues at max original position + 1."""
    model = patching.patch_model(build_model(family))
    sample = select(make_batch(family, model, PROMPTS), 0, family, model)
    end = int((sample["input_ids"][0] == IMAGE).nonzero().max()) + 1
    sample = {k: v[:, :end] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
              for k, v in sample.items()}
    boxes = [torch.tensor([[0.0, 0.0, 0.4, 0.4]])]
    tokens, logits = greedy(model, sample, vitos_boxes=boxes)
    ref_tokens, ref_logits = reference_greedy(family, build_model(family), sample, boxes)
    assert tokens[0].tolist() == ref_tokens.tolist()
    torch.testing.assert_close(logits[0], ref_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.is_llava], ids=lambda f: f.name)
def test_image_pruning_keeps_every_video_token(family):
    """A prompt with an image and a video: vitos_boxes prune the image's tokens only, every video token (and, in
    Qwen3-VL, its DeepStack row) stays. Same tokens and logits as the hand-written reference, with pixels and with
    precomputed image features (Qwen3-VL encodes videos through get_image_features: that call must not be taken for
    the images'); boxes that keep everything give the unpatched model's tokens."""
    model = patching.patch_model(build_model(family))
    sample = make_batch(family, model, [[("text", [7, 8]), ("image", (8, 8)), ("text", [9]), ("video", (2, 4, 4)),
                                         ("text", [10, 11])]])
    boxes = [torch.tensor([[0.0, 0.0, 0.5, 0.5]])]
    tokens, logits = greedy(model, sample, vitos_boxes=boxes)
    assert model.vitos_last_prefill.kept_counts.tolist() == [ref_kept(family, model, sample, boxes)]
    ref_tokens, ref_logits = reference_greedy(family, build_model(family), sample, boxes)
    assert tokens[0].tolist() == ref_tokens.tolist()
    torch.testing.assert_close(logits[0], ref_logits, rtol=0, atol=1e-5)
    with torch.no_grad():
        features = patching.encode_images(model, sample["pixel_values"], image_grid_thw=sample["image_grid_thw"])
    no_pixels = {k: v for k, v in sample.items() if k != "pixel_values"}
    cached_tokens, cached_logits = greedy(model, no_pixels, vitos_boxes=boxes, vitos_image_features=features)
    assert cached_tokens.tolist() == tokens.tolist()
    torch.testing.assert_close(cached_logits, logits, rtol=0, atol=1e-5)
    everything = [torch.tensor([[0.0, 0.0, 1.0, 1.0]])]
    assert greedy(model, sample, vitos_boxes=everything)[0].tolist() == greedy(build_model(family), sample)[0].tolist()


@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.is_llava], ids=lambda f: f.name)
def test_video_boxes_prune_video_tokens_in_every_frame(family):
    """vitos_video_boxes keep the video tokens inside each video's boxes, the same region in every frame, alone or
    with image boxes: same tokens and logits as the hand-written reference."""
    model = patching.patch_model(build_model(family))
    sample = make_batch(family, model, [[("text", [7, 8]), ("image", (8, 8)), ("text", [9]), ("video", (2, 8, 4)),
                                         ("text", [10, 11])]])
    video_boxes = [torch.tensor([[0.0, 0.0, 0.6, 0.5]])]
    everything = [torch.tensor([[0.0, 0.0, 1.0, 1.0]])]
    video_tokens = int((sample["input_ids"] == VIDEO).sum())
    for image_boxes in (None, [torch.tensor([[0.5, 0.5, 1.0, 1.0]])]):
        extra = {} if image_boxes is None else {"vitos_boxes": image_boxes}
        tokens, logits = greedy(model, sample, vitos_video_boxes=video_boxes, **extra)
        stats = model.vitos_last_prefill
        ref_tokens, ref_logits = reference_greedy(family, build_model(family), sample, image_boxes or everything,
                                                  video_boxes=video_boxes)
        assert tokens[0].tolist() == ref_tokens.tolist()
        torch.testing.assert_close(logits[0], ref_logits, rtol=0, atol=1e-5)
        image_kept = 16 if image_boxes is None else 4  # 4 x 4 image tokens; the box keeps one 2 x 2 quarter
        video_kept = video_kept_by(video_boxes, sample)
        assert video_kept == 2 * 2 * 2  # in each of the 2 frames: rows 0-1 of 4 (y2 = 0.5), both columns (x2 = 0.6)
        assert stats.visual_kept_counts.tolist() == [image_kept + video_kept]
        assert stats.kept_counts.tolist() == [sample["input_ids"].shape[1] - (16 - image_kept)
                                              - (video_tokens - video_kept)]
    greedy(model, sample, steps=1, vitos_video_boxes=video_boxes, vitos_dilate=1)
    dilated = video_kept_by(video_boxes, sample, dilate=1)
    assert model.vitos_last_prefill.visual_kept_counts.tolist() == [16 + dilated] and dilated > video_kept


def video_kept_by(video_boxes, sample, dilate=0) -> int:
    owner = torch.repeat_interleave(torch.arange(len(video_boxes)), torch.tensor([len(b) for b in video_boxes]))
    return int(reference.region_to_patch_mask_reference(torch.cat(video_boxes), owner, sample["video_grid_thw"], 2,
                                                        dilate=dilate).sum())


def test_video_box_errors_name_the_argument(family):
    model = patching.patch_model(build_model(family))
    if family.is_llava:
        batch = make_batch(family, model, PROMPTS[:1])
        with pytest.raises(ValueError, match="vitos_video_boxes: LlavaForConditionalGeneration takes no video"):
            greedy(model, batch, steps=1, vitos_video_boxes=[torch.zeros(0, 4)])
        return
    batch = make_batch(family, model, [[("text", [7]), ("image", (4, 4)), ("video", (2, 4, 4)), ("text", [8])]])
    no_video = make_batch(family, model, PROMPTS[:1])
    box = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    cases = [
        (batch, dict(vitos_video_boxes=[box, box]), ValueError, "vitos_video_boxes has 2 entries but the batch has 1 "
                                                                 "video"),
        (batch, dict(vitos_video_boxes=box), TypeError, "vitos_video_boxes must be a list"),
        (batch, dict(vitos_video_boxes=[box[:, :3]]), ValueError, r"vitos_video_boxes\[0\] must have shape"),
        (batch, dict(vitos_video_boxes=[box], vitos_fuse=True), ValueError, "vitos_fuse applies to image tokens"),
        (batch, dict(vitos_video_boxes=[box], num_beams=2), ValueError, "vitos_video_boxes needs num_beams"),
        (no_video, dict(vitos_video_boxes=[box]), ValueError, "the batch has no videos"),
    ]
    for inputs, kwargs, error, words in cases:
        with pytest.raises(error, match=words):
            greedy(model, inputs, steps=1, **kwargs)


def test_batch_with_different_kept_counts_equals_singles(family):
    model = patching.patch_model(build_model(family))
    batch = make_batch(family, model, PROMPTS)
    tokens, logits = greedy(model, batch, vitos_boxes=BOXES)
    stats = model.vitos_last_prefill
    counts = stats.kept_counts.tolist()
    assert counts[0] != counts[1]
    for index in range(2):
        single_tokens, single_logits = greedy(model, select(batch, index, family, model),
                                              vitos_boxes=boxes_of(index))
        assert tokens[index].tolist() == single_tokens[0].tolist()
        torch.testing.assert_close(logits[index], single_logits[0], rtol=0, atol=1e-4)
        assert model.vitos_last_prefill.kept_counts.tolist() == [counts[index]]


def repeat_prompts(family, model, batch: dict, copies: int) -> dict:
    """The batch with every row repeated `copies` times (adjacent) together with its images, built by hand."""
    images_per_row = images_per_row_of(batch)
    grids, _ = image_grids(family, model, batch)
    patches = grids.prod(-1).tolist()
    pixel_rows, first = [], 0
    for count in images_per_row:
        mine = range(first, first + count)
        first += count
        if family.is_llava:
            chunk = batch["pixel_values"][list(mine)]
        else:
            start = sum(patches[:mine.start])
            chunk = batch["pixel_values"][start:start + sum(patches[i] for i in mine)]
        pixel_rows += [chunk] * copies
    out = {k: batch[k].repeat_interleave(copies, 0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")
           if k in batch}
    out["pixel_values"] = torch.cat(pixel_rows)
    if not family.is_llava:
        owner = torch.repeat_interleave(torch.arange(len(images_per_row)), torch.tensor(images_per_row))
        out["image_grid_thw"] = torch.cat([grids[owner == row].repeat(copies, 1)
                                           for row in range(len(images_per_row))])
    return out


def sample(model, batch, seed=0, steps=STEPS, **kwargs):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=steps, do_sample=True, temperature=1.5, top_k=0,
                              **kwargs)[:, -steps:]


def test_num_return_sequences_prunes_every_copy_like_its_prompt(family):
    """generate(num_return_sequences=3) repeats each prompt and its images before the prefill; the boxes (or keep
    mask) follow: the same samples as a batch repeated by hand with the boxes repeated alike, and a keep mask gives
    what the boxes give."""
    model = patching.patch_model(build_model(family))
    prompts, boxes_per_prompt = PROMPTS, [BOXES[:1], BOXES[1:]]
    batch = make_batch(family, model, prompts)
    unpruned = sample(model, batch, num_return_sequences=3)
    if unpruned.tolist() != sample(model, repeat_prompts(family, model, batch, 3)).tolist():
        # transformers < 5.24 repeats LLaVA's pixel_values image by image ([A, A, B, B] for a prompt with images
        # A, B), so its own unpruned output already differs from the prompts repeated by hand: one image per prompt
        assert family.is_llava and Version(transformers.__version__) < Version("5.24"), transformers.__version__
        prompts, boxes_per_prompt = [PROMPTS[0], PROMPTS[1][:3]], [BOXES[:1], BOXES[1:2]]
        batch = make_batch(family, model, prompts)
        unpruned = sample(model, batch, num_return_sequences=3)
        assert unpruned.tolist() == sample(model, repeat_prompts(family, model, batch, 3)).tolist()
    boxes = [b for per_prompt in boxes_per_prompt for b in per_prompt]
    got = sample(model, batch, num_return_sequences=3, vitos_boxes=boxes)
    counts = model.vitos_last_prefill.kept_counts.tolist()
    repeated_boxes = [b for per_prompt in boxes_per_prompt for b in per_prompt * 3]
    want = sample(model, repeat_prompts(family, model, batch, 3), vitos_boxes=repeated_boxes)
    assert got.tolist() == want.tolist()
    assert counts == model.vitos_last_prefill.kept_counts.tolist()
    assert counts[:3] == [counts[0]] * 3 and counts[3:] == [counts[3]] * 3 and counts[0] != counts[3]
    grids, merge = image_grids(family, model, batch)
    owner = torch.repeat_interleave(torch.arange(len(boxes)), torch.tensor([len(b) for b in boxes]))
    keep = reference.region_to_patch_mask_reference(torch.cat(boxes), owner, grids, merge)
    assert sample(model, batch, num_return_sequences=3, vitos_keep=keep).tolist() == got.tolist()
    assert unpruned.tolist() == sample(build_model(family), batch, num_return_sequences=3).tolist()
    assert unpruned.tolist() != got.tolist()


def test_beam_search_with_boxes_equals_singles_and_keep_all_equals_unpatched(family):
    model = patching.patch_model(build_model(family))
    batch = make_batch(family, model, PROMPTS)
    beams = dict(num_beams=3, num_return_sequences=2)
    tokens, _ = greedy(model, batch, vitos_boxes=BOXES, **beams)
    for index in range(2):
        single, _ = greedy(model, select(batch, index, family, model), vitos_boxes=boxes_of(index), **beams)
        assert tokens[2 * index:2 * index + 2].tolist() == single.tolist()
    everything = [torch.tensor([[0.0, 0.0, 1.0, 1.0]])] * 3
    kept_all, _ = greedy(model, batch, vitos_boxes=everything, **beams)
    assert model.vitos_last_prefill.visual_kept_counts.sum() == 3 * int((batch["input_ids"] == IMAGE).sum())
    assert kept_all.tolist() == greedy(build_model(family), batch, **beams)[0].tolist()


@pytest.mark.parametrize("attention, implementation", [("model", "eager"), ("model", "sdpa"), ("varlen", "eager")])
def test_static_cache_generate_equals_dynamic_cache(family, attention, implementation):
    """generate(cache_implementation="static") prebuilds the prefill's 4-D mask for the whole prompt: pruning reads
    the padding from it, and decoding continues from the compacted static cache (the slots past the kept tokens stay
    unused). Same tokens and logits as with the dynamic cache, for a padded batch and a single unpadded prompt, and
    the same beams."""
    model = patching.patch_model(build_model(family, attn_implementation=implementation), attention=attention)
    batch = make_batch(family, model, PROMPTS)
    for inputs, boxes in ((batch, BOXES), (select(batch, 0, family, model), boxes_of(0))):
        tokens, logits = greedy(model, inputs, vitos_boxes=boxes)
        counts = model.vitos_last_prefill.kept_counts.tolist()
        static_tokens, static_logits = greedy(model, inputs, vitos_boxes=boxes, cache_implementation="static")
        assert model.vitos_last_prefill.kept_counts.tolist() == counts
        assert static_tokens.tolist() == tokens.tolist()
        torch.testing.assert_close(static_logits, logits, rtol=0, atol=1e-5)
    beams = dict(vitos_boxes=BOXES, num_beams=3, num_return_sequences=2)  # the prompts repeated before the prefill
    assert greedy(model, batch, cache_implementation="static", **beams)[0].tolist() == \
        greedy(model, batch, **beams)[0].tolist()


def test_static_cache_generate_with_auto_compiled_decoding():
    """On CUDA, generate() with a static cache compiles the model's __call__ for the decoding steps, which run the
    patched forward: same tokens and logits as uncompiled. Forced on this CPU with the compile config's all-devices
    switch, Dynamo only (eager backend)."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    family = FAMILIES[1]
    model = patching.patch_model(build_model(family), attention="varlen")
    batch = make_batch(family, model, PROMPTS)
    want_tokens, want_logits = greedy(model, batch, vitos_boxes=BOXES, cache_implementation="static")
    config = CompileConfig(backend="eager", mode=None)
    config._compile_all_devices = True
    calls = []
    compiled_call = model.get_compiled_call

    def spy(compile_config):
        calls.append(compile_config)
        return compiled_call(compile_config)

    model.get_compiled_call = spy
    tokens, logits = greedy(model, batch, vitos_boxes=BOXES, cache_implementation="static", compile_config=config)
    del model.get_compiled_call
    torch._dynamo.reset()
    assert calls  # the decoding steps did run compiled
    assert tokens.tolist() == want_tokens.tolist()
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)


def test_repeated_prompt_image_order():
    order = patching._repeated_prompt_image_order
    assert order([4, 3, 0], [4, 1, 2], 2) == [0, 0, 1, 2, 1, 2]
    assert order([0, 5], [5], 3) == [0, 0, 0]
    assert order([2, 2], [2, 2], 1) == [0, 1]
    with pytest.raises(ValueError, match="do not end at an image boundary"):
        order([3, 3], [2, 4], 2)
    with pytest.raises(ValueError, match="more visual tokens than the images"):
        order([4, 4], [4], 2)
    with pytest.raises(ValueError, match="cover only 1"):
        order([4], [4, 4], 2)


def test_last_prefill_reports_kept_tokens(family):
    model = patching.patch_model(build_model(family))
    batch = make_batch(family, model, PROMPTS)
    grids, merge = image_grids(family, model, batch)
    flat = torch.cat(BOXES)
    owner = torch.repeat_interleave(torch.arange(3), torch.tensor([len(b) for b in BOXES]))
    keep = reference.region_to_patch_mask_reference(flat, owner, grids, merge)
    greedy(model, batch, steps=1, vitos_boxes=BOXES)
    stats = model.vitos_last_prefill
    visual = batch["input_ids"] == IMAGE
    per_sample_visual = visual.sum(-1)
    assert stats.visual_counts.tolist() == per_sample_visual.tolist()
    split = per_sample_visual.tolist()
    assert stats.visual_kept_counts.tolist() == [int(k.sum()) for k in keep.split(split)]
    text = (batch["attention_mask"].bool() & ~visual).sum(-1)
    assert stats.kept_counts.tolist() == (text + stats.visual_kept_counts).tolist()
    assert stats.kept_ratio == pytest.approx(int(keep.sum()) / keep.numel())
    assert stats.inputs_embeds is None


def test_vitos_keep_equals_boxes_and_dilate_grows_the_region(family):
    model = patching.patch_model(build_model(family))
    batch = make_batch(family, model, PROMPTS)
    grids, merge = image_grids(family, model, batch)
    flat = torch.cat(BOXES)
    owner = torch.repeat_interleave(torch.arange(3), torch.tensor([len(b) for b in BOXES]))
    keep = reference.region_to_patch_mask_reference(flat, owner, grids, merge)
    by_boxes, _ = greedy(model, batch, vitos_boxes=BOXES)
    by_keep, _ = greedy(model, batch, vitos_keep=keep)
    assert torch.equal(by_boxes, by_keep)
    greedy(model, batch, steps=1, vitos_boxes=BOXES, vitos_dilate=1)
    dilated = reference.region_to_patch_mask_reference(flat, owner, grids, merge, dilate=1)
    assert model.vitos_last_prefill.visual_kept_counts.sum() == int(dilated.sum()) > int(keep.sum())


def test_fusion_with_an_explicit_map(family):
    model = patching.patch_model(build_model(family))
    batch = make_batch(family, model, PROMPTS)
    grids, merge = image_grids(family, model, batch)
    flat = torch.cat(BOXES)
    owner = torch.repeat_interleave(torch.arange(3), torch.tensor([len(b) for b in BOXES]))
    keep = reference.region_to_patch_mask_reference(flat, owner, grids, merge)
    nearest = nearest_reference(keep, grids, merge)
    by_flag, flag_logits = greedy(model, batch, vitos_keep=keep, vitos_fuse=True)
    by_map, map_logits = greedy(model, batch, vitos_keep=keep, vitos_fuse=nearest)
    dropped, _ = greedy(model, batch, vitos_keep=keep)
    assert torch.equal(by_flag, by_map)
    torch.testing.assert_close(flag_logits, map_logits, rtol=0, atol=0)
    assert not torch.allclose(flag_logits, greedy(model, batch, vitos_keep=keep)[1])


def test_manual_decoding_from_the_compacted_cache(family):
    """A pruned forward() then a decode step without generate(). Qwen: no positions given, transformers derives
    them from the cache length and rope_deltas (max original position + 1 - kept length). LLaVA: explicit
    positions from vitos_last_prefill.next_position."""
    model = patching.patch_model(build_model(family))
    sample = select(make_batch(family, model, PROMPTS), 1, family, model)
    tokens, logits = greedy(model, sample, steps=2, vitos_boxes=boxes_of(1))
    with torch.no_grad():
        prefill = model(**sample, vitos_boxes=boxes_of(1), use_cache=True)
        stats = model.vitos_last_prefill
        assert prefill.logits.shape[1] == stats.attention_mask.shape[1] == int(stats.kept_counts[0])
        torch.testing.assert_close(prefill.logits[:, -1], logits[:, 0], rtol=0, atol=1e-5)
        step = {"input_ids": tokens[:, :1]}
        if family.is_llava:
            step["position_ids"] = stats.next_position[:, None]
            step["attention_mask"] = torch.cat([stats.attention_mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
        else:
            assert torch.equal(model.model.rope_deltas, stats.next_position[:, None] - stats.kept_counts[:, None])
        decoded = model(**step, **{cache_keyword(family.model_class.forward): cache_of(prefill)}, use_cache=True)
    torch.testing.assert_close(decoded.logits[:, -1], logits[:, 1], rtol=0, atol=1e-5)


def test_torch_compile_of_the_patched_model():
    """torch.compile(model) traces the patched forward and get_image_features: they must reach the class's own
    methods, not resolve back to the patched instance attributes (that recursed endlessly). Dynamo only (eager
    backend): what broke was the tracing."""
    torch._dynamo.reset()
    family = FAMILIES[1]
    model = patching.patch_model(build_model(family), attention="varlen")
    batch = make_batch(family, model, PROMPTS)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        for vitos in ({}, {"vitos_boxes": BOXES}):
            want = model(**batch, **vitos).logits
            torch.testing.assert_close(compiled(**batch, **vitos).logits, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


NO_VISION_TOKENS = [VISION_START, VISION_END, IMAGE, VIDEO]  # generated text must not open a new image


def _follow_up(family, batch, sequences, extra=(20, 21)):
    """The whole conversation after a first generate(): its sequences plus `extra` text tokens of a follow-up."""
    ids = torch.cat([sequences, torch.tensor([list(extra)] * sequences.shape[0])], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones(ids.shape[0], ids.shape[1] - batch["input_ids"].shape[1],
                                                          dtype=batch["attention_mask"].dtype)], dim=1)
    out = {"input_ids": ids, "attention_mask": mask}
    out.update({k: v for k, v in batch.items() if k in ("pixel_values", "image_grid_thw")})
    if not family.is_llava:
        out["mm_token_type_ids"] = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
    return out


@pytest.mark.parametrize("attention", ["model", "varlen"])
def test_pruned_generate_under_inference_mode(family, attention):
    """Serving code runs under torch.inference_mode(): its tensors have no version counter, which the varlen
    backend's per-forward memo read (it raised). Same tokens and logits as under no_grad."""
    model = patching.patch_model(build_model(family), attention=attention)
    batch = make_batch(family, model, PROMPTS)
    want_tokens, want_logits = greedy(model, batch, vitos_boxes=BOXES, vitos_fuse=True)
    with torch.inference_mode():
        tokens, logits = greedy(model, batch, vitos_boxes=BOXES, vitos_fuse=True)
        plain_tokens, _ = greedy(model, batch)
    assert torch.equal(tokens, want_tokens) and torch.equal(plain_tokens, greedy(model, batch)[0])
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)


@pytest.mark.parametrize("attention", ["model", "varlen"])
def test_generate_continues_a_pruned_cache_like_a_fresh_pruned_generate(family, attention):
    """A follow-up turn: generate() given the whole conversation and the cache of a pruned generate() (or of a
    pruned forward()) continues the compacted cache, and decodes what a fresh pruned generate() of the whole
    conversation decodes (same kept tokens, same positions), for a left-padded batch with different kept counts."""
    model = patching.patch_model(build_model(family), attention=attention)
    batch = make_batch(family, model, PROMPTS)
    keyword = cache_keyword(family.model_class.forward)
    decode = dict(do_sample=False, return_dict_in_generate=True, output_logits=True, suppress_tokens=NO_VISION_TOKENS)
    with torch.no_grad():
        first = model.generate(**batch, max_new_tokens=3, vitos_boxes=BOXES, **decode)
        follow_up = _follow_up(family, batch, first.sequences)
        got = model.generate(**follow_up, **{keyword: cache_of(first)}, max_new_tokens=4, **decode)
        want = model.generate(**follow_up, max_new_tokens=4, vitos_boxes=BOXES, **decode)
        assert torch.equal(got.sequences[:, :follow_up["input_ids"].shape[1]], follow_up["input_ids"])
        assert torch.equal(got.sequences, want.sequences)
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-5, atol=1e-5)
        # a third turn continues the same cache again
        third = _follow_up(family, batch, got.sequences, extra=(22,))
        got = model.generate(**third, **{keyword: cache_of(got)}, max_new_tokens=2, **decode)
        want = model.generate(**third, max_new_tokens=2, vitos_boxes=BOXES, **decode)
        assert torch.equal(got.sequences, want.sequences)

        # max_length counts the whole (uncompacted) sequence, as for a fresh generate()
        first = model.generate(**batch, max_new_tokens=3, vitos_boxes=BOXES, **decode)
        total = follow_up["input_ids"].shape[1] + 2
        got = model.generate(**follow_up, **{keyword: cache_of(first)}, max_length=total, **decode)
        want = model.generate(**follow_up, max_length=total, vitos_boxes=BOXES, **decode)
        assert got.sequences.shape[1] == total and torch.equal(got.sequences, want.sequences)

        prefill = model(**batch, vitos_boxes=BOXES, use_cache=True)  # a pruned forward's cache continues alike
        after_prompt = _follow_up(family, batch, batch["input_ids"], extra=(23, 24))
        got = model.generate(**after_prompt, **{keyword: cache_of(prefill)}, max_new_tokens=3, **decode)
        want = model.generate(**after_prompt, max_new_tokens=3, vitos_boxes=BOXES, **decode)
        assert torch.equal(got.sequences, want.sequences)


def test_continuing_a_pruned_cache_refuses_what_it_cannot_continue():
    family = FAMILIES[1]
    model = patching.patch_model(build_model(family))
    batch = make_batch(family, model, PROMPTS)
    keyword = cache_keyword(family.model_class.forward)
    with torch.no_grad():
        first = model.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                               suppress_tokens=NO_VISION_TOKENS, vitos_boxes=BOXES)
        cache = {keyword: cache_of(first)}
        follow_up = _follow_up(family, batch, first.sequences)
        changed = dict(follow_up, input_ids=follow_up["input_ids"].clone())
        changed["input_ids"][0, -6] = 30  # a prompt token differs from the one the cache was pruned from
        with pytest.raises(ValueError, match="input_ids: this cache holds a pruned prompt of 2 x"):
            model.generate(**changed, **cache, max_new_tokens=1)
        with pytest.raises(ValueError, match="input_ids: this cache holds a pruned prompt"):
            model.generate(**dict(follow_up, input_ids=follow_up["input_ids"][:1]), **cache, max_new_tokens=1)
        image = _follow_up(family, batch, first.sequences, extra=(VISION_START, IMAGE))
        with pytest.raises(ValueError, match="cannot add images or videos"):
            model.generate(**image, **cache, max_new_tokens=1)
        with pytest.raises(ValueError, match="num_beams = num_return_sequences = 1"):
            model.generate(**follow_up, **cache, max_new_tokens=1, num_beams=2)
        with pytest.raises(ValueError, match="it cannot continue from a non-empty cache"):
            model.generate(**follow_up, **cache, max_new_tokens=1, vitos_boxes=BOXES)
        reference = build_model(family)  # an unpruned cache continues as on the unpatched model
        results = []
        for m in (model, reference):
            full = m.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                              suppress_tokens=NO_VISION_TOKENS)
            again = _follow_up(family, batch, full.sequences)
            again.pop("pixel_values")  # transformers' own continuation takes no images again
            results.append(m.generate(**again, **{keyword: cache_of(full)}, max_new_tokens=3, do_sample=False))
    assert torch.equal(results[0], results[1])


def test_pruned_forward_with_labels_compacts_them_and_backpropagates(family):
    model = patching.patch_model(build_model(family))
    batch = make_batch(family, model, PROMPTS)
    labels = batch["input_ids"].masked_fill((batch["input_ids"] == IMAGE) | (batch["attention_mask"] == 0), -100)
    model.train()
    out = model(**batch, labels=labels, vitos_boxes=BOXES)
    stats = model.vitos_last_prefill
    source = stats.source_index
    compact = torch.where(source >= 0, labels.flatten()[source.clamp_min(0)], torch.full_like(source, -100))
    logits = out.logits.float()
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 compact[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    vision = model.model.vision_tower if family.is_llava else model.model.visual
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vision.parameters())
    as_tuple = model(**batch, labels=labels, vitos_boxes=BOXES, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)


# ----------------------------------------------------------------------------------------------------------
# vision features computed once, reused for two prefills
# ----------------------------------------------------------------------------------------------------------


def test_image_features_are_computed_once_for_two_prefills(family):
    model = patching.patch_model(build_model(family))
    batch = make_batch(family, model, PROMPTS)
    full, _ = greedy(model, batch)
    pruned, _ = greedy(model, batch, vitos_boxes=BOXES)
    vision = model.model.vision_tower if family.is_llava else model.model.visual
    calls = []
    handle = vision.register_forward_hook(lambda *_: calls.append(1))
    try:
        image_inputs = {} if family.is_llava else {"image_grid_thw": batch["image_grid_thw"]}
        with torch.no_grad():
            features = patching.encode_images(model, batch["pixel_values"], **image_inputs)
        no_pixels = {k: v for k, v in batch.items() if k != "pixel_values"}
        no_images = {k: v for k, v in no_pixels.items() if k != "image_grid_thw"}  # taken from the features
        first, _ = greedy(model, no_pixels, vitos_image_features=features)
        second, _ = greedy(model, no_images, vitos_image_features=features, vitos_boxes=BOXES)
        again, _ = greedy(model, batch, vitos_image_features=features, vitos_boxes=BOXES)
        with torch.no_grad():
            forward_logits = model(**no_images, vitos_image_features=features, vitos_boxes=BOXES).logits
    finally:
        handle.remove()
    assert len(calls) == 1
    assert torch.equal(first, full) and torch.equal(second, pruned) and torch.equal(again, pruned)
    with torch.no_grad():
        expected_logits = model(**batch, vitos_boxes=BOXES).logits
    torch.testing.assert_close(forward_logits, expected_logits, rtol=0, atol=0)
    assert features.num_tokens == int((batch["input_ids"] == IMAGE).sum())


# ----------------------------------------------------------------------------------------------------------
# patch / unpatch / class-level patching
# ----------------------------------------------------------------------------------------------------------


def _snapshot(model):
    modules = {name: (set(m.__dict__), len(m._forward_pre_hooks)) for name, m in model.named_modules()}
    implementations = {name: m.config._attn_implementation for name, m in model.named_modules()
                       if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")}
    return modules, implementations


@pytest.mark.parametrize("attention", ["model", "varlen"])
def test_unpatch_restores_exactly(family, attention):
    model = build_model(family)
    batch = make_batch(family, model, PROMPTS)
    tokens, _ = greedy(model, batch)
    before = _snapshot(model)  # after a first call: transformers installs some output-capturing hooks lazily
    patching.patch_model(model, attention=attention)
    greedy(model, batch, vitos_boxes=BOXES)
    assert _snapshot(model) != before
    assert patching.unpatch_model(model) is model
    assert _snapshot(model) == before
    assert not patching.is_patched(model)
    assert torch.equal(greedy(model, batch)[0], tokens)
    with pytest.raises(ValueError, match="vitos_boxes"):  # generate() no longer knows the argument
        greedy(model, batch, vitos_boxes=BOXES)
    assert patching.unpatch_model(model) is model  # unpatching twice is a no-op


def test_save_pretrained_of_a_patched_model_loads_unpatched(family, tmp_path):
    """Patching adds no parameter or buffer: save_pretrained writes the model's own weights, which load into a plain
    model (no vitos_ext) with the same outputs, and config.json names no vitos attention."""
    model = patching.patch_model(build_model(family, attn_implementation="sdpa"), attention="varlen")
    reference = build_model(family, attn_implementation="sdpa")
    assert model.state_dict().keys() == reference.state_dict().keys()
    model.save_pretrained(tmp_path)
    assert "vitos" not in (tmp_path / "config.json").read_text()
    loaded = family.model_class.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    batch = make_batch(family, model, PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("patch_first", [False, True], ids=["offload_then_patch", "patch_then_offload"])
def test_accelerate_offloaded_model(family, patch_first):
    """Models loaded with device_map / offloading carry accelerate hooks that move inputs and load each module's
    weights right before its forward. The patch's forwards run inside those hooks (patched before or after them):
    same pruned tokens as the model in memory; unpatching keeps the hooks working."""
    from accelerate import cpu_offload

    reference = patching.patch_model(build_model(family), attention="varlen")
    batch = make_batch(family, reference, PROMPTS)
    want = greedy(reference, batch, vitos_boxes=BOXES)
    model = build_model(family)
    if patch_first:
        patching.patch_model(model, attention="varlen")
    model = cpu_offload(model, execution_device=torch.device("cpu"))  # weights stay off the module until used
    if not patch_first:
        patching.patch_model(model, attention="varlen")
    tokens, logits = greedy(model, batch, vitos_boxes=BOXES)
    assert torch.equal(tokens, want[0])
    torch.testing.assert_close(logits, want[1], rtol=1e-5, atol=1e-5)
    patching.unpatch_model(model)
    assert torch.equal(greedy(model, batch)[0], greedy(build_model(family), batch)[0])


def test_patch_twice_is_patch_once(family):
    once = patching.patch_model(build_model(family))
    twice = patching.patch_model(patching.patch_model(build_model(family)))
    assert _snapshot(once) == _snapshot(twice)
    assert len(twice.model.language_model._forward_pre_hooks) == 1
    batch = make_batch(family, once, PROMPTS)
    assert torch.equal(greedy(once, batch, vitos_boxes=BOXES)[0], greedy(twice, batch, vitos_boxes=BOXES)[0])
    patching.unpatch_model(twice)
    assert not patching.is_patched(twice) and len(twice.model.language_model._forward_pre_hooks) == 0


def test_deepcopy_of_a_patched_model_prunes_itself(family):
    model = patching.patch_model(build_model(family))
    clone = copy.deepcopy(model)
    batch = make_batch(family, model, PROMPTS)
    tokens, _ = greedy(clone, batch, vitos_boxes=BOXES)
    assert clone.vitos_last_prefill is not None and model.vitos_last_prefill is None
    assert torch.equal(tokens, greedy(model, batch, vitos_boxes=BOXES)[0])
    patching.unpatch_model(clone)
    assert patching.is_patched(model)


def _with_lora(model, seed: int = 0):
    """`model` wrapped by PEFT with LoRA on q/v projections, B initialized non-zero so the adapters change outputs."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return wrapped


def test_peft_wrapped_model_patches_the_model_inside(family):
    """patch_model on a PeftModel patches the wrapped VLM (its modules hold the LoRA layers): pruned generate()
    and forward() through the wrapper equal patching first and wrapping after; unpatch through the wrapper restores."""
    batch = make_batch(family, build_model(family), PROMPTS)
    patched_then_wrapped = _with_lora(patching.patch_model(build_model(family)))
    want, want_logits = greedy(patched_then_wrapped, batch, vitos_boxes=BOXES)
    wrapped = _with_lora(build_model(family))
    assert patching.patch_model(wrapped) is wrapped
    assert patching.is_patched(wrapped) and patching.is_patched(wrapped.get_base_model())
    got, got_logits = greedy(wrapped, batch, vitos_boxes=BOXES)
    assert got.tolist() == want.tolist()
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-6)
    counts = patched_then_wrapped.vitos_last_prefill.kept_counts
    assert torch.equal(wrapped.vitos_last_prefill.kept_counts, counts)
    with torch.no_grad():
        pruned = wrapped(**batch, vitos_boxes=BOXES).logits
    assert pruned.shape[1] == int(wrapped.vitos_last_prefill.kept_counts.max())
    image_inputs = {} if family.is_llava else {"image_grid_thw": batch["image_grid_thw"]}
    with torch.no_grad():
        features = patching.encode_images(wrapped, batch["pixel_values"], **image_inputs)
    reused, _ = greedy(wrapped, batch, vitos_image_features=features, vitos_boxes=BOXES)
    assert reused.tolist() == want.tolist()
    _, without_lora = greedy(patching.patch_model(build_model(family)), batch, vitos_boxes=BOXES)
    assert not torch.allclose(got_logits, without_lora, atol=1e-3)  # the adapters are in effect
    assert patching.unpatch_model(wrapped) is wrapped and not patching.is_patched(wrapped)
    with pytest.raises(ValueError, match="vitos_boxes"):
        greedy(wrapped, batch, vitos_boxes=BOXES)


def test_class_level_apply_and_revert(family):
    import vitos_ext.models as models

    module = __import__(f"{models.__name__}.{family.name}", fromlist=["ADAPTER"])
    apply = getattr(module, f"apply_vitos_to_{family.name}")
    revert = getattr(module, f"revert_vitos_to_{family.name}")
    original_init = family.model_class.__dict__["__init__"]
    apply(attention="model")
    try:
        apply(attention="model")  # idempotent
        model = build_model(family)
        assert patching.is_patched(model)
        batch = make_batch(family, model, PROMPTS)
        expected = greedy(patching.patch_model(build_model(family)), batch, vitos_boxes=BOXES)[0]
        assert torch.equal(greedy(model, batch, vitos_boxes=BOXES)[0], expected)
    finally:
        revert()
    assert family.model_class.__dict__["__init__"] is original_init
    assert not patching.is_patched(build_model(family))
    assert patching.is_patched(model)  # instances built meanwhile stay patched until unpatch_model


# ----------------------------------------------------------------------------------------------------------
# attention through varlen_attention
# ----------------------------------------------------------------------------------------------------------


def test_vision_tower_through_varlen_matches_eager(family, monkeypatch):
    eager = build_model(family)
    varlen = patching.patch_model(build_model(family), attention="varlen")
    batch = make_batch(family, eager, PROMPTS)
    image_inputs = {} if family.is_llava else {"image_grid_thw": batch["image_grid_thw"]}
    import vitos_ext.ops.attention as attention_ops

    calls = []
    real = attention_ops.varlen_attention

    def counting(*args, **kwargs):
        calls.append(args[3].numel() - 1)  # sequences (images or windows) in this call
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_ops, "varlen_attention", counting)
    import vitos_ext.hf_attention as hf_attention

    monkeypatch.setattr(hf_attention, "varlen_attention", counting)
    with torch.no_grad():
        expected = patching.encode_images(eager, batch["pixel_values"], **image_inputs)
        got = patching.encode_images(varlen, batch["pixel_values"], **image_inputs)
    depth = len(adapter_for(varlen).vision_attention_modules(varlen)) or varlen.config.vision_config.num_hidden_layers
    assert len(calls) == depth  # one varlen call per vision layer, whatever the number of images / windows
    if family.name == "qwen2_5_vl":
        assert max(calls) > batch["image_grid_thw"].shape[0]  # windowed layers: all windows in the one call
    for a, b in zip(got.output.pooler_output, expected.output.pooler_output):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# Qwen-VL families only: LLaVA's vision tower (CLIP/SigLIP) has a 2-D patch conv, which patch_model leaves alone
@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.is_llava], ids=lambda f: f.name)
def test_qwen_patch_embed_runs_as_one_matmul_and_unpatch_restores_it(family, monkeypatch):
    model = build_model(family)
    patch_embed = model.model.visual.patch_embed
    batch = make_batch(family, model, PROMPTS)
    with torch.no_grad():
        expected = patch_embed(batch["pixel_values"])
        patching.patch_model(model, attention="varlen")
        conv_calls = []
        monkeypatch.setattr(type(patch_embed.proj), "forward", lambda *a: conv_calls.append(1) or None)
        got = patch_embed(batch["pixel_values"])
        monkeypatch.undo()
    assert not conv_calls  # the Conv3d (slow in cuDNN bf16 for this shape) never runs
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # a weight that is not in place (a ZeRO-3 partition is an empty tensor until the conv's own hook gathers it)
    # is left to the conv
    full_weight = patch_embed.proj.weight.data
    with torch.no_grad():
        patch_embed.proj.weight.data = torch.empty(0)
        monkeypatch.setattr(type(patch_embed.proj), "forward",
                            lambda conv, x: conv_calls.append(1) or x.new_zeros(x.shape[0], conv.out_channels))
        assert patch_embed(batch["pixel_values"]).shape == expected.shape and conv_calls == [1]
        monkeypatch.undo()
    patch_embed.proj.weight.data = full_weight
    patching.unpatch_model(model)
    assert "forward" not in patch_embed.__dict__


def test_language_model_attention_reads_packing_once_per_forward(family, monkeypatch):
    """Deciding whether positions restart syncs with the device: once per forward, not once per layer."""
    import vitos_ext.hf_attention as hf_attention

    model = patching.patch_model(build_model(family), attention="varlen")
    batch = select(make_batch(family, model, PROMPTS), 0, family, model)  # one row: no padding mask
    calls = []
    real = hf_attention._packed_cu_seqlens
    monkeypatch.setattr(hf_attention, "_packed_cu_seqlens", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        model(**batch, vitos_boxes=boxes_of(0))
    assert adapter_for(model).language_model(model).config.num_hidden_layers > 1
    assert len(calls) <= 1


def test_language_model_through_varlen_matches_model_attention(family):
    model_attention = patching.patch_model(build_model(family), attention="model")
    varlen = patching.patch_model(build_model(family), attention="varlen")
    assert adapter_for(varlen).language_model(varlen).config._attn_implementation == "vitos_varlen"
    batch = make_batch(family, varlen, PROMPTS)
    for inputs, boxes in [(batch, BOXES), (select(batch, 0, family, varlen), boxes_of(0))]:
        expected_tokens, expected_logits = greedy(model_attention, inputs, vitos_boxes=boxes)
        tokens, logits = greedy(varlen, inputs, vitos_boxes=boxes)
        assert torch.equal(tokens, expected_tokens)
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-4)


def test_auto_attention_keeps_model_attention_on_cpu(family):
    model = patching.patch_model(build_model(family), attention="auto")
    assert adapter_for(model).language_model(model).config._attn_implementation == "eager"
    model = patching.patch_model(model, attention="varlen")  # switching mode re-routes
    assert adapter_for(model).language_model(model).config._attn_implementation == "vitos_varlen"
    patching.patch_model(model, attention="model")
    assert adapter_for(model).language_model(model).config._attn_implementation == "eager"


# ----------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------


def test_bad_inputs_get_clear_errors(family):
    model = patching.patch_model(build_model(family))
    batch = make_batch(family, model, PROMPTS)
    num_visual = int((batch["input_ids"] == IMAGE).sum())
    cases = [
        (dict(vitos_boxes=BOXES[:2]), ValueError, "vitos_boxes has 2 entries but the batch has 3 image"),
        (dict(vitos_boxes=[BOXES[0], BOXES[1], torch.zeros(2, 3)]), ValueError, r"vitos_boxes\[2\] must have shape"),
        (dict(vitos_boxes=[BOXES[0], BOXES[1], [[0.1, 0.1, 0.2, 0.2]]]), TypeError, r"vitos_boxes\[2\] must be a"),
        (dict(vitos_boxes=torch.cat(BOXES)), TypeError, "vitos_boxes must be a list"),
        (dict(vitos_boxes=[b.to("meta") for b in BOXES]), ValueError, r"vitos_boxes\[0\] is on meta"),
        (dict(vitos_keep=torch.ones(num_visual + 1, dtype=torch.bool)), ValueError,
         rf"vitos_keep must have shape \[{num_visual}\]"),
        (dict(vitos_keep=torch.ones(num_visual)), TypeError, "vitos_keep must be a 1-D bool"),
        (dict(vitos_keep=torch.ones(num_visual, dtype=torch.bool, device="meta")), ValueError, "vitos_keep is on"),
        (dict(vitos_boxes=BOXES, vitos_keep=torch.ones(num_visual, dtype=torch.bool)), ValueError, "not both"),
        (dict(vitos_fuse=True), ValueError, "vitos_fuse needs vitos_boxes or vitos_keep"),
        (dict(vitos_dilate=1), ValueError, "vitos_dilate needs vitos_boxes, vitos_keep or vitos_video_boxes"),
        (dict(vitos_boxes=BOXES, vitos_dilate=-1), ValueError, "vitos_dilate must be an int >= 0"),
        (dict(vitos_boxes=BOXES, vitos_fuse=torch.zeros(3, dtype=torch.long)), ValueError,
         rf"vitos_fuse must have shape \[{num_visual}\]"),
        (dict(vitos_image_features=torch.zeros(3)), TypeError, "vitos_image_features must come from"),
    ]
    for kwargs, error, words in cases:
        for call in (lambda: model(**batch, **kwargs), lambda: greedy(model, batch, steps=1, **kwargs)):
            with pytest.raises(error, match=words):
                call()
    text_only = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    text_only["input_ids"] = text_only["input_ids"].masked_fill(text_only["input_ids"] == IMAGE, 7)
    if "mm_token_type_ids" in text_only:
        text_only["mm_token_type_ids"] = torch.zeros_like(text_only["mm_token_type_ids"])
    with pytest.raises(ValueError, match="vitos_boxes was given but the batch has no images"):
        greedy(model, text_only, steps=1, vitos_boxes=BOXES)
    with pytest.raises(ValueError, match=rf"vitos_keep must have shape \[{num_visual}\]"):
        greedy(model, batch, steps=1, vitos_keep=torch.ones(num_visual - 1, dtype=torch.bool), num_beams=2)
    with pytest.raises(ValueError, match="vitos pruning needs use_cache=True"):
        greedy(model, batch, steps=2, vitos_boxes=BOXES, use_cache=False)
    with pytest.raises(ValueError, match="vitos_fuse as an explicit fusion map needs num_beams"):
        greedy(model, batch, steps=1, vitos_boxes=BOXES, vitos_fuse=torch.zeros(num_visual, dtype=torch.long),
               num_beams=2)
    first = select(batch, 0, family, model)
    image_inputs = {} if family.is_llava else {"image_grid_thw": first["image_grid_thw"]}
    with torch.no_grad():
        other_images = patching.encode_images(model, first["pixel_values"], **image_inputs)
        own_images = patching.encode_images(model, first["pixel_values"], **image_inputs)
    with pytest.raises(ValueError, match="vitos_image_features needs num_beams = num_return_sequences = 1"):
        greedy(model, first, steps=1, vitos_image_features=own_images, vitos_boxes=BOXES[:1], num_beams=2)
    with pytest.raises(ValueError, match="vitos_image_features were computed for other images"):
        greedy(model, batch, steps=1, vitos_image_features=other_images)
    with torch.no_grad():
        prefill = model(**first, use_cache=True)
    with pytest.raises(ValueError, match="cannot continue from a non-empty cache"):
        model(input_ids=first["input_ids"][:, -1:], vitos_boxes=BOXES[:1], pixel_values=first["pixel_values"],
              **image_inputs, **{cache_keyword(family.model_class.forward): cache_of(prefill)})
    # the model still works after every failed call
    assert torch.equal(greedy(model, batch)[0], greedy(build_model(family), batch)[0])


def test_unsupported_model_lists_the_supported_ones():
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2)
    with pytest.raises(TypeError) as info:
        patching.patch_model(transformers.LlamaForCausalLM(config))
    for name in supported_model_names():
        assert name in str(info.value)
    with pytest.raises(ValueError, match="attention must be one of"):
        patching.patch_model(build_model(FAMILIES[0]), attention="flash")


def test_packed_sequences_are_refused(family):
    """Several sequences packed in one row would be compacted as one: a clear error instead of cross-attention."""
    model = patching.patch_model(build_model(family))
    batch = make_batch(family, model, PROMPTS)
    mask = batch["attention_mask"].bool()
    packed = {key: value[mask][None] for key, value in batch.items() if key in ("input_ids", "mm_token_type_ids")}
    packed.update({key: batch[key] for key in ("pixel_values", "image_grid_thw", "image_sizes") if key in batch})
    restarting = torch.cat([torch.arange(int(n)) for n in mask.sum(1)])[None]
    positions = restarting if family.is_llava else restarting.expand(3, 1, -1)
    with pytest.raises(ValueError, match="position_ids restart inside a row"):
        model(**packed, position_ids=positions, vitos_boxes=BOXES)
    with pytest.raises(ValueError, match="position_ids restart inside a row"):
        model.generate(**packed, position_ids=positions, vitos_boxes=BOXES, max_new_tokens=1)
    bounds = torch.tensor([0, int(mask[0].sum()), int(mask.sum())], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q: .*prune_packed_batch"):
        model(**packed, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, vitos_boxes=BOXES)
    # one sequence per row with explicit, non-restarting positions is fine
    first = select(batch, 0, family, model)
    steady = torch.arange(first["input_ids"].shape[1])[None]
    with torch.no_grad():
        model(**first, position_ids=steady if family.is_llava else steady.expand(3, 1, -1), vitos_boxes=BOXES[:1])


def test_qwen_same_images_reads_back_only_for_a_different_grid_tensor(monkeypatch):
    from vitos_ext.models.qwen2_vl import ADAPTER

    grid = torch.tensor([[1, 8, 8], [1, 4, 8]])
    assert ADAPTER.same_images({"image_grid_thw": grid.clone()}, {"image_grid_thw": grid})
    assert not ADAPTER.same_images({"image_grid_thw": grid[:1]}, {"image_grid_thw": grid})
    assert not ADAPTER.same_images({"image_grid_thw": grid.flip(0)}, {"image_grid_thw": grid})
    monkeypatch.setattr(torch, "equal", lambda *a: pytest.fail("the same tensor needs no comparison"))
    assert ADAPTER.same_images({"image_grid_thw": grid}, {"image_grid_thw": grid})


# ----------------------------------------------------------------------------------------------------------
# packed prefill: the pruned batch runs without padding rows, results in the left-padded layout
# ----------------------------------------------------------------------------------------------------------


def _packed_spy(monkeypatch) -> list[int]:
    """Record the token count of every packed prefill (the packed row's length)."""
    calls = []
    real = patching._use_packed_layout

    def spy(state, request, kwargs, *layout):
        real(state, request, kwargs, *layout)
        calls.append(kwargs["inputs_embeds"].shape[1])

    monkeypatch.setattr(patching, "_use_packed_layout", spy)
    return calls


def _both_layouts(monkeypatch):
    """Yield (packed, spy calls): first with the left-padded prefill, then with the packed one."""
    for packed in (False, True):
        monkeypatch.setattr(patching, "PACKED_PREFILL", packed)
        yield packed, _packed_spy(monkeypatch)


def test_packed_prefill_equals_the_left_padded_prefill(family, monkeypatch):
    model = patching.patch_model(build_model(family), attention="varlen")
    batch = make_batch(family, model, PROMPTS)
    results = {}
    for packed, calls in _both_layouts(monkeypatch):
        tokens, logits = greedy(model, batch, vitos_boxes=BOXES)
        with torch.no_grad():
            out = model(**batch, vitos_boxes=BOXES, use_cache=True)
            pruned = model.vitos_last_prefill
            torch.manual_seed(3)
            sampled = model.generate(**batch, max_new_tokens=STEPS, do_sample=True, num_return_sequences=2,
                                     vitos_boxes=BOXES)
        kept = int(pruned.kept_counts.sum())
        # generate, forward and the sampled generate (every prompt twice) all ran packed
        assert calls == ([kept, kept, 2 * kept] if packed else [])
        results[packed] = (tokens, logits, out.logits, cache_of(out), pruned.attention_mask.bool(), sampled)
    (tokens, logits, forward_logits, cache, mask, sampled), packed = results[False], results[True]
    assert torch.equal(packed[0], tokens) and torch.equal(packed[5], sampled)
    torch.testing.assert_close(packed[1], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[2][mask], forward_logits[mask], rtol=1e-5, atol=1e-5)
    for got_layer, want_layer in zip(packed[3].layers, cache.layers):
        for name in ("keys", "values"):
            got, want = getattr(got_layer, name), getattr(want_layer, name)
            assert got.shape == want.shape  # [B, H, L', D]: the left-padded cache generate() continues from
            torch.testing.assert_close(got.transpose(1, 2)[mask], want.transpose(1, 2)[mask], rtol=1e-5, atol=1e-5)
            assert not got.transpose(1, 2)[~mask].any()  # padding positions are zeros


def test_packed_prefill_reads_no_deprecated_output_field(monkeypatch):
    """transformers >= 5.2x renamed the output's past_key_values to cache and logs a deprecation on the old name: the
    packed prefill's hook must read whichever field the installed release has, silently."""
    from transformers.utils import generic
    messages = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda message, *args, **kwargs: messages.append(message))
    family = FAMILIES[1]
    calls = _packed_spy(monkeypatch)
    model = patching.patch_model(build_model(family), attention="varlen")
    batch = make_batch(family, model, PROMPTS)
    greedy(model, batch, steps=2, vitos_boxes=BOXES)
    with torch.no_grad():
        model(**batch, vitos_boxes=BOXES, use_cache=False)  # no cache in the output: the old name was tried too
    assert len(calls) == 2 and not messages


def test_packed_prefill_only_where_it_applies(monkeypatch):
    family = FAMILIES[1]
    calls = _packed_spy(monkeypatch)
    batch = make_batch(family, build_model(family), PROMPTS)
    eager_lm = patching.patch_model(build_model(family), attention="model")  # no varlen attention: left-padded
    greedy(eager_lm, batch, steps=2, vitos_boxes=BOXES)
    varlen = patching.patch_model(build_model(family), attention="varlen")
    single = select(batch, 0, family, varlen)
    greedy(varlen, single, steps=2, vitos_boxes=BOXES[:1])  # one sequence: nothing is padded anyway
    with torch.no_grad():
        hidden = varlen(**batch, vitos_boxes=BOXES, output_hidden_states=True).hidden_states
    assert not calls
    assert hidden[0].shape[:2] == varlen.vitos_last_prefill.attention_mask.shape
    greedy(varlen, batch, steps=2, vitos_boxes=BOXES, num_beams=2)  # beams reorder the converted cache
    assert len(calls) == 1
    patching.unpatch_model(varlen)
    assert not varlen.model.language_model._forward_hooks


def test_packed_prefill_backpropagates_like_the_left_padded_one(family, monkeypatch):
    model = patching.patch_model(build_model(family), attention="varlen")
    batch = make_batch(family, model, PROMPTS)
    labels = batch["input_ids"].masked_fill((batch["input_ids"] == IMAGE) | (batch["attention_mask"] == 0), -100)
    model.train()
    results = {}
    for packed, calls in _both_layouts(monkeypatch):
        model.zero_grad(set_to_none=True)
        out = model(**batch, labels=labels, vitos_boxes=BOXES, use_cache=False)
        out.loss.backward()
        assert len(calls) == int(packed)
        results[packed] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None})
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    assert results[True][1].keys() == results[False][1].keys()
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_unpruned_request_prefill_of_a_padded_batch_runs_packed(family, monkeypatch):
    """The pipeline's first pass (reused image features, no pruning) on a ragged batch: packed, same results."""
    model = patching.patch_model(build_model(family), attention="varlen")
    ragged = [PROMPTS[0], [("text", [13]), ("image", (4, 8)), ("text", [14, 15])]]
    batch = make_batch(family, model, ragged)
    image_inputs = {} if family.is_llava else {"image_grid_thw": batch["image_grid_thw"]}
    with torch.no_grad():
        features = patching.encode_images(model, batch["pixel_values"], **image_inputs)
    valid = batch["attention_mask"].bool()
    assert not valid.all()  # left padding in the second row
    results = {}
    for packed, calls in _both_layouts(monkeypatch):
        tokens, logits = greedy(model, batch, vitos_image_features=features)
        with torch.no_grad():
            forward_logits = model(**batch, vitos_image_features=features).logits
        assert calls == ([int(valid.sum())] * 2 if packed else [])
        assert model.vitos_last_prefill is None  # nothing was pruned
        results[packed] = (tokens, logits, forward_logits)
    assert torch.equal(results[True][0], results[False][0])
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[True][2][valid], results[False][2][valid], rtol=1e-5, atol=1e-5)
    calls = _packed_spy(monkeypatch)
    greedy(model, batch, steps=2)  # no vitos_* argument: the model behaves exactly as unpatched, nothing packed
    assert not calls


# ----------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU; benchmarks/gpu_check.sh runs them): the default patch on a GPU (varlen attention,
# Triton fused layers) under what serving and compiled decoding use
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_default_patch_on_cuda_under_inference_mode_static_cache_and_compile():
    family = FAMILIES[1]
    model = patching.patch_model(build_model(family).to("cuda"))  # auto: varlen + fused layers on CUDA
    batch = {k: v.to("cuda") for k, v in make_batch(family, model, PROMPTS).items()}
    boxes = [b.to("cuda") for b in BOXES]
    tokens, logits = greedy(model, batch, vitos_boxes=boxes)
    with torch.inference_mode():
        served = greedy(model, batch, vitos_boxes=boxes)
    assert torch.equal(served[0], tokens)
    torch.testing.assert_close(served[1], logits, rtol=1e-4, atol=1e-4)
    static = greedy(model, batch, vitos_boxes=boxes, cache_implementation="static")  # transformers compiles decoding
    assert torch.equal(static[0], tokens)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        want = model(**batch, vitos_boxes=boxes).logits
        torch.testing.assert_close(compiled(**batch, vitos_boxes=boxes).logits, want, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
