"""Experiment trackers of the trainer (TrainerConfig.report_to): TensorBoard event files read back with TensorBoard's
own reader, the W&B wiring against a recording stand-in for the wandb module (no account, no network), the config
and CLI options, and a short training run reporting to both."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # requirements-dev.txt

from vitos_ext.data import write_phantom_dataset
from vitos_ext.trainer import DualStreamGRPOTrainer, TrainerConfig, prepare_training_data
from vitos_ext.trainer.cli import _tracker_options, build_parser
from vitos_ext.trainer.metrics import MetricsLogger, TensorBoardSink, WandbSink, make_sinks, read_metrics


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series TensorBoard shows for ``log_dir`` (purged events hidden, as in its UI)."""
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


class _RecordingRun:
    def __init__(self, calls: list):
        self.calls = calls

    def define_metric(self, name, step_metric=None):
        self.calls.append(("define_metric", name, step_metric))

    def log(self, data):
        self.calls.append(("log", dict(data)))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in ``wandb`` module that records init / define_metric / log / finish."""
    calls: list = []
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries probe find_spec("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return _RecordingRun(calls)

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


# ----------------------------------------------------------------------------------------------------------------
# configuration and command line


def test_report_to_accepts_lists_and_comma_separated_names():
    assert TrainerConfig().report_to == ()
    assert TrainerConfig(report_to="tensorboard, WandB").report_to == ("tensorboard", "wandb")
    assert TrainerConfig(report_to=["wandb", "wandb"]).report_to == ("wandb",)
    assert TrainerConfig(report_to="none").report_to == ()
    config = TrainerConfig(report_to=["tensorboard"], run_name="ablation-3")
    assert TrainerConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("changes, field", [
    (dict(report_to=["mlflow"]), "report_to"),
    (dict(report_to=3), "report_to"),
    (dict(report_to=["tensorboard", 1]), "report_to"),
    (dict(run_name=" "), "run_name"),
    (dict(run_name=7), "run_name"),
])
def test_bad_tracker_settings_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        TrainerConfig(**changes)


def test_cli_tracker_options_become_config_fields():
    parser = build_parser()
    args = parser.parse_args(["--preset", "tiny-phantom", "--report-to", "tensorboard", "wandb", "--run-name", "r1"])
    assert _tracker_options(args) == {"report_to": ["tensorboard", "wandb"], "run_name": "r1"}
    assert _tracker_options(parser.parse_args(["--preset", "tiny-phantom"])) == {}  # a --config file's value stays
    with pytest.raises(SystemExit):
        parser.parse_args(["--report-to", "mlflow"])


def test_a_missing_tracker_package_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        make_sinks(["wandb"], tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        make_sinks(["tensorboard"], tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# the sinks


def test_tensorboard_sink_writes_finite_numbers_and_hides_repeated_steps_after_resume(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb")
    for step in (1, 2, 3, 4):
        sink.log({"global_step": step, "phase_step": step, "phase": "sft", "sft/loss": float(step),
                  "sampling/informative": True, "sparse/loss": float("nan"), "eval/label": None}, step)
    sink.close()
    sink.truncate_after(2)  # a resumed run goes on from step 2 and logs steps 3 and 4 again
    for step in (3, 4, 5):
        sink.log({"global_step": step, "sft/loss": 10.0 + step}, step)
    sink.close()
    assert _scalars(tmp_path / "tb") == {"sft/loss": [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]}


def test_wandb_sink_keeps_one_run_across_resumes(fake_wandb, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "lesions")
    config = {"lr": 1e-5, "report_to": ["wandb"]}
    sink = WandbSink(tmp_path, "seed-0", config)
    sink.log({"global_step": 3, "phase": "grounding", "grounding/loss": 0.25, "sparse/loss": float("inf"),
              "sampling/informative": False}, 3)
    sink.close()
    sink.close()  # idempotent
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert run_id
    init = fake_wandb[0]
    assert init == ("init", {"project": "lesions", "name": "seed-0", "id": run_id, "resume": "allow",
                             "dir": str(tmp_path), "config": config})
    assert fake_wandb[1:] == [("define_metric", "global_step", None), ("define_metric", "*", "global_step"),
                              ("log", {"grounding/loss": 0.25, "global_step": 3}), ("finish",)]
    WandbSink(tmp_path, "seed-0", config)  # the resumed run continues the same W&B run
    assert fake_wandb[-3][1]["id"] == run_id


def test_wandb_sink_reopens_its_run_for_records_after_close(fake_wandb, tmp_path):
    sink = WandbSink(tmp_path, "seed-0", {})
    sink.close()  # what train() does at its end
    sink.log({"global_step": 9, "eval/accuracy_full": 0.5}, 9)  # e.g. trainer.evaluate() afterwards
    inits = [call[1] for call in fake_wandb if call[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[1]["resume"] == "allow"
    assert fake_wandb[-1] == ("log", {"eval/accuracy_full": 0.5, "global_step": 9})


def test_metrics_logger_feeds_every_sink_the_records_of_the_jsonl_log(tmp_path):
    class Recorder:
        def __init__(self):
            self.events = []

        def log(self, record, step):
            self.events.append(("log", step, record["x"]))

        def truncate_after(self, global_step):
            self.events.append(("truncate", global_step))

        def flush(self):
            self.events.append(("flush",))

        def close(self):
            self.events.append(("close",))

    recorder = Recorder()
    logger = MetricsLogger(tmp_path / "metrics.jsonl", [recorder])
    logger.log({"global_step": 1, "x": 0.5})
    logger.log({"global_step": 2, "x": 0.25})
    logger.truncate_after(1)
    logger.flush()
    logger.close()
    assert recorder.events == [("log", 1, 0.5), ("log", 2, 0.25), ("truncate", 1), ("flush",), ("close",)]
    assert [r["x"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0.5]


# ----------------------------------------------------------------------------------------------------------------
# a training run


def test_training_run_reports_to_tensorboard_and_wandb(fake_wandb, tmp_path):
    from vitos_ext.tiny import build_tiny_model, build_tiny_processor

    size = 56
    train = prepare_training_data(write_phantom_dataset(tmp_path / "data", 8, seed=5, image_size=size, split="train"))
    test = prepare_training_data(write_phantom_dataset(tmp_path / "data", 2, seed=6, image_size=size, split="test"))
    config = TrainerConfig(output_dir=str(tmp_path / "run"), seed=1, sft_steps=2, sft_batch_size=4, sft_lr=1e-3,
                           grounding_steps=1, sparse_steps=0, prompts_per_step=2, group_size=2, max_new_tokens=8,
                           eval_batch_size=2, progress=False, report_to="tensorboard,wandb", run_name="smoke")
    model = build_tiny_model(seed=2, attn_implementation="eager")
    processor = build_tiny_processor(min_pixels=size * size, max_pixels=size * size)
    DualStreamGRPOTrainer(model, processor, train, config, eval_data=test).train()

    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    series = _scalars(tmp_path / "run" / "tensorboard")
    assert [step for step, _ in series["sft/loss"]] == [1, 2]
    assert [step for step, _ in series["grounding/reward/total"]] == [3]
    jsonl_losses = [r["sft/loss"] for r in records if "sft/loss" in r]
    assert [value for _, value in series["sft/loss"]] == pytest.approx(jsonl_losses)
    evals = [r for r in records if "eval/label" in r]  # after SFT, stage 1 and the empty stage 2
    assert [step for step, _ in series["eval/accuracy_full"]] == [r["global_step"] for r in evals] == [2, 3, 3]

    init = fake_wandb[0][1]
    assert init["name"] == "smoke" and init["config"]["report_to"] == ["tensorboard", "wandb"]
    logged = [call[1] for call in fake_wandb if call[0] == "log"]
    assert len(logged) == len(records)  # every JSONL record, eval included
    assert [entry["global_step"] for entry in logged] == [r["global_step"] for r in records]
    assert fake_wandb[-1] == ("finish",)  # the run ends with training
