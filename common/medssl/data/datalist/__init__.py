"""Datalists: one JSON format for 2D and 3D, labelled and unlabelled medical images, with their modality.

Format (compatible with ``monai.data.load_decathlon_datalist``)::

    {"name": str?, "description": str?, "classes": [str]?, "dataset_dir": str?,
     "training": [item, ...], "validation": [item, ...], "test": [item, ...],
     "excluded": [{"image": ..., "reason": ...}, ...]?}

    item = {"image": path relative to the dataset directory (or absolute); a DICOM series is its directory,
            "modality": one of MODALITIES (aliases such as CR, DX, MRI, PET accepted and normalised),
            "dim": 2 | 3 (spatial dimensions after loading; read from the image header when absent),
            "series_uid": str? (picks one DICOM series out of a directory holding several),
            "label": str (mask path, relative like image) | int (class index) | list (multi-label vector)?}

Medical Segmentation Decathlon ``dataset.json`` files load as they are: items without ``"dim"`` get it from the image
header, items without ``"modality"`` take the top-level ``"modality"`` (``"CT"`` or ``{"0": "CT"}``), and ``"test"``
may be a list of plain paths.

The dataset directory that relative paths are resolved against is, in order: the ``dataset_dir`` argument, the
datalist's own ``"dataset_dir"`` entry (relative to the datalist's folder; written by :func:`build_datalist`), the
datalist's folder. ``"excluded"`` records what :func:`build_datalist` found but could not list, and why.

Tools: :func:`build_datalist` scans a folder of DICOM / NIfTI / NRRD / PNG / JPEG / TIFF data into a datalist;
:func:`check_datalist` opens every item and reports missing, corrupt and unusable images
(``python tools/datalist.py build|check``). Both rest on the header-level helpers here -- format detection
(:func:`image_format`), DICOM series grouping and slice ordering (:func:`group_dicom_series`,
:func:`sort_dicom_slices`) and :func:`inspect_image` -- which import neither torch nor MONAI so the tools start in
well under a second; ``medssl.data.readers`` (the MONAI loaders used in training) shares them.

One module per job, every public name re-exported here (``medssl.data.datalist.<name>``):

- ``formats``: modality names / aliases, sections, file suffixes, :func:`image_format`, :class:`ImageReadError`;
- ``series``: DICOM headers, series grouping, slice ordering;
- ``inspect``: :func:`inspect_image` (header-level, per file or DICOM series);
- ``io``: :func:`load_datalist`, :func:`save_datalist`, sections, modality, dataset directory;
- ``scan``: :func:`build_datalist` (folder scan, mask pairing);
- ``check``: :func:`check_datalist` (parallel per-item check);
- ``boxes``: :func:`box_problems` (detection items' ``"boxes"`` / ``"labels"``: inside the image, positive size,
  known labels; the datalist's ``"detection_classes"`` names the classes);
- ``vindr``: :func:`vindr_csv_to_datalist` (a VinDr-CXR-style box CSV into a detection datalist).
"""

from __future__ import annotations

from .boxes import box_problems, has_boxes
from .check import check_datalist
from .formats import (  # noqa: F401 - the private names: re-exported for medssl.data.readers
    _NRRD_SPATIAL_KINDS,
    DICOM_SUFFIXES,
    MODALITIES,
    MODALITY_ALIASES,
    NIFTI_SUFFIXES,
    NRRD_SUFFIXES,
    PIL_SUFFIXES,
    SECTIONS,
    ImageReadError,
    _describe,
    image_format,
    is_dicom_file,
    natural_dim,
    normalize_modality,
)
from .inspect import inspect_image, pil_to_grey_or_rgb  # noqa: F401 - pil_to_grey_or_rgb: for medssl.data.readers
from .io import datalist_modality, datalist_sections, load_datalist, resolve_dataset_dir, save_datalist
from .scan import build_datalist
from .series import group_dicom_series, read_dicom_headers, sort_dicom_slices
from .vindr import vindr_csv_to_datalist

__all__ = [
    "MODALITIES",
    "MODALITY_ALIASES",
    "SECTIONS",
    "normalize_modality",
    "load_datalist",
    "save_datalist",
    "build_datalist",
    "check_datalist",
    "box_problems",
    "has_boxes",
    "vindr_csv_to_datalist",
    "datalist_sections",
    "datalist_modality",
    "resolve_dataset_dir",
    "ImageReadError",
    "NIFTI_SUFFIXES",
    "NRRD_SUFFIXES",
    "PIL_SUFFIXES",
    "DICOM_SUFFIXES",
    "image_format",
    "is_dicom_file",
    "natural_dim",
    "read_dicom_headers",
    "group_dicom_series",
    "sort_dicom_slices",
    "inspect_image",
]
