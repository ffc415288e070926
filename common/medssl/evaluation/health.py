"""Collapse and health diagnostics of self-supervised pretraining, and the handler that logs them every epoch.

A self-supervised method can "collapse": every input maps to (nearly) the same embedding, or to one cluster, and
the loss may still look reasonable. These numbers show it within the first epochs:

* **embedding std** (:func:`embedding_std`): the mean over the D dimensions of the standard deviation of the
  L2-normalised embeddings across the rows of a batch. Rows spread over the unit sphere give about 1/√D, so the
  logged ``emb_std_sqrt_d`` = std·√D is about 1 when healthy and 0 when every row is the same (SimSiam, Chen & He
  2021, Sec. 4.1, monitors exactly this);
* **effective rank** (:func:`effective_rank`): exp of the entropy of the normalised singular values of the
  L2-normalised embedding matrix (Roy & Vetterli 2007; RankMe, Garrido et al. 2023): between 1 (every row along one
  direction: collapse) and min(N, D) (all directions used equally); dimensional collapse shows as a small rank.
  The handler measures both on the deviations of each step's normalised rows from that step's mean, pooled over the
  steps (the pooled within-step variance; the most recent ``max_rows`` deviations for the rank): each step is one
  state of the model, and rows pooled as they are would count the drift of a moving model as spread. The methods
  give one row per item (the first view), so two views of an item do not count as two items;
* **prototype usage** (:func:`usage_entropy`, SwAV / DeepCluster-v2 / the joint method's clustering stages): the
  histogram of the prototypes each row's scores point to (argmax of z · Cᵀ), its entropy normalised by
  log min(K, N) (1 = the N rows spread over as many prototypes as they can; 0 = all in one) and the number of
  prototypes in use. The hard assignments are used, not the Sinkhorn codes: the codes are equipartitioned by
  construction, so their mean is uniform even for a collapsed encoder;
* **prediction entropy** (SwAV / DeepCluster-v2): the mean entropy of each row's prediction softmax(z · Cᵀ / τ),
  normalised by log K. Near 1 the predictions are uniform and the swapped / cluster loss sits at ln K: the codes
  carry no information a view can predict (SwAV's trivial solution; it happens with small one-modality batches
  under strong per-view intensity changes, ``ssl_swav_multimodal_pretrain`` docs "Does it learn?");
* **teacher entropy** (:func:`distribution_entropy`, DINO / UniMiSS): the mean entropy of the centred, sharpened
  teacher distribution P_t of each row, normalised by log K, and the entropy of the batch-mean P_t
  (``teacher_mean_entropy``), each averaged over the steps. DINO (Caron et al. 2021, Sec. 5.3) names the two
  collapses: a uniform teacher output (per-row entropy → 1) and one dimension dominating (the batch-mean entropy
  → 0, every row picks the same output); a per-row entropy equal to the batch-mean one means every row gets the same
  distribution. The **centre entropy** is the entropy of
  softmax(C / τ_t): the distribution of an input whose teacher logits equal the centre C, near 0 when one logit
  dominates the running mean of the teacher outputs.

:func:`collapse_verdict` turns these into ``"ok"``, ``"warning"`` or ``"collapsed"`` (``"n/a"`` with too few rows)
with the reasons; the thresholds are the module constants below. :class:`HealthMonitorHandler` collects the detached
tensors each method puts in its step output under ``"health"`` (see :func:`medssl.networks.heads.prototype_assignments`
and the methods' ``training_step``) and reports once per epoch: ``<output_dir>/health.jsonl``, TensorBoard scalars
and one console line.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from medssl.utils.dist import is_main_process
from medssl.utils.io import json_safe

__all__ = [
    "embedding_std",
    "effective_rank",
    "usage_entropy",
    "distribution_entropy",
    "collapse_verdict",
    "health_line",
    "HealthMonitorHandler",
    "COLLAPSED_STD_SQRT_D",
    "COLLAPSED_EFFECTIVE_RANK",
    "COLLAPSED_TEACHER_ENTROPY",
    "COLLAPSED_PREDICTION_ENTROPY",
    "WARNING_STD_SQRT_D",
    "WARNING_USAGE_ENTROPY",
    "WARNING_RANK_FRACTION",
    "MIN_ROWS",
    "MIN_USAGE_ROWS",
]

logger = logging.getLogger(__name__)

COLLAPSED_STD_SQRT_D = 0.1
"""Collapsed below: embedding std·√D (every row nearly the same point of the sphere)."""
COLLAPSED_EFFECTIVE_RANK = 2.0
"""Collapsed below: effective rank (the rows lie along fewer than two directions)."""
COLLAPSED_TEACHER_ENTROPY = 0.99
"""Collapsed above: mean per-row teacher entropy / log K (a uniform teacher output; DINO's centring-only collapse)."""
COLLAPSED_PREDICTION_ENTROPY = 0.99
"""Collapsed above: mean per-row prototype prediction entropy / log K (uniform predictions: the SwAV / DeepCluster-v2
loss at ln K)."""
WARNING_STD_SQRT_D = 0.3
"""Warning below: embedding std·√D (the rows crowd into a small part of the sphere)."""
WARNING_USAGE_ENTROPY = 0.3
"""Warning below: prototype usage entropy (a few prototypes take most rows)."""
WARNING_RANK_FRACTION = 0.1
"""Warning below: effective rank / its bound min(D, rows) (the rows spread along few directions: dimensional
collapse, e.g. one direction per modality)."""
RANK_RMS_TOL = 1e-4
"""Directions of the within-step deviations (of unit-norm rows) with an RMS extent at most this are float round-off,
not spread, and do not count in the effective rank."""
MIN_ROWS = 8
"""Rows needed before the std / rank checks say anything (fewer rows cannot show a spread)."""
MIN_USAGE_ROWS = 32
"""Rows (of a modality) needed before "one prototype takes every row" counts as collapse: a handful of similar items
in one cluster can be chance."""


# --------------------------------------------------------------------------------------------- pure functions
def _rows(x: torch.Tensor, what: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    if x.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D tensor (N rows, D), got shape {tuple(x.shape)}")
    return x.to(torch.float64)


def embedding_std(z: torch.Tensor) -> float:
    """Mean over the D dimensions of the per-dimension standard deviation (unbiased, over the N rows) of the
    L2-normalised rows of ``z`` (N, D). About 1/√D for rows spread over the sphere, 0 for identical rows; NaN for
    fewer than two rows."""
    z = _rows(z, "embedding_std")
    if z.shape[0] < 2:
        return float("nan")
    return float(F.normalize(z, dim=1).std(dim=0, correction=1).mean())


def effective_rank(z: torch.Tensor, normalize: bool = True, rms_tol: float = 0.0) -> float:
    """Effective rank (Roy & Vetterli 2007) of ``z`` (N, D), its rows L2-normalised first (``normalize``):
    exp(−Σ p_k log p_k) with p = σ / ‖σ‖₁, σ the singular values. 1 for rows along one direction (identical
    rows), min(N, D) for orthogonal rows of equal norm; 0 for an all-zero (or empty) matrix. Directions along which
    the rows' root-mean-square extent σ / √N is at most ``rms_tol`` are not counted (round-off, not spread)."""
    z = _rows(z, "effective_rank")
    if z.numel() == 0:
        return 0.0
    s = torch.linalg.svdvals(F.normalize(z, dim=1) if normalize else z)
    s = s[s > rms_tol * math.sqrt(z.shape[0])]
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def usage_entropy(assignments: torch.Tensor, n_prototypes: int | None = None) -> tuple[float, int]:
    """(normalised entropy, prototypes used) of the assignment histogram.

    ``assignments``: (N,) prototype indices, or (N, K) scores / probabilities / codes (their argmax is taken). The
    entropy of the histogram over the K prototypes is divided by log min(K, N), so 1 = the N rows spread over as
    many prototypes as they can, 0 = all in one; NaN when min(K, N) < 2 (no spread possible). "Used" = prototypes
    that are the argmax of at least one row."""
    a = torch.as_tensor(assignments).detach()
    if a.dim() == 2:
        n_prototypes = a.shape[1] if n_prototypes is None else n_prototypes
        a = a.argmax(dim=1)
    if a.dim() != 1:
        raise ValueError(f"usage_entropy: expected (N,) indices or (N, K) scores, got shape {tuple(a.shape)}")
    a = a.long().cpu()
    if n_prototypes is None:
        n_prototypes = int(a.max()) + 1 if a.numel() else 0
    counts = torch.bincount(a, minlength=int(n_prototypes)).to(torch.float64)
    return _histogram_entropy(counts)


def _histogram_entropy(counts: torch.Tensor) -> tuple[float, int]:
    n, k = float(counts.sum()), int(counts.numel())
    used = int((counts > 0).sum())
    if min(k, n) < 2:
        return float("nan"), used
    p = counts[counts > 0] / n
    return float(-(p * p.log()).sum() / math.log(min(k, n))) + 0.0, used  # + 0.0: no "-0.0" for one prototype


def distribution_entropy(probs: torch.Tensor) -> float:
    """Entropy of a probability distribution over K outputs divided by log K (1 = uniform, 0 = one-hot): of the
    vector for a (K,) input, the mean over the rows for (N, K). Rows are renormalised to sum to 1."""
    p = torch.as_tensor(probs).detach().to(torch.float64)
    if p.dim() == 1:
        p = p.unsqueeze(0)
    if p.dim() != 2 or p.shape[1] < 2 or p.shape[0] == 0:
        raise ValueError(
            f"distribution_entropy: expected (K,) or (N, K) probabilities with K >= 2, got {tuple(p.shape)}"
        )
    p = p.clamp_min(0)
    p = p / p.sum(dim=1, keepdim=True).clamp_min(1e-300)
    h = -(p * p.clamp_min(1e-300).log()).sum(dim=1)
    return float(h.mean() / math.log(p.shape[1]))


# --------------------------------------------------------------------------------------------- verdict
def collapse_verdict(stats: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(``"ok"`` | ``"warning"`` | ``"collapsed"`` | ``"n/a"``, reasons) of a :class:`HealthMonitorHandler` record.

    Collapsed when any of: ``emb_std_sqrt_d`` < :data:`COLLAPSED_STD_SQRT_D` (0.1); ``eff_rank`` <
    :data:`COLLAPSED_EFFECTIVE_RANK` (2), both from at least :data:`MIN_ROWS` rows and D >= 2 (a rank is not judged
    for rows without spread: the shape of a negligible spread says nothing); one prototype takes every
    row (of a modality, with per-modality prototypes) of at least :data:`MIN_USAGE_ROWS` rows; ``teacher_entropy`` >
    :data:`COLLAPSED_TEACHER_ENTROPY` (0.99, uniform teacher output); ``prediction_entropy`` >
    :data:`COLLAPSED_PREDICTION_ENTROPY` (0.99, uniform prototype predictions); exp(``teacher_mean_entropy`` · log K) < 2 (one
    teacher output dimension for every row). Warning when: ``emb_std_sqrt_d`` < :data:`WARNING_STD_SQRT_D` (0.3) or
    ``usage_entropy`` < :data:`WARNING_USAGE_ENTROPY` (0.3) or ``eff_rank`` < :data:`WARNING_RANK_FRACTION` (0.1) ×
    ``rank_bound``. Missing or NaN numbers are not judged; ``"n/a"`` when
    nothing could be judged (fewer than :data:`MIN_ROWS` embedding rows and no teacher)."""
    collapsed: list[str] = []
    warning: list[str] = []

    def num(key: str) -> float | None:
        v = stats.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    std, rank, rows, dim = num("emb_std_sqrt_d"), num("eff_rank"), num("n_rows") or 0, num("dim") or 0
    judged = rows >= MIN_ROWS and dim >= 2
    if judged and std is not None and std < COLLAPSED_STD_SQRT_D:
        collapsed.append(f"embedding std*sqrt(D) {std:.3f} < {COLLAPSED_STD_SQRT_D}: all items in a narrow cone")
    elif judged and std is not None and std < WARNING_STD_SQRT_D:
        warning.append(f"embedding std*sqrt(D) {std:.3f} < {WARNING_STD_SQRT_D}")
    spread = std is None or std >= COLLAPSED_STD_SQRT_D
    if judged and spread and rank is not None and rank < COLLAPSED_EFFECTIVE_RANK:
        collapsed.append(f"effective rank {rank:.2f} < {COLLAPSED_EFFECTIVE_RANK:g}")
    bound = num("rank_bound")
    few_directions = bound and COLLAPSED_EFFECTIVE_RANK <= (rank or 0.0) < WARNING_RANK_FRACTION * bound
    if judged and spread and rank is not None and few_directions:
        warning.append(f"effective rank {rank:.1f} of {bound:g}: few directions used (dimensional collapse)")
    usage = stats.get("prototype_usage")
    if isinstance(usage, Mapping):
        for group, u in usage.items():
            if u.get("rows", 0) >= MIN_USAGE_ROWS and u.get("n_prototypes", 0) >= 2 and u.get("used") == 1:
                where = f" of {group}" if group else ""
                collapsed.append(f"one prototype takes all {u['rows']} rows{where}")
    entropy = num("usage_entropy")
    if entropy is not None and entropy < WARNING_USAGE_ENTROPY and not any("prototype" in r for r in collapsed):
        warning.append(f"prototype usage entropy {entropy:.2f} < {WARNING_USAGE_ENTROPY}")
    teacher, teacher_mean, k = num("teacher_entropy"), num("teacher_mean_entropy"), num("teacher_dim")
    if teacher is not None and teacher > COLLAPSED_TEACHER_ENTROPY:
        collapsed.append(f"uniform teacher output (entropy {teacher:.3f} > {COLLAPSED_TEACHER_ENTROPY})")
    if teacher_mean is not None and k and math.exp(teacher_mean * math.log(k)) < 2.0:
        collapsed.append("one teacher output dimension for every row")
    prediction = num("prediction_entropy")
    if prediction is not None and prediction > COLLAPSED_PREDICTION_ENTROPY:
        collapsed.append(
            f"uniform prototype predictions (entropy {prediction:.3f} > {COLLAPSED_PREDICTION_ENTROPY}): the loss sits at"
            " ln K"
        )
    if collapsed:
        return "collapsed", collapsed + warning
    if warning:
        return "warning", warning
    teacher_judged = teacher is not None or teacher_mean is not None or prediction is not None
    if std is not None and not judged and not teacher_judged:
        return "n/a", [f"only {int(rows)} rows since the last report, {MIN_ROWS} needed to judge"]
    return "ok", []


def health_line(record: Mapping[str, Any]) -> str:
    """The console line of a health record: ``epoch 3 health: emb std*sqrt(D) 0.84, eff. rank 41.2/128, prototypes
    used 97/100 (usage entropy 0.96), kNN 0.8125 -- ok`` (or ``-- COLLAPSED (reasons)``)."""
    parts = []
    if "emb_std_sqrt_d" in record:
        parts.append(f"emb std*sqrt(D) {_fmt(record['emb_std_sqrt_d'])}")
        parts.append(f"eff. rank {_fmt(record.get('eff_rank'), 1)}/{record.get('rank_bound', record.get('dim'))}")
    if "protos_used" in record:
        parts.append(
            f"prototypes used {record['protos_used']}/{record['n_prototypes']} "
            f"(usage entropy {_fmt(record.get('usage_entropy'))})"
        )
    if "prediction_entropy" in record:
        parts.append(f"prediction entropy {_fmt(record['prediction_entropy'])}")
    if "teacher_entropy" in record:
        parts.append(
            f"teacher entropy {_fmt(record['teacher_entropy'])} (batch mean {_fmt(record.get('teacher_mean_entropy'))})"
        )
    if "center_entropy" in record:
        parts.append(f"centre entropy {_fmt(record['center_entropy'])}")
    for key, value in (record.get("knn") or {}).items():
        parts.append(f"{key} {_fmt(value, 4)}")
    where = f"epoch {record.get('epoch')}" if record.get("at") == "epoch" else f"iteration {record.get('iteration')}"
    verdict = record.get("verdict", "ok")
    reasons = record.get("reasons") or []
    tail = verdict.upper() + (f" ({'; '.join(reasons)})" if reasons else "") if verdict != "ok" else "ok"
    return f"{where} health: {', '.join(parts) or 'no diagnostics'} -- {tail}"


def _fmt(value: Any, digits: int = 2) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "n/a"
    return f"{value:.{digits}f}"


# --------------------------------------------------------------------------------------------- handler
class HealthMonitorHandler:
    """Collapse and health diagnostics of the running pretraining, once per epoch (rank 0).

    Every method's ``training_step`` returns, under ``key`` (``"health"``), a dict of detached tensors (no extra
    forward pass): ``"embeddings"`` (N, D); for the clustering methods ``"assignments"`` (N,) with
    ``"n_prototypes"`` (and ``"groups"``, the modality of each row, with per-modality prototypes) and
    ``"prediction_probs"`` (N, K) (pooled as the mean per-row entropy); for DINO-style
    teachers ``"teacher_probs"`` (N, K), ``"center"`` (1, K) and ``"teacher_temp"``. The handler pools the
    within-step deviations of the embeddings (the last ``max_rows`` of them for the rank; see the module docstring),
    the assignment histograms and the per-step teacher entropies, and at Events.EPOCH_COMPLETED (and every
    ``every_n_iters`` iterations when > 0, each report covering the iterations since the previous one) computes the
    numbers of the module docstring and :func:`collapse_verdict`, then

    * appends a JSON line to ``<output_dir>/<filename>`` (``health.jsonl``: epoch, iteration, the numbers, the
      verdict and its reasons; a resumed run appends, the last line of an epoch wins);
    * writes them as TensorBoard scalars ``health/<name>`` at the iteration (``tensorboard_dir``, default
      ``<output_dir>/tensorboard``, beside :class:`medssl.engines.TrainingLogHandler`'s scalars);
    * logs one line (:func:`health_line`), at WARNING level for a warning or a collapse;
    * sets ``engine.state.health`` to the record.

    The kNN accuracies a :class:`medssl.evaluation.KNNMonitorHandler` stored in ``engine.state.metrics`` during the
    epoch (keys starting with ``"knn"``) join the record and the line: list this handler after the kNN monitor.

    Rank 0 only, on its local rows (no collective, so it cannot stall a multi-process run); it draws no random
    numbers (a resumed run stays exact). A run resumed in the middle of an epoch reports that epoch on the part it
    redid.

    Args:
        output_dir: directory of the JSON lines file (None = no file).
        key: the step-output entry holding the method's diagnostics.
        max_rows: the most recent deviation rows kept for the effective rank (bounds the memory and the SVD's cost).
        every_n_iters: also report every this many iterations (0 = at epoch ends only).
        tensorboard: write TensorBoard scalars.
        tensorboard_dir: default ``<output_dir>/tensorboard``.
        filename: the JSON lines file name.
    """

    def __init__(
        self,
        output_dir: str | Path | None = None,
        key: str = "health",
        max_rows: int = 1024,
        every_n_iters: int = 0,
        tensorboard: bool = True,
        tensorboard_dir: str | Path | None = None,
        filename: str = "health.jsonl",
    ) -> None:
        if max_rows < 2:
            raise ValueError(f"HealthMonitorHandler: max_rows={max_rows} must be >= 2")
        if every_n_iters < 0:
            raise ValueError(f"HealthMonitorHandler: every_n_iters={every_n_iters} must be >= 0")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.key = key
        self.max_rows = int(max_rows)
        self.every_n_iters = int(every_n_iters)
        self.filename = filename
        self.tensorboard_dir = (
            Path(tensorboard_dir)
            if tensorboard_dir is not None
            else (self.output_dir / "tensorboard" if self.output_dir is not None else None)
        )
        self.tensorboard = bool(tensorboard) and self.tensorboard_dir is not None
        self.history: list[dict[str, Any]] = []
        self._writer = None
        self._warned_missing = False
        self._metrics_at_epoch_start: dict[str, Any] = {}
        self._reset()

    # ------------------------------------------------------------------ accumulation
    def _reset(self) -> None:
        self._deviations: deque[torch.Tensor] = deque()
        self._n_deviations = 0
        self._squares: torch.Tensor | None = None
        self._dof = 0
        self._rows = 0
        self._counts: dict[str, torch.Tensor] = {}
        self._teacher_steps = 0
        self._prediction_steps = 0
        self._prediction_entropy_sum = 0.0
        self._teacher_entropy_sum = 0.0
        self._teacher_mean_entropy_sum = 0.0
        self._teacher_dim = 0
        self._center: torch.Tensor | None = None
        self._teacher_temp: float | None = None
        self._steps = 0

    def update(self, health: Mapping[str, Any]) -> None:
        """Add one step's diagnostics (the method's ``"health"`` dict)."""
        self._steps += 1
        emb = health.get("embeddings")
        if isinstance(emb, torch.Tensor) and emb.dim() == 2 and emb.shape[0] >= 2:
            z = F.normalize(emb.detach().to(torch.float64), dim=1).cpu()
            deviations = z - z.mean(dim=0, keepdim=True)
            squares = deviations.pow(2).sum(dim=0)
            same_dim = self._squares is not None and self._squares.shape == squares.shape
            self._squares = self._squares + squares if same_dim else squares
            self._dof = self._dof + z.shape[0] - 1 if same_dim else z.shape[0] - 1
            self._rows = self._rows + z.shape[0] if same_dim else z.shape[0]
            if not same_dim:
                self._deviations.clear()
                self._n_deviations = 0
            self._deviations.append(deviations[-self.max_rows :])
            self._n_deviations += self._deviations[-1].shape[0]
            while self._n_deviations - self._deviations[0].shape[0] >= self.max_rows:
                self._n_deviations -= self._deviations.popleft().shape[0]
        assignments = health.get("assignments")
        if isinstance(assignments, torch.Tensor) and assignments.numel():
            k = int(health.get("n_prototypes") or (int(assignments.max()) + 1))
            assignments = assignments.detach().reshape(-1).long().cpu()
            groups = health.get("groups")
            if groups is None:
                self._add_counts("", assignments, k)
            else:
                names = [str(g) for g in groups]
                for group in sorted(set(names)):
                    rows = torch.tensor([i for i, g in enumerate(names) if g == group])
                    self._add_counts(group, assignments[rows], k)
        predictions = health.get("prediction_probs")
        if isinstance(predictions, torch.Tensor) and predictions.dim() == 2 and predictions.shape[0]:
            if predictions.shape[1] >= 2:
                self._prediction_entropy_sum += distribution_entropy(predictions.detach().float())
                self._prediction_steps += 1
        probs = health.get("teacher_probs")
        if isinstance(probs, torch.Tensor) and probs.dim() == 2 and probs.shape[0] and probs.shape[1] >= 2:
            p = probs.detach().float()
            self._teacher_entropy_sum += distribution_entropy(p)
            self._teacher_mean_entropy_sum += distribution_entropy(p.mean(dim=0))
            self._teacher_steps += 1
            self._teacher_dim = int(p.shape[1])
        center = health.get("center")
        if isinstance(center, torch.Tensor):
            self._center = center.detach().reshape(-1).double().cpu()
            self._teacher_temp = float(health.get("teacher_temp", 1.0))

    def _add_counts(self, group: str, assignments: torch.Tensor, k: int) -> None:
        counts = torch.bincount(assignments, minlength=k)
        previous = self._counts.get(group)
        self._counts[group] = counts if previous is None or previous.shape != counts.shape else previous + counts

    def compute(self) -> dict[str, Any]:
        """The numbers of the rows collected since the last report (see the module docstring for each)."""
        record: dict[str, Any] = {"steps": self._steps}
        if self._squares is not None and self._dof:
            dim = int(self._squares.numel())
            std = float((self._squares / self._dof).sqrt().mean())  # pooled within-step std, per dimension
            rank_rows = torch.cat(list(self._deviations))[-self.max_rows :]
            record.update(
                dim=dim,
                n_rows=self._rows,
                emb_std=std,
                emb_std_sqrt_d=std * math.sqrt(dim),
                eff_rank=effective_rank(rank_rows, normalize=False, rms_tol=RANK_RMS_TOL),
                rank_bound=min(dim, int(rank_rows.shape[0]), self._dof),  # each step's deviations lose one dimension
            )
        if self._counts:
            usage: dict[str, dict[str, Any]] = {}
            for group, counts in sorted(self._counts.items()):
                entropy, used = _histogram_entropy(counts.to(torch.float64))
                usage[group] = {
                    "usage_entropy": entropy,
                    "used": used,
                    "n_prototypes": int(counts.numel()),
                    "rows": int(counts.sum()),
                }
            rows = sum(u["rows"] for u in usage.values())
            finite = [(u["usage_entropy"], u["rows"]) for u in usage.values() if math.isfinite(u["usage_entropy"])]
            record.update(
                usage_entropy=sum(e * r for e, r in finite) / sum(r for _, r in finite) if finite else float("nan"),
                protos_used=sum(u["used"] for u in usage.values()),
                n_prototypes=sum(u["n_prototypes"] for u in usage.values()),
                assigned_rows=rows,
                prototype_usage=usage,
            )
        if self._prediction_steps:
            record["prediction_entropy"] = self._prediction_entropy_sum / self._prediction_steps
        if self._teacher_steps:
            record.update(
                teacher_dim=self._teacher_dim,
                teacher_entropy=self._teacher_entropy_sum / self._teacher_steps,
                teacher_mean_entropy=self._teacher_mean_entropy_sum / self._teacher_steps,
            )
        if self._center is not None and self._center.numel() >= 2:
            logits = self._center / max(self._teacher_temp or 1.0, 1e-12)
            record["center_entropy"] = distribution_entropy(torch.softmax(logits, dim=0))
        verdict, reasons = collapse_verdict(record)
        record.update(verdict=verdict, reasons=reasons)
        return record

    # ------------------------------------------------------------------ engine
    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if not is_main_process():
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._on_epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def _on_epoch_started(self, engine: Any) -> None:
        self._reset()
        self._metrics_at_epoch_start = dict(getattr(engine.state, "metrics", None) or {})

    def _on_iteration_completed(self, engine: Any) -> None:
        output = engine.state.output
        health = output.get(self.key) if isinstance(output, Mapping) else None
        if health is None and isinstance(output, Sequence) and output and isinstance(output[0], Mapping):
            health = output[0].get(self.key)
        if not isinstance(health, Mapping):
            if not self._warned_missing:
                logger.warning(
                    f"HealthMonitorHandler: the step output has no {self.key!r} entry "
                    f"({type(getattr(engine, 'method', None)).__name__} gives no diagnostics); nothing to report"
                )
                self._warned_missing = True
            return
        self.update(health)
        iteration, epoch_length = engine.state.iteration, engine.state.epoch_length or 0
        last_of_epoch = bool(epoch_length) and iteration % epoch_length == 0  # the epoch report follows
        if self.every_n_iters and iteration % self.every_n_iters == 0 and not last_of_epoch:
            self.report(engine, at="iteration")
            self._reset()

    def _on_epoch_completed(self, engine: Any) -> None:
        if self._steps:
            self.report(engine, at="epoch")

    def _fresh_knn(self, engine: Any) -> dict[str, float]:
        # identity, not equality: a kNN evaluation this epoch stores a new float even when the accuracy repeats
        metrics = getattr(engine.state, "metrics", None) or {}
        return {
            k: float(v)
            for k, v in metrics.items()
            if k.startswith("knn") and isinstance(v, (int, float)) and v is not self._metrics_at_epoch_start.get(k)
        }

    def report(self, engine: Any, at: str = "epoch") -> dict[str, Any]:
        """Compute, write and log the record of the rows collected so far; returns it."""
        record: dict[str, Any] = {"epoch": int(engine.state.epoch), "iteration": int(engine.state.iteration), "at": at}
        record.update(self.compute())
        knn = self._fresh_knn(engine) if at == "epoch" else {}
        if knn:
            record["knn"] = knn
        self.history.append(record)
        engine.state.health = record
        line = health_line(record)
        (logger.warning if record["verdict"] in ("warning", "collapsed") else logger.info)(line)
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / self.filename, "a", encoding="utf-8") as f:
                f.write(json.dumps(json_safe(record)) + "\n")
        self._write_tensorboard(record)
        return record

    def _write_tensorboard(self, record: Mapping[str, Any]) -> None:
        if not self.tensorboard or self.tensorboard_dir is None:
            return
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the JSON log and the console line remain
                logger.warning("HealthMonitorHandler: tensorboard is not installed; no TensorBoard scalars")
                self.tensorboard = False
                return
            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir))
        step = int(record["iteration"])
        for name in (
            "emb_std_sqrt_d", "eff_rank", "usage_entropy", "protos_used", "prediction_entropy", "teacher_entropy",
            "teacher_mean_entropy", "center_entropy",
        ):
            value = record.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"health/{name}", value, step)
        for group, usage in (record.get("prototype_usage") or {}).items():
            if group and math.isfinite(usage["usage_entropy"]):
                self._writer.add_scalar(f"health/usage_entropy_{group}", usage["usage_entropy"], step)
        self._writer.add_scalar("health/collapsed", float(record["verdict"] == "collapsed"), step)
        self._writer.flush()

    def close(self, engine: Any = None) -> None:
        """Close the TensorBoard writer (Events.COMPLETED)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
