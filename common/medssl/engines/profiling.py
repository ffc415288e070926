"""Where the time of a training step goes: data wait vs compute, per iteration, as an Ignite handler.

:class:`StepTimeProfiler` times every iteration of an Ignite engine (:class:`medssl.engines.SSLTrainer` or any
``Engine``) from the engine's own events. In Ignite's loop (0.5.x) one iteration is::

    GET_BATCH_STARTED -> next(data iterator) -> GET_BATCH_COMPLETED -> ITERATION_STARTED -> process function
    (SSLTrainer: prepare_batch, forward, backward, optimiser step; MONAI's IterationEvents.MODEL_COMPLETED at its
    end) -> ITERATION_COMPLETED (the per-iteration handlers: logging, checkpoints, schedules ...)

``SSLTrainer`` replaces only *what* is iterated (one pass of the loader per epoch, positioned for resumes), not the
loop, so these events fire as for any Ignite engine. At the first batch of every epoch after the first, Ignite fires
GET_BATCH_STARTED, finds the previous pass exhausted and creates the new loader iterator (starting the DataLoader
workers) before the batch arrives: that start-up counts as data wait, as it is time the training waits for data.
(The first epoch's iterator is created before the first GET_BATCH_STARTED; the warm-up iterations absorb it.)

Per measured iteration (seconds, ``time.perf_counter``):

* ``data_wait`` = GET_BATCH_STARTED -> GET_BATCH_COMPLETED: the time the loop waits for the next batch (loading and
  augmenting it with ``num_workers=0``; only the part the workers did not hide otherwise);
* ``compute`` = GET_BATCH_COMPLETED -> ITERATION_COMPLETED: moving the batch to the device, forward, backward, the
  optimiser step and the per-iteration handlers. When the engine fires MONAI's ``IterationEvents.MODEL_COMPLETED``
  (SSLTrainer does), compute is split into ``model`` (-> MODEL_COMPLETED) and ``handlers`` (the rest: output
  reduction, then the ITERATION_STARTED / ITERATION_COMPLETED handlers);
* ``total`` = data_wait + compute; ``between`` = ITERATION_COMPLETED of the previous iteration -> GET_BATCH_STARTED
  (epoch-boundary handlers such as an epoch-start k-means or an end-of-epoch evaluation; not part of ``total``).

The profiler's ITERATION_COMPLETED handler is moved to the end of the engine's handler list when the run starts,
so every per-iteration handler attached before the run counts in ``compute``. The first ``warmup_iters`` iterations
of each run are not recorded (first-iteration allocations, cuDNN autotuning, worker start-up). On a CUDA device
the profiler calls ``torch.cuda.synchronize`` at each mark, so asynchronous kernels are charged to the iteration
that launched them (this adds a few synchronisations per step; leave the profiler off for production runs).

Use from a bundle: add it to the trainer's handlers with an override file (MONAI's ``+`` prefix appends to a list)::

    # profile.json
    {"+train#handlers": [{"_target_": "medssl.engines.StepTimeProfiler", "warmup_iters": 5, "stop_after": 50,
                          "output_file": "$@output_dir + '/step_times.json'"}]}

    python -m monai.bundle run --config_file "['configs/train.json','profile.json']" --dataset_dir ...

At the end of the run the summary is logged (``medssl.engines.profiling`` logger, INFO, rank 0) and, with
``output_file``, written as JSON. ``tools/benchmark.py step --bundle DIR`` does the same without an override file
and prints the breakdown. In a multi-process run each rank measures its own iterations (its share of the batch).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from medssl.utils.dist import is_main_process


__all__ = ["StepTimeProfiler", "batch_size_of"]

logger = logging.getLogger(__name__)

_PHASES = ("data_wait", "compute", "model", "handlers", "total")


def batch_size_of(batch: Any) -> int | None:
    """Number of items in a collated batch: the first dimension of its first tensor (searching dict values and
    list / tuple elements in order, depth-first); None when it holds no tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else None
    if isinstance(batch, np.ndarray):
        return int(batch.shape[0]) if batch.ndim else None
    if isinstance(batch, Mapping):
        values = batch.values()
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        values = batch
    else:
        return None
    for value in values:
        size = batch_size_of(value)
        if size is not None:
            return size
    return None


def _stats(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "p90": float(np.percentile(arr, 90)),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "sum": float(arr.sum()),
    }


# Ours, not ignite's BasicTimeProfiler: data wait vs compute per step with CUDA synchronisation, and items/s.
class StepTimeProfiler:
    """Per-iteration data wait vs compute of a training engine (see the module docstring for the definitions).

    Args:
        warmup_iters: iterations at the start of each run that are not recorded.
        stop_after: when given, ``engine.terminate()`` after this many recorded iterations (profile a bounded run;
            Events.COMPLETED still fires, so the usual end-of-run handlers run).
        batch_size: items per iteration for the throughput; None = read from each batch (:func:`batch_size_of`).
        cuda_sync: synchronise CUDA at each mark; None = when the engine's device is a CUDA device.
        output_file: write :meth:`summary` as JSON there at Events.COMPLETED (rank 0).
        log_summary: log :meth:`format_summary` at Events.COMPLETED (rank 0, INFO).

    Attributes:
        records: one dict per recorded iteration: ``iteration``, ``epoch``, ``data_wait``, ``compute``, ``total``,
            ``model`` and ``handlers`` (None when the engine does not fire MONAI's MODEL_COMPLETED), ``between``
            (None for the first iteration of a run), ``items`` (None when unknown); times in seconds.
    """

    def __init__(
        self,
        warmup_iters: int = 2,
        stop_after: int | None = None,
        batch_size: int | None = None,
        cuda_sync: bool | None = None,
        output_file: str | Path | None = None,
        log_summary: bool = True,
    ) -> None:
        if warmup_iters < 0:
            raise ValueError(f"StepTimeProfiler: warmup_iters={warmup_iters} must be >= 0")
        if stop_after is not None and stop_after < 1:
            raise ValueError(f"StepTimeProfiler: stop_after={stop_after} must be >= 1 or None")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"StepTimeProfiler: batch_size={batch_size} must be >= 1 or None")
        self.warmup_iters = int(warmup_iters)
        self.stop_after = None if stop_after is None else int(stop_after)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.cuda_sync = cuda_sync
        self.output_file = None if output_file is None else Path(output_file)
        self.log_summary = log_summary
        self.records: list[dict[str, Any]] = []
        self._sync_device: torch.device | None = None
        self._run_iters = 0
        self._reset_marks()
        self._last_end: float | None = None

    # ------------------------------------------------------------------ attach
    def attach(self, engine: Engine) -> None:
        """Register on ``engine``'s events (GET_BATCH_STARTED / COMPLETED, MODEL_COMPLETED when the engine has
        MONAI's IterationEvents, ITERATION_COMPLETED, STARTED, COMPLETED)."""
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._on_get_batch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._on_get_batch_completed)
        try:
            from monai.engines.utils import IterationEvents

            engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self._on_model_completed)
        except (ImportError, ValueError):  # not a MONAI workflow: no model / handlers split
            pass
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def reset(self) -> None:
        """Forget the recorded iterations."""
        self.records = []

    # ------------------------------------------------------------------ events
    def _reset_marks(self) -> None:
        self._t_get: float | None = None
        self._t_got: float | None = None
        self._t_model: float | None = None
        self._items: int | None = None

    def _now(self) -> float:
        if self._sync_device is not None:
            torch.cuda.synchronize(self._sync_device)
        return time.perf_counter()

    def _on_started(self, engine: Engine) -> None:
        device = getattr(engine.state, "device", None) or getattr(engine, "device", None)
        device = torch.device(device) if device is not None else None
        on_cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
        sync = on_cuda if self.cuda_sync is None else (self.cuda_sync and torch.cuda.is_available())
        self._sync_device = (device if on_cuda else torch.device("cuda")) if sync else None
        self._run_iters = 0
        self._last_end = None
        self._reset_marks()
        # run after every per-iteration handler attached so far, so that their time counts as compute
        if engine.has_event_handler(self._on_iteration_completed, Events.ITERATION_COMPLETED):
            engine.remove_event_handler(self._on_iteration_completed, Events.ITERATION_COMPLETED)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration_completed)

    def _on_get_batch_started(self, engine: Engine) -> None:
        self._reset_marks()
        self._t_get = self._now()

    def _on_get_batch_completed(self, engine: Engine) -> None:
        self._t_got = self._now()
        self._items = self.batch_size if self.batch_size is not None else batch_size_of(engine.state.batch)

    def _on_model_completed(self, engine: Engine) -> None:
        self._t_model = self._now()

    def _on_iteration_completed(self, engine: Engine) -> None:
        t_end = self._now()
        self._run_iters += 1
        last_end, self._last_end = self._last_end, t_end
        if self._t_get is None or self._t_got is None:  # an engine run without data: nothing to attribute
            return
        if self._run_iters <= self.warmup_iters:
            return
        data_wait = self._t_got - self._t_get
        compute = t_end - self._t_got
        model = handlers = None
        if self._t_model is not None:
            model = self._t_model - self._t_got
            handlers = t_end - self._t_model
        self.records.append(
            {
                "iteration": int(engine.state.iteration),
                "epoch": int(engine.state.epoch),
                "data_wait": data_wait,
                "compute": compute,
                "model": model,
                "handlers": handlers,
                "total": data_wait + compute,
                "between": None if last_end is None else self._t_get - last_end,
                "items": self._items,
            }
        )
        if self.stop_after is not None and self._run_iters - self.warmup_iters >= self.stop_after:
            engine.terminate()

    def _on_completed(self, engine: Engine) -> None:
        if not is_main_process():
            return
        if self.log_summary:
            logger.info(self.format_summary())
        if self.output_file is not None:
            self.output_file.parent.mkdir(parents=True, exist_ok=True)
            self.output_file.write_text(json.dumps(self.summary(), indent=2) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ results
    def summary(self) -> dict[str, Any]:
        """The recorded iterations summarised; times in seconds.

        Returns:
            ``{"iterations": n, "warmup_iters": w, "data_wait" | "compute" | "total": {"mean", "median", "p90",
            "min", "max", "sum"}, "model" / "handlers": the same or None, "between_sum": seconds between
            iterations, "data_wait_fraction": Σ data_wait / Σ total, "iterations_per_s": n / Σ total,
            "items_per_iteration": mean items or None, "items_per_s": Σ items / Σ total or None}``; with n = 0 every
            figure is None.
        """
        n = len(self.records)
        result: dict[str, Any] = {"iterations": n, "warmup_iters": self.warmup_iters}
        if n == 0:
            for key in _PHASES:
                result[key] = None
            result.update(
                between_sum=None,
                data_wait_fraction=None,
                iterations_per_s=None,
                items_per_iteration=None,
                items_per_s=None,
            )
            return result
        for key in _PHASES:
            values = [r[key] for r in self.records]
            result[key] = None if any(v is None for v in values) else _stats(values)
        total = result["total"]["sum"]
        result["between_sum"] = float(sum(r["between"] for r in self.records if r["between"] is not None))
        result["data_wait_fraction"] = result["data_wait"]["sum"] / total if total > 0 else None
        result["iterations_per_s"] = n / total if total > 0 else None
        items = [r["items"] for r in self.records]
        if any(v is None for v in items):
            result["items_per_iteration"] = result["items_per_s"] = None
        else:
            result["items_per_iteration"] = float(np.mean(items))
            result["items_per_s"] = float(sum(items)) / total if total > 0 else None
        return result

    def format_summary(self, title: str = "training step time") -> str:
        """:meth:`summary` as a small table (milliseconds per iteration: mean / median / p90)."""
        s = self.summary()
        n = s["iterations"]
        if n == 0:
            return f"{title}: no iteration measured (warm-up {self.warmup_iters} iterations not counted)"
        lines = [
            f"{title}: {n} iterations measured after {self.warmup_iters} warm-up, ms per iteration",
            f"  {'':18s}{'mean':>10s}{'median':>10s}{'p90':>10s}{'share':>9s}",
        ]
        total_sum = s["total"]["sum"]
        rows = [("data wait", "data_wait"), ("compute", "compute")]
        if s["model"] is not None:
            rows += [("  model step", "model"), ("  handlers, other", "handlers")]
        rows.append(("total", "total"))
        for label, key in rows:
            st = s[key]
            share = f"{100.0 * st['sum'] / total_sum:8.1f}%" if total_sum > 0 else f"{'-':>9s}"
            lines.append(
                f"  {label:18s}{1e3 * st['mean']:10.2f}{1e3 * st['median']:10.2f}{1e3 * st['p90']:10.2f}{share}"
            )
        rate = f"{s['iterations_per_s']:.2f} it/s" if s["iterations_per_s"] else "- it/s"
        if s["items_per_s"] is not None:
            rate += f", {s['items_per_s']:.1f} items/s ({s['items_per_iteration']:g} items per iteration)"
        fraction = s["data_wait_fraction"]
        lines.append(
            f"  data wait fraction {100.0 * fraction:.1f}%; {rate}"
            if fraction is not None
            else f"  data wait fraction -; {rate}"
        )
        if s["between_sum"]:
            lines.append(f"  outside iterations (epoch boundaries): {s['between_sum']:.3f} s in all")
        return "\n".join(lines)
