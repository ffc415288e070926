"""Resumable, seeded, distributed-aware batch samplers and the dataset wrapper that applies their seeds.

The contract (shared by every medssl sampler and dataset):

* A batch sampler yields lists of :class:`SampleKey` ``(index, seed)``. ``seed`` is :func:`item_seed` of
  (base seed, epoch, index[, pass]) — a pure function, NOT of the rank, the DataLoader worker or the position in
  the batch — so an item gets the same augmentation whatever the number of ranks / workers and after a resume.
* :class:`SeededDataset` wraps any MONAI ``Dataset`` / ``CacheDataset``: ``dataset[SampleKey]`` reseeds the
  random transforms with ``key.seed`` and returns ``dataset[key.index]``.
* Every sampler has ``set_epoch(epoch)``, ``skip_batches(n)`` (the next ``__iter__`` starts at batch ``n`` of the
  current epoch; one pass only), ``state_dict()`` / ``load_state_dict()`` (``{"epoch", "seed"}``) and ``__len__``
  (batches per epoch on this rank: the same on every rank, not reduced by ``skip_batches``).
* Distributed layout: every rank builds the same *global* plan of the epoch (a torch / integer computation seeded
  by (seed, epoch) only); a global batch is a list of ``parts`` (one for the plain samplers), each part holding
  ``local_part_size * world_size`` items; rank ``r`` takes the contiguous slice ``[r * local_part_size,
  (r + 1) * local_part_size)`` of every part. Hence every rank agrees on the modality / dimension of each step, the
  ranks' shares are disjoint, and (one part) the concatenation of the ranks' local batches in rank order is the
  global batch: ``world_size=1, batch_size=B`` gives the same global batches as ``world_size=2, batch_size=B/2``.

Pools and passes: items are drawn from *pools* (all items; one modality; one dimension). Each pass over a pool is
a permutation seeded by (seed, epoch, pool, pass); a pool that must give more items than it has in one epoch
(padding of the last batch with ``drop_last=False``, small modalities, a fixed ``num_batches``) continues into its
next pass, whose items get different seeds (:func:`item_seed`'s ``repeat`` = pass number).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Sampler

from medssl.utils.dist import get_rank, get_world_size

from .seeded import _DOMAIN_DRAW, _DOMAIN_PERM, SampleKey, SeededDataset, _mix_int, item_seed, item_seeds

__all__ = [
    "SampleKey",
    "item_seed",
    "item_seeds",
    "SeededDataset",
    "DistributedBatchSampler",
    "VolumeGroupedBatchSampler",
    "ModalityBatchSampler",
    "DimensionAlternatingBatchSampler",
]


# --------------------------------------------------------------------------------------------- pools
class _Pool:
    """An endless stream of (dataset index, pass number) over ``items``: pass k is a permutation seeded by
    (seed, epoch, pool id, k) (identity order when ``shuffle`` is False)."""

    def __init__(self, items: np.ndarray, seed: int, epoch: int, pool_id: int, shuffle: bool, order_fn=None):
        self.items = items
        self.seed, self.epoch, self.pool_id, self.shuffle = seed, epoch, pool_id, shuffle
        self.order_fn = order_fn  # optional custom order (generator -> permutation of range(len(items)))
        self.pos = 0  # items consumed so far
        self._order: tuple[int, np.ndarray] | None = None  # (pass number, its order), the pass being consumed

    def _pass_order(self, k: int) -> np.ndarray:
        if self._order is None or self._order[0] != k:
            n = len(self.items)
            if not self.shuffle:
                order = np.arange(n)
            else:
                g = torch.Generator().manual_seed(_mix_int(_DOMAIN_PERM, self.seed, self.epoch, self.pool_id, k))
                order = self.order_fn(g) if self.order_fn is not None else torch.randperm(n, generator=g).numpy()
            self._order = (k, order)
        return self._order[1]

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``count`` (index, pass) pairs. When the chunk spans a pass boundary, the items already in the
        chunk are moved (stably) to the end of the next pass, so a chunk never holds an item twice when the pool has
        at least ``count`` items."""
        n = len(self.items)
        out_idx, out_rep = [], []
        while count > 0:
            k, offset = divmod(self.pos, n)
            step = min(count, n - offset)
            order = self._pass_order(k)
            if offset == 0 and out_idx:
                in_chunk = np.isin(self.items[order], np.concatenate(out_idx))
                order = np.concatenate([order[~in_chunk], order[in_chunk]])
                self._order = (k, order)
            out_idx.append(self.items[order[offset : offset + step]])
            out_rep.append(np.full(step, k, dtype=np.int64))
            self.pos += step
            count -= step
        return np.concatenate(out_idx), np.concatenate(out_rep)


def _n_chunks(n_items: int, chunk: int, drop_last: bool) -> int:
    return n_items // chunk if drop_last else math.ceil(n_items / chunk)


class _Step(NamedTuple):
    """One global batch: ``parts`` = list of (dataset indices, pass numbers) arrays, ``groups`` = the group
    (modality / dimension / None) of each part."""

    parts: list
    groups: tuple


# --------------------------------------------------------------------------------------------- base sampler
class _SeededBatchSampler(Sampler):
    """Shared machinery: epoch / seed state, skip, rank resolution, rank share of each global part, key seeds."""

    def __init__(self, seed: int, rank: int | None, world_size: int | None) -> None:
        if rank is None or world_size is None:
            rank = get_rank() if rank is None else rank
            world_size = get_world_size() if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"{type(self).__name__}: rank={rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.epoch = 0
        self._skip = 0

    # ---- contract
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan the next ``__iter__`` yields (any int: it only keys the RNG)."""
        self.epoch = int(epoch)

    def skip_batches(self, n: int) -> None:
        """The next ``__iter__`` starts at batch ``n`` of the current epoch (for a mid-epoch resume); later passes
        start at 0 again. ``__len__`` is not changed."""
        if n < 0:
            raise ValueError(f"{type(self).__name__}.skip_batches: n={n} must be >= 0")
        self._skip = int(n)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        missing = {"epoch", "seed"} - set(state)
        if missing:
            raise KeyError(f"{type(self).__name__}.load_state_dict: missing keys {sorted(missing)} in {dict(state)}")
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])

    def __len__(self) -> int:  # batches per epoch on this rank
        raise NotImplementedError

    def _plan(self, epoch: int) -> list[_Step]:
        raise NotImplementedError

    # ---- shared
    def step_groups(self, epoch: int | None = None) -> list[tuple]:
        """For each step of ``epoch`` (default: the current one), the group of each part (modality name, spatial
        dimension, or None for the plain samplers). The same on every rank."""
        return [s.groups for s in self._plan(self.epoch if epoch is None else epoch)]

    def global_batches(self, epoch: int | None = None) -> list[list[SampleKey]]:
        """The global batches of ``epoch`` as SampleKey lists (parts concatenated in order); for tests and tools."""
        epoch = self.epoch if epoch is None else epoch
        out = []
        for step in self._plan(epoch):
            idx = np.concatenate([p[0] for p in step.parts])
            rep = np.concatenate([p[1] for p in step.parts])
            out.append(self._keys(epoch, idx, rep))
        return out

    def _keys(self, epoch: int, idx: np.ndarray, rep: np.ndarray) -> list[SampleKey]:
        seeds = item_seeds(self.seed, epoch, idx.astype(np.int64), rep.astype(np.int64))
        return [SampleKey(int(i), int(s)) for i, s in zip(idx.tolist(), seeds.tolist())]

    def _local(self, epoch: int, step: _Step) -> list[SampleKey]:
        idx, rep = [], []
        for p_idx, p_rep in step.parts:
            local = len(p_idx) // self.world_size
            sl = slice(self.rank * local, (self.rank + 1) * local)
            idx.append(p_idx[sl])
            rep.append(p_rep[sl])
        return self._keys(epoch, np.concatenate(idx), np.concatenate(rep))

    def __iter__(self) -> Iterator[list[SampleKey]]:
        skip, self._skip = self._skip, 0
        epoch = self.epoch
        for step in self._plan(epoch)[skip:]:
            yield self._local(epoch, step)

    def _check_nonempty(self, detail: str) -> None:
        if len(self) == 0:
            raise ValueError(f"{type(self).__name__}: no batch in an epoch ({detail})")


# --------------------------------------------------------------------------------------------- plain sampler
class DistributedBatchSampler(_SeededBatchSampler):
    """Batches of ``batch_size`` items per rank from one per-epoch permutation shared by all ranks.

    A global batch has ``batch_size * world_size`` consecutive items of the epoch permutation (a torch.Generator
    seeded from (seed, epoch); identity order with ``shuffle=False``); rank ``r`` takes its contiguous share
    ``[r * batch_size, (r + 1) * batch_size)``. So ``world_size=1, batch_size=B`` and ``world_size=2,
    batch_size=B/2`` give the same global batches (rank 0's then rank 1's items) and the same item seeds.

    drop_last: True -> ``num_items // (batch_size * world_size)`` batches, the remainder of the permutation is
    unused this epoch (different items every epoch when shuffled); False -> ``ceil(...)`` batches, the last global
    batch is completed with the first items of the next pass (another permutation, with the items already in that
    batch put last, so no batch holds an item twice; the padding items get other seeds).
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(seed, rank, world_size)
        if batch_size < 1:
            raise ValueError(f"{type(self).__name__}: batch_size={batch_size} must be >= 1")
        if num_items < 1:
            raise ValueError(f"{type(self).__name__}: num_items={num_items}: the dataset is empty")
        self.num_items, self.batch_size = int(num_items), int(batch_size)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self._check_nonempty(
            f"{num_items} items < one global batch of {batch_size} x {self.world_size} ranks with drop_last=True"
        )

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return _n_chunks(self.num_items, self.global_batch_size, self.drop_last)

    def _order_fn(self):
        return None

    def _plan(self, epoch: int) -> list[_Step]:
        pool = _Pool(np.arange(self.num_items), self.seed, epoch, 0, self.shuffle, self._order_fn())
        return [_Step([pool.take(self.global_batch_size)], (None,)) for _ in range(len(self))]


class VolumeGroupedBatchSampler(DistributedBatchSampler):
    """Like :class:`DistributedBatchSampler` but the epoch order keeps the items of one group (the slices of one
    volume) together: the groups are shuffled, then the items inside each group, and the concatenation is cut into
    global batches. With an LRU-limited volume cache (``VolumeSliceDataset`` with ``cache_rate < 1``) each volume is
    then read about once per epoch (with ``num_workers=W`` DataLoader workers, consecutive batches go to different
    workers, so a volume spanning several batches is read by up to W workers). ``group_ids[i]`` = group of item i;
    the other arguments (``batch_size``, ``shuffle``, ``seed``, ``drop_last``, ``rank``, ``world_size``) are
    :class:`DistributedBatchSampler`'s, passed through as given.
    """

    def __init__(self, group_ids: Sequence[int], *args: Any, **kwargs: Any) -> None:
        self.group_ids = np.asarray(group_ids, dtype=np.int64)
        super().__init__(len(self.group_ids), *args, **kwargs)
        groups, inverse = np.unique(self.group_ids, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        self._members = np.split(order, np.cumsum(np.bincount(inverse, minlength=len(groups)))[:-1])

    def _order_fn(self):
        members = self._members

        def order(g: torch.Generator) -> np.ndarray:
            group_order = torch.randperm(len(members), generator=g).tolist()
            return np.concatenate(
                [members[j][torch.randperm(len(members[j]), generator=g).numpy()] for j in group_order]
            )

        return order


# --------------------------------------------------------------------------------------------- modality sampler
class ModalityBatchSampler(_SeededBatchSampler):
    """Single-modality batches (``parts=1``) or batches of ``parts`` equal single-modality parts (``parts=M``: the
    Ghesu et al. 2022 batch "split into M equal single-modality sub-batches", Eq. 4).

    ``modalities[i]`` is the modality of dataset item ``i``. Each modality is a pool (a per-epoch permutation of
    its items) cut into chunks of one *global part* = ``batch_size // parts * world_size`` items. For each step the
    modality of each part is drawn with a torch.Generator seeded by (seed, epoch) — every rank draws the same —
    with probability proportional to the number of chunks the modality still has to give this epoch (so, over an
    epoch, proportional to its size, and every modality's items are used once per epoch up to the drop_last
    remainder). The parts of one batch are drawn without replacement among the modalities that still have chunks
    (distinct modalities when possible), with replacement once fewer than ``parts`` modalities are left.

    Epoch length: ``sum_m chunks_m // parts`` steps, where ``chunks_m = n_m // part`` (``drop_last=True``: the
    leftover items of a modality are unused this epoch, different ones each epoch; a modality with fewer items
    than one part is skipped, with a warning) or ``ceil(n_m / part)`` (``drop_last=False``: the last chunk of a
    modality is completed from the next pass over it; a modality smaller than a part is cycled, so its items repeat
    inside a part — with distinct seeds —, with a warning; if the chunks do not fill whole batches, extra chunks are
    taken from the largest modalities, one each, so that no chunk is dropped).

    Local layout: rank ``r`` takes the contiguous slice ``[r * b, (r + 1) * b)``, ``b = batch_size // parts``, of
    every part; its local batch is the ``parts`` slices concatenated in part order, i.e. ``parts`` equal
    consecutive single-modality sub-batches (:attr:`parts_layout`): split a batched tensor with
    ``x.view(parts, b, ...)`` / ``x.chunk(parts)``; the modality of part p is ``batch["modality"][p * b]``.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        batch_size: int,
        parts: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(seed, rank, world_size)
        if parts < 1 or batch_size < 1 or batch_size % parts:
            raise ValueError(
                f"{type(self).__name__}: batch_size={batch_size} must be a positive multiple of parts={parts}"
            )
        if len(modalities) == 0:
            raise ValueError(f"{type(self).__name__}: modalities is empty (no items)")
        self.batch_size, self.parts = int(batch_size), int(parts)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        mods = np.asarray([str(m) for m in modalities])
        self.groups = sorted(set(mods.tolist()))
        self._items = {m: np.flatnonzero(mods == m) for m in self.groups}
        part = self.global_part_size
        self._chunks = {m: _n_chunks(len(self._items[m]), part, self.drop_last) for m in self.groups}
        small = {m: len(self._items[m]) for m in self.groups if len(self._items[m]) < part}
        if small:
            what = "skipped (drop_last=True)" if self.drop_last else "cycled: items repeat within a part"
            warnings.warn(
                f"{type(self).__name__}: modalities with fewer items than one global part of {part} "
                f"(batch_size {batch_size} / parts {parts} x {self.world_size} ranks): {small}; {what}",
                stacklevel=2,
            )
        total = sum(self._chunks.values())
        if not self.drop_last and total % self.parts:
            by_size = sorted(self.groups, key=lambda m: (-len(self._items[m]), m))
            for j in range(self.parts - total % self.parts):
                self._chunks[by_size[j % len(by_size)]] += 1
        self._check_nonempty(f"modality sizes {({m: len(v) for m, v in self._items.items()})}, part size {part}")

    @property
    def local_part_size(self) -> int:
        return self.batch_size // self.parts

    @property
    def global_part_size(self) -> int:
        return self.local_part_size * self.world_size

    @property
    def parts_layout(self) -> list[slice]:
        """The positions of the ``parts`` single-modality sub-batches inside this rank's local batch."""
        b = self.local_part_size
        return [slice(p * b, (p + 1) * b) for p in range(self.parts)]

    def __len__(self) -> int:
        return sum(self._chunks.values()) // self.parts

    def _plan(self, epoch: int) -> list[_Step]:
        pools = {
            m: _Pool(self._items[m], self.seed, epoch, j, self.shuffle) for j, m in enumerate(self.groups)
        }
        remaining = dict(self._chunks)
        g = torch.Generator().manual_seed(_mix_int(_DOMAIN_DRAW, self.seed, epoch))
        steps = []
        for _ in range(len(self)):
            used: list[str] = []
            parts = []
            for _ in range(self.parts):
                cands = [m for m in self.groups if remaining[m] > 0 and m not in used]
                if not cands:
                    cands = [m for m in self.groups if remaining[m] > 0]
                m = _weighted_choice(cands, [remaining[c] for c in cands], g)
                remaining[m] -= 1
                used.append(m)
                parts.append(pools[m].take(self.global_part_size))
            steps.append(_Step(parts, tuple(used)))
        return steps


def _weighted_choice(options: list, weights: list[int], g: torch.Generator):
    """Pick one option with probability proportional to its integer weight (exact integer arithmetic)."""
    total = sum(weights)
    r = int(torch.randint(total, (1,), generator=g).item())
    for opt, w in zip(options, weights):
        if r < w:
            return opt
        r -= w
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------- 2D/3D alternation
class DimensionAlternatingBatchSampler(_SeededBatchSampler):
    """UniMiSS's 2D/3D alternation: ``v`` batches of 2D items, then ``v`` batches of 3D items, repeating; every batch
    holds items of one spatial dimension (``dims[i]`` in {2, 3} for item i). Per rank, a 2D batch has
    ``batch_size_2d`` items and a 3D batch ``batch_size_3d`` (global batch x world_size, rank share contiguous).

    ``v`` is an int or a pair ``(v_2d, v_3d)``; ``first`` is the dimension of the first block.

    Epoch length: with ``num_batches=None`` the epoch ends at the first step whose dimension has no full batch
    left (the smaller pool, relative to its batch size, is exhausted; the other pool's rest is unused this epoch,
    different items next epoch); ``drop_last=False`` lets a pool's last partial batch be completed from its next
    pass. With ``num_batches=N`` every epoch has exactly N steps and the pools are cycled (each pass a new
    permutation; repeated items get other seeds). A dimension with no full batch at all (no items, or fewer than
    one global batch with ``drop_last=True``) is left out with a warning and the epoch is single-dimension.
    """

    def __init__(
        self,
        dims: Sequence[int],
        batch_size_2d: int,
        batch_size_3d: int,
        v: int | tuple[int, int] = 2,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_batches: int | None = None,
        first: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(seed, rank, world_size)
        dims_arr = np.asarray([int(d) for d in dims], dtype=np.int64)
        bad = np.flatnonzero((dims_arr != 2) & (dims_arr != 3))
        if len(bad):
            raise ValueError(f"{type(self).__name__}: item {int(bad[0])}: dim={int(dims_arr[bad[0]])}, expected 2 or 3")
        if first not in (2, 3):
            raise ValueError(f"{type(self).__name__}: first={first}, expected 2 or 3")
        v2, v3 = (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
        if v2 < 1 or v3 < 1 or batch_size_2d < 1 or batch_size_3d < 1:
            raise ValueError(
                f"{type(self).__name__}: v={v}, batch sizes ({batch_size_2d}, {batch_size_3d}) must be >= 1"
            )
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"{type(self).__name__}: num_batches={num_batches} must be >= 1 or None")
        self.batch_size = {2: int(batch_size_2d), 3: int(batch_size_3d)}
        self.v = {2: v2, 3: v3}
        self.shuffle, self.drop_last, self.num_batches = bool(shuffle), bool(drop_last), num_batches
        self._items = {d: np.flatnonzero(dims_arr == d) for d in (2, 3)}
        self._chunks = {
            d: _n_chunks(len(self._items[d]), self.batch_size[d] * self.world_size, self.drop_last) for d in (2, 3)
        }
        self.active = [d for d in (first, 5 - first) if self._chunks[d] > 0]  # dims in block order
        for d in (2, 3):
            if self._chunks[d] == 0:
                warnings.warn(
                    f"{type(self).__name__}: {len(self._items[d])} {d}D items < one global batch of "
                    f"{self.batch_size[d]} x {self.world_size} ranks: no {d}D batches, the epoch is single-dimension",
                    stacklevel=2,
                )
        self._length = self._count_steps()
        self._check_nonempty(f"{len(self._items[2])} 2D and {len(self._items[3])} 3D items")

    def _dim_of_step(self, t: int) -> int:
        if len(self.active) == 1:
            return self.active[0]
        a, b = self.active
        cycle = self.v[a] + self.v[b]
        return a if t % cycle < self.v[a] else b

    def _count_steps(self) -> int:
        if not self.active:
            return 0
        if self.num_batches is not None:
            return int(self.num_batches)
        remaining = dict(self._chunks)
        t = 0
        while remaining[self._dim_of_step(t)] > 0:
            remaining[self._dim_of_step(t)] -= 1
            t += 1
        return t

    def __len__(self) -> int:
        return self._length

    def _plan(self, epoch: int) -> list[_Step]:
        pools = {d: _Pool(self._items[d], self.seed, epoch, d, self.shuffle) for d in self.active}
        steps = []
        for t in range(self._length):
            d = self._dim_of_step(t)
            steps.append(_Step([pools[d].take(self.batch_size[d] * self.world_size)], (d,)))
        return steps
