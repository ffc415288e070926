"""Handlers for the teacher-student (self-distillation) recipe shared by every teacher method (UniMiSS, Xie et al.
ECCV 2022; DINO), each with ``attach(engine)`` so bundle configs list them in ``train#handlers``.

* :class:`EMATeacherHandler` — after every optimiser step, teacher θ_t ← m · θ_t + (1 − m) · θ_s with the momentum m
  following a cosine schedule 0.996 → 1 per iteration (a :class:`medssl.engines.CosineScheduleHandler` on the
  handler's ``momentum`` attribute).
* :class:`FreezeLastLayerHandler` — drops the gradients of the head's last layer during the first ``n_epochs``
  epochs (DINO / UniMiSS ``--freeze_last_layer 1``).
* :class:`PerParameterGradClipHandler` — the reference's gradient clipping (``--clip_grad 0.3``): each parameter's
  gradient is clipped to norm ``max_norm`` on its own, unlike the trainer's ``clip_grad_norm`` (one total norm).

The rest of the recipe is existing code: the weight-decay cosine 0.04 → 0.4 and the learning-rate warm-up + cosine are
:class:`medssl.engines.CosineScheduleHandler` on the optimiser (``param_name="weight_decay"`` / ``"lr"``), the
teacher-temperature warm-up is a CosineScheduleHandler on :class:`medssl.losses.DINOLoss`'s ``teacher_temp``
(``warmup_start_value`` → ``start_value`` = ``end_value``: linear, then constant).

None of them keeps state that a resumed run would need: the momentum and the freezing are functions of
``engine.state.iteration`` / ``epoch``, and the teacher's weights belong to the method's state dict when the
teacher is a sub-module of the method (list the :class:`EMATeacherHandler` in
:class:`medssl.engines.CheckpointHandler`'s ``objects`` only when it is not: it has ``state_dict()``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from medssl.engines.handlers import CosineScheduleHandler
from medssl.utils.tensors import unwrap_module

__all__ = [
    "EMATeacherHandler",
    "FreezeLastLayerHandler",
    "PerParameterGradClipHandler",
    "ema_update_",
    "clip_gradients_per_parameter",
]

logger = logging.getLogger(__name__)


def _require_backward_event(engine: Engine, owner: str) -> None:
    if IterationEvents.BACKWARD_COMPLETED not in getattr(engine, "_allowed_events", []):
        raise ValueError(
            f"{owner}: the engine does not fire IterationEvents.BACKWARD_COMPLETED between backward and the optimiser "
            "step (use medssl.engines.SSLTrainer, or register_events(*IterationEvents) and fire it there)"
        )


def _steps_optimizer(engine: Engine) -> bool:
    """At BACKWARD_COMPLETED: whether this iteration ends with an optimiser step (False inside a gradient-accumulation
    window of :class:`medssl.engines.SSLTrainer`)."""
    window = getattr(engine, "_accumulation_window", None)
    return True if window is None else bool(window(engine.state.iteration)[0])


@torch.no_grad()
def ema_update_(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], momentum: float) -> None:
    """In place, for every pair: θ_t ← m · θ_t + (1 − m) · θ_s (the reference's ``mul_(m).add_((1 − m) · θ_s)``)."""
    if len(teacher_params) != len(student_params):
        raise ValueError(f"ema_update_: {len(teacher_params)} teacher tensors for {len(student_params)} student ones")
    if not teacher_params:
        return
    students = [p.detach() for p in student_params]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, students, alpha=1.0 - momentum)


# Ours, not ignite's EMAHandler: updates only after steps that moved the optimiser (gradient accumulation), with the
# reference's cosine momentum as a pure function of the step (exact resume); parameters only, as DINO / UniMiSS.
class EMATeacherHandler:
    """Teacher = exponential moving average of the student, updated after every optimiser step.

    At Events.ITERATION_COMPLETED of an iteration that stepped the optimiser (``engine.state.optimizer_stepped``;
    not inside a gradient-accumulation window): θ_t ← m_i · θ_t + (1 − m_i) · θ_s for every parameter, where
    m_i = ``cosine_schedule_value(i, T, momentum_start, momentum_end)`` and i = ``engine.state.iteration − 1`` is the
    0-based index of that step (the reference's ``momentum_schedule[it]``): m_0 = 0.996, m_{T−1} = 1. The schedule
    is a :class:`medssl.engines.CosineScheduleHandler` on this handler's ``momentum`` attribute (``self.schedule``),
    so m is a pure function of the iteration — a resumed run gets the same values — and is logged as
    ``engine.state.scheduled_values[name]``. Buffers are not averaged (as the reference; the MiT and the DINO head
    have none).

    Args:
        student: the student network (may be wrapped in ``DistributedDataParallel`` / ``DataParallel``: unwrapped).
        teacher: the teacher, with the same parameter names and shapes. Its parameters get ``requires_grad=False``
            here (no gradient ever flows into the teacher; the optimiser must not hold them).
        momentum_start: m at the first step (0.996).
        momentum_end: m at the last step (1.0).
        total_iters: schedule length T; default ``max_epochs · epoch_length`` of the engine.
        copy_student: on a fresh run (``engine.state.iteration == 0`` at attach), first copy the student's
            parameters into the teacher (the reference's ``teacher.load_state_dict(student.state_dict())``; after
            DDP has broadcast rank 0's weights, so every rank starts from the same teacher). A resumed run keeps the
            teacher restored from the checkpoint.
        name: key of m in ``engine.state.scheduled_values`` (TrainingLogHandler logs it).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        momentum_start: float = 0.996,
        momentum_end: float = 1.0,
        total_iters: int | None = None,
        copy_student: bool = True,
        name: str = "ema_momentum",
    ) -> None:
        for label, m in (("momentum_start", momentum_start), ("momentum_end", momentum_end)):
            if not 0.0 <= float(m) <= 1.0:
                raise ValueError(f"EMATeacherHandler: {label}={m} must be in [0, 1]")
        self.student = unwrap_module(student)
        self.teacher = unwrap_module(teacher)
        if self.student is self.teacher:
            raise ValueError("EMATeacherHandler: student and teacher are the same module")
        student_params = dict(self.student.named_parameters())
        teacher_params = dict(self.teacher.named_parameters())
        if student_params.keys() != teacher_params.keys():
            only_s = sorted(student_params.keys() - teacher_params.keys())[:5]
            only_t = sorted(teacher_params.keys() - student_params.keys())[:5]
            raise ValueError(
                "EMATeacherHandler: student and teacher have different parameters "
                f"(only in the student: {only_s}; only in the teacher: {only_t})"
            )
        for key, p in student_params.items():
            if p.shape != teacher_params[key].shape:
                raise ValueError(
                    f"EMATeacherHandler: parameter {key!r} has shape {tuple(p.shape)} in the student but "
                    f"{tuple(teacher_params[key].shape)} in the teacher"
                )
        self._names = list(student_params)
        self.teacher.requires_grad_(False)
        self.momentum = float(momentum_start)
        self.copy_student = bool(copy_student)
        self.updates = 0  # EMA updates done by this handler (in this process)
        self.schedule = CosineScheduleHandler(
            self, momentum_start, momentum_end, param_name="momentum", total_iters=total_iters, name=name
        )

    def _pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        student = dict(self.student.named_parameters())
        teacher = dict(self.teacher.named_parameters())
        return [teacher[k] for k in self._names], [student[k] for k in self._names]

    @torch.no_grad()
    def copy_student_(self) -> None:
        """Teacher parameters ← student parameters."""
        teacher, student = self._pairs()
        for t, s in zip(teacher, student):
            t.copy_(s.detach())

    @torch.no_grad()
    def update(self, momentum: float | None = None) -> None:
        """One EMA update with ``momentum`` (default: the current scheduled ``self.momentum``)."""
        teacher, student = self._pairs()
        ema_update_(teacher, student, self.momentum if momentum is None else float(momentum))
        self.updates += 1

    def attach(self, engine: Engine) -> None:
        self.schedule.attach(engine)
        if self.copy_student and int(engine.state.iteration) == 0:
            self.copy_student_()
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration_completed)

    def _on_iteration_completed(self, engine: Engine) -> None:
        if getattr(engine.state, "optimizer_stepped", True):
            self.update()

    # checkpointing (only needed when the teacher is not part of the method's state dict)
    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "teacher" not in state:
            raise KeyError(f"EMATeacherHandler.load_state_dict: no 'teacher' entry (keys {sorted(state)})")
        self.teacher.load_state_dict(state["teacher"])


def _matches(name: str, prefix: str) -> bool:
    """True when ``prefix`` is a run of whole dotted components of ``name`` ("last_layer" and "head.last_layer"
    match "student.head.last_layer.weight_v"; "layer" does not)."""
    return f".{prefix}." in f".{name}."


class FreezeLastLayerHandler:
    """Drop the last layer's gradients (``grad = None``: no update, no optimiser momentum, no weight decay) during
    the first ``n_epochs`` epochs (DINO / UniMiSS ``--freeze_last_layer``, 1 by default).

    Runs at ``IterationEvents.BACKWARD_COMPLETED`` (after backward, before clipping and the optimiser step in
    :class:`medssl.engines.SSLTrainer`) for the epochs with 0-based index ``engine.state.epoch − 1 < n_epochs``. The
    decision is a function of the epoch, so a resumed run needs no saved state. The reference cancels the gradients
    after its per-parameter clipping; with the trainer's total-norm clipping this handler runs first, so the frozen
    layer does not count in the clipped norm.

    Args:
        module_or_param_prefix: the layer (an ``nn.Module``, e.g. ``method.student_head.last_layer``), a parameter
            or a list of parameters, or a name prefix resolved at attach against the method's
            ``named_parameters()``: every parameter whose dotted name contains it as whole components
            (``"last_layer"`` catches ``student.head.last_layer.weight_v``, as the reference's substring test).
        n_epochs: number of epochs with the layer frozen (0 = never).
        method: the module the prefix is resolved against (DDP-unwrapped); None = ``engine.method``.
    """

    def __init__(
        self, module_or_param_prefix: nn.Module | torch.Tensor | Iterable | str, n_epochs: int = 1, method: Any = None
    ) -> None:
        if n_epochs < 0:
            raise ValueError(f"FreezeLastLayerHandler: n_epochs={n_epochs} must be >= 0")
        self.target = module_or_param_prefix
        self.n_epochs = int(n_epochs)
        self.method = method
        self.params: list[torch.Tensor] = []
        self.param_names: list[str] = []
        self.dropped_last = False  # whether the last iteration's gradients were dropped

    def resolve(self, engine: Engine | None = None) -> list[torch.Tensor]:
        target = self.target
        if isinstance(target, str):
            method = unwrap_module(self.method if self.method is not None else getattr(engine, "method", None))
            if method is None:
                raise ValueError("FreezeLastLayerHandler: give `method` (the engine has no .method attribute)")
            named = [(n, p) for n, p in method.named_parameters() if _matches(n, target)]
            if not named:
                some = [n for n, _ in method.named_parameters()][-8:]
                raise ValueError(
                    f"FreezeLastLayerHandler: no parameter of {type(method).__name__} matches {target!r} "
                    f"(its last parameters: {some})"
                )
            self.param_names = [n for n, _ in named]
            return [p for _, p in named]
        if isinstance(target, nn.Module):
            params = list(unwrap_module(target).parameters())
        elif isinstance(target, torch.Tensor):
            params = [target]
        else:
            params = list(target)
        if not params:
            raise ValueError("FreezeLastLayerHandler: the layer to freeze has no parameters")
        return params

    def attach(self, engine: Engine) -> None:
        _require_backward_event(engine, "FreezeLastLayerHandler")
        self.params = self.resolve(engine)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def frozen(self, epoch: int) -> bool:
        """Whether the layer is frozen in (1-based) ``epoch``."""
        return int(epoch) - 1 < self.n_epochs

    def __call__(self, engine: Engine) -> None:
        self.dropped_last = self.frozen(engine.state.epoch)
        if self.dropped_last:
            for p in self.params:
                p.grad = None


@torch.no_grad()
def clip_gradients_per_parameter(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale each gradient g with ‖g‖₂ > max_norm by max_norm / (‖g‖₂ + 1e-6), each parameter on its own (the
    reference's ``utils.clip_gradients``). Returns the norms before clipping (one per parameter with a gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)
    return torch.stack([n.detach().float() for n in norms])


class PerParameterGradClipHandler:
    """Per-parameter gradient clipping at ``IterationEvents.BACKWARD_COMPLETED`` of the iterations that step the
    optimiser (DINO / UniMiSS ``--clip_grad``: 3.0 / 0.3): every gradient is clipped to norm ``max_norm`` by
    :func:`clip_gradients_per_parameter`.

    Use it with the trainer's ``clip_grad_norm=None`` (it refuses both at attach): the trainer's option clips the
    total norm of all gradients, which for a 0.3 limit over a whole network is a much stronger clipping than the
    reference's. With the fp16 ``GradScaler`` it unscales the gradients first (``engine.scaler.unscale_``). The
    norms before clipping are kept in ``self.last_norms``.

    Args:
        max_norm: the per-parameter limit (0.3 in UniMiSS).
        params: the parameters to clip; default every parameter of the engine's optimiser.
    """

    def __init__(self, max_norm: float, params: Iterable[torch.Tensor] | None = None) -> None:
        if max_norm <= 0:
            raise ValueError(f"PerParameterGradClipHandler: max_norm={max_norm} must be > 0")
        self.max_norm = float(max_norm)
        self.params = list(params) if params is not None else None
        self.last_norms: torch.Tensor | None = None
        self._engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        _require_backward_event(engine, "PerParameterGradClipHandler")
        if getattr(engine, "clip_grad_norm", None) is not None:
            raise ValueError(
                f"PerParameterGradClipHandler: the trainer already clips the total gradient norm "
                f"(clip_grad_norm={engine.clip_grad_norm}); use one of the two (clip_grad_norm=None for this one)"
            )
        if self.params is None:
            optimizer = getattr(engine, "optimizer", None)
            if optimizer is None:
                raise ValueError("PerParameterGradClipHandler: give `params` (the engine has no .optimizer)")
            self.params = [p for group in optimizer.param_groups for p in group["params"]]
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not _steps_optimizer(engine):
            return
        scaler = getattr(engine, "scaler", None)
        if scaler is not None:
            scaler.unscale_(engine.optimizer)
        self.last_norms = clip_gradients_per_parameter(self.params or [], self.max_norm)
