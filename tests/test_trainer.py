"""Tests of the ViToS dual-stream GRPO trainer (vitos_ext.trainer): GRPO math against hand computations, rewards
and G x G' grouping, the training forward, gradient isolation, exact resume, NaN stops, bad samples, smoke runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitos_ext.data import write_phantom_dataset
from vitos_ext.trainer import (
    DataOrder,
    DualStreamGRPOTrainer,
    GroundingRewardWeights,
    NonFiniteError,
    SparseRewardWeights,
    SparseSelection,
    TrainerConfig,
    aggregate_token_loss,
    clipped_surrogate_loss,
    completion_logprobs,
    group_advantages,
    grounding_rewards,
    k3_kl,
    prepare_training_data,
    read_metrics,
    sparse_rewards,
)
from vitos_ext.trainer.batching import build_sequences
from vitos_ext.trainer.rollout import sparse_selection

IMAGE_SIZE = 56  # 4 x 4 patches -> 2 x 2 visual tokens: the fastest image the tiny model takes


# ----------------------------------------------------------------------------------------------------------------
# GRPO math


def test_group_advantages_match_hand_computation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3); group 1: mean 0.75, std sqrt((3 * 0.0625 + 0.5625) / 3)
    std0, std1 = math.sqrt(1 / 3), 0.5
    expected = torch.tensor([0.5 / std0, -0.5 / std0, -0.5 / std0, 0.5 / std0,
                             0.25 / std1, 0.25 / std1, 0.25 / std1, -0.75 / std1])
    got = group_advantages(rewards, groups, scale="group", epsilon=0.0)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(group_advantages(rewards, groups, scale="none"),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]))
    batch_std = float(rewards.std())
    torch.testing.assert_close(group_advantages(rewards, groups, scale="batch", epsilon=0.0),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]) / batch_std)


def test_group_advantages_interleaved_ids_singletons_and_constant_groups():
    rewards = torch.tensor([2.0, 5.0, 4.0, 3.0, 3.0])
    groups = torch.tensor([7, 3, 7, 9, 9])  # 7: {2, 4}, 3: {5} alone, 9: {3, 3} constant
    got = group_advantages(rewards, groups, epsilon=1e-6)
    std7 = math.sqrt(2.0)  # unbiased std of {2, 4}
    torch.testing.assert_close(got, torch.tensor([-1.0 / (std7 + 1e-6), 0.0, 1.0 / (std7 + 1e-6), 0.0, 0.0]))
    assert torch.isfinite(got).all()


def test_group_advantages_errors_name_the_argument():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), scale="rank")
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))


def test_clipped_loss_two_token_example_matches_hand_computation():
    # token 0: A = +1, ratio e^0.5 = 1.6487 > 1 + eps_high = 1.3 -> clipped term 1.3 (no gradient)
    # token 1: A = -2, ratio e^-0.5 = 0.6065 < 1 - eps_low = 0.8 -> clipped term -2 * 0.8 (no gradient)
    old = torch.tensor([[-1.0, -1.0]])
    logprobs = torch.tensor([[-0.5, -1.5]], requires_grad=True)
    advantages = torch.tensor([[1.0, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = clipped_surrogate_loss(logprobs, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.3)
    expected = (-1.3 + 2 * 0.8) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.zeros(1, 2))
    assert stats.clip_high_fraction == pytest.approx(0.5) and stats.clip_low_fraction == pytest.approx(0.5)

    # the unclipped sides: A = -1 with ratio e^0.5 (pessimistic min keeps ratio * A), A = +1 with ratio e^-0.5
    logprobs = torch.tensor([[-0.5, -1.5]], requires_grad=True)
    loss, _ = clipped_surrogate_loss(logprobs, old, torch.tensor([[-1.0, 1.0]]), mask, 0.2, 0.3)
    r0, r1 = math.exp(0.5), math.exp(-0.5)
    assert loss.item() == pytest.approx((r0 - r1) / 2, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[r0 / 2, -r1 / 2]]))


def test_clipped_loss_with_k3_kl_and_mask():
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    beta = 0.1
    loss, stats = clipped_surrogate_loss(logprobs, old, torch.tensor([0.5]), mask, ref_logprobs=ref, beta=beta)
    kl = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]  # exp(ref - logp) - (ref - logp) - 1
    expected = ((-0.5 + beta * kl[0]) + (-0.5 + beta * kl[1])) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats.kl_mean == pytest.approx(sum(kl) / 2, abs=1e-6)
    loss.backward()
    # d/dlogp [-r A + beta k3] at r = 1 is -A + beta * (1 - exp(ref - logp)); the masked token gets nothing
    grads = [(-0.5 + beta * (1 - math.exp(-0.5))) / 2, (-0.5 + beta * (1 - math.exp(1.0))) / 2, 0.0]
    torch.testing.assert_close(logprobs.grad, torch.tensor([grads]))
    torch.testing.assert_close(k3_kl(torch.zeros(2), torch.zeros(2)), torch.zeros(2))
    with pytest.raises(ValueError, match="ref_logprobs"):
        clipped_surrogate_loss(logprobs, old, torch.tensor([0.5]), mask, beta=0.1)


def test_loss_aggregations():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_token_loss(per_token, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_token_loss(per_token, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_token_loss(per_token, mask, "seq-mean-token-sum-norm", max_length=4).item() == \
        pytest.approx((6 / 4 + 4 / 4) / 2)
    assert aggregate_token_loss(per_token, torch.zeros_like(mask), "token-mean").item() == 0.0


# ----------------------------------------------------------------------------------------------------------------
# rewards and G x G' grouping


def test_grounding_rewards_with_cross_feedback_hand_computed():
    weights = GroundingRewardWeights(format=0.5, iou=2.0, accuracy=1.0, cross=0.25)
    terms = grounding_rewards(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.2]), torch.tensor([1.0, 0.0]),
                              torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), weights)
    torch.testing.assert_close(terms.cross, torch.tensor([2 / 3, 0.0]))
    torch.testing.assert_close(terms.total, torch.tensor([0.5 + 1.0 + 1.0 + 0.25 * 2 / 3, 0.4]))
    with pytest.raises(ValueError, match="cross"):
        grounding_rewards(torch.ones(1), torch.ones(1), torch.ones(1), None, weights)


def test_sparse_rewards_and_gxg_advantages_hand_computed():
    # 2 prompts x G = 2 grounding rollouts, each followed by G' = 2 sparse rollouts: groups of G x G' = 4 per prompt
    grounding_accuracy = torch.tensor([1.0, 0.0, 1.0, 1.0])
    grounding_groups = torch.tensor([0, 0, 1, 1])
    parent = torch.arange(4).repeat_interleave(2)
    sparse_accuracy = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    weights = SparseRewardWeights(format=0.0, accuracy=1.0, cross=0.5, iou=0.0)
    terms = sparse_rewards(torch.ones(8), torch.zeros(8), sparse_accuracy, grounding_accuracy, parent, weights)
    cross = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(terms.cross, cross)
    total = sparse_accuracy + 0.5 * cross  # [1.5, 1.5, 0, 1, 0.5, 0.5, 1.5, 0.5]
    torch.testing.assert_close(terms.total, total)
    sparse_groups = grounding_groups[parent]
    assert sparse_groups.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    advantages = group_advantages(terms.total, sparse_groups, epsilon=0.0)
    mean0, mean1 = 1.0, 0.75
    std0 = math.sqrt((0.25 + 0.25 + 1.0 + 0.0) / 3)
    std1 = math.sqrt((0.0625 * 3 + 0.5625) / 3)
    expected = torch.tensor([0.5 / std0, 0.5 / std0, -1.0 / std0, 0.0,
                             -0.25 / std1, -0.25 / std1, 0.75 / std1, -0.25 / std1])
    torch.testing.assert_close(advantages, expected)
    assert mean0 == float(total[:4].mean()) and mean1 == float(total[4:].mean())
    with pytest.raises(ValueError, match="parent"):
        sparse_rewards(torch.ones(8), torch.zeros(8), sparse_accuracy, grounding_accuracy, parent.flip(0), weights)


def test_box_precision_charges_extra_boxes_that_iou_ignores():
    from vitos_ext.rewards import iou_reward
    from vitos_ext.trainer.scoring import box_precision

    gold = [[0.0, 0.0, 0.5, 0.5]]
    hedge = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]
    assert iou_reward(hedge, gold) == pytest.approx(1.0)
    assert box_precision(hedge, gold) == pytest.approx(0.5)
    assert box_precision([[0.0, 0.0, 0.25, 0.5]], gold) == pytest.approx(0.5)  # half the gold area, inside it
    assert box_precision([], gold) == 0.0
    weights = GroundingRewardWeights(format=0.0, iou=1.0, accuracy=0.0, cross=0.0, precision=2.0)
    terms = grounding_rewards(torch.ones(2), torch.tensor([1.0, 1.0]), torch.zeros(2), None, weights,
                              precision=torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(terms.total, torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match="precision"):
        grounding_rewards(torch.ones(2), torch.ones(2), torch.zeros(2), None, weights)


def test_nonfinite_reward_raises():
    with pytest.raises(NonFiniteError, match="iou"):
        grounding_rewards(torch.ones(2), torch.tensor([0.5, float("nan")]), torch.ones(2), None,
                          GroundingRewardWeights(cross=0.0))


def test_sparse_selection_keeps_box_tokens_and_handles_missing_boxes():
    grid = torch.tensor([[1, 8, 8], [1, 8, 8], [1, 8, 8]])  # 4 x 4 tokens each
    boxes = [[[0.0, 0.0, 0.25, 0.25]], [], [[0.5, 0.5, 1.0, 1.0]]]
    selection, ratio = sparse_selection(boxes, grid, merge_size=2, no_box_policy="no_visual_tokens")
    keep = selection.keep.view(3, 4, 4)
    assert keep[0].sum() == 1 and keep[0, 0, 0]
    assert keep[1].sum() == 0
    assert keep[2, 2:, 2:].all() and keep[2].sum() == 4
    torch.testing.assert_close(ratio, torch.tensor([1 / 16, 0.0, 0.25]))
    _, ratio = sparse_selection(boxes, grid, merge_size=2, no_box_policy="all_visual_tokens")
    assert ratio[1] == 1.0


def test_data_order_is_resumable_and_seeded():
    order = DataOrder(5, seed=3)
    first = order.next_indices(7)
    assert sorted(first[:5]) == list(range(5))
    state = order.state_dict()
    rest = order.next_indices(6)
    again = DataOrder(5, seed=3)
    again.load_state_dict(state)
    assert again.next_indices(6) == rest
    assert DataOrder(5, seed=4).next_indices(5) != DataOrder(5, seed=3).next_indices(5) or True


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="schedule"):
        TrainerConfig(schedule="interleaved")
    with pytest.raises(ValueError, match="group_size"):
        TrainerConfig(group_size=0)
    with pytest.raises(ValueError, match="epsilon_low"):
        TrainerConfig(epsilon_low=-0.1)
    with pytest.raises(ValueError, match="grounding_rewards.iou"):
        TrainerConfig(grounding_rewards={"iou": float("nan")})
    with pytest.raises(ValueError, match="unknown TrainerConfig"):
        TrainerConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="sparse_lr"):
        TrainerConfig(sparse_lr=float("inf"))
    config = TrainerConfig(sparse_group_size=None, group_size=3)
    assert config.sparse_group == 3
    assert TrainerConfig.from_dict(config.to_dict()) == config


# ----------------------------------------------------------------------------------------------------------------
# model-level fixtures


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    train = write_phantom_dataset(root, 12, seed=5, image_size=IMAGE_SIZE, split="train")
    test = write_phantom_dataset(root, 4, seed=6, image_size=IMAGE_SIZE, split="test")
    return prepare_training_data(train), prepare_training_data(test)


def _tiny(seed: int = 0):
    from vitos_ext.tiny import build_tiny_model, build_tiny_processor

    processor = build_tiny_processor(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE)
    return build_tiny_model(seed=seed, attn_implementation="eager"), processor


def _config(tmp_path: Path, **changes) -> TrainerConfig:
    base = dict(output_dir=str(tmp_path), seed=1, sft_steps=2, sft_batch_size=4, sft_lr=1e-3, grounding_steps=2,
                sparse_steps=2, alternate_steps=2, prompts_per_step=2, group_size=2, sparse_group_size=2,
                updates_per_batch=2, mini_batch_size=2, lr=1e-3, max_new_tokens=12, eval_batch_size=4,
                progress=False, num_threads=None)
    return TrainerConfig(**{**base, **changes})


def _parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_sparse_logprobs_locate_completions_in_the_compacted_sequence(phantom):
    train, _ = phantom
    model, processor = _tiny(seed=3)
    from vitos_ext.patching import patch_model
    from vitos_ext.trainer.batching import PromptEncoder

    patch_model(model)
    encoder = PromptEncoder(processor)
    prompt = encoder.batch([train[0], train[1], train[2]])
    completions = [torch.tensor([30, 31, 32, 2]), torch.tensor([40, 2]), torch.tensor([50, 51, 52, 53, 54, 2])]
    sequences = build_sequences(prompt, completions, encoder.pad_token_id)
    grid = prompt.image_grid_thw
    selection, _ = sparse_selection([[[0.0, 0.0, 0.4, 0.4]], [[0.5, 0.5, 1.0, 1.0]], [[0.0, 0.5, 0.5, 1.0]]],
                                    grid, merge_size=2)
    with torch.no_grad():
        batched = completion_logprobs(model, sequences, selection)
        everything = completion_logprobs(model, sequences, SparseSelection(torch.ones_like(selection.keep)))
        full = completion_logprobs(model, sequences)
    torch.testing.assert_close(everything, full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched, full)
    mask = sequences.completion_mask.bool()
    assert (batched[~mask] == 0).all() and (batched[mask] < 0).all()
    for row in range(3):  # each row alone (no padding, its own keep segment) gives the same numbers
        alone = build_sequences(prompt.select([row]), [completions[row]], encoder.pad_token_id)
        keep = selection.keep.view(3, -1)[row]
        with torch.no_grad():
            single = completion_logprobs(model, alone, SparseSelection(keep))
        n = completions[row].numel()
        torch.testing.assert_close(single[0, :n], batched[row, :n], atol=1e-5, rtol=1e-5)


def test_gradient_isolation_between_branches(phantom, tmp_path):
    train, _ = phantom
    model, processor = _tiny(seed=1)
    config = _config(tmp_path, grounding_rewards={"cross": 0.0}, updates_per_batch=1, mini_batch_size=None)
    trainer = DualStreamGRPOTrainer(model, processor, train, config)
    trainer._start_phase("grounding")
    indices, prompt = trainer.next_prompts()
    grounding = trainer.rollout_grounding(indices, prompt)
    sparse = trainer.rollout_sparse(grounding)
    g_terms, s_terms = trainer.score(grounding, sparse)
    g_terms.total = torch.tensor([1.0, 0.0, 0.5, 2.0])  # non-degenerate advantages regardless of the rollouts
    s_terms.total = torch.arange(sparse.size, dtype=torch.float32)

    forwarded = []
    original = trainer._branch_logprobs

    def recording(model_, rollouts, rows):
        forwarded.append((rollouts.branch, torch.is_grad_enabled()))
        return original(model_, rollouts, rows)

    trainer._branch_logprobs = recording
    start = _parameters(model)
    trainer.update_branch(grounding, g_terms)
    assert forwarded == [("grounding", True)]
    after_grounding = _parameters(model)
    assert any(not torch.equal(start[k], after_grounding[k]) for k in start)

    # the same grounding update with different sparse rollouts (cross weight 0) changes nothing: bit-exact
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(start[name])
    trainer._start_phase("grounding")
    other_sparse = trainer.rollout_sparse(grounding)
    other_sparse.texts = ["<answer>Z</answer>"] * other_sparse.size
    trainer.score(grounding, other_sparse)
    trainer.update_branch(grounding, g_terms)
    assert all(torch.equal(after_grounding[k], p) for k, p in _parameters(model).items())

    forwarded.clear()
    trainer._start_phase("sparse")
    trainer.update_branch(sparse, s_terms)
    assert forwarded == [("sparse", True)]


def test_peft_lora_policy_trains_only_its_adapters(phantom, tmp_path):
    """A PEFT-wrapped policy: patch_model patches the wrapped VLM, the KL reference is a frozen copy, and only the
    LoRA weights (the trainable parameters) move; resuming from the checkpoint restores them exactly."""
    from peft import LoraConfig, get_peft_model

    train, _ = phantom
    model, processor = _tiny(seed=2)
    policy = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    start = _parameters(policy)
    config = _config(tmp_path, beta=0.05)
    DualStreamGRPOTrainer(policy, processor, train, config).train()
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    after = _parameters(policy)
    assert all(torch.equal(start[name], after[name]) for name in start if name not in trainable)
    assert any(not torch.equal(start[name], after[name]) for name in trainable)
    resumed_model, _ = _tiny(seed=2)
    resumed = get_peft_model(resumed_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    DualStreamGRPOTrainer(resumed, processor, train, config).train(resume=True)  # complete: loads, trains nothing
    assert all(torch.equal(after[name], p) for name, p in _parameters(resumed).items())
    # final/ is a plain model folder with the adapters merged (what from_pretrained / infer / the demo load), and
    # final/adapter the adapter alone
    exported = type(model).from_pretrained(tmp_path / "final").eval()
    merged = policy.merge_and_unload()
    assert exported.state_dict().keys() == merged.state_dict().keys()
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in merged.state_dict().items())
    assert (tmp_path / "final" / "adapter" / "adapter_config.json").is_file()
    dora = get_peft_model(_tiny(seed=2)[0], LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    with pytest.raises(NotImplementedError, match="no DoRA"):  # refused before training, not at the final export
        DualStreamGRPOTrainer(dora, processor, train, _config(tmp_path / "dora"))


def _train(tmp_path: Path, phantom, stop_at_step=None, resume=False, schedule="stages", **changes):
    train, test = phantom
    model, processor = _tiny(seed=2)
    config = _config(tmp_path, schedule=schedule, **changes)
    trainer = DualStreamGRPOTrainer(model, processor, train, config, eval_data=test if not stop_at_step else None)
    trainer.train(resume=resume, stop_at_step=stop_at_step)
    return trainer


def _text_dependent_terms(texts, examples, sizes):
    """Rewards that depend on the sampled text, so GRPO steps of an untrained model move the weights."""
    values = torch.tensor([(sum(map(ord, text)) % 7) / 6 for text in texts], dtype=torch.float32)
    return (values > 0.5).float(), values, (values < 0.3).float()


def test_resume_is_bit_exact(phantom, tmp_path, monkeypatch):
    import vitos_ext.trainer.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "basic_terms", _text_dependent_terms)
    # 4 global steps: 2 SFT + 2 stage-1 GRPO steps (sampling, 2 updates x 2 mini-batches, cross-feedback rollouts)
    changes = dict(sparse_steps=0, save_every=0, grounding_rewards={"cross": 0.5})
    full = _train(tmp_path / "full", phantom, stop_at_step=4, **changes)
    first = _train(tmp_path / "split", phantom, stop_at_step=2, **changes)
    assert first.state["global_step"] == 2
    second = _train(tmp_path / "split", phantom, stop_at_step=4, resume=True, **changes)
    assert second.state["global_step"] == 4 and full.state["global_step"] == 4
    reference = _parameters(full.model)
    assert all(torch.equal(reference[k], p) for k, p in _parameters(second.model).items())
    assert full.order.state_dict() == second.order.state_dict()
    assert any(not torch.equal(reference[k], p) for k, p in _parameters(first.model).items())


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(phantom, tmp_path, monkeypatch):
    train, _ = phantom
    model, processor = _tiny(seed=4)
    trainer = DualStreamGRPOTrainer(model, processor, train, _config(tmp_path, save_every=2, sft_steps=4))
    original = trainer.sft_step
    good = {}

    def poisoned():
        if trainer.state["global_step"] == 2:
            good.update(_parameters(trainer.model))
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
        return original()

    monkeypatch.setattr(trainer, "sft_step", poisoned)
    with pytest.raises(NonFiniteError, match="sft-step-000002"):
        trainer.train()
    failure = json.loads((tmp_path / "FAILED.json").read_text())
    assert failure["global_step"] == 2 and failure["last_good_checkpoint"].endswith("sft-step-000002")
    tracker = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert tracker["checkpoint"] == "sft-step-000002"
    fresh, _ = _tiny(seed=9)
    from vitos_ext.trainer.checkpoint import load_checkpoint_weights

    load_checkpoint_weights(tmp_path / "checkpoints" / "sft-step-000002", fresh, restore_rng=False)
    assert all(torch.equal(good[k], p) for k, p in _parameters(fresh).items())


def test_nonfinite_reward_stops_training(phantom, tmp_path, monkeypatch):
    import vitos_ext.trainer.trainer as trainer_module

    original = trainer_module.basic_terms

    def nan_iou(texts, examples, sizes):
        format_, iou, accuracy = original(texts, examples, sizes)
        return format_, torch.full_like(iou, float("nan")), accuracy

    monkeypatch.setattr(trainer_module, "basic_terms", nan_iou)
    train, _ = phantom
    model, processor = _tiny(seed=4)
    trainer = DualStreamGRPOTrainer(model, processor, train, _config(tmp_path, sft_steps=1))
    before = None
    with pytest.raises(NonFiniteError, match="non-finite grounding reward"):
        before = _parameters(model)
        trainer.train()
    assert trainer.state["global_step"] == 1  # the SFT step ran, the GRPO step was refused
    tracker = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert tracker["checkpoint"] == "sft-final"
    assert before is not None


def test_bad_samples_are_reported_and_skipped(tmp_path):
    from vitos_ext.data import make_phantom_record

    rows = []
    for index in range(6):
        record, image = make_phantom_record(index, seed=1, image_size=IMAGE_SIZE)
        path = tmp_path / f"img{index}.png"
        image.save(path)
        rows.append({"image_path": [str(path)], **record})
    rows[1]["image_path"] = [str(tmp_path / "missing.png")]
    rows[2]["bbox"] = [[0.2, 0.2, 1.4, 0.5]]
    rows[3]["answer"] = ""
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    rows[4]["image_path"] = [str(tmp_path / "broken.png")]
    json_path = tmp_path / "rows.json"
    json_path.write_text(json.dumps(rows))

    for source in (json_path, rows):
        data = prepare_training_data(source)
        reasons = {row.index: row.reason for row in data.report.skipped}
        assert reasons == {1: "missing image", 2: "box outside [0,1]", 3: "missing answer", 4: "unreadable image"}
        assert [e.sample.index for e in data.examples] == [0, 5]

    model, processor = _tiny(seed=0)
    trainer = DualStreamGRPOTrainer(model, processor, prepare_training_data(json_path),
                                    _config(tmp_path / "run", grounding_steps=1, sparse_steps=1, sft_steps=1))
    trainer.train()
    report = json.loads((tmp_path / "run" / "skipped_samples.json").read_text())
    assert report["train"]["skipped_by_reason"] == {"missing image": 1, "box outside [0,1]": 1,
                                                    "missing answer": 1, "unreadable image": 1}


def test_images_are_checked_up_front_and_decoded_on_access(phantom, tmp_path):
    from vitos_ext.data import load_image, make_phantom_record

    train, _ = phantom
    assert all(example.preloaded_image is None for example in train.examples)  # no dataset-sized pile of decoded pixels
    first = train[0]
    decoded = load_image(first.sample.image_paths[0])
    assert first.image.tobytes() == decoded.tobytes() and first.image.mode == "RGB"

    record, image = make_phantom_record(0, seed=3, image_size=IMAGE_SIZE)
    image.save(tmp_path / "scan.png")
    rows = [{"image_path": [str(tmp_path / "scan.png")], **record}]
    kept = prepare_training_data(rows, keep_images=True)[0]
    assert kept.preloaded_image is not None and kept.image is kept.image
    lazy = prepare_training_data(rows)[0]
    (tmp_path / "scan.png").unlink()  # gone after the check: the next read names the file
    with pytest.raises(FileNotFoundError, match="scan.png"):
        lazy.image
    assert kept.image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_prompt_cache_is_bounded_and_least_recently_used_goes_first(phantom):
    from vitos_ext.trainer.batching import PromptEncoder

    train, _ = phantom
    _, processor = _tiny()
    size = PromptEncoder(processor).encode(train[0]).nbytes
    encoder = PromptEncoder(processor, cache_bytes=2 * size + size // 2)  # room for two prompts
    first = encoder.encode(train[0], key=0)
    encoder.encode(train[1], key=1)
    assert encoder.encode(train[0], key=0) is first  # a hit, and key 0 becomes the most recently used
    encoder.encode(train[2], key=2)  # evicts key 1, the least recently used
    assert encoder.cached_bytes <= encoder.cache_bytes and set(encoder._cache) == {0, 2}
    again = encoder.encode(train[1], key=1)  # re-encoded (evicting key 0, now the oldest)
    assert list(encoder._cache) == [2, 1]
    torch.testing.assert_close(again.pixel_values, PromptEncoder(processor).encode(train[1]).pixel_values)

    uncached = PromptEncoder(processor, cache_bytes=0)
    assert uncached.encode(train[0], key=0) is not uncached.encode(train[0], key=0) and uncached.cached_bytes == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="cache_bytes"):
            PromptEncoder(processor, cache_bytes=bad)
    with pytest.raises(ValueError, match="prompt_cache_mb"):
        TrainerConfig(prompt_cache_mb=-1)


@pytest.mark.parametrize("schedule", ["stages", "alternate"])
def test_smoke_run_of_each_schedule(phantom, tmp_path, schedule):
    trainer = _train(tmp_path, phantom, schedule=schedule, dilate=1, fuse_tokens=(schedule == "alternate"),
                     beta=0.05 if schedule == "alternate" else 0.0)
    records = read_metrics(tmp_path / "metrics.jsonl")
    phases = [r["phase"] for r in records if "eval/label" not in r]
    expected = ["sft", "sft", "grounding", "grounding", "sparse", "sparse"] if schedule == "stages" else \
        ["sft", "sft", "alternate", "alternate"]
    assert phases == expected
    grpo = [r for r in records if r.get("phase") in ("grounding", "sparse", "alternate") and "eval/label" not in r]
    for record in grpo:
        for key in ("grounding/reward/format", "grounding/reward/iou", "grounding/reward/accuracy",
                    "grounding/reward/cross", "sparse/reward/accuracy", "sparse/kept_ratio"):
            assert key in record and math.isfinite(record[key])
    if schedule == "alternate":
        assert all("grounding/loss" in r and "sparse/loss" in r and r["sparse/kl_mean"] >= 0 for r in grpo)
    labels = list(trainer.state["eval_results"])
    assert labels == (["after SFT", "after stage 1", "after stage 2"] if schedule == "stages"
                      else ["after SFT", "after alternate"])
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size[0] > 500
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert "| after SFT |" in (tmp_path / "eval_table.md").read_text()
    tracker = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert tracker["phase_complete"] and tracker["checkpoint"].endswith("-final")


# ----------------------------------------------------------------------------------------------------------------
# mixed precision


def test_mixed_precision_setting_resolves_per_device_and_weight_dtype():
    from vitos_ext.trainer.logprobs import mixed_precision_dtype

    fp32, bf16 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert mixed_precision_dtype("auto", fp32) is None  # CPU: no autocast unless asked for
    assert mixed_precision_dtype("bf16", fp32) is torch.bfloat16
    assert mixed_precision_dtype("no", fp32) is None
    assert mixed_precision_dtype("auto", bf16) is None
    with pytest.raises(ValueError, match="mixed_precision"):
        mixed_precision_dtype("fp8", fp32)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainerConfig(mixed_precision="fp16")
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert mixed_precision_dtype("auto", fp32.cuda()) is torch.bfloat16
        assert mixed_precision_dtype("auto", bf16.cuda()) is None


def test_sixteen_bit_trainable_parameters_are_warned_about(phantom, tmp_path, caplog):
    train, _ = phantom
    model, processor = _tiny(seed=2)
    DualStreamGRPOTrainer(model, processor, train, _config(tmp_path / "fp32"))
    assert "AdamW updates" not in caplog.text
    DualStreamGRPOTrainer(model.to(torch.bfloat16), processor, train, _config(tmp_path / "bf16"))
    assert "trainable parameters in torch.bfloat16: AdamW updates smaller than ~1/256" in caplog.text


def test_bf16_mixed_precision_runs_forwards_in_bf16_and_keeps_float32_weights(phantom, tmp_path):
    """mixed_precision="bf16": rollouts, training / old-policy / reference log-probs and evaluation run their
    matmuls in bfloat16 under autocast; weights and gradients stay float32 and the weights move."""
    train, test = phantom
    model, processor = _tiny(seed=2)
    start = _parameters(model)
    config = _config(tmp_path, mixed_precision="bf16", beta=0.05, sft_steps=1, grounding_steps=1, sparse_steps=1)
    trainer = DualStreamGRPOTrainer(model, processor, train, config, eval_data=test)
    outputs, gradients = [], []
    projection = model.model.language_model.layers[0].self_attn.q_proj
    projection.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
    projection.weight.register_hook(lambda grad: gradients.append(grad.dtype))
    results = trainer.train()
    assert outputs and set(outputs) == {torch.bfloat16}
    assert gradients and set(gradients) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    moved = _parameters(model)
    assert any(not torch.equal(start[k], moved[k]) for k in start)
    assert all(math.isfinite(results[label]["accuracy_full"]) for label in results)

    # the bf16 log-probs are those of the float32 forward up to bf16 rounding
    from vitos_ext.trainer.batching import PromptEncoder
    from vitos_ext.trainer.logprobs import TrainingForward

    encoder = PromptEncoder(processor)
    prompt = encoder.batch([train[0], train[1]])
    sequences = build_sequences(prompt, [torch.tensor([30, 31, 32, 2]), torch.tensor([40, 2])], encoder.pad_token_id)
    mask = sequences.completion_mask.bool()
    for layout in ("padded", "packed"):
        with torch.no_grad():
            low = TrainingForward(model, layout, torch.bfloat16)(sequences)
            full = TrainingForward(model, layout)(sequences)
        assert low.dtype == torch.float32 and not torch.equal(low, full)
        assert (low - full)[mask].abs().max() < 0.1
