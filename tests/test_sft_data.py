"""A separate SFT warm-up set (``sft_data`` / ``--sft-file`` / ``PresetSpec.sft_samples``): the warm-up trains on it,
GRPO samples the training prompts, and resume stays exact."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vitos_ext.data import write_phantom_dataset
from vitos_ext.trainer import DualStreamGRPOTrainer, TrainerConfig, prepare_training_data
from vitos_ext.trainer import cli

IMAGE_SIZE = 56


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("pools")
    train = prepare_training_data(write_phantom_dataset(root, 6, seed=11, image_size=IMAGE_SIZE, split="train"))
    sft = prepare_training_data(write_phantom_dataset(root, 10, seed=12, image_size=IMAGE_SIZE, split="sft"))
    return train, sft


def _trainer(tmp_path, pools, with_sft=True, **changes):
    from vitos_ext.tiny import build_tiny_model, build_tiny_processor

    processor = build_tiny_processor(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE)
    model = build_tiny_model(seed=2, attn_implementation="eager")
    base = dict(output_dir=str(tmp_path), seed=1, sft_steps=2, sft_batch_size=4, sft_lr=1e-3, grounding_steps=2,
                sparse_steps=0, prompts_per_step=2, group_size=2, sparse_group_size=2, lr=1e-3, max_new_tokens=8,
                progress=False, grounding_rewards={"cross": 0.0})
    train, sft = pools
    return DualStreamGRPOTrainer(model, processor, train, TrainerConfig(**{**base, **changes}),
                                 sft_data=sft if with_sft else None)


def test_warm_up_trains_on_sft_data_and_grpo_on_training_prompts(pools, tmp_path):
    train, sft = pools
    trainer = _trainer(tmp_path, pools)
    seen = []
    original = trainer.encoder.batch
    trainer.encoder.batch = lambda examples, keys=None: seen.append((trainer.state["phase"], examples)) or original(
        examples, keys)
    trainer.train()
    sft_ids, train_ids = {id(e) for e in sft.examples}, {id(e) for e in train.examples}
    by_phase = {}
    for phase, examples in seen:
        by_phase.setdefault(phase, []).extend(id(e) for e in examples)
    assert len(by_phase["sft"]) == 8 and set(by_phase["sft"]) <= sft_ids
    assert len(by_phase["grounding"]) == 4 and set(by_phase["grounding"]) <= train_ids
    assert trainer.sft_order.state_dict()["position"] == 8 and trainer.order.state_dict()["position"] == 4
    report = json.loads((tmp_path / "skipped_samples.json").read_text())
    assert report["sft"]["total"] == 10 and report["train"]["total"] == 6


def test_resume_with_separate_sft_data_is_bit_exact(pools, tmp_path):
    full = _trainer(tmp_path / "full", pools)
    full.train(stop_at_step=4)
    first = _trainer(tmp_path / "split", pools)
    first.train(stop_at_step=1)  # inside the warm-up: both data orders must come back
    second = _trainer(tmp_path / "split", pools)
    second.train(resume=True, stop_at_step=4)
    assert second.state["global_step"] == full.state["global_step"] == 4
    assert second.sft_order.state_dict() == full.sft_order.state_dict()
    assert second.order.state_dict() == full.order.state_dict()
    reference = dict(full.model.named_parameters())
    assert all(torch.equal(reference[name], p) for name, p in second.model.named_parameters())


def test_resume_with_sft_data_from_a_run_without_it_fails_clearly(pools, tmp_path):
    _trainer(tmp_path, pools, with_sft=False).train(stop_at_step=1)
    with pytest.raises(ValueError, match="without separate sft_data"):
        _trainer(tmp_path, pools).train(resume=True)


def test_sft_data_must_be_usable(pools, tmp_path):
    train, _ = pools
    with pytest.raises(ValueError, match="sft_data"):
        _trainer(tmp_path, (train, []))


def test_preset_with_a_separate_sft_set_runs_from_the_cli(tmp_path, monkeypatch, capsys):
    tiny = cli.PresetSpec(
        description="test", train_samples=4, eval_samples=2, sft_samples=6, image_size=IMAGE_SIZE,
        config=dict(sft_steps=2, sft_batch_size=4, grounding_steps=1, sparse_steps=1, prompts_per_step=2,
                    group_size=2, sparse_group_size=2, max_new_tokens=8, eval_batch_size=4, dynamic_sampling=True,
                    max_sampling_rounds=2))
    monkeypatch.setitem(cli.PRESETS, "tiny-test", tiny)
    assert cli.train_main(["--preset", "tiny-test", "--output-dir", str(tmp_path), "--no-progress"]) == 0
    data = tmp_path / "data"
    sft, train = (json.loads((data / f"{split}.json").read_text()) for split in ("sft", "train"))
    assert len(sft) == 6 and len(train) == 4
    # the warm-up set is the scans a preset without a separate SFT set trains on (seed 2s+1), GRPO gets new ones
    monkeypatch.setitem(cli.PRESETS, "tiny-test", dataclasses.replace(tiny, sft_samples=0, train_samples=6))
    plain_train, _, plain_sft = cli._write_phantom(tmp_path / "plain", cli.PRESETS["tiny-test"], seed=0)
    assert plain_sft is None
    strip = lambda records: [{k: v for k, v in r.items() if k != "image_path"} for r in records]  # noqa: E731
    assert strip(json.loads(plain_train.read_text())) == strip(sft)
    assert strip(train) != strip(sft)[:4]
    assert "after stage 2" in (tmp_path / "summary.md").read_text()
    assert "sparse-token accuracy" in capsys.readouterr().out


def test_jitter_boxes_moves_and_resizes_within_bounds():
    from vitos_ext.rewards import box_iou
    from vitos_ext.trainer.data import jitter_boxes

    boxes = [[0.3, 0.3, 0.45, 0.42], [0.0, 0.9, 0.08, 1.0]]
    assert jitter_boxes(boxes, 0.0, torch.Generator().manual_seed(0)) == boxes
    first = jitter_boxes(boxes, 0.5, torch.Generator().manual_seed(3))
    assert first == jitter_boxes(boxes, 0.5, torch.Generator().manual_seed(3)) and first != boxes
    mean_iou = {}
    for amount in (0.1, 0.5):
        generator = torch.Generator().manual_seed(1)
        ious = []
        for _ in range(300):
            for box, gold in zip(jitter_boxes(boxes, amount, generator), boxes):
                assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
                ious.append(float(box_iou(torch.tensor([box]), torch.tensor([gold]))[0, 0]))
        mean_iou[amount] = sum(ious) / len(ious)
    assert 0.25 < mean_iou[0.5] < mean_iou[0.1] < 1.0
    with pytest.raises(ValueError, match="amount"):
        jitter_boxes(boxes, 1.5, torch.Generator())


def test_sft_box_jitter_changes_only_the_sparse_rows_and_is_keyed_on_the_row(pools, tmp_path):
    train, _ = pools
    from vitos_ext.trainer.rollout import visual_token_counts

    examples = [train[i] for i in range(6)]
    masks = {}
    for jitter in (0.0, 0.9):
        trainer = _trainer(tmp_path / str(jitter), pools, sft_sparse_fraction=0.5, sft_box_jitter=jitter)
        prompt = trainer.encoder.batch(examples)
        counts = visual_token_counts(prompt.image_grid_thw, trainer.merge_size)
        keep = trainer._sft_selection(examples, prompt).keep
        masks[jitter] = list(torch.split(keep, counts))
        # the same global rows give the same boxes however the batch is split (data-parallel shards)
        tail = trainer._sft_selection(examples[3:], prompt.select([3, 4, 5]), first_row=3, total_rows=6).keep
        assert torch.equal(tail, torch.cat(masks[jitter][3:]))
    for row in range(3):  # full-token rows keep everything
        assert masks[0.0][row].all() and masks[0.9][row].all()
    assert any(not torch.equal(masks[0.0][row], masks[0.9][row]) for row in range(3, 6))
    with pytest.raises(ValueError, match="sft_box_jitter"):
        TrainerConfig(sft_box_jitter=-0.1)
