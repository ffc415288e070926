"""Wiring helpers of the downstream bundles: the pretrained encoder into the network, the training set (images, or the
frozen encoder's cached features in ``finetune_mode: linear``), labels as loss targets.

Images are channels-first: 2D (C, H, W), 3D (C, X, Y, Z) with the depth axis last.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medssl.data.bundle_datasets import with_defaults
from medssl.data.pipeline import make_dataset
from medssl.evaluation.cache import cached_embeddings, encoder_fingerprint
from medssl.networks.multimodal_vit import MultiModalViTEmbedder
from medssl.utils.imports import locate
from medssl.weights import load_pretrained_encoder
from medssl.weights.export import load_manifest, manifest_path_for

from .task import check_finetune_mode, get_submodule

__all__ = [
    "prepare_network", "training_dataset", "cached_feature_items", "as_float", "no_pretrained", "encoder_network",
    "multimodal_vit_encoder",
]

logger = logging.getLogger(__name__)


def no_pretrained(path: Any) -> bool:
    """True for an empty ``pretrained_path`` (None, "", "none", "null", command-line spellings included)."""
    return path is None or str(path).strip().lower() in ("", "none", "null", "false")


def prepare_network(
    network: nn.Module,
    pretrained_path: str | os.PathLike | None = None,
    *,
    finetune_mode: str = "finetune",
    sha256: str | None = None,
    encoder_prefix: str = "encoder",
    spatial_dims: int | None = None,
    slice_wise: bool = False,
    preprocessing: Mapping | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """The downstream network with its pretrained encoder loaded (returns ``network``).

    ``finetune_mode="scratch"`` never loads (a ``pretrained_path`` given anyway is ignored with a warning: the
    random-initialisation baseline). ``"finetune"`` / ``"linear"`` load ``pretrained_path`` through
    :func:`medssl.weights.load_pretrained_encoder` (prefix mapping, shape and dimensionality checks, the manifest's
    preprocessing compared with ``preprocessing``, URLs with ``sha256``) and log its report; without a
    ``pretrained_path`` they warn that the encoder keeps its random initialisation.
    """
    check_finetune_mode(finetune_mode)
    get_submodule(network, encoder_prefix, owner="prepare_network")
    if finetune_mode == "scratch":
        if not no_pretrained(pretrained_path):
            logger.warning(f"finetune_mode='scratch': pretrained_path={pretrained_path} is ignored (random init)")
        return network
    if no_pretrained(pretrained_path):
        logger.warning(
            f"finetune_mode={finetune_mode!r} without a pretrained_path: the encoder keeps its random initialisation "
            "(set pretrained_path, or finetune_mode 'scratch' for the random-initialisation baseline)"
        )
        return network
    load_pretrained_encoder(  # logs / prints its report (what loaded, what did not, preprocessing warnings)
        network,
        str(pretrained_path),
        sha256=sha256,  # read by medssl.cli.as_sha256: an all-digit hash made an int by the command line counts
        encoder_prefix=encoder_prefix,
        spatial_dims=spatial_dims,
        slice_wise=slice_wise,
        preprocessing=preprocessing,
        cache_dir=cache_dir,
    )
    return network


def as_float(label: torch.Tensor) -> torch.Tensor:
    """A label tensor as float32 (the target of ``BCEWithLogitsLoss`` for multi-label tasks)."""
    return label.float()


def _label_tensor(label: Any, where: str) -> torch.Tensor:
    if isinstance(label, torch.Tensor):
        return label
    if isinstance(label, (bool, int)):
        return torch.tensor(int(label), dtype=torch.long)
    if isinstance(label, (list, tuple)):
        return torch.tensor([float(v) for v in label], dtype=torch.float32)
    raise ValueError(f"{where}: label {label!r} is not a class index or a multi-label vector")


def cached_feature_items(
    network: nn.Module,
    items: Sequence[dict],
    transform: Any,
    *,
    encoder_prefix: str = "encoder",
    cache_dir: str | os.PathLike | None = None,
    encoder_id: str = "encoder",
    preprocessing: Mapping | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    label_key: str = "label",
    features_key: str = "features",
) -> list[dict]:
    """The frozen encoder's features of ``items``, computed once (:func:`medssl.evaluation.cache.cached_embeddings`:
    a later run with the same encoder weights, preprocessing and items reads them from ``cache_dir``), as items
    ``{features_key: (D,) float32, label_key: label, "case": image path}`` for a head-only training set.
    ``transform`` must be deterministic (the evaluation preprocessing: no augmentation). Collective in a
    distributed run (every rank calls it and gets every item)."""
    encoder = get_submodule(network, encoder_prefix, owner="cached_feature_items")
    if device is not None:
        encoder.to(device)
    embeddings = cached_embeddings(
        encoder,
        list(items),
        transform,
        fingerprint=encoder_fingerprint(encoder) if cache_dir is not None else None,
        cache_dir=cache_dir,
        encoder_id=encoder_id,
        preprocessing=preprocessing,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        label_key=label_key,
    )
    if embeddings.features.shape[0] != len(items):
        raise RuntimeError(f"cached_feature_items: {embeddings.features.shape[0]} feature rows for {len(items)} items")
    out = []
    for i, item in enumerate(items):
        if label_key not in item:
            raise ValueError(f"cached_feature_items: item {i} ({item.get('image', '?')}) has no {label_key!r}")
        out.append(
            {
                features_key: embeddings.features[i].float(),
                label_key: _label_tensor(item[label_key], f"item {i} ({item.get('image', '?')})"),
                "case": str(item.get("case", item.get("image", f"#{i}"))),
            }
        )
    source = "read from the cache" if embeddings.from_cache else "computed"
    logger.info(
        f"linear mode: {len(out)} training items as cached encoder features ({embeddings.features.shape[1]}-d, "
        f"{source}{f', {embeddings.path}' if embeddings.path else ''}); the head trains on them"
    )
    return out


#: The keyword-only options of :func:`cached_feature_items`, which :func:`training_dataset` passes through to it.
_FEATURE_OPTIONS = tuple(
    name
    for name, parameter in inspect.signature(cached_feature_items).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
)


def training_dataset(
    data: Sequence[Any],
    transform: Any,
    *,
    defaults: Mapping[str, Any] | None = None,
    finetune_mode: str = "finetune",
    network: nn.Module | None = None,
    cache_features: bool = True,
    feature_transform: Any = None,
    **kwargs: Any,
):
    """The training dataset of a classification bundle (:func:`medssl.data.pipeline.make_dataset`: seeded and
    robust to unreadable files).

    * ``finetune_mode`` ``"finetune"`` / ``"scratch"``, or ``"linear"`` with ``cache_features=False``: the images
      through ``transform`` (loading + augmentation);
    * ``"linear"`` with ``cache_features``: the frozen encoder (``network.<encoder_prefix>``, pretrained weights
      already loaded) embeds every item once through ``feature_transform`` (deterministic; cached on disk under
      ``cache_dir`` keyed by weights + ``preprocessing`` + items, see :func:`cached_feature_items`) and the dataset
      holds ``{"features", "label", "case"}`` items: :class:`medssl.downstream.SupervisedTask` then runs only the
      head. Augmentation does not apply to cached features (the seeds' linear evaluations use none).

    ``data`` is the item list (the bundle's ``train#dataset#data``, which MONAI Label sets); ``defaults`` fills the keys
    its items lack (:func:`medssl.data.bundle_datasets.with_defaults`: the bundle's modality and dimension).

    ``kwargs``: the keyword-only options of :func:`cached_feature_items` (``encoder_prefix``, ``cache_dir``,
    ``encoder_id``, ``preprocessing``, ``batch_size``, ``device``, ``num_workers``, ``label_key``, ...) go to it
    (cached-feature linear mode only); the others go to :func:`medssl.data.pipeline.make_dataset` (``cache_rate``,
    ``on_bad_item``, ..., and ``datalist_name``, the only one kept for the cached features).
    """
    check_finetune_mode(finetune_mode)
    items = with_defaults(data, defaults)
    feature_options = {name: kwargs.pop(name) for name in _FEATURE_OPTIONS if name in kwargs}
    dataset_kwargs = kwargs
    if finetune_mode == "linear" and cache_features:
        if network is None or feature_transform is None:
            raise ValueError("training_dataset: linear mode with cached features needs network and feature_transform")
        features = cached_feature_items(network, items, feature_transform, **feature_options)
        kwargs = {k: v for k, v in dataset_kwargs.items() if k in ("datalist_name",)}
        return make_dataset(features, None, **kwargs)
    return make_dataset(items, transform, **dataset_kwargs)


def _manifest_backbone(path: str | os.PathLike | None) -> tuple[Path, dict] | None:
    """(manifest path, its ``backbone`` spec: ``_target_`` + ``kwargs``) of the manifest beside a local encoder file
    (or the manifest itself); None for no path, a URL, or a file without a manifest."""
    if no_pretrained(path) or "://" in str(path):
        return None
    local = Path(str(path))
    manifest_path = local if local.suffix == ".json" else manifest_path_for(local)
    if not manifest_path.is_file():
        return None
    return manifest_path, load_manifest(manifest_path)["backbone"]


def encoder_network(model_path: str | os.PathLike | None = None, target: str = "medssl.networks.ResNetBackbone",
                    **kwargs: Any) -> nn.Module:
    """The network of an exported encoder (untrained; the weights are loaded by whoever asked for it: MONAI's
    ``CheckpointLoader``, ``ckpt_export``).

    When the manifest ``tools/export_encoder.py`` writes beside the weights (``<model_path stem>.json``) exists, the
    backbone it names (``_target_`` + ``kwargs``: what the run trained, read from its config) is built and ``target`` /
    ``kwargs`` are ignored, with a log line; otherwise ``target(**kwargs)`` (the bundle's default architecture). So a
    pretraining bundle's ``inference.json`` and ``ckpt_export`` work on an encoder of any backbone size.
    """
    described = _manifest_backbone(model_path)
    if described is not None:
        manifest_path, spec = described
        logger.info(f"network: {spec['_target_']} as {manifest_path} describes it (the config's network_def values "
                    "are not used)")
        return locate(spec["_target_"], str(manifest_path))(**dict(spec.get("kwargs") or {}))
    return locate(target, "network_def")(**kwargs)


def multimodal_vit_encoder(
    pretrained_path: str | os.PathLike | None = None, kind: str = "2d", **kwargs: Any
) -> nn.Module:
    """The :class:`~medssl.networks.MultiModalViTEmbedder` of a MedCoSS downstream network, with only ``kind``'s
    tokenizer. When ``pretrained_path`` is a local stage ``encoder.pt`` (or converted encoder) with its manifest, the
    architecture is the manifest's (the pretraining's width, depth, patch and position-table sizes), so the weights fit
    whatever settings the chain ran with; otherwise (no path, a URL, no manifest) ``kwargs``."""
    spec = dict(kwargs)
    described = _manifest_backbone(pretrained_path)
    if described is not None:
        manifest_path, backbone = described
        if not str(backbone["_target_"]).endswith(("MultiModalViT", "MultiModalViTEmbedder")):
            raise ValueError(f"{manifest_path}: a {backbone['_target_']} encoder, not MedCoSS's MultiModalViT")
        spec = dict(backbone.get("kwargs") or {})
        logger.info(f"MedCoSS encoder as {manifest_path} describes it: {spec}")
    spec.pop("kinds", None)
    spec.pop("kind", None)
    return MultiModalViTEmbedder(kind, kinds=[kind], **spec)
