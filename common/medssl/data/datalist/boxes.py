"""Detection items: checks of their ``"boxes"`` / ``"labels"`` (``tools/datalist.py check``).

A detection item carries ``"boxes": [[x1, y1, x2, y2], ...]`` in image pixels (x = column, y = row: the order of
the (X, Y) spatial shape medssl's readers and :func:`medssl.data.datalist.inspect_image` give for 2D images) and
``"labels": [class index, ...]``; the datalist may name the classes in ``"detection_classes"``. No boxes (absent or
``[]``) is a normal image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["box_problems", "has_boxes"]


def has_boxes(item: Any) -> bool:
    """True when the item is a detection item (it has a ``"boxes"`` or ``"labels"`` list key)."""
    return isinstance(item, dict) and ("boxes" in item or (isinstance(item.get("labels"), list)))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def box_problems(boxes: Any, labels: Any, spatial_shape: Sequence[int] | None = None,
                 num_classes: int | None = None) -> list[str]:
    """One message per fault of an item's boxes: not a list of [x1, y1, x2, y2] numbers, a non-positive width or
    height, outside the image (``spatial_shape`` = (X, Y) = (width, height); not checked when None), a label that
    is not a known class index (0 .. ``num_classes`` - 1; any integer >= 0 when ``num_classes`` is None), and
    boxes and labels of different lengths. Each message names the box by its index and coordinates."""
    boxes = [] if boxes is None else boxes
    labels = [] if labels is None else labels
    if not isinstance(boxes, list):
        return [f'"boxes" must be a list of [x1, y1, x2, y2], got {boxes!r}']
    if not isinstance(labels, list):
        return [f'"labels" must be a list of class indices, got {labels!r}']
    problems = []
    if len(boxes) != len(labels):
        problems.append(f"{len(boxes)} boxes but {len(labels)} labels")
    for i, box in enumerate(boxes):
        if not isinstance(box, list) or len(box) != 4 or not all(_number(v) for v in box):
            problems.append(f"box {i} {box!r}: not [x1, y1, x2, y2] (four finite numbers)")
            continue
        x1, y1, x2, y2 = box
        if x2 <= x1 or y2 <= y1:
            problems.append(f"box {i} {box}: not a positive size (width {x2 - x1:g}, height {y2 - y1:g})")
        if spatial_shape is not None and len(spatial_shape) >= 2:
            width, height = spatial_shape[0], spatial_shape[1]
            if min(x1, y1) < 0 or x2 > width or y2 > height:
                problems.append(f"box {i} {box}: outside the image (width {width}, height {height})")
    for i, label in enumerate(labels):
        known = isinstance(label, int) and not isinstance(label, bool) and label >= 0
        if known and num_classes is not None:
            known = label < num_classes
        if not known:
            what = f"0..{num_classes - 1}" if num_classes is not None else "an integer >= 0"
            problems.append(f"label {i} = {label!r}: not a known class ({what})")
    return problems
