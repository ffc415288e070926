"""DeepCluster-v2 (Caron et al. 2020, Appendix; facebookresearch/swav ``main_deepclusterv2.py``; as used by Ghesu et al.
2022 and Nguyen et al. 2023).

One step: crops (large first) → backbone f_θ (one forward per run of equal-size crops) → projection head →
L2-normalised embeddings z (V·B, D) → scores z · C_hᵀ for each prototype head h → loss
``1/H Σ_h CE(z · C_hᵀ / τ, a_h[index])`` (every crop predicts its item's cluster; ignore index −100 for items
without an assignment) → the detached embeddings of the assignment crops go into the memory bank under the items'
dataset indexes.

At the start of every epoch :class:`medssl.engines.clustering_handlers.DeepClusterEpochHandler` calls
:meth:`DeepClusterV2.cluster_memory`: spherical k-means over the GLOBAL memory bank (all ranks), one per head
(head h clusters assignment crop h mod n_assign), the prototypes C_h are set to the centroids (identical on every
rank; never trained by SGD: ``requires_grad=False``), the assignment table a (n_heads, dataset_size) is replaced,
and the bank is emptied for the new epoch.

First epoch: the bank is empty, every item's assignment is −100 and the loss is 0 (no gradient): epoch 1 only fills
the bank — a "memory-filling epoch" in place of the reference's ``init_memory`` pass. The handler can instead run
that pass before training (``init_memory_pass=True``: one forward-only pass over the loader, then k-means at the
start of epoch 1).

The batch needs ``batch[index_key]`` (``"index"``): the dataset index of each item (the ``SampleKey.index``),
a long tensor (B,) after collation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from medssl.losses import IGNORE_INDEX, DeepClusterV2Loss, MemoryBank, SwAVPrototypes, cluster_memory_bank
from medssl.methods.base import SSLMethod, build_param_groups, crops_from_batch, forward_multi_crop
from medssl.networks.heads import ProjectionHead, prototype_assignments
from medssl.utils.dist import PerRankState, all_reduce_sum, get_rank, get_world_size

__all__ = ["DeepClusterV2", "ClusterAssignments"]

logger = logging.getLogger(__name__)


class ClusterAssignments(PerRankState):
    """The k-means assignment table ``table`` (n_heads, dataset_size) (−100 = no assignment) and the ``epoch`` of
    the clustering that produced it (0 = none yet). Identical on every rank, kept out of DDP's buffer broadcast."""

    _state_names = ("table", "epoch")

    def __init__(self, n_heads: int, dataset_size: int) -> None:
        super().__init__()
        self.table = torch.full((n_heads, dataset_size), IGNORE_INDEX, dtype=torch.long)
        self.epoch = 0


class DeepClusterV2(SSLMethod):
    """DeepCluster-v2: projection head + k-means prototypes + memory bank (see the module docstring).

    Args:
        backbone: f_θ, a module (B, C, *spatial) → (B, feature_dim) with a ``feature_dim`` attribute; inputs 2D
            (B, C, H, W) or 3D (B, C, X, Y, Z) with the depth axis last.
        dataset_size: number of items of the training dataset (the range of ``batch["index"]``).
        feat_dim: embedding size D (128).
        hidden_dim: projection head hidden width (2048; 0 = one linear layer).
        n_prototypes: K per head ((3000, 3000, 3000)).
        temperature: τ (0.1).
        crops_for_assign: the crops stored in the memory bank and clustered ((0, 1)).
        memory_bank_size: rows of this rank's memory bank: at least the number of items this rank sees in one
            epoch (``epoch_length × local batch size``); default ``dataset_size`` (enough for any number of ranks,
            but n_assign × dataset_size × feat_dim floats per rank).
        crops_key, index_key: batch keys.

    :meth:`training_step` returns ``{"loss", "assigned"}`` (the fraction of this rank's items with a cluster
    assignment for head 0). Parameters with ``resnet50_2d()`` and the defaults: 29,122,752 (the reference's count,
    of which the 3 × 3000 × 128 prototypes are not trained).
    """

    def __init__(
        self,
        backbone: nn.Module,
        dataset_size: int,
        feat_dim: int = 128,
        hidden_dim: int = 2048,
        n_prototypes: Sequence[int] = (3000, 3000, 3000),
        temperature: float = 0.1,
        crops_for_assign: Sequence[int] = (0, 1),
        memory_bank_size: int | None = None,
        crops_key: str = "crops",
        index_key: str = "index",
    ) -> None:
        super().__init__()
        feature_dim = getattr(backbone, "feature_dim", None)
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(
                f"DeepClusterV2: the backbone ({type(backbone).__name__}) needs an int attribute feature_dim"
            )
        if isinstance(n_prototypes, int):
            n_prototypes = (n_prototypes,)
        n_prototypes = tuple(int(k) for k in n_prototypes)
        if dataset_size < 1:
            raise ValueError(f"DeepClusterV2: dataset_size={dataset_size} must be >= 1")
        if max(n_prototypes) > dataset_size:
            raise ValueError(
                f"DeepClusterV2: n_prototypes {n_prototypes} exceed the dataset size {dataset_size} (k-means needs at "
                "least K items)"
            )
        crops_for_assign = tuple(int(c) for c in crops_for_assign)
        if not crops_for_assign or min(crops_for_assign) < 0 or len(set(crops_for_assign)) != len(crops_for_assign):
            raise ValueError(f"DeepClusterV2: crops_for_assign {crops_for_assign} must be distinct crop indices")
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.feat_dim = int(feat_dim)
        self.head = ProjectionHead(feature_dim, hidden_dim, feat_dim, normalize=True)
        self.prototypes = SwAVPrototypes(feat_dim, list(n_prototypes))
        self.prototypes.normalize_()
        self.prototypes.requires_grad_(False)  # set by k-means, never by SGD
        self.n_prototypes = n_prototypes
        self.dataset_size = int(dataset_size)
        self.crops_for_assign = crops_for_assign
        self.memory_bank = MemoryBank(memory_bank_size or dataset_size, feat_dim, n_crops=len(crops_for_assign))
        self.assignments = ClusterAssignments(len(n_prototypes), dataset_size)
        self.loss = DeepClusterV2Loss(temperature)
        self.crops_key, self.index_key = crops_key, index_key
        self._saved_rank = get_rank()
        self.register_load_state_dict_post_hook(DeepClusterV2._after_load)

    # ------------------------------------------------------------------ checkpoint state
    def get_extra_state(self) -> dict:
        return {"rank": get_rank()}

    def set_extra_state(self, state: dict) -> None:
        self._saved_rank = int(state.get("rank", 0))

    @staticmethod
    def _after_load(module: DeepClusterV2, incompatible_keys: Any) -> None:
        # the memory bank is per-rank state and a checkpoint holds rank 0's: another rank must not take it as its own
        if module._saved_rank != get_rank():
            logger.warning(
                f"DeepClusterV2: the checkpoint holds rank {module._saved_rank}'s memory bank; rank {get_rank()} "
                "starts with an empty one (its items of the interrupted epoch get no assignment next epoch)"
            )
            module.memory_bank.new_pass()
            module._saved_rank = get_rank()

    # ------------------------------------------------------------------ inference
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features f_θ(x) (B, feature_dim) of images (B, C, H, W) / volumes (B, C, X, Y, Z), depth last."""
        return self.backbone(images)

    # ------------------------------------------------------------------ step
    def _indexes(self, batch: Mapping[str, Any], batch_size: int) -> torch.Tensor:
        if self.index_key not in batch:
            raise KeyError(
                f"DeepClusterV2: the batch has no {self.index_key!r} entry (each item's dataset index, needed for the "
                f"memory bank); batch keys: {sorted(batch)}"
            )
        indexes = torch.as_tensor(batch[self.index_key]).reshape(-1).long()
        if indexes.shape[0] != batch_size:
            raise ValueError(f"DeepClusterV2: {indexes.shape[0]} dataset indexes for a batch of {batch_size}")
        if indexes.numel() and (int(indexes.min()) < 0 or int(indexes.max()) >= self.dataset_size):
            raise ValueError(
                f"DeepClusterV2: dataset index {int(indexes.max()) if int(indexes.min()) >= 0 else int(indexes.min())}"
                f" outside [0, dataset_size={self.dataset_size})"
            )
        return indexes

    def _embeddings(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.head(forward_multi_crop(self.backbone, crops))

    def _store(self, indexes: torch.Tensor, embeddings: torch.Tensor, batch_size: int) -> None:
        if max(self.crops_for_assign) * batch_size >= embeddings.shape[0] and batch_size:
            raise ValueError(
                f"DeepClusterV2: crops_for_assign {self.crops_for_assign} but the batch has "
                f"{embeddings.shape[0] // batch_size} crops"
            )
        if self.memory_bank.n_filled + batch_size > self.memory_bank.size:
            raise ValueError(
                f"DeepClusterV2: the memory bank ({self.memory_bank.size} rows) is full after "
                f"{self.memory_bank.n_filled} rows this epoch; set memory_bank_size to at least epoch_length × local "
                "batch size (a sampler with drop_last=False pads or repeats items)"
            )
        self.memory_bank.update(
            indexes, [embeddings[c * batch_size : (c + 1) * batch_size].detach() for c in self.crops_for_assign]
        )

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        crops = crops_from_batch(batch, self.crops_key, "DeepClusterV2")
        batch_size = int(crops[0].shape[0])
        indexes = self._indexes(batch, batch_size)
        embeddings = self._embeddings(crops)  # (V·B, D), L2-normalised
        scores = self.prototypes(embeddings)  # per head (V·B, K_h); C_h is not trained
        table = self.assignments.table
        targets = table[:, indexes.to(table.device)].to(embeddings.device)  # (H, B)
        loss = self.loss(scores, targets)
        self._store(indexes, embeddings, batch_size)
        assigned = float((targets[0] != IGNORE_INDEX).float().mean()) if batch_size else 0.0
        # detached diagnostics of crop 0 (one row per item; first head) for medssl.evaluation.HealthMonitorHandler
        first = embeddings[:batch_size].detach()
        health = {"embeddings": first, **prototype_assignments(first, self.prototypes, temperature=self.loss.temperature)}
        return {"loss": loss, "assigned": assigned, "health": health}

    @torch.no_grad()
    def fill_memory(self, batch: Mapping[str, Any]) -> None:
        """Forward-only: put the batch's assignment-crop embeddings in the memory bank (the reference's
        ``init_memory`` pass; only the assignment crops are run)."""
        crops = crops_from_batch(batch, self.crops_key, "DeepClusterV2")
        batch_size = int(crops[0].shape[0])
        indexes = self._indexes(batch, batch_size)
        if max(self.crops_for_assign) >= len(crops):
            raise ValueError(f"DeepClusterV2: crops_for_assign {self.crops_for_assign} but {len(crops)} crops")
        embeddings = self._embeddings([crops[c] for c in self.crops_for_assign])
        self.memory_bank.update(indexes, embeddings)  # (n_assign·B, D) view-major

    # ------------------------------------------------------------------ clustering
    @torch.no_grad()
    def cluster_memory(self, n_iters: int = 10, seed: int = 0, epoch: int | None = None) -> bool:
        """k-means at the start of an epoch (collective: every rank calls it): cluster the global memory bank per
        head, set the prototypes to the centroids, replace the assignment table, empty the bank (this order, as
        :mod:`medssl.losses.deepcluster` says). Head h uses seed ``seed + h``. Returns False (and changes
        nothing) when the global bank is empty (the first epoch without an init pass).

        Raises:
            ValueError: the global bank holds fewer rows than a head's number of prototypes.
        """
        filled = torch.tensor([float(self.memory_bank.n_filled)], device=self.memory_bank.embeddings.device)
        all_reduce_sum(filled)
        n_global = int(filled.item())
        if n_global == 0:
            return False
        if n_global < max(self.n_prototypes):
            raise ValueError(
                f"DeepClusterV2: the memory bank holds {n_global} embeddings over {get_world_size()} rank(s), fewer "
                f"than the {max(self.n_prototypes)} prototypes of a head; use fewer prototypes or more data"
            )
        centroids, table = cluster_memory_bank(
            self.memory_bank, self.n_prototypes, self.dataset_size, n_iters=n_iters, seed=seed
        )
        self.prototypes.set_weights_([c.to(w) for c, w in zip(centroids, self.prototypes.weights)])
        self.assignments.table = table.to(self.assignments.table.device)
        if epoch is not None:
            self.assignments.epoch = int(epoch)
        self.memory_bank.new_pass()
        return True

    # ------------------------------------------------------------------ optimiser
    def parameter_groups(
        self, base_lr: float | None = None, weight_decay: float | None = None, no_decay_bias_norm: bool = True
    ) -> list[dict[str, Any]]:
        """Groups ``backbone_*`` and ``head_*`` (split as the base class does); the prototypes are not trained."""
        seen: set[int] = set()
        groups: list[dict[str, Any]] = []
        for name, module in (("backbone", self.backbone), ("head", self.head), ("other", self)):
            groups += build_param_groups(
                module.named_parameters(), base_lr, weight_decay, no_decay_bias_norm, name=name, exclude=seen
            )
        return groups
