"""The detection part of the demo dataset: chest-X-ray-like PNG images with box lesions of three kinds
(``DETECTION_CLASSES``) and normal images without boxes, and their datalist ``datalist_detection_2d.json``.

Deterministic from the seed (numpy only; about 20 ms per 128 x 128 image). Items:
``{"image": "synthetic/xr_detect/xrdet_NNN.png", "modality": "XR", "dim": 2, "boxes": [[x1, y1, x2, y2], ...],
"labels": [...]}``; ``labels`` index ``DETECTION_CLASSES`` (the datalist's ``"detection_classes"``).

Box coordinates: pixels of the PNG, x = column, y = row, ``x1, y1`` the top-left pixel corner and ``x2, y2`` the
corner after the last pixel (a box of one pixel at column c, row r is ``[c, r, c + 1, r + 1]``). MONAI's PNG
reader (and ``medssl.data.LoadMedicalImaged``) returns the image as ``(C, X, Y) = (C, W, H)``, the column index first,
so the box's ``[x1, y1, x2, y2]`` indexes the loaded array as ``array[:, x1:x2, y1:y2]``: MONAI's detection
transforms and ``RetinaNetDetector`` read boxes in that array order. (The numpy array written to the PNG is
(H, W) = (row, column): there the same lesion is ``png[y1:y2, x1:x2]``.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .demo.generators import _rng, synthetic_chest_xr_organs

__all__ = ["DETECTION_CLASSES", "DETECTION_DATALIST", "DETECTION_FOLDER", "DETECTION_SPLIT", "synthetic_xr_lesions",
           "build_detection_set", "detection_set_is_current"]

#: lesion kinds (``labels`` index this tuple)
DETECTION_CLASSES = ("nodule", "mass", "opacity")
DETECTION_DATALIST = "datalist_detection_2d.json"
DETECTION_FOLDER = "synthetic/xr_detect"
#: images per section (training, validation, test); every fourth image is normal (no box)
DETECTION_SPLIT = (48, 12, 12)
_SECTIONS = ("training", "validation", "test")
_GROUP = 21  # random-stream group of these images (the demo builder's groups are 1 .. 9)
_VERSION = "1"


def _lesion(rng: np.random.Generator, kind: str, rows: np.ndarray, cols: np.ndarray, centre: tuple[float, float]
            ) -> tuple[np.ndarray, float]:
    """(profile in [0, 1] over the image, peak contrast) of one lesion of ``kind`` centred at (row, col)."""
    r0, c0 = centre
    if kind == "nodule":  # small, round, sharp-edged, dense
        radius = rng.uniform(3.0, 5.0)
        d = np.hypot(rows - r0, cols - c0) / radius
        return np.exp(-0.5 * d ** 6), rng.uniform(0.28, 0.36)
    if kind == "mass":  # large, lobulated
        radius = rng.uniform(8.0, 12.0)
        angle = np.arctan2(rows - r0, cols - c0)
        lobes = 1.0 + 0.12 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi))
        d = np.hypot(rows - r0, cols - c0) / (radius * lobes)
        return np.exp(-0.5 * d ** 4), rng.uniform(0.22, 0.3)
    # opacity: elongated, faint, soft-edged, tilted
    a, b = rng.uniform(8.0, 12.0), rng.uniform(3.5, 5.5)
    theta = rng.uniform(-0.6, 0.6)
    du, dv = cols - c0, rows - r0
    along = du * np.cos(theta) + dv * np.sin(theta)
    across = -du * np.sin(theta) + dv * np.cos(theta)
    d = np.hypot(along / a, across / b)
    return np.exp(-0.5 * d ** 2 * 2.0), rng.uniform(0.16, 0.22)


def synthetic_xr_lesions(rng: np.random.Generator, normal: bool, size: int = 128
                         ) -> tuple[np.ndarray, list[list[int]], list[int]]:
    """A chest-X-ray-like image (the demo's phantom, :func:`synthetic_chest_xr_organs`) with 1-3 box lesions inside
    the lung fields, or none when ``normal``. Returns (image uint8 (H, W), boxes ``[[x1, y1, x2, y2], ...]`` in
    pixels (x = column, module docstring), labels (indices of ``DETECTION_CLASSES``)). A lesion's box is where
    its profile exceeds half its peak, rounded out to whole pixels."""
    image_u8, organs = synthetic_chest_xr_organs(rng, size)
    image = image_u8.astype(np.float64) / 255.0
    boxes: list[list[int]] = []
    labels: list[int] = []
    if not normal:
        rows, cols = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
        lung_r, lung_c = np.nonzero(organs == 1)
        for _ in range(int(rng.integers(1, 4))):
            label = int(rng.integers(0, len(DETECTION_CLASSES)))
            for _attempt in range(20):  # a centre in the lungs, the lesion apart from the earlier ones
                pick = int(rng.integers(0, len(lung_r)))
                centre = (float(lung_r[pick]), float(lung_c[pick]))
                profile, contrast = _lesion(rng, DETECTION_CLASSES[label], rows, cols, centre)
                inside = profile > 0.5
                r_idx, c_idx = np.nonzero(inside)
                if len(r_idx) == 0:
                    continue
                box = [int(c_idx.min()), int(r_idx.min()), int(c_idx.max()) + 1, int(r_idx.max()) + 1]
                if all(_iou(box, other) == 0.0 for other in boxes):
                    break
            else:
                continue
            image = image + contrast * profile * (0.6 + 0.4 * (organs == 1))
            boxes.append(box)
            labels.append(label)
    image = np.clip(image, 0.0, 1.0)
    return np.round(image * 255.0).astype(np.uint8), boxes, labels


def _iou(a: list[int], b: list[int]) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _builder_info(seed: int) -> dict[str, Any]:
    return {"module": "medssl.data.detection_demo", "version": _VERSION, "seed": int(seed)}


def detection_set_is_current(out: str | os.PathLike, seed: int) -> bool:
    """True when ``out/datalist_detection_2d.json`` was built by this version with ``seed`` and its images exist."""
    out = Path(out)
    try:
        datalist = json.loads((out / DETECTION_DATALIST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(datalist, dict) or datalist.get("builder") != _builder_info(seed):
        return False
    return all((out / item["image"]).is_file() for s in _SECTIONS for item in datalist.get(s, []))


def build_detection_set(out: str | os.PathLike, seed: int = 0) -> Path:
    """Write the images under ``out/synthetic/xr_detect/`` and ``out/datalist_detection_2d.json`` (last, atomically);
    returns the datalist's path. Image ``i`` is drawn from its own random stream (seed, group, i)."""
    out = Path(out)
    folder = out / DETECTION_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    sections: dict[str, list[dict[str, Any]]] = {s: [] for s in _SECTIONS}
    index = 0
    for section, count in zip(_SECTIONS, DETECTION_SPLIT):
        for k in range(count):
            image, boxes, labels = synthetic_xr_lesions(_rng(seed, _GROUP, index), normal=(k % 4 == 3))
            path = folder / f"xrdet_{index:03d}.png"
            Image.fromarray(image).save(path)
            sections[section].append({"image": path.relative_to(out).as_posix(), "modality": "XR", "dim": 2,
                                      "boxes": boxes, "labels": labels})
            index += 1
    datalist = {
        "name": "medssl-demo-detection",
        "description": (
            "medssl demo dataset, chest-X-ray-like images with box lesions (every fourth image normal, no box). "
            "'boxes' are [x1, y1, x2, y2] in pixels, x = column, y = row, corners of pixel edges (x2, y2 "
            "exclusive); 'labels' index 'detection_classes'. See medssl.data.detection_demo."
        ),
        "builder": _builder_info(seed),
        "detection_classes": list(DETECTION_CLASSES),
        "numTraining": len(sections["training"]),
        "numValidation": len(sections["validation"]),
        "numTest": len(sections["test"]),
        **sections,
    }
    target = out / DETECTION_DATALIST
    temporary = out / f"{DETECTION_DATALIST}.tmp"
    temporary.write_text(json.dumps(datalist, indent=1) + "\n")
    os.replace(temporary, target)
    return target
