"""Ignite handlers for SSL training, each with ``attach(engine)`` so bundle configs list them in ``train#handlers``.

* :class:`CosineScheduleHandler` — per-iteration cosine schedule with linear warm-up of an optimiser's ``lr`` /
  ``weight_decay`` (per-group ``lr_scale`` / ``wd_scale``, no-decay groups kept at 0) or of any attribute (an EMA
  momentum, a temperature). The value is a pure function of ``engine.state.iteration``, so a resumed run gets the
  same values without saving anything.
* :class:`TerminateOnNanHandler` — stops the run at the first non-finite loss, naming the epoch, the iteration and
  the last good checkpoint; :class:`medssl.engines.CheckpointHandler` never saves a step whose loss is not finite.
* :class:`TrainingLogHandler` — one JSON line per iteration in ``<output_dir>/train_log.jsonl``, a console line
  every ``print_every`` iterations (epoch, iteration, loss, lr, it/s, ETA) or, on an interactive terminal, ignite's
  tqdm progress bar; TensorBoard scalars through MONAI's ``TensorBoardStatsHandler`` (the step outputs) and of the
  epoch metrics (kNN accuracy, validation metrics: ``metrics_log.jsonl`` too); at the end a PNG of the loss, kNN and
  validation curves; rank 0 only.
* :class:`PublishModelHandler`, :class:`EmbeddingWriter`, :func:`plot_training_curves` — what a run leaves for its
  users beside the checkpoints; they live in :mod:`medssl.engines.outputs` and are re-exported here.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from medssl.engines.outputs import EmbeddingWriter, PublishModelHandler, plot_training_curves
from medssl.engines.trainer import get_output_value
from medssl.utils.dist import is_main_process

__all__ = [
    "cosine_schedule_value", "CosineScheduleHandler", "TerminateOnNanHandler", "TrainingLogHandler",
    "PublishModelHandler", "EmbeddingWriter", "plot_training_curves",
]

logger = logging.getLogger(__name__)


def cosine_schedule_value(
    step: int, total_steps: int, start_value: float, end_value: float, warmup_steps: int = 0, warmup_start_value=0.0
) -> float:
    """Value of a cosine schedule with linear warm-up at ``step`` (0-based index of the optimiser step).

    * warm-up, ``step < W``: ``v0 + (start - v0) * step / W`` (``v0`` = ``warmup_start_value``; reaches ``start`` at
      ``step = W``);
    * cosine, ``W <= step``: ``end + (start - end) * (1 + cos(pi * t)) / 2`` with ``t = (step - W) / (T - 1 - W)``
      clamped to [0, 1], so ``step = W`` gives ``start`` and the last step ``T - 1`` gives ``end`` exactly (later
      steps stay at ``end``).

    ``T`` = ``total_steps``, ``W`` = ``warmup_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start_value + (start_value - warmup_start_value) * step / warmup_steps
    span = total_steps - 1 - warmup_steps
    if span <= 0:
        t = 0.0 if step <= warmup_steps else 1.0
    else:
        t = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return end_value + 0.5 * (start_value - end_value) * (1.0 + math.cos(math.pi * t))


def _is_optimizer(target: Any) -> bool:
    return isinstance(target, torch.optim.Optimizer) or (
        hasattr(target, "param_groups") and isinstance(getattr(target, "param_groups"), list)
    )


# Ours, not ignite's CosineAnnealingScheduler + warm-up wrapper: any attribute (lr, EMA momentum, weight decay, a
# temperature) as a pure function of the iteration, so a resumed run gets the same values with no scheduler state.
class CosineScheduleHandler:
    """Cosine schedule with linear warm-up, applied before every iteration (Events.ITERATION_STARTED, for the step
    about to run) and at Events.STARTED (so the value is right before the first step, also after a resume).

    Args:
        target: an optimiser (sets ``param_group[param_name]`` of every group), or any object whose attribute
            ``param_name`` (a dotted path such as ``"loss.temperature"`` works) is set; a tensor attribute is filled
            in place.
        start_value: value after the warm-up (DINO: the base lr; the EMA momentum 0.996; wd 0.04).
        end_value: value at the last iteration.
        warmup_iters / warmup_epochs: length of the linear warm-up (at most one of the two; epochs are converted
            with ``engine.state.epoch_length``).
        warmup_start_value: value at iteration 0 of the warm-up.
        param_name: the optimiser group key (``"lr"``, ``"weight_decay"``, ``"momentum"``...) or the attribute name.
        total_iters: schedule length; default ``max_epochs * epoch_length`` of the engine.
        name: key of the value in ``engine.state.scheduled_values`` (logged by :class:`TrainingLogHandler`);
            default ``param_name`` (its last component).

    Per-group scaling for an optimiser: ``"lr"`` is ``value * group["lr_scale"]`` (default 1); ``"weight_decay"`` is
    ``value * group["wd_scale"]``, where a group without ``"wd_scale"`` counts 0 if its ``weight_decay`` is 0 when
    this handler is built (the no-decay groups of ``SSLMethod.parameter_groups()``; they stay at 0) and 1
    otherwise. Other keys are set unscaled.
    """

    def __init__(
        self,
        target: Any,
        start_value: float,
        end_value: float,
        warmup_iters: int = 0,
        warmup_epochs: int = 0,
        warmup_start_value: float = 0.0,
        param_name: str = "lr",
        total_iters: int | None = None,
        name: str | None = None,
    ) -> None:
        if warmup_iters and warmup_epochs:
            raise ValueError(
                f"CosineScheduleHandler({param_name}): give warmup_iters ({warmup_iters}) or warmup_epochs "
                f"({warmup_epochs}), not both"
            )
        if warmup_iters < 0 or warmup_epochs < 0:
            raise ValueError(f"CosineScheduleHandler({param_name}): negative warm-up length")
        self.target = target
        self.start_value, self.end_value = float(start_value), float(end_value)
        self.warmup_iters, self.warmup_epochs = int(warmup_iters), int(warmup_epochs)
        self.warmup_start_value = float(warmup_start_value)
        self.param_name = param_name
        self.total_iters = total_iters
        self.name = name or param_name.split(".")[-1]
        self.is_optimizer = _is_optimizer(target)
        if self.is_optimizer:
            self._group_scales = [self._group_scale(g) for g in target.param_groups]
            if param_name == "weight_decay" and not any(self._group_scales):
                logger.warning(
                    "CosineScheduleHandler(weight_decay): every parameter group has weight_decay 0, so the schedule "
                    "changes nothing; give the optimiser a nonzero weight_decay for the groups to decay"
                )
        else:
            self._resolve_attribute()  # fail early, naming the attribute

    def _group_scale(self, group: Mapping) -> float:
        if self.param_name == "lr":
            return float(group.get("lr_scale", 1.0))
        if self.param_name == "weight_decay":
            if "wd_scale" in group:
                return float(group["wd_scale"])
            return 0.0 if float(group.get("weight_decay", 0.0)) == 0.0 else 1.0
        return 1.0

    def _resolve_attribute(self) -> tuple[Any, str]:
        *path, attr = self.param_name.split(".")
        obj = self.target
        for part in path:
            obj = getattr(obj, part)
        if not hasattr(obj, attr):
            raise AttributeError(
                f"CosineScheduleHandler: {type(obj).__name__} has no attribute {attr!r} "
                f"(param_name={self.param_name!r})"
            )
        return obj, attr

    # ------------------------------------------------------------------ schedule
    def schedule_length(self, engine: Engine) -> tuple[int, int]:
        """(total iterations T, warm-up iterations W) for ``engine``."""
        epoch_length = engine.state.epoch_length or 0
        if self.total_iters is not None:
            total = int(self.total_iters)
        elif getattr(engine.state, "max_iters", None):
            total = int(engine.state.max_iters)
        else:
            total = int(engine.state.max_epochs) * int(epoch_length)
        warmup = self.warmup_iters or self.warmup_epochs * int(epoch_length)
        return total, warmup

    def value_at(self, engine: Engine, step: int) -> float:
        """The scheduled value for the optimiser step with 0-based index ``step``."""
        total, warmup = self.schedule_length(engine)
        return cosine_schedule_value(
            step, total, self.start_value, self.end_value, warmup, warmup_start_value=self.warmup_start_value
        )

    def apply(self, value: float) -> None:
        """Write ``value`` to the target (scaled per optimiser group)."""
        if self.is_optimizer:
            for group, scale in zip(self.target.param_groups, self._group_scales):
                group[self.param_name] = value * scale
            return
        obj, attr = self._resolve_attribute()
        current = getattr(obj, attr)
        if isinstance(current, torch.Tensor):
            with torch.no_grad():
                current.fill_(value)
        else:
            setattr(obj, attr, value)

    def _on_started(self, engine: Engine) -> None:
        self._update(engine, engine.state.iteration)

    def _on_iteration_started(self, engine: Engine) -> None:
        self._update(engine, engine.state.iteration - 1)

    def _update(self, engine: Engine, step: int) -> None:
        value = self.value_at(engine, step)
        self.apply(value)
        values = getattr(engine.state, "scheduled_values", None)
        if values is None:
            values = {}
            engine.state.scheduled_values = values
        values[self.name] = value

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._on_iteration_started)


# Ours, not ignite's TerminateOnNan: names the last good checkpoint and the step, and stops every rank at the same one.
class TerminateOnNanHandler:
    """Stop training at the first iteration whose loss (``output_key`` of ``engine.state.output``) is NaN or Inf.

    Logs an error naming the epoch, the iteration, the value and the last good checkpoint
    (``engine.state.last_checkpoint``, kept by :class:`medssl.engines.CheckpointHandler`), records
    ``engine.state.nonfinite_loss = {"epoch", "iteration", "value", "last_checkpoint"}`` and calls
    ``engine.terminate()`` (Events.COMPLETED still fires, so loggers close; the CheckpointHandler writes no
    checkpoint for a non-finite step, final one included). With ``raise_error=True`` it raises ``FloatingPointError``
    with the same message instead (a non-zero exit status for scripted runs). Only the loss is checked: an infinite
    gradient norm under the fp16 ``GradScaler`` is normal (the scaler skips that step).

    With several ranks the trainer's outputs are averaged over the ranks, so all ranks stop at the same iteration.
    """

    def __init__(self, output_key: str = "loss", raise_error: bool = False) -> None:
        self.output_key = output_key
        self.raise_error = raise_error

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = get_output_value(engine.state.output, self.output_key)
        if value is None:
            return
        try:
            value_f = float(value)
        except (TypeError, ValueError, RuntimeError):
            return
        if math.isfinite(value_f):
            return
        last = getattr(engine.state, "last_checkpoint", None)
        message = (
            f"non-finite {self.output_key} ({value_f}) at epoch {engine.state.epoch} iteration "
            f"{engine.state.iteration}: training stopped; no checkpoint is written for this iteration. Last good "
            f"checkpoint: {last if last else 'none (no checkpoint written yet)'}"
        )
        engine.state.nonfinite_loss = {
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "value": value_f,
            "last_checkpoint": last,
        }
        if self.raise_error:
            raise FloatingPointError(message)
        logger.error(message)
        engine.terminate()


class TrainingLogHandler:
    """Per-iteration training log on rank 0: ``<output_dir>/<filename>`` (JSON lines), console lines, TensorBoard.

    Each JSON line: ``{"epoch", "iteration", <the scalar outputs, "loss" first>, "lr", <engine.state.scheduled_values
    such as "weight_decay" or "momentum">, "time"}`` (``lr`` = the first optimiser group's, ``time`` = Unix time in
    seconds). The file is opened in append mode, one flushed line per iteration: a resumed run appends the
    iterations it redoes, so a reader takes the last line of each iteration.

    The console line (every ``print_every`` iterations and at the end of each epoch, through the
    ``medssl.engines.handlers`` logger)::

        epoch 3/100 iter 1234/50000 (2.5%) loss 4.1234 align 0.5000 lr 3.00e-04 | 12.3 it/s eta 1:06:02

    ``progress_bar``: ``"auto"`` (default) shows ignite's tqdm ``ProgressBar`` (epoch progress, loss, elapsed time
    and ETA) instead of these lines when stdout is an interactive terminal, and keeps the plain logger lines
    otherwise (log files of detached runs, CI); True / False force it. The end-of-epoch summary is logged either way.

    With ``tensorboard=True`` MONAI's ``TensorBoardStatsHandler`` writes the same scalars every ``log_every``
    iterations to ``tensorboard_dir`` (default ``<output_dir>/tensorboard``).

    Epoch metrics: at each epoch end, after every other handler (kNN monitor, validation: this handler registers
    its epoch-end step when the run starts, so it runs last), the numeric ``engine.state.metrics`` of the trainer
    and of each engine in ``metric_sources`` (e.g. a MONAI ``SupervisedEvaluator`` run by ``ValidationHandler``)
    are written as TensorBoard scalars ``metrics/<name>`` and as one JSON line in ``<output_dir>/metrics_log.jsonl``.
    ``curves`` (default True): at the end of the run ``<output_dir>/curves.png`` plots the loss per iteration (from
    ``train_log.jsonl``, so a resumed run is plotted whole) and each epoch metric (from ``metrics_log.jsonl``);
    skipped with a warning when matplotlib is missing.
    """

    def __init__(
        self,
        output_dir: str | Path,
        filename: str = "train_log.jsonl",
        log_every: int = 1,
        print_every: int = 10,
        tensorboard: bool = True,
        tensorboard_dir: str | Path | None = None,
        progress_bar: bool | str = "auto",
        metric_sources: Sequence[Any] | None = None,
        curves: bool = True,
        metrics_filename: str = "metrics_log.jsonl",
        curves_filename: str = "curves.png",
    ) -> None:
        if progress_bar not in ("auto", True, False):
            raise ValueError(f"TrainingLogHandler: progress_bar={progress_bar!r} must be 'auto', True or False")
        if log_every < 1 or print_every < 1:
            raise ValueError(f"TrainingLogHandler: log_every={log_every}, print_every={print_every} must be >= 1")
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / filename
        self.log_every, self.print_every = int(log_every), int(print_every)
        self.tensorboard = tensorboard
        self.tensorboard_dir = Path(tensorboard_dir) if tensorboard_dir is not None else self.output_dir / "tensorboard"
        self.last_record: dict[str, Any] = {}
        self._file = None
        self._tb_handler = None
        self._rate_mark: tuple[float, int] | None = None
        self._epoch_losses: list[float] = []
        self.progress_bar = progress_bar
        self.metric_sources = list(metric_sources or [])
        self.curves = curves
        self.metrics_path = self.output_dir / metrics_filename
        self.curves_path = self.output_dir / curves_filename
        self._bar = None
        self._metric_writer = None
        self._late_attached = False
        self._seen: dict[tuple[int, Any], Any] = {}

    def uses_progress_bar(self) -> bool:
        """Whether the tqdm bar replaces the console lines (``"auto"``: stdout is an interactive terminal)."""
        if self.progress_bar == "auto":
            return bool(getattr(sys.stdout, "isatty", lambda: False)())
        return bool(self.progress_bar)

    def attach(self, engine: Engine) -> None:
        if not is_main_process():
            return
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)
        if self.uses_progress_bar():
            from ignite.handlers import ProgressBar

            self._bar = ProgressBar(persist=False, desc="train")
            self._bar.attach(engine, output_transform=self._bar_values)
        if self.tensorboard:
            from monai.handlers import TensorBoardStatsHandler

            self._tb_handler = TensorBoardStatsHandler(
                log_dir=str(self.tensorboard_dir),
                iteration_log=self.log_every,
                epoch_log=False,
                output_transform=self._tensorboard_scalars,
            )
            self._tb_handler.attach(engine)

    # ------------------------------------------------------------------ events
    def _on_started(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._rate_mark = (time.perf_counter(), engine.state.iteration)
        self._epoch_losses = []
        if not self._late_attached:  # registered now, after every handler: they have set their metrics by then
            self._late_attached = True
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_metrics)
            engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def _bar_values(self, output: Any) -> dict[str, float]:
        loss = self.last_record.get("loss")
        return {"loss": loss} if isinstance(loss, float) else {}

    def _record(self, engine: Engine) -> dict[str, Any]:
        record: dict[str, Any] = {"epoch": engine.state.epoch, "iteration": engine.state.iteration}
        output = engine.state.output
        if isinstance(output, Mapping):
            values = dict(output)
        elif isinstance(output, list) and output and isinstance(output[0], Mapping):
            values = dict(output[0])
        else:
            values = {"loss": output}
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                record[key] = float(value)
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None and getattr(optimizer, "param_groups", None):
            record["lr"] = float(optimizer.param_groups[0]["lr"])
        for key, value in (getattr(engine.state, "scheduled_values", None) or {}).items():
            record.setdefault(key, float(value))
        return record

    def _on_iteration_completed(self, engine: Engine) -> None:
        record = self._record(engine)
        self.last_record = record
        loss = record.get("loss")
        if isinstance(loss, float):
            self._epoch_losses.append(loss)
        iteration = engine.state.iteration
        if iteration % self.log_every == 0:
            if self._file is None:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            line = dict(record, time=round(time.time(), 3))
            self._file.write(json.dumps(_nonfinite_as_text(line)) + "\n")
            self._file.flush()
        if iteration % self.print_every == 0 and self._bar is None:
            logger.info(self._console_line(engine, record))

    def _console_line(self, engine: Engine, record: Mapping[str, Any]) -> str:
        state = engine.state
        total = (state.max_epochs or 0) * (state.epoch_length or 0)
        pct = f" ({100.0 * state.iteration / total:.1f}%)" if total else ""
        values = " ".join(
            f"{k} {v:.3e}" if k == "lr" else f"{k} {v:.4f}"
            for k, v in record.items()
            if k not in ("epoch", "iteration") and isinstance(v, float)
        )
        rate_text = ""
        now = time.perf_counter()
        if self._rate_mark is not None:
            t0, i0 = self._rate_mark
            if now > t0 and state.iteration > i0:
                rate = (state.iteration - i0) / (now - t0)
                eta = (total - state.iteration) / rate if total else 0.0
                rate_text = f" | {rate:.2f} it/s eta {_hms(eta)}"
        self._rate_mark = (now, state.iteration)
        return f"epoch {state.epoch}/{state.max_epochs} iter {state.iteration}/{total}{pct} {values}{rate_text}"

    def _on_epoch_completed(self, engine: Engine) -> None:
        if self._epoch_losses:
            mean = sum(self._epoch_losses) / len(self._epoch_losses)
            logger.info(
                f"epoch {engine.state.epoch}/{engine.state.max_epochs} done: mean loss {mean:.4f} over "
                f"{len(self._epoch_losses)} iterations"
            )
        self._epoch_losses = []

    def epoch_metrics(self, engine: Engine, fresh_only: bool = False) -> dict[str, float]:
        """The finite numeric metrics of the trainer and of ``metric_sources`` now (trainer's names win).
        ``fresh_only``: only those set since the last call (a kNN monitor that runs every few epochs leaves its last
        value in ``engine.state.metrics``; it is not logged again)."""
        found: dict[str, float] = {}
        for index, source in enumerate([*self.metric_sources, engine]):
            state = getattr(source, "state", None)
            for key, value in (getattr(state, "metrics", None) or {}).items():
                if fresh_only and self._seen.get((index, key)) is value:
                    continue
                self._seen[(index, key)] = value
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    value = value.item()
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    found[str(key)] = float(value)
        return found

    def _on_epoch_metrics(self, engine: Engine) -> None:
        metrics = self.epoch_metrics(engine, fresh_only=True)
        if not metrics:
            return
        record = {"epoch": int(engine.state.epoch), "iteration": int(engine.state.iteration), **metrics}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard:
            if self._metric_writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._metric_writer = SummaryWriter(log_dir=str(self.tensorboard_dir))
            for key, value in metrics.items():
                self._metric_writer.add_scalar(f"metrics/{key}", value, int(engine.state.iteration))
            self._metric_writer.flush()

    def _on_completed(self, engine: Engine) -> None:
        self._close(engine)
        if self.curves:
            try:
                plot_training_curves(self.path, self.metrics_path, self.curves_path)
            except ImportError:
                logger.warning(f"no {self.curves_path.name}: matplotlib is not installed")
            except Exception as e:  # noqa: BLE001 - a figure never fails a finished run
                logger.warning(f"no {self.curves_path.name}: {type(e).__name__}: {e}")

    def _close(self, engine: Engine | None = None) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb_handler is not None:
            self._tb_handler.close()
        if self._metric_writer is not None:
            self._metric_writer.close()
            self._metric_writer = None

    def _tensorboard_scalars(self, output: Any) -> dict[str, float]:
        return {k: v for k, v in self.last_record.items() if k not in ("epoch", "iteration")}


def _nonfinite_as_text(record: Mapping[str, Any]) -> dict[str, Any]:
    """NaN / Inf as strings ("nan", "inf", "-inf"): strict JSON has no literal for them, and the training log shows
    a diverged value as text where :func:`medssl.utils.io.json_safe` (the other JSON outputs) writes null."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _hms(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class HandlerGroup:
    """Attach a list of handlers as one entry of a bundle's ``train#handlers``.

    MONAI's tools (``ConfigWorkflow.check_properties``, MONAI Label) expect every item of ``train#handlers`` to be a
    component definition (a dict with ``_target_``); a method-specific list of handlers (SwAV's queue and prototype
    freezing, DeepCluster's k-means) is therefore wrapped in one ``HandlerGroup`` that an override file can replace
    as a whole. ``None`` entries (disabled components) are skipped.
    """

    def __init__(self, handlers: Sequence[Any] | None = None) -> None:
        self.handlers = [h for h in (handlers or []) if h is not None]
        for h in self.handlers:
            if not hasattr(h, "attach"):
                raise TypeError(f"HandlerGroup: {type(h).__name__} has no attach(engine) method")

    def attach(self, engine: Engine) -> None:
        for h in self.handlers:
            h.attach(engine)
