"""Data: ViToS JSON / parquet loading with validation, medical image reading (PNG/JPEG/DICOM), phantom data."""

from .dataset import (
    Sample,
    SampleList,
    SkippedRow,
    ValidationReport,
    convert_parquet,
    load_vitos_json,
    validate_row,
)
from .images import (CT_SOFT_TISSUE_WINDOW, apply_window, dicom_to_image, is_dicom, load_image,
                     to_rgb_image)
from .phantom import (
    LESION_CLASSES,
    PHANTOM_QUESTION,
    Lesion,
    ScanImage,
    make_phantom_record,
    make_scan_like_image,
    phantom_vocabulary,
    write_phantom_dataset,
)

__all__ = [
    "Sample",
    "SampleList",
    "SkippedRow",
    "ValidationReport",
    "convert_parquet",
    "load_vitos_json",
    "validate_row",
    "CT_SOFT_TISSUE_WINDOW",
    "apply_window",
    "dicom_to_image",
    "is_dicom",
    "load_image",
    "to_rgb_image",
    "LESION_CLASSES",
    "PHANTOM_QUESTION",
    "Lesion",
    "ScanImage",
    "make_phantom_record",
    "make_scan_like_image",
    "phantom_vocabulary",
    "write_phantom_dataset",
]
