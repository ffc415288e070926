"""Label-fraction subsets of a training set: the seeds' "x % of the labels" experiments, seeded and stratified."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["label_fraction_subset", "stratum_of"]


def stratum_of(label: Any, where: str = "item") -> int:
    """The stratum of a classification label: the class index of an int label, the first positive class of a
    multi-label vector (``-1`` when no class is positive). A ValueError naming ``where`` for anything else."""
    if isinstance(label, (bool, np.bool_)):
        return int(label)
    if isinstance(label, (int, np.integer)):
        return int(label)
    if hasattr(label, "tolist") and not isinstance(label, (str, bytes)):
        label = label.tolist()
    if isinstance(label, (int, float)) and float(label).is_integer():
        return int(label)
    if isinstance(label, (list, tuple)) and all(isinstance(v, (bool, int, float)) for v in label):
        positives = [i for i, v in enumerate(label) if float(v) > 0]
        return positives[0] if positives else -1
    raise ValueError(
        f"{where}: label {label!r} is not a class index or a multi-label vector; stratified label fractions need "
        "class labels (use stratify=False for segmentation masks)"
    )


def label_fraction_subset(
    items: Sequence[dict],
    fraction: float,
    seed: int,
    stratify: bool = True,
    label_key: str = "label",
) -> list[dict]:
    """A seeded subset holding ``fraction`` of ``items`` (the seeds' label-fraction experiments: 0.2, 0.4, 1.0).

    Args:
        items: datalist items (dicts).
        fraction: in (0, 1]; 1.0 returns every item (a new list, same order).
        seed: the subset is a pure function of (items, fraction, seed, stratify).
        stratify: draw within each class (an int label's class, a multi-label vector's first positive class, the
            vectors without a positive class together): ``max(1, round(fraction * n_c))`` of the ``n_c`` items of
            class c, so every class keeps at least one item and the class balance is kept. False: ``max(1,
            round(fraction * N))`` items drawn from all (e.g. segmentation items whose label is a mask path).
        label_key: the item key holding the label (stratify only).

    Returns:
        the chosen items in their original order.

    Raises:
        ValueError: ``fraction`` outside (0, 1], no items, or (stratify) an item without a class label.
    """
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"label_fraction={fraction!r}: expected a number in (0, 1]") from None
    if not (0.0 < fraction <= 1.0) or math.isnan(fraction):
        raise ValueError(f"label_fraction={fraction}: expected a number in (0, 1] (1.0 = every labelled item)")
    items = list(items)
    if not items:
        raise ValueError("label_fraction_subset: no items to draw from")
    if fraction == 1.0:
        return items
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x1ABE1]))
    if not stratify:
        n_keep = max(1, int(round(fraction * len(items))))
        chosen = rng.choice(len(items), size=n_keep, replace=False)
        return [items[i] for i in sorted(int(i) for i in chosen)]
    strata: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        if label_key not in item or item[label_key] is None:
            raise ValueError(
                f"label_fraction_subset: item {index} ({item.get('image', '?')}) has no {label_key!r}; stratified "
                "label fractions need a class label on every item"
            )
        stratum = stratum_of(item[label_key], where=f"item {index} ({item.get('image', '?')})")
        strata.setdefault(stratum, []).append(index)
    chosen_indices: list[int] = []
    for stratum in sorted(strata):  # a fixed order of draws: the subset does not depend on dict order
        members = strata[stratum]
        n_keep = max(1, int(round(fraction * len(members))))
        picked = rng.choice(len(members), size=n_keep, replace=False)
        chosen_indices.extend(members[int(i)] for i in picked)
    return [items[i] for i in sorted(chosen_indices)]
