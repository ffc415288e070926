"""Header-level inspection of one image (NIfTI, NRRD, PIL, DICOM file or series): shape, spacing, values, problems."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .formats import _NRRD_SPATIAL_KINDS, ImageReadError, _describe, image_format, natural_dim
from .series import _DUPLICATE_TOL_MM, _float_list, group_dicom_series, read_dicom_headers, sort_dicom_slices


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


