"""SwAV with multi-crop and its queue, with the per-modality prototypes (Eq. 4) and the hybrid supervised term (Eq. 7)
of Ghesu et al., "Self-supervised learning from 100 million medical images" (2022).

One step (Caron et al. 2020, facebookresearch/swav ``main_swav.py``; Ghesu et al. 2022):

1. multi-crop: the crops x_1 … x_V (large crops first) go through the backbone f_θ, one forward per run of
   equal-size crops, and the projection head g, giving L2-normalised embeddings z (V·B, D) stacked view-major;
2. codes: the prototypes C are L2-normalised, and the scores z · Cᵀ of the assignment (large) crops get their
   codes q by Sinkhorn-Knopp, with the queue's scores prepended once the queue is full (SwAV Sec. 4.1); with
   ``per_modality_prototypes`` one prototype matrix C_m and one Sinkhorn problem per modality (Eq. 4);
3. swapped prediction: every other crop predicts each assignment crop's codes
   (:class:`medssl.losses.SwAVLoss`; Σ_m over modalities, :func:`medssl.losses.per_modality_swav_loss`);
4. hybrid (``num_classes > 0``, Eq. 7): a linear head g_ω on the backbone features of the assignment crops of the
   labelled items gives L_sup (:func:`medssl.losses.supervised_loss`); total = α·L_ss + β·L_sup.

Class labels in the batch: ``batch["label"]`` a long tensor (B,) of class indices with −1 for unlabelled items, or
a float tensor (B, num_classes) of 0/1 targets with rows of −1 for unlabelled items; no ``"label"`` key = nothing
labelled. :class:`medssl.transforms.ClassLabeld` in the item transforms gives every item such a target.

The queue is one :class:`medssl.losses.swav.SwAVQueues` (:attr:`SwAV.queues`), which owns its storage, start,
per-rank state and checkpoint; :class:`medssl.engines.SwAVQueueHandler` starts it at the configured epoch and
:class:`medssl.engines.FreezePrototypesHandler` freezes the prototypes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from medssl.losses import PerModalityPrototypes, SwAVLoss, SwAVPrototypes, per_modality_swav_loss, supervised_loss
from medssl.losses.swav import SwAVQueues
from medssl.methods.base import SSLMethod, build_param_groups, crops_from_batch, forward_multi_crop
from medssl.networks.heads import ProjectionHead, prototype_assignments
from medssl.transforms.labels import UNLABELLED

__all__ = ["SwAV"]


class SwAV(SSLMethod):
    """SwAV (Caron et al. 2020) with Ghesu et al.'s multi-modality clustering (Eq. 4) and hybrid supervision (Eq. 7).

    Batch (collated, on the device): ``batch[crops_key]`` a list of V crop tensors (B, C, *spatial) — 2D
    (B, C, H, W), 3D (B, C, X, Y, Z) with the depth axis last —, the large (assignment) crops first;
    ``batch[modality_key]`` the B items' modality codes (with ``per_modality_prototypes``); ``batch[label_key]`` the
    class targets (hybrid only, see the module docstring).

    Args:
        backbone: f_θ, a module (B, C, *spatial) → (B, feature_dim) with a ``feature_dim`` attribute
            (e.g. :func:`medssl.networks.resnet50_2d`, :class:`medssl.networks.DenseNet3D`).
        feat_dim: embedding size D (128, Ghesu et al. Table I).
        hidden_dim: projection head hidden width (2048; 0 = one linear layer).
        n_prototypes: K (3000 for 2D / 1500 for 3D, Table I).
        temperature: τ (0.1).
        epsilon: Sinkhorn ε (0.03 in Ghesu et al. Table I; 0.05 in SwAV).
        sinkhorn_iters: Sinkhorn iterations (3).
        crops_for_assign: the crops whose codes are predicted ((0, 1) for 2 large crops; (0,) for the 3D [1, 4]).
        per_modality_prototypes: one prototype matrix C_m and one Sinkhorn problem per modality (Eq. 4).
        modalities: the configured modality codes (required with ``per_modality_prototypes``); a batch with
            another modality is a ValueError naming it and this list.
        num_classes: classes of the hybrid head g_ω (0 = no supervised term).
        alpha, beta: weights of L_ss and L_sup (Eq. 7).
        queue_length: the global queue length L (3840 for 2D / 1920 for 3D, Table I) that
            :class:`medssl.engines.SwAVQueueHandler` starts when it gives none; 0 = none.
        crops_key, modality_key, label_key: batch keys.

    Returns of :meth:`training_step`: ``{"loss": α·L_ss + β·L_sup, "loss_ss": L_ss}`` plus, with the hybrid head,
    ``"loss_sup"`` and ``"n_labelled"`` (labelled items of this rank's batch), and ``"health"`` (detached crop-0
    embeddings and assignments). :attr:`last_step_used_queue` says whether the last step's codes used a full queue.

    Parameters with ``resnet50_2d()`` and the defaults: 28,354,752 (the reference's count).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int = 128,
        hidden_dim: int = 2048,
        n_prototypes: int = 3000,
        temperature: float = 0.1,
        epsilon: float = 0.03,
        sinkhorn_iters: int = 3,
        crops_for_assign: Sequence[int] = (0, 1),
        per_modality_prototypes: bool = False,
        modalities: Sequence[str] | None = None,
        num_classes: int = 0,
        alpha: float = 1.0,
        beta: float = 1.0,
        queue_length: int = 0,
        crops_key: str = "crops",
        modality_key: str = "modality",
        label_key: str = "label",
    ) -> None:
        super().__init__()
        feature_dim = getattr(backbone, "feature_dim", None)
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(
                f"SwAV: the backbone ({type(backbone).__name__}) needs an int attribute feature_dim (its output size)"
            )
        if not isinstance(n_prototypes, int) or n_prototypes < 1:
            raise ValueError(f"SwAV: n_prototypes must be a positive int, got {n_prototypes!r}")
        crops_for_assign = tuple(int(c) for c in crops_for_assign)
        if not crops_for_assign or min(crops_for_assign) < 0 or len(set(crops_for_assign)) != len(crops_for_assign):
            raise ValueError(f"SwAV: crops_for_assign {crops_for_assign} must be distinct crop indices")
        if num_classes < 0 or queue_length < 0:
            raise ValueError(f"SwAV: num_classes={num_classes}, queue_length={queue_length} must be >= 0")
        self.per_modality = bool(per_modality_prototypes)
        if self.per_modality and (not modalities or isinstance(modalities, str)):
            raise ValueError(
                "SwAV: per_modality_prototypes=True needs `modalities`, the list of modality codes of the data "
                f"(e.g. ['CT', 'MR', 'XR']); got {modalities!r}"
            )
        self.backbone = backbone
        self.feature_dim, self.feat_dim, self.n_prototypes = feature_dim, int(feat_dim), n_prototypes
        self.head = ProjectionHead(feature_dim, hidden_dim, feat_dim, normalize=True)
        if self.per_modality:
            self.prototypes: nn.Module = PerModalityPrototypes(list(modalities), feat_dim, n_prototypes)
        else:
            self.prototypes = SwAVPrototypes(feat_dim, n_prototypes)
        self.num_classes = int(num_classes)
        self.classifier = nn.Linear(feature_dim, num_classes) if num_classes else None
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature, self.epsilon, self.sinkhorn_iters = float(temperature), float(epsilon), int(sinkhorn_iters)
        self.crops_for_assign = crops_for_assign
        self.queue_length = int(queue_length)
        names = self.modalities or [SwAVQueues.SHARED]
        self.queues = SwAVQueues(len(crops_for_assign), self.feat_dim, names, queue_length)  # per rank, checkpointed
        self.register_load_state_dict_pre_hook(SwAVQueues.rename_legacy_state("queues"))
        self.crops_key, self.modality_key, self.label_key = crops_key, modality_key, label_key
        self.last_step_used_queue = False

    @property
    def modalities(self) -> list[str] | None:
        """The configured modalities (per-modality prototypes), else None."""
        return self.prototypes.modalities if self.per_modality else None

    @property
    def queue_active(self) -> bool:
        return self.queues.active

    def start_queue(self, length: int | None = None) -> int:
        """Start the queue(s) empty (:meth:`SwAVQueues.start`); returns the per-rank length."""
        return self.queues.start(length)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features f_θ(x) (B, feature_dim) of images (B, C, H, W) / volumes (B, C, X, Y, Z), depth last.
        Gradient and train / eval mode are the caller's (use ``torch.no_grad()`` and ``.eval()`` for features)."""
        return self.backbone(images)

    def loss_fn(self, n_crops: int) -> SwAVLoss:
        """The swapped-prediction loss for ``n_crops`` crops (this method's τ, ε, iterations and assignment crops)."""
        if max(self.crops_for_assign) >= n_crops:
            raise ValueError(
                f"SwAV: crops_for_assign {self.crops_for_assign} needs at least {max(self.crops_for_assign) + 1} "
                f"crops, the batch has {n_crops}"
            )
        return SwAVLoss(self.temperature, self.epsilon, self.sinkhorn_iters, self.crops_for_assign, n_crops)

    # ------------------------------------------------------------------ step
    def training_step(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        crops = crops_from_batch(batch, self.crops_key, "SwAV")
        batch_size, loss_fn = int(crops[0].shape[0]), self.loss_fn(len(crops))
        modalities = self._batch_modalities(batch, batch_size) if self.per_modality else None

        # 1. multi-crop: embeddings z of every crop, view-major (V·B, D)
        self.prototypes.normalize_()  # C rows on the unit sphere (no_grad inside)
        features = forward_multi_crop(self.backbone, crops)  # (V·B, F)
        embeddings = self.head(features)
        # 2.-3. codes of the assignment crops (Sinkhorn, with the full queue) and the swapped prediction
        if self.per_modality:
            self.last_step_used_queue = any(q.is_full for q in self.queues.values())
            loss_ss = per_modality_swav_loss(embeddings, modalities, self.prototypes, loss_fn, queues=self.queues)
        else:
            queue_scores = self.queues.full_scores(SwAVQueues.SHARED, self.prototypes)
            self.last_step_used_queue = queue_scores is not None
            loss_ss = loss_fn(self.prototypes(embeddings), batch_size=batch_size, queue_scores=queue_scores)
            assign = [embeddings[c * batch_size : (c + 1) * batch_size] for c in self.crops_for_assign]
            self.queues.push(SwAVQueues.SHARED, [z.detach() for z in assign])

        first = embeddings[:batch_size].detach()  # diagnostics for medssl.evaluation.HealthMonitorHandler
        health = {"embeddings": first, **prototype_assignments(first, self.prototypes, modalities, temperature=self.temperature)}
        if self.classifier is None:
            return {"loss": self.alpha * loss_ss, "loss_ss": loss_ss.detach(), "health": health}
        # 4. hybrid: supervised term on the assignment crops' backbone features of the labelled items
        labels = self._batch_labels(batch, batch_size, features.device)
        large = torch.cat([features[c * batch_size : (c + 1) * batch_size] for c in self.crops_for_assign])
        logits = self.classifier(large)
        loss_sup, n_labelled = supervised_loss(logits, labels.to(logits.device), len(self.crops_for_assign))
        return {
            "loss": self.alpha * loss_ss + self.beta * loss_sup,
            "loss_ss": loss_ss.detach(),
            "loss_sup": loss_sup.detach(),
            "n_labelled": n_labelled,
            "health": health,
        }

    def _batch_modalities(self, batch: Mapping[str, Any], batch_size: int) -> list[str]:
        if self.modality_key not in batch:
            raise KeyError(f"SwAV: per_modality_prototypes=True but the batch has no {self.modality_key!r}")
        modalities = batch[self.modality_key]
        if isinstance(modalities, str) or not isinstance(modalities, (list, tuple)):
            raise TypeError(
                f"SwAV: batch[{self.modality_key!r}] must be the list of the items' modality codes, got "
                f"{type(modalities).__name__}"
            )
        modalities = [str(m) for m in modalities]
        unknown = sorted(set(modalities) - set(self.modalities))
        if unknown:
            raise ValueError(
                f"SwAV: modality {unknown[0]!r} in the batch has no prototypes (per_modality_prototypes=True); "
                f"configured modalities: {self.modalities}"
            )
        if len(modalities) != batch_size:
            raise ValueError(f"SwAV: {len(modalities)} modality codes for a batch of {batch_size}")
        return modalities

    def _batch_labels(self, batch: Mapping[str, Any], batch_size: int, device: torch.device) -> torch.Tensor:
        labels = batch.get(self.label_key) if isinstance(batch, Mapping) else None
        if labels is None:
            return torch.full((batch_size,), UNLABELLED, dtype=torch.long, device=device)
        if not isinstance(labels, torch.Tensor):
            raise TypeError(
                f"SwAV: batch[{self.label_key!r}] is a {type(labels).__name__}, not a tensor of class targets; put "
                "medssl.transforms.ClassLabeld in the item transforms (−1 = unlabelled)"
            )
        if labels.shape[0] != batch_size:
            raise ValueError(f"SwAV: {labels.shape[0]} labels for a batch of {batch_size}")
        return labels

    # ------------------------------------------------------------------ optimiser
    def parameter_groups(
        self, base_lr: float | None = None, weight_decay: float | None = None, no_decay_bias_norm: bool = True
    ) -> list[dict[str, Any]]:
        """Groups ``backbone_*``, ``head_*``, ``prototypes_*`` and (hybrid) ``classifier_*``, each split as the base
        class does (biases / norm weights without weight decay); every trainable parameter once."""
        seen: set[int] = set()
        groups: list[dict[str, Any]] = []
        parts = [("backbone", self.backbone), ("head", self.head), ("prototypes", self.prototypes)]
        if self.classifier is not None:
            parts.append(("classifier", self.classifier))
        parts.append(("other", self))  # anything a subclass adds
        for name, module in parts:
            groups += build_param_groups(
                module.named_parameters(), base_lr, weight_decay, no_decay_bias_norm, name=name, exclude=seen
            )
        return groups
