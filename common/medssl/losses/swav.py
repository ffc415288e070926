"""SwAV swapped-prediction loss (Caron et al. 2020), its feature queue, and the per-modality variant of Ghesu et al.
2022.

The queue has one owner, :class:`SwAVQueues`: this rank's queue of each prototype set (one :class:`SwAVQueue`
FIFO each), their size, start and reset, their device moves and their checkpoint state (per rank, never a DDP
buffer). A method holds one :class:`SwAVQueues`; :class:`medssl.engines.SwAVQueueHandler` only calls its
:meth:`SwAVQueues.start` at the configured epoch.

Notation: z (N, D) the L2-normalised embeddings of the crops, C (K, D) the L2-normalised prototypes (see
:class:`medssl.networks.heads.SwAVPrototypes`), scores = z · Cᵀ, q the Sinkhorn codes (:func:`sinkhorn_knopp`),
τ the temperature, ε the Sinkhorn regularisation. Crops are stacked view-major: rows ``c·B … (c+1)·B − 1`` of an
(n_crops·B, ·) tensor belong to crop c, the same sample order in every crop. The first crops are the large ones
(the "assignment" crops that produce codes); the small crops are only predicted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medssl.losses.sinkhorn import sinkhorn_knopp
from medssl.networks.heads import PerModalityPrototypes, SwAVPrototypes
from medssl.utils.dist import PerRankState, all_reduce_sum, get_rank, get_world_size, is_distributed

logger = logging.getLogger(__name__)

__all__ = [
    "SwAVLoss",
    "SwAVQueue",
    "SwAVQueues",
    "SwAVPrototypes",
    "PerModalityPrototypes",
    "per_modality_swav_loss",
    "cancel_prototype_grads",
    "split_crops",
]


def split_crops(
    stacked: torch.Tensor | Sequence[torch.Tensor], n_crops: int, batch_size: int | None = None
) -> list[torch.Tensor]:
    """Per-crop list from a view-major (n_crops·B, ·) stack (a list or tuple is checked and returned as a list)."""
    if isinstance(stacked, (list, tuple)):
        crops = list(stacked)
        if len(crops) != n_crops:
            raise ValueError(f"expected {n_crops} crops, got a list of {len(crops)}")
        sizes = {c.shape[0] for c in crops}
        if len(sizes) != 1 or (batch_size is not None and sizes != {batch_size}):
            raise ValueError(f"every crop must hold the same batch_size={batch_size} rows, got sizes {sorted(sizes)}")
        return crops
    n_rows = stacked.shape[0]
    if batch_size is None:
        if n_rows % n_crops:
            raise ValueError(f"{n_rows} rows cannot be split into {n_crops} crops of equal size")
        batch_size = n_rows // n_crops
    if n_rows != n_crops * batch_size:
        raise ValueError(f"expected n_crops·batch_size = {n_crops}·{batch_size} rows, got {n_rows}")
    return list(stacked.split(batch_size, dim=0)) if batch_size > 0 else [stacked[:0]] * n_crops


class SwAVLoss(nn.Module):
    """Swapped prediction: predict the code of an assignment crop from every other crop.

    For each assignment crop c: q_c = Sinkhorn(scores_c) — with the queue's scores prepended when given, keeping
    only the last B rows (this batch) — and
    ``loss_c = 1/(n_crops−1) · Σ_{v≠c} mean_b ( −Σ_k q_c[b,k] · log_softmax(scores_v[b] / τ)_k )``;
    the loss is the mean of loss_c over the assignment crops (facebookresearch/swav ``main_swav.py``).

    With two crops this is half the sum of the two swapped terms ℓ(z₁, q₂) + ℓ(z₂, q₁) of the paper's
    Eq. (1); the spec's toy value (18.501624 at ε=0.05) is that sum, i.e. twice this loss.

    Args:
        temperature: τ (0.1).
        epsilon: Sinkhorn ε (0.05 in SwAV, 0.03 in Ghesu et al. Table I).
        sinkhorn_iters: Sinkhorn iterations (3).
        crops_for_assign: indices of the crops that produce codes ((0, 1); (0,) for Ghesu et al.'s 3D [1, 4] crops).
        n_crops: total number of crops (2 large + 6 small = 8).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iters: int = 3,
        crops_for_assign: Sequence[int] = (0, 1),
        n_crops: int = 8,
    ):
        super().__init__()
        crops_for_assign = tuple(int(c) for c in crops_for_assign)
        if n_crops < 2:
            raise ValueError(f"SwAVLoss: n_crops must be >= 2 (codes are predicted from other crops), got {n_crops}")
        if not crops_for_assign or any(not 0 <= c < n_crops for c in crops_for_assign):
            raise ValueError(f"SwAVLoss: crops_for_assign {crops_for_assign} must be crop indices in [0, {n_crops})")
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iters = sinkhorn_iters
        self.crops_for_assign = crops_for_assign
        self.n_crops = n_crops

    def codes(self, scores: torch.Tensor, queue_scores: torch.Tensor | None = None) -> torch.Tensor:
        """Sinkhorn codes (B, K) of one crop's scores (B, K), optionally with queue scores (L, K) prepended."""
        batch_size = scores.shape[0]
        scores = scores.detach()
        if queue_scores is not None:
            dtype = torch.float64 if torch.float64 in (scores.dtype, queue_scores.dtype) else torch.float32
            scores = torch.cat([queue_scores.detach().to(dtype), scores.to(dtype)], dim=0)
        codes = sinkhorn_knopp(scores, epsilon=self.epsilon, n_iters=self.sinkhorn_iters)
        return codes[codes.shape[0] - batch_size :]

    def forward(
        self,
        scores: torch.Tensor | Sequence[torch.Tensor],
        batch_size: int | None = None,
        queue_scores: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """
        Args:
            scores: (n_crops·B, K) view-major stack, or a list of n_crops tensors (B, K).
            batch_size: B (inferred from the stack when omitted).
            queue_scores: None, or per assignment crop (same order as ``crops_for_assign``) the queue's scores
                (L, K) — a list (entries may be None) or an (n_assign, L, K) tensor.

        Every rank must call this the same number of times (Sinkhorn's collectives); B may be 0 on a rank, which
        then contributes a zero loss that is still connected to the graph.
        """
        crops = split_crops(scores, self.n_crops, batch_size)
        batch_size = crops[0].shape[0]
        if queue_scores is not None and len(queue_scores) != len(self.crops_for_assign):
            raise ValueError(
                f"SwAVLoss: queue_scores has {len(queue_scores)} entries for {len(self.crops_for_assign)} "
                "assignment crops"
            )
        dtype = torch.float64 if crops[0].dtype == torch.float64 else torch.float32  # at least float32
        log_probs = [F.log_softmax(crop.to(dtype) / self.temperature, dim=1) for crop in crops]
        loss = crops[0].new_zeros((), dtype=dtype)
        for i, c in enumerate(self.crops_for_assign):
            q = self.codes(crops[c], None if queue_scores is None else queue_scores[i])
            subloss = loss.new_zeros(())
            for v in range(self.n_crops):
                if v == c:
                    continue
                if batch_size > 0:
                    subloss = subloss - (q * log_probs[v]).sum(dim=1).mean()
                else:  # nothing to predict on this rank: zero, but keep every score in the graph
                    subloss = subloss + 0.0 * log_probs[v].sum()
            loss = loss + subloss / (self.n_crops - 1)
        return loss / len(self.crops_for_assign)


class SwAVQueue(PerRankState):
    """This rank's queue of the last L/world_size detached embeddings of each assignment crop (SwAV Sec. 4.1).

    Shape (n_assign_crops, length_per_rank, feat_dim), newest first. Inactive until :meth:`start` (the reference
    creates it at ``epoch_queue_starts``); while inactive :meth:`push` does nothing. Used once full: each step
    ``scores(prototypes)`` recomputes the queue's scores with the current prototypes (before pushing the batch).

    Typical step::

        queue_scores = queue.scores(prototypes) if queue.is_full else None
        loss = swav_loss(scores, batch_size, queue_scores)
        queue.push([z_crop_c.detach() for c in crops_for_assign])
    """

    _state_names = ("embeddings", "n_filled", "active")

    def __init__(self, n_assign_crops: int, length_per_rank: int, feat_dim: int):
        super().__init__()
        if n_assign_crops < 1 or length_per_rank < 1 or feat_dim < 1:
            raise ValueError(
                f"SwAVQueue: sizes must be positive, got n_assign_crops={n_assign_crops}, "
                f"length_per_rank={length_per_rank}, feat_dim={feat_dim}"
            )
        self.embeddings = torch.zeros(n_assign_crops, length_per_rank, feat_dim)
        self.n_filled = 0
        self.active = False

    @property
    def length(self) -> int:
        return self.embeddings.shape[1]

    @property
    def is_full(self) -> bool:
        return self.active and self.n_filled >= self.length

    def reset(self) -> None:
        self.embeddings.zero_()
        self.n_filled = 0

    def start(self) -> None:
        """Activate (and empty) the queue; later pushes fill it."""
        self.reset()
        self.active = True

    def stop(self) -> None:
        self.reset()
        self.active = False

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Insert this batch's embeddings of the assignment crops at the front, dropping the oldest.

        Args:
            embeddings: list of n_assign_crops tensors (B, D), an (n_assign_crops, B, D) tensor or an
                (n_assign_crops·B, D) view-major stack.
        """
        if not self.active:
            return
        n_assign = self.embeddings.shape[0]
        if isinstance(embeddings, torch.Tensor) and embeddings.dim() == 3:
            embeddings = list(embeddings)
        crops = split_crops(embeddings, n_assign)
        new = torch.stack([c.detach() for c in crops]).to(self.embeddings)  # (n_assign, B, D)
        n_new = new.shape[1]
        if n_new == 0:
            return
        self.embeddings = torch.cat([new, self.embeddings], dim=1)[:, : self.length].contiguous()
        self.n_filled = min(self.length, self.n_filled + n_new)

    @torch.no_grad()
    def scores(self, prototypes: nn.Module | torch.Tensor) -> torch.Tensor:
        """Queue scores with the current prototypes: (n_assign_crops, L, K), no grad.

        ``prototypes`` is a module mapping (N, D) → (N, K) (e.g. a single-head :class:`SwAVPrototypes`) or a
        prototype matrix (K, D).
        """
        if isinstance(prototypes, torch.Tensor):
            weight = prototypes.detach().to(self.embeddings.dtype)
            return torch.einsum("nld,kd->nlk", self.embeddings, weight)
        out = [prototypes(crop) for crop in self.embeddings]
        if not all(isinstance(o, torch.Tensor) for o in out):
            raise TypeError("SwAVQueue.scores: prototypes must return one (N, K) tensor (a single-head module)")
        return torch.stack(out)


class SwAVQueues(PerRankState):
    """This rank's SwAV queues (Caron et al. 2020, Sec. 4.1), the one owner of a method's queue.

    One :class:`SwAVQueue` per prototype set: a single one (key ``""``) for shared prototypes, one per modality with
    per-modality prototypes (Ghesu et al. 2022, Eq. 4). Read like a mapping name → :class:`SwAVQueue` (empty until
    the first :meth:`start`). Per-rank state (:class:`medssl.utils.dist.PerRankState`): the FIFOs are plain
    attributes, not sub-modules or buffers, since DistributedDataParallel would broadcast rank 0's copy over every
    rank's own queue. This class moves them with the module (``.to()``) and saves them as its extra state, tagged
    with the rank: ``{"rank", "queue_length_per_rank", "queues": {name: FIFO state}}``. A checkpoint holds rank 0's
    queues; another rank restarts its queue empty on load (with a warning) and refills it within L / (B · world
    size) steps.

    Args:
        n_assign_crops: the crops whose codes are predicted (one FIFO row block each).
        feat_dim: embedding size D.
        names: the prototype sets (``[""]``, or the modality codes).
        length: the default global queue length L of :meth:`start` (3840 for 2D / 1920 for 3D, Ghesu et al.
            Table I); 0 = none (then :meth:`start` needs one).
    """

    SHARED = ""  # the name of the single queue of shared prototypes

    def __init__(self, n_assign_crops: int, feat_dim: int, names: Sequence[str] = (SHARED,), length: int = 0):
        super().__init__()
        if length < 0:
            raise ValueError(f"SwAVQueues: length={length} must be >= 0")
        self.n_assign_crops, self.feat_dim, self.length = int(n_assign_crops), int(feat_dim), int(length)
        self.names = tuple(str(n) for n in names)
        self._queues: dict[str, SwAVQueue] = {}
        self._device = torch.device("cpu")  # where new FIFOs go: follows .to() / .cuda()

    # ------------------------------------------------------------------ mapping name -> FIFO
    def __getitem__(self, name: str) -> SwAVQueue:
        return self._queues[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._queues)

    def __len__(self) -> int:
        return len(self._queues)

    def get(self, name: str, default: SwAVQueue | None = None) -> SwAVQueue | None:
        return self._queues.get(name, default)

    def values(self):
        return self._queues.values()

    def items(self):
        return self._queues.items()

    # ------------------------------------------------------------------ life
    @property
    def length_per_rank(self) -> int:
        return next(iter(self._queues.values())).length if self._queues else 0

    @property
    def active(self) -> bool:
        return bool(self._queues) and all(q.active for q in self._queues.values())

    def start(self, length: int | None = None) -> int:
        """Start the queues empty (every later :meth:`push` fills them) with global length ``length`` (default
        :attr:`length`): ``length // world_size`` rows per rank and assignment crop. Returns the per-rank length."""
        length = self.length if length is None else int(length)
        world_size = get_world_size()
        if length < world_size:
            raise ValueError(
                f"SwAVQueues: a queue of global length {length} cannot be split over {world_size} ranks (give the "
                "method's queue_length or the SwAVQueueHandler's length)"
            )
        self._create(length // world_size)
        for queue in self._queues.values():
            queue.start()
        return self.length_per_rank

    def reset(self) -> None:
        """Empty every queue (an active one stays active and refills)."""
        for queue in self._queues.values():
            queue.reset()

    def _create(self, length_per_rank: int) -> None:
        if self.length_per_rank != length_per_rank:
            self._queues = {
                name: SwAVQueue(self.n_assign_crops, length_per_rank, self.feat_dim).to(self._device)
                for name in self.names
            }

    # ------------------------------------------------------------------ step
    def full_scores(self, name: str, prototypes: nn.Module | torch.Tensor) -> torch.Tensor | None:
        """The scores of queue ``name`` with the current prototypes (:meth:`SwAVQueue.scores`) once it is full,
        else None (an inactive, filling or missing queue)."""
        queue = self._queues.get(name)
        return queue.scores(prototypes) if queue is not None and queue.is_full else None

    def push(self, name: str, embeddings: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Push this step's assignment-crop embeddings into queue ``name`` (nothing while it is not started)."""
        queue = self._queues.get(name)
        if queue is not None:
            queue.push(embeddings)

    # ------------------------------------------------------------------ device and checkpoint
    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        self._device = fn(torch.empty(0, device=self._device)).device
        for queue in self._queues.values():
            queue._apply(fn, *args, **kwargs)
        return module

    def get_extra_state(self) -> dict:
        return {
            "rank": get_rank(),
            "queue_length_per_rank": self.length_per_rank,
            "queues": {name: q.get_extra_state() for name, q in self._queues.items()},
        }

    def set_extra_state(self, state: dict) -> None:
        length = int(state.get("queue_length_per_rank", 0))
        if not length:
            self._queues = {}
            return
        self._create(length)
        saved = state.get("queues", {})
        if set(saved) != set(self._queues):
            raise ValueError(f"SwAVQueues: the checkpoint holds queues {sorted(saved)}, this one {list(self.names)}")
        for name, queue in self._queues.items():
            queue.set_extra_state(saved[name])
        if int(state.get("rank", 0)) != get_rank():
            logger.warning(
                f"SwAV: the checkpoint holds rank {state.get('rank')}'s queue; rank {get_rank()} restarts its queue "
                "empty (it is used again once full)"
            )
            self.reset()

    @staticmethod
    def rename_legacy_state(attribute: str):
        """A ``register_load_state_dict_pre_hook`` hook for the owning method: checkpoints written before the
        queues had their own module kept this state as the method's ``_extra_state``; it moves to
        ``<attribute>._extra_state``."""

        def hook(module, state_dict, prefix, *args):
            old, new = prefix + "_extra_state", f"{prefix}{attribute}._extra_state"
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)

        return hook


def cancel_prototype_grads(
    prototypes: nn.Module | Iterable[torch.Tensor], iteration: int, freeze_iters: int
) -> bool:
    """Drop the prototypes' gradients (``p.grad = None``) while ``iteration < freeze_iters`` (SwAV's
    ``freeze_prototypes_niters``: 5005 in SwAV; 10000 / 4000 in Ghesu et al. Table I). Call between backward and the
    optimiser step; the optimiser then skips them (no momentum, no weight decay). Returns True when gradients were
    dropped."""
    if iteration >= freeze_iters:
        return False
    params = prototypes.parameters() if isinstance(prototypes, nn.Module) else prototypes
    for p in params:
        p.grad = None
    return True


def per_modality_swav_loss(
    embeddings: torch.Tensor | Sequence[torch.Tensor],
    modalities: Sequence[str],
    prototypes: PerModalityPrototypes | Mapping[str, nn.Module],
    loss: SwAVLoss,
    queues: SwAVQueues | Mapping[str, SwAVQueue] | None = None,
    keep_all_in_graph: bool = True,
    return_per_modality: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Multi-modality clustering (Ghesu et al. 2022, Eq. 4): L = Σ_m L_swav(z_m; C_m).

    The batch's samples are grouped by modality; modality m's samples are scored against its own prototypes C_m
    and get their own Sinkhorn problem (global over ranks), and the per-modality SwAV losses are summed.

    Distributed: the set of modalities present anywhere in the global batch is agreed with one all-reduce, and
    every rank then runs the modalities in sorted order — also those it holds no sample of (zero rows, zero loss)
    — so the collectives match across ranks whatever each rank's share looks like.

    Args:
        embeddings: (n_crops·B, D) view-major stack of L2-normalised embeddings, or a list of n_crops (B, D).
        modalities: the B samples' modality codes (the collated batch's "modality" list).
        prototypes: :class:`PerModalityPrototypes` (or a mapping modality → single-head prototype module).
        loss: the :class:`SwAVLoss` applied to each modality's sub-batch (its n_crops / crops_for_assign).
        queues: optional :class:`SwAVQueues` (or a mapping modality → :class:`SwAVQueue`); a full queue's scores
            are used, then this step's detached assignment-crop embeddings are pushed.
        keep_all_in_graph: add 0·ΣC_m for configured modalities absent from the whole global batch, so every
            prototype parameter is used at every step (DistributedDataParallel without find_unused_parameters).
            Their gradient is then zero (not None): momentum / weight decay still act on them.
        return_per_modality: also return {modality: its loss} for the modalities run.

    Raises:
        ValueError: a sample's modality is not configured (names the modality and the configured list).
    """
    known = sorted(prototypes.modalities if isinstance(prototypes, PerModalityPrototypes) else prototypes.keys())
    crops = split_crops(embeddings, loss.n_crops, len(modalities))
    unknown = sorted(set(modalities) - set(known))
    if unknown:
        raise ValueError(
            f"per_modality_swav_loss: modality {unknown[0]!r} in the batch has no prototypes; "
            f"configured modalities: {known}"
        )
    present = torch.tensor([float(m in set(modalities)) for m in known], device=crops[0].device)
    if is_distributed():
        all_reduce_sum(present)

    total = crops[0].new_zeros((), dtype=torch.float32)
    per_modality: dict[str, torch.Tensor] = {}
    for j, modality in enumerate(known):
        prototype_module = prototypes[modality]
        if present[j] == 0:
            if keep_all_in_graph:
                total = total + 0.0 * sum(p.sum() for p in prototype_module.parameters())
            continue
        index = torch.tensor([i for i, m in enumerate(modalities) if m == modality], dtype=torch.long)
        index = index.to(crops[0].device)
        crop_embeddings = [crop.index_select(0, index) for crop in crops]
        scores = [prototype_module(e) for e in crop_embeddings]
        queue = None if queues is None else queues.get(modality)
        queue_scores = queue.scores(prototype_module) if queue is not None and queue.is_full else None
        modality_loss = loss(scores, batch_size=len(index), queue_scores=queue_scores)
        if queue is not None:
            queue.push([crop_embeddings[c].detach() for c in loss.crops_for_assign])
        per_modality[modality] = modality_loss
        total = total + modality_loss
    return (total, per_modality) if return_per_modality else total
