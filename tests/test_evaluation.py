"""`vitos-ext eval` (vitos_ext.evaluation): summary arithmetic, a scripted end-to-end run, and the real CLI offline.

The scripted run fixes only the *text* the tiny model generates (per question and per call kind: full-token,
grounding pass 1, answering pass 2); prompts, images, pruning, kept ratios, grouping and scoring are real. The CLI
run uses the random tiny model unscripted on a phantom-derived file that also holds bad rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitos_ext import reference
from vitos_ext.data import load_image, load_vitos_json, make_phantom_record
from vitos_ext.evaluation import (
    EvalItem,
    FullTokenRunner,
    SparsePipelineRunner,
    eval_main,
    evaluate,
    format_table,
    summarize,
)
from vitos_ext.pipeline import ViToSPipeline
from vitos_ext.tiny import build_tiny_model, build_tiny_processor, save_tiny_assets

torch.set_num_threads(1)  # tiny tensors: more threads only contend on the shared test machine

OPTIONS = {"A": "hyperdense nodule", "B": "hypodense cyst", "C": "calcification", "D": "ring enhancing lesion"}


def write_eval_file(folder: Path, cases: list[dict], bad_rows: bool = False) -> Path:
    """Phantom scans as evaluation rows {question, image, options, answer, dataset, bbox}; optional bad rows."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, case in enumerate(cases):
        record, image = make_phantom_record(i, seed=11, image_size=112)
        image.save(folder / f"images/case{i}.png")
        rows.append({"question": f"Case {i}: what kind of lesion is shown?", "image": f"images/case{i}.png",
                     "options": OPTIONS, "answer": case.get("answer", "B"), "dataset": case["dataset"],
                     "bbox": case.get("bbox", record["bbox"])})
    if bad_rows:
        (folder / "images/broken.png").write_bytes(b"this is not a png")
        rows += [
            {"question": "Case 90: which?", "image": "images/nowhere.png", "options": OPTIONS, "answer": "A",
             "dataset": "ds_a"},
            {"question": "Case 91: which?", "image": "images/case0.png", "options": OPTIONS, "dataset": "ds_a"},
            {"question": "Case 92: which?", "image": "images/broken.png", "options": OPTIONS, "answer": "C",
             "dataset": "ds_b"},
            {"question": "Case 93: which?", "image": "images/case0.png", "options": OPTIONS, "answer": "C",
             "dataset": "ds_b", "bbox": [[0.2, 0.2, 1.4, 0.5]]},
        ]
    path = folder / "eval.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


# ----------------------------------------------------------------------------------------------------------------
# summary arithmetic on hand-made records


def record(dataset: str, full: bool, sparse: bool, kept: float, grounding: bool = False) -> dict:
    return {"dataset": dataset,
            "full": {"correct": full, "seconds": 0.010, "kept_ratio": 1.0},
            "sparse": {"correct": sparse, "seconds": 0.030, "kept_ratio": kept, "grounding_correct": grounding,
                       "stage_ms": {"pass2_prefill": 2.0}}}


def test_summary_groups_by_dataset_and_computes_relative_performance():
    records = ([record("a", True, True, 0.5, True), record("a", True, False, 0.7), record("a", False, True, 0.3)]
               + [record("b", False, False, 1.0), record("b", True, True, 0.2, True)])
    summary = summarize(records, ("full", "sparse"))
    a, b = summary["datasets"]["a"], summary["datasets"]["b"]
    assert (a["n"], a["full"]["accuracy"], a["sparse"]["accuracy"]) == (3, 66.67, 66.67)
    assert a["relative_pct"] == 100.0 and a["sparse"]["kept_ratio"] == 0.5
    assert a["sparse"]["grounding_accuracy"] == 33.33
    assert (b["full"]["accuracy"], b["sparse"]["accuracy"], b["relative_pct"]) == (50.0, 50.0, 100.0)
    overall = summary["overall"]
    assert (overall["n"], overall["full"]["accuracy"], overall["sparse"]["accuracy"]) == (5, 60.0, 60.0)
    assert overall["full"]["ms_per_sample"] == 10.0 and overall["sparse"]["ms_per_sample"] == 30.0
    assert overall["sparse"]["stage_ms_per_sample"] == {"pass2_prefill": 2.0}
    average = summary["average"]  # macro: every dataset weighs the same
    assert average["full"]["accuracy"] == round((66.67 + 50.0) / 2, 2)
    assert average["sparse"]["kept_ratio"] == round((0.5 + 0.6) / 2, 2)


def test_relative_performance_is_undefined_when_full_accuracy_is_zero_and_table_says_so():
    summary = summarize([record("x", False, True, 0.4), record("x", False, False, 0.4)], ("full", "sparse"))
    assert summary["datasets"]["x"]["relative_pct"] is None
    table = format_table(summary, ("full", "sparse"))
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["dataset", "n", "full", "acc"]
    x_row = next(line for line in lines if line.startswith("x "))
    assert x_row.split()[1:5] == ["2", "0.00", "50.00", "0.00"] and " - " in x_row and "40.0%" in x_row


def test_sparse_only_summary_has_no_relative_column():
    summary = summarize([record("x", True, True, 0.4)], ("sparse",))
    assert "relative_pct" not in summary["overall"] and "full" not in summary["overall"]
    assert "relative" not in format_table(summary, ("sparse",))


# ----------------------------------------------------------------------------------------------------------------
# scripted end-to-end run through the real runners and pipeline


PASS1_BOXES = {0: [[0.0, 0.0, 0.5, 0.5]], 1: [[0.5, 0.5, 1.0, 1.0]], 2: [[0.0, 0.0, 1.0, 1.0]], 3: []}


def script_generate(monkeypatch, model, tokenizer, answers: dict[tuple[str, int], str]) -> list[str]:
    """model.generate returns a scripted reply per (call kind, case number); records the kinds it saw."""
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = model.generation_config.pad_token_id
    kinds = []

    def generate(*args, **kwargs):
        input_ids = kwargs["input_ids"]
        prompts = [tokenizer.decode(row) for row in input_ids.tolist()]
        if "vitos_keep" in kwargs:
            kind = "pass2"
            assert not bool(kwargs["vitos_keep"].all()) or all("Case 3" in p or "Case 2" in p for p in prompts)
        else:
            kind = "pass1" if "Output format" in prompts[0] else "full"
        kinds.append(kind)
        rows = []
        for prompt in prompts:
            case = int(prompt.split("Case ")[1].split(":")[0])
            text = answers[(kind, case)] if kind != "pass1" else (
                f"<think>x</think><box>{json.dumps(PASS1_BOXES[case])}</box><answer>{answers[(kind, case)]}</answer>")
            rows.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
        new = torch.full((len(rows), max(map(len, rows))), pad, dtype=input_ids.dtype)
        for i, row in enumerate(rows):
            new[i, :len(row)] = torch.tensor(row)
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    return kinds


def test_scripted_run_scores_every_mode_per_dataset(tmp_path, monkeypatch):
    # gold is B everywhere; cases 0, 1 in ds_a, cases 2, 3 in ds_b
    path = write_eval_file(tmp_path, [{"dataset": "ds_a"}, {"dataset": "ds_a"}, {"dataset": "ds_b"},
                                      {"dataset": "ds_b"}])
    samples = load_vitos_json(path)
    model, processor = build_tiny_model(seed=1), build_tiny_processor()
    pipeline = ViToSPipeline(model, processor, max_new_tokens=4)
    full = FullTokenRunner(model, processor, max_new_tokens=4)
    kinds = script_generate(monkeypatch, model, processor.tokenizer, {
        ("full", 0): "B", ("full", 1): "A", ("full", 2): "(B)", ("full", 3): "B",
        ("pass1", 0): "B", ("pass1", 1): "B", ("pass1", 2): "C", ("pass1", 3): "D",
        ("pass2", 0): "<answer>B</answer>", ("pass2", 1): "<answer>hypodense cyst</answer>",
        ("pass2", 2): "<answer>C</answer>", ("pass2", 3): "<answer>A</answer>",
    })
    result = evaluate(samples, {"full": full, "sparse": SparsePipelineRunner(pipeline)}, batch_size=3, progress=False)
    assert kinds == ["full", "pass1", "pass2", "full", "pass1", "pass2"]  # two batches, three calls each

    by_case = {r["index"]: r for r in result.records}
    assert [by_case[i]["full"]["correct"] for i in range(4)] == [True, False, True, True]
    assert [by_case[i]["sparse"]["correct"] for i in range(4)] == [True, True, False, False]
    assert [by_case[i]["sparse"]["grounding_correct"] for i in range(4)] == [True, True, False, False]
    assert by_case[1]["sparse"]["choice"] == "B"  # option text maps to its letter

    # kept ratios come from the pass-1 boxes through region_to_patch_mask (4 x 4 token grid for 112 px)
    grid = torch.tensor([[1, 8, 8]])
    for case, boxes in PASS1_BOXES.items():
        if boxes:
            box_image = torch.zeros(len(boxes), dtype=torch.long)
            mask = reference.region_to_patch_mask_reference(torch.tensor(boxes), box_image, grid)
            assert by_case[case]["sparse"]["kept_ratio"] == pytest.approx(float(mask.float().mean()))
    assert by_case[0]["sparse"]["kept_ratio"] == 0.25
    assert by_case[3]["sparse"]["kept_ratio"] == 1.0 and "no_boxes" in by_case[3]["sparse"]["flags"]

    summary = summarize(result.records, result.modes)
    ds_a, ds_b = summary["datasets"]["ds_a"], summary["datasets"]["ds_b"]
    assert (ds_a["full"]["accuracy"], ds_a["sparse"]["accuracy"], ds_a["relative_pct"]) == (50.0, 100.0, 200.0)
    assert (ds_b["full"]["accuracy"], ds_b["sparse"]["accuracy"], ds_b["relative_pct"]) == (100.0, 0.0, 0.0)
    assert summary["overall"]["relative_pct"] == round(100 * 50.0 / 75.0, 2)
    assert summary["average"]["relative_pct"] == round(100 * 50.0 / 75.0, 2)
    assert ds_a["sparse"]["kept_ratio"] == 0.25 and ds_b["sparse"]["kept_ratio"] == 1.0
    assert all(r[m]["seconds"] > 0 for r in result.records for m in ("full", "sparse"))


def test_gold_boxes_skip_pass_1_and_images_failing_at_run_time_are_skipped(tmp_path, monkeypatch):
    path = write_eval_file(tmp_path, [{"dataset": "d", "bbox": [[0.0, 0.0, 0.5, 0.5]]},
                                      {"dataset": "d", "bbox": [[0.5, 0.0, 1.0, 0.5]]},
                                      {"dataset": "d"}])
    samples = load_vitos_json(path)
    model, processor = build_tiny_model(seed=2), build_tiny_processor()
    pipeline = ViToSPipeline(model, processor, max_new_tokens=4)
    kinds = script_generate(monkeypatch, model, processor.tokenizer,
                            {("pass2", 0): "B", ("pass2", 1): "B", ("pass2", 2): "B"})
    def loader(image_path: str):
        if image_path.endswith("case2.png"):
            raise ValueError("decoder failure")
        return load_image(image_path)

    result = evaluate(samples, {"sparse": SparsePipelineRunner(pipeline, gold_boxes=True)}, batch_size=8,
                      progress=False, image_loader=loader)
    assert kinds == ["pass2"]
    assert [r["index"] for r in result.records] == [0, 1]
    assert [r["sparse"]["kept_ratio"] for r in result.records] == [0.25, 0.25]
    assert [(row.index, row.reason) for row in result.skipped] == [(2, "unreadable image")]


# ----------------------------------------------------------------------------------------------------------------
# the CLI, offline, unscripted tiny model


def test_cli_on_a_phantom_file_with_bad_rows(tmp_path, capsys):
    path = write_eval_file(tmp_path, [{"dataset": "ds_a"}, {"dataset": "ds_b"}, {"dataset": "ds_a"}], bad_rows=True)
    out = tmp_path / "results.json"
    status = eval_main(["--model", "tiny", "--data", str(path), "--out", str(out), "--max-new-tokens", "6",
                        "--batch-size", "2", "--no-progress"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "relative" in printed and "ds_a" in printed and "ds_b" in printed and "overall" in printed
    assert "rows skipped: 1 box outside [0,1], 1 missing answer, 1 missing image, 1 unreadable image" in printed

    payload = json.loads(out.read_text())
    assert set(payload) == {"model", "data", "settings", "validation", "summary", "samples"}
    assert payload["validation"]["total"] == 7 and payload["validation"]["loaded"] == 3
    assert sorted(row["index"] for row in payload["validation"]["skipped"]) == [3, 4, 5, 6]
    summary = payload["summary"]
    assert set(summary["datasets"]) == {"ds_a", "ds_b"}
    assert summary["datasets"]["ds_a"]["n"] == 2 and summary["overall"]["n"] == 3
    records = payload["samples"]
    assert sorted(r["index"] for r in records) == [0, 1, 2]
    # the summary is recomputed from the records, not invented
    assert summary["overall"]["full"]["correct"] == sum(r["full"]["correct"] for r in records)
    assert summary["overall"]["sparse"]["correct"] == sum(r["sparse"]["correct"] for r in records)
    for r in records:
        assert 0 < r["sparse"]["kept_ratio"] <= 1 and r["sparse"]["visual_tokens"] == 16
        assert r["full"]["seconds"] > 0 and r["sparse"]["seconds"] > 0
        assert set(r["sparse"]["stage_ms"]) >= {"vision", "pass1_prefill", "pass2_prefill", "total"}
    assert payload["settings"]["modes"] == ["full", "sparse"]


def test_cli_with_a_saved_tiny_folder_and_gold_boxes(tmp_path, capsys):
    path = write_eval_file(tmp_path, [{"dataset": "only"}, {"dataset": "only"}])
    folder = save_tiny_assets(tmp_path / "tiny-folder")  # processor + config, no weights
    out = tmp_path / "r.json"
    assert eval_main(["--model", str(folder), "--data", str(path), "--out", str(out), "--modes", "sparse",
                      "--gold-boxes", "--max-new-tokens", "3", "--no-progress"]) == 0
    payload = json.loads(out.read_text())
    kept = [r["sparse"]["kept_ratio"] for r in payload["samples"]]
    assert all(0 < k < 1 for k in kept)  # the rows' own (small lesion) boxes pruned the image
    assert "full" not in payload["summary"]["overall"] and "relative" not in capsys.readouterr().out


def test_cli_with_a_checkpoint_folder_with_weights_runs_the_saved_model(tmp_path, capsys):
    path = write_eval_file(tmp_path, [{"dataset": "only"}, {"dataset": "only"}, {"dataset": "only"}])
    model = build_tiny_model(seed=9)
    folder = save_tiny_assets(tmp_path / "ckpt", model=model)
    out = tmp_path / "r.json"
    assert eval_main(["--model", str(folder), "--data", str(path), "--out", str(out), "--modes", "full",
                      "--max-new-tokens", "5", "--batch-size", "2", "--no-progress"]) == 0
    payload = json.loads(out.read_text())
    # the saved weights answer: the same greedy text as the in-memory model on the same prompt
    runner = FullTokenRunner(model, build_tiny_processor(), max_new_tokens=5)
    first = load_vitos_json(path)[0]
    expected = runner([EvalItem(first, [load_image(first.image_paths[0])])])[0].text
    assert payload["samples"][0]["full"]["text"] == expected
    assert payload["summary"]["overall"]["n"] == 3 and "sparse" not in payload["summary"]["overall"]


@pytest.mark.parametrize("argv, message", [
    (["--modes", "full,bogus"], "--modes"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_cli_rejects_bad_flags(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as error:
        eval_main(["--model", "tiny", "--data", str(tmp_path / "x.json"), *argv])
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_cli_reports_missing_files_clearly(tmp_path, capsys):
    assert eval_main(["--model", "tiny", "--data", str(tmp_path / "absent.json"), "--no-progress"]) == 2
    assert "--data" in capsys.readouterr().err
    path = write_eval_file(tmp_path, [{"dataset": "d"}])
    assert eval_main(["--model", str(tmp_path / "no-model"), "--data", str(path), "--no-progress"]) == 2
    assert "--model" in capsys.readouterr().err
    assert eval_main(["--model", "tiny", "--adapter", str(tmp_path), "--data", str(path), "--no-progress"]) == 2
    assert "--adapter needs a --model checkpoint folder with weights" in capsys.readouterr().err
    folder = save_tiny_assets(tmp_path / "ckpt", model=build_tiny_model(seed=9))
    assert eval_main(["--model", str(folder), "--adapter", str(tmp_path), "--data", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--adapter: " in err and "adapter_config.json" in err
