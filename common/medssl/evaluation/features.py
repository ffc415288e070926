"""Frozen-feature extraction: embed every item of a data loader with an encoder, on one or several ranks.

:func:`extract_features` runs the encoder in eval mode under ``torch.no_grad`` over a loader and returns
``(features (N, D) float32 on CPU, labels (N, ...) or None, extras)``. In a multi-process run (a
``torch.distributed`` default group, e.g. from ``medssl.engines.init_distributed`` / ``torchrun``) every rank embeds
its own share of the items (the caller's loader splits them: a ``medssl.data.DistributedBatchSampler`` with
``shuffle=False, drop_last=False``, a ``torch`` / MONAI ``DistributedSampler``...) and the results are all-gathered,
so that every rank returns all N items, in dataset order, each once.

Which dataset item each row is (needed to undo the split and drop the padding duplicates that distributed samplers
add to even out the ranks) comes from, in this order:

1. the batch itself: ``batch[index_key]`` (default ``"index"``), the dataset index of each item, when the dataset
   provides it;
2. the loader's sampling plan, when it is deterministic: the loader's ``batch_sampler`` when it is a medssl sampler
   (it yields ``SampleKey(index, seed)``), or the ``sampler`` inside a torch ``BatchSampler`` when it is a
   ``SequentialSampler``, a ``DistributedSampler`` (torch's or MONAI's: seeded by epoch) or a plain sequence of
   indices. The plan is listed once before the pass and checked against the number of items the loader delivers.

With neither (a ``RandomSampler``, an unknown custom sampler, an iterable dataset), a single process returns the
items in the order the loader gave them (``extras["indices"]`` is None) and a multi-process run raises an error
that says how to fix the loader.

The rows are returned sorted by dataset index with duplicates removed (the first occurrence is kept: with
deterministic evaluation transforms all copies are equal). Items that no rank embedded (``drop_last=True``) are
missing from the result; a warning gives their number, and ``extras["indices"]`` says which items the rows are.

Image tensors are channels-first: 2D batches ``(B, C, H, W)``, 3D batches ``(B, C, X, Y, Z)`` with the depth axis
last (MONAI / RAS convention); the encoder gets them as the loader collates them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import BatchSampler, DistributedSampler, SequentialSampler

from medssl.utils.dist import all_gather_object, get_rank, get_world_size
from medssl.utils.tensors import as_plain_tensor, unwrap_module


__all__ = ["extract_features", "planned_indices", "merge_rank_results"]

logger = logging.getLogger(__name__)

_AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _owner_module(encoder: Any) -> nn.Module | None:
    """The module whose train / eval mode matters: the encoder itself, or the module of a bound method."""
    if isinstance(encoder, nn.Module):
        return encoder
    owner = getattr(encoder, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


@contextlib.contextmanager
def _eval_mode(module: nn.Module | None):
    """Put ``module`` (and all its sub-modules) in eval mode; restore each sub-module's own flag afterwards (a
    sub-module deliberately kept in eval mode inside a training model stays so)."""
    if module is None:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _default_device(encoder: Any) -> torch.device:
    owner = _owner_module(encoder)
    if owner is not None:
        for tensor in owner.parameters():
            return tensor.device
        for tensor in owner.buffers():
            return tensor.device
    return torch.device("cpu")


def _autocast(device: torch.device, amp: bool | str):
    if not amp or device.type != "cuda":
        return contextlib.nullcontext()
    if isinstance(amp, str):
        if amp not in _AMP_DTYPES:
            raise ValueError(f"extract_features: amp={amp!r}; expected a bool or one of {sorted(_AMP_DTYPES)}")
        dtype = _AMP_DTYPES[amp]
    else:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _as_features(output: Any, batch_size: int) -> torch.Tensor:
    """The encoder output as (B, D) float32 on CPU: a tuple / list gives its first element; a feature map
    (B, C, *spatial) is average-pooled over its spatial axes."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"extract_features: the encoder returned {type(output).__name__}; expected a (B, D) tensor")
    output = as_plain_tensor(output).detach()
    if output.dim() > 2:
        output = output.flatten(2).mean(dim=2)
    if output.dim() != 2 or output.shape[0] != batch_size:
        raise ValueError(
            f"extract_features: the encoder returned shape {tuple(output.shape)} for a batch of {batch_size}; "
            "expected (B, D) features (or a (B, C, *spatial) map, pooled)"
        )
    return output.float().cpu()


def _batch_labels(value: Any) -> torch.Tensor | None:
    """Per-item labels of a batch as a CPU tensor (class indices or multi-label vectors); None when the labels are
    not numeric (e.g. mask paths)."""
    value = as_plain_tensor(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        tensor = torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError):
        return None
    return tensor if tensor.is_floating_point() or tensor.dtype in _INT_DTYPES else None


def _per_item(value: Any, batch_size: int) -> list | None:
    """A batch entry as a list of ``batch_size`` per-item values (None when it is not one value per item)."""
    if isinstance(value, torch.Tensor):
        value = as_plain_tensor(value)
        return value.tolist() if value.dim() >= 1 and value.shape[0] == batch_size else None
    if isinstance(value, (list, tuple)) and len(value) == batch_size:
        return list(value)
    return None


def _sample_index(key: Any) -> int:
    index = getattr(key, "index", key)  # medssl SampleKey(index, seed) or a plain index
    return int(index)


def planned_indices(data_loader: Any) -> list[int] | None:
    """The dataset indices ``data_loader`` will deliver in its next pass, in order, when its sampling is
    deterministic and known (see the module docstring); None otherwise. Lists the plan without advancing it."""
    batch_sampler = getattr(data_loader, "batch_sampler", None)
    if batch_sampler is None:
        return None
    if not isinstance(batch_sampler, BatchSampler):
        # a medssl batch sampler: its plan is a pure function of (seed, epoch)
        if hasattr(batch_sampler, "global_batches") and hasattr(batch_sampler, "set_epoch"):
            return [_sample_index(key) for batch in batch_sampler for key in batch]
        return None
    sampler = batch_sampler.sampler
    if isinstance(sampler, (SequentialSampler, DistributedSampler)) or isinstance(sampler, (range, Sequence)):
        return [_sample_index(key) for key in sampler]
    return None


def merge_rank_results(
    indices: Sequence[torch.Tensor], features: Sequence[torch.Tensor], num_items: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo a distributed split: ``indices[r]`` / ``features[r]`` are the dataset indices and feature rows of rank
    ``r``. Returns ``(unique sorted indices, position of each in the rank-order concatenation)``: the first
    occurrence of each index wins, so the padding duplicates are dropped. ``num_items`` (the dataset length, when
    known) only serves the warning about items no rank embedded."""
    all_indices = torch.cat([torch.as_tensor(i, dtype=torch.long).reshape(-1) for i in indices])
    n_rows = sum(int(f.shape[0]) for f in features)
    if all_indices.numel() != n_rows:
        raise ValueError(f"merge_rank_results: {all_indices.numel()} indices for {n_rows} feature rows")
    if all_indices.numel() == 0:
        return all_indices, all_indices
    positions = torch.arange(all_indices.numel())
    order = torch.argsort(all_indices, stable=True)  # stable: among equal indices the rank-order first comes first
    sorted_indices = all_indices[order]
    keep = torch.ones_like(sorted_indices, dtype=torch.bool)
    keep[1:] = sorted_indices[1:] != sorted_indices[:-1]
    unique, rows = sorted_indices[keep], positions[order][keep]
    if num_items is not None and unique.numel() < num_items:
        logger.warning(
            f"extract_features: {num_items - unique.numel()} of {num_items} dataset items were not embedded by any "
            "rank (a sampler with drop_last=True?); the result holds the other items (extras['indices'])"
        )
    return unique, rows


def _gather_rows(tensor: torch.Tensor, counts: Sequence[int], comm_device: torch.device) -> list[torch.Tensor]:
    """All-gather a (n_r, D) float32 tensor whose first dimension differs between ranks (padded to the largest)."""
    world_size = get_world_size()
    if world_size == 1:
        return [tensor]
    width = tensor.shape[1]
    padded = torch.zeros((max(max(counts), 1), width), dtype=tensor.dtype, device=comm_device)
    padded[: tensor.shape[0]] = tensor.to(comm_device)
    buffers = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(buffers, padded)
    return [b[:n].cpu() for b, n in zip(buffers, counts)]


def extract_features(
    encoder: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    data_loader: Iterable,
    device: torch.device | str | None = None,
    image_key: str = "image",
    label_key: str | None = "label",
    amp: bool | str = False,
    index_key: str = "index",
    extra_keys: Sequence[str] = ("modality",),
    log_every: int = 50,
    description: str = "features",
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """Embed every item of ``data_loader`` with ``encoder`` (see the module docstring for the distributed split).

    Args:
        encoder: an ``nn.Module`` or any callable mapping a batch of images ``(B, C, H, W)`` / ``(B, C, X, Y, Z)``
            (depth last) to ``(B, D)`` features; a feature map ``(B, C, *spatial)`` is average-pooled, a tuple / list
            output gives its first element. A DDP wrapper is removed; the module (or the module of a bound method)
            runs in eval mode and every sub-module's train / eval flag is restored afterwards.
        data_loader: yields collated sample dicts holding ``image_key`` (and ``label_key``, ``index_key``,
            ``extra_keys`` when present). In a multi-process run, each rank's loader gives that rank's share.
        device: where the encoder runs; default: the device of its first parameter (CPU for a plain callable).
        image_key, label_key: batch keys of the images and of the labels (``None``: no labels).
        amp: run under ``torch.autocast`` on CUDA (True: bf16 where supported, else fp16; or ``"bf16"`` /
            ``"fp16"``); ignored on CPU. Features are returned as float32 whatever the autocast dtype.
        index_key: batch key of each item's dataset index (optional, see the module docstring).
        extra_keys: per-item batch entries returned in ``extras`` (lists, same order as the rows), when present.
        log_every: a progress line every this many batches (rank 0; 0 = none).
        description: name of this extraction in the log lines.

    Returns:
        ``features`` (N, D) float32 CPU; ``labels`` (N, ...) CPU tensor, or None when the batches have no numeric
        ``label_key``; ``extras``: ``"indices"`` (N,) long tensor of the dataset index of each row (None when
        unknown), one list per found ``extra_keys`` entry, ``"num_batches"`` (this rank), ``"seconds"``.

    Every rank must call this function (it is a collective when a process group is initialised).
    """
    encoder = unwrap_module(encoder)
    device = torch.device(device) if device is not None else _default_device(encoder)
    world_size, rank = get_world_size(), get_rank()
    plan = planned_indices(data_loader)
    try:
        num_batches: int | None = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        num_batches = None

    local_features: list[torch.Tensor] = []
    local_labels: list[torch.Tensor] = []
    labels_usable = label_key is not None
    local_indices: list[int] = []
    batch_indices_seen = True
    local_extras: dict[str, list] = {key: [] for key in extra_keys}
    n_items, start, batch_i = 0, time.perf_counter(), 0
    with _eval_mode(_owner_module(encoder)), torch.no_grad():
        for batch_i, batch in enumerate(data_loader, start=1):
            if not isinstance(batch, Mapping) or image_key not in batch:
                keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
                raise KeyError(f"extract_features({description}): batch {batch_i} has no {image_key!r} entry ({keys})")
            images = as_plain_tensor(batch[image_key])
            batch_size = int(images.shape[0])
            with _autocast(device, amp):
                output = encoder(images.to(device, non_blocking=True))
            local_features.append(_as_features(output, batch_size))
            if labels_usable:
                labels = _batch_labels(batch[label_key]) if label_key in batch else None
                if labels is None or labels.shape[:1] != (batch_size,):
                    labels_usable = False
                else:
                    local_labels.append(labels)
            batch_index = _batch_labels(batch[index_key]) if batch_indices_seen and index_key in batch else None
            if batch_index is not None and batch_index.numel() == batch_size and not batch_index.is_floating_point():
                local_indices.extend(int(i) for i in batch_index.reshape(-1).tolist())
            else:
                batch_indices_seen = False
            for key in extra_keys:
                values = _per_item(batch.get(key), batch_size) if key in local_extras else None
                if values is None:
                    local_extras.pop(key, None)
                else:
                    local_extras[key].extend(values)
            n_items += batch_size
            if log_every and rank == 0 and batch_i % log_every == 0:
                rate = n_items / max(time.perf_counter() - start, 1e-9)
                total = f"/{num_batches}" if num_batches is not None else ""
                logger.info(
                    f"{description}: batch {batch_i}{total} ({n_items * world_size} items on {world_size} rank(s), "
                    f"{rate * world_size:.1f} items/s)"
                )

    if batch_i == 0:
        batch_indices_seen = False
    indices: list[int] | None = local_indices if batch_indices_seen else None
    if indices is None and plan is not None:
        if len(plan) != n_items:
            raise RuntimeError(
                f"extract_features({description}): the loader delivered {n_items} items but its sampler plans "
                f"{len(plan)}; give each item its dataset index in the batch under {index_key!r}"
            )
        indices = plan
    features = torch.cat(local_features) if local_features else torch.zeros((0, 0))
    labels_local = torch.cat(local_labels) if labels_usable and local_labels else None

    # ---- agree across ranks on what every rank has, then gather
    meta = {
        "count": n_items,
        "dim": int(features.shape[1]) if n_items else None,
        "indexed": indices is not None,
        "labelled": labels_local is not None or n_items == 0,
        "extras": sorted(local_extras) if n_items else None,
    }
    metas = all_gather_object(meta)
    dims = {m["dim"] for m in metas if m["dim"] is not None}
    if len(dims) > 1:
        raise RuntimeError(f"extract_features({description}): the ranks' encoders gave feature sizes {sorted(dims)}")
    width = dims.pop() if dims else 0
    counts = [int(m["count"]) for m in metas]
    if features.shape[1] != width:
        features = features.reshape(0, width)
    indexed = all(m["indexed"] for m in metas)
    if world_size > 1 and not indexed:
        raise ValueError(
            f"extract_features({description}): cannot tell which dataset items each rank embedded: use a "
            "deterministic distributed sampler (medssl.data.DistributedBatchSampler(shuffle=False, drop_last=False), "
            f"torch / MONAI DistributedSampler) or put each item's dataset index in the batch under {index_key!r}"
        )
    labelled = all(m["labelled"] for m in metas) and sum(counts) > 0
    extra_names = set(extra_keys)
    for m in metas:
        if m["extras"] is not None:
            extra_names &= set(m["extras"])

    comm_device = device if world_size > 1 and dist.get_backend() == "nccl" else torch.device("cpu")
    all_features = torch.cat(_gather_rows(features, counts, comm_device))
    payload = {
        "indices": indices if indexed else None,
        "labels": labels_local if labelled else None,
        "extras": {k: local_extras[k] for k in extra_names if k in local_extras},
    }
    payloads = all_gather_object(payload)
    all_labels = torch.cat([p["labels"] for p in payloads if p["labels"] is not None]) if labelled else None
    all_extras = {k: [v for p in payloads for v in p["extras"].get(k, [])] for k in sorted(extra_names)}

    extras: dict[str, Any] = {"indices": None}
    if indexed:
        try:
            num_dataset_items: int | None = len(data_loader.dataset)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            num_dataset_items = None
        unique, rows = merge_rank_results(
            [torch.as_tensor(p["indices"], dtype=torch.long) for p in payloads],
            [torch.zeros((n, 0)) for n in counts],
            num_items=num_dataset_items,
        )
        all_features = all_features[rows]
        all_labels = all_labels[rows] if all_labels is not None else None
        for key, values in all_extras.items():
            all_extras[key] = [values[i] for i in rows.tolist()]
        extras["indices"] = unique
    extras.update(all_extras)
    seconds = time.perf_counter() - start
    extras["num_batches"] = batch_i
    extras["seconds"] = seconds
    if log_every and rank == 0:
        logger.info(f"{description}: embedded {all_features.shape[0]} items (D={width}) in {seconds:.1f} s")
    return all_features.float().contiguous(), all_labels, extras
