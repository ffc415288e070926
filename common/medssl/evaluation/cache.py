"""On-disk cache of frozen-encoder embeddings, keyed by the encoder's weights, the preprocessing and the items.

Linear probes, ``finetune_mode: linear`` and DVME train small heads on embeddings of FROZEN encoders: embedding
the images is the expensive part and depends only on (encoder weights, preprocessing, images). :func:`cached_embeddings`
embeds a list of datalist items once and stores ``(features, labels, keys)`` in ``cache_dir``; a later call with the
same encoder, preprocessing and items reads the file instead (``EmbeddingSet.from_cache`` is True).

The cache key is the sha256 of a JSON record of:

* ``encoder_id`` (a name chosen by the caller, also the file-name prefix),
* :func:`encoder_fingerprint`: the sha256 of the encoder's state dict (names, shapes, dtypes and bytes) and its class,
  or of an exported encoder's manifest (its ``encoder_sha256`` and ``backbone`` spec),
* ``preprocessing``: the caller's JSON description of how images are prepared (the bundle's ``preprocessing_spec``;
  change it whenever the transform changes, since a transform object cannot be hashed reliably),
* the items' ``image`` and ``label`` entries, in order, plus each image file's size and modification time.

Files are ``<cache_dir>/<encoder_id>-<key[:16]>.pt`` written atomically (temp file + rename) and read with
``torch.load(weights_only=True)``; a corrupt or mismatching file is ignored with a warning and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medssl.evaluation.features import extract_features
from medssl.utils.dist import get_rank
from medssl.utils.io import atomic_torch_save
from medssl.weights.export import load_manifest

__all__ = ["EmbeddingSet", "encoder_fingerprint", "embedding_cache_key", "cached_embeddings"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = "medssl-embeddings/1"


@dataclass
class EmbeddingSet:
    """Embeddings of a list of items: ``features`` (N, D) float32, ``labels`` (N, ...) or None, ``keys`` (the
    items' image paths), ``modalities``, whether they were read from the cache, and the cache file."""

    features: torch.Tensor
    labels: torch.Tensor | None
    keys: list[str]
    modalities: list[str] = field(default_factory=list)
    from_cache: bool = False
    path: Path | None = None


def encoder_fingerprint(encoder: nn.Module | None = None, manifest_path: str | Path | None = None) -> str:
    """A sha256 identifying an encoder's weights: of its state dict (class name, every tensor's name, dtype, shape
    and bytes), or, given ``manifest_path`` of an exported encoder, of the manifest's ``encoder_sha256`` and
    ``backbone`` spec (no need to hash the weights again)."""
    digest = hashlib.sha256()
    if manifest_path is not None:
        manifest = load_manifest(manifest_path)
        if not manifest.get("encoder_sha256"):
            raise ValueError(f"{manifest['_manifest_path']}: no encoder_sha256 to fingerprint the encoder with")
        digest.update(json.dumps([manifest["encoder_sha256"], manifest["backbone"]], sort_keys=True).encode())
        return digest.hexdigest()
    if encoder is None:
        raise ValueError("encoder_fingerprint: give an encoder module or a manifest_path")
    module = getattr(encoder, "module", encoder) if isinstance(encoder, nn.parallel.DistributedDataParallel) else encoder
    digest.update(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _item_record(item: Mapping[str, Any]) -> list:
    image = item.get("image")
    stat: list = []
    if isinstance(image, (str, os.PathLike)) and os.path.exists(image):
        s = os.stat(image)
        stat = [s.st_size, int(s.st_mtime)]
    label = item.get("label")
    return [str(image), label if isinstance(label, (int, float, str, list)) or label is None else str(label), stat]


def embedding_cache_key(
    encoder_id: str, fingerprint: str, preprocessing: Mapping[str, Any] | None, items: Sequence[Mapping[str, Any]]
) -> str:
    """The sha256 cache key of (encoder id, encoder fingerprint, preprocessing, items); see the module docstring."""
    record = {
        "format": CACHE_FORMAT,
        "encoder_id": str(encoder_id),
        "fingerprint": fingerprint,
        "preprocessing": preprocessing or {},
        "items": [_item_record(it) for it in items],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "encoder"


def _read_cache(path: Path, key: str, num_items: int) -> dict | None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged cache file is recomputed, not fatal
        logger.warning(f"embedding cache {path}: unreadable ({type(e).__name__}: {e}); recomputing")
        return None
    if not isinstance(data, dict) or data.get("key") != key or data.get("format") != CACHE_FORMAT:
        logger.warning(f"embedding cache {path}: written for other inputs; recomputing")
        return None
    if not isinstance(data.get("features"), torch.Tensor) or data["features"].shape[0] != num_items:
        logger.warning(f"embedding cache {path}: holds a different number of items; recomputing")
        return None
    return data


def cached_embeddings(
    encoder: nn.Module,
    items: Sequence[Mapping[str, Any]],
    transform: Any,
    *,
    cache_dir: str | Path | None,
    encoder_id: str,
    preprocessing: Mapping[str, Any] | None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    fingerprint: str | None = None,
    label_key: str | None = "label",
    amp: bool | str = False,
    before_compute: Callable[[], None] | None = None,
) -> EmbeddingSet:
    """Embed ``items`` with the frozen ``encoder`` once; later calls with the same inputs read the cache.

    Args:
        encoder: the module (run in eval mode under no_grad; see :func:`medssl.evaluation.extract_features` for the
            output forms accepted).
        items: datalist items (absolute ``image`` paths, e.g. from :func:`medssl.data.pipeline.load_items`).
        transform: the deterministic MONAI transform producing ``{"image": (C, *spatial)}`` from an item.
        cache_dir: where cache files live; None = no caching (always computed).
        encoder_id: the encoder's name (file-name prefix, part of the key).
        preprocessing: JSON description of ``transform`` (part of the key).
        batch_size, device, num_workers, amp: of the extraction.
        fingerprint: the encoder's fingerprint when already known (e.g. from its manifest); default: hashed from
            its state dict.
        label_key: item key of the labels kept with the embeddings (None: none).
        before_compute: called once the cache has missed, before embedding (e.g. recalibrating BatchNorm statistics,
            which a cache hit makes unnecessary).

    Every rank of a distributed run gets all N embeddings; only rank 0 writes the cache file.
    """
    from monai.data import DataLoader, Dataset

    items = list(items)
    if not items:
        raise ValueError(f"cached_embeddings({encoder_id}): no items to embed")
    keys = [str(it.get("image")) for it in items]
    modalities = [str(it.get("modality", "")) for it in items]
    path: Path | None = None
    if cache_dir is not None:
        fingerprint = fingerprint or encoder_fingerprint(encoder)
        key = embedding_cache_key(encoder_id, fingerprint, preprocessing, items)
        path = Path(cache_dir) / f"{_safe_name(encoder_id)}-{key[:16]}.pt"
        if path.is_file():
            data = _read_cache(path, key, len(items))
            if data is not None:
                logger.info(f"embeddings of {len(items)} items by {encoder_id}: read from cache {path}")
                return EmbeddingSet(data["features"], data.get("labels"), keys, modalities, True, path)
    if before_compute is not None:
        before_compute()
    dataset = Dataset(data=[{**it, "index": i} for i, it in enumerate(items)], transform=transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    features, labels, _ = extract_features(
        encoder, loader, device=device, label_key=label_key, amp=amp, description=f"embeddings[{encoder_id}]"
    )
    if features.shape[0] != len(items):
        raise RuntimeError(f"cached_embeddings({encoder_id}): {features.shape[0]} embeddings for {len(items)} items")
    if path is not None and get_rank() == 0:
        atomic_torch_save(
            {"format": CACHE_FORMAT, "key": key, "features": features, "labels": labels, "encoder_id": encoder_id},
            path,
        )
        logger.info(f"embeddings of {len(items)} items by {encoder_id}: computed, cached in {path}")
    return EmbeddingSet(features, labels, keys, modalities, False, path)
