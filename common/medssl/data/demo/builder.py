"""The build: the synthetic sets as one table, the real files, task datalists, the learnability set, idempotence
and the build lock (:func:`build_demo_dataset`, :func:`dataset_digest`)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from medssl.utils.io import file_sha256

from ..detection_demo import DETECTION_DATALIST, build_detection_set, detection_set_is_current
from ..reports import REPORT_FILES, report_corpus_is_current, write_report_corpus
from ..learnability import LEARN_DATALISTS, build_learnability_set, learn_builder_info, learn_datalists
from .catalogue import (
    CLASSES,
    CT_VOLUME_CLASSES,
    DEMO_VERSION,
    MASK_CLASSES,
    REAL_SOURCES,
    SECTIONS,
    SEGMENTATION_LABELS,
    TASK_DATALISTS,
)
from .generators import (
    _CT_NODULE_SHAPE,
    _rng,
    synthetic_chest_ct_nodules,
    synthetic_chest_xr,
    synthetic_chest_xr_organs,
    synthetic_ct_phantom,
    synthetic_fundus,
    synthetic_histology,
    synthetic_mr_phantom,
    synthetic_us_lesion,
)
from .writers import _ras_affine, _save_nifti, _write_real, write_ct_dicom_series

logger = logging.getLogger("medssl.data.demo")

_OWNED = ("real", "synthetic", "datalist.json", "README.md", *TASK_DATALISTS, DETECTION_DATALIST, *REPORT_FILES)

# random-stream groups (part of every SeedSequence, so the streams never overlap)
_G_XR, _G_US, _G_FUNDUS, _G_CT, _G_MR, _G_SERIES, _G_PATH = 1, 2, 3, 4, 5, 6, 7
_G_XR_ORGANS, _G_CT_NODULE = 8, 9
# the phantom volumes: shape (X, Y, Z) and voxel spacings (mm)
_PHANTOM_SHAPE = (64, 64, 32)
_CT_AFFINE = _ras_affine((5.5, 5.5, 8.0), _PHANTOM_SHAPE)
_MR_AFFINE = _ras_affine((3.5, 3.5, 6.0), _PHANTOM_SHAPE)
_NODULE_AFFINE = _ras_affine((7.0, 7.0, 8.0), _CT_NODULE_SHAPE)


# --------------------------------------------------------------------------------------------------
# the synthetic sets, as one table
# --------------------------------------------------------------------------------------------------
def _split_names(split: tuple[int, int, int]) -> list[tuple[str, int | None]]:
    """(section, no class) of each item of a (training, validation, test) split."""
    return [(section, None) for section, n in zip(SECTIONS, split) for _ in range(n)]


def _per_class(split: tuple[int, int, int], classes: tuple[int, ...]) -> list[tuple[str, int | None]]:
    """(section, class index) of each item: ``split[k] * len(classes)`` items per section, the classes in turn."""
    return [
        (section, classes[i % len(classes)])
        for section, n_per_class in zip(SECTIONS, split)
        for i in range(n_per_class * len(classes))
    ]


def _save_png(array: np.ndarray, path: Path, seed: int, index: int) -> None:
    Image.fromarray(array).save(path)


def _nifti_saver(affine: np.ndarray) -> Callable[[np.ndarray, Path, int, int], None]:
    return lambda array, path, seed, index: _save_nifti(array, affine, path)


def _save_ct_series(hu: np.ndarray, path: Path, seed: int, index: int) -> None:
    write_ct_dicom_series(hu, _CT_AFFINE, path, uid_entropy=f"seed{seed}-series{index}")


@dataclass(frozen=True)
class _SyntheticSet:
    """One set of synthetic items: ``synthetic/<folder>/<stem>_NNN<suffix>`` (and ``..._<mask>`` when masked).

    ``make(rng, index, class_index)`` returns (image, mask or None); ``label`` is ``"class"`` (the class index),
    ``"mask"`` (the mask path) or None (unlabelled); ``save_image`` / ``save_mask`` take (array, path, seed, index).
    """

    comment: str
    folder: str
    stem: str
    suffix: str
    modality: str
    dim: int
    group: int
    items: list[tuple[str, int | None]]
    make: Callable[[np.random.Generator, int, int | None], tuple[np.ndarray, np.ndarray | None]]
    save_image: Callable[[np.ndarray, Path, int, int], None]
    label: str | None = None
    mask_suffix: str = ""
    save_mask: Callable[[np.ndarray, Path, int, int], None] | None = None


# in build order (the datalist lists the items in this order)
_SYNTHETIC_SETS = (
    _SyntheticSet(
        "chest-X-ray-like classification images (label = class index)",
        "xr_chest", "xr", ".png", "XR", 2, _G_XR, _per_class((20, 10, 10), tuple(range(len(CLASSES)))),
        lambda rng, index, c: (synthetic_chest_xr(rng, c)[0], None), _save_png, label="class",
    ),
    _SyntheticSet(
        "ultrasound-like images with lesion masks (label = mask path)",
        "us_lesion", "us", ".png", "US", 2, _G_US, _split_names((8, 2, 2)),
        lambda rng, index, c: synthetic_us_lesion(rng), _save_png, "mask", "_mask.png", _save_png,
    ),
    _SyntheticSet(
        "fundus-like photographs (unlabelled; keep FUNDUS present without scikit-image)",
        "fundus", "fundus", ".png", "FUNDUS", 2, _G_FUNDUS, _split_names((2, 0, 0)),
        lambda rng, index, c: (synthetic_fundus(rng), None), _save_png,
    ),
    _SyntheticSet(
        "H&E-like histology tiles (unlabelled; keep PATH present without scikit-image)",
        "histology", "he", ".png", "PATH", 2, _G_PATH, _split_names((2, 0, 0)),
        lambda rng, index, c: (synthetic_histology(rng), None), _save_png,
    ),
    _SyntheticSet(
        "CT phantoms (NIfTI, HU) with masks (label = mask path)",
        "ct_phantom", "ct", ".nii.gz", "CT", 3, _G_CT, _split_names((4, 1, 1)),
        lambda rng, index, c: synthetic_ct_phantom(rng, _PHANTOM_SHAPE), _nifti_saver(_CT_AFFINE),
        "mask", "_seg.nii.gz", _nifti_saver(_CT_AFFINE),
    ),
    _SyntheticSet(
        "MR phantoms, T1- and T2-like in turn, with masks (label = mask path)",
        "mr_phantom", "mr", ".nii.gz", "MR", 3, _G_MR, _split_names((4, 1, 1)),
        lambda rng, index, c: synthetic_mr_phantom(rng, _PHANTOM_SHAPE, contrast="T1" if index % 2 == 0 else "T2"),
        _nifti_saver(_MR_AFFINE), "mask", "_seg.nii.gz", _nifti_saver(_MR_AFFINE),
    ),
    _SyntheticSet(
        "one CT phantom as a DICOM series directory, its mask as NIfTI on the same world grid",
        "", "ct_series", "", "CT", 3, _G_SERIES, _split_names((1, 0, 0)),
        lambda rng, index, c: synthetic_ct_phantom(rng, _PHANTOM_SHAPE), _save_ct_series,
        "mask", "_seg.nii.gz", _nifti_saver(_CT_AFFINE),
    ),
    _SyntheticSet(
        "chest-X-ray-like images with JSRT / SCR-style organ masks (label = mask path, MASK_CLASSES['XR'])",
        "xr_organs", "xr", ".png", "XR", 2, _G_XR_ORGANS, _split_names((12, 4, 4)),
        lambda rng, index, c: synthetic_chest_xr_organs(rng), _save_png, "mask", "_mask.png", _save_png,
    ),
    _SyntheticSet(
        "class-labelled chest CT volumes, normal / nodule in turn (label = class index into CLASSES); "
        "(8, 3, 3) per class of CT_VOLUME_CLASSES: 16 / 6 / 6 volumes",
        "ct_nodule", "ct", ".nii.gz", "CT", 3, _G_CT_NODULE, _per_class((8, 3, 3), CT_VOLUME_CLASSES),
        lambda rng, index, c: (synthetic_chest_ct_nodules(rng, c), None), _nifti_saver(_NODULE_AFFINE),
        label="class",
    ),
)


# --------------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------------
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

    # 2. the synthetic sets (_SYNTHETIC_SETS), labelled by class index or mask path, or unlabelled
    for spec in _SYNTHETIC_SETS:
        folder = out / "synthetic" / spec.folder
        folder.mkdir(parents=True, exist_ok=True)
        for index, (section, class_index) in enumerate(spec.items):
            image, mask = spec.make(_rng(seed, spec.group, index), index, class_index)
            target = folder / f"{spec.stem}_{index:03d}{spec.suffix}"
            spec.save_image(image, target, seed, index)
            label: int | Path | None = class_index if spec.label == "class" else None
            if spec.label == "mask":
                label = folder / f"{spec.stem}_{index:03d}{spec.mask_suffix}"
                spec.save_mask(mask, label, seed, index)
            add(section, target, spec.modality, spec.dim, label)

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
    return ("learn", *LEARN_DATALISTS)


def _learn_is_current(out: Path, seed: int) -> bool:
    """True when ``out/datalist_learn.json`` was built by this version with ``seed`` and the current per-class
    counts, and all its files exist."""
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
        # the detection set (synthetic/xr_detect, datalist_detection_2d.json; medssl.data.detection_demo) is kept out
        # of datalist.json and checked on its own, like the learnability set
        if force or not detection_set_is_current(out, seed):
            build_detection_set(out, seed)
        # the report corpus (reports/, datalist_reports.json, datalist_sentences.json; medssl.data.reports): MedCoSS's
        # text stage and report classification, likewise kept out of datalist.json
        if force or not report_corpus_is_current(out, seed):
            write_report_corpus(out, seed)
    return datalist_path


def _build_main(out: Path, seed: int, datalist_path: Path) -> None:
    """Parts 1 and 2 (real files and the small synthetic set): files, task datalists, README, ``datalist.json``."""
    datalist = _build(out, seed)
    shutil.copyfile(Path(__file__).parent.parent / "DEMO_DATA.md", out / "README.md")
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
