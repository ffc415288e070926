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
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "MODALITIES",
    "MODALITY_ALIASES",
    "SECTIONS",
    "normalize_modality",
    "load_datalist",
    "save_datalist",
    "build_datalist",
    "check_datalist",
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

MODALITIES = ("CT", "MR", "XR", "US", "NM", "PT", "MG", "PATH", "FUNDUS")
MODALITY_ALIASES = {
    "CR": "XR",
    "DX": "XR",
    "DR": "XR",
    "RG": "XR",
    "MRI": "MR",
    "PET": "PT",
    "SM": "PATH",
    "WSI": "PATH",
    "OP": "FUNDUS",
}
SECTIONS = ("training", "validation", "test")
# DICOM modalities whose several files in one series are separate 2D images, never slices of a volume
_PROJECTION_MODALITIES = {"XR", "MG"}


def normalize_modality(value: Any) -> str:
    """The canonical modality code (one of ``MODALITIES``) of ``value``; case-insensitive, aliases resolved.

    ``"CR"``, ``"DX"``, ``"DR"``, ``"RG"`` -> ``"XR"``; ``"MRI"`` -> ``"MR"``; ``"PET"`` -> ``"PT"``;
    ``"SM"``, ``"WSI"`` -> ``"PATH"``; ``"OP"`` -> ``"FUNDUS"``.

    Raises:
        ValueError: naming the value and the known modalities.
    """
    code = str(value).strip().upper() if value is not None else ""
    code = MODALITY_ALIASES.get(code, code)
    if code not in MODALITIES:
        aliases = ", ".join(f"{k}->{v}" for k, v in MODALITY_ALIASES.items())
        raise ValueError(
            f"unknown modality {value!r}: known modalities are {', '.join(MODALITIES)} (aliases {aliases})"
        )
    return code


# -------------------------------------------------------------------------------------------------- image inspection
# Format detection, DICOM header grouping / slice ordering and cheap per-file inspection. This part imports
# neither torch nor MONAI, so that `tools/datalist.py` and its worker processes start fast; the MONAI readers
# (medssl.data.readers) use it too.
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

_NRRD_SPATIAL_KINDS = {None, "domain", "space", "time", "???", "none"}
# relative / absolute tolerances of the DICOM slice-position checks
_DUPLICATE_TOL_MM = 1e-3
_GAP_FACTOR = 1.5


class ImageReadError(RuntimeError):
    """An image could not be read; ``str(error) == "PATH: reason"``.

    Attributes:
        path: the file or DICOM series directory.
        reason: what went wrong (the underlying reader's message).
    """

    def __init__(self, path: os.PathLike | str, reason: str):
        super().__init__(str(path), str(reason))
        self.path = str(path)
        self.reason = str(reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _describe(error: BaseException) -> str:
    """A one-line reason for ``error``: ``"TypeName: message"`` (the message alone for our own errors)."""
    if isinstance(error, ImageReadError):
        return error.reason
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


# ----------------------------------------------------------------------------------------------------------- formats
def is_dicom_file(path: os.PathLike | str) -> bool:
    """Whether ``path`` is a file with the DICOM Part-10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _has_suffix(path: str, suffixes: Sequence[str]) -> bool:
    lower = path.lower()
    return any(lower.endswith(s) for s in suffixes)


def image_format(path: os.PathLike | str) -> str:
    """The reader family of ``path``: ``"dicom_series"``, ``"dicom"``, ``"nifti"``, ``"nrrd"`` or ``"pil"``.

    Raises:
        ImageReadError: the path does not exist or its format is not recognised.
    """
    path = str(path)
    if os.path.isdir(path):
        return "dicom_series"
    if not os.path.exists(path):
        raise ImageReadError(path, "file not found")
    if _has_suffix(path, NIFTI_SUFFIXES):
        return "nifti"
    if _has_suffix(path, NRRD_SUFFIXES):
        return "nrrd"
    if _has_suffix(path, PIL_SUFFIXES):
        return "pil"
    if _has_suffix(path, DICOM_SUFFIXES) or is_dicom_file(path):
        return "dicom"
    known = ", ".join(NIFTI_SUFFIXES + NRRD_SUFFIXES + PIL_SUFFIXES + DICOM_SUFFIXES)
    raise ImageReadError(path, f"unrecognised image format (known: {known}, DICOM files, DICOM series directories)")


def natural_dim(shape: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """Number of spatial dimensions of an image of spatial ``shape``, after dropping trailing singleton axes.

    ``(X, Y, 1) -> 2``, ``(X, Y, Z) -> 3``, ``(X, Y, Z, 1) -> 3``, ``(X, Y, Z, T) -> 4`` (an error for the callers).

    Returns:
        (dim, squeezed shape)
    """
    squeezed = tuple(int(s) for s in shape)
    while len(squeezed) > 2 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    return len(squeezed), squeezed


# ------------------------------------------------------------------------------------------------------------- DICOM
def read_dicom_headers(paths: Sequence[str], stop_before_pixels: bool = True) -> tuple[list, list[tuple[str, str]]]:
    """Read the DICOM headers of ``paths`` (pixel data skipped by default).

    A file without the ``DICM`` preamble is still tried with ``force=True`` (old ACR-NEMA style files) when its name
    has no suffix or a DICOM one (``.dcm``, ``.dicom``, ``.ima``), and kept only when it has image attributes
    (``Rows``).

    Returns:
        ([(path, dataset), ...] of image files, [(path, reason), ...] of files that are not DICOM images)
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    good, bad = [], []
    for path in paths:
        try:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
            except InvalidDicomError:
                name = os.path.basename(str(path))
                if "." in name and not _has_suffix(name, DICOM_SUFFIXES):
                    raise InvalidDicomError("not a DICOM file (no DICM preamble)") from None
                ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
                if "Rows" not in ds:
                    raise InvalidDicomError("not a DICOM file (no DICM preamble and no image attributes)") from None
        except Exception as e:  # noqa: BLE001 - every parse failure is reported per file
            bad.append((path, _describe(e)))
            continue
        if "Rows" not in ds or "Columns" not in ds:
            bad.append((path, "DICOM file without image data (no Rows / Columns)"))
            continue
        good.append((path, ds))
    return good, bad


def group_dicom_series(headers: Sequence[tuple[str, Any]]) -> dict[str, list[tuple[str, Any]]]:
    """Group ``[(path, dataset), ...]`` by ``SeriesInstanceUID`` (files without one share the key ``""``)."""
    groups: dict[str, list] = {}
    for path, ds in headers:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append((path, ds))
    return groups


def _float_list(value) -> list[float] | None:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def sort_dicom_slices(datasets: Sequence[Any], names: Sequence[str] | None = None) -> tuple[list[int], list[str]]:
    """Order the slices of one DICOM series and find what makes it an unusable volume.

    Slices are ordered by their position along the slice normal n = row x column direction cosines
    (``ImageOrientationPatient``), d_i = <ImagePositionPatient_i, n>; without positions, by ``InstanceNumber``.

    Problems reported: slices of different sizes or orientations, duplicate slices (same position, or same
    InstanceNumber when there are no positions), missing slices (a step between neighbours larger than
    1.5 x the median step, or a gap in InstanceNumber when there are no positions), slices that cannot be ordered.

    Returns:
        (order: indices into ``datasets`` from first to last slice, problems: list of messages; empty when usable)
    """
    names = [os.path.basename(str(n)) for n in names] if names is not None else [str(i) for i in range(len(datasets))]
    problems: list[str] = []
    n = len(datasets)
    if n == 0:
        return [], ["no DICOM image slices"]
    sizes = {(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) for ds in datasets}
    if len(sizes) > 1:
        problems.append(f"slices of different sizes (Rows, Columns) {sorted(sizes)}")
    orientations = [_float_list(ds.get("ImageOrientationPatient")) for ds in datasets]
    positions = [_float_list(ds.get("ImagePositionPatient")) for ds in datasets]
    if n == 1:
        return [0], problems
    if all(o is not None and len(o) == 6 for o in orientations) and all(
        p is not None and len(p) == 3 for p in positions
    ):
        first = np.asarray(orientations[0])
        if any(not np.allclose(o, first, atol=1e-3) for o in orientations):
            problems.append("slices with different orientations (ImageOrientationPatient), e.g. a localizer mixed in")
        normal = np.cross(first[:3], first[3:])
        distance = np.asarray([float(np.dot(p, normal)) for p in positions])
        order = [int(i) for i in np.argsort(distance, kind="stable")]
        steps = np.diff(distance[order])
        duplicate = steps < _DUPLICATE_TOL_MM
        if duplicate.any():
            k = int(np.argmax(duplicate))
            problems.append(
                f"{int(duplicate.sum())} duplicate slice(s) (same ImagePositionPatient), e.g. {names[order[k]]} and "
                f"{names[order[k + 1]]} at {distance[order[k]]:.3f} mm along the slice normal"
            )
        regular = steps[~duplicate]
        if regular.size >= 2:
            median = float(np.median(regular))
            gap = steps > _GAP_FACTOR * median
            if gap.any():
                k = int(np.argmax(gap))
                problems.append(
                    f"missing slice(s): {int(gap.sum())} gap(s) in the slice positions, e.g. {steps[k]:.3f} mm between "
                    f"{names[order[k]]} and {names[order[k + 1]]} where the slice spacing is {median:.3f} mm"
                )
        return order, problems
    numbers = [ds.get("InstanceNumber") for ds in datasets]
    if any(v is None or str(v).strip() == "" for v in numbers):
        problems.append(
            "slices without ImagePositionPatient / ImageOrientationPatient nor InstanceNumber: cannot order"
        )
        return list(range(n)), problems
    numbers = [int(v) for v in numbers]
    order = [int(i) for i in np.argsort(numbers, kind="stable")]
    steps = np.diff(np.asarray(numbers)[order])
    if (steps == 0).any():
        problems.append(f"{int((steps == 0).sum())} duplicate slice(s) (same InstanceNumber, no ImagePositionPatient)")
    if (steps > 1).any():
        problems.append(f"missing slice(s): gaps in InstanceNumber {sorted(set(numbers))[:1]}..{max(numbers)}")
    return order, problems


# --------------------------------------------------------------------------------------------------------------- PIL
def pil_to_grey_or_rgb(image):
    """PIL converter: palette / RGBA / CMYK / YCbCr -> RGB, LA / 1-bit -> L; L, I, I;16, F and RGB unchanged."""
    mode = image.mode
    if mode in ("1", "LA", "La"):
        return image.convert("L")
    if mode in ("P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    return image


# -------------------------------------------------------------------------------------------------------- inspection
def _new_info(fmt: str | None) -> dict[str, Any]:
    return {
        "format": fmt,
        "shape": None,
        "spacing": None,
        "dim": None,
        "channels": None,
        "modality": None,
        "problems": [],
        "warnings": [],
    }


class _ValueStats:
    """Running min / max / non-finite count over chunks of an image (constant image and NaN / Inf checks)."""

    def __init__(self):
        self.count = 0
        self.non_finite = 0
        self.low = math.inf
        self.high = -math.inf

    def add(self, values: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> None:
        values = np.asarray(values)
        if values.size == 0:
            return
        self.count += values.size
        if np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.complexfloating):
            finite = np.isfinite(values)
            n_bad = int(values.size - np.count_nonzero(finite))
            self.non_finite += n_bad
            if n_bad:
                values = values[finite]
                if values.size == 0:
                    return
        low, high = float(values.min()) * slope + intercept, float(values.max()) * slope + intercept
        self.low = min(self.low, low, high)
        self.high = max(self.high, low, high)

    def problems(self) -> list[str]:
        if self.count == 0:
            return ["no pixel values"]
        if self.non_finite:
            return [f"NaN/Inf values ({self.non_finite} of {self.count} voxels)"]
        if self.low == self.high:
            return [f"constant image (every value is {self.low:g})"]
        return []


def _check_spacing(info: dict, spacing: Sequence[float] | None, what: str = "spacing") -> None:
    """Record ``spacing``; zero or missing spacing is a warning (the readers use 1 mm, as MONAI's and nibabel's do),
    negative or non-finite spacing a problem (a corrupt header)."""
    if spacing is None:
        info["warnings"].append(f"no {what} in the header: read as 1 mm")
        return
    values = [float(s) for s in spacing]
    info["spacing"] = values
    if any(not math.isfinite(v) or v < 0 for v in values):
        info["problems"].append(f"negative or non-finite {what} {values}")
    elif any(v == 0 for v in values):
        info["warnings"].append(f"zero {what} {values}: read as 1 mm")


def _inspect_nifti(path: str, values: bool) -> dict:
    import nibabel as nib
    from nibabel.openers import ImageOpener

    info = _new_info("nifti")
    nib_logger = logging.getLogger("nibabel.global")
    level = nib_logger.level
    nib_logger.setLevel(logging.ERROR)  # nibabel logs (and silently fixes) bad pixdim on load: we report it instead
    try:
        image = nib.load(path)
        with ImageOpener(path) as f:
            raw_header = type(image.header).from_fileobj(f, check=False)
    finally:
        nib_logger.setLevel(level)
    shape = tuple(int(s) for s in image.shape)
    dim, squeezed = natural_dim(shape)
    info["shape"], info["dim"], info["channels"] = list(squeezed), dim, 1
    if dim > 3:
        info["problems"].append(f"{dim}-D image of shape {shape} where a 2-D image or 3-D volume was expected")
        return info
    n_spatial = min(len(shape), 3)
    raw_pixdim = [float(v) for v in raw_header["pixdim"][1 : n_spatial + 1]]
    _check_spacing(info, raw_pixdim[:dim], "spacing (pixdim)")
    if not info["problems"] and not info["warnings"]:
        affine = np.asarray(image.affine, dtype=float)
        columns = np.linalg.norm(affine[:3, :n_spatial], axis=0)
        if not np.isfinite(affine).all():
            info["problems"].append(f"non-finite values in the affine (column norms {columns.tolist()})")
        elif np.any(columns <= 0):
            info["warnings"].append(f"zero spacing in the affine (column norms {columns.tolist()}): read as 1 mm")
        else:
            info["spacing"] = [float(c) for c in columns[:dim]]
    if values:
        stats = _ValueStats()
        proxy = image.dataobj
        if len(shape) < 3:
            stats.add(np.asarray(proxy))
        else:
            plane = int(np.prod(shape[:2]))
            step = max(1, (1 << 24) // max(plane, 1))  # ~16 M voxels per slab: bounded memory for large volumes
            index = [slice(None)] * len(shape)
            for start in range(0, shape[2], step):
                index[2] = slice(start, min(start + step, shape[2]))
                stats.add(np.asarray(proxy[tuple(index)]))
        info["problems"] += stats.problems()
    return info


def _inspect_nrrd(path: str, values: bool) -> dict:
    import nrrd

    info = _new_info("nrrd")
    header = nrrd.read_header(path)
    sizes = [int(s) for s in header["sizes"]]
    kinds = [k if k is None else str(k) for k in header.get("kinds", [None] * len(sizes))]
    spatial = [i for i, k in enumerate(kinds) if k in _NRRD_SPATIAL_KINDS]
    channel = [i for i in range(len(sizes)) if i not in spatial]
    dim, squeezed = natural_dim([sizes[i] for i in spatial])
    info["shape"], info["dim"] = list(squeezed), dim
    info["channels"] = int(np.prod([sizes[i] for i in channel])) if channel else 1
    if len(channel) > 1:
        info["problems"].append(f"NRRD with {len(channel)} non-spatial axes (kinds {kinds})")
    if dim > 3:
        info["problems"].append(f"{dim}-D image of shape {tuple(sizes)} where a 2-D image or 3-D volume was expected")
        return info
    if header.get("space directions") is not None:
        directions = np.asarray(header["space directions"], dtype=float)[spatial]
        _check_spacing(info, np.linalg.norm(directions, axis=1)[:dim].tolist(), "spacing (space directions)")
    elif header.get("spacings") is not None:
        spacings = np.asarray(header["spacings"], dtype=float)[spatial]
        _check_spacing(info, spacings[:dim].tolist(), "spacing (spacings)")
    else:
        _check_spacing(info, None, "spacing (space directions / spacings)")
    if values:
        array, _ = nrrd.read(path)
        stats = _ValueStats()
        stats.add(array)
        info["problems"] += stats.problems()
    return info


def _inspect_pil(path: str, values: bool) -> dict:
    from PIL import Image

    info = _new_info("pil")
    with Image.open(path) as image:
        image = pil_to_grey_or_rgb(image)
        width, height = image.size
        info["shape"], info["dim"] = [int(width), int(height)], 2
        info["channels"] = len(image.getbands())
        if values:
            image.load()
            stats = _ValueStats()
            stats.add(np.asarray(image))
            info["problems"] += stats.problems()
    return info


def _dicom_spacing(ds) -> list[float] | None:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is None:
        return None
    row_spacing, column_spacing = (float(v) for v in spacing)
    return [column_spacing, row_spacing]  # MONAI's order: (columns, rows) after swapping i/j


def _rescale(ds) -> tuple[float, float]:
    return float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)


def _inspect_dicom_file(path: str, values: bool) -> dict:
    info = _new_info("dicom")
    headers, bad = read_dicom_headers([path], stop_before_pixels=not values)
    if bad:
        info["problems"].append(bad[0][1])
        return info
    ds = headers[0][1]
    info["modality"] = str(ds.get("Modality", "") or "") or None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    info["shape"] = [int(ds.Columns), int(ds.Rows)] + ([frames] if frames > 1 else [])
    info["dim"] = 3 if frames > 1 else 2
    info["channels"] = int(ds.get("SamplesPerPixel", 1) or 1)
    spacing = _dicom_spacing(ds)
    if spacing is not None and frames > 1:
        spacing.append(float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)) or 1.0))
    _check_spacing(info, spacing, "PixelSpacing")
    if values:
        try:
            array = ds.pixel_array
        except Exception as e:  # noqa: BLE001 - e.g. a compressed transfer syntax without its decoder
            info["problems"].append(f"cannot decode the pixel data: {_describe(e)}")
            return info
        stats = _ValueStats()
        stats.add(array, *_rescale(ds))
        info["problems"] += stats.problems()
    return info


def _inspect_dicom_series(path: str, values: bool, series_uid: str | None) -> dict:
    import pydicom

    info = _new_info("dicom_series")
    files = sorted(
        os.path.join(path, f)
        for f in os.listdir(path)
        if not f.startswith(".") and os.path.isfile(os.path.join(path, f))
    )
    if not files:
        info["problems"].append("empty series directory (no files)")
        return info
    headers, _ = read_dicom_headers(files)
    if not headers:
        info["problems"].append(f"empty series directory (none of its {len(files)} files is a DICOM image)")
        return info
    groups = group_dicom_series(headers)
    if series_uid:
        if series_uid not in groups:
            info["problems"].append(f"series_uid {series_uid} not found in the directory (found {sorted(groups)})")
            return info
        headers = groups[series_uid]
    elif len(groups) > 1:
        info["problems"].append(
            f"{len(groups)} DICOM series in one directory ({', '.join(sorted(groups))}); "
            'give each its own datalist item with "series_uid", or one directory per series'
        )
        return info
    datasets = [ds for _, ds in headers]
    order, problems = sort_dicom_slices(datasets, [p for p, _ in headers])
    info["problems"] += problems
    first = datasets[order[0]]
    info["modality"] = str(first.get("Modality", "") or "") or None
    info["channels"] = int(first.get("SamplesPerPixel", 1) or 1)
    n = len(datasets)
    info["shape"] = [int(first.Columns), int(first.Rows)] + ([n] if n > 1 else [])
    info["dim"] = 3 if n > 1 else 2
    spacing = _dicom_spacing(first)
    if spacing is not None and n > 1:
        orientation = _float_list(first.get("ImageOrientationPatient"))
        positions = [_float_list(datasets[i].get("ImagePositionPatient")) for i in order]
        if orientation is not None and all(p is not None for p in positions):
            normal = np.cross(orientation[:3], orientation[3:])
            steps = np.diff([float(np.dot(p, normal)) for p in positions])
            steps = steps[steps >= _DUPLICATE_TOL_MM]
            spacing.append(float(np.median(steps)) if steps.size else 0.0)
        else:
            spacing.append(float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0))
    if spacing is None:
        _check_spacing(info, None, "PixelSpacing")
    elif problems:
        info["spacing"] = spacing
    else:
        _check_spacing(info, spacing, "spacing")
    if values and not problems:
        stats = _ValueStats()
        for file_path, _ in headers:
            try:
                ds = pydicom.dcmread(file_path, force=True)
                stats.add(ds.pixel_array, *_rescale(ds))
            except Exception as e:  # noqa: BLE001
                info["problems"].append(f"{os.path.basename(file_path)}: cannot read the pixel data: {_describe(e)}")
                return info
        info["problems"] += stats.problems()
    return info


def inspect_image(path: os.PathLike | str, values: bool = True, series_uid: str | None = None) -> dict[str, Any]:
    """Read what the datalist tools need to know about one image, as cheaply as its format allows.

    Headers give the shape, spacing, number of spatial dimensions and (DICOM) the modality without loading pixels:
    NIfTI through nibabel's header (and the raw ``pixdim``, which nibabel would silently "fix"), NRRD through
    ``nrrd.read_header``, DICOM with ``stop_before_pixels``, PNG/JPEG/TIFF through PIL's lazy open.

    With ``values=True`` the pixel values are read once too, because the NaN/Inf and constant-image checks, and the
    detection of a truncated file (e.g. a ``.nii.gz`` cut short: its header is intact, its gzip stream is not), need
    them. The read is cheap compared with a training load: no reorientation, resampling or float copy of the whole
    volume -- NIfTI is read through nibabel's array proxy (a memory map for ``.nii``, one streaming decompression for
    ``.nii.gz``) in slabs of ~16 M voxels, DICOM slice by slice, keeping only min / max / non-finite counts.
    ``values=False`` (``check --skip-values``) is header-only and fast, but misses truncated data, NaN and constant
    images.

    Shapes and spacings are in MONAI's reader order before reorientation: NIfTI / NRRD (X, Y[, Z]); DICOM
    (Columns, Rows[, slices or frames]); PIL (W, H). Trailing singleton axes are dropped ((X, Y, 1) is 2D).

    Returns:
        ``{"format", "shape", "spacing", "dim", "channels", "modality" (DICOM tag or None), "problems": [str],
        "warnings": [str]}``; a missing or unreadable file gives a problem, never an exception. Problems make an
        image unusable; warnings do not (zero or missing spacing: the readers use 1 mm, as MONAI's readers do).
    """
    path = str(path)
    try:
        fmt = image_format(path)
    except ImageReadError as e:
        info = _new_info(None)
        info["problems"].append(e.reason)
        return info
    try:
        if fmt == "nifti":
            return _inspect_nifti(path, values)
        if fmt == "nrrd":
            return _inspect_nrrd(path, values)
        if fmt == "pil":
            return _inspect_pil(path, values)
        if fmt == "dicom":
            return _inspect_dicom_file(path, values)
        return _inspect_dicom_series(path, values, series_uid)
    except Exception as e:  # noqa: BLE001 - corrupt / truncated files are reported, not raised
        info = _new_info(fmt)
        info["problems"].append(f"unreadable or corrupt file: {_describe(e)}")
        return info


# -------------------------------------------------------------------------------------------------------- load/save
def _read_json(path: os.PathLike | str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: datalist file not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a datalist is a JSON object with 'training' / 'validation' / 'test' lists")
    return raw


def resolve_dataset_dir(datalist_path: os.PathLike | str, dataset_dir: os.PathLike | str | None = None) -> str:
    """The directory that relative item paths of ``datalist_path`` are resolved against (see the module docstring)."""
    if dataset_dir is not None:
        return os.path.abspath(os.path.expanduser(str(dataset_dir)))
    folder = os.path.dirname(os.path.abspath(str(datalist_path)))
    try:
        stored = _read_json(datalist_path).get("dataset_dir")
    except ValueError:
        stored = None
    if isinstance(stored, str) and stored:
        return os.path.normpath(os.path.join(folder, os.path.expanduser(stored)))
    return folder


def datalist_sections(raw: dict) -> list[str]:
    """Names of the item lists in a datalist (``training``, ``validation``, ``test`` and any other list of dicts,
    except ``excluded``)."""
    names = [s for s in SECTIONS if isinstance(raw.get(s), list)]
    for key, value in raw.items():
        if key in names or key == "excluded" or not isinstance(value, list):
            continue
        if value and all(isinstance(v, dict) for v in value):
            names.append(key)
    return names


def datalist_modality(raw: dict) -> tuple[str | None, str | None]:
    """The modality of the items that name none, from the datalist's top-level ``"modality"``: a code (``"CT"``) or
    the Medical Segmentation Decathlon's channel map (``{"0": "CT"}``; several channels must name one modality).

    Returns:
        (modality code or None, why the top-level entry gives none -- None when there is no entry)
    """
    value = raw.get("modality")
    if value is None:
        return None, None
    values = list(value.values()) if isinstance(value, dict) else [value]
    try:
        codes = {normalize_modality(v) for v in values}
    except ValueError:
        return None, f'the datalist\'s "modality" {value!r} is not one of {", ".join(MODALITIES)}'
    if len(codes) != 1:
        return None, f'the datalist\'s "modality" {value!r} names {len(codes)} modalities'
    return codes.pop(), None


def _validate_item(
    item: Any, section: str | None = None, default_modality: str | None = None
) -> tuple[dict, list[str]]:
    """Check one raw datalist item; returns (item with normalised modality / int dim, problems).

    A plain path is an item ``{"image": path}`` in ``"test"`` (the Medical Segmentation Decathlon's test list);
    ``default_modality`` (see :func:`datalist_modality`) fills a missing ``"modality"``.
    """
    if isinstance(item, str) and section == "test":
        item = {"image": item}
    if not isinstance(item, dict):
        hint = ' (plain paths are read in "test" only)' if isinstance(item, str) else ""
        return {}, [f'an item must be a JSON object such as {{"image": ...}}, got {type(item).__name__}{hint}']
    if "modality" not in item and default_modality is not None:
        item = {**item, "modality": default_modality}
    out, problems = dict(item), []
    image = item.get("image")
    if image is None or image == "" or image == []:
        problems.append('no "image"')
    elif not isinstance(image, (str, list)) or (isinstance(image, list) and not all(isinstance(i, str) for i in image)):
        problems.append(f'"image" must be a path (str), got {image!r}')
    if "modality" in item:
        try:
            out["modality"] = normalize_modality(item["modality"])
        except ValueError as e:
            problems.append(str(e))
    if "dim" in item:
        dim = item["dim"]
        if isinstance(dim, bool) or not isinstance(dim, (int, float)) or dim not in (2, 3):
            problems.append(f'"dim" must be 2 or 3, got {dim!r}')
        else:
            out["dim"] = int(dim)
    return out, problems


def load_datalist(
    path: os.PathLike | str, section: str = "training", dataset_dir: os.PathLike | str | None = None
) -> list[dict]:
    """Load one section of a datalist with ``monai.data.load_decathlon_datalist``.

    ``"image"`` and string ``"label"`` paths become absolute (resolved against the dataset directory, see the module
    docstring); ``"modality"`` is normalised to a code of ``MODALITIES`` (the datalist's top-level ``"modality"``
    for items without one); ``"dim"`` is an int, read from the image header (:func:`inspect_image`, no pixel values)
    for items without one; every other key keeps its JSON value (MONAI would turn a value such as ``"MR"`` into a
    path when a folder of that name exists). An empty section gives ``[]``.

    Raises:
        ValueError: "FILE SECTION item N: problem" for an item without ``"image"``, with an unknown modality or a
            bad ``dim``, or without ``dim`` and a header that gives none; "FILE: ..." for a missing file, invalid
            JSON, a missing section or a datalist without any item.
    """
    path = Path(path)
    raw = _read_json(path)
    _require_items(path, raw)
    if section not in raw or not isinstance(raw[section], list):
        found = ", ".join(datalist_sections(raw)) or "none"
        raise ValueError(f"{path}: no {section!r} list in the datalist (sections: {found})")
    if not raw[section]:
        return []
    default_modality, _ = datalist_modality(raw)
    checked = []
    for index, item in enumerate(raw[section]):
        fixed, problems = _validate_item(item, section, default_modality)
        if problems:
            raise ValueError(f"{path} {section} item {index}: {'; '.join(problems)}")
        checked.append(fixed)
    from monai.data import load_decathlon_datalist  # imported here: the datalist tools need no torch / MONAI

    base_dir = resolve_dataset_dir(path, dataset_dir)
    resolved = load_decathlon_datalist(path, is_segmentation=True, data_list_key=section, base_dir=base_dir)
    for item, raw_item in zip(resolved, checked):
        for key, value in raw_item.items():
            if key == "image" or (key == "label" and isinstance(value, (str, list))):
                continue
            item[key] = value
    _infer_dims(resolved, path, section)
    return resolved


def _require_items(path: os.PathLike | str, raw: dict, sections: Sequence[str] | None = None) -> None:
    """Raise the one-line error of a datalist without any item (in ``sections``, default: all of its lists)."""
    sections = list(sections) if sections is not None else datalist_sections(raw) or list(SECTIONS)
    if any(isinstance(raw.get(s), list) and raw[s] for s in sections):
        return
    found = ", ".join(f"{s} {len(raw[s]) if isinstance(raw.get(s), list) else 'absent'}" for s in sections)
    raise ValueError(
        f"{path}: the datalist has no items ({found}); list images under \"training\" "
        "(python tools/datalist.py build --root DIR --out FILE writes one)"
    )


def _infer_dims(items: list[dict], path: os.PathLike | str, section: str) -> None:
    """Fill the ``"dim"`` of the items that have none (Medical Segmentation Decathlon style lists) from the image
    headers (:func:`inspect_image` without pixel values), in place.

    Raises:
        ValueError: naming the item and its file when the header cannot give a dim of 2 or 3.
    """
    counts: Counter = Counter()
    for index, item in enumerate(items):
        if item.get("dim") is not None:
            continue
        image = item["image"][0] if isinstance(item["image"], list) else item["image"]
        info = inspect_image(image, values=False, series_uid=item.get("series_uid"))
        if info["dim"] not in (2, 3):
            reason = "; ".join(info["problems"]) or f"a {info['dim']}-D image"
            raise ValueError(
                f'{path} {section} item {index}: no "dim", and the header of {image} gives none ({reason}); fix or '
                f'remove the item, or give its "dim" (python tools/datalist.py check {path} lists every bad item)'
            )
        item["dim"] = int(info["dim"])
        counts[item["dim"]] += 1
    if counts:
        found = ", ".join(f"{dim}D: {n}" for dim, n in sorted(counts.items()))
        n = sum(counts.values())
        logger.info('%s [%s]: "dim" read from the image headers of %d items (%s)', path, section, n, found)


def _relative(path: str, base: str | None) -> str:
    if base is None or not os.path.isabs(path):
        return path
    relative = os.path.relpath(path, base)
    return path if relative.startswith("..") else Path(relative).as_posix()


def save_datalist(
    path: os.PathLike | str,
    training: Sequence[dict],
    validation: Sequence[dict] | None = None,
    test: Sequence[dict] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    classes: Sequence[str] | None = None,
    dataset_dir: os.PathLike | str | None = None,
    **extra: Any,
) -> Path:
    """Write a datalist JSON file (format in the module docstring) and return its path.

    Items are validated like :func:`load_datalist` (modality normalised, ``dim`` 2 or 3). When ``dataset_dir`` is
    given, absolute ``image`` / string ``label`` paths inside it are written relative to it, and the datalist records
    ``"dataset_dir"`` relative to its own folder, so ``load_datalist(path)`` finds the images again.
    ``extra`` keys (e.g. ``excluded``) are written as they are.
    """
    path = Path(path)
    base = os.path.abspath(str(dataset_dir)) if dataset_dir is not None else None
    out: dict[str, Any] = {}
    if name is not None:
        out["name"] = name
    if description is not None:
        out["description"] = description
    if classes is not None:
        out["classes"] = list(classes)
    if base is not None:
        folder = os.path.dirname(os.path.abspath(str(path)))
        relative = (
            os.path.relpath(base, folder) if os.path.splitdrive(base)[0] == os.path.splitdrive(folder)[0] else base
        )
        out["dataset_dir"] = Path(relative).as_posix()
    for section, items in (("training", training), ("validation", validation), ("test", test)):
        if items is None:
            continue
        written = []
        for index, item in enumerate(items):
            fixed, problems = _validate_item(item)
            if problems:
                raise ValueError(f"{path} {section} item {index}: {'; '.join(problems)}")
            fixed["image"] = (
                [_relative(str(i), base) for i in fixed["image"]]
                if isinstance(fixed["image"], list)
                else _relative(str(fixed["image"]), base)
            )
            if isinstance(fixed.get("label"), str):
                fixed["label"] = _relative(fixed["label"], base)
            written.append(fixed)
        out[section] = written
    out.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    return path


# ------------------------------------------------------------------------------------------------------------ build
def _progress(message: str, verbose: bool) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)


def _item_modality(dicom_tag: str | None, fallback: str | None) -> tuple[str | None, str | None]:
    """(modality, reason when there is none) from a DICOM Modality tag, else the user's fallback."""
    if dicom_tag:
        try:
            return normalize_modality(dicom_tag), None
        except ValueError:
            if fallback:
                return fallback, None
            return None, f"DICOM Modality {dicom_tag!r} is not one of {', '.join(MODALITIES)} and no --modality given"
    if fallback:
        return fallback, None
    return None, "no modality: not a DICOM file (no Modality tag) and no --modality given"


def _is_volume_series(members: list[tuple[str, Any]]) -> bool:
    """Whether several DICOM files of one SeriesInstanceUID are the slices of a volume (not separate 2D images)."""
    if len(members) < 2:
        return False
    tag = str(members[0][1].get("Modality", "") or "").upper()
    if MODALITY_ALIASES.get(tag, tag) in _PROJECTION_MODALITIES:
        return False
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in members):
        return False
    return all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for _, ds in members)


def build_datalist(
    root: os.PathLike | str,
    out: os.PathLike | str,
    modality: str | None = None,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
    name: str | None = None,
    progress_every: int = 1000,
    verbose: bool = True,
) -> dict:
    """Scan ``root`` for images and write a datalist to ``out``; returns the datalist dict that was written.

    Recognised: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), PNG / JPEG / TIFF / BMP, DICOM files
    (``.dcm`` / ``.dicom`` / ``.ima`` or any file with the ``DICM`` preamble). The DICOM files of one directory are
    grouped by ``SeriesInstanceUID``: a group of several positioned slices (CT, MR, PT, NM, US ...) is ONE volume
    item whose ``"image"`` is the directory (plus ``"series_uid"`` when the directory holds several series); single
    files, multi-frame files and X-ray / mammography files are one 2D (or multi-frame 3D) item each. Other files are
    ignored (counted).

    Modality: the DICOM ``Modality`` tag when it is known, else ``modality``; ``dim`` (2 or 3) from the headers
    (a trailing singleton axis does not count: (X, Y, 1) is 2D). Files that cannot be listed -- unreadable header,
    no modality, 4-D image, DICOM series with duplicate / missing slices -- are printed and recorded under
    ``"excluded"`` with the reason, never dropped silently. Zero or missing spacing is a printed warning (the readers
    use 1 mm), not a reason to leave an image out.

    Masks: NIfTI / NRRD / PNG / JPEG / TIFF files named like label maps (``*_label*``, ``*_seg*``, ``*mask*``) or in a
    ``labels`` / ``masks`` / ``segmentations`` folder (``labelsTr`` as in the Medical Segmentation Decathlon) are
    never listed as images: each becomes the ``"label"`` of the image of the same name (``case1_image.nrrd`` +
    ``case1_label.nrrd``, ``x.png`` + ``x_mask.png``, ``imagesTr/a.nii.gz`` + ``labelsTr/a.nii.gz``) when its header
    has the image's shape, else it is excluded with the reason; the summary counts both.

    Only headers are read: truncated files, NaN / Inf values and constant images are listed; the summary says so and
    points to :func:`check_datalist`.

    Paths are written relative to ``root`` (POSIX separators) and ``"dataset_dir"`` records ``root`` relative to the
    datalist's folder. ``val_fraction`` / ``test_fraction`` of the items (rounded) go to ``validation`` / ``test``
    by a permutation drawn from ``numpy.random.RandomState(seed)`` (items, not patients: several items of one patient
    may land in different sections).

    Args:
        root: folder to scan (recursively; hidden files and folders skipped).
        out: the datalist JSON file to write.
        modality: modality of the items without a usable DICOM Modality tag (e.g. all NIfTI / PNG files).
        val_fraction: fraction of items for ``validation``.
        test_fraction: fraction of items for ``test``.
        seed: seed of the split.
        name: the datalist's ``name`` (default: the folder name).
        progress_every: print a progress line to stderr every this many files.
        verbose: print progress and the summary.

    Raises:
        ValueError: ``root`` is not a directory, a bad fraction or modality, or no image to list (an empty folder:
            nothing is written).
    """
    root = os.path.abspath(str(root))
    out_path = os.path.abspath(str(out))
    if not os.path.isdir(root):
        raise ValueError(f"{root}: not a directory")
    fallback = normalize_modality(modality) if modality else None
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(
            f"val_fraction={val_fraction}, test_fraction={test_fraction}: each must be in [0, 1) and their sum below 1 "
            "(e.g. 0.1 and 0.1)"
        )

    items: list[dict] = []
    excluded: list[dict] = []
    masks: list[str] = []
    shapes: dict[str, list[int] | None] = {}  # image (relative) -> its header shape, for the mask shape check
    warned: list[tuple[str, str]] = []
    n_files = n_ignored = 0

    def relative(p: str) -> str:
        return Path(os.path.relpath(p, root)).as_posix()

    def exclude(p: str, reason: str) -> None:
        excluded.append({"image": relative(p), "reason": reason})

    def add_file(p: str, info: dict) -> None:
        if info["problems"]:
            exclude(p, "; ".join(info["problems"]))
            return
        mod, reason = _item_modality(info["modality"], fallback)
        if mod is None:
            exclude(p, reason)
            return
        items.append({"image": relative(p), "modality": mod, "dim": int(info["dim"])})
        shapes[relative(p)] = info["shape"]
        warned.extend((os.path.join(root, relative(p)), w) for w in info["warnings"])

    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        dicom_candidates = []
        for file_name in sorted(f for f in files if not f.startswith(".")):
            file_path = os.path.join(directory, file_name)
            n_files += 1
            if progress_every and n_files % progress_every == 0:
                _progress(f"build_datalist: scanned {n_files} files, {len(items)} items so far", verbose)
            if os.path.abspath(file_path) == out_path:
                continue
            lower = file_name.lower()
            if lower.endswith(NIFTI_SUFFIXES + NRRD_SUFFIXES + PIL_SUFFIXES):
                if _is_mask(relative(file_path)):
                    masks.append(file_path)
                else:
                    add_file(file_path, inspect_image(file_path, values=False))
            elif lower.endswith(DICOM_SUFFIXES) or is_dicom_file(file_path):
                dicom_candidates.append(file_path)
            else:
                n_ignored += 1
        if not dicom_candidates:
            continue
        headers, unreadable = read_dicom_headers(dicom_candidates)
        for file_path, reason in unreadable:
            exclude(file_path, reason)
        groups = group_dicom_series(headers)
        for uid, members in sorted(groups.items()):
            if not _is_volume_series(members):
                for file_path, _ in members:
                    add_file(file_path, inspect_image(file_path, values=False))
                continue
            series_uid = uid if len(groups) > 1 else None
            info = inspect_image(directory, values=False, series_uid=series_uid)
            display = relative(directory) + (f" (series {uid})" if series_uid else "")
            if info["problems"]:
                excluded.append({"image": display, "reason": "; ".join(info["problems"])})
                continue
            mod, reason = _item_modality(info["modality"], fallback)
            if mod is None:
                excluded.append({"image": display, "reason": reason})
                continue
            item = {"image": relative(directory), "modality": mod, "dim": int(info["dim"])}
            if series_uid:
                item["series_uid"] = uid
            items.append(item)
            shapes[item["image"]] = info["shape"]
            warned.extend((os.path.join(root, display), w) for w in info["warnings"])

    n_paired = _pair_masks(items, masks, shapes, relative, exclude)
    lines = [f"excluded: {os.path.join(root, entry['image'])}: {entry['reason']}" for entry in excluded]
    if not items:
        for line in lines if verbose else ():
            print(line)
        what = f"{len(excluded)} excluded" + (" (listed above)" if verbose and excluded else "")
        masks_note = f", {len(masks)} masks" if masks else ""
        raise ValueError(
            f"{root}: no image to list ({n_files} files scanned: {what}{masks_note}, {n_ignored} not image files); "
            f"nothing written to {out_path}"
            + ("" if fallback or not excluded else "; give --modality for files without a DICOM Modality tag")
        )

    n = len(items)
    permutation = np.random.RandomState(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    test_index = set(permutation[:n_test].tolist())
    val_index = set(permutation[n_test : n_test + n_val].tolist())
    training = [it for i, it in enumerate(items) if i not in test_index and i not in val_index]
    validation = [it for i, it in enumerate(items) if i in val_index]
    test = [it for i, it in enumerate(items) if i in test_index]
    save_datalist(
        out_path,
        training,
        validation,
        test,
        name=name or os.path.basename(root),
        description=f"built by medssl build_datalist from {root}",
        dataset_dir=root,
        excluded=excluded,
    )
    if verbose:
        counts = Counter(f"{it['modality']} {it['dim']}D" for it in items)
        listing = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"
        print(
            f"build_datalist: {n_files} files scanned, {n} items ({listing}); training {len(training)}, "
            f"validation {len(validation)}, test {len(test)}; {len(excluded)} excluded, {n_ignored} ignored "
            f"(not image files); wrote {out_path}"
        )
        if masks:
            print(
                f"masks: {len(masks)} file{'s' if len(masks) != 1 else ''} named like masks (*_label*, *_seg*, *mask*, "
                "or in labels/masks folders): "
                f"{n_paired} paired with their image as \"label\", {len(masks) - n_paired} left out (see excluded)"
            )
        for line in lines:
            print(line)
        _print_warnings(warned, print, f"`python tools/datalist.py check {out_path}`")
        print(
            "note: build reads headers only, so truncated files, NaN/Inf values and constant images are listed too: "
            f"run `python tools/datalist.py check {out_path}` before training"
        )
    with open(out_path, encoding="utf-8") as f:
        return json.load(f)


# mask (label map) files: names like *_label*, *_seg*, *mask*, or a folder such as labelsTr/, masks/, segmentations/
_MASK_NAME = re.compile(r"[_\-. ](label|seg)|mask", re.IGNORECASE)
_FOLDER_SPLIT = r"(tr|ts|[_\-. ]?(train|training|test|val|validation))?$"
_MASK_FOLDER = re.compile(r"^(labels?|masks?|segmentations?|segs?)" + _FOLDER_SPLIT, re.IGNORECASE)
_IMAGE_FOLDER = re.compile(r"^(images?|imgs?)" + _FOLDER_SPLIT, re.IGNORECASE)
_MASK_TOKEN = re.compile(r"[_\-. ]?(labels?|segmentations?|seg|masks?)([_\-. ]?\d+)?(?=[_\-. ]|$)", re.IGNORECASE)
_IMAGE_TOKEN = re.compile(r"[_\-. ]?(images?|imgs?)(?=[_\-. ]|$)", re.IGNORECASE)


def _stem(name: str) -> str:
    lower = name.lower()
    for suffix in sorted(NIFTI_SUFFIXES + NRRD_SUFFIXES + PIL_SUFFIXES + DICOM_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_mask(relative_path: str) -> bool:
    """Whether a file (path relative to the scanned folder) is a mask by its name or folder, see ``_MASK_NAME``."""
    parts = Path(relative_path).parts
    return bool(_MASK_NAME.search(_stem(parts[-1]))) or any(_MASK_FOLDER.match(d) for d in parts[:-1])


def _pair_key(relative_path: str) -> tuple[str, ...]:
    """What an image and its mask share: the path without the image / mask words (``case1_image.nrrd`` and
    ``case1_label.nrrd`` -> ``("case1",)``; ``imagesTr/la_003.nii.gz`` and ``labelsTr/la_003.nii.gz`` ->
    ``("tr", "la_003")``)."""
    parts = Path(relative_path).parts
    folders = []
    for d in parts[:-1]:
        match = _MASK_FOLDER.match(d) or _IMAGE_FOLDER.match(d)
        folders.append((match.group(2) or "").strip("_-. ").lower() if match else d.lower())
    stem = _IMAGE_TOKEN.sub("", _MASK_TOKEN.sub("", _stem(parts[-1])))
    return tuple(folders + [stem.strip("_-. ").lower()])


def _pair_masks(
    items: list[dict],
    masks: Sequence[str],
    shapes: dict[str, list[int] | None],
    relative: Callable[[str], str],
    exclude: Callable[[str, str], None],
) -> int:
    """Give each image item the mask of the same name as ``"label"`` (in place); the masks that match no single
    image, a second mask of an image, or a mask whose header is unreadable or of another shape are excluded with
    the reason. Returns the number of masks paired."""
    by_key: dict[tuple[str, ...], list[dict]] = {}
    for item in items:
        by_key.setdefault(_pair_key(item["image"]), []).append(item)
    paired = 0
    for mask in masks:
        candidates = by_key.get(_pair_key(relative(mask)), [])
        reason = None
        if not candidates:
            reason = "no listed image of the same name"
        elif len(candidates) > 1:
            reason = f"{len(candidates)} images match its name ({', '.join(c['image'] for c in candidates[:3])})"
        elif "label" in candidates[0]:
            reason = f"{candidates[0]['image']} already has the mask {candidates[0]['label']}"
        else:
            info = inspect_image(mask, values=False)
            image_shape = shapes.get(candidates[0]["image"])
            if info["problems"]:
                reason = "; ".join(info["problems"])
            elif image_shape is not None and sorted(info["shape"] or []) != sorted(image_shape):
                reason = f"its shape {info['shape']} differs from the shape {image_shape} of {candidates[0]['image']}"
        if reason:
            exclude(mask, f"mask (by its name) left out: {reason}")
        else:
            candidates[0]["label"] = relative(mask)
            paired += 1
    return paired


# ------------------------------------------------------------------------------------------------------------ check
_MAX_WARNING_LINES = 20


def _print_warnings(warnings: Sequence[tuple[str, str]], print_fn: Callable[[str], Any], where: str) -> None:
    """Print ``"warning: WHAT: MESSAGE"`` lines, at most ``_MAX_WARNING_LINES`` (then where the rest is)."""
    for what, message in warnings[:_MAX_WARNING_LINES]:
        print_fn(f"warning: {what}: {message}")
    if len(warnings) > _MAX_WARNING_LINES:
        print_fn(f"warning: ... and {len(warnings) - _MAX_WARNING_LINES} more (all in {where})")


def _check_item(task: dict) -> dict:
    """Check one datalist item (picklable, for process pools); see :func:`check_datalist`."""
    problems = list(task["problems"])
    result = {
        "section": task["section"],
        "index": task["index"],
        "image": task["image"],
        "ok": False,
        "error": None,
        "warnings": [],
        "format": None,
        "dim": None,
        "shape": None,
        "spacing": None,
        "modality": task["modality"],
        "declared_dim": task["dim"],
    }
    image = task["image"]
    if isinstance(image, str):
        info = inspect_image(image, values=task["values"], series_uid=task.get("series_uid"))
        problems += info["problems"]
        result["warnings"] = list(info["warnings"])
        result.update({k: info[k] for k in ("format", "dim", "shape", "spacing")})
        declared = task["dim"]
        if declared in (2, 3) and info["dim"] in (2, 3) and int(declared) != info["dim"]:
            problems.append(
                f"the datalist declares dim={declared} but the file is {info['dim']}-D (shape {info['shape']})"
            )
        tag = info.get("modality")
        if tag and task["modality"] in MODALITIES:
            try:
                tag_code = normalize_modality(tag)
            except ValueError:
                tag_code = None
            if tag_code is not None and tag_code != task["modality"]:
                problems.append(
                    f"the datalist declares modality {task['modality']} but the DICOM Modality tag is {tag}"
                )
    elif isinstance(image, list):
        problems.append("multi-file items (a list of images) are not checked")
    result["ok"] = not problems
    result["error"] = "; ".join(problems) if problems else None
    return result


def _check_tasks(raw: dict, base_dir: str, sections: Sequence[str], values: bool) -> list[dict]:
    tasks = []
    default_modality, why_not = datalist_modality(raw)
    for section in sections:
        for index, item in enumerate(raw.get(section) or []):
            fixed, problems = _validate_item(item, section, default_modality)
            image = fixed.get("image")
            if isinstance(image, str) and image:
                image = os.path.normpath(os.path.join(base_dir, os.path.expanduser(image)))
            elif not isinstance(image, list):
                image = None
            modality = fixed.get("modality")
            if fixed and "modality" not in fixed:
                problems.append(
                    f'no modality: add "modality" ({", ".join(MODALITIES)}) to the item, or one top-level '
                    '"modality" for the whole datalist' + (f" ({why_not})" if why_not else "")
                )
            tasks.append(
                {
                    "section": section,
                    "index": index,
                    "image": image,
                    "modality": modality,
                    "dim": fixed.get("dim"),
                    "series_uid": fixed.get("series_uid"),
                    "problems": problems,
                    "values": values,
                }
            )
    return tasks


def _summary(results: Sequence[dict]) -> dict:
    by_section: dict[str, dict] = {}
    by_group: dict[str, dict] = {}
    inferred: Counter = Counter()
    for r in results:
        if r.get("declared_dim") is None and r["dim"] in (2, 3):
            inferred[f"{r['dim']}D"] += 1
        section = by_section.setdefault(r["section"], {"items": 0, "bad": 0})
        section["items"] += 1
        section["bad"] += 0 if r["ok"] else 1
        dim = r["dim"] or r.get("declared_dim")
        key = f"{r['modality'] or '?'} {f'{dim}D' if dim else '?D'}"
        group = by_group.setdefault(key, {"items": 0, "bad": 0})
        group["items"] += 1
        group["bad"] += 0 if r["ok"] else 1
    n_bad = sum(0 if r["ok"] else 1 for r in results)
    return {
        "items": len(results),
        "ok": len(results) - n_bad,
        "bad": n_bad,
        "warned": sum(1 for r in results if r.get("warnings")),
        "dim_from_header": dict(sorted(inferred.items())),
        "sections": by_section,
        "modality_dim": dict(sorted(by_group.items())),
    }


def check_datalist(
    path: os.PathLike | str,
    dataset_dir: os.PathLike | str | None = None,
    report: os.PathLike | str | None = None,
    sections: Sequence[str] | str | None = None,
    workers: int = 0,
    values: bool = True,
    progress_every: int = 200,
    verbose: bool = True,
    print_fn: Callable[[str], Any] = print,
) -> dict:
    """Open every item of a datalist and report the ones that training could not use.

    Detected per item: missing file; unreadable / corrupt file (e.g. a truncated ``.nii.gz``, a text file named
    ``.dcm``); a 4-D (or higher) image where a 2-D image or 3-D volume is expected; a constant image; NaN / Inf
    values; zero, negative or non-finite spacing; a DICOM series with missing slices (gap in the slice positions) or
    duplicate slices (same position), mixed orientations or several series in one directory; an empty series
    directory; a missing or unknown modality, or one that contradicts the DICOM Modality tag; a declared ``dim``
    that disagrees with the file. Items without ``dim`` get it from the header, as :func:`load_datalist` does (the
    summary counts them). Zero or missing spacing is a warning, not a problem: the readers use 1 mm. A datalist
    without any item is an error. Headers are read without pixel data where the format allows; the value checks
    (NaN / Inf, constant image, truncated data) read the pixel values once, cheaply -- see
    :func:`medssl.data.readers.inspect_image` for the trade-off; ``values=False`` skips them.

    Prints a summary per section and per modality / dimension, then one line per bad item:
    ``"SECTION item N: PATH: PROBLEM"``, then up to 20 ``"warning: SECTION item N: PATH: WARNING"`` lines.

    Args:
        path: the datalist JSON file.
        dataset_dir: directory of relative paths (default: see the module docstring).
        report: write the report as JSON to this path.
        sections: sections to check (list or comma-separated string; default: every item list in the file).
        workers: check items in this many processes (0 or 1: in this process).
        values: read pixel values for the NaN / Inf, constant-image and truncation checks.
        progress_every: print a progress line to stderr every this many items (0: never).
        verbose: print the summary and the bad items.
        print_fn: where the summary lines go.

    Returns:
        ``{"datalist", "dataset_dir", "items": [{"section", "index", "image", "ok", "error", "warnings", "format",
        "dim", "shape", "spacing", "modality", "declared_dim"}, ...], "summary": {"items", "ok", "bad", "warned",
        "dim_from_header", "sections", "modality_dim"}}`` -- ``dim`` / ``shape`` / ``spacing`` are read from the
        file (None when unreadable), ``modality`` and ``declared_dim`` come from the datalist; ``modality_dim`` counts
        items per "MODALITY nD" (the file's dim, else the declared one); ``dim_from_header`` counts the items without
        a declared ``dim`` per "nD"; ``warned`` the items with warnings.
    """
    path = os.path.abspath(str(path))
    raw = _read_json(path)
    base_dir = resolve_dataset_dir(path, dataset_dir)
    if isinstance(sections, str):
        sections = [s.strip() for s in sections.split(",") if s.strip()]
    sections = list(sections) if sections else datalist_sections(raw)
    missing = [s for s in sections if not isinstance(raw.get(s), list)]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} list in the datalist (sections: {datalist_sections(raw)})")
    _require_items(path, raw, sections or None)
    tasks = _check_tasks(raw, base_dir, sections, values)

    results: list[dict] = []

    def collect(iterator: Iterable[dict]) -> None:
        for result in iterator:
            results.append(result)
            if verbose and progress_every and len(results) % progress_every == 0:
                _progress(f"check_datalist: {len(results)}/{len(tasks)} items checked", verbose)

    if workers and workers > 1 and len(tasks) > 1:
        chunk = max(1, min(16, math.ceil(len(tasks) / (4 * workers))))
        with ProcessPoolExecutor(max_workers=int(workers)) as pool:
            collect(pool.map(_check_item, tasks, chunksize=chunk))
    else:
        collect(map(_check_item, tasks))

    output = {"datalist": path, "dataset_dir": base_dir, "items": results, "summary": _summary(results)}
    if report is not None:
        report_path = Path(report)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        with open(report_path, "w", encoding="utf-8") as f:
            json.dump(output, f, indent=2)
            f.write("\n")
    if verbose:
        summary = output["summary"]
        per_section = ", ".join(f"{k} {v['items']}" for k, v in summary["sections"].items())
        warned = f" ({summary['warned']} with warnings)" if summary["warned"] else ""
        print_fn(
            f"check_datalist: {path}: {summary['items']} items ({per_section or 'none'}), "
            f"{summary['ok']} ok{warned}, {summary['bad']} bad"
        )
        for key, group in summary["modality_dim"].items():
            count = f"{group['items']} item" + ("s" if group["items"] != 1 else "")
            print_fn(f"  {key}: {count}" + (f" ({group['bad']} bad)" if group["bad"] else ""))
        if summary["dim_from_header"]:
            found = ", ".join(f"{k}: {v}" for k, v in summary["dim_from_header"].items())
            print_fn(f'  "dim" read from the image headers (as the bundles do at load): {found}')
        for r in results:
            if not r["ok"]:
                shown = r["image"] if r["image"] is not None else "(no image)"
                print_fn(f"{r['section']} item {r['index']}: {shown}: {r['error']}")
        _print_warnings(
            [(f"{r['section']} item {r['index']}: {r['image']}", w) for r in results for w in r.get("warnings") or []],
            print_fn,
            "--report",
        )
        if report is not None:
            print_fn(f"check_datalist: report written to {report}")
    return output
