"""Heads put on top of a backbone's pooled features for self-supervised pretraining.

- :class:`ProjectionHead`: the SwAV / DeepCluster-v2 projection g: Linear → BN → ReLU → Linear → L2 normalise.
- :class:`SwAVPrototypes`: the prototype matrix C (one or several heads), a bias-free Linear whose rows are
  re-normalised in place at every iteration (SwAV) or overwritten by k-means centroids (DeepCluster-v2).
- :class:`PerModalityPrototypes`: one prototype matrix C_m per imaging modality (Ghesu et al. 2022, Eq. 4).
- :func:`prototype_assignments`: each row's argmax prototype, the part of a method's ``"health"`` output that
  :class:`medssl.evaluation.HealthMonitorHandler` turns into prototype usage.

All take flat features (N, in_dim); pool the backbone output first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ProjectionHead", "SwAVPrototypes", "PerModalityPrototypes", "prototype_assignments"]


class ProjectionHead(nn.Module):
    """Projection g(h) = normalize(W₂ · ReLU(BN(W₁ · h + b₁)) + b₂) (SwAV / DeepCluster-v2).

    Args:
        in_dim: backbone feature size (2048 for ResNet-50).
        hidden_dim: hidden width (2048); 0 gives a single Linear(in_dim, out_dim).
        out_dim: embedding size (128).
        normalize: L2-normalise the output rows (True: the embeddings z of the clustering losses).

    Input (N, in_dim), output (N, out_dim). Parameters with the defaults: 4,462,720.
    """

    def __init__(self, in_dim: int = 2048, hidden_dim: int = 2048, out_dim: int = 128, normalize: bool = True):
        super().__init__()
        if hidden_dim:
            self.mlp = nn.Sequential(
                nn.Linear(in_dim, hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, out_dim),
            )
        else:
            self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim))
        self.normalize = normalize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2:
            raise ValueError(f"ProjectionHead expects pooled features (N, C), got shape {tuple(features.shape)}")
        embeddings = self.mlp(features)
        return F.normalize(embeddings, dim=1) if self.normalize else embeddings


class SwAVPrototypes(nn.Module):
    """Prototype matrix C (K × feat_dim) as a bias-free Linear: scores = z · Cᵀ.

    Args:
        feat_dim: embedding size (128).
        n_prototypes: K (3000) for one head, or a sequence of K's for several heads (DeepCluster-v2 uses
            (3000, 3000, 3000)). With an int, ``forward`` returns one (N, K) tensor; with a sequence, a list.
    """

    def __init__(self, feat_dim: int = 128, n_prototypes: int | Sequence[int] = 3000):
        super().__init__()
        self.multi_head = not isinstance(n_prototypes, int)
        counts = [int(k) for k in n_prototypes] if self.multi_head else [int(n_prototypes)]
        if not counts or any(k < 1 for k in counts):
            raise ValueError(f"SwAVPrototypes: n_prototypes must be positive, got {n_prototypes!r}")
        self.feat_dim = feat_dim
        self.heads = nn.ModuleList([nn.Linear(feat_dim, k, bias=False) for k in counts])

    @property
    def n_prototypes(self) -> tuple[int, ...]:
        return tuple(head.out_features for head in self.heads)

    @property
    def weights(self) -> list[torch.Tensor]:
        """The prototype matrices C (K_h × feat_dim), one per head."""
        return [head.weight for head in self.heads]

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        scores = [head(embeddings) for head in self.heads]
        return scores if self.multi_head else scores[0]

    @torch.no_grad()
    def normalize_(self) -> SwAVPrototypes:
        """L2-normalise every prototype row in place (SwAV does it at the start of each iteration)."""
        for head in self.heads:
            head.weight.copy_(F.normalize(head.weight, dim=1, p=2))
        return self

    @torch.no_grad()
    def set_weights_(self, weights: Sequence[torch.Tensor] | torch.Tensor) -> SwAVPrototypes:
        """Overwrite the prototype matrices (DeepCluster-v2: with the k-means centroids), one per head."""
        if isinstance(weights, torch.Tensor):
            weights = [weights]
        if len(weights) != len(self.heads):
            raise ValueError(f"SwAVPrototypes.set_weights_: {len(weights)} matrices for {len(self.heads)} heads")
        for h, (head, w) in enumerate(zip(self.heads, weights)):
            if tuple(w.shape) != tuple(head.weight.shape):
                raise ValueError(
                    f"SwAVPrototypes.set_weights_: head {h} expects shape {tuple(head.weight.shape)}, "
                    f"got {tuple(w.shape)}"
                )
            head.weight.copy_(w)
        return self


class PerModalityPrototypes(nn.Module):
    """One prototype matrix C_m per modality m (Ghesu et al. 2022, Eq. 4).

    Args:
        modalities: canonical modality codes (e.g. ["CT", "MR", "XR"]); kept sorted.
        feat_dim: embedding size (128).
        n_prototypes: K per modality (int), or one K per head (sequence) as in :class:`SwAVPrototypes`.

    ``self[m]`` is modality m's :class:`SwAVPrototypes`; ``forward(embeddings, modality)`` its scores.
    """

    def __init__(self, modalities: Sequence[str], feat_dim: int = 128, n_prototypes: int | Sequence[int] = 3000):
        super().__init__()
        if isinstance(modalities, str):
            modalities = [modalities]
        names = sorted(modalities)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"PerModalityPrototypes: modalities must be a non-empty list without repeats, got {names}")
        self.prototypes = nn.ModuleDict({m: SwAVPrototypes(feat_dim, n_prototypes) for m in names})

    @property
    def modalities(self) -> list[str]:
        return list(self.prototypes.keys())

    def __getitem__(self, modality: str) -> SwAVPrototypes:
        if modality not in self.prototypes:
            raise ValueError(
                f"PerModalityPrototypes: modality {modality!r} is not configured; known: {self.modalities}"
            )
        return self.prototypes[modality]

    def __contains__(self, modality: str) -> bool:
        return modality in self.prototypes

    def forward(self, embeddings: torch.Tensor, modality: str) -> torch.Tensor | list[torch.Tensor]:
        return self[modality](embeddings)

    @torch.no_grad()
    def normalize_(self) -> PerModalityPrototypes:
        for prototypes in self.prototypes.values():
            prototypes.normalize_()
        return self


@torch.no_grad()
def prototype_assignments(
    embeddings: torch.Tensor, prototypes: Any, groups: Sequence[str] | None = None, temperature: float | None = None
) -> dict[str, Any]:
    """The ``"assignments"`` part of a method's ``"health"`` output: each row's argmax prototype (no gradient).

    ``prototypes``: a :class:`medssl.networks.heads.SwAVPrototypes` (several heads: the first one) or, with
    ``groups`` (one modality code per row), a :class:`~medssl.networks.heads.PerModalityPrototypes` (each row scored
    against its own modality's prototypes). Returns ``{"assignments": (N,) long, "n_prototypes": K, "groups": ...}``;
    with ``temperature`` τ also ``"prediction_probs"`` (N, K), softmax(z · Cᵀ / τ) of each row: the predictions the
    swapped / cluster loss trains, uniform when that loss sits at ln K.
    """
    embeddings = embeddings.detach()
    index = torch.zeros(embeddings.shape[0], dtype=torch.long, device=embeddings.device)
    if groups is None:
        scores = prototypes(embeddings)
        scores = scores[0] if isinstance(scores, (list, tuple)) else scores
        out = {"assignments": scores.argmax(dim=1), "n_prototypes": int(scores.shape[1])}
        if temperature is not None:
            out["prediction_probs"] = torch.softmax(scores.float() / temperature, dim=1)
        return out
    groups = [str(g) for g in groups]
    if len(groups) != embeddings.shape[0]:
        raise ValueError(f"prototype_assignments: {len(groups)} groups for {embeddings.shape[0]} rows")
    k = 0
    probs: torch.Tensor | None = None
    for group in sorted(set(groups)):
        rows = torch.tensor([i for i, g in enumerate(groups) if g == group], device=embeddings.device)
        scores = prototypes[group](embeddings.index_select(0, rows))
        scores = scores[0] if isinstance(scores, (list, tuple)) else scores
        index[rows] = scores.argmax(dim=1)
        k = int(scores.shape[1])
        if temperature is not None:
            probs = embeddings.new_zeros((embeddings.shape[0], k), dtype=torch.float32) if probs is None else probs
            probs[rows] = torch.softmax(scores.float() / temperature, dim=1)
    out = {"assignments": index, "n_prototypes": k, "groups": groups}
    if probs is not None:
        out["prediction_probs"] = probs
    return out
