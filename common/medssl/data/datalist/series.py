"""DICOM series: read headers, group files by SeriesInstanceUID, order slices and report gaps / duplicates."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .formats import DICOM_SUFFIXES, _describe, _has_suffix

# relative / absolute tolerances of the DICOM slice-position checks
_DUPLICATE_TOL_MM = 1e-3
_GAP_FACTOR = 1.5


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


