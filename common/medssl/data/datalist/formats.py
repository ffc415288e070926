"""Modality names and aliases, datalist sections, image file formats (suffix / DICOM preamble sniffing)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

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


# ------------------------------------------------------------------------------------------------------ image files
# Format detection here, DICOM series in .series, per-file inspection in .inspect: the package imports
# neither torch nor MONAI, so that `tools/datalist.py` and its worker processes start fast; the MONAI readers
# (medssl.data.readers) use it too.
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

_NRRD_SPATIAL_KINDS = {None, "domain", "space", "time", "???", "none"}


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


