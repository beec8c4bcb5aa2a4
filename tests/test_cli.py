"""`vitos-ext demo` and `vitos-ext infer`, offline, on tiny checkpoints (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from vitos_ext import cli
from vitos_ext.demo import run_pipeline_demo
from vitos_ext.data import make_phantom_record
from vitos_ext.tiny import build_tiny_model, build_tiny_processor, save_tiny_assets

torch.set_num_threads(1)

QUESTION = "What kind of lesion is shown?\nA. hyperdense nodule\nB. hypodense cyst"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A self-contained tiny Qwen2.5-VL checkpoint folder (config, weights, tokenizer, processor)."""
    return save_tiny_assets(tmp_path_factory.mktemp("ckpt") / "tiny", model=build_tiny_model(seed=4))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    pydicom_data = pytest.importorskip("pydicom.data")
    folder = tmp_path_factory.mktemp("images")
    _, scan = make_phantom_record(0, image_size=160)
    scan.save(folder / "scan.png")
    (folder / "broken.png").write_bytes(b"not an image at all")
    return {"png": str(folder / "scan.png"), "dicom": pydicom_data.get_testdata_file("CT_small.dcm"),
            "broken": str(folder / "broken.png")}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Run in an empty folder (no outputs/tiny-phantom/final) with the hub switched off."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------------------------------------------
# demo


def test_demo_runs_end_to_end_and_writes_pngs_and_summary(offline, capsys):
    out = offline / "demo"
    assert cli.main(["demo", "--out", str(out), "--image-size", "224"]) == 0
    printed = capsys.readouterr().out
    assert "two-pass ViToS pipeline" in printed and "kept visual tokens" in printed and "pass-2 prefill" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"ops", "pipeline"}
    pipeline = summary["pipeline"]
    assert pipeline["trained"] is False and "random tiny" in pipeline["model_source"]
    assert len(pipeline["samples"]) == 2  # the phantom scan and pydicom's CT slice
    phantom, ct = pipeline["samples"]
    assert phantom["gold_answer"] in "ABCD" and phantom["gold_boxes"]
    assert "CT_small" in ct["image"]
    for sample in pipeline["samples"]:
        assert set(sample["timings_ms"]) >= {"vision", "pass1_prefill", "pass1_decode", "parse", "pass2_prefill",
                                             "pass2_decode"}
        assert 0 < sample["kept_ratio"] <= 1 and isinstance(sample["grounding_text"], str)
    oracle = pipeline["oracle"]
    assert oracle["boxes"] == [phantom["gold_boxes"]] and 0 < oracle["kept_ratio"] < 1
    for png in (out / "kept_tokens.png", *map(Path, pipeline["pngs"])):
        with Image.open(png) as picture:
            assert picture.mode == "RGB"
    with Image.open(out / "pipeline_kept_tokens_true_boxes.png") as picture:
        assert picture.size == tuple(oracle["image_sizes"][0])
    assert (out / "pipeline_kept_tokens_1.png").is_file()


def test_demo_uses_the_trained_checkpoint_when_present(offline):
    pixels = 112 * 112  # the tiny-phantom preset's processor: every image resized to 112 x 112
    final = offline / "outputs" / "tiny-phantom" / "final"
    save_tiny_assets(final, processor=build_tiny_processor(pixels, pixels), model=build_tiny_model(seed=1))
    result = run_pipeline_demo(offline / "demo", seed=3)
    assert result.trained and "trained tiny checkpoint" in result.model_source and result.oracle is None
    assert "112x112" in result.samples[0]["image"] and result.samples[0]["image_sizes"] == [(112, 112)]


def test_demo_with_model_argument(offline, checkpoint):
    result = run_pipeline_demo(offline / "demo", model_dir=str(checkpoint), image_size=112)
    assert result.trained and result.model_source == f"--model {checkpoint}"
    assert [p.name for p in result.pngs] == ["pipeline_kept_tokens_0.png", "pipeline_kept_tokens_1.png"]


def test_demo_with_a_missing_model_folder_fails_clearly(offline, capsys):
    assert cli.main(["demo", "--out", str(offline / "d"), "--model", str(offline / "nope")]) == 2
    assert "--model: no such directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# infer


def test_infer_on_a_png_and_a_dicom_prints_json(offline, checkpoint, images, capsys):
    status = cli.main(["infer", "--model", str(checkpoint), "--image", images["png"], "--image", images["dicom"],
                       "--question", QUESTION, "--max-new-tokens", "8", "--dilate", "1", "--json"])
    captured = capsys.readouterr()
    assert status == 0
    result = json.loads(captured.out)
    assert result["question"] == QUESTION and len(result["boxes"]) == 2 and len(result["image_sizes"]) == 2
    assert result["image_sizes"][1] == [140, 140]  # the 128 x 128 CT slice after the processor's resize
    assert result["visual_tokens"] == sum(t * h * w for t, h, w in result["token_grids"])
    assert "boxes_shared_across_images" in result["flags"]
    assert "loading Qwen2_5_VLForConditionalGeneration" in captured.err and "done in" in captured.err


def test_infer_prints_a_readable_summary(offline, checkpoint, images, capsys):
    status = cli.main(["infer", "--model", str(checkpoint), "--image", images["png"], "--question", QUESTION,
                       "--max-new-tokens", "4", "--dtype", "float32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert status == 0
    for expected in ("evidence boxes, image 0 (168x168 px as seen)", "kept visual tokens:", "answer:",
                     "pass 1 output:", "timings (ms): preprocess"):
        assert expected in out


def test_infer_runs_as_a_console_command_without_network(checkpoint, images, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9",
               HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "vitos_ext.cli", "infer", "--model", str(checkpoint), "--image",
                           images["dicom"], "--question", QUESTION, "--max-new-tokens", "4", "--json"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["visual_tokens"] == 25


def test_infer_merges_a_peft_adapter(offline, checkpoint, images, capsys):
    """--adapter DIR: a LoRA fine-tune of the checkpoint, merged into its weights; the answer equals the pipeline on
    the PEFT-wrapped model in process, and differs from the checkpoint alone."""
    from peft import LoraConfig, get_peft_model

    from vitos_ext.pipeline import DEFAULT_GROUNDING_PROMPT, ViToSPipeline
    from vitos_ext.pipeline_cli import load_images, load_model_and_processor

    base, processor = load_model_and_processor(checkpoint)
    wrapped = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    wrapped.save_pretrained(offline / "adapter")
    argv = ["infer", "--model", str(checkpoint), "--image", images["png"], "--question", QUESTION,
            "--max-new-tokens", "8", "--json"]
    assert cli.main([*argv, "--adapter", str(offline / "adapter")]) == 0
    with_adapter = json.loads(capsys.readouterr().out)
    assert cli.main(argv) == 0
    without = json.loads(capsys.readouterr().out)
    pipeline = ViToSPipeline(wrapped.eval(), processor, max_new_tokens=8, grounding_prompt=DEFAULT_GROUNDING_PROMPT)
    in_process = pipeline(load_images([images["png"]]), QUESTION).as_dict()
    assert with_adapter["grounding_text"] == in_process["grounding_text"]
    assert with_adapter["answer_text"] == in_process["answer_text"]
    assert (with_adapter["grounding_text"], with_adapter["answer_text"]) != (without["grounding_text"],
                                                                             without["answer_text"])
    assert cli.main([*argv, "--adapter", str(offline)]) == 2
    assert "--adapter: " in capsys.readouterr().err


def _unsupported_checkpoints(root: Path) -> dict[str, tuple[Path, str]]:
    text_only = root / "llama"
    transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2).save_pretrained(text_only)
    other_vlm = root / "paligemma"
    transformers.PaliGemmaConfig().save_pretrained(other_vlm)
    no_config = root / "empty"
    no_config.mkdir()
    return {"text-only": (text_only, "(llama); vitos_ext supports"),
            "other VLM": (other_vlm, "loads as PaliGemmaForConditionalGeneration"),
            "no config": (no_config, "has no config.json")}


def test_infer_errors_are_clear(offline, checkpoint, images, capsys):
    def error_of(*argv: str) -> str:
        assert cli.main(["infer", *argv]) == 2
        return capsys.readouterr().err

    base = ["--question", QUESTION]
    assert "--model: no such directory" in error_of("--model", str(offline / "missing"), "--image", images["png"],
                                                    *base)
    for case, (folder, message) in _unsupported_checkpoints(offline).items():
        err = error_of("--model", str(folder), "--image", images["png"], *base)
        assert message in err, case
        if case != "no config":
            assert "Qwen2_5_VLForConditionalGeneration" in err and "LlavaForConditionalGeneration" in err
    weightless = save_tiny_assets(offline / "weightless")  # config, tokenizer and processor only
    assert "has no weights (no *.safetensors" in error_of("--model", str(weightless), "--image", images["png"], *base)
    corrupt = save_tiny_assets(offline / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "cannot load the weights" in error_of("--model", str(corrupt), "--image", images["png"], *base)
    assert "--image" in error_of("--model", str(checkpoint), "--image", images["broken"], *base)
    assert "not found" in error_of("--model", str(checkpoint), "--image", str(offline / "nope.dcm"), *base)
    assert "--question must not be empty" in error_of("--model", str(checkpoint), "--image", images["png"],
                                                      "--question", "  ")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in error_of("--model", str(checkpoint), "--image", images["png"], *base,
                                                   "--device", "cuda")


@pytest.mark.parametrize("command", ["train", "eval"])
def test_self_parsing_subcommands_receive_their_options(command, capsys):
    """`vitos-ext train/eval --flag ...` reaches the subcommand's own parser (argparse REMAINDER would refuse it)."""
    from vitos_ext.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: vitos-ext {command}" in capsys.readouterr().out
