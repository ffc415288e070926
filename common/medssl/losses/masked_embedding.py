"""L_mask of masked slice-embedding prediction: squared error on the masked slices only."""

from __future__ import annotations

import torch

__all__ = ["masked_embedding_loss"]


def masked_embedding_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_mask (Nguyen et al., joint image-volume SSL, AAAI 2023, Eq. 15): squared error Σ_d (f_decode(h)_{b,j,d} −
    e_{b,j,d})² summed over the masked slices only and divided by their number (the paper sums over masked slices; the
    mean keeps the scale independent of B and F). ``prediction``, ``target``: (B, F, D); ``mask``: (B, F) bool, True =
    masked."""
    if prediction.shape != target.shape or mask.shape != prediction.shape[:2]:
        raise ValueError(
            f"masked_embedding_loss: prediction {tuple(prediction.shape)}, target {tuple(target.shape)} and mask "
            f"{tuple(mask.shape)} must be (B, F, D), (B, F, D) and (B, F)"
        )
    mask = mask.to(torch.bool)
    if not bool(mask.any()):
        raise ValueError("masked_embedding_loss: the mask selects no slice")
    error = (prediction.float() - target.float()).pow(2).sum(dim=-1)  # (B, F)
    return error[mask].sum() / mask.sum()
