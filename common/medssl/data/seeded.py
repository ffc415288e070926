"""The seed half of medssl's sampler contract (see :mod:`medssl.data.samplers`): :class:`SampleKey` ``(index,
seed)``, the pure per-item seed :func:`item_seed` (a SplitMix64 chain over base seed, epoch, index and pass) and
:class:`SeededDataset`, which reseeds a dataset's random transforms with a key's seed. The batch samplers that yield
the keys are in :mod:`medssl.data.samplers`, which re-exports these names."""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["SampleKey", "item_seed", "item_seeds", "SeededDataset"]

_MASK64 = (1 << 64) - 1
# domain-separation constants: item seeds, pool permutations and group draws never share a hash chain
_DOMAIN_ITEM = 0x6D656473736C2D69  # "medssl-i"
_DOMAIN_PERM = 0x6D656473736C2D70  # "medssl-p"
_DOMAIN_DRAW = 0x6D656473736C2D64  # "medssl-d"


class SampleKey(NamedTuple):
    """What a medssl batch sampler yields for one item: the dataset ``index`` and the ``seed`` of its augmentations
    (a uint32, :func:`item_seed` of base seed, epoch, index)."""

    index: int
    seed: int


# --------------------------------------------------------------------------------------------- hashing / seeds
def _to_u64(value: Any) -> np.ndarray:
    """Ints (Python / numpy, scalar or array, any sign) as a uint64 array, modulo 2**64."""
    if isinstance(value, (int, np.integer)):
        return np.array([int(value) & _MASK64], dtype=np.uint64)
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"seed inputs must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False).view(np.uint64) if arr.dtype.kind == "i" else arr.astype(np.uint64)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser (a bijection of uint64 with full avalanche), element-wise with wrap-around."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _mix(*values: Any) -> np.ndarray:
    """Hash a sequence of integers (scalars or broadcastable arrays) to uint64: h <- splitmix64(h XOR v)."""
    h = np.zeros(1, dtype=np.uint64)
    for v in values:
        h = _splitmix64(h ^ _to_u64(v))
    return h


def _mix_int(*values: int) -> int:
    return int(_mix(*values)[0])


def item_seeds(base_seed: int, epoch: int, indices: Any, repeats: Any = 0) -> np.ndarray:
    """Vectorised :func:`item_seed`: a uint32 array, one seed per entry of ``indices`` (``repeats`` broadcasts)."""
    h = _mix(_DOMAIN_ITEM, base_seed, epoch, indices, repeats)
    return (h >> np.uint64(32)).astype(np.uint32)


def item_seed(base_seed: int, epoch: int, index: int, repeat: int = 0) -> int:
    """The augmentation seed of item ``index`` in ``epoch`` of a run seeded with ``base_seed``.

    A pure, well-mixed function (SplitMix64 chain over the arguments; no Python ``hash``, so it is the same in every
    process) returning an int in ``[0, 2**32)`` as MONAI's ``Randomizable.set_random_state`` wants. ``repeat``
    distinguishes the passes of one item within an epoch (an item drawn again when a pool is cycled); 0 = first.
    """
    return int(item_seeds(base_seed, epoch, index, repeat)[0])


# --------------------------------------------------------------------------------------------- dataset wrapper
class SeededDataset(torch.utils.data.Dataset):
    """Wrap a MONAI ``Dataset`` (``CacheDataset``, ``PersistentDataset``, a medssl ``VolumeSliceDataset``...) so that a
    :class:`SampleKey` fixes the random augmentations of the item.

    ``ds[SampleKey(index, seed)]`` calls ``dataset.transform.set_random_state(seed=seed)`` (when the transform has it:
    a MONAI ``Compose`` reseeds each of its ``Randomizable`` transforms, nested ``Compose`` / ``OneOf`` included,
    from that seed) and returns ``dataset[index]``; ``ds[int]`` returns ``dataset[int]`` without reseeding.
    With a ``CacheDataset`` only the transforms after the cached deterministic prefix run, and they are the
    reseeded ones; the result is therefore the same as with an uncached ``Dataset`` and the same in every
    DataLoader worker (``num_workers`` and ``persistent_workers`` do not matter).

    Only randomness drawn from the transforms' own ``self.R`` is controlled (MONAI's rule); a transform that
    draws from the global numpy / torch RNG, or a custom wrapper that does not forward ``set_random_state`` to the
    transforms it contains, is not. Reseed-then-transform holds a lock, so thread-based loaders (MONAI
    ``ThreadDataLoader`` with workers) stay correct but serialise; process workers do not contend.

    ``data``, ``transform`` and other public attributes of the wrapped dataset are passed through.

    ``index_key``: when set, a dict sample gets the dataset index of its item under that key (a copy of the dict, so
    a cached item is never modified) — methods that keep per-item state (DeepCluster-v2's memory bank) need it.
    """

    def __init__(self, dataset: Any, index_key: str | None = None) -> None:
        self.dataset = dataset
        self.index_key = index_key
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def data(self) -> Any:
        return self.dataset.data

    @property
    def transform(self) -> Any:
        return getattr(self.dataset, "transform", None)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, SampleKey):
            index = int(key.index)
            transform = getattr(self.dataset, "transform", None)
            if transform is None or not hasattr(transform, "set_random_state"):
                return self._with_index(self.dataset[index], index)
            with self._lock:
                transform.set_random_state(seed=int(key.seed))
                return self._with_index(self.dataset[index], index)
        return self._with_index(self.dataset[key], key)

    def _with_index(self, sample: Any, index: Any) -> Any:
        if self.index_key is None or not isinstance(sample, dict) or not isinstance(index, int):
            return sample
        return {**sample, self.index_key: index}

    def __getattr__(self, name: str) -> Any:
        # dunder / private names are never delegated: e.g. a wrapped `__getitems__` would bypass the reseeding
        if name.startswith("_") or name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
