"""Convert MedMNIST v2 ``.npz`` files into image files and medssl datalists (the real-data recipe, recipes/medmnist.md).

Usage:
    python tools/prepare_medmnist.py --npz pathmnist_64.npz [--npz organmnist3d_64.npz ...] --out DIR \\
        [--modality dermamnist=FUNDUS ...] [--limit N] [--workers 4] [--force]

Input: the ``.npz`` files of MedMNIST v2 (Yang et al., "MedMNIST v2 - A large-scale lightweight benchmark for 2D and
3D biomedical image classification", Scientific Data 10:41, 2023; https://medmnist.com), as its ``medmnist`` package
names them: ``<subset>.npz`` (28 pixels) or ``<subset>_<size>.npz`` (MedMNIST+: 2D 64 / 128 / 224, 3D 64), each with
the keys ``train_images``, ``train_labels``, ``val_images``, ``val_labels``, ``test_images``, ``test_labels``. Images
are uint8: 2D grey ``(N, H, W)``, 2D RGB ``(N, H, W, 3)``, 3D ``(N, D, H, W)`` (depth first, as MedMNIST's montage
walks it); labels ``(N, 1)`` class indices, or ``(N, 14)`` 0/1 findings for the multi-label ChestMNIST. The subset
is recognised from the file name; ``--modality NAME=MOD`` sets (or overrides) the modality of subset NAME and lets a
file whose name is no MedMNIST subset be converted as a custom one.

Output, per file ``DIR/<stem>/`` (``<stem>`` = the file name without ``.npz``):

- ``train/``, ``val/``, ``test/``: one file per image, ``000000.png`` ... (2D; grey or RGB PNG) or ``.nii.gz``
  (3D volumes, and 2D CT slices, see below). Volumes are written in medssl's axis convention, array (X, Y, Z) with
  the depth axis LAST: MedMNIST's (D, H, W) becomes (W, H, D), so that a volume's slice ``[:, :, k]`` is what
  medssl's PNG reader returns for MedMNIST's frame k (MONAI's readers put the column index first). The voxel
  spacing is not in the files; 1 mm is written.
- ``datalist.json``: the subset's datalist (README "Datalist format"): ``training`` / ``validation`` / ``test`` =
  the npz's train / val / test splits, items ``{"image", "modality", "dim", "label"}`` with ``label`` the class
  index (an int) or, for ChestMNIST, the list of 14 0/1 values; ``classes`` = MedMNIST's class names.
- ``task.json``: the subset's task keys as a MONAI bundle config to layer on ``xray_classification`` (2D) or
  ``ct_volume_classification`` (3D): ``class_names``, ``modalities``, ``multi_label``, ``ordinal``.

``DIR/datalist.json`` is the union of every subset converted into DIR (this run's and earlier ones'), for
pretraining: the same items under ``<stem>/``, with ``label`` a GLOBAL class index into its ``classes``
(``"<stem>: <class>"``, each single-label subset's classes after the previous subsets' ones), so that the pretraining
bundles' kNN monitors score every labelled subset at once; ChestMNIST's multi-label items are unlabelled there.

CT: MedMNIST stores CT already windowed to 8 bits (an abdominal window). medssl's CT preset maps the HU window
``--ct-window`` (default its -1000 .. 1000 HU) to [0, 1], which would squeeze 0..255 into [0.50, 0.63]; so CT images
are written as NIfTI holding the uint8 values with the NIfTI scaling HU = lo + v * (hi - lo) / 255, and the preset
gives back v / 255. This is why 2D CT slices are ``.nii.gz`` rather than PNG (a PNG cannot hold HU).

A malformed file (a missing key, a wrong shape or dtype, labels out of range, a file name that is no MedMNIST subset)
stops the run before anything of it is written, with one line naming the file and the key; exit status 2
(``--debug`` shows the traceback, as in every medssl tool: ``medssl.cli``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medssl.cli import DEBUG_FLAG, is_user_error, user_message
from medssl.utils.io import atomic_write_text

SPLITS = (("train", "training"), ("val", "validation"), ("test", "test"))
KEYS = tuple(f"{split}_{kind}" for split, _ in SPLITS for kind in ("images", "labels"))
SIZES = {2: (28, 64, 128, 224), 3: (28, 64)}
MARKER = "medssl tools/prepare_medmnist.py"
_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
           "lung-right", "pancreas", "spleen")  # fmt: skip


@dataclass(frozen=True)
class Subset:
    """One MedMNIST v2 subset: dimensionality, channels, task and class names (``medmnist`` package, ``INFO``), and
    the medssl modality it gets by default (None: the user must choose, with the reason in ``note``)."""

    dim: int
    channels: int
    task: str
    classes: tuple[str, ...]
    modality: str | None
    note: str = ""

    @property
    def multi_label(self) -> bool:
        return self.task.startswith("multi-label")


SUBSETS: dict[str, Subset] = {
    "pathmnist": Subset(2, 3, "multi-class", ("adipose", "background", "debris", "lymphocytes", "mucus",
                        "smooth muscle", "normal colon mucosa", "cancer-associated stroma",
                        "colorectal adenocarcinoma epithelium"), "PATH"),
    "chestmnist": Subset(2, 1, "multi-label, binary-class", ("atelectasis", "cardiomegaly", "effusion",
                         "infiltration", "mass", "nodule", "pneumonia", "pneumothorax", "consolidation", "edema",
                         "emphysema", "fibrosis", "pleural", "hernia"), "XR"),
    "dermamnist": Subset(2, 3, "multi-class", ("actinic keratoses and intraepithelial carcinoma",
                         "basal cell carcinoma", "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                         "melanocytic nevi", "vascular lesions"), None,
                         "dermatoscope photographs: medssl has no dermoscopy modality"),
    "octmnist": Subset(2, 1, "multi-class", ("choroidal neovascularization", "diabetic macular edema", "drusen",
                       "normal"), None, "retinal OCT: medssl has no OCT modality"),
    "pneumoniamnist": Subset(2, 1, "binary-class", ("normal", "pneumonia"), "XR"),
    "retinamnist": Subset(2, 3, "ordinal-regression", ("0", "1", "2", "3", "4"), "FUNDUS"),
    "breastmnist": Subset(2, 1, "binary-class", ("malignant", "normal, benign"), "US"),
    "bloodmnist": Subset(2, 3, "multi-class", ("basophil", "eosinophil", "erythroblast",
                         "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
                         "monocyte", "neutrophil", "platelet"), "PATH"),
    "tissuemnist": Subset(2, 1, "multi-class", ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                          "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes", "Podocytes",
                          "Proximal Tubule Segments", "Thick Ascending Limb"), "PATH"),
    "organamnist": Subset(2, 1, "multi-class", _ORGANS, "CT"),
    "organcmnist": Subset(2, 1, "multi-class", _ORGANS, "CT"),
    "organsmnist": Subset(2, 1, "multi-class", _ORGANS, "CT"),
    "organmnist3d": Subset(3, 1, "multi-class", ("liver", "kidney-right", "kidney-left", "femur-right", "femur-left",
                           "bladder", "heart", "lung-right", "lung-left", "spleen", "pancreas"), "CT"),
    "nodulemnist3d": Subset(3, 1, "binary-class", ("benign", "malignant"), "CT"),
    "adrenalmnist3d": Subset(3, 1, "binary-class", ("normal", "hyperplasia"), None,
                             "binary shape masks of adrenal glands, not CT intensities"),
    "fracturemnist3d": Subset(3, 1, "multi-class", ("buckle rib fracture", "nondisplaced rib fracture",
                              "displaced rib fracture"), "CT"),
    "vesselmnist3d": Subset(3, 1, "binary-class", ("vessel", "aneurysm"), None,
                            "voxelised vessel meshes (shapes from MRA), not MR intensities"),
    "synapsemnist3d": Subset(3, 1, "binary-class", ("inhibitory synapse", "excitatory synapse"), "PATH"),
}  # fmt: skip


class MedMNISTError(ValueError):
    """A user-facing problem with an input file or an option; its message is one line naming the file / key."""


# ------------------------------------------------------------------------------------------------- reading the npz
@dataclass
class _Member:
    """An array inside an ``.npz`` (a zip of ``.npy`` files), read from its header without loading the data."""

    npz: Path
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool

    def rows(self, count: int, chunk: int = 256) -> Iterator[np.ndarray]:
        """The first ``count`` rows (items) in chunks of ``chunk``, streamed from the zip (a 224-pixel PathMNIST is
        13 GB: ``np.load`` would hold all of it in memory)."""
        item_shape, item_bytes = self.shape[1:], self.dtype.itemsize * math.prod(self.shape[1:])
        with zipfile.ZipFile(self.npz) as archive, archive.open(f"{self.key}.npy") as stream:
            _read_header(stream)
            done = 0
            while done < count:
                n = min(chunk, count - done)
                data = stream.read(n * item_bytes)
                if len(data) != n * item_bytes:
                    raise MedMNISTError(f"{self.npz}: '{self.key}' is truncated (item {done + len(data) // item_bytes}"
                                        f" of {self.shape[0]} missing)")
                yield np.frombuffer(data, dtype=self.dtype).reshape((n, *item_shape))
                done += n

    def load(self) -> np.ndarray:
        with zipfile.ZipFile(self.npz) as archive, archive.open(f"{self.key}.npy") as stream:
            return np.lib.format.read_array(stream)


def _read_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


def _members(npz: Path) -> dict[str, _Member]:
    """The six MedMNIST arrays of ``npz`` (headers only); MedMNISTError naming the first missing key."""
    try:
        archive = zipfile.ZipFile(npz)
    except FileNotFoundError:
        raise MedMNISTError(f"{npz}: file not found") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise MedMNISTError(f"{npz}: not a readable .npz file ({e})") from None
    with archive:
        names = set(archive.namelist())
        members = {}
        for key in KEYS:
            if f"{key}.npy" not in names:
                found = ", ".join(sorted(n[: -len(".npy")] for n in names if n.endswith(".npy"))) or "none"
                raise MedMNISTError(f"{npz}: key '{key}' missing (found: {found}; a MedMNIST v2 file has "
                                    f"{', '.join(KEYS)})")
            try:
                with archive.open(f"{key}.npy") as stream:
                    shape, fortran, dtype = _read_header(stream)
            except ValueError as e:
                raise MedMNISTError(f"{npz}: key '{key}' is not a NumPy array ({e})") from None
            members[key] = _Member(npz, key, tuple(int(s) for s in shape), np.dtype(dtype), bool(fortran))
    return members


# ------------------------------------------------------------------------------------------------------ validation
_NAME_RE = re.compile(r"^(?P<flag>[a-z0-9]+?)(?:_(?P<size>\d+))?$")


@dataclass
class _Plan:
    """What one input file becomes: subset, layout and validated labels per split."""

    npz: Path
    stem: str
    flag: str
    subset: Subset
    size: int
    modality: str
    rgb: bool
    members: dict[str, _Member]
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        return self.flag in SUBSETS


def _parse_modalities(values: Sequence[str]) -> dict[str, str]:
    from medssl.data.datalist import normalize_modality

    out = {}
    for value in values or ():
        name, sep, modality = str(value).partition("=")
        if not sep or not name.strip() or not modality.strip():
            raise MedMNISTError(f"--modality {value!r}: expected NAME=MODALITY, e.g. dermamnist=FUNDUS")
        try:
            out[name.strip().lower()] = normalize_modality(modality)
        except ValueError as e:
            raise MedMNISTError(f"--modality {value!r}: {e}") from None
    return out


def _plan(npz: Path, modalities: dict[str, str]) -> _Plan:
    stem = npz.name[: -len(".npz")] if npz.name.lower().endswith(".npz") else npz.name
    match = _NAME_RE.match(stem.lower())
    flag = match.group("flag") if match else stem.lower()
    size = int(match.group("size")) if match and match.group("size") else 28
    modality = modalities.get(stem.lower(), modalities.get(flag))
    members = _members(npz)
    images = members["train_images"]
    if flag in SUBSETS:
        subset = SUBSETS[flag]
        if size not in SIZES[subset.dim]:
            raise MedMNISTError(f"{npz}: MedMNIST v2 has no {size}-pixel {flag} (its {subset.dim}D sizes: "
                                f"{', '.join(map(str, SIZES[subset.dim]))}); rename the file <subset>[_<size>].npz")
        if modality is None:
            if subset.modality is None:
                raise MedMNISTError(f"{npz}: {flag} has no default medssl modality ({subset.note}); pass --modality "
                                    f"{flag}=MOD (e.g. FUNDUS or PATH: 8-bit unit-range preset; US: percentile "
                                    "preset) or leave the file out")
            modality = subset.modality
    else:
        if modality is None:
            known = ", ".join(SUBSETS)
            raise MedMNISTError(f"{npz}: {stem!r} is no MedMNIST v2 subset (known: {known}; files are named "
                                f"<subset>.npz or <subset>_<size>.npz); to convert it anyway pass --modality "
                                f"{flag}=MOD")
        ndim = len(images.shape)
        dim = 3 if ndim == 4 and images.shape[-1] != 3 else 2
        rgb = ndim == 4 and images.shape[-1] == 3
        subset = Subset(dim, 3 if rgb else 1, "custom", (), modality)
        size = images.shape[1] if ndim >= 2 else 0
    plan = _Plan(npz, stem, flag, subset, size, modality, subset.channels == 3, members)
    _check(plan)
    return plan


def _check(plan: _Plan) -> None:
    """Shapes, dtypes and labels of every split; MedMNISTError naming the file and the key."""
    npz, subset, s = plan.npz, plan.subset, plan.size
    if subset.dim == 3:
        expected, layout = (s, s, s), f"(N, {s}, {s}, {s}) volumes (depth first)"
    elif subset.channels == 3:
        expected, layout = (s, s, 3), f"(N, {s}, {s}, 3) RGB images"
    else:
        expected, layout = (s, s), f"(N, {s}, {s}) grey images"
    what = f"{plan.flag}" + (f" ({plan.size} px)" if plan.known else "")
    for split, _ in SPLITS:
        images, labels = plan.members[f"{split}_images"], plan.members[f"{split}_labels"]
        if images.fortran:
            raise MedMNISTError(f"{npz}: '{images.key}' is stored in Fortran order; expected a C-order {layout} array")
        if images.shape[1:] != expected or len(images.shape) != len(expected) + 1:
            raise MedMNISTError(f"{npz}: '{images.key}' has shape {images.shape}; {what} needs {layout}")
        if images.dtype != np.uint8:
            raise MedMNISTError(f"{npz}: '{images.key}' has dtype {images.dtype}; MedMNIST images are uint8")
        n = images.shape[0]
        if len(labels.shape) not in (1, 2) or labels.shape[0] != n:
            raise MedMNISTError(f"{npz}: '{labels.key}' has shape {labels.shape}; expected ({n}, L) for the {n} "
                                f"items of '{images.key}'")
        if labels.dtype.kind not in "iub":
            raise MedMNISTError(f"{npz}: '{labels.key}' has dtype {labels.dtype}; expected integer class labels")
        values = labels.load().reshape(n, -1).astype(np.int64)
        width = values.shape[1]
        if plan.known:
            if subset.multi_label and width != len(subset.classes):
                raise MedMNISTError(f"{npz}: '{labels.key}' has shape {labels.shape}; {plan.flag} is multi-label: "
                                    f"expected ({n}, {len(subset.classes)}) 0/1 values")
            if not subset.multi_label and width != 1:
                raise MedMNISTError(f"{npz}: '{labels.key}' has shape {labels.shape}; {plan.flag} is single-label: "
                                    f"expected ({n}, 1) class indices")
        high = 2 if width > 1 else (len(subset.classes) if plan.known else None)
        bad = (values < 0) | (values >= high) if high is not None else values < 0
        if n and bad.any():
            index = int(np.argwhere(bad)[0][0])
            limit = f"0..{high - 1}" if high is not None else ">= 0"
            raise MedMNISTError(f"{npz}: '{labels.key}' item {index} has label {values[index].tolist()}; "
                                f"expected values {limit}")
        plan.labels[split] = values
    if not plan.known:  # a custom subset: classes from the labels
        widths = {v.shape[1] for v in plan.labels.values()}
        if len(widths) != 1:
            raise MedMNISTError(f"{npz}: the label arrays have different widths {sorted(widths)}")
        width = widths.pop()
        count = width if width > 1 else 1 + max((int(v.max()) for v in plan.labels.values() if v.size), default=0)
        task = "multi-label, binary-class" if width > 1 else "multi-class"
        plan.subset = Subset(subset.dim, subset.channels, task, tuple(str(i) for i in range(count)), plan.modality)


# --------------------------------------------------------------------------------------------------------- writing
def _write_chunk(frames: np.ndarray, paths: list[str], dim: int, ct_window: tuple[float, float] | None) -> None:
    """Write one chunk of items: PNG for 2D non-CT, NIfTI (uint8 + HU scaling for CT) otherwise."""
    for frame, path in zip(frames, paths):
        if path.endswith(".png"):
            from PIL import Image

            Image.fromarray(np.ascontiguousarray(frame)).save(path)
            continue
        import nibabel as nib

        # MedMNIST (H, W) / (D, H, W) -> medssl (X, Y[, Z]) = (W, H[, D]): column index first, depth last
        array = np.ascontiguousarray(frame.T if dim == 2 else frame.transpose(2, 1, 0))
        image = nib.Nifti1Image(array, np.eye(4))
        image.header.set_xyzt_units("mm")
        image.set_qform(np.eye(4), code=1)
        image.set_sform(np.eye(4), code=1)
        if ct_window is not None:
            low, high = ct_window
            image.header.set_slope_inter((high - low) / 255.0, low)
        nib.save(image, path)


def _convert(plan: _Plan, out: Path, limit: int | None, workers: int, ct_window: tuple[float, float]) -> dict:
    """Write the images of ``plan`` under ``out/<stem>`` and return its datalist (dict)."""
    from tqdm import tqdm

    root = out / plan.stem
    dim, is_ct = plan.subset.dim, plan.modality == "CT"
    suffix = ".nii.gz" if dim == 3 or is_ct else ".png"
    window = tuple(float(v) for v in ct_window) if is_ct else None
    sections: dict[str, list[dict]] = {}
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        for split, section in SPLITS:
            member = plan.members[f"{split}_images"]
            n = member.shape[0] if limit is None else min(member.shape[0], int(limit))
            (root / split).mkdir(parents=True, exist_ok=True)
            names = [f"{split}/{i:06d}{suffix}" for i in range(n)]
            futures, start = [], 0
            with tqdm(total=n, desc=f"{plan.stem} {split}", unit="img", leave=False, file=sys.stderr) as bar:
                for frames in member.rows(n):
                    paths = [str(root / name) for name in names[start : start + len(frames)]]
                    if pool is None:
                        _write_chunk(frames, paths, dim, window)
                        bar.update(len(frames))
                    else:
                        futures.append((pool.submit(_write_chunk, frames.copy(), paths, dim, window), len(frames)))
                        while len(futures) > 2 * workers:  # bounded: a 224-pixel split never sits in memory
                            future, count = futures.pop(0)
                            future.result()
                            bar.update(count)
                    start += len(frames)
                for future, count in futures:
                    future.result()
                    bar.update(count)
            labels = plan.labels[split]
            sections[section] = [
                {"image": name, "modality": plan.modality, "dim": dim, "label": _label(labels[i], plan.subset)}
                for i, name in enumerate(names)
            ]
    finally:
        if pool is not None:
            pool.shutdown()
    subset = plan.subset
    return {
        "name": plan.stem,
        "description": (
            f"MedMNIST v2 {plan.flag} ({plan.size} px, {subset.task}) converted by {MARKER} from {plan.npz.name}; "
            + ("'label' is the list of 0/1 findings, in the order of 'classes'" if subset.multi_label
               else "'label' is an index into 'classes'")
            + ". Source: Yang et al., Scientific Data 10:41 (2023), https://medmnist.com (see each subset's licence)."
        ),
        "classes": list(subset.classes),
        "medmnist": {
            "builder": MARKER,
            "subset": plan.flag,
            "file": plan.npz.name,
            "size": plan.size,
            "dim": dim,
            "channels": subset.channels,
            "task": subset.task,
            "modality": plan.modality,
            "limit": limit,
            **({"ct_window": list(window)} if window else {}),
        },
        **sections,
    }


def _label(row: np.ndarray, subset: Subset) -> int | list[int]:
    return [int(v) for v in row] if subset.multi_label else int(row[0])


def task_config(datalist: dict) -> dict:
    """The subset's task keys for the downstream classification bundles (a MONAI config to layer last)."""
    info = datalist["medmnist"]
    return {
        "_comment": (
            f"{datalist['name']}: MedMNIST v2 task keys written by {MARKER}; layer after configs/train.json of "
            + ("xray_classification" if info["dim"] == 2 else "ct_volume_classification")
            + " (and evaluate.json / inference.json)"
        ),
        "class_names": datalist["classes"],
        "modalities": [info["modality"]],
        "multi_label": info["task"].startswith("multi-label"),
        "ordinal": info["task"] == "ordinal-regression",
    }


def union_datalist(out: Path) -> dict:
    """The union of every subset datalist this tool wrote under ``out`` (sorted by folder name), for pretraining."""
    sections: dict[str, list[dict]] = {section: [] for _, section in SPLITS}
    classes: list[str] = []
    subsets = {}
    for path in sorted(out.glob("*/datalist.json")):
        try:
            datalist = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        info = datalist.get("medmnist") if isinstance(datalist, dict) else None
        if not isinstance(info, dict) or info.get("builder") != MARKER:
            continue
        stem = path.parent.name
        multi = str(info.get("task", "")).startswith("multi-label")
        offset = None if multi else len(classes)
        if not multi:
            classes.extend(f"{stem}: {name}" for name in datalist["classes"])
        subsets[stem] = {
            "datalist": f"{stem}/datalist.json",
            "modality": info["modality"],
            "dim": info["dim"],
            "size": info["size"],
            "task": info["task"],
            "num_classes": len(datalist["classes"]),
            "label_offset": offset,
        }
        for section in sections:
            for item in datalist.get(section, []):
                entry = {"image": f"{stem}/{item['image']}", "modality": item["modality"], "dim": item["dim"]}
                if offset is not None:
                    entry["label"] = offset + int(item["label"])
                sections[section].append(entry)
    return {
        "name": "medmnist",
        "description": (
            f"Union of the MedMNIST v2 subsets converted into this folder by {MARKER}, for pretraining. 'label' is an "
            "index into 'classes' ('<subset>: <class>', the single-label subsets one after the other); multi-label "
            "subsets are unlabelled here. Each subset's own datalist (local labels, its classes) is "
            "<subset>/datalist.json."
        ),
        "classes": classes,
        "subsets": subsets,
        **sections,
    }


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def prepare(
    npz: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    modality: Sequence[str] = (),
    limit: int | None = None,
    workers: int = 0,
    force: bool = False,
    ct_window: Sequence[float] = (-1000.0, 1000.0),
) -> Path:
    """Convert ``npz`` files into ``out`` (see the module docstring); returns the path of ``out/datalist.json``.

    Every file is checked (keys, shapes, dtypes, labels) before anything is written.
    """
    if not npz:
        raise MedMNISTError("no --npz file given")
    if limit is not None and int(limit) < 1:
        raise MedMNISTError(f"--limit {limit}: must be >= 1")
    if len(ct_window) != 2 or not float(ct_window[1]) > float(ct_window[0]):
        raise MedMNISTError(f"--ct-window {list(ct_window)}: expected LOW HIGH with HIGH > LOW")
    overrides = _parse_modalities(modality)
    plans = [_plan(Path(p), overrides) for p in npz]
    seen: dict[str, Path] = {}
    for plan in plans:
        if plan.flag in seen:
            raise MedMNISTError(f"{plan.npz}: {plan.flag} is also given as {seen[plan.flag]}; convert one size per "
                                "folder (the union would hold the same images twice)")
        seen[plan.flag] = plan.npz
    used = {p.flag for p in plans} | {p.stem.lower() for p in plans}
    for name in overrides:
        if name not in used:
            raise MedMNISTError(f"--modality {name}=...: no --npz file is subset {name!r}")
    out = Path(out)
    for plan in plans:
        existing = out / plan.stem / "datalist.json"
        if existing.exists() and not force:
            raise MedMNISTError(f"{existing}: {plan.stem} was converted before; pass --force to convert it again")
    for plan in plans:
        datalist = _convert(plan, out, limit, int(workers), tuple(ct_window))
        _write_json(out / plan.stem / "task.json", task_config(datalist))
        _write_json(out / plan.stem / "datalist.json", datalist)
        counts = ", ".join(f"{s} {len(datalist[s])}" for _, s in SPLITS)
        print(f"{plan.stem}: {plan.modality} {plan.subset.dim}D, {counts} -> {out / plan.stem / 'datalist.json'}")
    union = union_datalist(out)
    _write_json(out / "datalist.json", union)
    counts = ", ".join(f"{s} {len(union[s])}" for _, s in SPLITS)
    print(f"union of {len(union['subsets'])} subset(s) ({', '.join(union['subsets'])}): {counts} -> "
          f"{out / 'datalist.json'}")
    return out / "datalist.json"


def main(argv: Sequence[str] | None = None) -> int:
    # argparse, not fire: fire keeps only the last of repeated flags (--npz a --npz b)
    parser = argparse.ArgumentParser(
        prog="prepare_medmnist.py",
        description="Convert MedMNIST v2 .npz files into PNG / NIfTI images and medssl datalists "
        "(see recipes/medmnist.md).",
    )
    parser.add_argument("--npz", action="append", required=True, metavar="FILE",
                        help="a MedMNIST v2 file, e.g. pathmnist_64.npz or organmnist3d.npz (repeat for several)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (DIR/<subset>/..., DIR/datalist.json)")
    parser.add_argument("--modality", action="append", default=[], metavar="NAME=MOD",
                        help="modality of subset NAME (CT, MR, XR, US, NM, PT, MG, PATH, FUNDUS); needed for "
                        "dermamnist, octmnist, adrenalmnist3d, vesselmnist3d and files that are no MedMNIST subset")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="convert only the first N items of each split (a quick try)")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="write images in N processes (0: in this one)")
    parser.add_argument("--force", action="store_true", help="convert again a subset already in DIR")
    parser.add_argument("--ct-window", type=float, nargs=2, default=(-1000.0, 1000.0), metavar=("LOW", "HIGH"),
                        help="HU window that 8-bit CT values are spread over (medssl's CT preset window)")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    args = parser.parse_args([a for a in argv if a != DEBUG_FLAG])
    try:
        prepare(args.npz, args.out, args.modality, args.limit, args.workers, args.force, args.ct_window)
    except Exception as e:  # noqa: BLE001 - a user mistake is one line (medssl.cli's rule); a bug keeps its traceback
        if debug or not is_user_error(e):
            raise
        print(f"error: {user_message(e)} ({DEBUG_FLAG} shows the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
