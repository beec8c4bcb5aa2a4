"""Dynamic sampling (DAPO) in the dual-stream trainer: the group filter, merging rollouts of several sampling rounds,
and which prompts a step trains on."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vitos_ext.data import write_phantom_dataset
from vitos_ext.trainer import DualStreamGRPOTrainer, TrainerConfig, completion_logprobs, prepare_training_data
from vitos_ext.trainer.batching import PromptEncoder, build_sequences, concat_sequence_batches
from vitos_ext.trainer.grpo import informative_groups
from vitos_ext.trainer.rollout import concat_rollouts, make_rollouts, sparse_selection

IMAGE_SIZE = 56


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    return prepare_training_data(write_phantom_dataset(root, 16, seed=7, image_size=IMAGE_SIZE, split="train"))


def _tiny(seed: int = 0):
    from vitos_ext.patching import patch_model
    from vitos_ext.tiny import build_tiny_model, build_tiny_processor

    processor = build_tiny_processor(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE)
    return patch_model(build_tiny_model(seed=seed, attn_implementation="eager")), processor


def test_informative_groups_hand_table():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 2.0, 1.999])
    assert informative_groups(rewards, 2).tolist() == [False, True, False, True]
    assert informative_groups(rewards, 4).tolist() == [True, True]
    assert informative_groups(rewards, 1).tolist() == [False] * 8  # a group of one has no baseline
    for bad in (3, 0, 2.0):
        with pytest.raises(ValueError, match="group_size"):
            informative_groups(rewards, bad)
    with pytest.raises(ValueError, match="rewards"):
        informative_groups(torch.ones(2, 2), 2)


def _with_question(example, extra: str):
    sample = dataclasses.replace(example.sample, question=example.sample.question + extra)
    return dataclasses.replace(example, sample=sample)


def test_merged_rounds_give_each_row_its_own_logprobs(phantom):
    """Rollouts of two rounds with different prompt and completion widths, merged: re-padding (left for prompts,
    right for completions) and the cut keep masks leave every row's log-probs as in its own round."""
    model, processor = _tiny(seed=4)
    encoder = PromptEncoder(processor)
    pad = encoder.pad_token_id
    rounds = []
    for examples, completions, boxes in (
        ([phantom[0], phantom[1]], [torch.tensor([30, 31, 2]), torch.tensor([40, 2])],
         [[[0.0, 0.0, 0.5, 0.5]], [[0.5, 0.5, 1.0, 1.0]]]),
        ([_with_question(phantom[2], " Think twice about it.")], [torch.tensor([50, 51, 52, 53, 54, 55, 2])],
         [[[0.0, 0.5, 0.5, 1.0]]]),
    ):
        prompt = encoder.batch(examples)
        selection, kept = sparse_selection(boxes, prompt.image_grid_thw, merge_size=2)
        rounds.append(make_rollouts("sparse", processor.tokenizer, prompt, completions, torch.zeros(len(examples),
                                    dtype=torch.bool), group_ids=torch.arange(len(examples)), example_ids=[0] * len(
                                    examples), parent=torch.arange(len(examples)), selection=selection,
                                    kept_ratio=kept, patch_size=14, merge_size=2))
    assert rounds[0].sequences.prompt.input_ids.shape[1] != rounds[1].sequences.prompt.input_ids.shape[1]
    merged = concat_rollouts([rounds[0].take([1, 0]), rounds[1]], pad, parent=torch.tensor([5, 6, 7]))
    assert merged.size == 3 and merged.parent.tolist() == [5, 6, 7]
    assert merged.texts == [rounds[0].texts[1], rounds[0].texts[0], rounds[1].texts[0]]
    with torch.no_grad():
        together = completion_logprobs(model, merged.sequences, merged.selection)
        alone = [completion_logprobs(model, part.sequences, part.selection) for part in rounds]
    expected = [alone[0][1], alone[0][0], alone[1][0]]
    for row, reference in enumerate(expected):
        width = int(merged.sequences.completion_mask[row].sum())
        torch.testing.assert_close(together[row, :width], reference[:width], atol=1e-5, rtol=1e-5)
        assert (together[row, width:] == 0).all()

    with pytest.raises(ValueError, match="one branch"):
        concat_rollouts([rounds[0], dataclasses.replace(rounds[1], branch="grounding")], pad)
    with pytest.raises(ValueError, match="parent"):
        concat_rollouts(rounds, pad, parent=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="batches"):
        concat_sequence_batches([], pad)
    # sequences alone: a plain concatenation of equally padded batches is the batch built at once
    same = build_sequences(encoder.batch([phantom[0], phantom[1]]), [torch.tensor([3, 2]), torch.tensor([4, 5, 2])],
                           pad)
    first, second = same.select([0]), same.select([1])
    both = concat_sequence_batches([first, second], pad)
    assert torch.equal(both.completion_ids, same.completion_ids)
    assert torch.equal(both.prompt.input_ids, same.prompt.input_ids)


def _config(tmp_path, **changes) -> TrainerConfig:
    base = dict(output_dir=str(tmp_path), seed=3, sft_steps=0, grounding_steps=1, sparse_steps=1, prompts_per_step=2,
                group_size=2, sparse_group_size=2, updates_per_batch=1, lr=1e-3, max_new_tokens=8, progress=False,
                dynamic_sampling=True, max_sampling_rounds=4)
    return TrainerConfig(**{**base, **changes})


def _rewards_by_prompt(informative_rows: set[int]):
    """basic_terms stand-in: rollouts of rows in ``informative_rows`` get rewards that differ by rollout, every other
    prompt's rollouts all get the same reward."""
    counter = iter(range(10**9))

    def terms(texts, examples, sizes):
        values = [float(next(counter) % 2) if e.sample.index in informative_rows else 1.0 for e in examples]
        accuracy = torch.tensor(values, dtype=torch.float32)
        return torch.ones(len(texts)), torch.zeros(len(texts)), accuracy
    return terms


def _run_step(phantom, tmp_path, monkeypatch, phase, informative_rows, **changes):
    import vitos_ext.trainer.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "basic_terms", _rewards_by_prompt(informative_rows))
    model, processor = _tiny(seed=5)
    trainer = DualStreamGRPOTrainer(model, processor, phantom, _config(tmp_path, **changes))
    updated = []
    original = trainer.update_branch
    trainer.update_branch = lambda rollouts, terms: updated.append((rollouts, terms)) or original(rollouts, terms)
    drawn = []
    original_next = trainer.next_prompts

    def recording_next():
        indices, prompt = original_next()
        drawn.append(list(indices))
        return indices, prompt

    trainer.next_prompts = recording_next
    scored = []
    original_score = trainer.score
    trainer.score = lambda grounding, sparse: scored.append(original_score(grounding, sparse)) or scored[-1]
    trainer._start_phase(phase)
    metrics = trainer.grpo_step(phase)
    trainer.scored = scored  # reward terms of every scoring call of the step, in order
    return trainer, metrics, updated, drawn


@pytest.mark.parametrize("phase", ["sparse", "grounding", "alternate"])
def test_dynamic_sampling_trains_on_prompts_whose_rewards_differ(phantom, tmp_path, monkeypatch, phase):
    rows = {phantom[i].sample.index: i for i in range(len(phantom))}
    informative = set(sorted(rows)[::3])  # about a third of the prompts teach something
    trainer, metrics, updated, drawn = _run_step(phantom, tmp_path, monkeypatch, phase, informative,
                                                 grounding_rewards={"cross": 0.0})
    flat = [i for batch in drawn for i in batch]
    wanted = [i for i in flat if phantom[i].sample.index in informative][:2]
    assert len(wanted) == 2, "the data order should offer two informative prompts within four rounds"
    first_hit = flat.index(wanted[-1])
    assert metrics["sampling/rounds"] == first_hit // 2 + 1 == len(drawn)
    assert metrics["sampling/informative_in_batch"] == 1.0
    assert 0 < metrics["sampling/informative_fraction"] <= 1
    # reward metrics cover every sampled rollout, not only the trained ones
    sampled = torch.cat([g_terms.total for g_terms, _ in trainer.scored[:len(drawn)]])
    assert metrics["grounding/reward/total"] == pytest.approx(float(sampled.mean()))
    rollouts, terms = updated[0]
    assert rollouts.branch == ("sparse" if phase == "sparse" else "grounding")
    per_prompt = 4 if phase == "sparse" else 2
    assert rollouts.size == 2 * per_prompt and terms.total.numel() == rollouts.size
    assert sorted(set(rollouts.example_ids)) == sorted(wanted)
    assert len(set(rollouts.group_ids.tolist())) == 2
    for group in set(rollouts.group_ids.tolist()):  # whole groups, each with rewards that differ
        in_group = rollouts.group_ids == group
        assert int(in_group.sum()) == per_prompt and terms.total[in_group].unique().numel() > 1
    if phase == "alternate":  # the sparse update runs on fresh sparse rollouts of the chosen grounding rollouts
        sparse_rollouts, _ = updated[1]
        assert sparse_rollouts.branch == "sparse" and sparse_rollouts.size == 2 * 2 * 2
        assert sparse_rollouts.parent.tolist() == torch.arange(4).repeat_interleave(2).tolist()
        assert sparse_rollouts.example_ids == [rollouts.example_ids[i] for i in sparse_rollouts.parent.tolist()]


def test_dynamic_sampling_tops_up_with_uninformative_prompts_when_rounds_run_out(phantom, tmp_path, monkeypatch):
    trainer, metrics, updated, drawn = _run_step(phantom, tmp_path, monkeypatch, "sparse", informative_rows=set(),
                                                 max_sampling_rounds=3)
    assert metrics["sampling/rounds"] == 3 and len(drawn) == 3
    assert metrics["sampling/informative_fraction"] == 0 and metrics["sampling/informative_in_batch"] == 0
    rollouts, terms = updated[0]
    assert sorted(set(rollouts.example_ids)) == sorted(drawn[0])  # the earliest round's prompts
    assert rollouts.size == 8 and torch.equal(terms.total, torch.full((8,), terms.total[0].item()))
    assert trainer.order.state_dict()["position"] == 6  # every drawn prompt is consumed


def test_without_dynamic_sampling_a_step_is_one_round(phantom, tmp_path, monkeypatch):
    _, metrics, updated, drawn = _run_step(phantom, tmp_path, monkeypatch, "sparse", informative_rows=set(),
                                           dynamic_sampling=False)
    assert len(drawn) == 1 and not any(key.startswith("sampling/") for key in metrics)
    assert sorted(set(updated[0][0].example_ids)) == sorted(drawn[0])


def test_dynamic_sampling_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="dynamic_sampling"):
        _config(tmp_path, dynamic_sampling="yes")
    with pytest.raises(ValueError, match="max_sampling_rounds"):
        _config(tmp_path, max_sampling_rounds=0)
