"""TRL integration: reward signatures, the sparse log-prob mapping, and two real GRPOTrainer steps offline.

trl is a test requirement: without it this module fails at collection with a message saying how to install it.
"""

from __future__ import annotations

import pytest
import torch

try:
    import trl  # noqa: F401
    from datasets import Dataset
    from trl import GRPOConfig
except ImportError as error:  # a missing test requirement must fail loudly, never skip
    pytest.fail(f"tests/test_integrations_trl.py needs trl (and datasets): pip install 'trl>=1.0' ({error})",
                pytrace=False)

from vitos_ext.data import make_phantom_record
from vitos_ext.hf_attention import register_hf_attention
from vitos_ext.integrations import prune_packed_batch
from vitos_ext.integrations.trl import (
    TRL_REWARD_FUNCS,
    ViToSGRPOTrainer,
    completion_logprobs_from_compacted,
    trl_accuracy_reward,
    trl_format_reward,
    trl_iou_reward,
)
from vitos_ext.rewards import completion_text
from vitos_ext.tiny import build_tiny_model, build_tiny_processor

torch.set_num_threads(1)  # tiny tensors: more threads only contend on the shared test machine

QUARTER = [[0.0, 0.0, 0.5, 0.5]]  # keeps exactly 3 x 3 of the 6 x 6 tokens of a 168 px scan: ratio 0.25


def rows(count: int, boxes=None) -> list[dict]:
    out = []
    for index in range(count):
        record, image = make_phantom_record(index, seed=5, image_size=168, max_lesions=1)
        out.append({"prompt": [{"role": "user", "content": record["question"].replace("<image>", "").strip()}],
                    "image": image, "answer": record["answer"], "options": record["options"],
                    "bbox": boxes if boxes is not None else record["bbox"]})
    return out


def config(tmp_path, **overrides) -> GRPOConfig:
    settings = dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=2,
                    max_completion_length=12, max_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none",
                    use_cpu=True, bf16=False, save_strategy="no", seed=3, dataloader_num_workers=0,
                    disable_tqdm=True, beta=0.0)
    settings.update(overrides)
    return GRPOConfig(**settings)


def text_length_reward(prompts, completions, **kwargs) -> list[float]:
    """Sampled completions differ in length, so this reward always gives GRPO non-zero advantages."""
    return [len(completion_text(c)) / 50.0 for c in completions]


# ----------------------------------------------------------------------------------------------------------------
# rewards


def test_rewards_take_trl_conversational_completions_and_arrow_padded_options():
    contract = "<think>t</think><box>[[0.1,0.1,0.3,0.3]]</box><answer>B</answer>"
    completions = [[{"role": "assistant", "content": contract}],
                   [{"role": "assistant", "content": "<answer>hypodense cyst</answer>"}],
                   [{"role": "assistant", "content": "no contract at all"}]]
    options = [{"A": "hyperdense nodule", "B": "hypodense cyst", "E": None}] * 3  # Arrow adds missing keys as None
    kwargs = dict(answer=["B", "B", "A"], options=options, bbox=[[[0.1, 0.1, 0.3, 0.3]], [[0, 0, 1, 1]], []])
    assert trl_format_reward(None, completions, **kwargs) == [1.0, 0.0, 0.0]
    assert trl_accuracy_reward(None, completions, **kwargs) == [1.0, 1.0, 0.0]
    assert trl_iou_reward(None, completions, **kwargs) == [1.0, 0.0, None]
    assert TRL_REWARD_FUNCS == [trl_format_reward, trl_iou_reward, trl_accuracy_reward]


# ----------------------------------------------------------------------------------------------------------------
# mapping compacted logits back to completion columns


def test_completion_logprobs_from_compacted_on_a_hand_made_layout():
    # input [B=1, L=6]: prompt columns 0..3 (column 1, a visual token, was dropped), completion columns 4, 5 (C = 2);
    # the compacted row is left-padded: [pad, 0, 2, 3, 4, 5]; logits exist for the last K = C + 1 = 3 positions
    source_index = torch.tensor([[-1, 0, 2, 3, 4, 5]])
    logits = torch.randn(1, 3, 5)  # at sources 3, 4, 5: they predict the tokens at 4, 5 and beyond
    completion_ids = torch.tensor([[2, 4]])
    logps, entropy = completion_logprobs_from_compacted(logits, source_index, 6, completion_ids, temperature=0.5,
                                                        compute_entropy=True)
    expected = torch.log_softmax(logits / 0.5, -1)
    assert torch.allclose(logps, torch.stack([expected[0, 0, 2], expected[0, 1, 4]])[None])
    assert torch.allclose(entropy[0], -(expected.exp() * expected).sum(-1)[0, :2])


def test_completion_logprobs_leave_missing_completion_tokens_at_zero():
    # B = 2, L = 5, C = 2. Row 0: prompt columns 0..2, one completion token (column 3), right padding at column 4;
    # row 1: prompt 0..2 and two completion tokens. Compacted rows: [pad, 0, 1, 2, 3] and [5, 6, 7, 8, 9].
    source_index = torch.tensor([[-1, 0, 1, 2, 3], [5, 6, 7, 8, 9]])
    logits = torch.randn(2, 3, 4)  # sources [1, 2, 3] and [7, 8, 9]
    completion_ids = torch.tensor([[1, 0], [2, 3]])
    logps, _ = completion_logprobs_from_compacted(logits, source_index, 5, completion_ids)
    expected = torch.log_softmax(logits, -1)
    assert torch.isclose(logps[0, 0], expected[0, 1, 1]) and logps[0, 1] == 0
    assert torch.allclose(logps[1], torch.stack([expected[1, 0, 2], expected[1, 1, 3]]))


# ----------------------------------------------------------------------------------------------------------------
# the trainer


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def trl_batch(processor, samples: list[dict], completions: list[list[int]]) -> dict:
    """What TRL feeds its training forward: left-padded prompts + right-padded completions, image inputs."""
    tokenizer = processor.tokenizer
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["prompt"][0]["content"]}]}],
        add_generation_prompt=True, tokenize=False) for s in samples]
    prompt = processor(text=texts, images=[s["image"] for s in samples], padding=True, return_tensors="pt")
    width = max(map(len, completions))
    completion_ids = torch.full((len(completions), width), tokenizer.pad_token_id)
    completion_mask = torch.zeros_like(completion_ids)
    for row, ids in enumerate(completions):
        completion_ids[row, :len(ids)] = torch.tensor(ids)
        completion_mask[row, :len(ids)] = 1
    return dict(input_ids=torch.cat([prompt["input_ids"], completion_ids], 1),
                attention_mask=torch.cat([prompt["attention_mask"], completion_mask], 1),
                mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion_ids)], 1),
                pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"],
                completion_ids=completion_ids, completion_mask=completion_mask)


def packed_reference_logprobs(model, batch, boxes, temperature: float) -> torch.Tensor:
    """Completion log-probs through an independent path: prune_packed_batch + the language model on one packed row."""
    register_hf_attention()
    positions, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                              batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    pruned = prune_packed_batch(batch["input_ids"], positions, batch["image_grid_thw"],
                                attention_mask=batch["attention_mask"], model=model,
                                pixel_values=batch["pixel_values"], vitos_boxes=boxes)
    language_model = model.model.language_model
    previous = language_model.config._attn_implementation
    language_model.config._attn_implementation = "vitos_varlen"
    try:
        hidden = language_model(**pruned.language_model_kwargs()).last_hidden_state[0]
    finally:
        language_model.config._attn_implementation = previous
    labels = pruned.next_token_labels()
    log_probs = torch.log_softmax(model.lm_head(hidden).float() / temperature, -1)
    picked = log_probs.gather(-1, labels.clamp_min(0)[:, None])[:, 0].masked_fill(labels < 0, 0.0)
    width = batch["completion_ids"].shape[1]
    return pruned.scatter(picked)[:, -width - 1:-1] * batch["completion_mask"], pruned.kept_ratio


def test_sparse_training_forward_matches_an_independent_packed_forward(tmp_path, processor):
    model = build_tiny_model(seed=2)
    samples = rows(3)
    trainer = ViToSGRPOTrainer(model=model, reward_funcs=[text_length_reward], args=config(tmp_path, temperature=0.7),
                               train_dataset=Dataset.from_list(rows(4)), processing_class=processor)
    tokenizer = processor.tokenizer
    completions = [tokenizer("<answer>B</answer>")["input_ids"] + [tokenizer.eos_token_id],
                   tokenizer("<think>x</think>")["input_ids"],
                   tokenizer("C")["input_ids"] + [tokenizer.eos_token_id]]
    batch = trl_batch(processor, samples, completions)
    width = batch["completion_ids"].shape[1]
    image_inputs = dict(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                        num_images=[1, 1, 1], mm_token_type_ids=batch["mm_token_type_ids"])
    trainer._vitos_rows = trainer._row_boxes(samples)
    with torch.no_grad():
        sparse, entropy, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, batch["input_ids"], batch["attention_mask"], width, batch_size=2, compute_entropy=True,
            **image_inputs)
        trainer._vitos_rows = None
        full, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, batch["input_ids"], batch["attention_mask"], width, batch_size=2, **image_inputs)
        expected, kept_ratio = packed_reference_logprobs(model, batch, [torch.tensor(s["bbox"]) for s in samples], 0.7)
    mask = batch["completion_mask"].bool()
    assert 0 < kept_ratio < 0.5
    torch.testing.assert_close(sparse * mask, expected, rtol=1e-5, atol=1e-5)
    assert sparse[mask].lt(0).all() and sparse[~mask].eq(0).all() and entropy[mask].gt(0).all()
    assert not torch.allclose(sparse[mask], full[mask], atol=1e-4)  # the pruning changes what the policy sees


def test_two_grpo_steps_train_on_kept_tokens_only(tmp_path, processor):
    model = build_tiny_model(seed=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = ViToSGRPOTrainer(model=model, reward_funcs=[*TRL_REWARD_FUNCS, text_length_reward],
                               args=config(tmp_path), train_dataset=Dataset.from_list(rows(8, boxes=QUARTER)),
                               processing_class=processor)
    generate_calls = []
    real_generate = model.generate

    def recording_generate(*args, **kwargs):  # what TRL hands to the patched generate()
        generate_calls.append({k: kwargs.get(k) for k in ("vitos_boxes", "generation_config")})
        return real_generate(*args, **kwargs)

    model.__dict__["generate"] = recording_generate  # below the trainer's per-rollout binding of the boxes
    trainer.train()

    steps = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(steps) == 2
    assert [entry["vitos/kept_ratio"] for entry in steps] == [0.25, 0.25]  # pruned at every rollout prefill
    assert len(generate_calls) == 2 and all(len(call["vitos_boxes"]) == 4 for call in generate_calls)
    assert all(torch.equal(box.cpu(), torch.tensor(QUARTER)) for call in generate_calls for box in call["vitos_boxes"])
    for name in ("rewards/trl_format_reward/mean", "rewards/trl_iou_reward/mean",
                 "rewards/trl_accuracy_reward/mean", "rewards/text_length_reward/mean"):
        assert name in steps[0]
    assert any(entry["grad_norm"] > 0 for entry in steps)
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert any("language_model" in name for name in changed)
    assert "generate" in model.__dict__ and model.__dict__["generate"] is recording_generate  # binding undone


def test_model_path_and_kl_reference_use_the_same_sparse_sequences(tmp_path, processor):
    """Loaded by TRL from a folder, patched afterwards; with beta > 0 the frozen reference is patched too, so at the
    first step (policy == reference) the KL between them over the compacted sequences is exactly 0."""
    from vitos_ext import is_patched
    from vitos_ext.tiny import save_tiny_assets

    folder = save_tiny_assets(tmp_path / "ckpt", model=build_tiny_model(seed=3))
    trainer = ViToSGRPOTrainer(model=str(folder), reward_funcs=[text_length_reward],
                               args=config(tmp_path, beta=0.1, model_init_kwargs={"dtype": torch.float32}),
                               train_dataset=Dataset.from_list(rows(8, boxes=QUARTER)), processing_class=processor)
    assert is_patched(trainer.model) and is_patched(trainer.ref_model)
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert [entry["vitos/kept_ratio"] for entry in steps] == [0.25, 0.25]
    assert steps[0]["kl"] == 0.0 and steps[1]["kl"] > 0.0


def test_peft_lora_policy_prunes_and_its_reference_sees_the_same_sparse_sequences(tmp_path, processor):
    """GRPOTrainer(peft_config=...) wraps the policy in LoRA and uses it with the adapters disabled as the KL
    reference: the wrapped model is patched, rollouts and both forwards run on the kept tokens (KL exactly 0 at the
    first step), and only the adapters train."""
    from peft import LoraConfig

    from vitos_ext import is_patched

    model = build_tiny_model(seed=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = ViToSGRPOTrainer(model=model, reward_funcs=[text_length_reward], args=config(tmp_path, beta=0.1),
                               train_dataset=Dataset.from_list(rows(8, boxes=QUARTER)), processing_class=processor,
                               peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert is_patched(trainer.model) and trainer.ref_model is None
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert [entry["vitos/kept_ratio"] for entry in steps] == [0.25, 0.25]
    assert steps[0]["kl"] == 0.0 and steps[1]["kl"] > 0.0
    trained = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    frozen = {name.replace(".base_layer", ""): p for name, p in model.named_parameters() if "lora_" not in name}
    assert frozen.keys() == before.keys()
    assert all(torch.equal(p.detach(), before[name]) for name, p in frozen.items())


def test_rows_boxes_per_image_and_errors(tmp_path, processor):
    trainer = ViToSGRPOTrainer(model=build_tiny_model(), reward_funcs=[text_length_reward], args=config(tmp_path),
                               train_dataset=Dataset.from_list(rows(4)), processing_class=processor)
    parsed = trainer._row_boxes([{"bbox": [[0.1, 0.1, 0.2, 0.2]]}, {"bbox": None},
                                 {"bbox": [[[0, 0, 1, 1]], [[0.5, 0.5, 1, 1], [0, 0, 0.1, 0.1]]]}])
    assert parsed[0].shape == (1, 4) and parsed[1].shape == (0, 4)
    assert [b.shape for b in parsed[2]] == [(1, 4), (2, 4)]
    per_image = trainer._image_boxes(parsed, [2, 1, 2])  # row 0 has two images: its boxes apply to both
    assert [tuple(b.shape) for b in per_image] == [(1, 4), (1, 4), (0, 4), (1, 4), (2, 4)]
    with pytest.raises(ValueError, match="bbox: row 2 has 1 image"):
        trainer._image_boxes(parsed, [1, 1, 1])
    with pytest.raises(ValueError, match=r"bbox\[0\]"):
        trainer._row_boxes([{"bbox": [[0.1, 0.2, 0.3]]}])


@pytest.mark.parametrize("kwargs, match", [
    (dict(boxes_column=""), "boxes_column"),
    (dict(vitos_dilate=-1), "vitos_dilate"),
    (dict(vitos_fuse="yes"), "vitos_fuse"),
])
def test_bad_trainer_arguments_name_themselves(tmp_path, processor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViToSGRPOTrainer(model=build_tiny_model(), reward_funcs=[text_length_reward], args=config(tmp_path),
                         train_dataset=Dataset.from_list(rows(2)), processing_class=processor, **kwargs)


def test_example_script_runs_offline(tmp_path):
    """python/trl_grpo_vitos.py end to end: sparse SFT warm-up, then 2 TRL GRPO steps, log history written."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "python" / "trl_grpo_vitos.py"
    spec = importlib.util.spec_from_file_location("trl_grpo_vitos", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "run"
    assert script.main(["--steps", "2", "--sft-steps", "3", "--samples", "4", "--batch", "4", "--generations", "2",
                        "--max-completion-length", "8", "--out", str(out), "--save"]) == 0
    history = json.loads((out / "log_history.json").read_text())
    steps = [entry for entry in history if "reward" in entry]
    assert len(steps) == 2 and all(0 < entry["vitos/kept_ratio"] < 1 for entry in steps)
    assert (out / "final" / "config.json").is_file() and (out / "final" / "tokenizer_config.json").is_file()
