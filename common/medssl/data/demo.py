"""The embedded demo dataset: a small, mixed 2D / 3D, multi-modality dataset built offline in seconds, plus a larger
learnability set.

It has three parts (see ``DEMO_DATA.md`` next to this file, copied to ``DIR/README.md``):

1. Real images that ship *on disk* inside installed packages (pydicom, pydicom-data, nibabel, dipy,
   scikit-image). They are copied (small DICOM files) or re-written in our formats after downscaling
   (large DICOM files -> uncompressed DICOM at <= 128 px, photographs -> PNG, MR volumes -> NIfTI).
   A missing optional package only removes its files; nothing is ever downloaded.
2. Deterministic synthetic images WITH labels, drawn from ``seed`` only:
   chest-X-ray-like 2D images in three classes (``CLASSES``) and with organ masks (lungs, heart,
   clavicles), 2D ultrasound-like images with a lesion mask, fundus-like photographs, H&E-like histology
   tiles, 3D CT phantoms (Hounsfield units) and MR phantoms (T1- or T2-like) with segmentation masks, one
   CT phantom written as a DICOM series, and class-labelled chest CT volumes (``normal`` / ``nodule``:
   the labelled 3D split).
3. The learnability set (version 3, :mod:`medssl.data.learnability`, optional: ``learn=False`` leaves it out):
   3,060 class-labelled 2D images (chest X-ray-, fundus- and H&E-like, 128 px) and 480 volumes (chest CT, brain
   MR, 64^3) under ``DIR/learn/``, whose class cue is shape or texture, with their own datalists
   (``datalist_learn.json``, ``datalist_learn_2d.json``, ``datalist_learn_3d.json``); about 40 s of CPU.

The result is ``DIR/datalist.json`` (sections ``training`` / ``validation`` / ``test``, each item
``{"image", "modality", "dim", "label"?}``; ``label`` is an ``int`` class index into ``"classes"`` for
the 2D and 3D classification items and a ``str`` mask path for segmentation items, whose values are named
by ``"mask_classes"[modality]``), plus task datalists holding only the items of one kind
(:data:`TASK_DATALISTS`). ``datalist.json`` never lists the learnability set (the test-suite and the bundles' smoke
runs read it).

Axis conventions: volumes are written as NIfTI in RAS+ world orientation with array axes (X, Y, Z) =
(right, anterior, superior); the depth (axial slice) axis is the LAST one, as MONAI loads it. 2D images
are (H, W) or (H, W, 3) arrays in PNG / DICOM files; MONAI's readers return them channels-first.

Only numpy, pydicom, nibabel and pillow are used (no torch / MONAI import), so a build takes a few
seconds. Every random draw comes from ``numpy.random.default_rng(SeedSequence([seed, group, index]))``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medssl.utils.io import file_sha256

__all__ = [
    "DEMO_VERSION",
    "CLASSES",
    "SEGMENTATION_LABELS",
    "TASK_DATALISTS",
    "REAL_SOURCES",
    "RealSource",
    "build_demo_dataset",
    "synthetic_chest_xr",
    "synthetic_chest_xr_organs",
    "synthetic_chest_ct_nodules",
    "MASK_CLASSES",
    "CT_VOLUME_CLASSES",
    "synthetic_us_lesion",
    "synthetic_fundus",
    "synthetic_histology",
    "synthetic_ct_phantom",
    "synthetic_mr_phantom",
    "write_ct_dicom_series",
    "dataset_digest",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the content of a build changes; a datalist built by another version is rebuilt.
DEMO_VERSION = "3"
#: Class names of the 2D classification items (``label`` = index into this list).
CLASSES = ("normal", "nodule", "effusion")
#: Names of the values of the segmentation masks, per modality of the masked items (``mask == i`` is
#: ``MASK_CLASSES[modality][i]``); written to the datalist as ``"mask_classes"``. XR: JSRT / SCR-style chest
#: organs (both lungs one class; a clavicle pixel over a lung is ``clavicles``).
MASK_CLASSES = {
    "CT": ("background", "liver", "lesion"),
    "MR": ("background", "brain", "lesion"),
    "US": ("background", "lesion"),
    "XR": ("background", "lungs", "heart", "clavicles"),
}
#: The same as a value -> name mapping (the datalist's ``"segmentation_labels"``).
SEGMENTATION_LABELS = {
    modality: {str(i): name for i, name in enumerate(names)} for modality, names in MASK_CLASSES.items()
}
#: Classes used by the class-labelled CT volumes (indices into ``CLASSES``): 0 normal, 1 nodule.
CT_VOLUME_CLASSES = (0, 1)
#: Task datalists written next to ``datalist.json``: file name -> which items they keep.
TASK_DATALISTS = {
    "datalist_classification_2d.json": "2D items whose label is a class index",
    "datalist_segmentation_2d.json": "2D items whose label is a mask path",
    "datalist_segmentation_3d.json": "3D items whose label is a mask path",
    "datalist_classification_3d.json": "3D items whose label is a class index",
}
SECTIONS = ("training", "validation", "test")
MAX_2D_SIZE = 128  # largest side of a 2D image after downscaling
_OWNED = ("real", "synthetic", "datalist.json", "README.md", *TASK_DATALISTS)
_UID_ENTROPY = "medssl-demo"

# split sizes of the synthetic items: (training, validation, test)
_XR_PER_CLASS = (20, 10, 10)
_US_SPLIT = (8, 2, 2)
_CT_SPLIT = (4, 1, 1)
_MR_SPLIT = (4, 1, 1)
_N_FUNDUS = 2
_N_HISTOLOGY = 2
_XR_ORGANS_SPLIT = (12, 4, 4)
_CT_NODULE_PER_CLASS = (8, 3, 3)  # per class of CT_VOLUME_CLASSES: 16 / 6 / 6 volumes
_CT_NODULE_SHAPE = (48, 48, 32)
# random-stream groups (part of every SeedSequence, so the streams never overlap)
_G_XR, _G_US, _G_FUNDUS, _G_CT, _G_MR, _G_SERIES, _G_PATH = 1, 2, 3, 4, 5, 6, 7
_G_XR_ORGANS, _G_CT_NODULE = 8, 9

_LICENCE_PYDICOM = (
    "MIT (pydicom licence); pydicom/data/test_files/README.txt: 'I believe there is no restriction on "
    "using any of these files in this manner'"
)
_LICENCE_PYDICOM_DATA = "MIT (pydicom-data licence); file notes in pydicom/data/test_files/README.txt"


# --------------------------------------------------------------------------------------------------
# real files shipped in installed packages
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RealSource:
    """One real image that ships inside an installed distribution.

    Attributes:
        name: output file stem under ``real/``.
        distribution: pip distribution name (``importlib.metadata``), e.g. ``"pydicom-data"``.
        path: path of the file relative to the distribution's install root (site-packages).
        modality: canonical modality code of the item.
        dim: spatial dimensions after loading (2 or 3).
        kind: how it is written: ``"copy"`` (bytes), ``"dicom2d"`` (downscaled uncompressed DICOM),
            ``"png"`` (downscaled PNG), ``"nifti"`` (NIfTI, 3-D, in-plane downscaled to <= 64).
        licence: licence of the file as the package states it.
        origin: where the package says the image comes from.
        alternatives: (distribution, path, licence) of equivalent files tried, in order, when the
            first one is not installed (e.g. a compressed twin in a package that is always there).
    """

    name: str
    distribution: str
    path: str
    modality: str
    dim: int
    kind: str
    licence: str
    origin: str
    alternatives: tuple[tuple[str, str, str], ...] = ()

    def locate(self) -> tuple[str, str, str, Path] | None:
        """(distribution, path, licence, file on disk) of the first candidate installed, or None.

        Only looks on disk (``importlib.metadata``); never imports the package or downloads anything.
        """
        for distribution, relative, licence in ((self.distribution, self.path, self.licence), *self.alternatives):
            try:
                dist = importlib.metadata.distribution(distribution)
            except importlib.metadata.PackageNotFoundError:
                continue
            path = Path(str(dist.locate_file(relative)))
            if path.is_file():
                return distribution, relative, licence, path
        return None

    def output_name(self) -> str:
        suffix = {"copy": Path(self.path).suffix, "dicom2d": ".dcm", "png": ".png", "nifti": ".nii.gz"}[self.kind]
        return f"{self.name}{suffix}"


REAL_SOURCES: tuple[RealSource, ...] = (
    RealSource(
        "ct_small", "pydicom", "pydicom/data/test_files/CT_small.dcm", "CT", 2, "copy", _LICENCE_PYDICOM,
        "CT slice downsized to 128x128 from NEMA WG04 'CT1_UNC'",
    ),
    RealSource(
        "ct_head_693", "pydicom-data", "data_store/data/693_UNCR.dcm", "CT", 2, "dicom2d", _LICENCE_PYDICOM_DATA,
        "head CT 512x512, pydicom issue #693 regression dataset",
    ),
    RealSource(
        "mr_small", "pydicom", "pydicom/data/test_files/MR_small.dcm", "MR", 2, "copy", _LICENCE_PYDICOM,
        "MR slice downsized to 64x64 from NEMA WG04 'MR1_UNC'",
    ),
    RealSource(
        "mr_shoulder_mr2", "pydicom-data", "data_store/data/MR2_UNCR.dcm", "MR", 2, "dicom2d",
        _LICENCE_PYDICOM_DATA, "MR 1024x1024 from NEMA WG04 'MR2'",
    ),
    RealSource(
        "cr_chest_rg1", "pydicom-data", "data_store/data/RG1_UNCR.dcm", "XR", 2, "dicom2d", _LICENCE_PYDICOM_DATA,
        "chest computed radiograph (CR, MONOCHROME1) 1955x1841 from NEMA WG04 'RG1'",
    ),
    RealSource(
        "cr_extremity_rg3", "pydicom-data", "data_store/data/RG3_UNCR.dcm", "XR", 2, "dicom2d",
        _LICENCE_PYDICOM_DATA, "extremity computed radiograph (CR, MONOCHROME1) 1760x1760 from NEMA WG04 'RG3'",
    ),
    RealSource(
        "us_rgb_color", "pydicom", "pydicom/data/test_files/examples_rgb_color.dcm", "US", 2, "dicom2d",
        _LICENCE_PYDICOM, "colour-Doppler ultrasound (RGB), crop of NEMA WG04 'US1'",
    ),
    RealSource(
        "us_aloka", "pydicom-data", "data_store/data/gdcm-US-ALOKA-16.dcm", "US", 2, "dicom2d",
        "BSD-3-Clause (GDCM licence, reproduced in pydicom/data/test_files/README.txt)",
        "ultrasound with 16-bit segmented palette colour from GDCM; palette applied -> RGB",
    ),
    RealSource(
        "nm_whole_body", "pydicom-data", "data_store/data/JPEG2000_UNC.dcm", "NM", 2, "dicom2d",
        _LICENCE_PYDICOM_DATA, "whole-body nuclear-medicine image 1024x256 from NEMA WG04 'NM1'",
        # the JPEG 2000 twin in pydicom itself (decoded by pillow's OpenJPEG) when pydicom-data is absent
        alternatives=(("pydicom", "pydicom/data/test_files/JPEG2000.dcm", _LICENCE_PYDICOM),),
    ),
    RealSource(
        "path_ihc", "scikit-image", "skimage/data/ihc.png", "PATH", 2, "png",
        "BSD-3-Clause (scikit-image); skimage.data docstring: 'No known copyright restrictions'",
        "immunohistochemistry (DAB + haematoxylin) of colonic glands, CMMI (skimage.data.immunohistochemistry)",
    ),
    RealSource(
        "fundus_retina", "scikit-image", "skimage/data/retina.jpg", "FUNDUS", 2, "png",
        "CC0 1.0 (skimage.data.retina docstring; Wikimedia 'Fundus photograph of normal left eye')",
        "fundus photograph 1411x1411, M. Haggstrom (skimage.data.retina)",
    ),
    RealSource(
        "fundus_microaneurysms", "scikit-image", "skimage/data/microaneurysms.png", "FUNDUS", 2, "copy",
        "CC0 (skimage.data.microaneurysms docstring, given by the owner A. Maier)",
        "green channel crop of HRF database image 07_dr.JPG (skimage.data.microaneurysms)",
    ),
    RealSource(
        "mr_anatomical", "nibabel", "nibabel/tests/data/anatomical.nii", "MR", 3, "nifti",
        "MIT (nibabel licence, no separate data notice)", "low-resolution T1 brain volume, nibabel test data",
    ),
    RealSource(
        "mr_example4d_vol0", "nibabel", "nibabel/tests/data/example4d.nii.gz", "MR", 3, "nifti",
        "MIT (nibabel licence, no separate data notice)", "first volume of a 4-D fMRI (EPI) series, nibabel",
    ),
    RealSource(
        "mr_aniso_vox", "dipy", "dipy/data/files/aniso_vox.nii.gz", "MR", 3, "nifti",
        "BSD-3-Clause (dipy licence, no separate data notice)", "brain MR with anisotropic voxels (dipy 'aniso_vox')",
    ),
)


# --------------------------------------------------------------------------------------------------
# small numeric helpers (numpy only)
# --------------------------------------------------------------------------------------------------
def _rng(seed: int, group: int, index: int) -> np.random.Generator:
    """Independent generator of item ``index`` of a group: a pure function of (seed, group, index)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), group, index]))


def _gaussian_filter(array: np.ndarray, sigma: float | tuple[float, ...]) -> np.ndarray:
    """Gaussian low-pass of ``array`` (periodic boundary) through the FFT; ``sigma`` in voxels per axis."""
    sigmas = (sigma,) * array.ndim if np.isscalar(sigma) else tuple(sigma)
    spectrum = np.fft.rfftn(array)
    for axis, s in enumerate(sigmas):
        n = array.shape[axis]
        freq = np.fft.rfftfreq(n) if axis == array.ndim - 1 else np.fft.fftfreq(n)
        shape = [1] * array.ndim
        shape[axis] = freq.size
        spectrum = spectrum * np.exp(-2.0 * (math.pi * s * freq) ** 2).reshape(shape)
    return np.fft.irfftn(spectrum, s=array.shape, axes=tuple(range(array.ndim)))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std correlated noise with correlation length ``sigma`` voxels."""
    field = _gaussian_filter(rng.standard_normal(shape), sigma)
    return (field - field.mean()) / (field.std() + 1e-12)


def _block_mean(array: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Area downscaling: mean over non-overlapping blocks (the array is cropped to a multiple of ``factors``).

    ``factors`` covers the leading axes; trailing axes (e.g. RGB) are kept.
    """
    lead = len(factors)
    crop = tuple(slice(0, (array.shape[a] // f) * f) for a, f in enumerate(factors))
    array = array[crop].astype(np.float64)
    shape: list[int] = []
    for a, f in enumerate(factors):
        shape += [array.shape[a] // f, f]
    array = array.reshape(*shape, *array.shape[lead:])
    return array.mean(axis=tuple(range(1, 2 * lead, 2)))


def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(v, u) coordinates in [-1, 1] of a size x size image; v = row (down), u = column (right)."""
    axis = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(axis, axis, indexing="ij")


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# --------------------------------------------------------------------------------------------------
# synthetic 2D images
# --------------------------------------------------------------------------------------------------
def synthetic_chest_xr(rng: np.random.Generator, class_index: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A chest-radiograph-like image of class ``CLASSES[class_index]`` and its lesion mask.

    Anatomy: torso, two lung fields with domed bases, heart shadow, spine, posterior ribs and clavicles,
    random pose / size / exposure. ``nodule``: 2-4 round opacities inside the lungs; ``effusion``: a
    basal opacity with a lateral meniscus in one lung. Returns (image uint8 (H, W), mask uint8 (H, W),
    1 on the lesion, all 0 for ``normal``). Bones are bright, air dark (MONOCHROME2 display).
    """
    image, lesion, _organs = _chest_xr(rng, class_index, size)
    return image, lesion


def synthetic_chest_xr_organs(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A ``normal`` chest-radiograph-like image (see :func:`synthetic_chest_xr`) and its JSRT / SCR-style organ mask.

    Returns (image uint8 (H, W), mask uint8 (H, W)) with the values of ``MASK_CLASSES["XR"]``: 0 background,
    1 lungs (left and right, ending at the heart border), 2 heart, 3 clavicles (over the lungs where they cross):
    the fields the image is drawn from, thresholded at one half.
    """
    image, _lesion, organs = _chest_xr(rng, CLASSES.index("normal"), size)
    return image, organs


def _chest_xr(rng: np.random.Generator, class_index: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, lesion mask, organ mask) of :func:`synthetic_chest_xr` / :func:`synthetic_chest_xr_organs`."""
    if not 0 <= class_index < len(CLASSES):
        raise ValueError(f"class_index {class_index} outside 0..{len(CLASSES) - 1} ({CLASSES})")
    v, u = _unit_grid(size)
    px = 2.0 / size  # one pixel in unit coordinates
    shift_u, shift_v = rng.uniform(-0.04, 0.04, 2)
    scale = rng.uniform(0.94, 1.04)
    u = (u - shift_u) / scale
    v = (v - shift_v) / scale
    soft = lambda d: _sigmoid(-d / (1.5 * px))  # noqa: E731 - soft inside indicator of a signed distance

    torso = soft(np.sqrt((u / 0.95) ** 2 + ((v - 0.2) / 1.25) ** 2) - 1.0)
    image = 0.08 + 0.47 * torso
    lungs = np.zeros_like(u)
    lung_masks = []
    for side in (-1.0, 1.0):
        cu = side * rng.uniform(0.38, 0.46)
        cv = rng.uniform(-0.12, -0.02)
        ru, rv = rng.uniform(0.26, 0.32), rng.uniform(0.52, 0.62)
        base = cv + rv * 0.75 - 0.12 * ((u - cu) / ru) ** 2  # domed diaphragm
        ellipse = np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2) - 1.0
        lung = soft(ellipse) * soft((v - base) / 0.6)
        lung_masks.append((lung, cu, cv, ru, rv, base))
        lungs = np.maximum(lungs, lung)
    image = image - 0.33 * lungs
    heart = soft(np.sqrt(((u - 0.12) / rng.uniform(0.26, 0.32)) ** 2 + ((v - 0.3) / 0.24) ** 2) - 1.0)
    image = image + 0.22 * heart * (0.3 + lungs)
    image = image + 0.18 * soft(np.abs(u) - 0.1) * torso  # spine and mediastinum
    ribs = np.zeros_like(u)
    spacing = rng.uniform(0.17, 0.2)
    start = rng.uniform(-0.78, -0.7)
    for k in range(9):
        v0 = start + k * spacing + rng.normal(0.0, 0.01)
        curve = v0 + 0.5 * (np.abs(u) - 0.1) ** 2 + 0.2 * np.abs(u) - 0.25 * np.maximum(np.abs(u) - 0.75, 0.0)
        ribs = np.maximum(ribs, np.exp(-(((v - curve) / 0.024) ** 2)))
    ribs *= soft(0.1 - np.abs(u)) * torso * soft((v - 0.55) / 3.0)
    clavicles = np.exp(-(((v - (-0.72 + 0.25 * (np.abs(u) - 0.45) ** 2)) / 0.03) ** 2)) * (np.abs(u) < 0.75)
    image = image + 0.08 * ribs + 0.14 * clavicles * torso

    mask = np.zeros(u.shape, dtype=bool)
    if CLASSES[class_index] == "nodule":
        for _ in range(int(rng.integers(2, 5))):
            lung, cu, cv, ru, rv, _base = lung_masks[int(rng.integers(0, 2))]
            for _attempt in range(50):  # rejection sampling of a centre well inside the lung
                nu, nv = cu + rng.uniform(-0.7, 0.7) * ru, cv + rng.uniform(-0.7, 0.6) * rv
                row = int(np.clip((nv * scale + shift_v + 1.0) / px, 0, size - 1))
                col = int(np.clip((nu * scale + shift_u + 1.0) / px, 0, size - 1))
                if lung[row, col] > 0.9:
                    break
            radius = rng.uniform(0.07, 0.11)
            distance = np.sqrt((u - nu) ** 2 + (v - nv) ** 2)
            image = image + rng.uniform(0.28, 0.38) * np.exp(-0.5 * (distance / (0.6 * radius)) ** 4)
            mask |= distance < radius
    elif CLASSES[class_index] == "effusion":
        lung, cu, cv, ru, rv, _base = lung_masks[int(rng.integers(0, 2))]
        level = cv + rv * rng.uniform(-0.1, 0.3)
        meniscus = level - 0.35 * np.maximum(np.abs(u - cu) - 0.2 * ru, 0.0) * np.sign(u - cu) * np.sign(cu)
        fluid = lung * soft((meniscus - v) / 0.8)
        image = image + 0.36 * fluid * (1.0 - 0.6 * heart)
        mask = fluid > 0.5

    organs = np.zeros(u.shape, dtype=np.uint8)  # JSRT / SCR-style: lungs 1, heart 2, clavicles 3
    organs[lungs > 0.5] = 1
    organs[(heart > 0.5) & (torso > 0.5)] = 2  # the lung fields end at the heart border, as in SCR
    organs[(clavicles > 0.5) & (torso > 0.5)] = 3

    image = _gaussian_filter(image, 0.8)
    image = image * rng.uniform(0.92, 1.08) + rng.uniform(-0.03, 0.03)
    image = image + 0.03 * _smooth_noise(rng, image.shape, 12.0) + rng.normal(0.0, 0.015, image.shape)
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.9, 1.1)
    return _to_uint8(image), mask.astype(np.uint8), organs


def synthetic_us_lesion(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A B-mode ultrasound-like sector image with one hypoechoic lesion, and the lesion mask.

    Sector (curvilinear probe, apex above the image), layered tissue echogenicity, bright fascia lines,
    Rayleigh speckle, depth attenuation, log compression, posterior acoustic enhancement behind the
    lesion. Returns (image uint8 (H, W), mask uint8 (H, W) with 1 on the lesion).
    """
    rows, cols = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    apex_row, apex_col = -0.12 * size, size / 2.0
    radius = np.hypot(rows - apex_row, cols - apex_col)
    theta = np.arctan2(cols - apex_col, rows - apex_row)
    half_angle = rng.uniform(0.5, 0.62)
    r_min, r_max = 0.2 * size, 1.08 * size
    sector = (np.abs(theta) < half_angle) & (radius > r_min) & (radius < r_max)

    echo = 0.55 + 0.12 * _smooth_noise(rng, (size, size), 6.0)
    for _ in range(int(rng.integers(2, 4))):  # fascia: bright curved lines at constant depth
        depth = rng.uniform(r_min + 5, r_max - 10)
        echo = echo + rng.uniform(0.3, 0.6) * np.exp(-(((radius - depth) / 1.2) ** 2))
    lesion_r = rng.uniform(0.4, 0.75) * size
    lesion_t = rng.uniform(-0.5, 0.5) * half_angle
    centre_row = apex_row + lesion_r * math.cos(lesion_t)
    centre_col = apex_col + lesion_r * math.sin(lesion_t)
    a, b = rng.uniform(0.06, 0.13, 2) * size
    angle = rng.uniform(0, math.pi)
    dr, dc = rows - centre_row, cols - centre_col
    along = dr * math.cos(angle) + dc * math.sin(angle)
    across = -dr * math.sin(angle) + dc * math.cos(angle)
    lesion = ((along / a) ** 2 + (across / b) ** 2 < 1.0) & sector
    echo = np.where(lesion, echo * rng.uniform(0.15, 0.3), echo)
    behind = (np.abs(theta - lesion_t) < max(a, b) / lesion_r) & (radius > lesion_r)
    echo = echo * np.where(behind & ~lesion, 1.3, 1.0)

    field = _gaussian_filter(rng.standard_normal((size, size)), 0.7) + 1j * _gaussian_filter(
        rng.standard_normal((size, size)), 0.7
    )
    speckle = np.abs(field) / np.abs(field).mean()
    envelope = echo * speckle * np.exp(-0.9 * (radius - r_min) / size) * rng.uniform(0.9, 1.1)
    image = np.log1p(15.0 * np.clip(envelope, 0, None)) / math.log1p(15.0 * 2.5)
    image = np.where(sector, image, 0.0)
    return _to_uint8(image), lesion.astype(np.uint8)


def synthetic_fundus(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A colour-fundus-like photograph (H, W, 3) uint8: red-orange retina in a black circular field,
    vignetting, a bright optic disc, a darker macula and a dark-red vessel tree growing from the disc."""
    v, u = _unit_grid(size)
    side = rng.choice([-1.0, 1.0])  # left or right eye
    disc_u, disc_v = side * rng.uniform(0.38, 0.5), rng.uniform(-0.08, 0.08)
    field = np.hypot(u, v)
    vignette = np.clip(1.0 - 0.45 * field**2, 0, 1) * (1.0 + 0.06 * _smooth_noise(rng, (size, size), 8.0))
    rgb = np.stack([0.82 * vignette, 0.36 * vignette, 0.14 * vignette], axis=-1)
    macula = np.exp(-(((u + side * 0.1) ** 2 + v**2) / 0.03))
    rgb *= (1.0 - 0.35 * macula)[..., None]

    vessels = np.zeros((size, size))
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    main_angles = [sign * math.pi / 2 + side * turn for sign in (1.0, -1.0) for turn in (-sign * 0.6, sign * 1.9)]
    stack = [((disc_v + 1) * size / 2, (disc_u + 1) * size / 2, angle, 2.2) for angle in main_angles]
    while stack:
        row, col, angle, width = stack.pop()
        for _step in range(int(size * 0.9)):
            row, col = row + 1.5 * math.sin(angle), col + 1.5 * math.cos(angle)
            angle += rng.normal(0.0, 0.12) - 0.02 * side * math.cos(angle)
            width *= 0.992
            if not (0 <= row < size and 0 <= col < size) or width < 0.6:
                break
            r0, r1 = int(max(row - 3, 0)), int(min(row + 4, size))
            c0, c1 = int(max(col - 3, 0)), int(min(col + 4, size))
            d = np.hypot(rows[r0:r1, c0:c1] - row, cols[r0:r1, c0:c1] - col)
            vessels[r0:r1, c0:c1] = np.maximum(vessels[r0:r1, c0:c1], _sigmoid((width / 2 - d) * 3.0))
            if rng.random() < 0.025 and width > 1.0:
                stack.append((row, col, angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.9), width * 0.75))
    blood = vessels[..., None] * np.array([0.15, 0.0, 0.0]) * vignette[..., None]
    rgb = rgb * (1.0 - 0.55 * vessels[..., None]) + blood
    disc = _sigmoid((0.12 - np.hypot(u - disc_u, v - disc_v)) / 0.012)
    rgb = rgb * (1.0 - disc[..., None]) + disc[..., None] * np.array([1.0, 0.86, 0.58])
    rgb = _gaussian_filter(rgb, (0.6, 0.6, 0.0)) + rng.normal(0.0, 0.012, rgb.shape)
    rgb *= (field < 0.96)[..., None]
    return _to_uint8(rgb)


def synthetic_histology(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """An H&E-like histology tile (H, W, 3) uint8: pink eosin stroma with fibre texture, glands (white
    lumen lined by a ring of nuclei) and scattered purple haematoxylin nuclei."""
    rows, cols = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    fibres = _gaussian_filter(rng.standard_normal((size, size)), (0.8, 4.0) if rng.random() < 0.5 else (4.0, 0.8))
    fibres = fibres / (fibres.std() + 1e-12)
    eosin = np.clip(0.55 + 0.2 * fibres + 0.15 * _smooth_noise(rng, (size, size), 10.0), 0.0, 1.0)
    lumen = np.zeros((size, size))
    nuclei = np.zeros((size, size))
    centres: list[tuple[float, float, float, float, float]] = []  # row, col, radius a, radius b, angle
    for _ in range(int(rng.integers(1, 4))):  # glands
        gr, gc = rng.uniform(0.15, 0.85, 2) * size
        ga, gb = rng.uniform(0.08, 0.16, 2) * size
        d = np.hypot((rows - gr) / ga, (cols - gc) / gb)
        lumen = np.maximum(lumen, _sigmoid((0.75 - d) * 12.0))
        for t in np.linspace(0, 2 * math.pi, int(rng.integers(14, 22)), endpoint=False):
            centres.append((gr + 0.9 * ga * math.sin(t), gc + 0.9 * gb * math.cos(t), 2.2, 1.4, t))
    for _ in range(int(rng.integers(40, 80))):  # stromal nuclei
        row, col = rng.uniform(0, size, 2)
        centres.append((row, col, rng.uniform(1.5, 2.8), rng.uniform(1.0, 1.8), rng.uniform(0, math.pi)))
    for r0, c0, a, b, t in centres:
        lo_r, hi_r = int(max(r0 - 5, 0)), int(min(r0 + 6, size))
        lo_c, hi_c = int(max(c0 - 5, 0)), int(min(c0 + 6, size))
        if lo_r >= hi_r or lo_c >= hi_c:
            continue
        dr, dc = rows[lo_r:hi_r, lo_c:hi_c] - r0, cols[lo_r:hi_r, lo_c:hi_c] - c0
        along, across = dr * math.cos(t) + dc * math.sin(t), -dr * math.sin(t) + dc * math.cos(t)
        inside = _sigmoid((1.0 - np.hypot(along / a, across / b)) * 6.0)
        nuclei[lo_r:hi_r, lo_c:hi_c] = np.maximum(nuclei[lo_r:hi_r, lo_c:hi_c], inside)
    white, pink, purple = np.array([0.96, 0.94, 0.96]), np.array([0.92, 0.55, 0.75]), np.array([0.33, 0.2, 0.55])
    stroma = white + eosin[..., None] * (pink - white)
    rgb = stroma * (1.0 - lumen[..., None]) + lumen[..., None] * white
    rgb = rgb * (1.0 - nuclei[..., None]) + nuclei[..., None] * purple
    rgb = _gaussian_filter(rgb, (0.5, 0.5, 0.0)) + rng.normal(0.0, 0.015, rgb.shape)
    return _to_uint8(rgb)


# --------------------------------------------------------------------------------------------------
# synthetic 3D phantoms
# --------------------------------------------------------------------------------------------------
def _volume_grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = [(np.arange(n) + 0.5) / n * 2.0 - 1.0 for n in shape]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid(x, y, z, centre, radii) -> np.ndarray:
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2


def _place_spheres(
    rng: np.random.Generator, region: np.ndarray, count: int, radius_range: tuple[float, float]
) -> np.ndarray:
    """Boolean mask of ``count`` spheres (radii in voxels) whose centres lie inside ``region``."""
    out = np.zeros(region.shape, dtype=bool)
    candidates = np.argwhere(region)
    if len(candidates) == 0:
        return out
    grid = np.indices(region.shape, dtype=np.float64)
    for _ in range(count):
        centre = candidates[int(rng.integers(0, len(candidates)))]
        radius = rng.uniform(*radius_range)
        distance = np.sqrt(sum((grid[a] - centre[a]) ** 2 for a in range(3)))
        out |= (distance < radius) & region
    return out


def synthetic_ct_phantom(
    rng: np.random.Generator, shape: tuple[int, int, int] = (64, 64, 32)
) -> tuple[np.ndarray, np.ndarray]:
    """A torso CT phantom in Hounsfield units and its mask.

    Array axes (X, Y, Z) = (patient right, anterior, superior) - RAS+, depth (axial slices) LAST.
    Air -1000, subcutaneous fat -100, soft tissue / muscle 40-50, lungs -850 (upper half), heart 45,
    liver 60 (lower half, patient right), 1-3 hypodense liver lesions (spheres, ~10 HU), spine
    (cortical 700 HU, cancellous 250 HU) and ribs (600 HU), plus correlated and white noise.
    Returns (hu int16 (X, Y, Z), mask uint8 (X, Y, Z): 0 background, 1 liver, 2 lesion).
    """
    x, y, z = _volume_grid(shape)
    j = lambda s: rng.uniform(-s, s)  # noqa: E731 - jitter
    body_r = (0.9 + j(0.04), 0.66 + j(0.04))
    body_e = np.sqrt((x / body_r[0]) ** 2 + ((y + 0.05) / body_r[1]) ** 2) * (1.0 - 0.04 * z)
    body = body_e < 1.0
    hu = np.full(shape, -1000.0)
    hu[body] = -100.0  # fat shell
    inner = body_e < 0.88
    hu[inner] = 45.0
    lung_centres = [(0.42 + j(0.04), 0.02, 0.55), (-0.45 + j(0.04), 0.02, 0.55)]
    for c in lung_centres:
        hu[_ellipsoid(x, y, z, c, (0.3 + j(0.03), 0.45 + j(0.03), 0.55)) < 1.0] = -850.0
    hu[_ellipsoid(x, y, z, (-0.12 + j(0.04), 0.22, 0.42), (0.3, 0.28, 0.3)) < 1.0] = 45.0  # heart
    other = np.zeros(shape, dtype=bool)  # structures the liver must not overlap
    for centre in ((0.55, -0.3, -0.55), (-0.55, -0.3, -0.5)):  # kidneys
        kidney = _ellipsoid(x, y, z, centre, (0.12, 0.16, 0.25)) < 1.0
        hu[kidney] = 150.0
        other |= kidney
    aorta = (np.hypot(x + 0.1, y + 0.22) < 0.07) & (z < 0.3)
    hu[aorta] = 180.0  # contrast-enhanced
    spine = np.hypot(x, (y + 0.5) * 1.2)
    hu[spine < 0.13] = 700.0  # cortical bone
    hu[spine < 0.09] = 250.0  # cancellous bone
    rib_levels = (np.round((z + 1.0) * shape[2] / 2.0 - 0.5) % 4 == 0) & (z > -0.3)
    ribs = (body_e > 0.8) & (body_e < 0.88) & rib_levels & (y < 0.35)
    hu[ribs] = 600.0
    other |= aorta | (spine < 0.13) | ribs
    liver_ellipsoid = _ellipsoid(x, y, z, (0.33 + j(0.05), 0.05 + j(0.05), -0.35 + j(0.05)), (0.45, 0.42, 0.42))
    liver = (liver_ellipsoid < 1.0) & inner & ~other
    hu[liver] = 60.0
    core = liver.copy()
    for _ in range(2):  # erode the liver by two voxels (6-neighbourhood) so that lesions stay inside it
        core[1:-1, 1:-1, 1:-1] &= core[:-2, 1:-1, 1:-1] & core[2:, 1:-1, 1:-1] & core[1:-1, :-2, 1:-1]
        core[1:-1, 1:-1, 1:-1] &= core[1:-1, 2:, 1:-1] & core[1:-1, 1:-1, :-2] & core[1:-1, 1:-1, 2:]
    lesions = _place_spheres(rng, core, int(rng.integers(1, 4)), (2.5, 4.5)) & liver
    hu[lesions] = 10.0
    soft_tissue = inner & (hu > -500.0) & (hu < 200.0)
    hu[soft_tissue] += 8.0 * _smooth_noise(rng, shape, 2.0)[soft_tissue]  # organ texture
    noise = 10.0 * _smooth_noise(rng, shape, 0.8) + rng.normal(0.0, 8.0, shape)
    hu = np.clip(hu + noise, -1024.0, 3071.0)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[liver] = 1
    mask[lesions] = 2
    return np.rint(hu).astype(np.int16), mask


def _segment_distance(grid: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance (voxels) of every voxel of ``grid`` (3, X, Y, Z) to the segment [start, end]."""
    direction = end - start
    offset = grid - start.reshape(3, 1, 1, 1)
    t = np.clip(np.tensordot(direction, offset, axes=1) / max(float(direction @ direction), 1e-9), 0.0, 1.0)
    return np.sqrt(((offset - t[None] * direction.reshape(3, 1, 1, 1)) ** 2).sum(0))


def synthetic_chest_ct_nodules(
    rng: np.random.Generator, class_index: int, shape: tuple[int, int, int] = _CT_NODULE_SHAPE
) -> np.ndarray:
    """A chest CT phantom in Hounsfield units of class ``CLASSES[class_index]``, ``normal`` or ``nodule``.

    Array axes (X, Y, Z) = (patient right, anterior, superior) - RAS+, depth (axial slices) LAST.
    Both classes: a body of random size, ellipticity and position (fat -100, muscle 45), two lungs of random size
    (-850 HU with smooth parenchymal texture), 6-12 pulmonary vessels (thin tubes of radius 0.6-1.2 voxels,
    20-60 HU, random positions and directions inside the lungs), heart 45, spine 700 / 250, ribs 600, correlated
    and white noise of random strength. ``nodule``: 1-3 spherical nodules (radius 1.5-3.5 voxels, solid to
    part-solid: -400..60 HU, partial-volume edge) at random positions inside the lungs; ``normal``: none. The
    classes differ only by the nodules, which are larger and rounder than the vessels but of similar density: with
    generators in the same state, the two classes give the same volume except at the nodules.
    Returns hu int16 (X, Y, Z).
    """
    if class_index not in CT_VOLUME_CLASSES:
        raise ValueError(
            f"class_index {class_index} is not a CT volume class {[CLASSES[c] for c in CT_VOLUME_CLASSES]}"
        )
    x, y, z = _volume_grid(shape)
    grid = np.indices(shape, dtype=np.float64)
    j = lambda s: rng.uniform(-s, s)  # noqa: E731 - jitter
    centre_x, centre_y = j(0.06), -0.05 + j(0.06)
    body_r = (rng.uniform(0.8, 0.95), rng.uniform(0.55, 0.72))
    body_e = np.sqrt(((x - centre_x) / body_r[0]) ** 2 + ((y - centre_y) / body_r[1]) ** 2)
    hu = np.full(shape, -1000.0)
    hu[body_e < 1.0] = -100.0  # fat shell
    inner = body_e < 0.86
    hu[inner] = 45.0
    lungs = np.zeros(shape, dtype=bool)
    for side in (1.0, -1.0):
        centre = (centre_x + side * rng.uniform(0.36, 0.46) * body_r[0] / 0.9, centre_y + 0.05, 0.05 + j(0.1))
        radii = (rng.uniform(0.25, 0.33) * body_r[0] / 0.9, rng.uniform(0.38, 0.46) * body_r[1] / 0.66, 0.8 + j(0.1))
        lungs |= (_ellipsoid(x, y, z, centre, radii) < 1.0) & inner
    heart = _ellipsoid(x, y, z, (centre_x - 0.1 + j(0.04), centre_y + 0.22, -0.35 + j(0.1)), (0.28, 0.26, 0.4)) < 1.0
    lungs &= ~heart
    hu[lungs] = -850.0 + 25.0 * _smooth_noise(rng, shape, 2.0)[lungs]
    hu[heart] = 45.0
    spine = np.hypot(x - centre_x, (y - centre_y + 0.45 * body_r[1] / 0.66) * 1.2)
    hu[spine < 0.13] = 700.0  # cortical bone
    hu[spine < 0.09] = 250.0  # cancellous bone
    rib_levels = np.round((z + 1.0) * shape[2] / 2.0 - 0.5) % 4 == int(rng.integers(0, 4))
    hu[(body_e > 0.78) & (body_e < 0.86) & rib_levels & (y < centre_y + 0.4)] = 600.0
    candidates = np.argwhere(lungs)
    for _ in range(int(rng.integers(6, 13))):  # vessels: thin tubes inside the lungs
        start = candidates[int(rng.integers(0, len(candidates)))].astype(np.float64)
        direction = rng.normal(size=3)
        end = start + rng.uniform(4.0, 12.0) * direction / np.linalg.norm(direction)
        vessel = (_segment_distance(grid, start, end) < rng.uniform(0.6, 1.2)) & lungs
        hu[vessel] = rng.uniform(20.0, 60.0)
    noise_std = rng.uniform(8.0, 20.0)  # drawn before the nodules: both classes of one seed share it
    noise = noise_std * (_smooth_noise(rng, shape, 0.8) + rng.normal(0.0, 0.8, shape))
    if CLASSES[class_index] == "nodule":
        core = lungs.copy()
        for _ in range(2):  # erode by two voxels (6-neighbourhood): the nodules lie inside the lungs
            core[1:-1, 1:-1, 1:-1] &= core[:-2, 1:-1, 1:-1] & core[2:, 1:-1, 1:-1] & core[1:-1, :-2, 1:-1]
            core[1:-1, 1:-1, 1:-1] &= core[1:-1, 2:, 1:-1] & core[1:-1, 1:-1, :-2] & core[1:-1, 1:-1, 2:]
        inside = np.argwhere(core) if core.any() else candidates
        for _ in range(int(rng.integers(1, 4))):
            centre = inside[int(rng.integers(0, len(inside)))].astype(np.float64)
            radius = rng.uniform(1.5, 3.5)
            distance = np.sqrt(((grid - centre.reshape(3, 1, 1, 1)) ** 2).sum(0))
            weight = np.clip(radius + 0.5 - distance, 0.0, 1.0)  # partial-volume edge
            hu = hu * (1.0 - weight) + weight * rng.uniform(-400.0, 60.0)
    hu = hu + noise
    return np.rint(np.clip(hu, -1024.0, 3071.0)).astype(np.int16)


def synthetic_mr_phantom(
    rng: np.random.Generator, shape: tuple[int, int, int] = (64, 64, 32), contrast: str = "T1"
) -> tuple[np.ndarray, np.ndarray]:
    """A head MR phantom (T1- or T2-like contrast, arbitrary units) and its mask.

    Array axes (X, Y, Z) = (right, anterior, superior) - RAS+, depth LAST. Scalp, skull, CSF, grey and
    white matter with a folded boundary, two ventricles, 1-4 white-matter lesions (T1 dark / T2 bright),
    a smooth multiplicative bias field and Rician noise.
    Returns (intensity int16 (X, Y, Z), mask uint8 (X, Y, Z): 0 background, 1 brain, 2 lesion).
    """
    if contrast not in ("T1", "T2"):
        raise ValueError(f"contrast {contrast!r} must be 'T1' or 'T2'")
    tissue = {  # scalp, skull, csf, grey, white, lesion
        "T1": (700.0, 60.0, 180.0, 450.0, 650.0, 300.0),
        "T2": (350.0, 40.0, 900.0, 520.0, 380.0, 800.0),
    }[contrast]
    x, y, z = _volume_grid(shape)
    j = lambda s: rng.uniform(-s, s)  # noqa: E731
    head = _ellipsoid(x, y, z, (0.0, j(0.03), -0.05), (0.8 + j(0.04), 0.92 + j(0.04), 0.92))
    image = np.zeros(shape)
    image[head < 1.0] = tissue[0]
    image[head < 0.86] = tissue[1]
    image[head < 0.74] = tissue[2]
    brain = head < 0.66
    folds = 0.06 * _smooth_noise(rng, shape, 1.5)
    image[brain] = tissue[3]
    white = (head + folds < 0.42) & brain
    image[white] = tissue[4]
    for side in (-1.0, 1.0):
        image[_ellipsoid(x, y, z, (side * 0.12, 0.05, 0.05), (0.08, 0.3, 0.18)) < 1.0] = tissue[2]
    lesions = _place_spheres(rng, white & (head < 0.3), int(rng.integers(1, 5)), (1.2, 2.8))
    image[lesions] = tissue[5]
    bias = np.exp(0.12 * _smooth_noise(rng, shape, 12.0))
    sigma = 18.0
    image = np.hypot(image * bias + rng.normal(0.0, sigma, shape), rng.normal(0.0, sigma, shape))
    mask = np.zeros(shape, dtype=np.uint8)
    mask[brain] = 1
    mask[lesions] = 2
    return np.rint(image).astype(np.int16), mask


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


# --------------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------------
def _split_names(split: tuple[int, int, int]) -> list[str]:
    return [section for section, n in zip(SECTIONS, split) for _ in range(n)]


def _build(out: Path, seed: int) -> dict[str, Any]:
    sections: dict[str, list[dict[str, Any]]] = {s: [] for s in SECTIONS}
    sources: dict[str, dict[str, str]] = {}  # a mapping, not a list of dicts: tools read lists of dicts as sections
    skipped: list[str] = []

    def add(section: str, image: Path, modality: str, dim: int, label: int | Path | None = None) -> None:
        item: dict[str, Any] = {"image": image.relative_to(out).as_posix(), "modality": modality, "dim": dim}
        if label is not None:
            item["label"] = label if isinstance(label, int) else label.relative_to(out).as_posix()
        sections[section].append(item)

    # 1. real files: all unlabelled, training only
    for kind_dir in ("dicom", "png", "nifti"):
        (out / "real" / kind_dir).mkdir(parents=True, exist_ok=True)
    for source in REAL_SOURCES:
        found = source.locate()
        if found is None:
            skipped.append(f"{source.distribution}:{source.path} (not installed)")
            continue
        distribution, relative, licence, path = found
        name = source.output_name()
        sub = "dicom" if name.endswith(".dcm") else "nifti" if name.endswith(".nii.gz") else "png"
        target = out / "real" / sub / name
        try:
            _write_real(source, path, target)
        except Exception as error:  # a decoder missing in this environment: skip the file, say why
            target.unlink(missing_ok=True)
            skipped.append(f"{distribution}:{relative} ({type(error).__name__}: {error})")
            logger.warning("demo dataset: skipping %s: %s", path, error)
            continue
        add("training", target, source.modality, source.dim)
        version = importlib.metadata.version(distribution)
        sources[target.relative_to(out).as_posix()] = {
            "distribution": f"{distribution}=={version}",
            "path": relative,
            "licence": licence,
            "origin": source.origin,
        }

    # 2a. chest-X-ray-like classification images (label = class index)
    xr_dir = out / "synthetic" / "xr_chest"
    xr_dir.mkdir(parents=True, exist_ok=True)
    index = 0
    for section, n_per_class in zip(SECTIONS, _XR_PER_CLASS):
        for i in range(n_per_class * len(CLASSES)):
            class_index = i % len(CLASSES)
            image, _mask = synthetic_chest_xr(_rng(seed, _G_XR, index), class_index)
            target = xr_dir / f"xr_{index:03d}.png"
            Image.fromarray(image).save(target)
            add(section, target, "XR", 2, class_index)
            index += 1

    # 2b. ultrasound-like images with lesion masks (label = mask path)
    us_dir = out / "synthetic" / "us_lesion"
    us_dir.mkdir(parents=True, exist_ok=True)
    for index, section in enumerate(_split_names(_US_SPLIT)):
        image, mask = synthetic_us_lesion(_rng(seed, _G_US, index))
        target, mask_path = us_dir / f"us_{index:03d}.png", us_dir / f"us_{index:03d}_mask.png"
        Image.fromarray(image).save(target)
        Image.fromarray(mask).save(mask_path)
        add(section, target, "US", 2, mask_path)

    # 2c. fundus-like photographs (unlabelled; keep FUNDUS present without scikit-image)
    fundus_dir = out / "synthetic" / "fundus"
    fundus_dir.mkdir(parents=True, exist_ok=True)
    for index in range(_N_FUNDUS):
        target = fundus_dir / f"fundus_{index:03d}.png"
        Image.fromarray(synthetic_fundus(_rng(seed, _G_FUNDUS, index))).save(target)
        add("training", target, "FUNDUS", 2)

    # 2d. H&E-like histology tiles (unlabelled; keep PATH present without scikit-image)
    path_dir = out / "synthetic" / "histology"
    path_dir.mkdir(parents=True, exist_ok=True)
    for index in range(_N_HISTOLOGY):
        target = path_dir / f"he_{index:03d}.png"
        Image.fromarray(synthetic_histology(_rng(seed, _G_PATH, index))).save(target)
        add("training", target, "PATH", 2)

    # 2e. CT phantoms (NIfTI, HU) and MR phantoms with masks (label = mask path)
    shape = (64, 64, 32)
    ct_dir, mr_dir = out / "synthetic" / "ct_phantom", out / "synthetic" / "mr_phantom"
    ct_dir.mkdir(parents=True, exist_ok=True)
    mr_dir.mkdir(parents=True, exist_ok=True)
    ct_affine = _ras_affine((5.5, 5.5, 8.0), shape)
    for index, section in enumerate(_split_names(_CT_SPLIT)):
        hu, mask = synthetic_ct_phantom(_rng(seed, _G_CT, index), shape)
        target, mask_path = ct_dir / f"ct_{index:03d}.nii.gz", ct_dir / f"ct_{index:03d}_seg.nii.gz"
        _save_nifti(hu, ct_affine, target)
        _save_nifti(mask, ct_affine, mask_path)
        add(section, target, "CT", 3, mask_path)
    mr_affine = _ras_affine((3.5, 3.5, 6.0), shape)
    for index, section in enumerate(_split_names(_MR_SPLIT)):
        rng = _rng(seed, _G_MR, index)
        image, mask = synthetic_mr_phantom(rng, shape, contrast="T1" if index % 2 == 0 else "T2")
        target, mask_path = mr_dir / f"mr_{index:03d}.nii.gz", mr_dir / f"mr_{index:03d}_seg.nii.gz"
        _save_nifti(image, mr_affine, target)
        _save_nifti(mask, mr_affine, mask_path)
        add(section, target, "MR", 3, mask_path)

    # 2f. one CT phantom as a DICOM series directory, its mask as NIfTI on the same world grid
    hu, mask = synthetic_ct_phantom(_rng(seed, _G_SERIES, 0), shape)
    series_dir = out / "synthetic" / "ct_series_000"
    write_ct_dicom_series(hu, ct_affine, series_dir, uid_entropy=f"seed{seed}-series0")
    mask_path = out / "synthetic" / "ct_series_000_seg.nii.gz"
    _save_nifti(mask, ct_affine, mask_path)
    add("training", series_dir, "CT", 3, mask_path)

    # 2g. chest-X-ray-like images with JSRT / SCR-style organ masks (label = mask path, MASK_CLASSES["XR"])
    organs_dir = out / "synthetic" / "xr_organs"
    organs_dir.mkdir(parents=True, exist_ok=True)
    for index, section in enumerate(_split_names(_XR_ORGANS_SPLIT)):
        image, mask = synthetic_chest_xr_organs(_rng(seed, _G_XR_ORGANS, index))
        target, mask_path = organs_dir / f"xr_{index:03d}.png", organs_dir / f"xr_{index:03d}_mask.png"
        Image.fromarray(image).save(target)
        Image.fromarray(mask).save(mask_path)
        add(section, target, "XR", 2, mask_path)

    # 2h. class-labelled chest CT volumes, normal / nodule alternately (label = class index into CLASSES)
    nodule_dir = out / "synthetic" / "ct_nodule"
    nodule_dir.mkdir(parents=True, exist_ok=True)
    nodule_affine = _ras_affine((7.0, 7.0, 8.0), _CT_NODULE_SHAPE)
    index = 0
    for section, n_per_class in zip(SECTIONS, _CT_NODULE_PER_CLASS):
        for i in range(n_per_class * len(CT_VOLUME_CLASSES)):
            class_index = CT_VOLUME_CLASSES[i % len(CT_VOLUME_CLASSES)]
            hu = synthetic_chest_ct_nodules(_rng(seed, _G_CT_NODULE, index), class_index)
            target = nodule_dir / f"ct_{index:03d}.nii.gz"
            _save_nifti(hu, nodule_affine, target)
            add(section, target, "CT", 3, class_index)
            index += 1

    description = (
        "medssl embedded demo dataset (see README.md): real images shipped in installed packages "
        "(unlabelled, training) and deterministic synthetic images. 'label' is an int class index into "
        "'classes' for the classification items (2D chest X-rays: all classes; 3D chest CT volumes: normal / "
        "nodule), a str mask path for segmentation items (mask value i is 'mask_classes'[modality][i]); items "
        "without 'label' are unlabelled. A DICOM series item's 'image' is its directory."
    )
    return {
        "name": "medssl-demo",
        "description": description,
        "reference": "medssl.data.demo",
        "licence": "synthetic part: Apache-2.0 (medssl); real files: see 'sources' and README.md",
        "builder": {"module": "medssl.data.demo", "version": DEMO_VERSION, "seed": int(seed)},
        "classes": list(CLASSES),
        "mask_classes": {modality: list(names) for modality, names in MASK_CLASSES.items()},
        "segmentation_labels": SEGMENTATION_LABELS,
        "numTraining": len(sections["training"]),
        "numValidation": len(sections["validation"]),
        "numTest": len(sections["test"]),
        **sections,
        "sources": sources,
        "skipped_sources": skipped,
    }


def _task_datalist(datalist: dict[str, Any], keep: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    task = {k: v for k, v in datalist.items() if k not in (*SECTIONS, "sources", "skipped_sources")}
    task["description"] = f"medssl demo dataset, {what}. " + datalist["description"]
    for section in SECTIONS:
        task[section] = [item for item in datalist[section] if keep(item)]
    task["numTraining"], task["numValidation"], task["numTest"] = (len(task[s]) for s in SECTIONS)
    return task


def _remove(out: Path, names: tuple[str, ...] | list[str]) -> None:
    for name in names:
        entry = out / name
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.exists():
            entry.unlink()


def _learn_owned() -> tuple[str, ...]:
    # imported here: medssl.data.learnability imports this module at its top (a cycle)
    from .learnability import LEARN_DATALISTS

    return ("learn", *LEARN_DATALISTS)


def _learn_is_current(out: Path, seed: int) -> bool:
    """True when ``out/datalist_learn.json`` was built by this version with ``seed`` and the current per-class
    counts, and all its files exist."""
    # imported here: medssl.data.learnability imports this module at its top (a cycle)
    from .learnability import LEARN_DATALISTS, learn_builder_info

    try:
        datalist = json.loads((out / "datalist_learn.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(datalist, dict) or datalist.get("builder") != learn_builder_info(seed):
        return False
    names = [*LEARN_DATALISTS, *(item["image"] for section in SECTIONS for item in datalist.get(section, []))]
    return all((out / name).exists() for name in names)


def _build_learn(out: Path, seed: int, workers: int) -> None:
    """(Re)build the learnability set and write its datalists, ``datalist_learn.json`` last and atomically."""
    # imported here: medssl.data.learnability imports this module at its top (a cycle)
    from .learnability import LEARN_DATALISTS, build_learnability_set, learn_builder_info, learn_datalists

    _remove(out, _learn_owned())
    sections = build_learnability_set(out, seed, workers=workers)
    datalists = learn_datalists(sections, learn_builder_info(seed))
    for name in sorted(LEARN_DATALISTS, key=lambda n: n == "datalist_learn.json"):
        temporary = out / f"{name}.tmp"
        temporary.write_text(json.dumps(datalists[name], indent=2) + "\n")
        os.replace(temporary, out / name)


def _is_current(datalist_path: Path, seed: int) -> bool:
    """True when ``datalist_path`` was built by this DEMO_VERSION with ``seed`` and all its files exist."""
    try:
        datalist = json.loads(datalist_path.read_text())
    except (OSError, ValueError):
        return False
    if datalist.get("builder") != {"module": "medssl.data.demo", "version": DEMO_VERSION, "seed": int(seed)}:
        return False
    root = datalist_path.parent
    names = [*TASK_DATALISTS, "README.md"]
    for section in SECTIONS:
        for item in datalist.get(section, []):
            names.append(item["image"])
            if isinstance(item.get("label"), str):
                names.append(item["label"])
    return all((root / name).exists() for name in names)


def _refuse_foreign_datalist(datalist_path: Path) -> None:
    """Raise when ``datalist_path`` exists but was not written by this builder (never delete a user's dataset)."""
    if not datalist_path.exists():
        return
    try:
        builder = json.loads(datalist_path.read_text()).get("builder", {})
    except (OSError, ValueError, AttributeError):
        builder = {}
    if not isinstance(builder, dict) or builder.get("module") != "medssl.data.demo":
        raise FileExistsError(
            f"{datalist_path}: a datalist not written by medssl.data.demo is already there; "
            "build the demo dataset in an empty directory or one it built before"
        )


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """Exclusive lock on ``out/.medssl_demo.lock`` so that parallel builders (pytest-xdist) don't collide."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    with open(out / ".medssl_demo.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_demo_dataset(
    out_dir: str | os.PathLike, seed: int = 0, force: bool = False, learn: bool = True, workers: int = 1
) -> Path:
    """Build the demo dataset in ``out_dir`` and return the path of ``out_dir/datalist.json``.

    Offline and deterministic: the same ``seed`` and installed packages give byte-identical files.
    Idempotent: when ``datalist.json`` already exists, was built by this :data:`DEMO_VERSION` with the
    same ``seed`` and all its files are present, nothing is written (unless ``force``). Otherwise the
    builder's own entries (``real/``, ``synthetic/``, the datalists, ``README.md``) are deleted and
    rebuilt; other files in ``out_dir`` are left alone. ``datalist.json`` is written last, atomically.
    A ``datalist.json`` that this builder did not write is never replaced (``FileExistsError``).
    The learnability set (``learn/``, ``datalist_learn*.json``) is reused or rebuilt the same way, on its own: a
    build with ``learn=False`` leaves an up-to-date one in place, and one with ``learn=True`` adds it to an
    up-to-date ``datalist.json`` without rebuilding the rest.

    Args:
        out_dir: dataset directory (created if needed); it is the ``dataset_dir`` of the datalist.
        seed: seed of every synthetic image.
        force: rebuild even when an up-to-date build exists.
        learn: also build the learnability set (:mod:`medssl.data.learnability`, about 40 s of CPU and 150 MB).
        workers: processes writing the learnability set (the files do not depend on it).

    Returns:
        Path to ``datalist.json`` (format: ``medssl.data`` datalist, loadable with
        ``monai.data.load_decathlon_datalist``). Task subsets are written next to it
        (:data:`TASK_DATALISTS`).
    """
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    datalist_path = out / "datalist.json"
    with _build_lock(out):
        main_current = not force and _is_current(datalist_path, seed)
        learn_current = not force and _learn_is_current(out, seed)
        if not main_current:
            _refuse_foreign_datalist(datalist_path)
        if not learn_current and (learn or not main_current):
            _refuse_foreign_datalist(out / "datalist_learn.json")
        if main_current:
            logger.info("demo dataset: reusing %s", datalist_path)
        else:
            _remove(out, _OWNED if learn_current else [*_OWNED, *_learn_owned()])
            _build_main(out, seed, datalist_path)
            logger.info("demo dataset: built %s", datalist_path)
        if learn and not learn_current:
            _build_learn(out, seed, workers)
            logger.info("demo dataset: built the learnability set %s", out / "datalist_learn.json")
    return datalist_path


def _build_main(out: Path, seed: int, datalist_path: Path) -> None:
    """Parts 1 and 2 (real files and the small synthetic set): files, task datalists, README, ``datalist.json``."""
    datalist = _build(out, seed)
    shutil.copyfile(Path(__file__).with_name("DEMO_DATA.md"), out / "README.md")
    tasks = {
        "datalist_classification_2d.json": lambda it: it["dim"] == 2 and isinstance(it.get("label"), int),
        "datalist_segmentation_2d.json": lambda it: it["dim"] == 2 and isinstance(it.get("label"), str),
        "datalist_segmentation_3d.json": lambda it: it["dim"] == 3 and isinstance(it.get("label"), str),
        "datalist_classification_3d.json": lambda it: it["dim"] == 3 and isinstance(it.get("label"), int),
    }
    for name, keep in tasks.items():
        (out / name).write_text(json.dumps(_task_datalist(datalist, keep, TASK_DATALISTS[name]), indent=2) + "\n")
    temporary = out / "datalist.json.tmp"
    temporary.write_text(json.dumps(datalist, indent=2) + "\n")
    os.replace(temporary, datalist_path)


def dataset_digest(out_dir: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every file the builder wrote under ``out_dir`` (relative posix path -> hex digest)."""
    out = Path(out_dir)
    digests = {}
    for name in (*_OWNED, *_learn_owned()):
        entry = out / name
        files = sorted(p for p in entry.rglob("*") if p.is_file()) if entry.is_dir() else [entry]
        for path in files:
            if path.is_file():
                digests[path.relative_to(out).as_posix()] = file_sha256(path)
    return digests
