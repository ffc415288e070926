"""SwAV with multi-crop and its queue, with the per-modality prototypes (Eq. 4) and the hybrid supervised term (Eq. 7)
of Ghesu et al., "Self-supervised learning from 100 million medical images" (2022).

One step (Caron et al. 2020, facebookresearch/swav ``main_swav.py``; Ghesu et al. 2022):

1. the prototypes C are L2-normalised row-wise (under ``no_grad``);
2. the crops x_1 … x_V (large crops first) go through the backbone f_θ one group of equal-size crops at a time
   (one forward per size, as the reference), giving features h (V·B, F) stacked view-major (rows v·B … (v+1)·B − 1
   belong to crop v);
3. the projection head gives L2-normalised embeddings z = g(h) (V·B, D) (BatchNorm over all crops together) and
   the scores z · Cᵀ;
4. L_ss = :class:`medssl.losses.SwAVLoss` (codes from the assignment crops only, the other crops predict them), or,
   with ``per_modality_prototypes``, Σ_m L_swav(z_m; C_m) with one prototype matrix and one Sinkhorn problem per
   modality m (:func:`medssl.losses.per_modality_swav_loss`, Ghesu et al. Eq. 4);
5. hybrid (``num_classes > 0``, Ghesu et al. Eq. 7): a linear head g_ω on the backbone features of the assignment
   (large) crops of the items that carry a class label gives L_sup (cross-entropy, or binary cross-entropy for
   multi-label vectors); total = α·L_ss + β·L_sup. Unlabelled items contribute to L_ss only.

Class labels in the batch (the collate-side convention): ``batch["label"]`` is a long tensor (B,) with the class
index of labelled items and −1 for unlabelled ones, or a float tensor (B, num_classes) of 0/1 targets with rows of
−1 for unlabelled items; a missing ``"label"`` key means no item is labelled. Datalist labels are an int (class),
a list (multi-label vector) or a str (a segmentation mask path: not a class label); put
:class:`medssl.transforms.ClassLabeld` in the item transforms so that every item gets such a target (mixed int / str
labels cannot be collated otherwise).

The queue (SwAV Sec. 4.1) is owned by the method (:attr:`SwAV.queues`: one :class:`medssl.losses.SwAVQueue` per
rank, or one per modality) but created and started by :class:`medssl.engines.clustering_handlers.SwAVQueueHandler`;
prototype freezing is :class:`medssl.engines.clustering_handlers.FreezePrototypesHandler`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from medssl.losses import (
    PerModalityPrototypes,
    SwAVLoss,
    SwAVPrototypes,
    SwAVQueue,
    per_modality_swav_loss,
    supervised_loss,
)
from medssl.methods.base import SSLMethod, build_param_groups, crops_from_batch, forward_multi_crop
from medssl.networks.heads import ProjectionHead, prototype_assignments
from medssl.transforms.labels import UNLABELLED
from medssl.utils.dist import get_rank, get_world_size

__all__ = ["SwAV"]

logger = logging.getLogger(__name__)

_SHARED_QUEUE = ""  # key of the single queue in SwAV.queues when the prototypes are shared by all modalities


# --------------------------------------------------------------------------------------------- SwAV
class SwAV(SSLMethod):
    """SwAV (Caron et al. 2020) with Ghesu et al.'s multi-modality clustering (Eq. 4) and hybrid supervision (Eq. 7).

    Batch (collated, on the device): ``batch[crops_key]`` a list of V crop tensors (B, C, *spatial) — 2D
    (B, C, H, W), 3D (B, C, X, Y, Z) with the depth axis last —, the large (assignment) crops first; crops of
    different sizes are fine (one backbone forward per run of equal-size crops). ``batch[modality_key]`` the list
    of the B items' modality codes (needed with ``per_modality_prototypes``); ``batch[label_key]`` the class targets
    (hybrid only, see the module docstring and :class:`medssl.transforms.ClassLabeld`).

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
        queue_length: the global queue length L (3840 for 2D / 1920 for 3D, Table I) used by
            :class:`SwAVQueueHandler` when it gives none; 0 = no queue unless the handler gives one.
        crops_key, modality_key, label_key: batch keys.

    Returns of :meth:`training_step`: ``{"loss": α·L_ss + β·L_sup, "loss_ss": L_ss}`` plus, with the hybrid head,
    ``"loss_sup"`` and ``"n_labelled"`` (labelled items of this rank's batch). :attr:`last_step_used_queue` says
    whether the last step's codes used a (full) queue.

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
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.feat_dim = int(feat_dim)
        self.head = ProjectionHead(feature_dim, hidden_dim, feat_dim, normalize=True)
        self.per_modality = bool(per_modality_prototypes)
        if self.per_modality:
            if not modalities or isinstance(modalities, str):
                raise ValueError(
                    "SwAV: per_modality_prototypes=True needs `modalities`, the list of modality codes of the data "
                    f"(e.g. ['CT', 'MR', 'XR']); got {modalities!r}"
                )
            self.prototypes: nn.Module = PerModalityPrototypes(list(modalities), feat_dim, n_prototypes)
        else:
            self.prototypes = SwAVPrototypes(feat_dim, n_prototypes)
        self.n_prototypes = n_prototypes
        self.num_classes = int(num_classes)
        self.classifier = nn.Linear(feature_dim, num_classes) if num_classes else None
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature, self.epsilon, self.sinkhorn_iters = float(temperature), float(epsilon), int(sinkhorn_iters)
        self.crops_for_assign = crops_for_assign
        self.queue_length = int(queue_length)
        self.crops_key, self.modality_key, self.label_key = crops_key, modality_key, label_key
        # per-rank queue(s): a plain dict (not sub-modules), saved through get_extra_state (see there)
        self.queues: dict[str, SwAVQueue] = {}
        self.last_step_used_queue = False

    # ------------------------------------------------------------------ properties
    @property
    def modalities(self) -> list[str] | None:
        """The configured modalities (per-modality prototypes), else None."""
        return self.prototypes.modalities if self.per_modality else None

    def loss_fn(self, n_crops: int) -> SwAVLoss:
        """The swapped-prediction loss for ``n_crops`` crops (τ, ε, iterations and assignment crops of this method)."""
        if max(self.crops_for_assign) >= n_crops:
            raise ValueError(
                f"SwAV: crops_for_assign {self.crops_for_assign} needs at least {max(self.crops_for_assign) + 1} "
                f"crops, the batch has {n_crops}"
            )
        return SwAVLoss(self.temperature, self.epsilon, self.sinkhorn_iters, self.crops_for_assign, n_crops)

    # ------------------------------------------------------------------ inference
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features f_θ(x) (B, feature_dim) of images (B, C, H, W) / volumes (B, C, X, Y, Z), depth last.
        Gradient and train / eval mode are the caller's (use ``torch.no_grad()`` and ``.eval()`` for features)."""
        return self.backbone(images)

    # ------------------------------------------------------------------ queue
    def create_queues(self, length_per_rank: int) -> None:
        """(Re)create the inactive queue(s): one (n_assign_crops, length_per_rank, feat_dim) per rank, one per
        modality with per-modality prototypes; on the prototypes' device."""
        if length_per_rank < 1:
            raise ValueError(f"SwAV: queue length per rank must be >= 1, got {length_per_rank}")
        device = next(self.prototypes.parameters()).device
        names = self.modalities if self.per_modality else [_SHARED_QUEUE]
        self.queues = {
            name: SwAVQueue(len(self.crops_for_assign), int(length_per_rank), self.feat_dim).to(device)
            for name in names
        }

    def start_queue(self, length: int | None = None) -> int:
        """Create and start (empty, then filled by every step) the queue(s) of global length ``length`` (default
        :attr:`queue_length`): ``length // world_size`` rows per rank. Returns the per-rank length."""
        length = self.queue_length if length is None else int(length)
        world_size = get_world_size()
        if length < world_size:
            raise ValueError(
                f"SwAV: a queue of global length {length} cannot be split over {world_size} ranks (queue_length "
                "must be set, on the method or the SwAVQueueHandler)"
            )
        per_rank = length // world_size
        if not self.queues or next(iter(self.queues.values())).length != per_rank:
            self.create_queues(per_rank)
        for queue in self.queues.values():
            queue.start()
        return per_rank

    @property
    def queue_active(self) -> bool:
        return bool(self.queues) and all(q.active for q in self.queues.values())

    def get_extra_state(self) -> dict:
        """The queues (per-rank state, not DDP buffers): ``{"rank", "queue_length_per_rank", "queues"}``."""
        length = next(iter(self.queues.values())).length if self.queues else 0
        return {
            "rank": get_rank(),
            "queue_length_per_rank": length,
            "queues": {name: q.get_extra_state() for name, q in self.queues.items()},
        }

    def set_extra_state(self, state: dict) -> None:
        """Restore the queues. A queue saved by another rank (a checkpoint holds rank 0's state) is not this rank's:
        it restarts empty (if it was active) and refills within L / (B · world size) steps, with a warning."""
        length = int(state.get("queue_length_per_rank", 0))
        if not length:
            self.queues = {}
            return
        self.create_queues(length)
        saved = state.get("queues", {})
        if set(saved) != set(self.queues):
            raise ValueError(
                f"SwAV: the checkpoint holds queues {sorted(saved)}, this method has {sorted(self.queues)}"
            )
        same_rank = int(state.get("rank", 0)) == get_rank()
        if not same_rank:
            logger.warning(
                f"SwAV: the checkpoint holds rank {state.get('rank')}'s queue; rank {get_rank()} restarts its queue "
                "empty (it is used again once full)"
            )
        for name, queue in self.queues.items():
            queue.set_extra_state(saved[name])
            if not same_rank:
                queue.reset()

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        for queue in self.queues.values():
            queue._apply(fn, *args, **kwargs)
        return module

    # ------------------------------------------------------------------ step
    def _check_modalities(self, modalities: Any) -> list[str]:
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
        return modalities

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        crops = crops_from_batch(batch, self.crops_key, "SwAV")
        batch_size, n_crops = int(crops[0].shape[0]), len(crops)
        loss_fn = self.loss_fn(n_crops)
        modalities = None
        if self.per_modality:
            if self.modality_key not in batch:
                raise KeyError(f"SwAV: per_modality_prototypes=True but the batch has no {self.modality_key!r}")
            modalities = self._check_modalities(batch[self.modality_key])
            if len(modalities) != batch_size:
                raise ValueError(f"SwAV: {len(modalities)} modality codes for a batch of {batch_size}")

        self.prototypes.normalize_()  # C rows on the unit sphere (no_grad inside)
        features = forward_multi_crop(self.backbone, crops)  # (V·B, F)
        embeddings = self.head(features)  # (V·B, D), L2-normalised

        if self.per_modality:
            full = {m: q for m, q in self.queues.items() if q.is_full}
            self.last_step_used_queue = bool(full)
            loss_ss = per_modality_swav_loss(
                embeddings, modalities, self.prototypes, loss_fn, queues=self.queues or None
            )
        else:
            scores = self.prototypes(embeddings)
            queue = self.queues.get(_SHARED_QUEUE)
            queue_scores = queue.scores(self.prototypes) if queue is not None and queue.is_full else None
            self.last_step_used_queue = queue_scores is not None
            loss_ss = loss_fn(scores, batch_size=batch_size, queue_scores=queue_scores)
            if queue is not None:
                queue.push([embeddings[c * batch_size : (c + 1) * batch_size].detach() for c in self.crops_for_assign])

        # detached diagnostics of crop 0 (one row per item) for medssl.evaluation.HealthMonitorHandler
        first = embeddings[:batch_size].detach()
        health = {"embeddings": first, **prototype_assignments(first, self.prototypes, modalities)}
        if self.classifier is None:
            return {"loss": self.alpha * loss_ss, "loss_ss": loss_ss.detach(), "health": health}

        labels = batch.get(self.label_key) if isinstance(batch, Mapping) else None
        if labels is None:
            labels = torch.full((batch_size,), UNLABELLED, dtype=torch.long, device=features.device)
        if not isinstance(labels, torch.Tensor):
            raise TypeError(
                f"SwAV: batch[{self.label_key!r}] is a {type(labels).__name__}, not a tensor of class targets; put "
                "medssl.transforms.ClassLabeld in the item transforms (−1 = unlabelled)"
            )
        if labels.shape[0] != batch_size:
            raise ValueError(f"SwAV: {labels.shape[0]} labels for a batch of {batch_size}")
        large = torch.cat([features[c * batch_size : (c + 1) * batch_size] for c in self.crops_for_assign])
        logits = self.classifier(large)
        loss_sup, n_labelled = supervised_loss(logits, labels.to(logits.device), len(self.crops_for_assign))
        loss = self.alpha * loss_ss + self.beta * loss_sup
        return {
            "loss": loss,
            "loss_ss": loss_ss.detach(),
            "loss_sup": loss_sup.detach(),
            "n_labelled": n_labelled,
            "health": health,
        }

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
        for name, module in parts:
            groups += build_param_groups(
                module.named_parameters(), base_lr, weight_decay, no_decay_bias_norm, name=name, exclude=seen
            )
        groups += build_param_groups(  # anything a subclass adds
            self.named_parameters(), base_lr, weight_decay, no_decay_bias_norm, name="other", exclude=seen
        )
        return groups
