"""Read medical images as 8-bit RGB for VLM processors: PNG/JPEG (incl. 16-bit grayscale) and DICOM.

DICOM follows the standard display pipeline: stored values -> modality LUT (RescaleSlope/RescaleIntercept) ->
VOI window (the file's WindowCenter/WindowWidth, else a caller default, else CT soft tissue for CT, else the
data range) -> 8 bit, with MONOCHROME1 inverted so that bright always means dense/intense. pydicom is imported
only when a DICOM file is read (extra ``vitos_ext[dicom]``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

__all__ = ["CT_SOFT_TISSUE_WINDOW", "is_dicom", "load_image", "dicom_to_image", "apply_window", "to_rgb_image"]

# (center, width) in Hounsfield units
CT_SOFT_TISSUE_WINDOW = (40.0, 400.0)
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a ``.dcm``/``.dicom`` name or a file with the DICOM preamble magic ``DICM`` at byte 128."""
    path = os.fspath(path)
    if path.lower().endswith(_DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI window (PS3.3 C.11.2.1.2.1) to uint8.

    Args:
        values: array of any shape, modality values (e.g. Hounsfield units), any real dtype.
        center: window center; width: window width (> 0; widths below 1 are treated as 1).

    Returns:
        uint8 array of the same shape: 0 at or below the window, 255 above it, linear in between.
    """
    if not np.isfinite(center) or not np.isfinite(width) or width <= 0:
        raise ValueError(f"window needs a finite center and a positive width, got center={center}, width={width}")
    width = max(float(width), 1.0)
    values = values.astype(np.float64, copy=False)
    low = center - 0.5 - (width - 1.0) / 2.0
    scaled = ((values - (center - 0.5)) / (width - 1.0) + 0.5) if width > 1.0 else (values > low).astype(float)
    scaled = np.where(values <= low, 0.0, scaled)
    scaled = np.where(values > center - 0.5 + (width - 1.0) / 2.0, 1.0, scaled)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def _first(value) -> float | None:
    """First number of a (possibly multi-valued) DICOM attribute, or None."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        candidates = [value]
    else:
        candidates = list(value)
    for candidate in candidates:
        try:
            return float(candidate)
        except (TypeError, ValueError):
            continue
    return None


def _range_to_uint8(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64, copy=False)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, np.uint8)
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (np.nan_to_num(values, nan=low) - low) / (high - low)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def dicom_to_image(dataset, default_window: tuple[float, float] | None = None, frame: int = 0) -> Image.Image:
    """Convert a pydicom ``Dataset`` to an 8-bit RGB image.

    Args:
        dataset: a ``pydicom.Dataset`` with pixel data.
        default_window: (center, width) used when the file has no WindowCenter/WindowWidth. None means: CT soft
            tissue (40/400 HU) for CT, the data's own min..max for other modalities.
        frame: frame index for multi-frame data.

    Returns:
        PIL image, mode "RGB", size (Columns, Rows).
    """
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # pydicom raises several types for missing pixel data / codecs
        raise ValueError(f"cannot decode DICOM pixel data: {error}") from error
    samples = int(getattr(dataset, "SamplesPerPixel", 1) or 1)
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1:
        if not 0 <= frame < frames:
            raise ValueError(f"frame must be in [0, {frames}), got {frame}")
        pixels = pixels[frame]
    if samples == 3:  # color DICOM: pydicom already returns RGB
        return Image.fromarray(_range_to_uint8(pixels) if pixels.dtype != np.uint8 else pixels)

    slope = _first(dataset.get("RescaleSlope"))
    intercept = _first(dataset.get("RescaleIntercept"))
    values = pixels.astype(np.float64) * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)

    center, width = _first(dataset.get("WindowCenter")), _first(dataset.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        if default_window is not None:
            center, width = default_window
        elif str(dataset.get("Modality", "")).upper() == "CT":
            center, width = CT_SOFT_TISSUE_WINDOW
        else:
            center = width = None
    gray = _range_to_uint8(values) if center is None else apply_window(values, center, width)
    if str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(gray).convert("RGB")


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit / float grayscale (common for exported scans): stretch the data range to 8 bits (a plain
        # convert("RGB") clips every value above 255 to white)
        return Image.fromarray(_range_to_uint8(np.asarray(image))).convert("RGB")
    return image.convert("RGB")


def to_rgb_image(value: Image.Image | np.ndarray, where: str = "image") -> Image.Image:
    """An in-memory image as 8-bit RGB, the way :func:`load_image` reads files.

    Args:
        value: a PIL image of any mode (16-bit / float grayscale is stretched from its data range to 8 bits, EXIF
            orientation applied), or a numpy array: uint8 [H, W], [H, W, 3] or [H, W, 4] as is; a grayscale
            [H, W] array of any other integer or float dtype (e.g. a DICOM pixel_array) stretched from its finite
            data range to 8 bits.
        where: the argument's name for error messages.

    Returns:
        PIL image in mode "RGB".
    """
    if isinstance(value, Image.Image):
        return _pil_to_rgb(value)
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{where} must be a PIL image or a numpy array, got {type(value).__name__}")
    if value.dtype == np.uint8 and (value.ndim == 2 or value.ndim == 3 and value.shape[2] in (3, 4)):
        return Image.fromarray(value).convert("RGB")
    if value.ndim == 2 and (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
        return Image.fromarray(_range_to_uint8(value)).convert("RGB")
    raise ValueError(f"{where}: a numpy image must be uint8 [H, W] / [H, W, 3] / [H, W, 4], or a grayscale [H, W] "
                     f"array of another integer or float dtype; got {value.dtype} {value.shape}")


def load_image(
    path: str | os.PathLike,
    default_window: tuple[float, float] | None = None,
    frame: int = 0,
) -> Image.Image:
    """Load a PNG/JPEG/other PIL-readable image or a DICOM file as 8-bit RGB.

    Args:
        path: local file path.
        default_window: DICOM only: (center, width) when the file has no window (see :func:`dicom_to_image`),
            e.g. ``CT_SOFT_TISSUE_WINDOW``.
        frame: DICOM only: frame of a multi-frame file.

    Returns:
        PIL image in mode "RGB", fully loaded (the file is closed).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be decoded as an image.
        ImportError: a DICOM file is read but pydicom is not installed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if is_dicom(path):
        try:
            import pydicom
        except ImportError as error:
            raise ImportError("reading DICOM needs pydicom: pip install 'vitos_ext[dicom]' (or pydicom)") from error
        try:
            dataset = pydicom.dcmread(path)
        except Exception as error:
            raise ValueError(f"unreadable DICOM file {path}: {error}") from error
        return dicom_to_image(dataset, default_window=default_window, frame=frame)
    try:
        with Image.open(path) as image:
            image.load()
            return _pil_to_rgb(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"unreadable image file {path}: {error}") from error
