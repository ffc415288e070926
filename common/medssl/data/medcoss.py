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

from medssl.data.pipeline import load_items, make_dataset
from medssl.data.seeded import SampleKey, item_seed
from medssl.text import load_tokenizer, pack_text, read_labelled_reports, read_reports, train_wordpiece
from medssl.utils.dist import is_main_process

__all__ = [
    "TEXT_KIND", "stage_items", "FirstCropd", "RehearsalDataset", "read_buffers", "rehearsal_datasets",
    "table_loaders", "labelled_text_items", "text_inputs", "PackTextd", "text_tokenizer", "save_tokenizer",
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


# --------------------------------------------------------------------------------------------- text downstream
def labelled_text_items(
    source: str, section: str = "training", classes: Sequence[str] | None = None, max_items: int | None = None
) -> list[dict]:
    """Labelled text items ``{"text", "label"}``: a medssl JSON datalist's ``section`` (items with ``"text"`` and an
    int ``"label"``, e.g. the demo's ``datalist_sentences.json``), or a whole ``.csv`` / ``.jsonl`` file of labelled
    sentences (:func:`medssl.text.read_labelled_reports`; labels are class names from ``classes`` or indices)."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a JSON datalist with text items, or a .csv / .jsonl file)")
    if path.suffix.lower() == ".json":
        raw = stage_items("text", section, text_datalist=str(path))  # checks every item has text
        doc = json.loads(path.read_text(encoding="utf-8"))
        labels = [it.get("label") for it in doc.get(section, [])]
        bad = [i for i, v in enumerate(labels) if isinstance(v, bool) or not isinstance(v, int)]
        if bad:
            raise ValueError(f"{path} [{section}]: item {bad[0]} has no int 'label' ({len(bad)} such items)")
        items = [{"text": it["text"], "label": int(v)} for it, v in zip(raw, labels)]
    else:
        records, _ = read_labelled_reports(path, classes)
        items = [{"text": str(r["text"]), "label": int(r["label"])} for r in records]
    if classes is not None:
        out_of_range = [it["label"] for it in items if not 0 <= it["label"] < len(classes)]
        if out_of_range:
            raise ValueError(f"{path}: label {out_of_range[0]} is outside the {len(classes)} classes {list(classes)}")
    return items[: int(max_items)] if max_items is not None else items


def text_tokenizer(
    tokenizer_dir: str | None, texts: Sequence[str] | None = None, vocab_size: int = 30522, min_frequency: int = 2,
    max_length: int = 112,
) -> Any:
    """A tokenizer folder (the MedCoSS stage's ``tokenizer/`` for a pretrained encoder), or, with ``tokenizer_dir``
    null, a WordPiece vocabulary trained on ``texts`` (training from scratch)."""
    if tokenizer_dir:
        return load_tokenizer(tokenizer_dir, max_length)
    if not texts:
        raise ValueError("text_tokenizer: give tokenizer_dir (the pretrained encoder's tokenizer folder) or texts")
    return train_wordpiece(texts, vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                           max_length=int(max_length))


class PackTextd:
    """``input_ids`` and ``attention_mask`` (L,) -> ``data[key]`` (2, L) int64 (:func:`medssl.networks.pack_text`),
    the single input tensor of :class:`medssl.networks.MultiModalClassifier`."""

    def __init__(self, key: str = "image", ids_key: str = "input_ids", mask_key: str = "attention_mask") -> None:
        self.key, self.ids_key, self.mask_key = key, ids_key, mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        out[self.key] = pack_text(torch.as_tensor(out.pop(self.ids_key)), torch.as_tensor(out.pop(self.mask_key)))
        return out


def text_inputs(source: str, section: str = "test") -> list[dict]:
    """Texts to classify, each ``{"text", "case"}``: a JSON datalist's ``section`` (``case`` = the item's ``id`` or
    ``<section>_<index>``), or a report file / folder (:func:`medssl.text.read_reports`: ``.txt`` one a line,
    ``.jsonl`` / ``.csv`` with a text field, a folder of ``.txt``; ``case`` = ``<file stem>_<index>``)."""
    path = Path(source)
    if path.suffix.lower() == ".json" and path.is_file():
        doc = json.loads(path.read_text(encoding="utf-8"))
        raw = doc.get(section, []) if isinstance(doc, Mapping) else []
        items = stage_items("text", section, text_datalist=str(path))
        return [{"text": it["text"], "case": str(r.get("id", f"{section}_{i:05d}"))} for i, (it, r) in
                enumerate(zip(items, raw))]
    return [{"text": t, "case": f"{path.stem}_{i:05d}"} for i, t in enumerate(read_reports(path))]


def save_tokenizer(tokenizer: Any, folder: str) -> str:
    """Save ``tokenizer`` into ``folder`` on rank 0 (the folder a trained network's inference reads); returns it."""
    if is_main_process():
        tokenizer.save(folder)
    return folder
