"""The DVME protocol's data regimes (:func:`parse_regimes`) and its seeded class-balanced folds with oversampling
(:func:`balanced_sample`, :func:`fold_samples`)."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np


# ---------------------------------------------------------------------------------------------- regimes and folds
def parse_regimes(regimes: Mapping[str, int | str | None]) -> dict[str, int | None]:
    """``{"small": 50, "medium": 500, "full": None}`` checked: counts are positive ints; ``None`` / ``"all"`` = every
    training item. The order is kept (it is the table's column order)."""
    if not isinstance(regimes, Mapping) or not regimes:
        raise ValueError(
            f"regimes: a non-empty mapping name → sample count (or null = all) is required, got {regimes!r}"
        )
    out: dict[str, int | None] = {}
    for name, count in regimes.items():
        if count is None or (isinstance(count, str) and count.lower() in ("all", "full")):
            out[str(name)] = None
        elif isinstance(count, int) and not isinstance(count, bool) and count > 0:
            out[str(name)] = count
        else:
            raise ValueError(f"regimes[{name!r}] = {count!r}: a positive sample count or null ('all') is required")
    return out


def balanced_sample(labels: Sequence[int] | np.ndarray, count: int | None, rng: np.random.RandomState) -> np.ndarray:
    """Indices of a class-balanced sample of ``count`` items (``None`` = ``len(labels)``) of ``labels``.

    Each class present gets ``count // C`` items, the first ``count % C`` classes of a random order one more. A class
    with at least its quota is sampled without replacement; a smaller class gives all its items plus draws with
    replacement up to its quota (oversampling). The result is shuffled; repeated indices are the oversampled items.
    """
    y = np.asarray(labels).reshape(-1)
    if y.size == 0:
        raise ValueError("balanced_sample: no labelled items to sample from")
    count = int(y.size if count is None else count)
    classes = np.unique(y)
    quotas = np.full(len(classes), count // len(classes))
    quotas[rng.permutation(len(classes))[: count % len(classes)]] += 1
    chosen = []
    for cls, quota in zip(classes, quotas):
        members = np.flatnonzero(y == cls)
        if quota <= len(members):
            chosen.append(rng.choice(members, size=quota, replace=False))
        else:
            chosen.append(np.concatenate([rng.permutation(members), rng.choice(members, quota - len(members))]))
    out = np.concatenate(chosen).astype(np.int64)
    return out[rng.permutation(len(out))]


def _fold_rng(seed: int, regime: str, fold: int) -> np.random.RandomState:
    return np.random.RandomState(np.random.SeedSequence([seed, zlib.crc32(regime.encode()), fold]).generate_state(1))


def fold_samples(labels: Sequence[int] | np.ndarray, count: int | None, folds: int = 5, seed: int = 0,
                 regime: str = "") -> list[np.ndarray]:
    """``folds`` independent class-balanced samples (:func:`balanced_sample`), fold k seeded by (seed, regime, k)."""
    if folds < 1:
        raise ValueError(f"fold_samples: folds must be >= 1, got {folds}")
    return [balanced_sample(labels, count, _fold_rng(seed, regime, k)) for k in range(folds)]


def _holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of training indices into (pool, held-out validation)."""
    rng = np.random.RandomState(seed)
    held = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        held.append(members[: max(1, int(round(fraction * len(members))))] if len(members) > 1 else members[:0])
    held_idx = np.sort(np.concatenate(held))
    pool = np.setdiff1d(np.arange(len(labels)), held_idx)
    return pool, held_idx
