"""Image readers for mixed 2D / 3D medical data, built on MONAI's ``LoadImage`` readers.

One entry point, :class:`LoadMedicalImaged` (and the non-dictionary :func:`load_medical_image`), picks the MONAI reader
from the path:

- a directory: a DICOM series, :class:`MedicalPydicomReader` (``monai.data.PydicomReader``); slices sorted by their
  position along the slice normal, ``RescaleSlope`` / ``RescaleIntercept`` applied (CT comes out in Hounsfield
  units), duplicate / missing slices refused;
- ``.dcm`` / ``.dicom`` / ``.ima``, or no suffix and the ``DICM`` preamble: a single DICOM file (CR, DX, MG, CT, MR,
  US, NM ...; grey or RGB; multi-frame), same reader;
- ``.nii`` / ``.nii.gz``: ``monai.data.NibabelReader``;
- ``.nrrd`` / ``.nhdr``: :class:`MedicalNrrdReader` (``monai.data.NrrdReader`` on pynrrd);
- ``.png`` / ``.jpg`` / ``.jpeg`` / ``.tif`` / ``.tiff`` / ``.bmp``: ``monai.data.PILReader`` (palette / RGBA / CMYK
  converted to RGB, LA / 1-bit to grey).

Output convention: a channel-first ``MetaTensor`` (C, *spatial), float32 by default. A 3D volume is reoriented to RAS
(``orientation="RAS"``): (C, X, Y, Z) with X = left->Right, Y = posterior->Anterior and the DEPTH axis last
(Z = inferior->Superior, axial slices); the voxel spacing is kept in the affine (``img.affine``, ``img.pixdim``).
A 2D image keeps the order MONAI's readers give it (PIL / DICOM: (C, W, H), i.e. column index first). RGB images have
C = 3. A NIfTI / NRRD file with a trailing singleton axis (X, Y, 1) is a 2D image.

Every read failure is raised as :class:`ImageReadError` whose message is ``"PATH: reason"``.

Format detection, DICOM slice ordering and the header-level :func:`inspect_image` live in ``medssl.data.datalist``
(which imports neither torch nor MONAI, for fast command-line tools) and are re-exported here.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection
from monai.data import MetaTensor, NibabelReader, NrrdReader, PILReader, PydicomReader
from monai.data.image_reader import NrrdImage
from monai.transforms import LoadImage, MapTransform, Orientation, SqueezeDim, Transform
from monai.utils import MetaKeys

from medssl.data.datalist import (  # noqa: F401 - re-exported: the reader-side names of the shared helpers
    _NRRD_SPATIAL_KINDS,
    DICOM_SUFFIXES,
    NIFTI_SUFFIXES,
    NRRD_SUFFIXES,
    PIL_SUFFIXES,
    ImageReadError,
    _describe,
    group_dicom_series,
    image_format,
    inspect_image,
    is_dicom_file,
    natural_dim,
    pil_to_grey_or_rgb,
    sort_dicom_slices,
)

__all__ = [
    "ImageReadError",
    "image_format",
    "is_dicom_file",
    "inspect_image",
    "MedicalPydicomReader",
    "MedicalNrrdReader",
    "MedicalImageLoader",
    "load_medical_image",
    "LoadMedicalImaged",
    "EnsureChannels",
    "EnsureChannelsd",
]

# axis labels of MONAI's RAS convention (passed explicitly: Orientation's default changes across MONAI versions)
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


class MedicalPydicomReader(PydicomReader):
    """``monai.data.PydicomReader`` made safe for unlabelled clinical folders.

    Changes to MONAI's reader (which stays in charge of decoding, rescaling and the affine):

    - a series directory is ordered by slice position along the normal (MONAI sorts by InstanceNumber only), and
      refused (``ValueError``) when it has duplicate or missing slices, mixed orientations, or several series
      (unless ``series_uid`` picks one); non-image DICOM files in the directory (e.g. a DICOMDIR) are ignored;
    - a single RGB file (``SamplesPerPixel`` = 3) is a 2D image with 3 channels, not a 3-slice volume;
    - a multi-frame file (``NumberOfFrames`` > 1) stacks its frames on the LAST spatial axis (depth);
    - ``MONOCHROME1`` images (inverted grey, common for CR / DX) are inverted to ``MONOCHROME2`` with the stored bit
      range: v' = (2^BitsStored - 1) * slope + 2 * intercept - v (unsigned), so all X-rays have bright = dense;
    - ``RescaleSlope`` / ``RescaleIntercept`` are applied by MONAI (``_get_array_data``): CT is in HU.

    Args:
        series_uid: read only the slices of this ``SeriesInstanceUID`` from a directory.
        kwargs: passed to ``monai.data.PydicomReader``.
    """

    def __init__(self, series_uid: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.series_uid = series_uid

    def read(self, data, **kwargs):
        names = data if isinstance(data, (list, tuple)) else [data]
        if len(names) == 1 and os.path.isdir(str(names[0])):
            directory = str(names[0])
            if not any(os.path.isfile(os.path.join(directory, f)) for f in os.listdir(directory)):
                raise ValueError("empty series directory (no files)")
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Failed to read")
                try:
                    result = super().read(data, **kwargs)
                except IndexError:  # MONAI indexes the first slice of an empty list
                    raise ValueError("empty series directory (no DICOM files)") from None
            if self.has_series:
                datasets, files = list(result), list(self.filenames[0])
            else:
                datasets, files = [result], [self.filenames[0]]
            return self._select_series(datasets, files)
        return super().read(data, **kwargs)

    def _select_series(self, datasets: list, files: list):
        keep = [(ds, f) for ds, f in zip(datasets, files) if "PixelData" in ds]
        if not keep:
            raise ValueError("no DICOM image files in the series directory")
        groups = group_dicom_series([(f, ds) for ds, f in keep])
        if self.series_uid is not None:
            if self.series_uid not in groups:
                raise ValueError(f"series_uid {self.series_uid} not found in the directory (found {sorted(groups)})")
            keep = [(ds, f) for f, ds in groups[self.series_uid]]
        elif len(groups) > 1:
            raise ValueError(
                f"{len(groups)} DICOM series in one directory ({', '.join(sorted(groups))}); "
                'give each its own datalist item with "series_uid", or one directory per series'
            )
        order, problems = sort_dicom_slices([ds for ds, _ in keep], [f for _, f in keep])
        if problems:
            raise ValueError("; ".join(problems))
        keep = [keep[i] for i in order]
        if len(keep) == 1:
            self.has_series = False
            self.filenames = [keep[0][1]]
            return keep[0][0]
        for rank, (ds, _) in enumerate(keep):
            ds.InstanceNumber = rank + 1  # MONAI stacks by InstanceNumber: make it the position order (in memory only)
        self.has_series = True
        self.filenames = [[f for _, f in keep]]
        return [ds for ds, _ in keep]

    def _get_array_data(self, img, filename):
        data = super()._get_array_data(img, filename)
        if int(img.get("NumberOfFrames", 1) or 1) > 1 and data.ndim >= 3:
            data = np.moveaxis(data, 0, 2)  # (F, R, C[, S]) -> (R, C, F[, S]): frames on the depth axis
        if str(img.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
            slope = float(img.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(img.get("RescaleIntercept", 0.0) or 0.0)
            bits = int(img.get("BitsStored", 16) or 16)
            top = (2**bits - 1) if int(img.get("PixelRepresentation", 0) or 0) == 0 else -1
            data = np.float32(top * slope + 2 * intercept) - data.astype(np.float32)
        return data

    def get_data(self, data):
        with warnings.catch_warnings():
            # CR / DX / US files rarely have ImagePositionPatient: MONAI warns and uses an identity affine, expected
            warnings.filterwarnings("ignore", message=".*ImagePositionPatient.*")
            array, meta = super().get_data(data)
        single = data if not isinstance(data, list) else (data[0] if len(data) == 1 else None)
        if single is not None and not isinstance(single, list) and int(single.get("SamplesPerPixel", 1) or 1) > 1:
            spatial = tuple(meta[MetaKeys.SPATIAL_SHAPE])[:-1]  # the trailing samples axis is the channel axis
            meta[MetaKeys.SPATIAL_SHAPE] = spatial
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = -1
        return array, meta


# -------------------------------------------------------------------------------------------------------------- NRRD
class MedicalNrrdReader(NrrdReader):
    """``monai.data.NrrdReader`` that also reads NRRD files without world-space fields.

    - no ``space directions``: a diagonal from ``spacings`` (1 where unknown), origin 0;
    - no ``space origin``: 0;
    - one non-spatial axis (``kinds`` such as ``RGB-color``, ``vector``, ``list``) becomes the channel axis.
    """

    def read(self, data, **kwargs):
        images = super().read(data, **kwargs)
        if isinstance(images, list):
            return [self._standardise(i) for i in images]
        return self._standardise(images)

    @staticmethod
    def _standardise(image: NrrdImage) -> NrrdImage:
        header = dict(image.header)
        array = image.array
        sizes = [int(s) for s in header["sizes"]]
        kinds = list(header.get("kinds", [None] * len(sizes)))
        kinds = [k if k is None else str(k) for k in kinds]
        spatial = [i for i, k in enumerate(kinds) if k in _NRRD_SPATIAL_KINDS]
        channel = [i for i in range(len(sizes)) if i not in spatial]
        if len(channel) > 1:
            raise ValueError(f"NRRD with {len(channel)} non-spatial axes (kinds {kinds}) is not supported")
        directions = header.get("space directions")
        if directions is None:
            spacings = np.asarray(header.get("spacings", [1.0] * len(sizes)), dtype=float)
            spacings = np.where(np.isfinite(spacings) & (spacings != 0), spacings, 1.0)[spatial]
            directions = np.diag(spacings)
        else:
            directions = np.asarray(directions, dtype=float)[spatial]
        origin = header.get("space origin")
        origin = np.zeros(directions.shape[1]) if origin is None else np.asarray(origin, dtype=float)
        if directions.shape[1] > len(spatial):  # e.g. a 2D image placed in 3D space: keep its in-plane axes
            directions, origin = directions[:, : len(spatial)], origin[: len(spatial)]
        header["space origin"] = origin
        header["space directions"] = directions
        header["sizes"] = np.asarray([sizes[i] for i in spatial])
        header["kinds"] = [kinds[i] for i in spatial]
        header["dimension"] = len(spatial)
        if channel:
            array = np.moveaxis(array, channel[0], 0)  # MONAI's NrrdReader then reports channel dim 0
        return NrrdImage(array, header)


# ------------------------------------------------------------------------------------------------------------ loader
class MedicalImageLoader:
    """Load one image with the MONAI reader of its format; see the module docstring for formats and conventions.

    Args:
        orientation: axis codes that 3D volumes are reoriented to (``None``: keep the file's orientation).
        dtype: dtype of the output tensor.

    Call:
        ``loader(path, dim=None, series_uid=None) -> MetaTensor`` (C, *spatial); volumes (C, X, Y, Z) in
        ``orientation`` with the depth axis last. ``dim`` (2 or 3), when given, is the number of spatial dimensions
        the caller expects; a file that disagrees raises :class:`ImageReadError`.
    """

    def __init__(self, orientation: str | None = "RAS", dtype: DtypeLike = np.float32):
        self.orientation = orientation
        self.dtype = dtype
        self._readers: dict[str, Any] = {
            "dicom": MedicalPydicomReader(),
            "nifti": NibabelReader(),
            "nrrd": MedicalNrrdReader(),
            "pil": PILReader(converter=pil_to_grey_or_rgb),
        }
        self._readers["dicom_series"] = self._readers["dicom"]
        # LoadImage also registers MONAI's default readers; the optional nvImageCodec one warns when it is absent
        plugin_logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
        level = plugin_logger.level
        plugin_logger.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
                self._load = LoadImage(
                    reader=self._readers["nifti"], image_only=True, ensure_channel_first=True, dtype=dtype
                )
        finally:
            plugin_logger.setLevel(level)
        self._orient = Orientation(axcodes=orientation, labels=_RAS_LABELS) if orientation is not None else None

    def __call__(self, path: os.PathLike | str, dim: int | None = None, series_uid: str | None = None) -> MetaTensor:
        path = str(path)
        try:
            fmt = image_format(path)
            reader = self._readers[fmt]
            if fmt == "dicom_series" and series_uid:
                reader = MedicalPydicomReader(series_uid=str(series_uid))
            image = self._load(path, reader=reader)
        except ImageReadError:
            raise
        except Exception as e:  # noqa: BLE001 - every reader failure becomes "PATH: reason"
            raise ImageReadError(path, _describe(e)) from e
        if fmt == "nifti" and image.shape[0] > 1:
            shape = tuple(image.shape[1:]) + (image.shape[0],)
            raise ImageReadError(
                path, f"{len(shape)}-D image of shape {shape} where a 2-D image or 3-D volume was expected"
            )
        return self._fix_dim(path, image, dim)

    def _fix_dim(self, path: str, image: MetaTensor, dim: int | None) -> MetaTensor:
        spatial = tuple(int(s) for s in image.shape[1:])
        found, squeezed = natural_dim(spatial)
        for _ in range(len(spatial) - len(squeezed)):
            image = SqueezeDim(dim=image.ndim - 1)(image)
        if found not in (2, 3):
            raise ImageReadError(
                path, f"{found}-D image of shape {spatial} where a 2-D image or 3-D volume was expected"
            )
        if dim is not None and int(dim) != found:
            raise ImageReadError(path, f"{found}-D image of shape {spatial} where the datalist declares dim={int(dim)}")
        if found == 3 and self._orient is not None:
            image = self._orient(_unit_spacing_fallback(image))
        return image


def _unit_spacing_fallback(image: MetaTensor) -> MetaTensor:
    """``image`` with each zero (or non-finite) column of its affine replaced by a 1 mm step orthogonal to the other
    axes. MONAI's readers already read zero / missing spacing as 1 mm for 2D images and NIfTI ``pixdim``; what this
    adds: the volumes whose affine keeps a zero column (DICOM series with PixelSpacing 0, NRRD space directions or a
    NIfTI sform with a zero vector), which ``Orientation`` cannot reorient."""
    affine = np.asarray(image.affine, dtype=float)
    axes = affine[:3, :3]
    norms = np.linalg.norm(axes, axis=0)
    bad = ~(np.isfinite(norms) & (norms > 0))
    if not bad.any() or affine.shape != (4, 4):
        return image
    def orthogonal(v: np.ndarray) -> np.ndarray:
        return v - sum((np.dot(v, u) * u for u in basis), np.zeros(3))

    basis: list[np.ndarray] = []  # orthonormal, spanning the good columns
    for j in np.flatnonzero(~bad):
        if np.linalg.norm(residual := orthogonal(axes[:, j])) > 1e-6 * norms[j]:
            basis.append(residual / np.linalg.norm(residual))
    fixed = axes.copy()
    for k in np.flatnonzero(bad):  # Gram-Schmidt on the unit vectors, e_k first: diag(0, 1, 1) -> diag(1, 1, 1)
        for candidate in [np.eye(3)[k]] + [np.eye(3)[j] for j in range(3) if j != k]:
            if np.linalg.norm(residual := orthogonal(candidate)) > 1e-3:
                break
        fixed[:, k] = residual / np.linalg.norm(residual)
        basis.append(fixed[:, k])
    affine[:3, :3] = fixed
    affine[:3, 3] = np.where(np.isfinite(affine[:3, 3]), affine[:3, 3], 0.0)
    image.affine = torch.as_tensor(affine, dtype=image.affine.dtype)
    return image


_DEFAULT_LOADERS: dict[tuple, MedicalImageLoader] = {}


def load_medical_image(
    path: os.PathLike | str,
    orientation: str | None = "RAS",
    dtype: DtypeLike = np.float32,
    dim: int | None = None,
    series_uid: str | None = None,
) -> MetaTensor:
    """Load one image (file or DICOM series directory) as a channel-first ``MetaTensor``.

    Volumes come out (C, X, Y, Z) in ``orientation`` (RAS: the depth axis Z = inferior->superior is last) with the
    spacing in the affine; 2D images (C, W, H) as MONAI's readers give them. See :class:`MedicalImageLoader`.

    Raises:
        ImageReadError: "PATH: reason" for a missing, unreadable, corrupt or wrongly-dimensioned image.
    """
    key = (orientation, np.dtype(dtype).str if dtype is not None else None)
    if key not in _DEFAULT_LOADERS:
        _DEFAULT_LOADERS[key] = MedicalImageLoader(orientation=orientation, dtype=dtype)
    return _DEFAULT_LOADERS[key](path, dim=dim, series_uid=series_uid)


class LoadMedicalImaged(MapTransform):
    """Dictionary transform: load ``d[key]`` for each key with the reader of its format (see the module docstring).

    The first key (normally ``"image"``) also fills ``d[dim_key]`` with its number of spatial dimensions (2 or 3);
    a ``dim`` already in the item is checked against the file (mismatch: :class:`ImageReadError`), and
    ``d[series_key]`` (a ``SeriesInstanceUID``) selects one series from a directory holding several.

    Output: ``d[key]`` = ``MetaTensor`` (C, *spatial), float32 by default; 3D volumes (C, X, Y, Z) reoriented to
    ``orientation`` (RAS: the depth axis, inferior->superior, is the last spatial axis) with the spacing kept in the
    affine; 2D images (C, W, H) in MONAI's reader order; RGB images have 3 channels.

    Args:
        keys: keys of the items to load.
        orientation: axis codes of 3D volumes (``None``: keep the file's).
        dtype: output dtype.
        dim_key: item key with the expected number of spatial dimensions (read and written).
        series_key: item key with an optional ``SeriesInstanceUID`` for DICOM directories.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        orientation: str | None = "RAS",
        dtype: DtypeLike = np.float32,
        dim_key: str = "dim",
        series_key: str = "series_uid",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.loader = MedicalImageLoader(orientation=orientation, dtype=dtype)
        self.dim_key = dim_key
        self.series_key = series_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = self.keys[0]
        for key in self.key_iterator(d):
            is_first = key == first
            dim = d.get(self.dim_key) if is_first else None
            series_uid = d.get(self.series_key) if is_first else None
            image = self.loader(d[key], dim=dim, series_uid=series_uid)
            d[key] = image
            if is_first:
                d[self.dim_key] = image.ndim - 1
        return d


# ---------------------------------------------------------------------------------------------------------- channels
# ITU-R BT.601 luma weights: Y = 0.299 R + 0.587 G + 0.114 B
_LUMA = (0.299, 0.587, 0.114)


class EnsureChannels(Transform):
    """Make a channel-first image (C, *spatial) have ``channels`` (1 or 3) channels so grey and RGB items batch.

    RGB(A) -> grey: luminance Y = 0.299 R + 0.587 G + 0.114 B (alpha dropped); grey -> RGB: the channel repeated;
    RGBA -> RGB: alpha dropped. Metadata of a ``MetaTensor`` is kept.
    """

    def __init__(self, channels: int = 1):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        c = int(img.shape[0])
        if c == self.channels:
            return img
        if self.channels == 1 and c in (3, 4):
            weights = torch.as_tensor(_LUMA, dtype=img.dtype if img.is_floating_point() else torch.float32)
            weights = weights.to(img.device).reshape((3,) + (1,) * (img.ndim - 1))
            return (img[:3] * weights).sum(dim=0, keepdim=True)
        if self.channels == 3 and c == 1:
            return img.repeat((3,) + (1,) * (img.ndim - 1))
        if self.channels == 3 and c == 4:
            return img[:3]
        raise ValueError(f"cannot convert an image with {c} channels to {self.channels} channels")


class EnsureChannelsd(MapTransform):
    """Dictionary version of :class:`EnsureChannels` (``channels`` = 1: grey, 3: RGB)."""

    def __init__(self, keys: KeysCollection = ("image",), channels: int = 1, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.converter = EnsureChannels(channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d
