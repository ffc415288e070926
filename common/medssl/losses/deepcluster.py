"""DeepCluster-v2 (Caron et al. 2020, Appendix; facebookresearch/swav ``main_deepclusterv2.py``).

At the start of every epoch, spherical k-means over a memory bank of the previous epoch's embeddings gives, per
prototype head h, centroids C_h (which become the prototypes, never trained by SGD) and a cluster assignment of
every dataset sample; during the epoch the loss is CE(z · C_hᵀ / τ, assignment) averaged over the heads, and the
bank is refilled with this epoch's embeddings. Head h clusters the bank's crop ``h mod n_crops`` (crop 0, 1, 0 for
the default 3 heads and 2 assignment crops).

Typical wiring (handlers at EPOCH_STARTED, in this order)::

    centroids, assignments = cluster_memory_bank(bank, (3000, 3000, 3000), dataset_size, seed=seed + epoch)
    prototypes.set_weights_(centroids); bank.new_pass()
    # each step: targets = assignments[:, dataset_indexes]; loss = DeepClusterV2Loss()(prototypes(z), targets)
    #            bank.update(dataset_indexes, [z_crop0.detach(), z_crop1.detach()])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medssl.utils.dist import (
    PerRankState,
    all_gather_cat,
    all_reduce_sum,
    broadcast,
    get_rank,
    get_world_size,
    is_distributed,
)

__all__ = ["spherical_kmeans", "MemoryBank", "cluster_memory_bank", "DeepClusterV2Loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@torch.no_grad()
def _nearest_centroid(embeddings: torch.Tensor, centroids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """argmax_k z · c_k per row, in chunks of rows (the full N × K product can be large)."""
    if embeddings.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=embeddings.device)
    return torch.cat([(chunk @ centroids.T).argmax(dim=1) for chunk in embeddings.split(chunk_size)])


@torch.no_grad()
def spherical_kmeans(
    embeddings: torch.Tensor, n_clusters: int, n_iters: int = 10, seed: int = 0, chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means over the GLOBAL set of L2-normalised embeddings (every rank's rows, in rank order).

    Init: ``n_clusters`` distinct rows drawn uniformly from the global set with ``torch.Generator(seed)`` (the same
    draw on every rank). Then ``n_iters`` times: E step (assign each row to argmax_k z · c_k), M step (c_k =
    normalize(Σ_{z → k} z) with the sums all-reduced; a cluster without members keeps its previous centroid);
    the returned assignments come from a final E step with the returned centroids.

    Every rank gets identical centroids (broadcast from rank 0 at the end), equal (up to float rounding of the
    sums) to what one process computes on the concatenated data with the same seed. Ranks may hold different
    numbers of rows (including none). Collective: every rank must call it with the same arguments.

    Args:
        embeddings: (N_local, D) L2-normalised rows of this rank.
        n_clusters: K (3000 per head in DeepCluster-v2); must not exceed the global number of rows.
        n_iters: k-means iterations (10).
        seed: seed of the initial draw (use a function of the base seed and the epoch).
        chunk_size: rows per matrix product in the E step.

    Returns:
        centroids (K, D) L2-normalised (float32, or float64 for float64 input), assignments (N_local,) long.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"spherical_kmeans: embeddings must be (N, D), got shape {tuple(embeddings.shape)}")
    dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    embeddings = embeddings.detach().to(dtype)
    n_local, dim = embeddings.shape
    device = embeddings.device

    # global row offsets
    counts = torch.zeros(get_world_size(), dtype=torch.long, device=device)
    counts[get_rank()] = n_local
    all_reduce_sum(counts)
    n_global = int(counts.sum().item())
    offset = int(counts[: get_rank()].sum().item())
    if n_clusters < 1 or n_clusters > n_global:
        raise ValueError(f"spherical_kmeans: n_clusters={n_clusters} must be in [1, {n_global}] (the number of rows)")

    # the same random rows on every rank: each rank contributes the ones it holds
    generator = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(n_global, generator=generator)[:n_clusters].to(device)
    local = (chosen >= offset) & (chosen < offset + n_local)
    centroids = torch.zeros(n_clusters, dim, dtype=dtype, device=device)
    centroids[local] = embeddings[chosen[local] - offset]
    all_reduce_sum(centroids)

    assignments = _nearest_centroid(embeddings, centroids, chunk_size)
    for _ in range(n_iters):
        # M step: one all-reduce of [Σ z | count] per cluster
        sums_and_counts = torch.zeros(n_clusters, dim + 1, dtype=dtype, device=device)
        sums_and_counts[:, :dim].index_add_(0, assignments, embeddings)
        sums_and_counts[:, dim].index_add_(0, assignments, torch.ones(n_local, dtype=dtype, device=device))
        all_reduce_sum(sums_and_counts)
        non_empty = sums_and_counts[:, dim] > 0
        centroids[non_empty] = F.normalize(sums_and_counts[non_empty, :dim], dim=1)
        # E step
        assignments = _nearest_centroid(embeddings, centroids, chunk_size)
    if is_distributed():
        # guarantee bit-identical centroids on every rank, and assignments consistent with them
        broadcast(centroids, src=0)
        assignments = _nearest_centroid(embeddings, centroids, chunk_size)
    return centroids, assignments


class MemoryBank(PerRankState):
    """This rank's embeddings of the assignment crops for one pass over its share of the dataset.

    ``embeddings`` (n_crops, size, feat_dim) and ``indexes`` (size,) (dataset index of each row, −1 = empty), filled
    in order by :meth:`update`. ``size`` must be at least the number of samples this rank sees in an epoch.
    :meth:`new_pass` empties it (call it after clustering, at the start of each epoch). Per-rank state, kept out of
    DistributedDataParallel's buffer broadcast (see :class:`medssl.utils.dist.PerRankState`).
    """

    _state_names = ("embeddings", "indexes", "n_filled")

    def __init__(self, size: int, feat_dim: int, n_crops: int = 2):
        super().__init__()
        if size < 1 or feat_dim < 1 or n_crops < 1:
            raise ValueError(
                f"MemoryBank: sizes must be positive, got size={size}, feat_dim={feat_dim}, n_crops={n_crops}"
            )
        self.embeddings = torch.zeros(n_crops, size, feat_dim)
        self.indexes = torch.full((size,), -1, dtype=torch.long)
        self.n_filled = 0

    @property
    def size(self) -> int:
        return self.embeddings.shape[1]

    @property
    def n_crops(self) -> int:
        return self.embeddings.shape[0]

    def new_pass(self) -> None:
        self.indexes.fill_(-1)
        self.n_filled = 0

    @torch.no_grad()
    def update(self, indexes: torch.Tensor | Sequence[int], embeddings: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Append a batch: ``indexes`` (B,) dataset indexes; ``embeddings`` a list of n_crops (B, D), an
        (n_crops, B, D) tensor or an (n_crops·B, D) view-major stack (detached, stored as float32)."""
        indexes = torch.as_tensor(indexes, dtype=torch.long).reshape(-1)
        n_new = indexes.shape[0]
        if n_new == 0:
            return
        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.reshape(self.n_crops, n_new, -1) if embeddings.dim() == 2 else embeddings
            embeddings = list(embeddings)
        if len(embeddings) != self.n_crops or any(tuple(e.shape[:1]) != (n_new,) for e in embeddings):
            raise ValueError(
                f"MemoryBank.update: expected {self.n_crops} crops of {n_new} rows, "
                f"got {[tuple(e.shape) for e in embeddings]}"
            )
        if self.n_filled + n_new > self.size:
            raise ValueError(
                f"MemoryBank.update: {self.n_filled} + {n_new} rows exceed the bank size {self.size} "
                "(size must cover this rank's samples per epoch)"
            )
        rows = slice(self.n_filled, self.n_filled + n_new)
        self.embeddings[:, rows] = torch.stack([e.detach() for e in embeddings]).to(self.embeddings)
        self.indexes[rows] = indexes.to(self.indexes.device)
        self.n_filled += n_new

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(indexes (n_filled,), embeddings (n_crops, n_filled, D)) of this pass."""
        return self.indexes[: self.n_filled], self.embeddings[:, : self.n_filled]


@torch.no_grad()
def cluster_memory_bank(
    bank: MemoryBank,
    n_prototypes: Sequence[int] = (3000, 3000, 3000),
    dataset_size: int | None = None,
    n_iters: int = 10,
    seed: int = 0,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Spherical k-means per head over the global memory bank; head h clusters crop ``h mod bank.n_crops``.

    Returns the centroids of every head (identical on every rank; load them with
    ``SwAVPrototypes.set_weights_``) and an assignment table (n_heads, dataset_size), identical on every rank,
    holding each dataset sample's cluster per head, −100 (ignored by the loss) for samples not in any rank's bank.
    Head h uses seed ``seed + h``. Collective.
    """
    indexes, embeddings = bank.filled()
    global_indexes = all_gather_cat(indexes)
    if dataset_size is None:  # the gathered indexes are the same on every rank
        dataset_size = int(global_indexes.max().item()) + 1 if global_indexes.numel() else 0
    if global_indexes.numel() and int(global_indexes.max()) >= dataset_size:
        raise ValueError(
            f"cluster_memory_bank: dataset index {int(global_indexes.max())} >= dataset_size {dataset_size}"
        )
    centroids_per_head = []
    table = torch.full((len(n_prototypes), dataset_size), IGNORE_INDEX, dtype=torch.long, device=indexes.device)
    for h, n_clusters in enumerate(n_prototypes):
        crop = h % bank.n_crops
        centroids, assignments = spherical_kmeans(embeddings[crop], n_clusters, n_iters=n_iters, seed=seed + h)
        centroids_per_head.append(centroids)
        table[h, global_indexes] = all_gather_cat(assignments)
    return centroids_per_head, table


class DeepClusterV2Loss(nn.Module):
    """L = 1/H · Σ_h CE(z · C_hᵀ / τ, a_h), every crop of a sample predicting the sample's k-means cluster a_h.

    Targets equal to −100 (samples without an assignment) are ignored; a head with no valid target on this rank
    contributes 0 (connected to the graph) instead of the NaN of an empty mean.

    Args:
        temperature: τ (0.1).
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, scores: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """
        Args:
            scores: per head an (n_crops·B, K_h) view-major stack (a list over heads, or one tensor for one head).
            targets: (n_heads, B) long cluster assignments of the batch's samples (``table[:, dataset_indexes]``),
                or (B,) for one head.
        """
        if isinstance(scores, torch.Tensor):
            scores = [scores]
        targets = targets.reshape(1, -1) if targets.dim() == 1 else targets
        if targets.shape[0] != len(scores):
            raise ValueError(f"DeepClusterV2Loss: {targets.shape[0]} target rows for {len(scores)} heads")
        batch_size = targets.shape[1]
        loss = scores[0].new_zeros((), dtype=torch.float32)
        for h, head_scores in enumerate(scores):
            if batch_size == 0 or head_scores.shape[0] % batch_size:
                if batch_size == 0 and head_scores.shape[0] == 0:
                    loss = loss + 0.0 * head_scores.sum()
                    continue
                raise ValueError(
                    f"DeepClusterV2Loss: head {h} has {head_scores.shape[0]} rows, not a multiple of B={batch_size}"
                )
            n_crops = head_scores.shape[0] // batch_size
            head_targets = targets[h].to(head_scores.device).repeat(n_crops)
            dtype = torch.float64 if head_scores.dtype == torch.float64 else torch.float32  # at least float32
            logits = head_scores.to(dtype) / self.temperature
            if bool((head_targets != IGNORE_INDEX).any()):
                loss = loss + F.cross_entropy(logits, head_targets, ignore_index=IGNORE_INDEX)
            else:
                loss = loss + 0.0 * logits.sum()
        return loss / len(scores)
