"""Build a datalist by scanning a folder: DICOM series, 2D / 3D images, masks paired to their images."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .formats import (
    DICOM_SUFFIXES,
    MODALITIES,
    MODALITY_ALIASES,
    NIFTI_SUFFIXES,
    NRRD_SUFFIXES,
    PIL_SUFFIXES,
    _PROJECTION_MODALITIES,
    is_dicom_file,
    normalize_modality,
)
from .inspect import inspect_image
from .io import _print_warnings, _progress, save_datalist
from .series import group_dicom_series, read_dicom_headers


# ------------------------------------------------------------------------------------------------------------ build
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


