"""A VinDr-CXR-style box CSV (``image_id, class_name, x_min, y_min, x_max, y_max``, one row per box) into a medssl
detection datalist (``python tools/datalist.py vindr``).

Rows whose class is ``no_finding_class`` (VinDr: ``"No finding"``) or whose coordinates are empty mark an image
without findings. Each image becomes one item ``{"image", "modality", "dim": 2, "boxes", "labels"}``; boxes keep the
CSV's pixel coordinates (x = column, y = row, as VinDr's DICOM pixel grid and medssl's (C, X, Y) arrays). VinDr has
three radiologists per training image (``rad_id``): every reader's boxes are kept (no merging), identical boxes of
one class once.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from pathlib import Path
from typing import Any

from .formats import SECTIONS

__all__ = ["vindr_csv_to_datalist"]

_COLUMNS = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")


def _coordinate(row: dict, key: str, where: str) -> float | None:
    text = (row.get(key) or "").strip()
    if text == "" or text.lower() == "nan":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: {key}={text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: {key}={text!r} is not finite")
    return value


def vindr_csv_to_datalist(
    csv_path: str | os.PathLike,
    image_dir: str | os.PathLike,
    out: str | os.PathLike,
    image_suffix: str = ".dicom",
    classes: list[str] | None = None,
    no_finding_class: str = "No finding",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    name: str | None = None,
) -> dict[str, Any]:
    """Write the datalist ``out`` from ``csv_path`` and return it.

    Args:
        csv_path: the CSV; needs the columns ``image_id, class_name, x_min, y_min, x_max, y_max`` (others ignored).
        image_dir: folder of the images, ``<image_id><image_suffix>``; paths are written relative to ``out``'s folder
            when inside it.
        classes: the finding classes in label order (default: the CSV's class names but ``no_finding_class``,
            sorted); a box of another class is an error naming its line.
        val_fraction, test_fraction, seed: a seeded random split of the images.
    """
    csv_path, out = Path(csv_path), Path(out)
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing columns {missing} (has {reader.fieldnames})")
        rows = [(line, row) for line, row in enumerate(reader, start=2)]
    boxes: dict[str, list[tuple[str, list[float]]]] = {}
    for line, row in rows:
        where = f"{csv_path}:{line}"
        image_id = (row["image_id"] or "").strip()
        if not image_id:
            raise ValueError(f"{where}: empty image_id")
        entries = boxes.setdefault(image_id, [])
        cls = (row["class_name"] or "").strip()
        coords = [_coordinate(row, key, where) for key in _COLUMNS[2:]]
        if cls == no_finding_class or all(c is None for c in coords):
            continue
        if any(c is None for c in coords):
            raise ValueError(f"{where}: {cls!r} box with an empty coordinate")
        entry = (cls, [float(c) for c in coords])
        if entry not in entries:
            entries.append(entry)
    names = list(classes) if classes else sorted({c for entries in boxes.values() for c, _ in entries})
    index = {c: i for i, c in enumerate(names)}
    unknown = sorted({c for entries in boxes.values() for c, _ in entries if c not in index})
    if unknown:
        raise ValueError(f"{csv_path}: classes {unknown} are not in classes={names}")
    ids = sorted(boxes)
    random.Random(seed).shuffle(ids)
    n_test, n_val = int(round(len(ids) * test_fraction)), int(round(len(ids) * val_fraction))
    split = {"test": ids[:n_test], "validation": ids[n_test:n_test + n_val], "training": ids[n_test + n_val:]}
    root = out.parent.resolve()
    sections: dict[str, list[dict]] = {s: [] for s in SECTIONS}
    for section, section_ids in split.items():
        for image_id in sorted(section_ids):
            image = (Path(image_dir) / f"{image_id}{image_suffix}").resolve()
            try:
                path = image.relative_to(root).as_posix()
            except ValueError:
                path = str(image)
            entries = boxes[image_id]
            sections[section].append({"image": path, "modality": "XR", "dim": 2,
                                       "boxes": [b for _, b in entries], "labels": [index[c] for c, _ in entries]})
    datalist = {
        "name": name or csv_path.stem,
        "description": f"detection datalist from {csv_path.name} (medssl.data.datalist.vindr): boxes [x1, y1, x2, y2] "
                       "in pixels (x = column), labels index detection_classes; items without boxes are normal",
        "detection_classes": names,
        **{f"num{s.capitalize()}": len(sections[s]) for s in SECTIONS},
        **sections,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text(json.dumps(datalist, indent=1) + "\n")
    os.replace(temporary, out)
    return datalist
