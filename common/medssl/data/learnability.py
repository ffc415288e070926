"""Demo data v3, the learnability set: class-labelled synthetic 2D images and 3D volumes whose class cue is
anatomical shape or texture, for measuring whether self-supervised pretraining learns anything.

Written by :func:`build_learnability_set` under ``DIR/learn/`` (``medssl.data.demo.build_demo_dataset`` calls it;
see ``DEMO_DATA.md``). Five modalities, three classes each (:data:`LEARN_CLASSES`):

- ``XR`` chest radiographs: ``normal`` / ``nodules`` (2-7 round opacities in both lungs) / ``effusion`` (basal
  opacity with a lateral meniscus, one or both sides);
- ``FUNDUS`` colour fundus photographs: ``normal`` / ``exudates`` (clusters of small bright yellow spots) /
  ``haemorrhages`` (scattered dark-red blots);
- ``PATH`` H&E tiles: ``round_nuclei`` (sheets of round nuclei) / ``spindle_cells`` (elongated nuclei in aligned
  fascicles) / ``glands`` (white lumens lined by a ring of nuclei);
- ``CT`` chest volumes (Hounsfield units): ``normal`` / ``nodules`` (3-7 spheres in the lungs) / ``linear_lesions``
  (3-6 thick bands, scar- or plate-atelectasis-like, of the nodules' density);
- ``MR`` brain volumes (T1-, T2- or FLAIR-like): ``normal`` / ``multifocal_lesions`` (8-16 small ovoid white-matter
  foci) / ``mass`` (one large lesion with a necrotic core and oedema).

Every class draws its nuisances from the same distributions -- global intensity, gamma and contrast, noise level,
blur, anatomy size, pose and position, background texture, stain or pigment colour -- and the lesions vary in
number, size, position and density, so the class is carried by shape and texture and not by brightness, contrast,
size or position (which a random network separates without learning anything). The cues are a few pixels wide at
128 px (voxels at 64^3) and spread over the image, so they survive 64-px resizing after crops of 30-40 % of the image
(64 x 64 x 16 for volumes), gamma / linear intensity changes and band-energy changes.

Labels: ONE label space for the whole set, a flat list of 15 class names (``"classes"``, the format every medssl tool
reads) with a disjoint range per modality -- XR 0-2, FUNDUS 3-5, PATH 6-8, CT 9-11, MR 12-14
(:data:`LABEL_OFFSETS`; ``"modality_classes"`` in the datalists gives the names per modality). Classify within one
modality (``medssl.data.load_items(..., modalities=["XR"])``): chance is 1/3.

Determinism: item ``i`` of modality group ``g`` draws everything from ``numpy.random.default_rng(SeedSequence([seed,
g, i]))``; PNG (pillow) and NIfTI (nibabel, gzip header time 0) writers embed no time stamps, so two builds with the
same seed are byte-identical. Only numpy, scipy.ndimage, pillow and nibabel are used (no ``torch``). The check that
the set is not trivially separable (kNN of raw pixels and of randomly initialised encoders) is
:mod:`medssl.evaluation.random_init`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from .demo.catalogue import DEMO_VERSION
from .demo.generators import _rng
from .demo.writers import _ras_affine, _save_nifti
from .learnability_2d import learn_chest_xr, learn_fundus, learn_histology
from .learnability_3d import learn_brain_mr, learn_chest_ct
from .learnability_common import LEARN_CLASSES, LEARN_SHAPE_3D, LEARN_SIZE_2D

__all__ = [
    "LEARN_CLASSES",
    "LABEL_OFFSETS",
    "LEARN_DATALISTS",
    "PER_CLASS_2D",
    "PER_CLASS_3D",
    "LEARN_SIZE_2D",
    "LEARN_SHAPE_3D",
    "learn_chest_xr",
    "learn_fundus",
    "learn_histology",
    "learn_chest_ct",
    "learn_brain_mr",
    "build_learnability_set",
    "learn_builder_info",
    "learn_datalists",
    "LEARN_DIMS",
]

#: First label of each modality in the flat label space (``"classes"`` of the learn datalists).
LABEL_OFFSETS: dict[str, int] = {"XR": 0, "FUNDUS": 3, "PATH": 6, "CT": 9, "MR": 12}
#: The datalists written next to ``datalist.json``: file name -> which learn items they hold.
LEARN_DATALISTS = {
    "datalist_learn.json": "all learnability items (2D and 3D)",
    "datalist_learn_2d.json": "the 2D learnability items (XR, FUNDUS, PATH)",
    "datalist_learn_3d.json": "the 3D learnability volumes (CT, MR)",
}
#: Items per class and section (training, validation, test): 2D per modality, 3D per modality.
PER_CLASS_2D = (240, 50, 50)  # x 3 classes x 3 modalities = 3,060 images
PER_CLASS_3D = (50, 15, 15)  # x 3 classes x 2 modalities = 480 volumes
SECTIONS = ("training", "validation", "test")
# random-stream groups (disjoint from those of medssl.data.demo, 1-9)
_GROUPS = {"XR": 21, "FUNDUS": 22, "PATH": 23, "CT": 24, "MR": 25}
_SPACING = {"CT": (5.5, 5.5, 5.0), "MR": (3.2, 3.6, 3.2)}


# --------------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------------
_GENERATORS = {
    "XR": learn_chest_xr,
    "FUNDUS": learn_fundus,
    "PATH": learn_histology,
    "CT": learn_chest_ct,
    "MR": learn_brain_mr,
}
#: The dimension of each modality's images (2: PNG images, 3: NIfTI volumes).
LEARN_DIMS: dict[str, int] = {"XR": 2, "FUNDUS": 2, "PATH": 2, "CT": 3, "MR": 3}


def _per_class(dim: int, per_class_2d: Sequence[int] | None, per_class_3d: Sequence[int] | None) -> tuple[int, ...]:
    value = (per_class_2d if per_class_2d is not None else PER_CLASS_2D) if dim == 2 else (
        per_class_3d if per_class_3d is not None else PER_CLASS_3D
    )
    value = tuple(int(n) for n in value)
    if len(value) != 3 or min(value) < 1:
        raise ValueError(f"per-class split {value} must be 3 positive counts (training, validation, test)")
    return value


def _plan(modality: str, split: tuple[int, ...]) -> list[tuple[str, int, int]]:
    """(section, item index, class index) of every item of a modality: classes alternate within each section."""
    plan, index = [], 0
    for section, n in zip(SECTIONS, split):
        for i in range(n * 3):
            plan.append((section, index, i % 3))
            index += 1
    return plan


def _write_item(job: tuple[str, str, int, int, int]) -> None:
    """Generate and write one item (a pure function of its arguments; run in worker processes too)."""
    modality, path, seed, index, class_index = job
    data = _GENERATORS[modality](_rng(seed, _GROUPS[modality], index), class_index)
    if LEARN_DIMS[modality] == 2:
        Image.fromarray(data).save(path)
    else:
        _save_nifti(data, _ras_affine(_SPACING[modality], data.shape), Path(path))


def build_learnability_set(
    out_dir: str | os.PathLike,
    seed: int = 0,
    per_class_2d: Sequence[int] | None = None,
    per_class_3d: Sequence[int] | None = None,
    workers: int = 1,
) -> dict[str, list[dict[str, Any]]]:
    """Write the learnability images under ``out_dir/learn/<modality>/`` and return their datalist sections.

    Args:
        out_dir: the dataset directory; item paths are relative to it.
        seed: seed of every image (item ``i`` of modality ``m``: ``SeedSequence([seed, group(m), i])``).
        per_class_2d: items per class in (training, validation, test) for each 2D modality (default
            :data:`PER_CLASS_2D`); smaller for tests.
        per_class_3d: the same for each 3D modality (default :data:`PER_CLASS_3D`).
        workers: processes writing items (1: this process). Every item is a pure function of (seed, modality,
            index), so the files do not depend on ``workers``.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, items ``{"image", "modality", "dim", "label"}``
        with ``label`` in the flat label space (:data:`LABEL_OFFSETS`); classes alternate within each section.
    """
    out = Path(out_dir)
    sections: dict[str, list[dict[str, Any]]] = {s: [] for s in SECTIONS}
    jobs = []
    for modality, dim in LEARN_DIMS.items():
        folder = out / "learn" / modality.lower()
        folder.mkdir(parents=True, exist_ok=True)
        plan = _plan(modality, _per_class(dim, per_class_2d, per_class_3d))
        digits = max(3, len(str(len(plan) - 1)))
        for section, index, class_index in plan:
            name = f"{modality.lower()}_{index:0{digits}d}" + (".png" if dim == 2 else ".nii.gz")
            path = folder / name
            jobs.append((modality, str(path), int(seed), index, class_index))
            sections[section].append(
                {
                    "image": path.relative_to(out).as_posix(),
                    "modality": modality,
                    "dim": dim,
                    "label": LABEL_OFFSETS[modality] + class_index,
                }
            )
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context().Pool(int(workers)) as pool:  # the platform's start method
            for _ in pool.imap_unordered(_write_item, jobs, chunksize=8):
                pass
    else:
        for job in jobs:
            _write_item(job)
    return sections


def learn_builder_info(seed: int, per_class_2d: Sequence[int] | None = None,
                       per_class_3d: Sequence[int] | None = None) -> dict[str, Any]:
    """The ``"builder"`` entry of the learn datalists: what a build depends on (a reuse check compares it)."""
    return {
        "module": "medssl.data.demo",
        "part": "learn",
        "version": DEMO_VERSION,
        "seed": int(seed),
        "per_class_2d": list(_per_class(2, per_class_2d, per_class_3d)),
        "per_class_3d": list(_per_class(3, per_class_2d, per_class_3d)),
    }


def learn_datalists(sections: dict[str, list[dict[str, Any]]], builder: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The datalists of :data:`LEARN_DATALISTS` (file name -> JSON object) for the sections of a build."""
    classes = [f"{modality}: {name}" for modality, names in LEARN_CLASSES.items() for name in names]
    description = (
        "medssl demo data v3, the learnability set (see README.md, 'Learnability set'): synthetic class-labelled "
        "images whose class cue is anatomical shape or texture. 'label' indexes the flat 'classes' list, a disjoint "
        "range per modality ('label_offsets'; 'modality_classes' names them): classify within one modality, chance "
        "1/3."
    )
    out = {}
    for name, dims in zip(LEARN_DATALISTS, ((2, 3), (2,), (3,))):
        kept = {s: [item for item in sections[s] if item["dim"] in dims] for s in SECTIONS}
        modalities = [m for m in LEARN_CLASSES if LEARN_DIMS[m] in dims]
        out[name] = {
            "name": "medssl-demo-learn",
            "description": f"{LEARN_DATALISTS[name]}. {description}",
            "reference": "medssl.data.learnability",
            "licence": "Apache-2.0 (medssl; synthetic)",
            "builder": builder,
            "classes": classes,
            "modality_classes": {m: list(LEARN_CLASSES[m]) for m in modalities},
            "label_offsets": {m: LABEL_OFFSETS[m] for m in modalities},
            "numTraining": len(kept["training"]),
            "numValidation": len(kept["validation"]),
            "numTest": len(kept["test"]),
            **kept,
        }
    return out
