"""Metrics: a JSON-lines log, optional TensorBoard / Weights & Biases trackers fed the same records, and a PNG of the
reward / IoU / accuracy curves (drawn with PIL, no matplotlib)."""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .config import REPORT_TARGETS

__all__ = ["MetricsLogger", "TensorBoardSink", "WandbSink", "make_sinks", "read_metrics", "plot_curves",
           "DEFAULT_PANELS"]

# panel title -> metric keys drawn in it
DEFAULT_PANELS: dict[str, tuple[str, ...]] = {
    "reward (total)": ("grounding/reward/total", "sparse/reward/total"),
    "IoU": ("grounding/reward/iou", "grounding/reward/precision", "eval/iou"),
    "accuracy": ("grounding/reward/accuracy", "sparse/reward/accuracy", "eval/accuracy_full", "eval/accuracy_sparse"),
    "format / kept ratio": ("grounding/reward/format", "sparse/reward/format", "sparse/kept_ratio"),
    "GRPO loss": ("grounding/loss", "sparse/loss"),
    "SFT loss": ("sft/loss",),
}
_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


# record keys that are the x axis, not curves
_STEP_KEYS = ("global_step", "phase_step")


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The entries of a record a tracker can draw: finite numbers (strings such as the phase name are left out)."""
    return {key: float(value) for key, value in record.items()
            if key not in _STEP_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


class MetricsLogger:
    """Append one JSON object per line to ``path`` (created with its folder; appends on resume) and hand every record
    to the trackers in ``sinks`` (see :func:`make_sinks`), keyed by the record's ``global_step``."""

    def __init__(self, path: str | os.PathLike, sinks: list | tuple = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sinks = list(sinks)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record; non-finite floats are written as null (valid JSON)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")
        step = int(record.get("global_step", 0))
        for sink in self.sinks:
            sink.log(record, step)

    def truncate_after(self, global_step: int) -> None:
        """Drop records logged after ``global_step`` (a resumed run re-logs those steps)."""
        for sink in self.sinks:
            sink.truncate_after(global_step)
        if not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if int(r.get("global_step", 0)) <= global_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def flush(self) -> None:
        """Push what the trackers buffer to disk (metrics.jsonl itself is written record by record)."""
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        """End the trackers' runs (the JSONL log needs no closing)."""
        for sink in self.sinks:
            sink.close()


class TensorBoardSink:
    """The scalars of every record as TensorBoard events in ``log_dir`` (x = global step).

    A resumed run hides the events it logs again: the writer opened after :meth:`truncate_after` purges every
    event at a later step from the earlier files (TensorBoard's ``purge_step``).
    """

    def __init__(self, log_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            raise ImportError("report_to includes 'tensorboard', which needs the tensorboard package "
                              "(pip install tensorboard)") from None
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self._writer = None
        self._purge_step: int | None = None

    def log(self, record: dict[str, Any], step: int) -> None:
        if self._writer is None:  # opened on first use, so a resume can still set the purge step
            self._writer = self._writer_class(str(self.log_dir), purge_step=self._purge_step)
            self._purge_step = None
        for key, value in _scalars(record).items():
            self._writer.add_scalar(key, value, step)

    def truncate_after(self, global_step: int) -> None:
        self.close()
        self._purge_step = global_step + 1

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbSink:
    """The scalars of every record in a Weights & Biases run, against a ``global_step`` axis.

    The run id is kept in ``<output_dir>/wandb_run_id``, so a resumed training continues the same run, as does a
    record logged after :meth:`close` (e.g. ``trainer.evaluate()`` after ``train()``). W&B cannot
    delete history: steps a resumed run repeats appear twice there (metrics.jsonl and TensorBoard keep one copy).
    The project is ``$WANDB_PROJECT`` or "vitos-ext"; entity, mode (e.g. ``WANDB_MODE=offline``) and credentials come
    from wandb's own environment variables.
    """

    def __init__(self, output_dir: str | os.PathLike, run_name: str, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ImportError("report_to includes 'wandb', which needs the wandb package (pip install wandb)") from None
        output_dir = Path(output_dir)
        id_file = output_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        self._init_kwargs = dict(project=os.environ.get("WANDB_PROJECT", "vitos-ext"), name=run_name, id=run_id,
                                 resume="allow", dir=str(output_dir), config=config)
        self._wandb = wandb
        self.run = None
        self._open()
        id_file.write_text(run_id + "\n")

    def _open(self) -> None:
        self.run = self._wandb.init(**self._init_kwargs)
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is None:
            self._open()
        self.run.log({**_scalars(record), "global_step": step})

    def truncate_after(self, global_step: int) -> None:
        pass  # see the class docstring

    def flush(self) -> None:
        pass  # wandb streams records in its own process

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def make_sinks(report_to: tuple[str, ...] | list[str], output_dir: str | os.PathLike, run_name: str | None = None,
               config: dict[str, Any] | None = None) -> list:
    """The trackers named in ``report_to`` ("tensorboard", "wandb"); a missing package raises ImportError naming it.

    TensorBoard writes to ``<output_dir>/tensorboard``; ``run_name`` (default: the output folder's name) names the
    W&B run, and ``config`` (the TrainerConfig as a dict) is stored with it.
    """
    output_dir = Path(output_dir)
    run_name = run_name or output_dir.resolve().name
    sinks = []
    for name in report_to:
        if name == "tensorboard":
            sinks.append(TensorBoardSink(output_dir / "tensorboard"))
        elif name == "wandb":
            sinks.append(WandbSink(output_dir, run_name, config or {}))
        else:
            raise ValueError(f"report_to: unknown tracker {name!r}; known: {', '.join(REPORT_TARGETS)}")
    return sinks


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file (unparsable lines are skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _series(records: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    points = []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            points.append((float(record.get("global_step", len(points))), float(value)))
    return points


def _draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
                series: dict[str, list[tuple[float, float]]], font) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, outline=(180, 180, 180))
    draw.text((left + 6, top + 4), title, fill=(0, 0, 0), font=font)
    plot = (left + 44, top + 22, right - 10, bottom - 40)
    points = [p for values in series.values() for p in values]
    if not points:
        draw.text((plot[0], plot[1] + 10), "no data", fill=(120, 120, 120), font=font)
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_lo, y_hi = min(ys), max(ys)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    scale_x = lambda x: plot[0] + (x - x_lo) / (x_hi - x_lo) * (plot[2] - plot[0])  # noqa: E731
    scale_y = lambda y: plot[3] - (y - y_lo) / (y_hi - y_lo) * (plot[3] - plot[1])  # noqa: E731
    draw.line([(plot[0], plot[3]), (plot[2], plot[3])], fill=(90, 90, 90))
    draw.line([(plot[0], plot[1]), (plot[0], plot[3])], fill=(90, 90, 90))
    for value in (y_lo, y_hi):
        draw.text((left + 4, scale_y(value) - 5), f"{value:.2f}", fill=(60, 60, 60), font=font)
    draw.text((plot[0], plot[3] + 2), f"{x_lo:g}", fill=(60, 60, 60), font=font)
    draw.text((plot[2] - 30, plot[3] + 2), f"{x_hi:g}", fill=(60, 60, 60), font=font)
    legend_x = plot[0]
    for index, (name, values) in enumerate(series.items()):
        color = _COLORS[index % len(_COLORS)]
        coords = [(scale_x(x), scale_y(y)) for x, y in values]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        for x, y in coords if len(coords) <= 12 else coords[-1:]:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        draw.text((legend_x, bottom - 22), name, fill=color, font=font)
        legend_x += 7 * len(name) + 12


def plot_curves(metrics_path: str | os.PathLike, png_path: str | os.PathLike,
                panels: dict[str, tuple[str, ...]] | None = None, width: int = 1100) -> Path:
    """Draw the curves of a metrics JSONL file into a PNG (one panel per entry of ``panels``; x = global step).

    Series without data are omitted; a panel without any data says so. Returns the PNG path.
    """
    panels = panels if panels is not None else DEFAULT_PANELS
    records = read_metrics(metrics_path)
    panel_height = 230
    image = Image.new("RGB", (width, panel_height * len(panels) + 10), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for index, (title, keys) in enumerate(panels.items()):
        series = {key: _series(records, key) for key in keys}
        series = {key: values for key, values in series.items() if values}
        top = 5 + index * panel_height
        _draw_panel(draw, (5, top, width - 5, top + panel_height - 8), title, series, font)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(png_path)
    return png_path
