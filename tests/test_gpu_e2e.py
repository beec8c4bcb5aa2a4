"""benchmarks/gpu_e2e.py cannot rot: its --tiny path builds the model and every input and runs every variant on CPU.

The full-size run needs an H100; here the same code runs with a scaled-down config in fp32, where HF and the
patched model must agree to float32 precision.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_e2e.py"


@pytest.fixture(scope="module")
def gpu_e2e():
    spec = importlib.util.spec_from_file_location("gpu_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_e2e"] = module
    spec.loader.exec_module(module)
    return module


def _table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| stage")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_tiny_run_measures_every_variant_and_hf_agrees_with_vitos(gpu_e2e, capsys):
    assert gpu_e2e.main(["--tiny", "--warmup", "0", "--reps", "1"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    stages = [row[0] for row in rows]
    assert len(rows) == 10
    for expected in ("vision tower", "LM prefill, 100%", "LM prefill, 77%", "LM prefill, 50%", "LM only, 77%",
                     "batch of 8 ragged", "same batch, packed layout", "two-pass prefill"):
        assert any(stage.startswith(expected) for stage in stages), expected
    assert sum("fused_layers='off'" in stage for stage in stages) == 2  # vision tower and LM without fused layers
    for stage, hf_ms, vitos_ms, speedup, target, met, check in rows:
        assert "error" not in vitos_ms, stage
        assert float(hf_ms) > 0 and float(vitos_ms) > 0, stage
        assert float(check) < 1e-4, (stage, check)  # fp32: the patched model computes the same logits
        assert met in ("-", "n/a")  # no DESIGN.md verdicts for the tiny shapes


def test_shapes_of_the_7b_workload(gpu_e2e):
    shapes = gpu_e2e.QWEN2_5_VL_7B
    prompt = gpu_e2e.build_prompt(shapes, torch.device("cpu"), torch.float32)
    visual = int((prompt["input_ids"] == shapes.token_ids["image_token_id"]).sum())
    assert visual == 1296 and prompt["input_ids"].shape == (1, 1360)
    assert prompt["pixel_values"].shape == (72 * 72, 3 * 2 * 14 * 14)
    assert prompt["image_grid_thw"].tolist() == [[1, 72, 72]]
    assert shapes.batch_lengths[0] == 408 and shapes.batch_lengths[-1] == 1360
    config = gpu_e2e.build_config(shapes)
    with torch.device("meta"):  # no memory: just the architecture
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert 8.2e9 < sum(p.numel() for p in model.parameters()) < 8.4e9  # Qwen2.5-VL-7B has 8.29 B parameters
    attention = model.model.language_model.layers[0].self_attn
    assert (attention.head_dim, config.text_config.num_attention_heads, config.text_config.num_key_value_heads) == \
        (128, 28, 4)


def test_a_failing_variant_reports_its_error_and_the_run_goes_on(gpu_e2e, monkeypatch, capsys):
    def broken(model, inputs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(gpu_e2e, "language_model_prefill", broken)
    assert gpu_e2e.main(["--tiny", "--warmup", "0", "--reps", "1"]) == 1
    rows = {row[0].split(",")[0]: row for row in _table_rows(capsys.readouterr().out)}
    assert "simulated kernel failure" in rows["LM prefill"][2] and rows["LM prefill"][1] == "-"
    vision = next(row for stage, row in rows.items() if stage.startswith("vision tower"))
    assert "error" not in vision[2] and float(vision[2]) > 0  # the other variants still ran
    two_pass = next(row for stage, row in rows.items() if stage.startswith("two-pass"))
    assert float(two_pass[1]) > 0 and float(two_pass[2]) > 0


def test_targets_are_judged_only_for_the_7b_shapes(gpu_e2e):
    rows = [gpu_e2e.Row("vision", "vision", hf_ms=174.0, vitos_ms=25.0),
            gpu_e2e.Row("two-pass", "two-pass", hf_ms=202.0, vitos_ms=120.0)]
    judged = gpu_e2e.table(rows, with_targets=True)
    assert re.search(r"\| vision \| 174\.0 \| 25\.0 \| 6\.96x \| <= 30 ms \(HF 174\) \| yes \|", judged)
    assert re.search(r"\| two-pass \|.*\| NO \|", judged)
    assert "| n/a |" in gpu_e2e.table(rows, with_targets=False)


def test_tiny_profile_reports_every_stage(capsys):
    """benchmarks/gpu_profile.py (where the end-to-end time goes) runs its stages on CPU and prints one table each."""
    spec = importlib.util.spec_from_file_location("gpu_profile", SCRIPT.parent / "gpu_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--tiny", "--calls", "1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    headers = re.findall(r"^### (.+?): ([\d.]+) ms wall per call, ([\d.]+) ms in operators \((\d+)%\), (\d+) "
                         r"operator calls per call", out, re.M)
    assert [h[0] for h in headers] == ["vision tower", "LM prefill, 77% kept", "two-pass prefill",
                                       "vision tower, fused_layers='off'"]
    for _, wall, busy, share, launches in headers:
        assert 0 < float(busy) <= float(wall) and 0 < int(share) <= 100 and int(launches) > 0
    rows = [line for line in out.splitlines() if line.startswith("| aten::")]
    assert len(rows) == 12  # --top 3 per stage
    assert module.main(["--tiny", "--calls", "0"]) == 2
