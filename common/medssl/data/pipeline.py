"""The data pipeline every pretraining bundle wires: datalist items → loading transforms → dataset → loader.

Bundles configure it with three calls (configs stay wiring only):

- :func:`load_items` reads one section of a datalist (paths resolved against ``dataset_dir``), keeps the items of
  the requested dimensions / modalities and only the keys the pipeline uses, and fails early with the datalist's
  name when nothing is left;
- :func:`loading_transforms` is the deterministic front of every pipeline: read with MONAI's readers
  (:class:`~medssl.data.readers.LoadMedicalImaged`: DICOM series sorted by position and in HU, 3D volumes in RAS
  with the depth axis last), make the channel count uniform (grey / RGB mixed datasets batch together), apply the
  modality's intensity preset (:class:`~medssl.data.presets.ModalityIntensityd`);
- :func:`make_dataset` wraps a MONAI ``Dataset`` (or ``CacheDataset``, which caches the deterministic front) in
  :class:`~medssl.data.samplers.SeededDataset` (augmentations seeded per item and epoch by the batch sampler's
  ``SampleKey``) and :class:`~medssl.data.robust.SafeDataset` (an unreadable file is reported with the datalist
  item, its path and the reader's error; ``on_bad_item="skip"`` replaces it and counts up to ``max_bad_items``).

The batch sampler (``medssl.data.samplers``) and MONAI's ``DataLoader`` complete the pipeline in the bundle config.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.data import CacheDataset, Dataset

from .datalist import load_datalist
from .presets import ModalityIntensityd
from .readers import EnsureChannelsd, LoadMedicalImaged
from .robust import SafeDataset
from .samplers import SeededDataset

__all__ = ["load_items", "loading_transforms", "make_dataset", "PIPELINE_KEYS"]

logger = logging.getLogger(__name__)

#: item keys the pretraining pipeline keeps by default (labels are added by methods that use them)
PIPELINE_KEYS = ("image", "modality", "dim")


def load_items(
    datalist: str | Path,
    section: str = "training",
    dataset_dir: str | Path | None = None,
    dims: Sequence[int] | int | None = None,
    modalities: Sequence[str] | None = None,
    keys: Sequence[str] | None = PIPELINE_KEYS,
    labelled_only: bool | str = False,
    max_items: int | None = None,
    allow_empty: bool = False,
) -> list[dict]:
    """Items of one datalist section for a pipeline.

    Args:
        datalist: the datalist JSON (format in the README).
        section: ``training`` / ``validation`` / ``test``.
        dataset_dir: root the relative paths are resolved against (default: the datalist's folder).
        dims: keep items of these spatial dimensions (2, 3 or both); None keeps all.
        modalities: keep these modalities (canonical codes); None keeps all.
        keys: item keys to keep (None keeps every key); ``label`` is kept when listed here.
        labelled_only: ``True`` keeps only items with a ``label``; ``"class"`` only items whose label is a class
            index (int) or a multi-label vector (list); ``"mask"`` only items whose label is a mask path.
        max_items: keep the first N (after filtering), for quick runs.
        allow_empty: return ``[]`` instead of raising when no item is left or the datalist has no such section
            (e.g. the labelled items of a kNN monitor, which turns itself off without them).
    """
    if allow_empty and not _has_section(datalist, section):
        return []
    items = load_datalist(datalist, section=section, dataset_dir=dataset_dir)
    if dims is not None:
        wanted_dims = {int(dims)} if isinstance(dims, int) else {int(d) for d in dims}
        items = [it for it in items if int(it.get("dim", 0)) in wanted_dims]
    if modalities is not None:
        wanted_mods = {str(m).upper() for m in modalities}
        items = [it for it in items if str(it.get("modality", "")).upper() in wanted_mods]
    if labelled_only:
        items = [it for it in items if _label_kind(it.get("label")) is not None]
        if labelled_only in ("class", "mask"):
            items = [it for it in items if _label_kind(it.get("label")) == labelled_only]
    if max_items is not None:
        items = items[: int(max_items)]
    if not items and allow_empty:
        return []
    if not items:
        raise ValueError(
            f"{datalist}: section {section!r} has no item with dims={dims}, modalities={modalities}, "
            f"labelled_only={labelled_only}"
        )
    if keys is not None:
        items = [{k: it[k] for k in keys if k in it} for it in items]
    counts: dict[str, int] = {}
    for it in items:
        tag = f"{it.get('modality', '?')}/{it.get('dim', '?')}D"
        counts[tag] = counts.get(tag, 0) + 1
    logger.info("%s [%s]: %d items (%s)", Path(datalist).name, section, len(items), ", ".join(
        f"{k}: {v}" for k, v in sorted(counts.items())))
    return items


def _has_section(datalist: str | Path, section: str) -> bool:
    """Whether ``datalist`` has a ``section`` list; True when it cannot be read (load_datalist then says why)."""
    import json

    try:
        return isinstance(json.loads(Path(datalist).read_text(encoding="utf-8")).get(section), list)
    except (OSError, ValueError, AttributeError):
        return True


def _label_kind(label: Any) -> str | None:
    """``"class"`` for a class index / multi-label vector, ``"mask"`` for a mask path, None for no label."""
    if label is None:
        return None
    if isinstance(label, str):
        return "mask"
    if isinstance(label, (bool, int, float)) or (isinstance(label, (list, tuple)) and all(
            isinstance(v, (bool, int, float)) for v in label)):
        return "class"
    return None


def loading_transforms(
    keys: Sequence[str] | str = ("image",),
    channels: int | None = 1,
    ct_window: Sequence[float] = (-1000.0, 1000.0),
    mr_percentiles: Sequence[float] = (0.5, 99.5),
    xr_percentiles: Sequence[float] = (0.5, 99.5),
    orientation: str | None = "RAS",
    intensity: bool = True,
) -> list:
    """The deterministic front of a pipeline: read, uniform channel count, modality intensity preset.

    Returns a list of MONAI transforms, to be extended with a bundle's augmentations (``Compose(front + augs)``).
    ``channels=None`` keeps each image's own channel count (only safe when every image has the same).
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    transforms: list[Any] = [LoadMedicalImaged(keys=keys, orientation=orientation)]
    if channels is not None:
        transforms.append(EnsureChannelsd(keys=keys, channels=channels))
    if intensity:
        transforms.append(
            ModalityIntensityd(
                keys=keys, ct_window=tuple(ct_window), mr_percentiles=tuple(mr_percentiles),
                xr_percentiles=tuple(xr_percentiles),
            )
        )
    return transforms


def make_dataset(
    items: Sequence[dict],
    transform: Any,
    cache_rate: float = 0.0,
    cache_num_workers: int = 0,
    on_bad_item: str = "raise",
    max_bad_items: int = 10,
    datalist_name: str | None = None,
    index_key: str | None = None,
):
    """``SafeDataset(SeededDataset(Dataset | CacheDataset))`` over ``items``.

    ``cache_rate > 0`` caches the deterministic front of ``transform`` in memory (MONAI ``CacheDataset``); a file that
    fails while the cache is filled raises there, before training — run ``tools/datalist.py check`` first.
    ``on_bad_item``: ``"raise"`` (default: stop at the first unreadable file, naming it) or ``"skip"`` (replace it by
    another item of the same modality and dimension, warn, and stop after ``max_bad_items`` distinct bad files).
    ``index_key`` (e.g. ``"index"``): put each sample's dataset index under that key (DeepCluster-v2's memory bank).
    """
    items = list(items)
    if cache_rate and cache_rate > 0:
        base = CacheDataset(data=items, transform=transform, cache_rate=cache_rate, num_workers=cache_num_workers)
    else:
        base = Dataset(data=items, transform=transform)
    return SafeDataset(
        SeededDataset(base, index_key=index_key), on_error=on_bad_item, max_skipped=max_bad_items, datalist_name=datalist_name
    )
