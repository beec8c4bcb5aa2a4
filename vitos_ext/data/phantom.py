"""Synthetic scan-like multiple-choice VQA ("phantom") for offline training, tests and demos.

Each image looks like an axial CT slice: dark air, an elliptical body with skin and fat layers, organ-like blobs,
a vertebra, smooth texture and noise, often a scanner table. One or two small lesions of a single appearance
class are placed inside the body; the class is the answer of a multiple-choice question and the lesion boxes
are the grounding targets. Lesions are small (a correct box keeps at most about half of Qwen2.5-VL's merged
visual tokens at 112 px, far fewer at 224 px) and the four classes differ in a way a tiny model can learn:

    hyperdense nodule       solid bright disk
    hypodense cyst          solid dark disk
    ring-enhancing lesion   bright rim around a dark center
    speckled calcification  bright dots scattered over tissue

Everything is a pure function of the seed (numpy ``default_rng``); sample ``i`` of a dataset depends only on
``(seed, i)``, not on how many samples are written.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "LESION_CLASSES",
    "PHANTOM_QUESTION",
    "Lesion",
    "ScanImage",
    "make_scan_like_image",
    "make_phantom_record",
    "write_phantom_dataset",
    "phantom_vocabulary",
]

LESION_CLASSES: tuple[str, ...] = (
    "hyperdense nodule",
    "hypodense cyst",
    "ring-enhancing lesion",
    "speckled calcification",
)
PHANTOM_QUESTION = "What kind of lesion is shown?"
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# lesion radius as a fraction of min(width, height); 0.085 * 112 px < 14 px keeps a lesion within 2x2 merged tokens
_RADIUS_RANGE = (0.055, 0.085)
_SECOND_LESION_PROBABILITY = 0.3
_TISSUE = 0.42  # soft-tissue gray level that lesions are drawn against
# look-alikes (vessels, bowel loops, calcified plaques): elongated, so shape tells them from the round lesions
_LOOKALIKE_ASPECT = (2.6, 3.4)
# mimics (contrast-filled bowel, fluid-filled organs, calcified masses): organ-sized, so size tells them from lesions
_MIMIC_SEMI_AXIS = (0.15, 0.2)  # fraction of min(width, height); lesions' radii are 0.055-0.085
_MIMIC_ROUNDNESS = (0.75, 1.0)  # short / long semi-axis


@dataclass(frozen=True)
class Lesion:
    """One lesion. ``center`` is normalized (x, y) in [0, 1]; ``radius`` is a fraction of min(width, height)."""

    kind: str
    center: tuple[float, float]
    radius: float

    def box(self, width: int, height: int) -> list[float]:
        """Normalized [x1, y1, x2, y2] box of the lesion in an image of the given size, clipped to [0, 1]."""
        radius_px = self.radius * min(width, height)
        cx, cy = self.center[0] * width, self.center[1] * height
        x1, x2 = (cx - radius_px) / width, (cx + radius_px) / width
        y1, y2 = (cy - radius_px) / height, (cy + radius_px) / height
        return [min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2)]


@dataclass
class ScanImage:
    """A rendered phantom: grayscale image (PIL mode "L"), its lesions and their normalized boxes."""

    image: Image.Image
    lesions: list[Lesion]
    boxes: list[list[float]] = field(default_factory=list)

    @property
    def kinds(self) -> list[str]:
        """Lesion classes, one per lesion."""
        return [lesion.kind for lesion in self.lesions]


# ----------------------------------------------------------------------------------------------------------------
# rendering helpers (float images in [0, 1], pixel-center coordinates)


def _grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    return xs + 0.5, ys + 0.5


def _ellipse_radius(xs, ys, cx, cy, ax, ay, angle=0.0) -> np.ndarray:
    """Normalized elliptic radius: < 1 inside the ellipse."""
    cos, sin = math.cos(angle), math.sin(angle)
    dx, dy = xs - cx, ys - cy
    u = (dx * cos + dy * sin) / ax
    v = (-dx * sin + dy * cos) / ay
    return np.sqrt(u * u + v * v)


def _soft_inside(radius_map: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased inside mask from a normalized radius map; ``edge`` is the ramp width in radius units."""
    return np.clip((1.0 - radius_map) / max(edge, 1e-6) + 0.5, 0.0, 1.0)


def _disk_coverage(xs, ys, cx, cy, radius) -> np.ndarray:
    """Fraction of each pixel covered by a disk (1-pixel linear ramp at the border)."""
    return np.clip(radius - np.hypot(xs - cx, ys - cy) + 0.5, 0.0, 1.0)


def _blend(canvas: np.ndarray, alpha: np.ndarray, value) -> None:
    canvas *= 1.0 - alpha
    canvas += alpha * value


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cell: int) -> np.ndarray:
    """Zero-mean, unit-ish amplitude noise that varies over ``cell`` pixels (bilinear upsampled)."""
    small = rng.standard_normal((max(2, height // cell), max(2, width // cell))).astype(np.float32)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=np.float64)


@dataclass(frozen=True)
class _Body:
    cx: float
    cy: float
    ax: float
    ay: float
    spine: tuple[float, float, float]  # cx, cy, radius in pixels


def _draw_anatomy(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, _Body]:
    xs, ys = _grid(width, height)
    canvas = 0.03 + 0.01 * rng.standard_normal((height, width))
    body = _Body(
        cx=width * rng.uniform(0.47, 0.53),
        cy=height * rng.uniform(0.45, 0.51),
        ax=width * rng.uniform(0.40, 0.46),
        ay=height * rng.uniform(0.31, 0.37),
        spine=(0.0, 0.0, 0.0),
    )
    edge = 1.5 / min(body.ax, body.ay)
    r_body = _ellipse_radius(xs, ys, body.cx, body.cy, body.ax, body.ay)
    _blend(canvas, _soft_inside(r_body, edge), 0.58)  # skin
    _blend(canvas, _soft_inside(r_body / 0.96, edge), 0.28)  # subcutaneous fat
    _blend(canvas, _soft_inside(r_body / 0.88, edge), _TISSUE)  # muscle / soft tissue

    # organ-like blobs, slightly brighter or darker than soft tissue
    for _ in range(int(rng.integers(2, 4))):
        angle = rng.uniform(0.0, math.pi)
        bx = body.cx + body.ax * rng.uniform(-0.45, 0.45)
        by = body.cy + body.ay * rng.uniform(-0.45, 0.25)
        axes = (body.ax * rng.uniform(0.18, 0.32), body.ay * rng.uniform(0.18, 0.32))
        r_blob = _ellipse_radius(xs, ys, bx, by, *axes, angle)
        _blend(canvas, 0.8 * _soft_inside(r_blob, 0.15), _TISSUE + rng.choice([-1.0, 1.0]) * rng.uniform(0.06, 0.12))

    # vertebral body: a wide bright ellipse at the posterior midline
    spine = (body.cx, body.cy + 0.68 * body.ay, 0.13 * body.ay)
    r_spine = _ellipse_radius(xs, ys, spine[0], spine[1], 1.3 * spine[2], spine[2])
    _blend(canvas, _soft_inside(r_spine, 0.2), 0.8)

    texture = _smooth_noise(rng, width, height, cell=max(4, min(width, height) // 16))
    canvas += 0.035 * texture * _soft_inside(r_body / 0.88, edge)

    table_y = body.cy + body.ay + 0.06 * height
    if rng.uniform() < 0.7 and table_y < height - 3:
        _blend(canvas, np.clip(1.5 - np.abs(ys - table_y), 0.0, 1.0), 0.5)
    return canvas, _Body(body.cx, body.cy, body.ax, body.ay, spine)


def _draw_textured_region(canvas: np.ndarray, kind: str, inside: np.ndarray, core: np.ndarray,
                          dot_centers: list[tuple[float, float]], dot_radius: float) -> None:
    """Paint a region (soft mask ``inside``; ``core`` its inner part for the ring class) with the look of ``kind``."""
    height, width = canvas.shape
    xs, ys = _grid(width, height)
    if kind == "hyperdense nodule":
        _blend(canvas, inside, 0.92)
    elif kind == "hypodense cyst":
        _blend(canvas, inside, 0.08)
    elif kind == "ring-enhancing lesion":
        _blend(canvas, inside, 0.92)
        _blend(canvas, core, 0.14)
    else:  # speckled: bright dots over flat tissue
        _blend(canvas, inside, _TISSUE)
        for dx, dy in dot_centers:
            _blend(canvas, _disk_coverage(xs, ys, dx, dy, dot_radius), 0.97)


def _draw_lesion(canvas: np.ndarray, rng: np.random.Generator, lesion: Lesion) -> None:
    if lesion.kind not in LESION_CLASSES:
        raise ValueError(f"lesion kind must be one of {LESION_CLASSES}, got {lesion.kind!r}")
    height, width = canvas.shape
    xs, ys = _grid(width, height)
    cx, cy = lesion.center[0] * width, lesion.center[1] * height
    radius = lesion.radius * min(width, height)
    dots, dot_radius = [], max(0.9, 0.17 * radius)
    if lesion.kind == "speckled calcification":  # the speckle is the only signal: flat tissue under the dots
        for _ in range(int(rng.integers(6, 10))):
            angle, distance = rng.uniform(0, 2 * math.pi), (radius - dot_radius) * math.sqrt(rng.uniform())
            dots.append((cx + distance * math.cos(angle), cy + distance * math.sin(angle)))
    _draw_textured_region(canvas, lesion.kind, _disk_coverage(xs, ys, cx, cy, radius),
                          _disk_coverage(xs, ys, cx, cy, 0.55 * radius), dots, dot_radius)


def _body_point(rng: np.random.Generator, body: _Body) -> tuple[float, float]:
    """A random pixel position inside the inner 72% of the body ellipse (area-uniform)."""
    angle, distance = rng.uniform(0, 2 * math.pi), 0.72 * math.sqrt(rng.uniform())
    return body.cx + distance * body.ax * math.cos(angle), body.cy + distance * body.ay * math.sin(angle)


def _touches_spine(cx: float, cy: float, reach: float, body: _Body) -> bool:
    """Whether a structure reaching ``reach`` pixels from (cx, cy) comes within 2 pixels of the vertebra."""
    return math.hypot(cx - body.spine[0], cy - body.spine[1]) < 1.4 * body.spine[2] + reach + 2


def _lookalike_axes(radius_px: float, aspect: float) -> tuple[float, float]:
    """Semi-axes (long, short) in pixels of a look-alike with the area of a lesion of ``radius_px``."""
    return radius_px * math.sqrt(aspect), radius_px / math.sqrt(aspect)


def _draw_lookalike(canvas: np.ndarray, rng: np.random.Generator, kind: str, center: tuple[float, float],
                    radius_px: float, aspect: float, angle: float) -> None:
    """An elongated structure with the appearance of lesion class ``kind`` (not a lesion: no box, not the answer)."""
    height, width = canvas.shape
    xs, ys = _grid(width, height)
    long_axis, short_axis = _lookalike_axes(radius_px, aspect)
    inside = _soft_inside(_ellipse_radius(xs, ys, *center, long_axis, short_axis, angle), 1.0 / short_axis)
    core = _soft_inside(_ellipse_radius(xs, ys, *center, 0.7 * long_axis, 0.45 * short_axis, angle), 2.0 / short_axis)
    dots, dot_radius = [], max(0.9, 0.17 * radius_px)
    if kind == "speckled calcification":  # dots strung along the long axis
        for _ in range(int(rng.integers(5, 8))):
            along = rng.uniform(-0.85, 0.85) * long_axis
            dots.append((center[0] + along * math.cos(angle), center[1] + along * math.sin(angle)))
    _draw_textured_region(canvas, kind, inside, core, dots, dot_radius)


def _place_distractors(canvas: np.ndarray, rng: np.random.Generator, count: int, avoid_kind: str,
                       lesions: Sequence[Lesion], try_one) -> None:
    """``count`` distractors with the look of lesion classes other than ``avoid_kind``, clear of the lesions and of
    each other. ``try_one(kind, taken)`` makes one placement attempt (drawing on success) and returns the placed
    structure's (x, y, reach) in pixels or None; up to 200 attempts per distractor."""
    height, width = canvas.shape
    side = min(width, height)
    kinds = [k for k in LESION_CLASSES if k != avoid_kind]
    taken = [(lesion.center[0] * width, lesion.center[1] * height, lesion.radius * side) for lesion in lesions]
    for _ in range(count):
        kind = kinds[int(rng.integers(len(kinds)))]
        for _ in range(200):
            placed = try_one(kind, taken)
            if placed is not None:
                taken.append(placed)
                break


def _draw_lookalikes(canvas: np.ndarray, rng: np.random.Generator, count: int, avoid_kind: str,
                     lesions: Sequence[Lesion], body: _Body) -> None:
    """``count`` elongated, lesion-sized look-alikes (see :func:`make_scan_like_image`)."""
    side = min(canvas.shape)

    def try_one(kind, taken):
        radius_px = rng.uniform(*_RADIUS_RANGE) * side
        aspect, angle = rng.uniform(*_LOOKALIKE_ASPECT), rng.uniform(0.0, math.pi)
        reach = _lookalike_axes(radius_px, aspect)[0]
        cx, cy = _body_point(rng, body)
        if _touches_spine(cx, cy, reach, body):
            return None
        tips = [(cx + sign * reach * math.cos(angle), cy + sign * reach * math.sin(angle)) for sign in (-1, 1)]
        if any(math.hypot((x - body.cx) / body.ax, (y - body.cy) / body.ay) > 0.82 for x, y in tips):
            return None  # both ends inside the soft tissue
        if any(math.hypot(cx - x, cy - y) < reach + r + 4 for x, y, r in taken):
            return None
        _draw_lookalike(canvas, rng, kind, (cx, cy), radius_px, aspect, angle)
        return cx, cy, reach

    _place_distractors(canvas, rng, count, avoid_kind, lesions, try_one)


def _draw_mimics(canvas: np.ndarray, rng: np.random.Generator, count: int, avoid_kind: str,
                 lesions: Sequence[Lesion], body: _Body) -> None:
    """``count`` organ-sized mimics: the lesions' textures, only much larger (size is what tells them apart)."""
    height, width = canvas.shape
    side = min(width, height)
    xs, ys = _grid(width, height)
    dot_radius = max(0.9, 0.17 * 0.07 * side)  # the lesions' dots

    def try_one(kind, taken):
        long_axis = rng.uniform(*_MIMIC_SEMI_AXIS) * side
        short_axis = long_axis * rng.uniform(*_MIMIC_ROUNDNESS)
        angle = rng.uniform(0.0, math.pi)
        cx, cy = _body_point(rng, body)
        if _touches_spine(cx, cy, long_axis, body):
            return None
        rim = [(cx + long_axis * math.cos(a), cy + long_axis * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 12)]
        if any(math.hypot((x - body.cx) / body.ax, (y - body.cy) / body.ay) > 0.85 for x, y in rim):
            return None  # inside the soft tissue
        if any(math.hypot(cx - x, cy - y) < long_axis + r + 3 for x, y, r in taken):
            return None
        radius_map = _ellipse_radius(xs, ys, cx, cy, long_axis, short_axis, angle)
        dots = []
        for _ in range(int(rng.integers(14, 22))):  # scattered over the inner 85% of the ellipse
            a, d = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform()) * 0.85
            u, v = d * long_axis * math.cos(a), d * short_axis * math.sin(a)
            dots.append((cx + u * math.cos(angle) - v * math.sin(angle),
                         cy + u * math.sin(angle) + v * math.cos(angle)))
        _draw_textured_region(canvas, kind, _soft_inside(radius_map, 1.0 / short_axis),
                              _soft_inside(radius_map / 0.55, 1.0 / short_axis), dots, dot_radius)
        return cx, cy, long_axis

    _place_distractors(canvas, rng, count, avoid_kind, lesions, try_one)


def _place_lesions(
    rng: np.random.Generator, kinds: Sequence[str], width: int, height: int, body: _Body
) -> list[Lesion]:
    """Random non-overlapping lesions inside the body, away from the skin and the vertebra."""
    side = min(width, height)
    placed: list[Lesion] = []
    for kind in kinds:
        for _ in range(200):
            radius = rng.uniform(*_RADIUS_RANGE)
            cx, cy = _body_point(rng, body)
            r_px = radius * side
            if _touches_spine(cx, cy, r_px, body):
                continue
            if any(
                math.hypot(cx - o.center[0] * width, cy - o.center[1] * height) < r_px + o.radius * side + 3
                for o in placed
            ):
                continue
            placed.append(Lesion(kind, (cx / width, cy / height), radius))
            break
        else:  # pragma: no cover - only for absurdly small images
            raise ValueError(f"could not place {len(kinds)} lesion(s) in a {width}x{height} image")
    return placed


def _check_count(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _size(image_size) -> tuple[int, int]:
    if isinstance(image_size, int):
        width = height = image_size
    else:
        try:
            width, height = (int(v) for v in image_size)
        except (TypeError, ValueError):
            raise ValueError(f"image_size must be an int or (width, height), got {image_size!r}") from None
    if width < 32 or height < 32:
        raise ValueError(f"image_size must be at least 32x32, got {width}x{height}")
    return width, height


def make_scan_like_image(image_size=112, lesions=None, seed=0, lookalikes: int = 0, mimics: int = 0) -> ScanImage:
    """Render one scan-like grayscale image with known lesion boxes.

    Args:
        image_size: int (square) or (width, height) in pixels, at least 32.
        lesions: None (one lesion of a random class), or a sequence whose items are a class name from
            :data:`LESION_CLASSES` (placed at random inside the body) or a :class:`Lesion` (drawn where given).
        seed: int or sequence of ints for ``numpy.random.default_rng``.
        lookalikes: number of distractors to draw (vessels, bowel loops, plaques): elongated structures that look
            like a lesion class other than the first lesion's, placed clear of the lesions. They are not lesions:
            no box, not the answer; only their shape (elongated, lesions are round) tells them apart. 0 draws none
            and leaves the image exactly as without this argument.
        mimics: number of organ-sized structures (contrast-filled bowel, fluid-filled organs, calcified masses) with
            the texture of a lesion class other than the first lesion's, placed clear of the lesions. Not lesions:
            no box, not the answer; their size (semi-axes 0.15-0.2 of the image side against lesion radii of
            0.055-0.085) tells them apart. 0 draws none and leaves the image exactly as without it.

    Returns:
        :class:`ScanImage` with ``image`` (PIL "L", ``image_size``), ``lesions`` and normalized ``boxes``
        (one [x1, y1, x2, y2] per lesion, same order).
    """
    width, height = _size(image_size)
    rng = np.random.default_rng(seed)
    canvas, body = _draw_anatomy(rng, width, height)
    if lesions is None:
        lesions = [LESION_CLASSES[int(rng.integers(len(LESION_CLASSES)))]]
    if isinstance(lesions, (str, Lesion)) or not isinstance(lesions, Sequence):
        raise ValueError("lesions must be None or a sequence of class names / Lesion objects")
    for item in lesions:
        kind = item.kind if isinstance(item, Lesion) else item
        if kind not in LESION_CLASSES:
            raise ValueError(f"lesions: unknown class {kind!r}; expected one of {LESION_CLASSES}")
    random_kinds = [item for item in lesions if isinstance(item, str)]
    placed = iter(_place_lesions(rng, random_kinds, width, height, body))
    resolved = [item if isinstance(item, Lesion) else next(placed) for item in lesions]
    _check_count("lookalikes", lookalikes)
    _check_count("mimics", mimics)
    for lesion in resolved:
        _draw_lesion(canvas, rng, lesion)
    if mimics and resolved:  # after the lesions, so that these are drawn exactly as without mimics
        _draw_mimics(canvas, rng, mimics, resolved[0].kind, resolved, body)
    if lookalikes and resolved:
        _draw_lookalikes(canvas, rng, lookalikes, resolved[0].kind, resolved, body)
    canvas += 0.012 * rng.standard_normal(canvas.shape)  # acquisition noise, after the lesions like in a scan
    pixels = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    return ScanImage(Image.fromarray(pixels), resolved, [lesion.box(width, height) for lesion in resolved])


# ----------------------------------------------------------------------------------------------------------------
# question/answer records


def _location(lesion: Lesion) -> str:
    vertical = "upper" if lesion.center[1] < 0.5 else "lower"
    horizontal = "left" if lesion.center[0] < 0.5 else "right"
    return f"{vertical} {horizontal}"


def _think(lesions: Sequence[Lesion]) -> str:
    places = ", ".join(_location(lesion) for lesion in lesions)
    return f"Lesion: {lesions[0].kind}. Location: {places}."


def make_phantom_record(
    index: int,
    seed: int = 0,
    image_size=112,
    max_lesions: int = 2,
    shuffle_options: bool = False,
    lookalikes: int = 0,
    mimics: int = 0,
) -> tuple[dict, Image.Image]:
    """Build sample ``index`` of a phantom dataset: its JSON record (without ``image_path``) and its image.

    The class is balanced over consecutive indices (``(index + offset(seed)) % 4``); the number of lesions is 1,
    or 2 with probability 0.3 when ``max_lesions >= 2``. Option order is fixed (A = hyperdense nodule, ...) unless
    ``shuffle_options`` is True. ``lookalikes`` > 0 adds 1 to ``lookalikes`` distractors per image and ``mimics``
    > 0 adds 1 to ``mimics`` organ-sized mimics (see :func:`make_scan_like_image`); 0 leaves every record and image
    exactly as before the option existed.

    Returns:
        (record, image) where record has ``question`` (``"<image>"`` + question + inline options), ``answer``
        (a letter), ``bbox`` (normalized boxes, 4 decimals), ``options`` (letter -> text), ``think`` (a short
        finding, usable as the SFT reasoning), ``lesion_class`` and ``dataset`` ("phantom").
    """
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    if not isinstance(max_lesions, int) or max_lesions < 1:
        raise ValueError(f"max_lesions must be an int >= 1, got {max_lesions!r}")
    rng = np.random.default_rng([int(seed), int(index)])
    offset = int(np.random.default_rng([int(seed)]).integers(len(LESION_CLASSES)))
    kind = LESION_CLASSES[(int(index) + offset) % len(LESION_CLASSES)]
    _check_count("lookalikes", lookalikes)
    _check_count("mimics", mimics)
    count = 2 if max_lesions >= 2 and rng.uniform() < _SECOND_LESION_PROBABILITY else 1
    image_seed = rng.integers(2**63 - 1)
    distractors = int(rng.integers(1, lookalikes + 1)) if lookalikes else 0
    organ_mimics = int(rng.integers(1, mimics + 1)) if mimics else 0
    scan = make_scan_like_image(image_size, [kind] * count, seed=image_seed, lookalikes=distractors,
                                mimics=organ_mimics)

    order = list(LESION_CLASSES)
    if shuffle_options:
        order = [order[i] for i in rng.permutation(len(order))]
    options = {_LETTERS[i]: text for i, text in enumerate(order)}
    answer = _LETTERS[order.index(kind)]
    inline = "\n".join(f"{letter}. {text}" for letter, text in options.items())
    record = {
        "question": f"<image>{PHANTOM_QUESTION}\n{inline}",
        "answer": answer,
        "bbox": [[round(v, 4) for v in box] for box in scan.boxes],
        "options": options,
        "think": _think(scan.lesions),
        "lesion_class": kind,
        "dataset": "phantom",
    }
    return record, scan.image


def write_phantom_dataset(
    out_dir: str | os.PathLike,
    num_samples: int,
    seed: int = 0,
    image_size=112,
    split: str = "train",
    max_lesions: int = 2,
    shuffle_options: bool = False,
    lookalikes: int = 0,
    mimics: int = 0,
) -> Path:
    """Write a phantom dataset in the ViToS JSON format: ``{out_dir}/{split}.json`` + ``{out_dir}/images/*.png``.

    Image paths in the JSON are relative to ``out_dir`` (the loader resolves them against the JSON's folder).
    Use different ``seed`` values for train and test splits. See :func:`make_phantom_record` for the fields,
    ``lookalikes`` (lesion-sized distractors) and ``mimics`` (organ-sized ones).

    Returns:
        Path of the JSON file.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not split or not all(c.isalnum() or c in "-_" for c in split):
        raise ValueError(f"split must be a non-empty name of letters, digits, '-' or '_', got {split!r}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(num_samples):
        record, image = make_phantom_record(index, seed, image_size, max_lesions, shuffle_options, lookalikes,
                                            mimics)
        relative = f"images/{split}_{index:05d}.png"
        image.save(out_dir / relative, format="PNG")
        records.append({"image_path": [relative], **record})
    json_path = out_dir / f"{split}.json"
    json_path.write_text(json.dumps(records, indent=1) + "\n")
    return json_path


def phantom_vocabulary() -> list[str]:
    """Words used by phantom questions, options and reasoning (for building a tiny tokenizer)."""
    texts = [PHANTOM_QUESTION, "Lesion: Location: upper lower left right", *LESION_CLASSES]
    words = []
    for text in texts:
        for word in "".join(c if c.isalpha() else " " for c in text).split():
            if word not in words:
                words.append(word)
    return words
