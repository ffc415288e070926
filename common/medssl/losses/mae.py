"""MedCoSS's objectives: MAE's normalised-pixel reconstruction for 2D images and 3D volumes, BERT's masked language
modelling for text.

- :func:`patchify`: (B, C, X, Y) or (B, C, X, Y, Z) -> (B, N, prod(patch) * C), patches row-major over the grid (X
  slowest, the token order of :class:`medssl.networks.MultiModalViT`), values within a patch ordered (x, y[, z], c).
- :func:`normalized_pixel_loss`: each target patch normalised by its own mean and unbiased variance
  (``(p - mean) / sqrt(var + 1e-6)``, ``torch.var``'s default as in MAE), squared error averaged per patch, then over
  the masked patches only. A zero prediction scores ``(n - 1) / n * var / (var + 1e-6)`` on a patch of n values:
  767 / 768 = 0.998698 where var >> 1e-6 (the biased variance would give 1).
- :func:`mlm_mask`: of the real tokens (``attention_mask`` nonzero, minus ``special_ids``) ``round(prob * count)``
  per sequence (at least one) are chosen, then 80 % become ``mask_token_id``, 10 % a random id, 10 % stay.
  Labels are the original ids at the chosen positions and -100 elsewhere; :func:`mlm_loss` is the cross-entropy on
  those positions. A fixed count per sequence (BERT draws each token with probability 0.15) never leaves a batch
  without a target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_LABEL", "patchify", "normalized_pixel_loss", "mlm_mask", "mlm_loss"]

IGNORE_LABEL = -100


def patchify(images: torch.Tensor, patch: int | Sequence[int]) -> torch.Tensor:
    """Non-overlapping patches of a batch of images (B, C, X, Y) or volumes (B, C, X, Y, Z): (B, N, patch values)."""
    dims = images.dim() - 2
    if dims not in (2, 3):
        raise ValueError(f"patchify: expected (B, C, X, Y) or (B, C, X, Y, Z), got shape {tuple(images.shape)}")
    size = (int(patch),) * dims if isinstance(patch, int) else tuple(int(p) for p in patch)
    b, c, *spatial = images.shape
    if len(size) != dims or any(s % p for s, p in zip(spatial, size)):
        raise ValueError(f"patchify: spatial shape {tuple(spatial)} is not a multiple of patch {size}")
    grid = [s // p for s, p in zip(spatial, size)]
    shape = [b, c] + [v for g, p in zip(grid, size) for v in (g, p)]  # B, C, g1, p1, g2, p2[, g3, p3]
    grid_axes = [2 + 2 * i for i in range(dims)]
    order = [0] + grid_axes + [a + 1 for a in grid_axes] + [1]
    return images.reshape(shape).permute(order).reshape(b, math.prod(grid), math.prod(size) * c)


def normalized_pixel_loss(
    pred: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """MAE's loss: ``pred`` and ``target_patches`` (B, N, P), ``mask`` (B, N) 1 = masked; mean over masked patches."""
    if pred.shape != target_patches.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"normalized_pixel_loss: pred {tuple(pred.shape)}, target {tuple(target_patches.shape)} and mask "
            f"{tuple(mask.shape)} do not match (B, N, P) / (B, N)"
        )
    mean = target_patches.mean(dim=-1, keepdim=True)
    var = target_patches.var(dim=-1, keepdim=True)  # unbiased, as MAE and the MedCoSS authors
    target = (target_patches - mean) / (var + eps).sqrt()
    per_patch = (pred - target).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def mlm_mask(
    ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    vocab_size: int,
    mask_token_id: int,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
    special_ids: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking of ``ids`` (B, L): ``(input ids, labels)``, see the module docstring.

    Padding (``attention_mask == 0``) and ``special_ids`` (e.g. [CLS], [SEP]) are never chosen; ``generator`` (on
    ``ids``' device) makes the draw reproducible."""
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"mlm_mask: prob must be in (0, 1], got {prob!r}")
    if ids.dim() != 2:
        raise ValueError(f"mlm_mask: expected ids (B, L), got shape {tuple(ids.shape)}")
    eligible = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool().clone()
    for special in special_ids:
        eligible &= ids != special
    count = eligible.sum(dim=1)
    chosen_per_row = torch.where(count > 0, (count.float() * prob).round().long().clamp_min(1), count)
    scores = torch.rand(ids.shape, generator=generator, device=ids.device).masked_fill(~eligible, 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    chosen = ranks < chosen_per_row[:, None]
    labels = ids.masked_fill(~chosen, IGNORE_LABEL)
    action = torch.rand(ids.shape, generator=generator, device=ids.device)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device=ids.device, dtype=ids.dtype)
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(ids, mask_token_id), ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` (B, L, vocab) on the chosen positions of ``labels`` (B, L; -100 elsewhere)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_LABEL)
