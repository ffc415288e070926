"""2D slices of 3D volumes as a dataset, reading each volume once.

:class:`VolumeSliceDataset` turns a mixed datalist (2D images and 3D volumes) into an "all 2D" dataset: every
(selected) slice of every volume plus every 2D image — the stage-1 view of the data of Nguyen et al. 2023. A volume is
loaded and deterministically preprocessed once (MONAI ``CacheDataset`` when it fits in memory, ``cache_rate``; a small
per-process LRU of loaded volumes for the rest, ``cache_size``), slices are cut out of the cached tensor, and the random
2D augmentations (``slice_transform``) run per slice, reseeded by a :class:`~medssl.data.samplers.SampleKey`.

Axis convention: a loaded volume is channel-first ``(C, X, Y, Z)`` (MONAI, RAS after ``Orientationd``); the slice
axis is a SPATIAL axis index, ``-1`` (default) = the last spatial axis = Z = depth, i.e. axial slices
``(C, X, Y)``. A 2D item is ``(C, H, W)``.

An item that cannot be loaded while the dataset is built (volumes are read then: cached ones, and every one whose
depth is not given) stops it with :class:`~medssl.data.robust.BadItemError` "SOURCE item N: PATH: reason", or with
``on_error="skip"`` is left out (no sample) with the same text as a warning, as
:class:`~medssl.data.robust.SafeDataset` does for the items that fail later.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from multiprocessing.pool import ThreadPool
from collections.abc import Callable, Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, MetaTensor
from monai.transforms import Compose, OneOf, RandomOrder, RandomizableTrait, SomeOf

from medssl.data.robust import BadItemError, describe_item_error
from medssl.data.samplers import DistributedBatchSampler, SampleKey, VolumeGroupedBatchSampler
from medssl.utils.tensors import as_plain_tensor

__all__ = ["VolumeSliceDataset", "make_slice_batch_sampler"]

logger = logging.getLogger(__name__)


def _random_transforms(transform: Any) -> list[str]:
    """Names of the random transforms inside ``transform`` (nested Compose walked; OneOf / SomeOf / RandomOrder
    count as random themselves)."""
    if isinstance(transform, (OneOf, SomeOf, RandomOrder)):
        return [type(transform).__name__]
    if isinstance(transform, Compose):
        return [name for t in transform.transforms for name in _random_transforms(t)]
    return [type(transform).__name__] if isinstance(transform, RandomizableTrait) else []


class VolumeSliceDataset(torch.utils.data.Dataset):
    """A dataset of 2D samples: the slices of the 3D volumes of ``items`` and, as they are, its 2D images.

    Sample ``j`` maps to ``(volume_index, slice_index)``: ``volume_index`` = position of the item in ``items``,
    ``slice_index`` = index along ``slice_axis`` of the loaded volume, ``-1`` for a 2D item. The sample is the
    dict produced by ``volume_transform`` for the item with every array of the image's spatial shape (``image``,
    a segmentation ``label``...) cut at the slice (a new ``(C, *2D)`` MetaTensor whose 3x3 affine is the volume's
    affine restricted to the in-plane axes, with the slice's origin; exact for axis-aligned RAS volumes, the
    out-of-plane terms of an oblique affine are dropped), other values copied, plus ``"dim": 2``,
    ``"volume_index"``, ``"slice_index"`` and ``"modality"`` (from the item when the transform dropped it); then
    ``slice_transform`` (the random 2D augmentations, also applied to the 2D items) is applied.

    Args:
        items: datalist items (dicts with "image", "modality", optionally "dim", "label").
        volume_transform: loading + DETERMINISTIC preprocessing of an item (e.g. ``LoadImaged(ensure_channel_first)``,
            ``Orientationd("RAS")``, ``Spacingd``, the modality intensity preset). It is cached and shared by all the
            slices of a volume, so a random transform in it is an error. Output: a dict with ``image_key`` a
            channel-first ``(C, X, Y, Z)`` volume or ``(C, H, W)`` image.
        slice_transform: random augmentations applied to each 2D sample (and reseeded by a ``SampleKey``).
        slice_axis: spatial axis cut into slices (0, 1, 2 or -1, -2, -3); default -1 = Z, the depth axis (axial).
        slices_per_volume: None = every (foreground) slice; k = k slices evenly spaced over the volume's
            (foreground) slices (all of them when fewer), fixed for the dataset's life.
        min_foreground: keep only slices whose fraction of foreground pixels (any channel
            ``> foreground_threshold``, measured on the preprocessed volume) is at least this; a volume without such a
            slice contributes none (warning).
        cache_rate: fraction of the items (the first ones) whose preprocessed volume is kept in a MONAI
            ``CacheDataset`` built at construction — each of them is read exactly once.
        cache_size: the other items are kept in a per-process LRU of this many loaded volumes (each DataLoader
            worker has its own). Pair with :func:`make_slice_batch_sampler` so consecutive batches come from one
            volume; with random slice order and a small LRU a volume is re-read on (nearly) every access.
        depths: optional number of slices along ``slice_axis`` (after ``volume_transform``) of each item, None for a
            2D item; lets the uncached items skip the loading at construction that otherwise measures them (unless
            ``min_foreground`` is set, which needs the data).
        cache_num_workers: threads used to fill the CacheDataset.
        source: name used in error messages (e.g. the datalist path).
        on_error: an item that fails to load while the dataset is built: ``"raise"`` (:class:`BadItemError` naming
            the item and the file) or ``"skip"`` (a warning naming them; the item gives no sample and is listed in
            ``bad_items``, which a :class:`~medssl.data.robust.SafeDataset` around this dataset counts too).
        max_skipped: with ``"skip"``, more than this many bad items raise :class:`BadItemError`.
    """

    def __init__(
        self,
        items: Sequence[dict],
        volume_transform: Callable,
        slice_transform: Callable | None = None,
        slice_axis: int = -1,
        slices_per_volume: int | None = None,
        min_foreground: float | None = None,
        foreground_threshold: float = 0.0,
        cache_rate: float = 1.0,
        cache_size: int = 4,
        depths: Sequence[int | None] | None = None,
        cache_num_workers: int = 1,
        image_key: str = "image",
        source: str = "datalist",
        on_error: str = "raise",
        max_skipped: int = 10,
    ) -> None:
        name = type(self).__name__
        if on_error not in ("raise", "skip"):
            raise ValueError(f"{name}: on_error must be 'raise' or 'skip', got {on_error!r}")
        if slice_axis not in (0, 1, 2, -1, -2, -3):
            raise ValueError(f"{name}: slice_axis={slice_axis} is not a spatial axis of a 3-D volume (0..2 or -1..-3)")
        if slices_per_volume is not None and slices_per_volume < 1:
            raise ValueError(f"{name}: slices_per_volume={slices_per_volume} must be >= 1 or None")
        if depths is not None and len(depths) != len(items):
            raise ValueError(f"{name}: depths has {len(depths)} entries for {len(items)} items")
        if not isinstance(volume_transform, Compose):
            volume_transform = Compose([volume_transform])
        random_parts = _random_transforms(volume_transform)
        if random_parts:
            raise ValueError(
                f"{name}: volume_transform contains random transforms {random_parts}; it must be deterministic "
                "(its result is cached and shared by all slices of a volume): put random augmentations in "
                "slice_transform"
            )
        self.items = list(items)
        self.slice_transform = slice_transform
        self.slice_axis = slice_axis % 3
        self.slices_per_volume = slices_per_volume
        self.min_foreground, self.foreground_threshold = min_foreground, float(foreground_threshold)
        self.cache_size = max(int(cache_size), 0)
        self.image_key, self.source = image_key, source
        self.on_error, self.max_skipped = on_error, int(max_skipped)
        self.bad_items: dict[int, str] = {}
        # runtime_cache: the cache is filled by _fill_cache below, one item at a time, so a bad item can be named
        self.volumes = CacheDataset(
            self.items, volume_transform, cache_rate=cache_rate, progress=False, runtime_cache=True
        )
        self._lru: OrderedDict[int, dict] = OrderedDict()
        load_errors = self._fill_cache(cache_num_workers)

        volume_of, slice_of, empty = [], [], []
        self.num_slices: list[int] = []  # selected samples per item
        for vi in range(len(self.items)):
            try:
                if vi in load_errors:
                    raise load_errors[vi]
                if vi < self.volumes.cache_num or depths is None or min_foreground is not None:
                    selected = self._select_slices(vi, self._volume(vi))
                else:
                    selected = self._select_from_depth(depths[vi])
            except Exception as error:  # noqa: BLE001 - every failure is reported with the item and file
                self._bad_item(vi, error)
                selected = []
            if len(selected) == 0 and vi not in self.bad_items:
                empty.append(vi)
            volume_of.extend([vi] * len(selected))
            slice_of.extend(selected)
            self.num_slices.append(len(selected))
        if empty:
            warnings.warn(
                f"{name}: {source}: {len(empty)} volume(s) have no slice with foreground fraction >= "
                f"{min_foreground} and give no sample (items {empty[:10]}{'...' if len(empty) > 10 else ''})",
                stacklevel=2,
            )
        if not volume_of and self.bad_items:
            raise BadItemError(
                f"{name}: {source}: no usable item, all {len(self.bad_items)} are unreadable (first: "
                f"{next(iter(self.bad_items.values()))}); fix the datalist (tools/datalist.py check)"
            )
        self._volume_of = np.asarray(volume_of, dtype=np.int64)
        self._slice_of = np.asarray(slice_of, dtype=np.int64)

    def _fill_cache(self, num_workers: int) -> dict[int, Exception]:
        """Load the CacheDataset's items (``num_workers`` threads, as MONAI's own fill); returns the errors by item."""

        def load(vi: int) -> Exception | None:
            try:
                self.volumes[vi]  # a runtime cache keeps the loaded item
            except Exception as error:  # noqa: BLE001 - reported by the caller with the item and file
                return error
            return None

        indices = range(self.volumes.cache_num)
        if num_workers > 1 and len(indices) > 1:
            with ThreadPool(num_workers) as pool:
                results = pool.map(load, indices)
        else:
            results = [load(vi) for vi in indices]
        return {vi: error for vi, error in zip(indices, results) if error is not None}

    def _bad_item(self, vi: int, error: Exception) -> None:
        """Item ``vi`` failed to load at construction: raise, or record and warn (``on_error``)."""
        where = self._where(vi) + ": "
        if isinstance(error, ValueError) and str(error).startswith(where):  # our own check (dim, shape): named already
            message, reason = str(error), str(error)[len(where) :]
            path = str(self.items[vi].get(self.image_key)) if isinstance(self.items[vi], dict) else None
            if self.on_error == "raise":
                raise error
        else:
            message, path, reason = describe_item_error(error, vi, self.items[vi], self.source, self.image_key)
        if self.on_error == "raise":
            raise BadItemError(message, vi, path, reason) from error
        self.bad_items[vi] = message
        if len(self.bad_items) > self.max_skipped:
            raise BadItemError(
                f"{message}; more than max_skipped={self.max_skipped} bad items ({len(self.bad_items)}): fix the "
                "datalist (tools/datalist.py check) or raise max_bad_items",
                vi,
                path,
                reason,
            ) from error
        count = len(self.bad_items)
        logger.warning("%s; skipped (%d bad item(s) so far, at most %d)", message, count, self.max_skipped)

    # ------------------------------------------------------------------ public views
    def __len__(self) -> int:
        return len(self._volume_of)

    @property
    def data(self) -> list[dict]:
        return self.items

    @property
    def transform(self) -> Callable | None:
        """The random part (``slice_transform``): what :class:`~medssl.data.samplers.SeededDataset` reseeds."""
        return self.slice_transform

    @property
    def volume_ids(self) -> np.ndarray:
        """``volume_ids[j]`` = index in ``items`` of sample j's volume / image (for grouping samplers)."""
        return self._volume_of

    @property
    def slice_ids(self) -> np.ndarray:
        """``slice_ids[j]`` = slice index of sample j along ``slice_axis``, -1 for a 2D item."""
        return self._slice_of

    @property
    def modalities(self) -> list[str]:
        """Modality of each sample (from its item), e.g. for ``ModalityBatchSampler``."""
        return [str(self.items[vi].get("modality", "")) for vi in self._volume_of.tolist()]

    @property
    def lru_limited(self) -> bool:
        """True when some volumes are not in the CacheDataset (they go through the per-process LRU)."""
        return self.volumes.cache_num < len(self.items)

    def locate(self, index: int) -> tuple[int, int]:
        """``(volume_index, slice_index)`` of sample ``index``."""
        return int(self._volume_of[index]), int(self._slice_of[index])

    def __getitem__(self, index: Any) -> dict:
        if isinstance(index, SampleKey):
            if self.slice_transform is not None and hasattr(self.slice_transform, "set_random_state"):
                self.slice_transform.set_random_state(seed=int(index.seed))
            index = index.index
        vi, s = self.locate(int(index))
        sample = self._make_sample(vi, s, self._volume(vi))
        return self.slice_transform(sample) if self.slice_transform is not None else sample

    # ------------------------------------------------------------------ volumes
    def _where(self, vi: int) -> str:
        image = self.items[vi].get(self.image_key, "?") if isinstance(self.items[vi], dict) else "?"
        return f"{self.source} item {vi}: {image}"

    def _volume(self, vi: int) -> dict:
        """The loaded, preprocessed item ``vi``: from the CacheDataset, else from the LRU, else loaded now."""
        if vi < self.volumes.cache_num:
            return self.volumes[vi]
        if vi in self._lru:
            self._lru.move_to_end(vi)
            return self._lru[vi]
        volume = self.volumes[vi]
        if self.cache_size:
            self._lru[vi] = volume
            while len(self._lru) > self.cache_size:
                self._lru.popitem(last=False)
        return volume

    def _image(self, vi: int, volume: Any):
        if not isinstance(volume, dict) or self.image_key not in volume:
            raise ValueError(f"{self._where(vi)}: volume_transform returned no dict with key '{self.image_key}'")
        image = volume[self.image_key]
        if not hasattr(image, "ndim") or image.ndim not in (3, 4):
            shape = tuple(getattr(image, "shape", ()))
            raise ValueError(
                f"{self._where(vi)}: '{self.image_key}' of shape {shape} after volume_transform; expected a "
                "channel-first (C, H, W) image or (C, X, Y, Z) volume"
            )
        spatial_dims = image.ndim - 1
        declared = self.items[vi].get("dim") if isinstance(self.items[vi], dict) else None
        if declared is not None and int(declared) != spatial_dims:
            raise ValueError(
                f"{self._where(vi)}: dim={declared} in the datalist but the loaded '{self.image_key}' has shape "
                f"{tuple(image.shape)} ({spatial_dims} spatial dims, channel first)"
            )
        return image

    def _select_from_depth(self, depth: int | None) -> list[int]:
        if depth is None:
            return [-1]
        return self._subsample(list(range(int(depth))))

    def _subsample(self, candidates: list[int]) -> list[int]:
        k = self.slices_per_volume
        if k is None or len(candidates) <= k:
            return candidates
        picks = np.unique(np.round(np.linspace(0, len(candidates) - 1, k)).astype(np.int64))
        return [candidates[i] for i in picks.tolist()]

    def _select_slices(self, vi: int, volume: dict) -> list[int]:
        image = self._image(vi, volume)
        if image.ndim == 3:
            return [-1]
        depth = int(image.shape[1 + self.slice_axis])
        candidates = list(range(depth))
        if self.min_foreground is not None:
            data = torch.as_tensor(as_plain_tensor(image))
            fg = (data > self.foreground_threshold).any(0).movedim(self.slice_axis, -1).reshape(-1, depth)
            fg = fg.float().mean(0)
            candidates = [s for s in candidates if float(fg[s]) >= self.min_foreground]
        return self._subsample(candidates)

    # ------------------------------------------------------------------ samples
    def _cut(self, value: Any, s: int, vi: int) -> Any:
        """Slice ``s`` along the slice axis of a channel-first array (a new tensor / array, not a view)."""
        axis = 1 + self.slice_axis
        if isinstance(value, np.ndarray):
            return np.take(value, s, axis=axis).copy()
        data = as_plain_tensor(value)
        cut = data.select(axis, s).clone()
        if not isinstance(value, MetaTensor):
            return cut
        dropped = ("affine", "original_affine", "spatial_shape")
        meta = {k: deepcopy(v) for k, v in value.meta.items() if k not in dropped}
        meta["spatial_shape"] = np.asarray(cut.shape[1:])
        meta["volume_index"], meta["slice_index"] = vi, s
        affine = None
        if value.affine is not None and tuple(value.affine.shape) == (4, 4):
            a3 = value.affine.to(torch.float64)
            kept = [a for a in range(3) if a != self.slice_axis]
            voxel = torch.zeros(4, dtype=torch.float64)
            voxel[self.slice_axis], voxel[3] = float(s), 1.0
            origin = a3 @ voxel
            affine = torch.eye(3, dtype=torch.float64)
            affine[:2, :2] = a3[kept][:, kept]
            affine[:2, 2] = origin[kept]
        return MetaTensor(cut, affine=affine, meta=meta)

    def _make_sample(self, vi: int, s: int, volume: dict) -> dict:
        image = volume[self.image_key]
        spatial = tuple(image.shape[1:])
        sample = {}
        for key, value in volume.items():
            is_array = isinstance(value, (torch.Tensor, np.ndarray))
            if s >= 0 and is_array and value.ndim == image.ndim and tuple(value.shape[1:]) == spatial:
                sample[key] = self._cut(value, s, vi)
            else:  # 2D items and non-spatial values: copies, the cached volume is never modified
                sample[key] = deepcopy(value)
        sample["dim"] = 2
        sample["volume_index"], sample["slice_index"] = vi, s
        if "modality" not in sample and isinstance(self.items[vi], dict) and "modality" in self.items[vi]:
            sample["modality"] = self.items[vi]["modality"]
        return sample


def make_slice_batch_sampler(
    dataset: VolumeSliceDataset, *args: Any, group_by_volume: bool | None = None, **kwargs: Any
) -> DistributedBatchSampler:
    """The batch sampler to use with a :class:`VolumeSliceDataset`; ``args`` / ``kwargs`` (``batch_size``,
    ``shuffle``, ``seed``, ``drop_last``, ``rank``, ``world_size``) go to the sampler as given.

    ``group_by_volume`` (default: ``dataset.lru_limited``, i.e. some volumes are not in the CacheDataset):
    a :class:`~medssl.data.samplers.VolumeGroupedBatchSampler` — volumes in random order, the slices of a volume
    consecutive (shuffled within), so each uncached volume is read about once per epoch per DataLoader worker that
    gets one of its batches; otherwise a :class:`~medssl.data.samplers.DistributedBatchSampler` over all samples
    (slices from random volumes in every batch, the better mix when everything is cached).
    """
    if group_by_volume is None:
        group_by_volume = dataset.lru_limited
    if group_by_volume:
        return VolumeGroupedBatchSampler(dataset.volume_ids, *args, **kwargs)
    return DistributedBatchSampler(len(dataset), *args, **kwargs)
