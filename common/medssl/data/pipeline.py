"""The data pipeline every pretraining bundle wires: datalist items → loading transforms → dataset → loader.

Bundles configure it with three calls (configs stay wiring only):

- :func:`load_items` reads one section of a datalist (paths resolved against ``dataset_dir``), keeps the items of
  the requested dimensions / modalities and only the keys the pipeline uses, and fails early with the datalist's
  name when nothing is left;
- :func:`loading_transforms` is the deterministic front of every pipeline: read with MONAI's readers
  (:class:`~medssl.data.readers.LoadMedicalImaged`: DICOM series sorted by position and in HU, 3D volumes in RAS
  with the depth axis last), make the channel count uniform (grey / RGB mixed datasets batch together), apply the
  modality's intensity preset (:class:`~medssl.data.presets.ModalityIntensityd`);
- :func:`make_dataset` wraps a MONAI ``Dataset`` (or ``CacheDataset`` / ``PersistentDataset``, which cache the
  deterministic front in memory / on disk) in
  :class:`~medssl.data.samplers.SeededDataset` (augmentations seeded per item and epoch by the batch sampler's
  ``SampleKey``) and :class:`~medssl.data.robust.SafeDataset` (an unreadable file is reported with the datalist
  item, its path and the reader's error; ``on_bad_item="skip"`` replaces it and counts up to ``max_bad_items``).

The batch sampler (``medssl.data.samplers``) and MONAI's ``DataLoader`` complete the pipeline in the bundle config.

Decoded-item cache (``make_dataset(..., cache_dir=...)``, a bundle's ``cache_dir`` key; default None = off): MONAI's
``PersistentDataset`` runs the deterministic front of the transform (every transform before the first random one:
read, orient, channels, intensity preset and, with ``loading_transforms(working_size=...)``, the resize to a working
size) once per item and stores the result as one ``.pt`` file in ``cache_dir``; later epochs and runs load that
file instead of decoding. The file name is a hash of the item's *content* (each path in the item is replaced by a
SHA-256 of the file's bytes -- of every file under it, for a DICOM series folder -- so a file edited in place gets a
new entry, and a dataset moved to another folder keeps its entries) followed by a hash of the front's *parameters*
(class names and attribute values, recursively; :func:`transform_fingerprint`), so a changed preset or working size
never reads stale entries. Stale entries are never deleted: remove the folder to reclaim the space. The entries
hold MONAI ``MetaTensor`` s (affine kept) and are read with ``torch.load(weights_only=False)``: point ``cache_dir``
at a folder only this user writes to. The folder may be shared by runs and by processes (entries are written to a
temporary file and renamed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Resized, SpatialPadd

from .datalist import load_datalist
from .presets import ModalityIntensityd
from .readers import EnsureChannelsd, LoadMedicalImaged
from .robust import SafeDataset
from .samplers import SampleKey, SeededDataset

__all__ = ["load_items", "loading_transforms", "make_dataset", "PIPELINE_KEYS", "item_fingerprint",
           "transform_fingerprint", "CACHE_FORMAT"]

#: part of every cache entry's name: bump when the stored format changes
CACHE_FORMAT = "medssl-decoded-v1"

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
    working_size: int | Sequence[int] | None = None,
) -> list:
    """The deterministic front of a pipeline: read, uniform channel count, modality intensity preset.

    Returns a list of MONAI transforms, to be extended with a bundle's augmentations (``Compose(front + augs)``).
    ``channels=None`` keeps each image's own channel count (only safe when every image has the same).
    ``working_size`` (default None: native size): resize so that the longest spatial side is ``working_size`` (one
    int; aspect kept, box-averaged "area" resampling), then pad the short sides at their end to that size with 0
    (the preset's minimum), so that every item has the same shape and a batch of them collates -- the input of the
    batched augmentations (``medssl.transforms.batched``). A sequence of one size per axis resizes to it exactly.
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
    if working_size is not None:
        if isinstance(working_size, Sequence):
            transforms.append(Resized(keys=keys, spatial_size=[int(v) for v in working_size], mode="area"))
        else:
            size = int(working_size)
            transforms.append(Resized(keys=keys, spatial_size=size, size_mode="longest", mode="area"))
            # an int spatial_size pads every spatial axis (2D or 3D alike) to it
            transforms.append(SpatialPadd(keys=keys, spatial_size=size, method="end", mode="constant", value=0.0))
    return transforms


# ------------------------------------------------------------------------------------------------ cache keys
_CONTENT_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (of every file under a folder, sorted by relative path), memoised per process on
    (path, size, mtime) so that the bytes are read once per worker."""
    stat = path.stat()
    memo_key = (str(path.resolve()), int(stat.st_size), int(stat.st_mtime_ns))
    if memo_key in _CONTENT_DIGESTS:
        return _CONTENT_DIGESTS[memo_key]
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    _CONTENT_DIGESTS[memo_key] = digest.hexdigest()
    return _CONTENT_DIGESTS[memo_key]


def _looks_like_path(value: Any) -> bool:
    """A path object, or a string with a folder separator (a bare word such as a modality code "CT" is a value, even
    when the working folder happens to hold a file of that name)."""
    if isinstance(value, os.PathLike):
        return True
    return isinstance(value, str) and bool(value) and (os.sep in value or "/" in value)


def _content_value(value: Any) -> Any:
    if _looks_like_path(value) and os.path.exists(value):
        return {"sha256": _file_digest(Path(value))}
    if isinstance(value, Mapping):
        return {str(k): _content_value(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_content_value(v) for v in value]
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    return repr(value)


def item_fingerprint(item: Any) -> bytes:
    """The cache key of a datalist item: a SHA-256 (hex, as bytes) of the item with every existing path (a value with
    a folder separator) replaced by the SHA-256 of its content, other values as they are (modality, dim, label...)."""
    text = json.dumps(_content_value(item), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest().encode("utf-8")


def _describe(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of a transform's parameters, stable across processes (no ids / addresses)."""
    if depth > 6:
        return type(value).__qualname__
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_describe(v, depth + 1) for v in items]
    if isinstance(value, np.ndarray) or isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        return {"array": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(), "shape": list(array.shape)}
    if isinstance(value, (np.generic, torch.dtype, np.dtype, type)):
        return str(value)
    if callable(value) and not hasattr(value, "__dict__"):
        return getattr(value, "__qualname__", type(value).__qualname__)
    attributes = getattr(value, "__dict__", None)
    if attributes is None:
        return type(value).__qualname__
    public = {k: v for k, v in attributes.items() if not k.startswith("_") and k != "R"}
    # the attribute values one level below the mapping they form (as before), so deep objects stop at a name
    described = {str(k): _describe(v, depth + 2) for k, v in sorted(public.items(), key=lambda kv: str(kv[0]))}
    return {"class": f"{type(value).__module__}.{type(value).__qualname__}", **described}


def transform_fingerprint(transforms: Sequence[Any]) -> bytes:
    """A hash of the deterministic transforms' classes and public attribute values (recursively), with
    :data:`CACHE_FORMAT`: the part of a cache entry's name that changes when the preprocessing changes."""
    text = json.dumps([CACHE_FORMAT] + [_describe(t) for t in transforms], sort_keys=True, default=repr)
    return ("-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]).encode("utf-8")


class _SeedInSample(torch.utils.data.Dataset):
    """``dataset[SampleKey]`` with the key's seed added under ``seed_key`` (a copy of the sample dict): the batched
    augmentations draw each item's parameters from it."""

    def __init__(self, dataset: Any, seed_key: str) -> None:
        self.dataset = dataset
        self.seed_key = seed_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        sample = self.dataset[key]
        if isinstance(key, SampleKey) and isinstance(sample, dict):
            return {**sample, self.seed_key: int(key.seed)}
        return sample

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def make_dataset(
    items: Sequence[dict],
    transform: Any,
    cache_rate: float = 0.0,
    cache_num_workers: int = 0,
    on_bad_item: str = "raise",
    max_bad_items: int = 10,
    datalist_name: str | None = None,
    index_key: str | None = None,
    cache_dir: str | Path | None = None,
    seed_key: str | None = None,
):
    """``SafeDataset(SeededDataset(Dataset | CacheDataset | PersistentDataset))`` over ``items``.

    ``cache_rate > 0`` caches the deterministic front of ``transform`` in memory (MONAI ``CacheDataset``); a file that
    fails while the cache is filled raises there, before training — run ``tools/datalist.py check`` first.
    ``on_bad_item``: ``"raise"`` (default: stop at the first unreadable file, naming it) or ``"skip"`` (replace it by
    another item of the same modality and dimension, warn, and stop after ``max_bad_items`` distinct bad files).
    ``index_key`` (e.g. ``"index"``): put each sample's dataset index under that key (DeepCluster-v2's memory bank).
    ``cache_dir`` (default None = off): cache the deterministic front on disk in that folder (MONAI
    ``PersistentDataset``, keyed by item content + preprocessing; see the module docstring); not with ``cache_rate``.
    ``seed_key`` (e.g. ``"seed"``): put each sample's ``SampleKey`` seed under that key (the batched augmentations
    of ``medssl.transforms.batched`` draw the item's parameters from it).
    """
    items = list(items)
    use_memory_cache = bool(cache_rate and cache_rate > 0)
    if cache_dir not in (None, "") and use_memory_cache:
        raise ValueError("make_dataset: give cache_rate (in memory) or cache_dir (on disk), not both")
    if cache_dir not in (None, ""):
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        base = PersistentDataset(
            data=items, transform=transform, cache_dir=cache_dir, hash_func=item_fingerprint,
            hash_transform=transform_fingerprint, track_meta=True, weights_only=False,
        )
    elif use_memory_cache:
        base = CacheDataset(data=items, transform=transform, cache_rate=cache_rate, num_workers=cache_num_workers)
    else:
        base = Dataset(data=items, transform=transform)
    seeded: Any = SeededDataset(base, index_key=index_key)
    if seed_key is not None:
        seeded = _SeedInSample(seeded, seed_key)
    return SafeDataset(seeded, on_error=on_bad_item, max_skipped=max_bad_items, datalist_name=datalist_name)
