"""Bad input during training: name the datalist item and the file, then stop (default) or skip it.

:class:`SafeDataset` wraps a MONAI ``Dataset`` (or any map-style dataset, e.g. ``medssl.data.samplers.SeededDataset``).
When loading / transforming an item fails it raises :class:`BadItemError` -- or, with ``on_error="skip"``, logs a
warning and returns a replacement item -- whose message names the datalist item index, the file and the reader's
error::

    datalist.json item 41: /data/ct_17.nii.gz: 4-D image of shape (64, 64, 32, 5) where a 2-D image or 3-D volume
    was expected

MONAI wraps transform errors in ``RuntimeError("applying transform ...")``; the reason is dug out of the exception
chain (a :class:`medssl.data.readers.ImageReadError` when a reader failed) and the path out of the item dict.

Bundle config keys: ``on_bad_item`` ("raise" | "skip") -> ``on_error``, ``max_bad_items`` -> ``max_skipped``.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from medssl.data.readers import ImageReadError

__all__ = ["BadItemError", "SafeDataset", "describe_item_error"]

logger = logging.getLogger(__name__)


class BadItemError(RuntimeError):
    """A datalist item could not be loaded; ``str(error)`` = "DATALIST item N: PATH: reason".

    Attributes:
        index: the item's position in the datalist (None when unknown).
        path: the image path (None when unknown).
        reason: the innermost error message.
    """

    def __init__(self, message: str, index: int | None = None, path: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.index = index
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keep the attributes through DataLoader worker pickling
        return (type(self), (str(self), self.index, self.path, self.reason))


def _error_chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain


def _item_path(item: Any, image_key: str) -> str | None:
    if isinstance(item, dict):
        value = item.get(image_key)
        if value is None:
            return None
        return ", ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    if isinstance(item, str):
        return item
    return None


def describe_item_error(
    error: BaseException,
    index: int | None,
    item: Any = None,
    datalist_name: str | None = None,
    image_key: str = "image",
) -> tuple[str, str | None, str]:
    """(message "DATALIST item N: PATH: reason", path, reason) for an error raised loading datalist item ``index``.

    The reason is the innermost error of the chain (MONAI's "applying transform" wrappers skipped); when a reader
    raised :class:`ImageReadError` its path and reason are used -- the outermost one, the read of this item: an
    error raised while another was being handled carries that one as ``__context__`` further down the chain.
    """
    chain = _error_chain(error)
    read_errors = [e for e in chain if isinstance(e, ImageReadError)]
    if read_errors:
        path, reason = read_errors[0].path, read_errors[0].reason
    else:
        root = chain[-1]
        text = str(root).strip().splitlines()[0] if str(root).strip() else ""
        reason = f"{type(root).__name__}: {text}" if text else type(root).__name__
        path = _item_path(item, image_key)
    name = datalist_name or "datalist"
    where = f"{name} item {index}" if index is not None else name
    return f"{where}: {path if path is not None else '(unknown file)'}: {reason}", path, reason


def _position(index: Any) -> int | None:
    """The integer item index inside ``index`` (an int-like, or a SampleKey-style NamedTuple with ``index``)."""
    fields = getattr(index, "_fields", None)
    if fields is not None and "index" in fields:
        return int(index.index)
    if isinstance(index, (slice, str, bytes)) or (isinstance(index, Sequence)):
        return None
    try:
        return operator.index(index)
    except TypeError:
        try:
            return int(index)
        except (TypeError, ValueError):
            return None


def _with_position(index: Any, position: int) -> Any:
    """``index`` moved to ``position``: a SampleKey keeps its seed (and its type); an int becomes ``position``."""
    fields = getattr(index, "_fields", None)
    if fields is not None and "index" in fields:
        return index._replace(index=position)
    return position


def _find_attribute(dataset: Any, name: str, depth: int = 4) -> Any:
    for _ in range(depth):
        if dataset is None:
            return None
        if name in getattr(dataset, "__dict__", {}) or hasattr(type(dataset), name):
            return getattr(dataset, name)
        dataset = getattr(dataset, "dataset", None)
    return None


class SafeDataset(Dataset):
    """Wrap a map-style dataset so that a bad item is reported by datalist index and file, and optionally skipped.

    Indices are passed through unchanged (int, numpy int, or a ``SampleKey(index, seed)`` NamedTuple); slices and
    index sequences go straight to the wrapped dataset.

    On a failure:

    - ``on_error="raise"`` (default, safe): :class:`BadItemError` "DATALIST item N: PATH: reason", chained to the
      original error.
    - ``on_error="skip"``: a warning with the same text, and the item is replaced by the next index
      (``(N + k) % len``, k = 1, 2, ...) that has the same ``modality`` and ``dim`` (so a batch sampler's
      single-modality / single-dimension batches stay that way) and is not known to be bad; a ``SampleKey`` keeps
      its seed, so augmentation stays reproducible. A known-bad item is not read again. More than ``max_skipped``
      distinct bad items raise :class:`BadItemError`. The count is per process: each DataLoader worker keeps its
      own.

    ``.data`` and ``.transform`` are those of the wrapped dataset (found through nested ``.dataset`` wrappers);
    other attributes are delegated to it. A wrapped dataset with several samples per datalist item (e.g.
    :class:`medssl.data.VolumeSliceDataset`: the slices of a volume) says which item each sample comes from through
    ``volume_ids`` (``volume_ids[sample] = item index in .data``); messages then name that item, a bad item makes
    all its samples bad, and replacements come from other items of the same ``modality`` and ``dim``. Items the
    wrapped dataset reports in its own ``bad_items`` (left out when it was built) count toward ``max_skipped``.
    Note: a ``CacheDataset`` loads its cache when it is built, before this wrapper sees an item -- run
    ``tools/datalist.py check`` first.

    Args:
        dataset: the wrapped dataset.
        on_error: ``"raise"`` or ``"skip"``.
        max_skipped: the most distinct bad items tolerated with ``"skip"``.
        datalist_name: name used in messages (e.g. the datalist file name); default ``"datalist"``.
        image_key: item key of the file path named in messages.
    """

    def __init__(
        self,
        dataset: Any,
        on_error: str = "raise",
        max_skipped: int = 10,
        datalist_name: str | None = None,
        image_key: str = "image",
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.dataset = dataset
        self.on_error = on_error
        self.max_skipped = int(max_skipped)
        self.datalist_name = datalist_name
        self.image_key = image_key
        # items the wrapped dataset already left out when it was built (VolumeSliceDataset, on_error="skip") count too
        self.bad_items: dict[int, str] = dict(_find_attribute(dataset, "bad_items") or {})

    # ------------------------------------------------------------------------------------------------ delegation
    @property
    def data(self) -> Any:
        return _find_attribute(self.dataset, "data")

    @property
    def transform(self) -> Any:
        return _find_attribute(self.dataset, "transform")

    @transform.setter
    def transform(self, value: Any) -> None:
        target = self.dataset
        while target is not None and "transform" not in getattr(target, "__dict__", {}):
            target = getattr(target, "dataset", None)
        setattr(target if target is not None else self.dataset, "transform", value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "dataset" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)

    def __len__(self) -> int:
        return len(self.dataset)

    # --------------------------------------------------------------------------------------------------- loading
    def _item_index(self, position: int) -> int:
        """Index in ``.data`` of the datalist item that sample ``position`` comes from (see the class docstring)."""
        item_ids = _find_attribute(self.dataset, "volume_ids")
        if item_ids is None:
            return position
        try:
            return int(item_ids[position])
        except (IndexError, KeyError, TypeError, ValueError):
            return position

    def _item(self, position: int) -> Any:
        data = self.data
        try:
            return data[self._item_index(position)] if data is not None else None
        except (IndexError, KeyError, TypeError):
            return None

    def _group(self, position: int) -> tuple:
        item = self._item(position)
        if isinstance(item, dict):
            return item.get("modality"), item.get("dim")
        return None, None

    def _record(self, error: BaseException, position: int) -> BadItemError:
        item_index = self._item_index(position)
        message, path, reason = describe_item_error(
            error, item_index, self._item(position), self.datalist_name, self.image_key
        )
        return BadItemError(message, item_index, path, reason)

    def __getitem__(self, index: Any) -> Any:
        position = _position(index)
        if position is None:
            return self.dataset[index]
        n = len(self.dataset)
        if position < 0:
            position += n
        if self.on_error == "skip" and self._item_index(position) in self.bad_items:
            return self._replacement(index, position)
        try:
            return self.dataset[index]
        except Exception as error:  # noqa: BLE001 - every failure is reported with the item and file
            bad = self._record(error, position)
            if self.on_error == "raise":
                raise bad from error
            self._skip(bad, position, error)
        # outside the except block: a replacement's own error must not chain to this one (it would be named by it)
        return self._replacement(index, position)

    def _skip(self, bad: BadItemError, position: int, error: BaseException) -> None:
        self.bad_items[self._item_index(position)] = str(bad)
        if len(self.bad_items) > self.max_skipped:
            raise BadItemError(
                f"{bad}; more than max_skipped={self.max_skipped} bad items ({len(self.bad_items)}): fix the datalist "
                "(tools/datalist.py check) or raise max_bad_items",
                bad.index,
                bad.path,
                bad.reason,
            ) from error
        logger.warning("%s; skipped (%d bad item(s) so far, at most %d)", bad, len(self.bad_items), self.max_skipped)

    def _replacement(self, index: Any, position: int) -> Any:
        n = len(self.dataset)
        group = self._group(position)
        for step in range(1, n):
            candidate = (position + step) % n
            if self._item_index(candidate) in self.bad_items or self._group(candidate) != group:
                continue
            try:
                return self.dataset[_with_position(index, candidate)]
            except Exception as error:  # noqa: BLE001
                self._skip(self._record(error, candidate), candidate, error)
        item_index = self._item_index(position)
        raise BadItemError(
            f"{self.bad_items.get(item_index, f'item {item_index}')}; no usable replacement item with the same "
            f"modality / dim (modality={group[0]}, dim={group[1]})",
            item_index,
        )
