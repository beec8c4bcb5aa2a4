"""The packed token-sparse training forward (vitos_ext/trainer/logprobs.py, layout "packed").

It must give the padded forward's log-probabilities and gradients (fp32, tight tolerances) for both branches --
grounding (every visual token kept) and token-sparse (pruned, optionally fused) -- on Qwen2-VL and Qwen2.5-VL, while
doing no padding work: the language model sees one [1, T'] row of kept tokens through "vitos_varlen" attention with
one sequence per rollout, and the LM head sees only the rows that predict completion tokens. The trainer uses it by
default on GPU ("auto" keeps the padded layout on CPU, where the varlen backend is the slower reference), trains the
same as with the padded layout, and still resumes bit-exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from model_fixtures import EOS, MERGE, PAD, build_model, families, make_batch

from vitos_ext.trainer import completion_logprobs
from vitos_ext.trainer.batching import PromptBatch, SequenceBatch, build_sequences
from vitos_ext.trainer.logprobs import TrainingForward, packed_forward_support, resolve_forward_layout
from vitos_ext.trainer.rollout import sparse_selection

FAMILIES = {f.name: f for f in families()}
QWEN = [FAMILIES["qwen2_vl"], FAMILIES["qwen2_5_vl"]]

# one image per row, different image sizes and text lengths -> ragged rows, left padding, different kept counts
PROMPTS = [
    [("text", [7, 8]), ("image", (4, 4)), ("text", [9, 10, 11])],
    [("image", (4, 8)), ("text", [12])],
    [("text", [13, 14, 15, 16]), ("image", (8, 4)), ("text", [17])],
]
COMPLETIONS = [[20, 21, 22, EOS], [23, EOS], [24, 25, 26, 27, 28, EOS]]
# row 0: a corner, row 1: no box (keeps no visual token), row 2: two boxes
BOXES = [[[0.0, 0.0, 0.5, 0.5]], [], [[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.3, 0.2]]]


def sequences(family, model) -> SequenceBatch:
    batch = make_batch(family, model, PROMPTS)
    grid = batch["image_grid_thw"]
    prompt = PromptBatch(batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"],
                         batch["pixel_values"], grid, patch_counts=[int(t * h * w) for t, h, w in grid.tolist()])
    return build_sequences(prompt, [torch.tensor(c) for c in COMPLETIONS], PAD)


def selection_for(branch: str, batch: SequenceBatch):
    if branch == "grounding":
        return None
    selection, kept = sparse_selection(BOXES, batch.prompt.image_grid_thw, MERGE, fuse=(branch == "sparse_fused"),
                                       no_box_policy="no_visual_tokens")
    assert 0 < float(kept.mean()) < 1 and kept[1] == 0
    return selection


@pytest.fixture(scope="module", params=QWEN, ids=lambda f: f.name)
def model(request):
    from vitos_ext.patching import patch_model

    model = patch_model(build_model(request.param, seed=3))
    return request.param, model.train()  # dropout-free configs: train mode changes nothing but must be accepted


def _gradients(model, logprobs: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad((logprobs * weights).sum(), [dict(model.named_parameters())[n] for n in names],
                                allow_unused=True)
    return {n: g for n, g in zip(names, grads)}


@pytest.mark.parametrize("branch", ["grounding", "sparse", "sparse_fused"])
def test_packed_matches_padded_logprobs_and_gradients(model, branch):
    family, policy = model
    batch = sequences(family, policy)
    selection = selection_for(branch, batch)
    weights = torch.linspace(-1.0, 2.0, batch.completion_ids.numel()).view_as(batch.completion_ids.float())
    padded = completion_logprobs(policy, batch, selection, temperature=0.7, layout="padded")
    packed = completion_logprobs(policy, batch, selection, temperature=0.7, layout="packed")
    mask = batch.completion_mask.bool()
    assert (packed[~mask] == 0).all() and (packed[mask] < 0).all()
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=2e-6)
    g_padded, g_packed = _gradients(policy, padded, weights), _gradients(policy, packed, weights)
    assert g_padded.keys() == g_packed.keys()
    scale = max(float(g.abs().max()) for g in g_padded.values() if g is not None)
    for name, expected in g_padded.items():
        got = g_packed[name]
        assert (got is None) == (expected is None), name
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale, msg=name)
    vision = [g for n, g in g_packed.items() if ".visual." in n or n.startswith("visual.")]
    assert vision and any(float(g.abs().max()) > 0 for g in vision)  # the vision tower is trained through both


@pytest.mark.parametrize("family", QWEN, ids=lambda f: f.name)
def test_peft_lora_policy_trains_packed_like_padded(family):
    """A PEFT LoRA policy (adapters on the language model and the vision tower) runs the packed layout through the
    wrapped model, whose modules hold the adapters: same log-probs and adapter gradients as the padded layout."""
    from peft import LoraConfig, get_peft_model

    from vitos_ext.patching import patch_model

    base = build_model(family, seed=3)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj|qkv|fc1)",
                                             init_lora_weights=False))
    patch_model(policy)
    assert packed_forward_support(policy) is None
    assert resolve_forward_layout(policy, "packed") == "packed"
    batch = sequences(family, base)
    selection = selection_for("sparse", batch)
    weights = torch.linspace(-1.0, 2.0, batch.completion_ids.numel()).view_as(batch.completion_ids.float())
    padded = completion_logprobs(policy, batch, selection, temperature=0.7, layout="padded")
    packed = completion_logprobs(policy, batch, selection, temperature=0.7, layout="packed")
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=2e-6)
    g_padded, g_packed = _gradients(policy, padded, weights), _gradients(policy, packed, weights)
    assert g_padded.keys() == g_packed.keys() and all("lora_" in name for name in g_padded)
    assert any(".visual." in name for name in g_padded)
    scale = max(float(g.abs().max()) for g in g_padded.values())
    for name, expected in g_padded.items():
        torch.testing.assert_close(g_packed[name], expected, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_packed_forward_does_no_padding_work(model, monkeypatch):
    import vitos_ext.hf_attention as hf_attention

    family, policy = model
    batch = sequences(family, policy)
    selection = selection_for("sparse", batch)
    calls, head_rows = [], []
    original = hf_attention.varlen_attention

    def spy(q, k, v, cu_seqlens_q, cu_seqlens_k, *args, **kwargs):
        calls.append((q.shape[0], cu_seqlens_q.tolist(), kwargs.get("causal")))
        return original(q, k, v, cu_seqlens_q, cu_seqlens_k, *args, **kwargs)

    monkeypatch.setattr(hf_attention, "varlen_attention", spy)
    hook = policy.get_output_embeddings().register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape))
    try:
        completion_logprobs(policy, batch, selection, layout="packed")
        language_model = policy.model.language_model
        assert language_model.config._attn_implementation == "eager"  # switched for the call only
        assert len(calls) == language_model.config.num_hidden_layers
        valid = int(batch.model_inputs()["attention_mask"].sum())
        dropped = int((~selection.keep).sum())
        for rows, cu_seqlens, causal in calls:
            assert rows == valid - dropped  # kept tokens only: no padding row, no dropped visual token
            assert len(cu_seqlens) == len(PROMPTS) + 1 and cu_seqlens[-1] == rows and causal
        assert head_rows == [torch.Size([int(batch.completion_mask.sum()), language_model.config.hidden_size])]

        calls.clear(), head_rows.clear()
        completion_logprobs(policy, batch, selection, layout="padded")
        assert calls == []  # the padded layout on CPU keeps the model's own (eager) attention
        assert head_rows[0][:2] == (len(PROMPTS), batch.completion_ids.shape[1] + 1)  # logits for [B, C + 1]
    finally:
        hook.remove()


def test_layout_resolution_and_fallbacks(model):
    from vitos_ext.patching import patch_model, unpatch_model

    family, policy = model
    assert packed_forward_support(policy) is None
    assert resolve_forward_layout(policy, "packed") == "packed"
    assert resolve_forward_layout(policy, "auto") == "padded"  # CPU + eager attention: no fast varlen kernel
    assert resolve_forward_layout(policy, "padded") == "padded"
    with pytest.raises(ValueError, match="layout must be one of"):
        resolve_forward_layout(policy, "flat")
    with pytest.raises(ValueError, match="layout must be one of"):
        TrainingForward(policy, "flat")
    # transformers 5.24 renamed gradient_checkpointing_* to activation_checkpointing_*
    enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
    disable = getattr(policy, "activation_checkpointing_disable", None) or policy.gradient_checkpointing_disable
    enable()
    try:
        assert "gradient checkpointing" in packed_forward_support(policy)
        assert resolve_forward_layout(policy, "auto") == "padded"
        assert resolve_forward_layout(policy, "padded") == "padded"
        with pytest.raises(ValueError, match="layout='packed' cannot run: gradient checkpointing"):
            resolve_forward_layout(policy, "packed")
        patch_model(policy, attention="varlen")  # the language model now always runs varlen attention
        assert packed_forward_support(policy) is None
        assert resolve_forward_layout(policy, "auto") == "packed"
        batch = sequences(family, policy)
        padded = completion_logprobs(policy, batch, selection_for("sparse", batch), layout="padded")
        packed = completion_logprobs(policy, batch, selection_for("sparse", batch), layout="packed")
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=2e-6)
    finally:
        disable()
        patch_model(policy, attention="auto")
    assert policy.model.language_model.config._attn_implementation == "eager"
    llava = build_model(FAMILIES["llava"], seed=0)
    assert "llava" in packed_forward_support(llava)
    assert resolve_forward_layout(llava, "auto") == "padded"
    if "qwen3_vl" in FAMILIES:
        assert "qwen3_vl" in packed_forward_support(build_model(FAMILIES["qwen3_vl"], seed=0))
    unpatch_model(llava)


def test_training_forward_module_is_the_policy_forward(model):
    family, policy = model
    batch = sequences(family, policy)
    module = TrainingForward(policy, "packed")
    assert {id(p) for p in module.parameters()} == {id(p) for p in policy.parameters()}
    with torch.no_grad():
        torch.testing.assert_close(module(batch, None, 0.7),
                                   completion_logprobs(policy, batch, None, 0.7, layout="packed"), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# the trainer

IMAGE_SIZE = 56


def _text_dependent_terms(texts, examples, sizes):
    """Rewards that depend on the sampled text, so GRPO steps of an untrained model move the weights."""
    values = torch.tensor([(sum(map(ord, text)) % 7) / 6 for text in texts], dtype=torch.float32)
    return (values > 0.5).float(), values, (values < 0.3).float()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from vitos_ext.data import write_phantom_dataset
    from vitos_ext.trainer import prepare_training_data

    root = tmp_path_factory.mktemp("phantom")
    return prepare_training_data(write_phantom_dataset(root, 8, seed=5, image_size=IMAGE_SIZE, split="train"))


def _train(output_dir: Path, data, layout: str | None, stop_at_step=None, resume=False):
    from vitos_ext.tiny import build_tiny_model, build_tiny_processor
    from vitos_ext.trainer import DualStreamGRPOTrainer, TrainerConfig

    processor = build_tiny_processor(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE)
    model = build_tiny_model(seed=2, attn_implementation="eager")
    config = TrainerConfig(output_dir=str(output_dir), seed=1, schedule="alternate", sft_steps=1, sft_batch_size=4,
                           sft_lr=1e-3, sft_sparse_fraction=0.5, alternate_steps=2, prompts_per_step=2, group_size=2,
                           sparse_group_size=2, updates_per_batch=2, mini_batch_size=4, lr=1e-3, beta=0.05,
                           max_new_tokens=10, grounding_rewards={"cross": 0.5}, progress=False, num_threads=None,
                           save_every=0)
    trainer = DualStreamGRPOTrainer(model, processor, data, config, forward_layout=layout)
    trainer.train(resume=resume, stop_at_step=stop_at_step)
    return trainer


def test_trainer_trains_packed_like_padded_and_resumes_exactly(phantom, tmp_path, monkeypatch):
    import vitos_ext.trainer.logprobs as logprobs_module
    import vitos_ext.trainer.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "basic_terms", _text_dependent_terms)
    ranges = []
    for module in (trainer_module, logprobs_module):
        original = module.nvtx_range
        monkeypatch.setattr(module, "nvtx_range",
                            lambda name, original=original: (ranges.append(name), original(name))[1])
    layouts = []
    original_resolve = logprobs_module.resolve_forward_layout
    monkeypatch.setattr(logprobs_module, "resolve_forward_layout",
                        lambda model, layout="auto": layouts.append(original_resolve(model, layout)) or layouts[-1])

    full = _train(tmp_path / "full", phantom, layout="packed")
    assert set(layouts) == {"packed"}  # SFT, old / reference / policy forwards of both branches
    for name in ("vitos.trainer.rollout", "vitos.trainer.score", "vitos.trainer.update", "vitos.trainer.logprobs",
                 "vitos.trainer.update.grounding", "vitos.trainer.update.sparse", "vitos.trainer.backward",
                 "vitos.trainer.rollout.grounding", "vitos.trainer.rollout.sparse", "vitos.trainer.packed.head"):
        assert name in ranges, name

    first = _train(tmp_path / "split", phantom, layout="packed", stop_at_step=2)
    assert first.state["global_step"] == 2
    second = _train(tmp_path / "split", phantom, layout="packed", resume=True)
    assert second.state["global_step"] == full.state["global_step"] == 3
    expected = dict(full.model.named_parameters())
    assert all(torch.equal(expected[n], p) for n, p in second.model.named_parameters()), "packed resume not exact"

    layouts.clear()
    padded = _train(tmp_path / "padded", phantom, layout=None)  # the default, "auto": padded on CPU
    assert padded.forward_layout == "auto" and set(layouts) == {"padded"}
    from vitos_ext.tiny import build_tiny_model

    initial = dict(build_tiny_model(seed=2).named_parameters())
    with torch.no_grad():
        error = sum(float((p - expected[n]).norm()) ** 2 for n, p in padded.model.named_parameters())
        moved = sum(float((expected[n] - initial[n]).norm()) ** 2 for n in expected)
    assert moved > 0 and math.sqrt(error) <= 1e-4 * math.sqrt(moved), (math.sqrt(error), math.sqrt(moved))
