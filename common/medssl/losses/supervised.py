"""The supervised term of hybrid SSL: cross-entropy over the labelled items of a partly labelled global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medssl.utils.dist import all_reduce_sum, get_world_size

__all__ = ["supervised_loss"]


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, n_views: int) -> tuple[torch.Tensor, int]:
    """Hybrid term L_sup over the labelled items, averaged over the labelled (item, view) pairs of the GLOBAL batch.

    ``logits`` (n_views·B, num_classes) view-major; ``labels`` (B,) long with −1 = unlabelled (cross-entropy), or
    (B, num_classes) float with rows of −1 = unlabelled (binary cross-entropy, averaged over the classes). The sum
    over this rank's pairs is divided by the global count (all-reduced) and multiplied by the world size, so that
    after DistributedDataParallel's gradient averaging every labelled pair of the global batch weighs the same
    whatever rank holds it. With no labelled item anywhere the loss is 0 (still connected to the graph).

    Returns (L_sup, number of labelled items on this rank).
    """
    if labels.dim() == 1:
        valid = labels >= 0
    elif labels.dim() == 2:
        valid = (labels >= 0).all(dim=1)
    else:
        raise ValueError(f"SwAV: class labels must be (B,) or (B, num_classes), got shape {tuple(labels.shape)}")
    n_local = int(valid.sum())
    count = torch.tensor([float(n_local * n_views)], device=logits.device)
    all_reduce_sum(count)
    logits = logits.float()
    if n_local == 0:  # nothing labelled on this rank (the count above is still a collective of every rank)
        return 0.0 * logits.sum(), n_local
    valid_rows = valid.repeat(n_views)
    targets = labels.repeat(n_views, *([1] * (labels.dim() - 1)))[valid_rows]
    if labels.dim() == 1:
        total = F.cross_entropy(logits[valid_rows], targets.long(), reduction="sum")
    else:
        total = F.binary_cross_entropy_with_logits(logits[valid_rows], targets.float(), reduction="none").mean(1).sum()
    return total * get_world_size() / count[0], n_local
