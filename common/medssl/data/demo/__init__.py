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

Modules: ``catalogue`` (version, class and mask names, task datalists, :data:`REAL_SOURCES`), ``generators`` (the
synthetic images), ``writers`` (NIfTI, DICOM series, the real files) and ``builder`` (:func:`build_demo_dataset`,
:func:`dataset_digest`). Every public name is re-exported here; the builder's are imported on first use (PEP 562), so
that :mod:`medssl.data.learnability`, which the builder imports, can import the generators and writers without a
cycle.
"""

from __future__ import annotations

import importlib

from .catalogue import (
    CLASSES,
    CT_VOLUME_CLASSES,
    DEMO_VERSION,
    MASK_CLASSES,
    REAL_SOURCES,
    SEGMENTATION_LABELS,
    TASK_DATALISTS,
    RealSource,
)
from .generators import (
    synthetic_chest_ct_nodules,
    synthetic_chest_xr,
    synthetic_chest_xr_organs,
    synthetic_ct_phantom,
    synthetic_fundus,
    synthetic_histology,
    synthetic_mr_phantom,
    synthetic_us_lesion,
)
from .writers import write_ct_dicom_series

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

_BUILDER_NAMES = ("build_demo_dataset", "dataset_digest")


def __getattr__(name: str):
    if name not in _BUILDER_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.builder"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_BUILDER_NAMES})
