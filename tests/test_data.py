"""Data: phantom generator, ViToS JSON loading with a validation report, parquet conversion, DICOM/PNG reading."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitos_ext.data import (
    LESION_CLASSES,
    Lesion,
    apply_window,
    convert_parquet,
    is_dicom,
    load_image,
    load_vitos_json,
    make_phantom_record,
    make_scan_like_image,
    to_rgb_image,
    validate_row,
    write_phantom_dataset,
)
from vitos_ext.parsing import format_output, parse_output

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

CT_PATH = get_testdata_file("CT_small.dcm")
MR_PATH = get_testdata_file("MR_small.dcm")


def kept_token_fraction(boxes, width, height, patch=14, merge=2):
    """Share of merged visual tokens kept by the boxes (DESIGN.md region_to_patch_mask rule, no dilation)."""
    cols, rows = width // (patch * merge), height // (patch * merge)
    kept = np.zeros((rows, cols), bool)
    for x1, y1, x2, y2 in boxes:
        c_lo = min(max(math.floor(x1 * cols), 0), cols - 1)
        c_hi = min(max(max(math.ceil(x2 * cols) - 1, c_lo), 0), cols - 1)
        r_lo = min(max(math.floor(y1 * rows), 0), rows - 1)
        r_hi = min(max(max(math.ceil(y2 * rows) - 1, r_lo), 0), rows - 1)
        kept[r_lo : r_hi + 1, c_lo : c_hi + 1] = True
    return kept.mean()


# ----------------------------------------------------------------------------------------------------------------
# phantom


def test_phantom_dataset_is_deterministic_and_loadable(tmp_path):
    first = write_phantom_dataset(tmp_path / "a", 6, seed=3, image_size=112)
    second = write_phantom_dataset(tmp_path / "b", 6, seed=3, image_size=112)
    other = write_phantom_dataset(tmp_path / "c", 6, seed=4, image_size=112)
    assert first.read_text() == second.read_text()
    for name in sorted(p.name for p in (tmp_path / "a" / "images").iterdir()):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    assert first.read_text() != other.read_text()

    records = json.loads(first.read_text())
    assert len(records) == 6
    for record in records:
        assert set(record) >= {"image_path", "question", "answer", "bbox", "options"}
        assert record["question"].startswith("<image>") and "\nA. " in record["question"]
        assert record["answer"] in record["options"] and record["options"][record["answer"]] == record["lesion_class"]
        assert 1 <= len(record["bbox"]) <= 2
        for box in record["bbox"]:
            assert len(box) == 4 and all(0.0 <= v <= 1.0 for v in box) and box[0] < box[2] and box[1] < box[3]
        # the SFT gold target built from the record is a valid contract output
        gold = format_output(record["think"], record["bbox"], record["answer"])
        assert parse_output(gold).format_ok

    samples = load_vitos_json(first, require_boxes=True)
    assert samples.report.ok and len(samples) == 6
    assert load_image(samples[0].image_paths[0]).size == (112, 112)
    assert samples[0].options == records[0]["options"] and samples[0].extra["think"] == records[0]["think"]


def test_phantom_record_depends_only_on_seed_and_index():
    record_a, image_a = make_phantom_record(5, seed=11)
    record_b, image_b = make_phantom_record(5, seed=11)
    assert record_a == record_b and np.array_equal(np.asarray(image_a), np.asarray(image_b))
    assert make_phantom_record(6, seed=11)[0] != record_a
    kinds = [make_phantom_record(i, seed=2)[0]["lesion_class"] for i in range(8)]
    assert sorted(kinds) == sorted(LESION_CLASSES * 2)  # balanced over consecutive indices
    shuffled = [make_phantom_record(i, seed=2, shuffle_options=True)[0] for i in range(8)]
    assert any(list(r["options"].values()) != list(LESION_CLASSES) for r in shuffled)
    assert all(r["options"][r["answer"]] == r["lesion_class"] for r in shuffled)
    with pytest.raises(ValueError, match="index"):
        make_phantom_record(-1)
    with pytest.raises(ValueError, match="max_lesions"):
        make_phantom_record(0, max_lesions=0)


@pytest.mark.parametrize("size", [112, 224])
def test_phantom_lesions_are_small_enough_for_sparse_answering(size):
    fractions = []
    for index in range(30):
        record, image = make_phantom_record(index, seed=7, image_size=size)
        assert image.size == (size, size) and image.mode == "L"
        fractions.append(kept_token_fraction(record["bbox"], size, size))
    assert max(fractions) <= 0.5
    assert np.mean(fractions) < (0.3 if size == 112 else 0.1)


def test_lesion_classes_look_different_where_the_box_is():
    def render(kind):
        lesion = Lesion(kind, center=(0.5, 0.4), radius=0.08)
        scan = make_scan_like_image(224, [lesion], seed=0)
        assert scan.boxes == [pytest.approx([0.42, 0.32, 0.58, 0.48])]
        pixels = np.asarray(scan.image, dtype=np.float64)
        ys, xs = np.mgrid[0:224, 0:224] + 0.5
        distance = np.hypot(xs - 0.5 * 224, ys - 0.4 * 224) / (0.08 * 224)
        return pixels[distance < 0.3], pixels[(distance > 0.75) & (distance < 0.95)], pixels[distance < 0.95]

    core, rim, _ = render("hyperdense nodule")
    assert core.mean() > 200 and rim.mean() > 200
    core, rim, _ = render("hypodense cyst")
    assert core.mean() < 50 and rim.mean() < 50
    core, rim, _ = render("ring-enhancing lesion")
    assert core.mean() < 60 and rim.mean() > 200
    _, _, disk = render("speckled calcification")
    assert disk.std() > 40 and (disk > 200).mean() < 0.5  # scattered bright dots on tissue


def test_lookalikes_leave_records_and_lesions_alone():
    for index in range(6):
        plain, plain_image = make_phantom_record(index, seed=5, image_size=112)
        assert make_phantom_record(index, seed=5, image_size=112, lookalikes=0)[1].tobytes() == plain_image.tobytes()
        record, image = make_phantom_record(index, seed=5, image_size=112, lookalikes=2)
        assert record == plain  # same question, answer, boxes and reasoning: distractors are not findings
        before, after = (np.asarray(i, dtype=np.float64) for i in (plain_image, image))
        changed = np.abs(after - before) > 60  # far above the acquisition noise
        assert changed.sum() > 20, "a distractor was drawn"
        ys, xs = np.mgrid[0:112, 0:112] + 0.5
        for x1, y1, x2, y2 in record["bbox"]:
            in_box = (xs >= x1 * 112) & (xs <= x2 * 112) & (ys >= y1 * 112) & (ys <= y2 * 112)
            assert not changed[in_box].any(), "distractors stay clear of the lesions"


def test_lookalikes_are_elongated_distractors():
    lesion = Lesion("hyperdense nodule", center=(0.3, 0.45), radius=0.07)
    plain = np.asarray(make_scan_like_image(224, [lesion], seed=4).image, dtype=np.float64)
    scan = make_scan_like_image(224, [lesion], seed=4, lookalikes=1)
    assert scan.boxes == make_scan_like_image(224, [lesion], seed=4).boxes
    changed = np.abs(np.asarray(scan.image, dtype=np.float64) - plain) > 60
    ys, xs = np.nonzero(changed)
    spread = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(np.float64)))
    assert spread[1] > 3 * spread[0], "elongated, unlike the round lesions"
    with pytest.raises(ValueError, match="lookalikes"):
        make_scan_like_image(112, ["hypodense cyst"], lookalikes=-1)
    with pytest.raises(ValueError, match="lookalikes"):
        make_phantom_record(0, lookalikes=True)


def test_mimics_leave_records_and_lesions_alone():
    drawn = 0
    for index in range(8):
        plain, plain_image = make_phantom_record(index, seed=5, image_size=112)
        assert make_phantom_record(index, seed=5, image_size=112, mimics=0)[1].tobytes() == plain_image.tobytes()
        record, image = make_phantom_record(index, seed=5, image_size=112, mimics=1)
        assert record == plain  # mimics are not findings
        changed = np.abs(np.asarray(image, dtype=np.float64) - np.asarray(plain_image, dtype=np.float64)) > 60
        drawn += changed.sum() > 200
        ys, xs = np.mgrid[0:112, 0:112] + 0.5
        for x1, y1, x2, y2 in record["bbox"]:
            in_box = (xs >= x1 * 112) & (xs <= x2 * 112) & (ys >= y1 * 112) & (ys <= y2 * 112)
            assert not changed[in_box].any(), "mimics stay clear of the lesions"
    assert drawn >= 4  # placement may find no room in a crowded scan, but mostly it does


@pytest.mark.parametrize("kind", LESION_CLASSES)
def test_mimics_are_organ_sized_with_another_class_texture(kind):
    lesion = Lesion(kind, center=(0.3, 0.4), radius=0.07)
    for seed in range(2, 12):  # the first seed with room for a mimic
        plain = np.asarray(make_scan_like_image(224, [lesion], seed=seed).image, dtype=np.float64)
        scan = make_scan_like_image(224, [lesion], seed=seed, mimics=1)
        changed = np.abs(np.asarray(scan.image, dtype=np.float64) - plain) > 60
        if changed.sum():
            break
    assert scan.boxes == make_scan_like_image(224, [lesion], seed=seed).boxes
    ys, xs = np.nonzero(changed)
    assert max(np.ptp(xs), np.ptp(ys)) > 2 * 0.085 * 224, "larger than any lesion (diameter <= 0.17 of the side)"
    with pytest.raises(ValueError, match="mimics"):
        make_scan_like_image(112, ["hypodense cyst"], mimics=-1)
    with pytest.raises(ValueError, match="mimics"):
        make_phantom_record(0, mimics=1.5)


def test_make_scan_like_image_validates_arguments():
    scan = make_scan_like_image((140, 112), ["hypodense cyst", "hypodense cyst"], seed=1)
    assert scan.image.size == (140, 112) and scan.kinds == ["hypodense cyst"] * 2 and len(scan.boxes) == 2
    with pytest.raises(ValueError, match="unknown class"):
        make_scan_like_image(112, ["tumour"])
    with pytest.raises(ValueError, match="image_size"):
        make_scan_like_image(16)
    with pytest.raises(ValueError, match="lesions must be"):
        make_scan_like_image(112, "hypodense cyst")


# ----------------------------------------------------------------------------------------------------------------
# JSON loading and validation


@pytest.fixture()
def messy_dataset(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(images / "ok.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    shutil.copy(CT_PATH, images / "slice.dcm")
    rows = [
        {"image_path": ["ok.png"], "question": "<image>Q?", "answer": "B", "bbox": [[0.1, 0.1, 0.5, 0.5]],
         "options": {"A": "x", "B": "y"}, "think": "kept as extra"},
        {"image_path": ["nowhere.png"], "question": "<image>Q?", "answer": "A", "bbox": [[0.1, 0.1, 0.2, 0.2]]},
        {"image_path": ["broken.png"], "question": "<image>Q?", "answer": "A", "bbox": [[0.1, 0.1, 0.2, 0.2]]},
        {"image_path": ["ok.png"], "question": "<image>Q?", "answer": "A", "bbox": [[0.1, 0.1, 1.2, 0.2]]},
        {"image_path": ["ok.png"], "question": "<image>Q?", "answer": "A", "bbox": [[0.1, 0.1, 0.2]]},
        {"image_path": ["ok.png"], "question": "<image>Q?", "answer": "", "bbox": [[0.1, 0.1, 0.2, 0.2]]},
        {"question": "Which?", "image": "ok.png", "options": ["cyst", "nodule"], "answer": "nodule",
         "dataset": "vqa-x"},
        {"image_path": "ok.png", "question": "<image>Which?\nA. cyst\nB. nodule", "answer": "(b)",
         "bbox": [0.2, 0.2, 0.4, 0.4]},
        ["not", "an", "object"],
        {"image_path": ["slice.dcm"], "question": "<image>CT?", "answer": "A", "bbox": [[0, 0, 1, 1]]},
        {"image_path": ["ok.png"], "answer": "A", "bbox": [[0.1, 0.1, 0.2, 0.2]]},
        {"image_path": ["ok.png"], "question": "<image>Q?", "answer": "A", "bbox": [[0.5, 0.1, 0.2, 0.2]]},
        {"question": "Q?", "answer": "A"},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    return path, images


def test_load_vitos_json_reports_and_skips_bad_rows(messy_dataset, caplog):
    path, images = messy_dataset
    with caplog.at_level("WARNING", logger="vitos_ext.data"):
        samples = load_vitos_json(path, image_root=images)
    report = samples.report
    assert report.total == 13 and report.loaded == 4 and len(samples) == 4
    reasons = {row.index: row.reason for row in report.skipped}
    assert reasons == {
        1: "missing image",
        2: "unreadable image",
        3: "box outside [0,1]",
        4: "malformed box",
        5: "missing answer",
        8: "not an object",
        10: "missing question",
        11: "malformed box",
        12: "missing image",
    }
    assert "nowhere.png" in next(r.detail for r in report.skipped if r.index == 1)
    assert "4/13 rows loaded" in str(report)
    assert "row 3: box outside [0,1]" in caplog.text
    assert json.loads(json.dumps(report.to_dict()))["skipped_by_reason"]["malformed box"] == 2

    by_index = {s.index: s for s in samples}
    assert by_index[0].boxes == [[0.1, 0.1, 0.5, 0.5]] and by_index[0].extra == {"think": "kept as extra"}
    assert Path(by_index[0].image_paths[0]) == (images / "ok.png").resolve()
    # evaluation format: options list -> dict, option-text answer -> letter, no boxes
    assert by_index[6].options == {"A": "cyst", "B": "nodule"} and by_index[6].answer == "B"
    assert by_index[6].boxes == [] and by_index[6].dataset == "vqa-x"
    # inline options, "(b)" answer, a single flat box
    assert by_index[7].options == {"A": "cyst", "B": "nodule"} and by_index[7].answer == "B"
    assert by_index[7].boxes == [[0.2, 0.2, 0.4, 0.4]]
    assert by_index[9].image_paths[0].endswith("slice.dcm")


def test_require_boxes_and_image_root_default(messy_dataset, tmp_path):
    path, images = messy_dataset
    strict = load_vitos_json(path, image_root=images, require_boxes=True)
    assert {row.index: row.reason for row in strict.report.skipped}[6] == "missing bbox"
    # without image_root, relative paths resolve against the JSON's folder (where they do not exist)
    assert load_vitos_json(path).report.loaded == 0
    with pytest.raises(FileNotFoundError, match="path"):
        load_vitos_json(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="JSON list"):
        load_vitos_json(bad)


def test_json_lines_and_validate_row(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    row = {"image": "a.png", "question": "Q?", "answer": "yes"}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    samples = load_vitos_json(tmp_path / "rows.jsonl")
    assert len(samples) == 2 and samples[0].answer == "yes" and samples[0].options == {}
    assert validate_row(row, 0, tmp_path).question == "Q?"
    with pytest.raises(ValueError, match="missing answer"):
        validate_row({**row, "answer": None}, 0, tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# parquet


def _png_bytes(color):
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_convert_parquet_round_trip_with_duplicate_images(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    red, blue = _png_bytes((255, 0, 0)), _png_bytes((0, 0, 255))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

    def shard(path, images, questions, answers, boxes, options):
        table = pa.table(
            {
                "image": pa.array([{"bytes": b, "path": None} for b in images], type=image_type),
                "question": questions,
                "answer": answers,
                "bbox": pa.array(boxes, type=pa.list_(pa.list_(pa.float64()))),
                "options": pa.array(options, type=pa.list_(pa.string())),
                "source_id": list(range(len(images))),
            }
        )
        pq.write_table(table, path)

    shard(
        tmp_path / "part-0.parquet",
        [red, blue, red, b"garbage bytes"],
        ["<image>Q0?", "<image>Q1?", "<image>Q2?", "<image>Q3?"],
        ["A", "pneumonia", "B", "A"],
        [[[0.1, 0.1, 0.3, 0.3]], [[0.2, 0.2, 0.4, 0.4], [0.5, 0.5, 0.6, 0.6]], [[0.0, 0.0, 1.0, 1.0]], [[0, 0, 1, 1]]],
        [["normal", "pneumonia"]] * 4,
    )
    shard(
        tmp_path / "part-1.parquet",
        [blue, red],
        ["<image>Q4?", "<image>Q5?"],
        ["B", None],
        [[[0.1, 0.1, 1.5, 0.3]], [[0.1, 0.1, 0.3, 0.3]]],
        [["normal", "pneumonia"]] * 2,
    )
    out = tmp_path / "converted"
    json_path = convert_parquet(tmp_path, out)  # a folder of shards

    assert sorted(p.suffix for p in (out / "images").iterdir()) == [".png", ".png"]  # red and blue, once each
    report = json.loads((out / "data.report.json").read_text())
    assert report["total"] == 6 and report["loaded"] == 3
    assert {(r["index"], r["reason"]) for r in report["skipped"]} == {
        (3, "unreadable image"),
        (4, "box outside [0,1]"),
        (5, "missing answer"),
    }

    samples = load_vitos_json(json_path, require_boxes=True)
    assert samples.report.ok and [s.question for s in samples] == ["<image>Q0?", "<image>Q1?", "<image>Q2?"]
    assert samples[0].image_paths == samples[2].image_paths != samples[1].image_paths
    assert samples[1].answer == "B" and samples[1].options == {"A": "normal", "B": "pneumonia"}
    assert samples[1].boxes == [[0.2, 0.2, 0.4, 0.4], [0.5, 0.5, 0.6, 0.6]]
    assert samples[2].extra == {"source_id": 2}
    assert np.asarray(load_image(samples[1].image_paths[0]))[0, 0].tolist() == [0, 0, 255]


def test_convert_parquet_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="shards"):
        convert_parquet(tmp_path / "missing.parquet", tmp_path / "out")
    with pytest.raises(ValueError, match="no parquet files"):
        convert_parquet(tmp_path, tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------------
# images and DICOM


def _gray(image):
    array = np.asarray(image)
    assert image.mode == "RGB" and (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    return array[..., 0].astype(int)


def test_ct_small_uses_rescale_and_soft_tissue_window():
    dataset = pydicom.dcmread(CT_PATH)
    assert "WindowCenter" not in dataset and float(dataset.RescaleIntercept) == -1024
    hounsfield = dataset.pixel_array.astype(float) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    gray = _gray(load_image(CT_PATH))
    assert gray.shape == (128, 128)
    assert (gray[hounsfield <= 40 - 200] == 0).all()  # air and fat are black in a soft-tissue window
    assert (gray[hounsfield > 40 + 200] == 255).all()  # bone is white
    inside = (hounsfield > -150) & (hounsfield < 230)
    assert inside.sum() > 100
    expected = np.rint(((hounsfield[inside] - 39.5) / 399.0 + 0.5) * 255)
    assert np.abs(gray[inside] - expected).max() <= 1
    lung = _gray(load_image(CT_PATH, default_window=(-600, 1500)))
    assert (lung != gray).any()


def test_mr_small_uses_its_own_window():
    dataset = pydicom.dcmread(MR_PATH)
    center, width = float(dataset.WindowCenter), float(dataset.WindowWidth)
    gray = _gray(load_image(MR_PATH, default_window=(40, 400)))  # the file's window wins over the default
    np.testing.assert_array_equal(gray, apply_window(dataset.pixel_array, center, width))
    assert gray.shape == (64, 64) and 0 < gray.mean() < 255


def test_dicom_variants(tmp_path):
    reference = _gray(load_image(CT_PATH))
    dataset = pydicom.dcmread(CT_PATH)
    dataset.PhotometricInterpretation = "MONOCHROME1"
    dataset.save_as(tmp_path / "inverted.dcm")
    np.testing.assert_array_equal(_gray(load_image(tmp_path / "inverted.dcm")), 255 - reference)

    dataset = pydicom.dcmread(CT_PATH)
    dataset.WindowCenter, dataset.WindowWidth = [40, 400], [400, 2000]  # multi-valued: first pair applies
    dataset.save_as(tmp_path / "noext")  # no suffix: detected by the DICM magic
    assert is_dicom(tmp_path / "noext")
    np.testing.assert_array_equal(_gray(load_image(tmp_path / "noext")), reference)

    dataset = pydicom.dcmread(MR_PATH)
    del dataset.WindowCenter, dataset.WindowWidth
    dataset.save_as(tmp_path / "mr_nowindow.dcm")
    stretched = _gray(load_image(tmp_path / "mr_nowindow.dcm"))  # not CT, no window: full data range
    assert stretched.min() == 0 and stretched.max() == 255


def test_in_memory_images_are_read_like_files(tmp_path):
    """A 16-bit PIL image or array (e.g. a DICOM pixel_array) is stretched to 8 bits as load_image does for files;
    a plain convert("RGB") would clip everything above 255 to white."""
    raw = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    Image.fromarray(raw).save(tmp_path / "c.png")
    from_file = np.asarray(load_image(tmp_path / "c.png"))
    for value in (Image.open(tmp_path / "c.png"), Image.fromarray(raw), raw, raw.astype(np.int16), raw / 7.0):
        assert np.array_equal(np.asarray(to_rgb_image(value)), from_file), type(value)
    assert _gray(to_rgb_image(raw)).tolist() == [[0, 64], [128, 255]]
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0] = 9
    assert to_rgb_image(rgba).getpixel((0, 0)) == (9, 0, 0)
    assert to_rgb_image(np.full((2, 2), np.nan)).getpixel((0, 0)) == (0, 0, 0)  # nothing finite: black
    with pytest.raises(ValueError, match="scan: a numpy image must be"):
        to_rgb_image(np.zeros((2, 2, 3), np.uint16), "scan")
    with pytest.raises(ValueError, match="a numpy image must be"):
        to_rgb_image(np.zeros((2, 2), bool))
    with pytest.raises(TypeError, match="image must be a PIL image or a numpy array"):
        to_rgb_image([[0, 1]])


def test_png_jpeg_16bit_and_errors(tmp_path):
    Image.new("RGBA", (5, 4), (1, 2, 3, 4)).save(tmp_path / "a.png")
    Image.new("L", (5, 4), 77).save(tmp_path / "b.jpg", quality=95)
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)).save(tmp_path / "c.png")
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (1, 2, 3)
    assert load_image(tmp_path / "b.jpg").mode == "RGB"
    assert _gray(load_image(tmp_path / "c.png")).tolist() == [[0, 64], [128, 255]]
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="unreadable image"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="window"):
        apply_window(np.zeros(3), 40, 0)
