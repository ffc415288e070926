"""DINO self-distillation loss with teacher centring (Caron et al. 2021; UniMiSS, Xie et al. ECCV 2022, Eq. 5 and 6).

Notation: f_s, f_t the student / teacher head outputs (K logits, see :class:`medssl.networks.DINOHead`), C the
centre (1, K), τ_s / τ_t the student / teacher temperatures, ω the centre momentum.

    P_t = softmax((f_t − C) / τ_t),   log P_s = log_softmax(f_s / τ_s)
    H(f_t, f_s) = − Σ_k P_t[k] · log P_s[k]

Stacks are view-major: rows ``v·B … (v+1)·B − 1`` of an (n_views·B, K) tensor belong to view v, the same sample order
in every view. The loss is the mean over the ordered pairs (teacher view t, student view v) with t ≠ v of
mean_b H(f_t[b], f_s[b]): with two views the symmetric ½ (H(t₁, s₂) + H(t₂, s₁)) of Eq. 5. With multi-crop the
student has more views than the teacher (the teacher sees only the first, global, views).

After the loss, C ← ω · C + (1 − ω) · mean of the teacher outputs over the global batch (all ranks). The centre
is a buffer (saved in the method's state dict, so a resumed run continues with it).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medssl.utils.dist import all_reduce_sum

__all__ = ["DINOLoss"]


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher distribution and the student's, over every pair of
    different views, with the teacher centre updated from the global batch after each call.

    Args:
        out_dim: K, the head's output size (65536).
        student_temp: τ_s (0.1).
        teacher_temp: τ_t (0.04 in UniMiSS). A plain attribute, read at every call: schedule it with
            :class:`medssl.engines.CosineScheduleHandler` (``param_name="teacher_temp"``, or
            ``"loss.teacher_temp"`` on a method holding this module as ``loss``). DINO's linear warm-up
            0.04 → 0.07 over 30 epochs is ``start_value=0.07, end_value=0.07, warmup_start_value=0.04,
            warmup_epochs=30`` (per iteration; the reference changes it once per epoch). ``student_temp`` can be
            scheduled the same way.
        center_momentum: ω (0.9).
        n_views: number of views in the student stack (2).
        n_teacher_views: number of views in the teacher stack (default ``n_views``; 2 with multi-crop, where the
            teacher's view t and the student's view t are the same crop for t < n_teacher_views).

    Call: ``loss(student_out, teacher_out, update_center=True)`` with ``student_out`` (n_views·B, K) and
    ``teacher_out`` (n_teacher_views·B, K), view-major. No gradient flows into ``teacher_out``. The loss is computed
    in float32 for half-precision inputs (float64 inputs stay float64). ``update_center=False`` leaves C unchanged
    (for a step that calls the loss several times on the same teacher outputs); the reference's 3D step (Eq. 6)
    calls it four times, each updating C.

    Distributed: the centre update is one all-reduce of (Σ rows, row count) — every rank must call the loss the same
    number of times with ``update_center=True``. The local batch may differ in size between ranks (and be empty:
    the loss is then a zero still connected to the graph); the centre is the mean over all rows of all ranks, as one
    process on the concatenated batch.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        center_momentum: float = 0.9,
        n_views: int = 2,
        n_teacher_views: int | None = None,
    ) -> None:
        super().__init__()
        n_teacher_views = n_views if n_teacher_views is None else n_teacher_views
        if out_dim < 1:
            raise ValueError(f"DINOLoss: out_dim={out_dim} must be >= 1")
        if n_views < 1 or n_teacher_views < 1:
            raise ValueError(f"DINOLoss: n_views={n_views}, n_teacher_views={n_teacher_views} must be >= 1")
        if n_views * n_teacher_views - min(n_views, n_teacher_views) < 1:
            raise ValueError(
                f"DINOLoss: n_views={n_views}, n_teacher_views={n_teacher_views} give no pair of different views"
            )
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"DINOLoss: center_momentum={center_momentum} must be in [0, 1]")
        if student_temp <= 0 or teacher_temp <= 0:
            raise ValueError(f"DINOLoss: temperatures must be > 0 (student {student_temp}, teacher {teacher_temp})")
        self.out_dim = int(out_dim)
        self.student_temp = float(student_temp)
        self.teacher_temp = float(teacher_temp)
        self.center_momentum = float(center_momentum)
        self.n_views = int(n_views)
        self.n_teacher_views = int(n_teacher_views)
        self.register_buffer("center", torch.zeros(1, self.out_dim))
        mask = torch.ones(self.n_teacher_views, self.n_views)
        for v in range(min(self.n_views, self.n_teacher_views)):
            mask[v, v] = 0.0
        self.register_buffer("_pair_mask", mask, persistent=False)
        self.n_loss_terms = int(mask.sum())  # number of (teacher view, student view) pairs averaged

    def _check(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> int:
        checks = (("student_out", student_out, self.n_views), ("teacher_out", teacher_out, self.n_teacher_views))
        for name, x, views in checks:
            if x.dim() != 2 or x.shape[1] != self.out_dim:
                raise ValueError(f"DINOLoss: {name} must be (n_views·B, {self.out_dim}), got {tuple(x.shape)}")
            if x.shape[0] % views:
                raise ValueError(f"DINOLoss: {name} has {x.shape[0]} rows, not a multiple of its {views} views")
        batch = student_out.shape[0] // self.n_views
        if teacher_out.shape[0] != self.n_teacher_views * batch:
            raise ValueError(
                f"DINOLoss: student_out holds {self.n_views} views of B={batch} rows, so teacher_out needs "
                f"{self.n_teacher_views}·{batch} rows, got {teacher_out.shape[0]}"
            )
        return batch

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    @torch.no_grad()
    def teacher_probs(self, teacher_out: torch.Tensor) -> torch.Tensor:
        """P_t = softmax((f_t − C) / τ_t), detached, (rows, K)."""
        dtype = self._compute_dtype(teacher_out)
        return F.softmax((teacher_out.detach().to(dtype) - self.center.to(dtype)) / self.teacher_temp, dim=-1)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, update_center: bool = True) -> torch.Tensor:
        batch = self._check(student_out, teacher_out)
        if batch == 0:
            loss = student_out.sum() * 0.0
        else:
            dtype = self._compute_dtype(student_out)
            log_p_student = F.log_softmax(student_out.to(dtype) / self.student_temp, dim=-1)
            p_teacher = self.teacher_probs(teacher_out).to(dtype)
            # pair_ce[t, v] = mean_b H(teacher view t, student view v) = −(1/B) Σ_{b,k} P_t · log P_s
            pair_ce = -(p_teacher.reshape(self.n_teacher_views, -1) @ log_p_student.reshape(self.n_views, -1).T)
            pair_ce = pair_ce / batch
            loss = (pair_ce * self._pair_mask.to(dtype)).sum() / self.n_loss_terms
        if update_center:
            self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """C ← ω · C + (1 − ω) · mean over the rows of every rank of ``teacher_out`` (one all-reduce; a global batch
        with no row leaves C unchanged)."""
        dtype = self.center.dtype if self.center.dtype == torch.float64 else torch.float32
        rows = teacher_out.detach().to(dtype).reshape(-1, self.out_dim)
        stats = torch.cat([rows.sum(dim=0), rows.new_full((1,), float(rows.shape[0]))])
        all_reduce_sum(stats)
        count = stats[-1]
        batch_center = stats[:-1] / count.clamp_min(1.0)
        weight = (1.0 - self.center_momentum) * (count > 0).to(dtype)  # no sync with the device
        self.center.mul_(1.0 - weight).add_((batch_center * weight).to(self.center.dtype).unsqueeze(0))

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, student_temp={self.student_temp}, teacher_temp={self.teacher_temp}, "
            f"center_momentum={self.center_momentum}, n_views={self.n_views}, n_teacher_views={self.n_teacher_views}"
        )
