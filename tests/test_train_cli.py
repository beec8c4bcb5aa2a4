"""`vitos-ext train --model DIR`: a user's own checkpoint folder, trained on its device with float32 master weights
(bf16 autocast on CUDA), optionally as LoRA adapters; bad options get one clear line and exit code 2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from vitos_ext.data import write_phantom_dataset
from vitos_ext.tiny import build_tiny_model, build_tiny_processor, save_tiny_assets
from vitos_ext.trainer.cli import LORA_TARGETS, _load_policy, build_parser, train_main, training_device

IMAGE_SIZE = 56
TINY_RUN = ["--set", "sft_steps=1", "--set", "sft_batch_size=2", "--set", "grounding_steps=1", "--set",
            "sparse_steps=1", "--set", "prompts_per_step=2", "--set", "group_size=2", "--set", "max_new_tokens=12",
            "--set", "eval_batch_size=4", "--set", "lr=0.001", "--set", "sft_lr=0.001", "--no-progress"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    processor = build_tiny_processor(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE)
    folder = save_tiny_assets(root / "model", processor=processor, model=build_tiny_model(seed=0))
    train = write_phantom_dataset(root / "data", 8, seed=5, image_size=IMAGE_SIZE, split="train")
    return folder, train


def _weights(folder) -> dict[str, torch.Tensor]:
    """The parameters of the model saved in `folder` (the file's own key names differ between writers)."""
    return dict(Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype="auto").state_dict())


def test_full_fine_tuning_of_a_checkpoint_folder(checkpoint, tmp_path):
    folder, train = checkpoint
    assert train_main(["--model", str(folder), "--train-file", str(train), "--output-dir", str(tmp_path),
                       "--device", "cpu", *TINY_RUN]) == 0
    before, after = _weights(folder), _weights(tmp_path / "final")
    assert before.keys() == after.keys() and all(t.dtype == torch.float32 for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "config.json").read_text())["mixed_precision"] == "auto"


def test_lora_adapters_on_the_language_model_only(checkpoint, tmp_path):
    folder, train = checkpoint
    assert train_main(["--model", str(folder), "--train-file", str(train), "--output-dir", str(tmp_path),
                       "--device", "cpu", "--lora-rank", "4", *TINY_RUN]) == 0
    adapter = json.loads((tmp_path / "final" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["target_modules"] == LORA_TARGETS
    before, after = _weights(folder), _weights(tmp_path / "final")  # final/: adapters merged into the weights
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("language_model.layers." in k and k.endswith("proj.weight") for k in changed)


def test_gradient_checkpointing_with_lora(checkpoint, tmp_path):
    folder, train = checkpoint
    args = build_parser().parse_args(["--model", str(folder), "--device", "cpu", "--lora-rank", "2",
                                      "--gradient-checkpointing", "--no-progress"])
    model, _ = _load_policy(args)
    layers = model.get_base_model().model.language_model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert train_main(["--model", str(folder), "--train-file", str(train), "--output-dir", str(tmp_path),
                       "--device", "cpu", "--lora-rank", "2", "--gradient-checkpointing", *TINY_RUN]) == 0
    assert (tmp_path / "final" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("flag, strategy", [([], "ddp"), (["--fsdp"], "fsdp2")])
def test_data_parallel_strategy_reaches_the_trainer(checkpoint, tmp_path, monkeypatch, flag, strategy):
    import vitos_ext.trainer.cli as cli

    seen = []

    class Recording(cli.DualStreamGRPOTrainer):
        def __init__(self, *args, distributed=None, **kwargs):
            seen.append(distributed)
            super().__init__(*args, distributed=distributed, **kwargs)

    monkeypatch.setattr(cli, "DualStreamGRPOTrainer", Recording)
    folder, train = checkpoint
    assert train_main(["--model", str(folder), "--train-file", str(train), "--output-dir", str(tmp_path),
                       "--device", "cpu", *flag, *TINY_RUN, "--set", "sparse_steps=0", "--set",
                       "grounding_steps=0"]) == 0
    assert [config.strategy for config in seen] == [strategy]


@pytest.mark.parametrize("flag, strategy", [([], "ddp"), (["--fsdp"], "fsdp2")])
def test_the_command_under_torchrun_trains_on_two_processes(checkpoint, tmp_path, flag, strategy):
    """What a multi-GPU user types, on two CPU processes (gloo): `torchrun -m vitos_ext.cli train --model ...`."""
    folder, train = checkpoint
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "vitos_ext.cli", "train", "--model", str(folder), "--train-file",
               str(train), "--output-dir", str(tmp_path), "--device", "cpu", *flag, *TINY_RUN]
    launched = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    output = launched.stdout + launched.stderr
    assert launched.returncode == 0, output[-6000:]
    for rank in (0, 1):
        assert f"data parallel: rank {rank} of 2 ({strategy}, gloo backend)" in output
    before, after = _weights(folder), _weights(tmp_path / "final")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records] == [1, 2, 3]  # rank 0 alone logs: SFT, stage 1, stage 2


def test_tiny_model_spec_and_bfloat16_weights_train(checkpoint, tmp_path, caplog):
    _, train = checkpoint
    assert train_main(["--model", "tiny", "--train-file", str(train), "--output-dir", str(tmp_path),
                       "--device", "cpu", "--dtype", "bfloat16", *TINY_RUN]) == 0
    assert "trainable parameters in torch.bfloat16: AdamW updates smaller than ~1/256" in caplog.text
    assert all(t.dtype == torch.bfloat16 for t in _weights(tmp_path / "final").values())


@pytest.mark.parametrize("arguments, message", [
    (["--model", "{missing}"], "--model: no such directory"),
    (["--model", "{folder}", "--device", "cuda:0"] if not torch.cuda.is_available() else
     ["--model", "{folder}", "--device", "nonsense"], "--device"),
    (["--model", "{folder}", "--lora-rank", "-1"], "--lora-rank must be >= 0"),
    (["--model", "{folder}", "--lora-rank", "2", "--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--model", "{folder}", "--lora-rank", "2", "--lora-targets", "nothing_matches"], "--lora-targets"),
    (["--model", "{text_only}"], "vitos_ext supports"),
])
def test_bad_options_fail_with_one_clear_line(checkpoint, tmp_path, capsys, arguments, message):
    folder, train = checkpoint
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    names = {"missing": tmp_path / "missing", "folder": folder, "text_only": text_only}
    arguments = [a.format(**names) for a in arguments]
    assert train_main([*arguments, "--train-file", str(train), "--output-dir", str(tmp_path / "out"), *TINY_RUN]) == 2
    error = capsys.readouterr().err.strip()
    assert "Traceback" not in error
    last = error.splitlines()[-1]
    assert last.startswith("vitos-ext train: error:") and message in last


def test_a_preset_refuses_options_of_model_runs(capsys):
    assert train_main(["--preset", "tiny-phantom", "--lora-rank", "4", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "--device, --lora-rank" in error and "options of --model runs" in error


def test_training_device_defaults_and_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert training_device(None) == expected
    assert training_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert training_device("cuda") == torch.device("cuda", 0)


@pytest.mark.cuda
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_training_on_cuda_runs_bf16_autocast_and_the_packed_forward(checkpoint, tmp_path, caplog, monkeypatch,
                                                                    lora):
    """The default GPU run: cuda:LOCAL_RANK, float32 master weights under bf16 autocast, the packed varlen training
    forward (also for a LoRA policy), and a final folder that loads back."""
    import logging

    import vitos_ext.trainer.logprobs as logprobs

    monkeypatch.setattr(logprobs, "_FALLBACK_REPORTED", set())  # each fallback reason is logged once per process
    folder, train = checkpoint
    caplog.set_level(logging.INFO, logger="vitos_ext.trainer")
    assert train_main(["--model", str(folder), "--train-file", str(train), "--output-dir", str(tmp_path),
                       *(["--lora-rank", "4"] if lora else []), *TINY_RUN]) == 0
    assert "forwards under torch.autocast(torch.bfloat16)" in caplog.text
    assert "falls back to the padded layout" not in caplog.text
    final = _weights(tmp_path / "final")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in final.values())
