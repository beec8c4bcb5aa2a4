"""Data-parallel trainer (vitos_ext/trainer/distributed.py) on CPU with gloo: 2 processes launched by torchrun give
the result of 1 process with the same global batch; a 2-process run resumes exactly; FSDP2 matches too.

One torchrun launch (this file is also the worker script: ``python -m torch.distributed.run --nproc_per_node 2
tests/test_distributed.py ROOT``) runs three scenarios in the same process group -- DDP end to end, DDP stopped after
2 steps and resumed, FSDP2 end to end -- and the module fixture compares them with a single-process run of the same
configuration in the pytest process. Every run records the *global* rewards, group ids and advantages of each GRPO
update (the arrays the advantage computation sees), so rollouts, rewards and advantages are compared element-wise,
and the final parameters within float tolerance.

The configuration exercises what sharding can get wrong: an SFT batch whose token-sparse rows all sit on rank 1,
the "alternate" schedule (grounding update, fresh sparse rollouts, sparse update), G x G' sparse groups,
cross-feedback, two updates per batch (old log-probs), a KL reference (beta > 0), resume in the middle of a phase,
and a sharded held-out evaluation.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 56
TOTAL_STEPS = 3  # 1 SFT step + 2 "alternate" GRPO steps
RESUME_AT = 2


# ----------------------------------------------------------------------------------------------------------------
# shared by the pytest process and the torchrun workers


def _config(output_dir: Path, **changes):
    from vitos_ext.trainer import TrainerConfig

    base = dict(output_dir=str(output_dir), seed=1, schedule="alternate", sft_steps=1, sft_batch_size=4,
                sft_lr=1e-3, sft_sparse_fraction=0.5, alternate_steps=2, prompts_per_step=4, group_size=2,
                sparse_group_size=2, updates_per_batch=2, mini_batch_size=None, lr=1e-3, beta=0.05,
                advantage_scale="batch", max_new_tokens=10, grounding_rewards={"cross": 0.5}, eval_batch_size=4,
                eval_max_samples=3, progress=False, num_threads=1)
    return TrainerConfig(**{**base, **changes})


def _text_dependent_terms(texts, examples, sizes):
    """Rewards that depend on the sampled text, so GRPO steps of an untrained model move the weights."""
    values = torch.tensor([(sum(map(ord, text)) % 7) / 6 for text in texts], dtype=torch.float32)
    return (values > 0.5).float(), values, (values < 0.3).float()


def _constant_for_even_rows(texts, examples, sizes):
    """Text-dependent rewards, except that every rollout of an even-indexed row gets the same reward (its group is
    uninformative, so dynamic sampling has to sample further rounds)."""
    format_, iou, accuracy = _text_dependent_terms(texts, examples, sizes)
    even = torch.tensor([e.sample.index % 2 == 0 for e in examples])
    return torch.where(even, 1.0, format_), torch.where(even, 0.0, iou), torch.where(even, 1.0, accuracy)


def _run(output_dir: Path, data_dir: Path, *, distributed=None, stop_at_step=None, resume=False, layout="packed",
         terms=_text_dependent_terms, config=None):
    """Train the tiny model; returns (trainer, records of every group_advantages call on the global batch)."""
    import vitos_ext.trainer.evaluate as evaluate_module
    import vitos_ext.trainer.trainer as trainer_module
    from vitos_ext.tiny import build_tiny_model, build_tiny_processor
    from vitos_ext.trainer import DualStreamGRPOTrainer, prepare_training_data

    records = []
    original_advantages, original_terms = trainer_module.group_advantages, trainer_module.basic_terms
    original_eval_terms = evaluate_module.basic_terms

    def recording(rewards, group_ids, *args, **kwargs):
        advantages = original_advantages(rewards, group_ids, *args, **kwargs)
        records.append({"rewards": rewards.tolist(), "group_ids": group_ids.tolist(),
                        "advantages": advantages.tolist()})
        return advantages

    trainer_module.group_advantages, trainer_module.basic_terms = recording, terms
    evaluate_module.basic_terms = _text_dependent_terms
    try:
        processor = build_tiny_processor(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE)
        model = build_tiny_model(seed=2, attn_implementation="eager")
        train = prepare_training_data(data_dir / "train.json")
        test = prepare_training_data(data_dir / "test.json")
        trainer = DualStreamGRPOTrainer(model, processor, train, _config(output_dir, **(config or {})), eval_data=test,
                                        distributed=distributed, row_seeded_sampling=True, forward_layout=layout)
        trainer.train(resume=resume, stop_at_step=stop_at_step)
    finally:
        trainer_module.group_advantages, trainer_module.basic_terms = original_advantages, original_terms
        evaluate_module.basic_terms = original_eval_terms
    return trainer, records


def _full_state(trainer) -> dict[str, torch.Tensor]:
    state = trainer.dist.model_state_dict(trainer.model)  # gathered under FSDP2 (collective), None otherwise
    state = state if state is not None else trainer.model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _worker(root: Path) -> None:
    """The torchrun entry point: DDP, DDP + resume, FSDP2, each writing its results from rank 0."""
    import torch.distributed as dist

    from vitos_ext.trainer.distributed import DistributedConfig

    torch.set_num_threads(1)
    data_dir = root / "data"
    fsdp2 = DistributedConfig(strategy="fsdp2")
    scenarios = [("ddp", None, {}), ("ddp_resume", None, {"stop_at_step": RESUME_AT}),
                 ("ddp_resume", None, {"resume": True}), ("ddp_padded", None, {"layout": "padded"}),
                 ("fsdp2", fsdp2, {}), ("fsdp2_resume", fsdp2, {"stop_at_step": RESUME_AT}),
                 ("fsdp2_resume", fsdp2, {"resume": True}),
                 ("ddp_dynamic", None, {"config": {"dynamic_sampling": True, "max_sampling_rounds": 3},
                                        "terms": _constant_for_even_rows}),
                 ("fsdp2_dynamic", fsdp2, {"config": {"dynamic_sampling": True, "max_sampling_rounds": 3},
                                           "terms": _constant_for_even_rows})]
    info = {}
    for name, distributed, options in scenarios:
        trainer, records = _run(root / name, data_dir, distributed=distributed, **options)
        state = _full_state(trainer)
        rank = trainer.dist.rank
        info[name] = {"rank": rank, "world_size": trainer.dist.world_size, "strategy": trainer.dist.strategy,
                      "is_main": trainer.is_main, "metrics_sink": type(trainer.metrics).__name__,
                      "global_step": trainer.state["global_step"], "row_seeded": trainer.row_seeded_sampling,
                      "layout": trainer.forward_layout, "expected_layout": options.get("layout", "packed"),
                      "data_position": trainer.order.state_dict()["position"]}
        if trainer.is_main and not options.get("stop_at_step"):
            torch.save(state, root / name / "final_state.pt")
            (root / name / "advantages.json").write_text(json.dumps(records))
            (root / name / "eval.json").write_text(json.dumps(trainer.state["eval_results"]))
    # a NaN reward on rank 1 only, at the first GRPO step: both ranks must stop there, none may hang
    from vitos_ext.trainer import NonFiniteError

    def nan_on_rank_one(texts, examples, sizes):
        format_, iou, accuracy = _text_dependent_terms(texts, examples, sizes)
        return format_, iou * (float("nan") if dist.get_rank() == 1 else 1.0), accuracy

    try:
        _run(root / "nan", data_dir, terms=nan_on_rank_one)
        info["nan"] = {"error": None}
    except NonFiniteError as error:
        info["nan"] = {"error": str(error)}
    (root / f"rank{dist.get_rank()}.json").write_text(json.dumps(info))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# fixture: one torchrun launch + one single-process run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from vitos_ext.data import write_phantom_dataset

    root = tmp_path_factory.mktemp("distributed")
    data_dir = root / "data"
    write_phantom_dataset(data_dir, 8, seed=5, image_size=IMAGE_SIZE, split="train")  # data/train.json
    write_phantom_dataset(data_dir, 4, seed=6, image_size=IMAGE_SIZE, split="test")  # data/test.json

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), str(Path(__file__).resolve()), str(root)]
    launched = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, f"torchrun failed:\n{launched.stdout[-4000:]}\n{launched.stderr[-8000:]}"

    threads = torch.get_num_threads()
    try:
        single, single_records = _run(root / "single", data_dir)
    finally:
        torch.set_num_threads(threads)  # the config's num_threads=1 must not leak into later tests
    return {"root": root, "single": single, "single_state": _full_state(single), "single_records": single_records,
            "stdout": launched.stdout + launched.stderr}


def _load(root: Path, name: str):
    state = torch.load(root / name / "final_state.pt", weights_only=True)
    records = json.loads((root / name / "advantages.json").read_text())
    return state, records


def _assert_same_records(got: list[dict], expected: list[dict]) -> None:
    """Global rewards, group ids and advantages of every GRPO update, element-wise."""
    assert len(got) == len(expected) == 4  # 2 alternate steps x (grounding update, sparse update)
    for g, e in zip(got, expected):
        assert g["group_ids"] == e["group_ids"]
        assert g["rewards"] == e["rewards"]  # same rollouts -> the same texts -> bit-identical rewards
        torch.testing.assert_close(torch.tensor(g["advantages"]), torch.tensor(e["advantages"]), rtol=0, atol=1e-6)
    assert any(abs(a) > 0.1 for record in expected for a in record["advantages"])  # the updates do move weights


def _assert_close_states(got: dict, expected: dict) -> None:
    """Final parameters: the training update (final - initial) agrees to 1e-4 of its norm over all parameters, and
    to 1e-2 tensor by tensor.

    Adam divides by the root of the second moment, so round-off in a gradient that is zero in exact arithmetic
    (e.g. a key-projection bias, to which softmax is invariant) becomes a learning-rate-sized step of noise; summing
    over ranks changes that round-off. Those tensors agree only loosely; the update as a whole must agree tightly.
    """
    from vitos_ext.tiny import build_tiny_model

    initial = build_tiny_model(seed=2).state_dict()
    assert got.keys() == expected.keys() == initial.keys()
    errors, norms = [], []
    for name in expected:
        update, reference = got[name] - initial[name], expected[name] - initial[name]
        errors.append(float((update - reference).norm()) ** 2)
        norms.append(float(reference.norm()) ** 2)
        assert errors[-1] ** 0.5 <= 1e-2 * norms[-1] ** 0.5 + 1e-7, (name, errors[-1] ** 0.5, norms[-1] ** 0.5)
    assert sum(errors) ** 0.5 <= 1e-4 * sum(norms) ** 0.5, (sum(errors) ** 0.5, sum(norms) ** 0.5)


# ----------------------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("name", ["ddp", "ddp_padded"])
def test_two_ddp_processes_match_one_process(runs, name):
    state, records = _load(runs["root"], name)  # packed (the single-process run's layout) and padded forwards
    _assert_same_records(records, runs["single_records"])
    _assert_close_states(state, runs["single_state"])
    from vitos_ext.tiny import build_tiny_model

    initial = build_tiny_model(seed=2).state_dict()
    moved = sum(float((runs["single_state"][k] - initial[k]).abs().max()) > 1e-3 for k in initial)
    assert moved > len(initial) // 2  # training changed most tensors: agreement is not trivially "nothing moved"


def test_sharded_evaluation_equals_one_process(runs):
    ddp = json.loads((runs["root"] / "ddp" / "eval.json").read_text())
    single = runs["single"].state["eval_results"]
    assert list(ddp) == list(single) == ["after SFT", "after alternate"]
    for label in single:  # 3 samples on 2 ranks: 2 + 1, combined by sample counts
        assert ddp[label]["num_samples"] == single[label]["num_samples"] == 3
        for key in ("iou", "accuracy_full", "format_full", "accuracy_sparse", "format_sparse", "kept_ratio"):
            assert ddp[label][key] == pytest.approx(single[label][key], abs=1e-6), (label, key)
    assert len({round(single[label]["iou"], 6) for label in single} | {0.0, 1.0}) > 2  # not a trivial 0 or 1


def test_two_process_resume_equals_uninterrupted_run(runs):
    resumed, resumed_records = _load(runs["root"], "ddp_resume")
    full, _ = _load(runs["root"], "ddp")
    assert all(torch.equal(resumed[k], full[k]) for k in full), "2-process resume is not bit-exact"
    # the resumed half recorded only the updates after the checkpoint: the last step's two updates
    _assert_same_records(runs["single_records"][:2] + resumed_records, runs["single_records"])
    checkpoints = runs["root"] / "ddp_resume" / "checkpoints"
    assert (checkpoints / f"alternate-step-{RESUME_AT:06d}" / "rng_ranks.pt").is_file()
    assert len(torch.load(checkpoints / f"alternate-step-{RESUME_AT:06d}" / "rng_ranks.pt", weights_only=True)) == 2


def test_fsdp2_matches_one_process_and_resumes_exactly(runs):
    state, records = _load(runs["root"], "fsdp2")
    _assert_same_records(records, runs["single_records"])
    _assert_close_states(state, runs["single_state"])
    resumed, _ = _load(runs["root"], "fsdp2_resume")
    assert all(torch.equal(resumed[k], state[k]) for k in state), "FSDP2 resume is not bit-exact"
    # the mid-phase checkpoint holds the full (gathered) weights and the full optimizer state
    checkpoint = runs["root"] / "fsdp2_resume" / "checkpoints" / f"alternate-step-{RESUME_AT:06d}"
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in state.items()}
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert optimizer["state"] and all(v["exp_avg"].shape == weights[k.removeprefix("policy.")].shape
                                      for k, v in optimizer["state"].items())


def test_rank_zero_alone_writes_and_logs(runs):
    from vitos_ext.trainer import read_metrics

    ranks = [json.loads((runs["root"] / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, info in enumerate(ranks):
        for name, run in info.items():
            if name == "nan":
                continue
            assert run["rank"] == rank and run["world_size"] == 2 and run["row_seeded"]
            assert run["is_main"] == (rank == 0)
            assert run["metrics_sink"] == ("MetricsLogger" if rank == 0 else "_NoMetrics")
            assert run["strategy"] == ("fsdp2" if name.startswith("fsdp2") else "ddp")
            assert run["global_step"] == TOTAL_STEPS and run["layout"] == run["expected_layout"]
    single = read_metrics(runs["root"] / "single" / "metrics.jsonl")
    for name in ("ddp", "ddp_resume", "ddp_padded", "fsdp2", "fsdp2_resume"):
        records = read_metrics(runs["root"] / name / "metrics.jsonl")
        assert [r["global_step"] for r in records] == [r["global_step"] for r in single]  # one line per step
        for got, expected in zip(records, single):
            for key in ("grounding/reward/total", "sparse/reward/total", "sparse/kept_ratio", "grounding/loss",
                        "sparse/loss", "grounding/advantage_abs_mean", "sft/loss", "sft/grad_norm",
                        "grounding/grad_norm", "sparse/grad_norm", "grounding/clip_high_fraction",
                        "sparse/kl_mean", "grounding/completion_length", "sparse/truncated_fraction"):
                if key in expected:
                    assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), (name, key)
        assert (runs["root"] / name / "final" / "model.safetensors").is_file()


def test_a_nan_reward_on_one_rank_stops_every_rank_at_the_same_step(runs):
    errors = [json.loads((runs["root"] / f"rank{r}.json").read_text())["nan"]["error"] for r in range(2)]
    assert errors[1] is not None and "non-finite grounding reward" in errors[1]
    assert errors[0] is not None and "non-finite reward on another rank" in errors[0]
    for error in errors:
        assert "training stopped at global step 1" in error and "sft-final" in error
    failure = json.loads((runs["root"] / "nan" / "FAILED.json").read_text())  # written by rank 0 alone
    assert failure["global_step"] == 1 and failure["last_good_checkpoint"].endswith("sft-final")


# ----------------------------------------------------------------------------------------------------------------
# in-process units


@pytest.mark.parametrize("name", ["ddp_dynamic", "fsdp2_dynamic"])
def test_dynamic_sampling_runs_data_parallel_with_the_same_rounds_on_every_rank(runs, name):
    from vitos_ext.trainer import read_metrics

    root = runs["root"]
    infos = [json.loads((root / f"rank{r}.json").read_text())[name] for r in (0, 1)]
    assert [info["global_step"] for info in infos] == [3, 3]  # 1 SFT + 2 alternate steps, no rank hung
    assert infos[0]["data_position"] == infos[1]["data_position"]  # the same number of rounds drew the same prompts
    records = [r for r in read_metrics(root / name / "metrics.jsonl") if r.get("phase") == "alternate"
               and "eval/label" not in r]
    assert len(records) == 2 and all(1 <= r["sampling/rounds"] <= 3 for r in records)
    assert max(r["sampling/rounds"] for r in records) >= 2  # half of the prompts teach nothing: more rounds ran
    _, advantages = _load(root, name)
    # every update trains on exactly prompts_per_step = 4 prompts: 8 grounding rows, 16 sparse rows (global)
    assert [len(r["group_ids"]) for r in advantages] == [8, 16, 8, 16]
    assert [len(set(r["group_ids"])) for r in advantages] == [4, 4, 4, 4]


def test_shard_and_split_cover_the_batch_disjointly():
    from vitos_ext.trainer.distributed import DataParallel

    class Rank(DataParallel):
        def __init__(self, rank, world):
            self.rank, self.world_size = rank, world

    for world in (1, 2, 3, 4):
        for count in (0, 1, 5, 12):
            parts = [Rank(r, world).split(count) for r in range(world)]
            assert [i for a, b in parts for i in range(a, b)] == list(range(count))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1
        parts = [Rank(r, world).shard(12, "prompts_per_step") for r in range(world)]
        assert [i for a, b in parts for i in range(a, b)] == list(range(12))
    with pytest.raises(ValueError, match="prompts_per_step=6 must be divisible by the number of processes \\(4\\)"):
        Rank(0, 4).shard(6, "prompts_per_step")
    single = DataParallel()
    assert single.loss_normalizer(7) is None and single.mean({"a": 2.0}, weight=3) == {"a": 2.0}
    assert single.gather(torch.arange(3)).tolist() == [0, 1, 2] and not single.distributed


def test_distributed_config_errors_name_the_field():
    from vitos_ext.trainer.distributed import DistributedConfig

    with pytest.raises(ValueError, match="strategy"):
        DistributedConfig(strategy="zero3")
    with pytest.raises(ValueError, match="backend"):
        DistributedConfig(backend="mpi")


def test_row_seeded_sampling_does_not_depend_on_batching(tmp_path):
    from vitos_ext.data import write_phantom_dataset
    from vitos_ext.tiny import build_tiny_model, build_tiny_processor
    from vitos_ext.trainer import prepare_training_data
    from vitos_ext.trainer.batching import PromptEncoder
    from vitos_ext.trainer.rollout import SamplingSettings, generate_completions, rollout_row_seeds

    data = prepare_training_data(write_phantom_dataset(tmp_path, 3, seed=2, image_size=IMAGE_SIZE, split="train"))
    processor = build_tiny_processor(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE)
    model = build_tiny_model(seed=4, attn_implementation="eager")
    encoder = PromptEncoder(processor)
    batch = encoder.batch([data[0], data[1], data[2]])
    settings = SamplingSettings(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95, top_k=40)
    seeds = rollout_row_seeds(1, 3, 0, [10, 11, 12])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        together, _ = generate_completions(model, batch, settings, row_seeds=seeds)
        chunked, _ = generate_completions(model, batch, SamplingSettings(**{**settings.__dict__, "batch_size": 2}),
                                          row_seeds=seeds)
        alone, _ = generate_completions(model, encoder.batch([data[2]]), settings, row_seeds=seeds[2:])
        other, _ = generate_completions(model, batch, settings, row_seeds=rollout_row_seeds(1, 4, 0, [10, 11, 12]))
    finally:
        torch.set_num_threads(threads)
    assert [t.tolist() for t in together] == [t.tolist() for t in chunked]
    assert together[2].tolist() == alone[0].tolist()
    assert [t.tolist() for t in other] != [t.tolist() for t in together]
    assert len({tuple(t.tolist()) for t in together}) == 3
    assert rollout_row_seeds(1, 3, 0, [12]).tolist() == seeds[2:].tolist()
    with pytest.raises(ValueError, match="row_seeds"):
        generate_completions(model, batch, settings, row_seeds=seeds[:2])


def test_row_seeded_sampler_draws_from_the_warped_softmax():
    from vitos_ext.trainer.rollout import RowSeededSampler, rollout_row_seeds

    draws = 40000
    scores = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
    temperature, top_p = 0.8, 0.9
    seeds = rollout_row_seeds(0, 0, 0, torch.arange(draws))
    sampler = RowSeededSampler(seeds, temperature=temperature, top_p=top_p)
    out = sampler(torch.zeros(draws, 1, dtype=torch.long), scores.expand(draws, -1).clone())
    assert torch.isinf(out).sum(1).eq(5).all() and out.max(1).values.eq(0).all()
    counts = torch.bincount(out.argmax(1), minlength=6).double()
    # what generate(do_sample=True) samples from: temperature, then top-p filtering, then softmax
    probs = torch.softmax(scores / temperature, 0)
    ordered, order = probs.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < top_p
    expected = torch.zeros(6, dtype=torch.float64)
    expected[order[keep]] = probs[order[keep]].double()
    expected /= expected.sum()
    assert counts[expected == 0].sum() == 0
    nonzero = expected > 0
    chi2 = float((((counts - draws * expected) ** 2)[nonzero] / (draws * expected[nonzero])).sum())
    assert chi2 < 20.5, chi2  # 99.9% quantile of chi-square with <= 4 degrees of freedom is 18.5
    assert math.isfinite(chi2)


if __name__ == "__main__":  # the torchrun worker
    _worker(Path(sys.argv[1]))
