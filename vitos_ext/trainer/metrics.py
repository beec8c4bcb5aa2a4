"""Metrics: a JSON-lines log and a PNG of the reward / IoU / accuracy curves (drawn with PIL, no matplotlib)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = ["MetricsLogger", "read_metrics", "plot_curves", "DEFAULT_PANELS"]

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


class MetricsLogger:
    """Append one JSON object per line to ``path`` (created with its folder; appends on resume)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record; non-finite floats are written as null (valid JSON)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")

    def truncate_after(self, global_step: int) -> None:
        """Drop records logged after ``global_step`` (a resumed run re-logs those steps)."""
        if not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if int(r.get("global_step", 0)) <= global_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


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
