"""Data pieces of MedCoSS's continual stages (bundle ``ssl_medcoss_continual_pretrain``).

- :func:`stage_items`: a stage's items: report text from a text datalist (items ``{"text": ...}``, e.g. the demo's
  ``datalist_reports.json``) or images / volumes of the stage's modalities from an image datalist.
- :class:`FirstCropd`: the single crop of a :class:`medssl.transforms.MultiCropd` as the image.
- :class:`RehearsalDataset`: each training sample of the current modality with one sample of every earlier stage's
  rehearsal buffer under ``"buffer"`` (a list, one single-modality entry per earlier stage), so the default collate
  gives the method one sub-batch per earlier modality (ours: the reference draws buffer batches from a second
  loader; here they follow the batch sampler's keys, so resuming and two processes stay exact).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.transforms import MapTransform

from medssl.data.pipeline import load_items
from medssl.data.seeded import SampleKey, item_seed

__all__ = [
    "TEXT_KIND", "stage_items", "FirstCropd", "RehearsalDataset", "read_buffers", "rehearsal_datasets",
    "table_loaders",
]

TEXT_KIND = "text"


def stage_items(
    kind: str,
    section: str,
    datalist: str | None = None,
    dataset_dir: str | None = None,
    modalities: Sequence[str] | None = None,
    text_datalist: str | None = None,
    max_items: int | None = None,
    allow_empty: bool = False,
) -> list[dict]:
    """The items of one stage and section: ``kind == "text"`` reads ``text_datalist`` (items with ``"text"``), the
    image kinds read ``datalist`` filtered by ``modalities`` and dimension (``"2d"`` -> 2, ``"3d"`` -> 3)."""
    if kind == TEXT_KIND:
        if not text_datalist:
            raise ValueError("MedCoSS text stage: give text_datalist, a datalist whose items have a 'text' field")
        path = Path(text_datalist)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such text datalist (the reports of the text stage)")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a JSON datalist ({error})") from None
        raw = doc.get(section, []) if isinstance(doc, Mapping) else []
        bad = [i for i, it in enumerate(raw) if not isinstance(it, Mapping) or not str(it.get("text", "")).strip()]
        if bad:
            raise ValueError(f"{path} [{section}]: item {bad[0]} has no 'text' ({len(bad)} such items)")
        items = [{"text": str(it["text"]), "modality": "TEXT", "dim": 1} for it in raw]
        if max_items is not None:
            items = items[: int(max_items)]
        if not items and not allow_empty:
            raise ValueError(f"{path}: no items in section {section!r}")
        return items
    if kind not in ("2d", "3d"):
        raise ValueError(f"MedCoSS: stage kind must be 'text', '2d' or '3d', got {kind!r}")
    if not datalist:
        raise ValueError("MedCoSS image stage: give the image datalist")
    return load_items(
        datalist, section, dataset_dir, dims=[2 if kind == "2d" else 3], modalities=modalities,
        keys=["image", "modality", "dim"], max_items=max_items, allow_empty=allow_empty,
    )


class FirstCropd(MapTransform):
    """``data[crops_key][0]`` as ``data[key]`` (the one random-resized crop of a ``MultiCropd``), crops removed."""

    def __init__(self, keys: str = "image", crops_key: str = "crops") -> None:
        super().__init__(keys)
        self.crops_key = crops_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        crops = out.pop(self.crops_key)
        for key in self.keys:
            out[key] = crops[0]
        return out


def read_buffers(stage_dir: str | None) -> list[dict]:
    """The rehearsal buffers an earlier stage handed on (``<stage_dir>/buffers.json``: ``[{"stage", "kind",
    "datalist"}, ...]``, every stage up to that one); ``[]`` without a previous stage."""
    if not stage_dir:
        return []
    path = Path(stage_dir) / "buffers.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the previous stage left no rehearsal buffers (did it finish? its folder holds stage_done.json "
            "when it did)"
        )
    return json.loads(path.read_text())


class RehearsalDataset(torch.utils.data.Dataset):
    """See the module docstring. ``current``: the stage's dataset (indexed by ``SampleKey`` or int);
    ``buffers``: ``[(name, kind, dataset), ...]`` of the earlier stages. Buffer sample ``j`` of entry ``m`` is drawn
    from the current key's seed, so it changes every epoch and is the same on a resume."""

    def __init__(self, current: Any, buffers: Sequence[tuple[str, str, Any]] = (), buffer_key: str = "buffer") -> None:
        self.current, self.buffers, self.buffer_key = current, list(buffers), buffer_key
        empty = [name for name, _, ds in self.buffers if len(ds) == 0]
        if empty:
            raise ValueError(f"RehearsalDataset: the rehearsal buffer of stage {empty[0]} is empty")

    @property
    def data(self) -> Any:
        return getattr(self.current, "data", None)

    def __len__(self) -> int:
        return len(self.current)

    def __getitem__(self, key: Any) -> dict:
        sample = dict(self.current[key])
        if not self.buffers:
            return sample
        seed = int(key.seed) if isinstance(key, SampleKey) else int(key)
        subs = []
        for m, (name, kind, dataset) in enumerate(self.buffers):
            draw = item_seed(seed, m, 0)  # the buffer entry; its augmentations use a second draw
            sub = dict(dataset[SampleKey(draw % len(dataset), item_seed(seed, m, 1))])
            sub["kind"], sub["name"] = kind, name
            subs.append(sub)
        sample[self.buffer_key] = subs
        return sample


def rehearsal_datasets(
    previous_stage_dir: str | None, transforms_by_kind: Mapping[str, Sequence[Any]], on_bad_item: str = "raise",
    max_bad_items: int = 10, cache_rate: float = 1.0,
) -> list[tuple[str, str, Any]]:
    """``[(stage, kind, dataset), ...]`` of every buffer the previous stage handed on (:func:`read_buffers`), each a
    seeded dataset with its kind's training transforms. Buffers are about 5 % of a stage's items and every step
    draws from each, so by default their decoded items are cached in memory (``cache_rate``, MONAI
    ``CacheDataset``)."""
    from monai.transforms import Compose

    from medssl.data.pipeline import make_dataset

    out = []
    for entry in read_buffers(previous_stage_dir):
        path = Path(entry["datalist"])
        items = json.loads(path.read_text())["training"]
        dataset = make_dataset(items, Compose(list(transforms_by_kind[entry["kind"]])), cache_rate=cache_rate,
                               on_bad_item=on_bad_item, max_bad_items=max_bad_items, datalist_name=str(path))
        out.append((entry["stage"], entry["kind"], dataset))
    return out


def table_loaders(
    stages: Mapping[str, Mapping[str, Any]],
    order: Sequence[str],
    stage: str,
    transforms_by_kind: Mapping[str, Sequence[Any]],
    datalist: str | None,
    dataset_dir: str | None,
    text_datalist: str | None,
    batch_size: int,
    max_items: int | None,
) -> dict[str, Any]:
    """One loader of validation items (at most ``max_items``, no augmentation) for every stage up to ``stage``; a
    stage without validation items is left out of the stage table."""
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose

    order = list(order)
    loaders = {}
    for name in order[: order.index(stage) + 1]:
        spec = stages[name]
        items = stage_items(spec["kind"], "validation", datalist, dataset_dir, spec.get("modalities"), text_datalist,
                            max_items, allow_empty=True)
        if items:
            dataset = Dataset(items, Compose(list(transforms_by_kind[spec["kind"]])))
            loaders[name] = DataLoader(dataset, batch_size=int(batch_size), num_workers=0)
    return loaders
