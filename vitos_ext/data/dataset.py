"""Load ViToS-format data (and the evaluation format), convert parquet shards, report and skip bad rows.

Accepted row layouts (JSON list of objects):

* ViToS training format: ``{"image_path": [..], "question": "<image>...", "answer": "C",
  "bbox": [[x1, y1, x2, y2], ...], "options": {...}?}`` with normalized boxes;
* evaluation format: ``{"question", "image", "options", "answer", "dataset"}`` (no boxes).

Options may be a dict, a list, an inline block in the question (``"A. x\\nB. y"``) or missing; they always come
out as an ordered ``{"A": text, ...}`` dict. Bad rows never stop loading: each is listed with its reason in a
:class:`ValidationReport` (``samples.report``) and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..parsing import extract_choice, normalize_options, split_inline_options
from .images import is_dicom

__all__ = [
    "Sample",
    "SkippedRow",
    "ValidationReport",
    "SampleList",
    "load_vitos_json",
    "validate_row",
    "convert_parquet",
]

logger = logging.getLogger("vitos_ext.data")

_IMAGE_KEYS = ("image_path", "image", "images", "image_paths")
_KNOWN_KEYS = {*_IMAGE_KEYS, "question", "answer", "bbox", "options", "dataset"}


@dataclass
class Sample:
    """One validated row.

    Attributes:
        image_paths: absolute paths of the row's images (at least one).
        question: the question as stored (may contain ``<image>`` placeholders and inline options).
        answer: the gold answer; normalized to an upper-case letter when the row has options and the answer picks
            one (``"(c)"``, ``"C. text"`` or the option text), otherwise the stripped original text.
        boxes: normalized [x1, y1, x2, y2] boxes (empty for evaluation rows without boxes). With several images
            they refer to the first image.
        options: ordered ``{"A": text, ...}`` (empty for open questions).
        dataset: source dataset name, if given.
        index: position of the row in its source file.
        extra: every other field of the row (e.g. ``think``), untouched.
    """

    image_paths: list[str]
    question: str
    answer: str
    boxes: list[list[float]] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    dataset: str | None = None
    index: int = -1
    extra: dict = field(default_factory=dict)

    def to_record(self, relative_to: str | os.PathLike | None = None) -> dict:
        """The sample as a ViToS JSON record; image paths relative to ``relative_to`` when given."""
        paths = [os.path.relpath(p, relative_to) if relative_to else p for p in self.image_paths]
        record = {"image_path": paths, "question": self.question, "answer": self.answer, "bbox": self.boxes}
        if self.options:
            record["options"] = dict(self.options)
        if self.dataset is not None:
            record["dataset"] = self.dataset
        return {**record, **self.extra}


@dataclass(frozen=True)
class SkippedRow:
    """A row that was not loaded: its index in the source, the reason and details (e.g. the missing path)."""

    index: int
    reason: str
    detail: str = ""


@dataclass
class ValidationReport:
    """What loading found: how many rows were read, which were skipped and why."""

    source: str = ""
    total: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)

    @property
    def loaded(self) -> int:
        """Number of rows that passed validation."""
        return self.total - len(self.skipped)

    @property
    def ok(self) -> bool:
        """True when no row was skipped."""
        return not self.skipped

    def counts(self) -> dict[str, int]:
        """Skipped rows per reason."""
        result: dict[str, int] = {}
        for row in self.skipped:
            result[row.reason] = result.get(row.reason, 0) + 1
        return result

    def to_dict(self) -> dict:
        """JSON-serializable summary with every skipped row."""
        return {
            "source": self.source,
            "total": self.total,
            "loaded": self.loaded,
            "skipped": [row.__dict__ for row in self.skipped],
            "skipped_by_reason": self.counts(),
        }

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.loaded}/{self.total} rows loaded, {len(self.skipped)} skipped"]
        for row in self.skipped:
            lines.append(f"  row {row.index}: {row.reason}" + (f" ({row.detail})" if row.detail else ""))
        return "\n".join(lines)


class SampleList(list):
    """A ``list[Sample]`` that also carries the :class:`ValidationReport` of its loading (``.report``)."""

    def __init__(self, samples: Iterable[Sample] = (), report: ValidationReport | None = None):
        super().__init__(samples)
        self.report = report if report is not None else ValidationReport()


class _RowError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------------------------------------
# row validation


def _image_field(row: dict) -> list:
    for key in _IMAGE_KEYS:
        if key in row and row[key] not in (None, "", []):
            value = row[key]
            return list(value) if isinstance(value, (list, tuple)) else [value]
    raise _RowError("missing image", f"none of the fields {list(_IMAGE_KEYS)}")


def _check_readable(path: str) -> None:
    if is_dicom(path):
        try:
            import pydicom
        except ImportError:
            raise _RowError("unreadable image", f"{path}: pydicom is not installed (pip install pydicom)") from None
        try:
            # defer_size leaves large values (the pixels) on disk: a header check, not a decode
            dataset = pydicom.dcmread(path, defer_size="64 KB")
        except Exception as error:
            raise _RowError("unreadable image", f"{path}: {type(error).__name__}: {error}") from None
        if not any(tag in dataset for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise _RowError("unreadable image", f"{path}: DICOM file without pixel data")
        return
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for corrupt files
        raise _RowError("unreadable image", f"{path}: {type(error).__name__}: {error}") from None


def _resolve_images(values: list, base: Path, verify: bool) -> list[str]:
    paths = []
    for value in values:
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise _RowError("missing image", f"image path {value!r} is not a path")
        path = Path(os.path.expanduser(os.fspath(value)))
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise _RowError("missing image", str(path))
        if verify:
            _check_readable(str(path))
        paths.append(str(path.resolve()))
    return paths


def _parse_boxes(value) -> list[list[float]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _RowError("malformed box", f"bbox string is not JSON: {value[:80]!r}") from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise _RowError("malformed box", f"bbox must be a list, got {type(value).__name__}")
    if len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
        value = [value]
    boxes = []
    for box in value:
        if hasattr(box, "tolist"):
            box = box.tolist()
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise _RowError("malformed box", f"each box needs 4 numbers, got {box!r}")
        try:
            coords = [float(v) for v in box]
        except (TypeError, ValueError):
            raise _RowError("malformed box", f"non-numeric box {box!r}") from None
        if not all(math.isfinite(v) for v in coords):
            raise _RowError("malformed box", f"non-finite box {coords}")
        if not all(0.0 <= v <= 1.0 for v in coords):
            raise _RowError("box outside [0,1]", f"{coords}")
        if coords[2] < coords[0] or coords[3] < coords[1]:
            raise _RowError("malformed box", f"x2 < x1 or y2 < y1 in {coords}")
        boxes.append(coords)
    return boxes


def _options(row: dict, question: str) -> dict[str, str]:
    try:
        options = normalize_options(row.get("options"))
    except ValueError as error:
        raise _RowError("malformed options", str(error)) from None
    return options or split_inline_options(question)


def _answer(row: dict, options: dict[str, str]) -> str:
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool) and math.isfinite(answer):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise _RowError("missing answer")
    letter = extract_choice(answer, options) if options else None
    return letter or answer.strip()


def validate_row(
    row, index: int, image_root: str | os.PathLike, require_boxes: bool = False, verify_images: bool = True
) -> Sample:
    """Validate one row and build its :class:`Sample`.

    Args:
        row: the JSON object.
        index: its position in the source (reported on failure).
        image_root: folder that relative image paths are resolved against.
        require_boxes: a row without ``bbox`` (or with an empty one) is an error ("missing bbox").
        verify_images: open every image to check that it decodes (headers only for DICOM).

    Raises:
        ValueError: with ``reason: detail`` when the row is invalid (``load_vitos_json`` turns these into report
            entries instead).
    """
    try:
        return _validate(row, index, Path(image_root), require_boxes, verify_images)
    except _RowError as error:
        raise ValueError(f"{error.reason}: {error.detail}" if error.detail else error.reason) from None


def _validate(row, index: int, base: Path, require_boxes: bool, verify: bool) -> Sample:
    if not isinstance(row, dict):
        raise _RowError("not an object", type(row).__name__)
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise _RowError("missing question")
    paths = _resolve_images(_image_field(row), base, verify)
    boxes = _parse_boxes(row["bbox"]) if row.get("bbox") is not None else []
    if require_boxes and not boxes:
        raise _RowError("missing bbox")
    options = _options(row, question)
    answer = _answer(row, options)
    dataset = row.get("dataset")
    extra = {k: v for k, v in row.items() if k not in _KNOWN_KEYS}
    return Sample(paths, question, answer, boxes, options, None if dataset is None else str(dataset), index, extra)


def _validate_rows(rows: Iterable, source: str, base: Path, require_boxes: bool, verify: bool) -> SampleList:
    report = ValidationReport(source=source)
    samples = []
    for index, row in enumerate(rows):
        report.total += 1
        try:
            samples.append(_validate(row, index, base, require_boxes, verify))
        except _RowError as error:
            report.skipped.append(SkippedRow(index, error.reason, error.detail))
    if report.skipped:
        logger.warning("%s", report)
    return SampleList(samples, report)


def load_vitos_json(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    require_boxes: bool = False,
    verify_images: bool = True,
) -> SampleList:
    """Load a ViToS-format (or evaluation-format) JSON file, skipping and reporting bad rows.

    Args:
        path: a JSON file holding a list of row objects (a JSON-lines file with one object per line also works).
        image_root: folder for relative image paths; default: the JSON file's folder.
        require_boxes: reject rows without boxes (training data); evaluation data has none.
        verify_images: decode-check every image (PIL ``verify``; DICOM header read). Costs one file open each.

    Returns:
        :class:`SampleList` (a ``list[Sample]``) whose ``.report`` lists skipped rows with reasons: missing image,
        unreadable image, box outside [0,1], malformed box, missing bbox, missing answer, missing question,
        malformed options, not an object.

    Raises:
        FileNotFoundError: ``path`` does not exist. ValueError: the file is not a JSON list / JSON lines.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {path}")
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"path: {path} is neither a JSON list nor JSON lines: {error}") from None
    if isinstance(rows, dict) and isinstance(rows.get("data"), list):
        rows = rows["data"]
    if not isinstance(rows, list):
        raise ValueError(f"path: {path} must hold a JSON list of rows, got {type(rows).__name__}")
    base = Path(image_root) if image_root is not None else path.parent
    return _validate_rows(rows, str(path), base, require_boxes, verify_images)


# ----------------------------------------------------------------------------------------------------------------
# parquet conversion

_MAGIC_SUFFIXES = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"GIF8", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)


def _image_suffix(data: bytes) -> str | None:
    if len(data) > 132 and data[128:132] == b"DICM":
        return ".dcm"
    for magic, suffix in _MAGIC_SUFFIXES:
        if data.startswith(magic):
            return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return None


def _image_bytes(value) -> list[bytes]:
    """Image payloads of one cell: raw bytes, a ``{"bytes", "path"}`` struct (HF datasets), or a list of them."""
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray, memoryview)):
        return [bytes(value)]
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None:
            raise _RowError("missing image", "image struct without bytes")
        return [bytes(data)]
    if isinstance(value, (list, tuple)):
        return [data for item in value for data in _image_bytes(item)]
    raise _RowError("missing image", f"unsupported image cell type {type(value).__name__}")


def _decodable(data: bytes, suffix: str) -> bool:
    if suffix == ".dcm":
        return True  # checked after writing, with pydicom, by the row validation
    try:
        from io import BytesIO

        with Image.open(BytesIO(data)) as image:
            image.verify()
        return True
    except Exception:
        return False


def _import_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError(
            "convert_parquet needs pyarrow: pip install 'vitos_ext[data]' (or pip install pyarrow)"
        ) from error
    return pq


def _iter_parquet_rows(shards: Sequence[Path], batch_size: int) -> Iterator[dict]:
    pq = _import_parquet()
    for shard in shards:
        parquet = pq.ParquetFile(shard)
        for batch in parquet.iter_batches(batch_size=batch_size):
            yield from batch.to_pylist()


def _shard_list(shards) -> list[Path]:
    if isinstance(shards, (str, os.PathLike)):
        shards = [shards]
    paths: list[Path] = []
    for shard in shards:
        shard = Path(shard)
        if shard.is_dir():
            paths.extend(sorted(shard.glob("*.parquet")))
        elif shard.is_file():
            paths.append(shard)
        else:
            raise FileNotFoundError(f"shards: no such file or folder {shard}")
    if not paths:
        raise ValueError("shards: no parquet files found")
    return paths


def _jsonable(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return None


def convert_parquet(
    shards,
    out_dir: str | os.PathLike,
    image_column: str | None = None,
    json_name: str = "data.json",
    require_boxes: bool = False,
    batch_size: int = 256,
) -> Path:
    """Convert parquet shards (image bytes + question + answer + bbox [+ options, dataset, ...]) to ViToS JSON.

    Images are written once per distinct content (SHA-256 of the bytes) to ``out_dir/images/<hash>.<ext>``, so
    duplicated images across rows and shards share one file. Rows that fail validation (no image, undecodable
    bytes, bad boxes, no answer, ...) are left out and listed in ``out_dir/<json stem>.report.json``; the
    conversion continues. Other scalar/list columns are kept as extra fields.

    Args:
        shards: a parquet file, a folder of ``*.parquet`` files, or a list of either.
        out_dir: output folder (created).
        image_column: column holding the images; default: the first of ``image``, ``images``, ``image_bytes``
            present. Cells may be bytes, ``{"bytes": ..., "path": ...}`` structs (HF datasets) or lists of those.
        json_name: name of the JSON file written in ``out_dir``.
        require_boxes: reject rows without a ``bbox``.
        batch_size: rows decoded per parquet batch (bounds memory).

    Returns:
        Path of the written JSON file (image paths relative to ``out_dir``).

    Raises:
        ImportError: pyarrow is not installed. FileNotFoundError / ValueError: bad ``shards``.
    """
    paths = _shard_list(shards)
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    report = ValidationReport(source=", ".join(str(p) for p in paths))
    records, written = [], {}

    for index, row in enumerate(_iter_parquet_rows(paths, batch_size)):
        report.total += 1
        try:
            column = image_column or next((c for c in ("image", "images", "image_bytes") if c in row), None)
            if column is None or column not in row:
                wanted = image_column or "image/images/image_bytes"
                raise _RowError("missing image", f"no image column (looked for {wanted})")
            relative = [_store_image(data, image_dir, written) for data in _image_bytes(row[column])]
            if not relative:
                raise _RowError("missing image", f"empty {column!r} cell")
            record = {k: _jsonable(v) for k, v in row.items() if k != column}
            record["image_path"] = relative
            sample = _validate(record, index, out_dir, require_boxes, verify=True)
        except _RowError as error:
            report.skipped.append(SkippedRow(index, error.reason, error.detail))
            continue
        records.append(sample.to_record(relative_to=out_dir))

    json_path = out_dir / json_name
    json_path.write_text(json.dumps(records, indent=1) + "\n")
    (out_dir / f"{json_path.stem}.report.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    if report.ok:
        logger.info("%s", report)
    else:
        logger.warning("%s", report)
    return json_path


def _store_image(data: bytes, image_dir: Path, written: dict[str, str]) -> str:
    digest = hashlib.sha256(data).hexdigest()
    if digest in written:
        return written[digest]
    suffix = _image_suffix(data)
    if suffix is None or not _decodable(data, suffix):
        raise _RowError("unreadable image", f"{len(data)} bytes that are not a known image format")
    relative = f"images/{digest[:20]}{suffix}"
    target = image_dir.parent / relative
    if not target.exists():
        target.write_bytes(data)
    written[digest] = relative
    return relative
