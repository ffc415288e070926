"""MedCoSS's rehearsal buffer: the items a later stage replays from an earlier modality.

Built at the end of a stage from that stage's training items: one feature per item (the mean of all encoder output
tokens, no masking, no augmentation; the caller computes them), scikit-learn's k-means with ``int(0.01 * N)``
clusters (at least 1), then the ``int(0.05 * N / n_clusters)`` members nearest each centroid (all members of a smaller
cluster): about 5 % of N. The buffer is saved as a medssl datalist (``training`` section), so a person can open it
and see which files were kept; each item gains ``"buffer_cluster"`` and ``"buffer_distance"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["buffer_sizes", "select_rehearsal_items", "write_rehearsal_datalist"]


def buffer_sizes(n_items: int, cluster_fraction: float = 0.01, keep_fraction: float = 0.05) -> tuple[int, int]:
    """``(n_clusters, kept per cluster)`` for ``n_items``: ``max(1, int(cluster_fraction * N))`` and
    ``max(1, int(keep_fraction * N / n_clusters))`` (the MedCoSS authors' rounding, at least one of each)."""
    if n_items < 1:
        raise ValueError(f"rehearsal buffer: no items to select from (N = {n_items})")
    n_clusters = max(1, int(cluster_fraction * n_items))
    per_cluster = max(1, int(keep_fraction * n_items / n_clusters))
    return n_clusters, per_cluster


def select_rehearsal_items(
    features: np.ndarray, cluster_fraction: float = 0.01, keep_fraction: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the buffer items among ``features`` (N, D): ``(indices, cluster of each, distance to its centroid)``,
    ordered by cluster, then distance."""
    from sklearn.cluster import KMeans

    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or not np.isfinite(feats).all():
        raise ValueError(f"rehearsal buffer: features must be a finite (N, D) array, got shape {feats.shape}")
    n_clusters, per_cluster = buffer_sizes(len(feats), cluster_fraction, keep_fraction)
    kmeans = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit(feats)
    distances = np.linalg.norm(feats - kmeans.cluster_centers_[kmeans.labels_], axis=1)
    chosen, clusters, dists = [], [], []
    for c in range(n_clusters):
        members = np.flatnonzero(kmeans.labels_ == c)
        nearest = members[np.argsort(distances[members], kind="stable")[:per_cluster]]
        chosen.extend(nearest.tolist())
        clusters.extend([c] * len(nearest))
        dists.extend(distances[nearest].tolist())
    return np.asarray(chosen, dtype=np.int64), np.asarray(clusters, dtype=np.int64), np.asarray(dists)


def write_rehearsal_datalist(
    path: str | os.PathLike,
    items: Sequence[Mapping[str, Any]],
    indices: Sequence[int],
    clusters: Sequence[int],
    distances: Sequence[float],
    **meta: Any,
) -> Path:
    """Write the buffer as a datalist (``{"name", "training": [...], **meta}``); returns the path."""
    if len(indices) != len(clusters) or len(indices) != len(distances):
        raise ValueError("rehearsal buffer: indices, clusters and distances differ in length")
    kept = [
        {**items[int(i)], "buffer_cluster": int(c), "buffer_distance": round(float(d), 6)}
        for i, c, d in zip(indices, clusters, distances)
    ]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"name": meta.pop("name", "MedCoSS rehearsal buffer"), **meta, "numTraining": len(kept), "training": kept}
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out)
    return out
