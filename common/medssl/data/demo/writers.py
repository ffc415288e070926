"""Writers: NIfTI volumes in RAS+, a CT volume as a DICOM series, and the real files (copied, downscaled DICOM,
PNG, NIfTI)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from .catalogue import _UID_ENTROPY, MAX_2D_SIZE, RealSource
from .generators import _block_mean

def _ras_affine(spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> np.ndarray:
    """RAS+ affine of a volume centred on the world origin."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing)]
    return affine


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def write_ct_dicom_series(
    hu: np.ndarray, affine: np.ndarray, out_dir: str | os.PathLike, uid_entropy: str
) -> list[Path]:
    """Write a CT volume as a DICOM series directory, one uncompressed slice per file.

    Args:
        hu: Hounsfield units, (X, Y, Z) in RAS+ with an axis-aligned, positive-diagonal ``affine``
            (as :func:`synthetic_ct_phantom` / :func:`_ras_affine` make); Z (axial slices) is LAST.
        affine: the RAS+ voxel-to-world matrix of ``hu``.
        out_dir: the series directory (created; must contain nothing but the slices).
        uid_entropy: string the UIDs are derived from, so the same input gives the same UIDs.

    DICOM is LPS: rows run posterior (-Y_RAS), columns run left (-X_RAS), so slice k is
    ``hu[::-1, ::-1, k].T``; ImagePositionPatient is the LPS position of that first pixel. Stored
    values are ``hu + 1024`` (unsigned 16-bit, 12 bits stored) with RescaleIntercept -1024, slope 1.
    """
    spacing = np.abs(np.diag(affine)[:3])
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine)[:3])) or np.any(np.diag(affine)[:3] <= 0):
        raise ValueError(f"{out_dir}: write_ct_dicom_series needs an axis-aligned RAS+ affine, got\n{affine}")
    nx, ny, nz = hu.shape
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corner_ras = affine @ np.array([nx - 1, ny - 1, 0, 1.0])  # world position of the first stored pixel
    uid = lambda *parts: generate_uid(entropy_srcs=[_UID_ENTROPY, uid_entropy, *parts])  # noqa: E731
    study, series, frame = uid("study"), uid("series"), uid("frame")
    stored = np.clip(hu.astype(np.int32) + 1024, 0, 4095).astype(np.uint16)
    paths = []
    for k in range(nz):
        sop = uid("slice", str(k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.Modality = "CT"
        ds.Manufacturer = "medssl synthetic phantom"
        ds.StudyDescription = "medssl demo CT phantom"
        ds.SeriesDescription = "synthetic torso phantom (HU)"
        ds.PatientName = "Demo^Phantom"
        ds.PatientID = "MEDSSL-DEMO-" + uid_entropy
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = float(spacing[2])
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        position = corner_ras[:3] + np.array([0.0, 0.0, k * spacing[2]])
        ds.ImagePositionPatient = [float(-position[0]), float(-position[1]), float(position[2])]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = float(position[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (Y), column spacing (X)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = np.ascontiguousarray(stored[::-1, ::-1, k].T).astype("<u2").tobytes()
        path = out_dir / f"IM{k + 1:04d}.dcm"
        _save_dicom(ds, path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# writers of the real files
# --------------------------------------------------------------------------------------------------
_PIXEL_GEOMETRY_KEYWORDS = (
    "IconImageSequence",
    "SequenceOfUltrasoundRegions",
    "LargestImagePixelValue",
    "SmallestImagePixelValue",
    "PixelPaddingRangeLimit",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
    "PaletteColorLookupTableUID",
)


def _save_dicom(ds: Dataset, path: Path) -> None:
    """Save with a DICOM file header as Explicit VR Little Endian (pydicom 3 API, pydicom 2.4 fallback)."""
    try:
        ds.save_as(path, enforce_file_format=True)
    except TypeError:  # pragma: no cover - pydicom < 3
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    pydicom_logger = logging.getLogger("pydicom")
    level = pydicom_logger.level
    pydicom_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        pydicom_logger.setLevel(level)


def _write_downscaled_dicom(source: Path, target: Path, name: str) -> None:
    """Re-write a 2-D DICOM file uncompressed (Explicit VR Little Endian) with its largest side <= 128 px.

    Pixels are area-averaged; Rows / Columns / PixelSpacing follow (an invalid spacing such as [0, 0] is
    removed); palette colour becomes RGB 8-bit;
    pixel-position-dependent elements (overlays, icon, ultrasound regions, palette tables) are dropped.
    The instance gets a new, deterministic SOPInstanceUID and ImageType DERIVED.
    """
    try:
        from pydicom.pixels import apply_color_lut
    except ImportError:  # pragma: no cover - pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_color_lut

    ds = pydicom.dcmread(source)
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{source}: {ds.NumberOfFrames} frames where a single 2-D image was expected")
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        pixels = (rgb >> 8).astype(np.uint8) if rgb.dtype.itemsize == 2 else rgb.astype(np.uint8)
        ds.PhotometricInterpretation = "RGB"
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    rows, cols = pixels.shape[:2]
    factor = max(1, math.ceil(max(rows, cols) / MAX_2D_SIZE))
    if factor > 1:
        pixels = np.rint(_block_mean(pixels, (factor, factor)))
    dtype = np.dtype(f"{'i' if ds.PixelRepresentation else 'u'}{ds.BitsAllocated // 8}").newbyteorder("<")
    pixels = pixels.astype(dtype)
    for keyword in _PIXEL_GEOMETRY_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    for tag in [t for t in ds.keys() if 0x6000 <= t.group <= 0x601E and t.group % 2 == 0]:
        del ds[tag]  # overlay planes
    ds.Rows, ds.Columns = pixels.shape[:2]
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        if keyword in ds:
            spacing = [float(s) for s in (ds[keyword].value or [])]
            if len(spacing) == 2 and min(spacing) > 0:
                setattr(ds, keyword, [s * factor for s in spacing])
            else:  # e.g. RG1's PixelSpacing [0, 0]: an invalid value is dropped rather than carried over
                delattr(ds, keyword)
    if "SamplesPerPixel" in ds and ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    image_type = list(ds.get("ImageType", ["ORIGINAL", "PRIMARY"]))
    ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
    ds.DerivationDescription = f"medssl demo: area-downscaled by {factor} from {source.name}"[:1024]
    sop = generate_uid(entropy_srcs=[_UID_ENTROPY, name, source.name])
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    _save_dicom(ds, target)


def _write_png(source: Path, target: Path) -> None:
    """Write an image file as PNG with its largest side <= 128 px (area downscaling)."""
    with Image.open(source) as image:
        mode = "RGB" if image.mode not in ("L", "I;16") else image.mode
        pixels = np.asarray(image.convert(mode))
    factor = max(1, math.ceil(max(pixels.shape[:2]) / MAX_2D_SIZE))
    if factor > 1:
        pixels = np.rint(_block_mean(pixels, (factor, factor))).astype(pixels.dtype)
    Image.fromarray(pixels).save(target)


def _write_nifti_volume(source: Path, target: Path) -> None:
    """Write the first 3-D volume of a NIfTI file, in-plane area-downscaled so that X, Y <= 64."""
    image = nib.load(str(source))
    data = np.asanyarray(image.dataobj)
    while data.ndim > 3:
        data = data[..., 0]
    factors = tuple(max(1, math.ceil(n / 64)) for n in data.shape[:2]) + (1,)
    affine = image.affine.copy()
    if factors != (1, 1, 1):
        integer = np.issubdtype(data.dtype, np.integer)
        data = _block_mean(data, factors)
        data = np.rint(data).astype(np.int16) if integer else data.astype(np.float32)
        # voxel (i, j, k) of the new grid is centred on old voxel (f_i * i + (f_i - 1) / 2, ...)
        scale = np.diag([*factors, 1.0])
        scale[:3, 3] = [(f - 1) / 2.0 for f in factors]
        affine = affine @ scale
    elif np.issubdtype(data.dtype, np.integer):
        data = data.astype(data.dtype.newbyteorder("="))
    else:
        data = data.astype(np.float32)
    _save_nifti(np.ascontiguousarray(data), affine, target)


def _write_real(source: RealSource, path: Path, target: Path) -> None:
    if source.kind == "copy":
        shutil.copyfile(path, target)
    elif source.kind == "dicom2d":
        with _quiet_pydicom():  # some vendor files carry values pydicom warns about (e.g. CS 'ABDOM/RAD')
            _write_downscaled_dicom(path, target, source.name)
    elif source.kind == "png":
        _write_png(path, target)
    elif source.kind == "nifti":
        _write_nifti_volume(path, target)
    else:
        raise ValueError(f"RealSource {source.name}: unknown kind {source.kind!r}")


