"""Training datasets as bundle ``_target_`` components whose item list is the ``data`` argument.

MONAI tools edit a bundle's training data through the config id ``train#dataset#data`` (MONAI Label's ``/train/``
sets it to ``[{"image": ..., "label": ...}, ...]``; ``python -m monai.bundle run ... --train#dataset#data "[...]"``
does the same from a shell). A ``$medssl.data.make_dataset(...)`` expression has no such id, so every training
bundle declares its dataset as::

    "dataset": {"_target_": "medssl.data.bundle_datasets.bundle_dataset", "data": "@train#items",
                "transform": "@train#preprocessing", "defaults": {"modality": "XR", "dim": 2}, ...}

and its batch sampler counts ``@train#dataset`` (``len``) or reads ``@train#dataset.data`` (the items, defaults
filled in), never ``@train#items``, so an edited ``data`` drives the whole pipeline.

``defaults`` fills the keys an outside item list may lack: MONAI Label sends neither ``modality`` (the intensity
preset, the modality batch sampler) nor ``dim``; the bundle's own values (its metadata's modality, its spatial
dimension) stand in for them. A bare path is read as ``{"image": path}``.

Inference gets the same help: MONAI Label's ``/infer`` hands the bundle's ``preprocessing`` a dict without
``modality``; :class:`DefaultModalityd` first in the inference pre-processing sets the modality the bundle metadata
declares (:func:`metadata_modality`), so a CT volume gets its HU window and not the percentile preset, and says so.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .datalist import normalize_modality

from .pipeline import make_dataset
from .robust import SafeDataset
from .samplers import SeededDataset
from .slices import VolumeSliceDataset

__all__ = ["with_defaults", "bundle_dataset", "bundle_slice_dataset", "metadata_modality", "DefaultModalityd"]

logger = logging.getLogger(__name__)


def with_defaults(data: Sequence[Any], defaults: Mapping[str, Any] | None = None) -> list[dict]:
    """``data`` as a list of item dicts (a bare path becomes ``{"image": path}``), each missing key of ``defaults``
    filled in (an item's own value wins). Logs how many items got a default, so a user sees e.g. that the CT window
    was chosen from the bundle and not from the item."""
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
        raise TypeError(f"data must be a list of items (dicts or image paths), got {type(data).__name__}")
    items = []
    filled: dict[str, int] = {}
    for position, item in enumerate(data):
        if isinstance(item, str):
            item = {"image": item}
        if not isinstance(item, Mapping):
            raise TypeError(f"data[{position}] must be a dict or an image path, got {type(item).__name__}")
        item = dict(item)
        for key, value in (defaults or {}).items():
            if value is not None and item.get(key) is None:
                item[key] = value
                filled[key] = filled.get(key, 0) + 1
        items.append(item)
    if not items:
        raise ValueError("data is empty: the training dataset needs at least one item")
    logger.info("training data: %d items", len(items))
    for key, count in sorted(filled.items()):
        logger.info("%d of %d items had no %r: the bundle's %r used", count, len(items), key, defaults[key])
    return items


def bundle_dataset(
    data: Sequence[Any],
    transform: Any = None,
    defaults: Mapping[str, Any] | None = None,
    **dataset_kwargs: Any,
):
    """:func:`medssl.data.make_dataset` (seeded, robust to unreadable files, optionally cached in memory with
    ``cache_rate`` or on disk in ``cache_dir``) over ``data`` with ``defaults`` filled in; ``.data`` of the result is
    that item list. ``dataset_kwargs`` (``cache_rate``, ``cache_num_workers``, ``on_bad_item``, ``max_bad_items``,
    ``datalist_name``, ``index_key``, ``cache_dir``) go to :func:`~medssl.data.make_dataset` as given."""
    return make_dataset(with_defaults(data, defaults), transform, **dataset_kwargs)


def bundle_slice_dataset(
    data: Sequence[Any],
    volume_transform: Any,
    slice_transform: Any = None,
    defaults: Mapping[str, Any] | None = None,
    on_bad_item: str = "raise",
    max_bad_items: int = 10,
    datalist_name: str | None = None,
    index_key: str | None = None,
    **slice_kwargs: Any,
):
    """``SafeDataset(SeededDataset(VolumeSliceDataset))`` over ``data`` (2D images as they are, the slices of 3D
    volumes), ``defaults`` filled in. ``slice_kwargs`` go to :class:`~medssl.data.VolumeSliceDataset`
    (``slices_per_volume``, ``cache_rate``...). Attributes of the slice dataset (``volume_ids``, ``lru_limited``)
    are reachable through the wrappers, so :func:`medssl.data.make_slice_batch_sampler` takes the result."""
    slices = VolumeSliceDataset(
        with_defaults(data, defaults), volume_transform, slice_transform, source=datalist_name or "datalist",
        on_error=on_bad_item, max_skipped=max_bad_items, **slice_kwargs,
    )
    return SafeDataset(
        SeededDataset(slices, index_key=index_key), on_error=on_bad_item, max_skipped=max_bad_items,
        datalist_name=datalist_name,
    )


def metadata_modality(bundle_root: str | Path, input_key: str = "image") -> str:
    """The modality a bundle's ``configs/metadata.json`` declares for its input (``network_data_format.inputs.<key>
    .modality``), normalised (``"XR"``, ``"CT"``...); of a list such as ``"CT / MR"`` the first one."""
    path = Path(bundle_root) / "configs" / "metadata.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    declared = meta.get("network_data_format", {}).get("inputs", {}).get(input_key, {}).get("modality")
    if not declared:
        raise ValueError(f"{path}: network_data_format.inputs.{input_key}.modality is not set")
    first = str(declared).replace(",", "/").split("/")[0].strip()
    return normalize_modality(first)


class DefaultModalityd:
    """Set ``d[modality_key] = modality`` when an item has none, with a log line naming the image, the modality used
    and where it comes from (``source``, e.g. "the bundle metadata"). Put it before
    :class:`medssl.data.ModalityIntensityd` (before :func:`medssl.data.loading_transforms`)."""

    def __init__(self, modality: str, source: str = "the bundle metadata", modality_key: str = "modality",
                 image_key: str = "image") -> None:
        self.modality = normalize_modality(modality)
        self.source, self.modality_key, self.image_key = source, modality_key, image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get(self.modality_key) in (None, ""):
            d[self.modality_key] = self.modality
            image = d.get(self.image_key)
            name = image if isinstance(image, (str, Path)) else "the image"
            logger.info(f"{name}: no {self.modality_key!r} given: {self.modality} from {self.source} (its intensity "
                        "preset applies)")
        return d
