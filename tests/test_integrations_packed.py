"""vitos_ext.integrations.prune_packed_batch on verl-style remove-padding batches.

The pruned packed batch is checked against a per-sequence boolean-indexing reference, and the language model run on
it (varlen attention, or SDPA/eager with packed text positions) against the padded batch with the dropped tokens
masked out of attention: pruning a token and hiding it as a key must give the same outputs at kept tokens.
"""

from __future__ import annotations

import pytest
import torch
from model_fixtures import IMAGE, MERGE, PAD, build_model, families, image_grids, make_batch

from vitos_ext import reference
from vitos_ext.integrations import PackedPrunedBatch, packed_inputs_embeds, prune_packed_batch
from vitos_ext.sparsity import nearest_kept_fusion_map

FAMILIES = {family.name: family for family in families()}
QWEN = FAMILIES["qwen2_5_vl"]

# three rollouts: text + image + text, a wide image first, text only; plus right-padded "responses"
PROMPTS = [
    [("text", [7, 8]), ("image", (4, 4)), ("text", [9, 10, 11])],
    [("image", (4, 8)), ("text", [12])],
    [("text", [13, 14, 15])],
]
RESPONSES = [[20, 21, 22, 2], [23, 2], [24, 25, 26, 27, 2]]
BOXES = [torch.tensor([[0.0, 0.0, 0.5, 0.5]]), torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.2, 0.2]])]


def rollout_batch(family, model) -> dict:
    """Left-padded prompts followed by right-padded responses, as verl lays out a rollout batch."""
    batch = make_batch(family, model, PROMPTS if not family.is_llava else [PROMPTS[0], PROMPTS[1], PROMPTS[2]])
    width = max(len(r) for r in RESPONSES)
    responses = torch.full((len(RESPONSES), width), PAD, dtype=torch.long)
    response_mask = torch.zeros_like(responses)
    for row, tokens in enumerate(RESPONSES):
        responses[row, :len(tokens)] = torch.tensor(tokens)
        response_mask[row, :len(tokens)] = 1
    batch["input_ids"] = torch.cat([batch["input_ids"], responses], 1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], response_mask], 1)
    if not family.is_llava:
        batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(responses)], 1)
    batch["position_ids"] = positions(family, model, batch)
    return batch


def positions(family, model, batch) -> torch.Tensor:
    """[4, B, L] (text row + M-RoPE) for the Qwen families, [B, L] for LLaVA: what verl computes."""
    mask = batch["attention_mask"]
    text = (mask.cumsum(-1) - 1).clamp_min(0) * mask
    if family.is_llava:
        return text
    rope, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                         attention_mask=mask)
    return torch.cat([text[None], rope])


def unpad(batch) -> dict:
    """verl's remove-padding layout: input_ids [1, T], position_ids [P, 1, T], cu_seqlens int32 [B + 1]."""
    valid = batch["attention_mask"].bool()
    flat = valid.flatten().nonzero().squeeze(1)
    pos = batch["position_ids"]
    pos = pos[None] if pos.dim() == 2 else pos
    return dict(input_ids=batch["input_ids"].flatten()[flat][None],
                position_ids=pos.reshape(pos.shape[0], -1)[:, flat][:, None],
                cu_seqlens=torch.nn.functional.pad(valid.sum(1).cumsum(0), (1, 0)).to(torch.int32), flat=flat)


@pytest.fixture(scope="module")
def qwen():
    model = build_model(QWEN)
    return model, rollout_batch(QWEN, model)


def prune(model, batch, **kwargs) -> PackedPrunedBatch:
    kwargs.setdefault("vitos_boxes", BOXES)
    return prune_packed_batch(batch["input_ids"], batch["position_ids"], batch.get("image_grid_thw"),
                              attention_mask=batch["attention_mask"], model=model,
                              pixel_values=batch["pixel_values"], **kwargs)


# ----------------------------------------------------------------------------------------------------------
# structure against a per-sequence reference
# ----------------------------------------------------------------------------------------------------------


def per_sequence_reference(batch, embeds, grid, keep_visual):
    """Boolean indexing, one sequence at a time: kept ids, embeddings, positions (text row renumbered)."""
    ids, rows, pos, lengths = [], [], [], []
    visual_seen = 0
    for b in range(batch["input_ids"].shape[0]):
        valid = batch["attention_mask"][b].bool()
        seq_ids = batch["input_ids"][b][valid]
        visual = seq_ids == IMAGE
        keep = ~visual
        count = int(visual.sum())
        keep[visual] = keep_visual[visual_seen:visual_seen + count]
        visual_seen += count
        ids.append(seq_ids[keep])
        rows.append(embeds[b][valid][keep])
        rope = batch["position_ids"][1:, b][:, valid][:, keep]
        pos.append(torch.cat([torch.arange(int(keep.sum()))[None], rope]))
        lengths.append(int(keep.sum()))
    cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    return torch.cat(ids), torch.cat(rows), torch.cat(pos, 1), cu


def test_matches_the_per_sequence_reference(qwen):
    model, batch = qwen
    pruned = prune(model, batch)
    grid, merge = image_grids(QWEN, model, batch)
    boxes = torch.cat(BOXES)
    box_image = torch.tensor([0, 1, 1])
    keep_visual = reference.region_to_patch_mask_reference(boxes, box_image, grid, merge)
    embeds = packed_inputs_embeds(model, batch["input_ids"], batch["pixel_values"], grid)
    ids, rows, pos, cu = per_sequence_reference(batch, embeds, grid, keep_visual)

    assert torch.equal(pruned.input_ids[0], ids)
    assert torch.equal(pruned.inputs_embeds[0], rows)
    assert torch.equal(pruned.position_ids[:, 0], pos)
    assert torch.equal(pruned.cu_seqlens, cu)
    assert pruned.max_seqlen == int((cu[1:] - cu[:-1]).max())
    assert torch.equal(pruned.visual_keep, keep_visual)
    assert pruned.visual_counts.tolist() == [4, 8, 0]
    assert pruned.visual_kept_counts.tolist() == [int(keep_visual[:4].sum()), int(keep_visual[4:].sum()), 0]
    assert pruned.kept_ratio == pytest.approx(float(keep_visual.float().mean()))
    assert 0 < pruned.kept_ratio < 1
    # every text token survives; the source map points at the original tokens
    text_tokens = int((batch["attention_mask"].bool() & (batch["input_ids"] != IMAGE)).sum())
    assert int((pruned.input_ids != IMAGE).sum()) == text_tokens
    assert torch.equal(batch["input_ids"].flatten()[pruned.source_index], pruned.input_ids[0])


def test_padded_and_packed_layouts_agree(qwen):
    model, batch = qwen
    from_padded = prune(model, batch)
    packed = unpad(batch)
    from_packed = prune_packed_batch(packed["input_ids"], packed["position_ids"], batch["image_grid_thw"],
                                     cu_seqlens=packed["cu_seqlens"], model=model,
                                     pixel_values=batch["pixel_values"], vitos_boxes=BOXES)
    for name in ("input_ids", "inputs_embeds", "position_ids", "cu_seqlens", "kept_index", "visual_keep"):
        assert torch.equal(getattr(from_padded, name), getattr(from_packed, name)), name
    assert from_packed.source_shape == (packed["input_ids"].shape[1],)
    # the packed source index is an index into the packed row; mapped through the unpad indices it is the padded one
    assert torch.equal(packed["flat"][from_packed.source_index], from_padded.source_index)


def test_three_row_positions_are_gathered_and_the_text_row_is_added_for_the_model(qwen):
    model, batch = qwen
    four = prune(model, batch)
    three = prune(model, {**batch, "position_ids": batch["position_ids"][1:]})
    assert three.position_ids.shape == (3, 1, three.num_tokens)
    assert torch.equal(three.position_ids, four.position_ids[1:])
    assert torch.equal(three.language_model_kwargs()["position_ids"], four.position_ids)
    # text row: 0, 1, 2, ... inside every compacted sequence
    starts = four.cu_seqlens[:-1].long()
    assert four.position_ids[0, 0, starts[starts < four.num_tokens]].eq(0).all()


def test_keep_mask_equals_boxes_and_no_selection_keeps_everything(qwen):
    model, batch = qwen
    by_boxes = prune(model, batch)
    by_keep = prune(model, batch, vitos_boxes=None, vitos_keep=by_boxes.visual_keep.clone())
    assert torch.equal(by_boxes.input_ids, by_keep.input_ids)
    assert torch.equal(by_boxes.inputs_embeds, by_keep.inputs_embeds)
    everything = prune(model, batch, vitos_boxes=None)
    assert everything.num_tokens == int(batch["attention_mask"].sum())
    assert everything.kept_ratio == 1.0


def test_image_without_valid_box_keeps_all_its_tokens(qwen):
    model, batch = qwen
    pruned = prune(model, batch, vitos_boxes=[torch.zeros(0, 4), [[float("nan"), 0.0, 1.0, 1.0]]])
    assert pruned.visual_kept_counts.tolist() == pruned.visual_counts.tolist() == [4, 8, 0]


def test_fusion_averages_dropped_tokens_into_their_nearest_kept_token(qwen):
    model, batch = qwen
    pruned = prune(model, batch, vitos_fuse=True)
    plain = prune(model, batch)
    assert torch.equal(pruned.input_ids, plain.input_ids)
    grid, merge = image_grids(QWEN, model, batch)
    target = nearest_kept_fusion_map(plain.visual_keep, grid, merge)
    embeds = packed_inputs_embeds(model, batch["input_ids"], batch["pixel_values"], grid)
    visual_rows = embeds[batch["input_ids"] == IMAGE]
    kept_visual = plain.visual_keep.nonzero().squeeze(1)
    fused = pruned.inputs_embeds[0][pruned.input_ids[0] == IMAGE]
    for out_row, k in zip(fused, kept_visual.tolist()):
        members = [k] + (target == k).nonzero().squeeze(1).tolist()
        torch.testing.assert_close(out_row, visual_rows[members].mean(0), rtol=1e-6, atol=1e-6)
    assert len(set((target[target >= 0]).tolist())) > 0  # something was fused


def test_gradients_reach_the_kept_embeddings_only(qwen):
    model, batch = qwen
    grid, _ = image_grids(QWEN, model, batch)
    embeds = packed_inputs_embeds(model, batch["input_ids"], batch["pixel_values"], grid).detach().requires_grad_()
    pruned = prune_packed_batch(batch["input_ids"], batch["position_ids"], grid, attention_mask=batch["attention_mask"],
                                inputs_embeds=embeds, vitos_boxes=BOXES, image_token_id=IMAGE, merge_size=MERGE)
    pruned.inputs_embeds.sum().backward()
    kept = torch.zeros(embeds.shape[:2], dtype=torch.bool).flatten()
    kept[pruned.source_index] = True
    grad = embeds.grad.reshape(-1, embeds.shape[-1])
    assert grad[kept].eq(1).all() and grad[~kept].eq(0).all()


# ----------------------------------------------------------------------------------------------------------
# language model on the pruned packed row vs the masked padded reference
# ----------------------------------------------------------------------------------------------------------


def masked_reference_hidden(model, family, batch, pruned) -> torch.Tensor:
    """Eager attention over the padded, unpruned batch; dropped tokens and padding are hidden as keys."""
    length = batch["input_ids"].shape[1]
    embeds = packed_inputs_embeds(model, batch["input_ids"], batch["pixel_values"],
                                  None if family.is_llava else batch["image_grid_thw"])
    device = batch["input_ids"].device
    kept = pruned.scatter(torch.ones(pruned.num_tokens, dtype=torch.bool, device=device), False)
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None] & kept[:, None, :]
    mask = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    language_model = model.model.language_model
    language_model.config._attn_implementation = "eager"
    hidden = language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=batch["position_ids"],
                            use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[pruned.source_index]


# M-RoPE families: varlen reads cu_seq_lens, SDPA / eager find the sequences from the rebuilt text-position row.
# LLaVA's 1-D gathered positions have gaps, so only cu_seq_lens (varlen / flash) can separate its sequences.
@pytest.mark.parametrize("family_name, attention", [
    *[(name, attention) for name in ("qwen2_5_vl", "qwen2_vl") for attention in ("vitos_varlen", "sdpa", "eager")],
    ("llava", "vitos_varlen"),
])
def test_language_model_on_pruned_packed_row_matches_masked_reference(family_name, attention):
    family = FAMILIES[family_name]
    from vitos_ext.hf_attention import register_hf_attention

    register_hf_attention()
    model = build_model(family)
    batch = rollout_batch(family, model)
    pruned = prune(model, batch, vitos_boxes=[torch.tensor([[0.0, 0.0, 0.5, 0.5]]), torch.tensor([[0.6, 0.0, 1, 1]])])
    assert 0 < pruned.kept_ratio < 1
    with torch.no_grad():
        expected = masked_reference_hidden(model, family, batch, pruned)
        model.model.language_model.config._attn_implementation = attention
        hidden = model.model.language_model(**pruned.language_model_kwargs()).last_hidden_state[0]
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)


def test_response_log_probs_scatter_back_like_verl(qwen):
    """Next-token log-probs of the packed pruned row, scattered to [B, L], equal the masked reference's."""
    model, batch = qwen
    from vitos_ext.hf_attention import register_hf_attention

    register_hf_attention()
    pruned = prune(model, batch)
    with torch.no_grad():
        expected_hidden = masked_reference_hidden(model, QWEN, batch, pruned)
        model.model.language_model.config._attn_implementation = "vitos_varlen"
        hidden = model.model.language_model(**pruned.language_model_kwargs()).last_hidden_state[0]
    labels = pruned.next_token_labels()
    log_probs = model.lm_head(hidden).log_softmax(-1).gather(-1, labels.clamp_min(0)[:, None])[:, 0]
    per_token = pruned.scatter(log_probs.masked_fill(labels < 0, 0.0))
    width = max(len(r) for r in RESPONSES)
    response_ids = batch["input_ids"][:, -width:]
    response_mask = batch["attention_mask"][:, -width:]
    expected = model.lm_head(expected_hidden).log_softmax(-1)
    expected = pruned.scatter(expected, 0.0)[:, -width - 1:-1].gather(-1, response_ids[..., None])[..., 0]
    torch.testing.assert_close(per_token[:, -width - 1:-1] * response_mask, expected * response_mask,
                               rtol=1e-5, atol=1e-5)
    # every response token got a label (text is never dropped); only padding is 0
    assert per_token[:, -width - 1:-1][response_mask.bool()].ne(0).all()


# ----------------------------------------------------------------------------------------------------------
# tensors only (no model), labels and scatter by hand
# ----------------------------------------------------------------------------------------------------------


def test_labels_and_scatter_on_a_hand_made_batch():
    # one image of 2 x 2 tokens (grid 1 x 4 x 4 patches, merge 2); image token id 5; right padding (0)
    input_ids = torch.tensor([[1, 5, 5, 5, 5, 8, 9], [1, 7, 8, 0, 0, 0, 0]])
    attention_mask = (input_ids != 0).long()
    positions = torch.arange(7).expand(3, 2, 7)
    keep = torch.tensor([True, False, False, True])
    pruned = prune_packed_batch(input_ids, positions, torch.tensor([[1, 4, 4]]), attention_mask=attention_mask,
                                vitos_keep=keep, image_token_id=5, merge_size=2)
    assert pruned.input_ids.tolist() == [[1, 5, 5, 8, 9, 1, 7, 8]]
    assert pruned.cu_seqlens.tolist() == [0, 5, 8]
    assert pruned.position_ids[0, 0].tolist() == [0, 1, 4, 5, 6, 0, 1, 2]
    assert pruned.source_index.tolist() == [0, 1, 4, 5, 6, 7, 8, 9]
    # 1 -> 5 is contiguous; 5 (row 1) was followed by a dropped token; sequence ends have no label
    assert pruned.next_token_labels().tolist() == [5, -100, 8, 9, -100, 7, 8, -100]
    scattered = pruned.scatter(torch.arange(1.0, 9.0), fill=-1.0)
    assert scattered.tolist() == [[1, 2, -1, -1, 3, 4, 5], [6, 7, 8, -1, -1, -1, -1]]
    assert pruned.inputs_embeds is None and "input_ids" in pruned.language_model_kwargs()


def test_empty_batch_of_visual_tokens_and_a_sequence_without_tokens():
    input_ids = torch.tensor([[3, 4, 0], [0, 0, 0]])
    pruned = prune_packed_batch(input_ids, torch.zeros(3, 2, 3, dtype=torch.long), None,
                                attention_mask=(input_ids != 0).long(), image_token_id=5, merge_size=2)
    assert pruned.cu_seqlens.tolist() == [0, 2, 2]
    assert pruned.kept_ratio == 1.0
    assert pruned.next_token_labels().tolist() == [4, -100]


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------


def _base():
    input_ids = torch.tensor([[1, 5, 5, 5, 5, 8]])
    return dict(input_ids=input_ids, position_ids=torch.zeros(3, 1, 6, dtype=torch.long),
                image_grid_thw=torch.tensor([[1, 4, 4]]), attention_mask=torch.ones_like(input_ids),
                image_token_id=5, merge_size=2)


@pytest.mark.parametrize("change, error, match", [
    (dict(position_ids=torch.zeros(3, 6, dtype=torch.long)), ValueError, "position_ids"),
    (dict(attention_mask=torch.ones(1, 5)), ValueError, "attention_mask"),
    (dict(cu_seqlens=torch.tensor([0, 6])), ValueError, "not both"),
    (dict(input_ids=torch.tensor([[1.0, 5.0, 5.0, 5.0, 5.0, 8.0]])), TypeError, "input_ids"),
    (dict(image_grid_thw=torch.tensor([[1, 4, 8]])), ValueError, "image_grid_thw"),
    (dict(image_token_id=None), ValueError, "image_token_id"),
    (dict(merge_size=None), ValueError, "merge_size"),
    (dict(vitos_boxes=[torch.zeros(1, 4), torch.zeros(1, 4)]), ValueError, "vitos_boxes"),
    (dict(vitos_boxes=[torch.zeros(1, 3)]), ValueError, r"vitos_boxes\[0\]"),
    (dict(vitos_boxes=torch.zeros(1, 4)), TypeError, "vitos_boxes"),
    (dict(vitos_keep=torch.ones(3, dtype=torch.bool)), ValueError, "vitos_keep"),
    (dict(vitos_keep=torch.ones(4, dtype=torch.bool), vitos_boxes=[torch.zeros(1, 4)]), ValueError, "not both"),
    (dict(vitos_fuse=True), ValueError, "vitos_fuse"),
    (dict(vitos_boxes=[torch.zeros(1, 4)], vitos_dilate=-1), ValueError, "vitos_dilate"),
    (dict(inputs_embeds=torch.zeros(1, 5, 8)), ValueError, "inputs_embeds"),
])
def test_bad_input_names_the_argument(change, error, match):
    arguments = {**_base(), **change}
    input_ids, position_ids, grid = (arguments.pop(k) for k in ("input_ids", "position_ids", "image_grid_thw"))
    if "cu_seqlens" in change:
        arguments["cu_seqlens"] = change["cu_seqlens"]
    with pytest.raises(error, match=match):
        prune_packed_batch(input_ids, position_ids, grid, **arguments)


def test_packed_layout_errors():
    with pytest.raises(ValueError, match="cu_seqlens"):
        prune_packed_batch(torch.tensor([[1, 2, 3]]), torch.zeros(3, 1, 3, dtype=torch.long), None,
                           cu_seqlens=torch.tensor([[0, 3]]), image_token_id=5, merge_size=2)
    with pytest.raises(ValueError, match="position_ids"):
        prune_packed_batch(torch.tensor([[1, 2, 3]]), torch.zeros(3, 1, 4, dtype=torch.long), None,
                           cu_seqlens=torch.tensor([0, 3]), image_token_id=5, merge_size=2)
    with pytest.raises(ValueError, match="rows"):
        pruned = prune_packed_batch(torch.tensor([[1, 2, 3]]), torch.zeros(3, 1, 3, dtype=torch.long), None,
                                    cu_seqlens=torch.tensor([0, 3]), image_token_id=5, merge_size=2)
        pruned.scatter(torch.zeros(2))


def test_stages_are_nvtx_ranges_nested_in_order(qwen, monkeypatch):
    import sys
    import types

    from vitos_ext import profiling

    model, batch = qwen
    calls = []
    fake = types.SimpleNamespace(push_range=lambda name: calls.append(name), pop_range=lambda: calls.append("pop"))
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    monkeypatch.setenv("VITOS_NVTX", "1")
    profiling._backend.cache_clear()
    try:
        prune(model, batch)
    finally:
        profiling._backend.cache_clear()
    pushed = [c for c in calls if c != "pop"]
    assert pushed == ["vitos.integrations.prune_packed_batch", "vitos.integrations.unpad", "vitos.integrations.vision",
                      "vitos.integrations.keep_mask", "vitos.region_to_patch_mask", "vitos.integrations.compact",
                      "vitos.compact_tokens"]
    assert calls.count("pop") == len(pushed) and calls[-1] == "pop"


@pytest.mark.cuda
def test_on_cuda_the_triton_varlen_path_matches_the_masked_reference():
    """GPU: the packed pruned row through vitos_varlen (Triton kernel) in bf16 vs the fp32 masked reference."""
    from vitos_ext.hf_attention import register_hf_attention

    register_hf_attention()
    model = build_model(QWEN)
    batch = {k: v.cuda() for k, v in rollout_batch(QWEN, model).items()}
    model = model.cuda()
    boxes = [b.cuda() for b in BOXES]
    pruned = prune(model, batch, vitos_boxes=boxes)
    with torch.no_grad():
        expected = masked_reference_hidden(model, QWEN, batch, pruned)
        model.model.language_model.config._attn_implementation = "vitos_varlen"
        language_model = model.model.language_model.to(torch.bfloat16)
        kwargs = pruned.language_model_kwargs()
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"].to(torch.bfloat16)
        hidden = language_model(**kwargs).last_hidden_state[0].float()
    assert pruned.cu_seqlens.is_cuda and pruned.source_index.is_cuda
    torch.testing.assert_close(hidden, expected, rtol=5e-2, atol=5e-2)


def test_verl_example_script_agrees_with_its_masked_reference(capsys):
    """python/verl_packed_example.py exits 0 only when the pruned packed log-probs match the masked reference."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "python" / "verl_packed_example.py"
    spec = importlib.util.spec_from_file_location("verl_packed_example", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--batch", "3", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "OK, tolerance" in printed and "packed, pruned to boxes" in printed
