"""Atomic training checkpoints and exact resume (same trajectory as an uninterrupted run).

Files in ``ckpt_dir``:

* ``checkpoint_<iteration:08d>.pt`` — periodic checkpoints (every ``save_every_iters`` iterations and / or every
  ``save_every_epochs`` epochs); the last ``keep_last`` are kept;
* ``checkpoint_final.pt`` — written when the run completes all ``max_epochs`` (never deleted); same format. A run
  stopped earlier by ``engine.terminate()`` (not for a NaN) writes a periodic checkpoint of its last iteration instead;
* ``.checkpoint_*.tmp.<pid>`` — a save in progress; it becomes one of the above by ``os.replace`` only once it is
  complete and fsynced, so a process killed mid-write leaves at worst a temp file, which is ignored and removed at
  the next start.

A checkpoint is a ``torch.save`` dict: one entry per object given in ``objects`` (``"method"``, ``"optimizer"``,
stateful handlers such as an EMA teacher...: their ``state_dict()``), plus ``"engine"`` (``iteration``, ``epoch``,
``epoch_length``, ``max_epochs``), ``"scaler"`` (fp16 ``GradScaler`` or None), ``"sampler"`` (the batch sampler's
``state_dict()`` or None), ``"rng"`` (per rank: Python, NumPy, torch CPU and CUDA generator states),
``"world_size"`` and ``"format"``. ``medssl.weights`` exports the encoder from ``checkpoint["method"]``. Files
are read with ``torch.load(weights_only=False)``: load only checkpoints you trust.

Resume (``resume=True``) takes the newest checkpoint that ``torch.load`` can read: an empty, truncated or otherwise
unreadable newer file is skipped with a warning naming it (and left in place; the resumed run overwrites it when it
gets there); when no file is readable, a one-line :class:`CheckpointReadError` lists them with their problems.

Resume restores everything, including the position inside an epoch: the trainer's data feeding sets the sampler's
epoch and skips the batches already done (``skip_batches(iteration % epoch_length)``), and the RNG states are
restored right before the first resumed step (at Events.GET_BATCH_COMPLETED for a mid-epoch checkpoint, at
Events.STARTED for an end-of-epoch one), i.e. where the uninterrupted run stood when the checkpoint was taken.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine, Events

from medssl.engines.trainer import epoch_sampler, output_is_finite
from medssl.utils.dist import all_gather_object, broadcast_object, get_rank, get_world_size, is_main_process
from medssl.utils.io import atomic_torch_save
from medssl.utils.tensors import unwrap_module

__all__ = [
    "BestModelState",
    "CheckpointHandler",
    "CheckpointReadError",
    "checkpoint_name",
    "list_checkpoints",
    "find_latest_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "FINAL_CHECKPOINT_NAME",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
FINAL_CHECKPOINT_NAME = "checkpoint_final.pt"
_PERIODIC_RE = re.compile(r"^checkpoint_(\d+)\.pt$")
_TEMP_RE = re.compile(r"^\.checkpoint_.*\.tmp\.\d+$")
_RESERVED = ("engine", "scaler", "sampler", "rng", "world_size", "format")
#: what a fresh run does with the checkpoints already in its ckpt_dir (CheckpointHandler's ``existing_checkpoints``)
EXISTING_CHECKPOINTS = ("refuse", "overwrite", "resume")


def checkpoint_name(iteration: int) -> str:
    """File name of the periodic checkpoint at ``iteration``: ``checkpoint_00001234.pt``."""
    return f"checkpoint_{int(iteration):08d}.pt"


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """The periodic checkpoints in ``ckpt_dir`` as (iteration, path), oldest first (temp files are ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for entry in ckpt_dir.iterdir():
        match = _PERIODIC_RE.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


class CheckpointReadError(RuntimeError):
    """A checkpoint file that cannot be read (empty, truncated, not a torch file, not a medssl checkpoint);
    ``str(error)`` names the file and the problem on one line; ``path`` and ``problem`` hold them."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = Path(path), problem

    def __reduce__(self):
        return (type(self), (self.path, self.problem))


def _read_problem(path: Path, error: BaseException) -> str:
    """What is wrong with ``path``, which ``torch.load`` failed on with ``error`` (one line)."""
    try:
        size = path.stat().st_size
    except OSError:
        size = None
    if size == 0:
        return "empty file (0 bytes)"
    text = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else ""  # torch's first sentence
    return f"truncated or corrupt ({size} bytes; torch.load: {type(error).__name__}{': ' + text if text else ''})"


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Read a checkpoint written by :class:`CheckpointHandler` (``weights_only=False``: trusted files only).

    Raises FileNotFoundError for a missing file and :class:`CheckpointReadError` ("PATH: unreadable checkpoint:
    problem") for one ``torch.load`` cannot read, instead of torch's messages, which name no file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - any failure to read the file is reported with its name
        raise CheckpointReadError(path, f"unreadable checkpoint: {_read_problem(path, error)}") from error


def _checkpoint_iteration(path: Path) -> int:
    """The iteration recorded in checkpoint ``path`` (memory-mapped read: cheap); CheckpointReadError when the file
    cannot be read or is not a medssl checkpoint."""
    ckpt = load_checkpoint(path, mmap=True)
    try:
        return int(ckpt["engine"]["iteration"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointReadError(path, "not a medssl checkpoint (no 'engine' iteration entry)") from error


def find_latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The readable checkpoint with the highest iteration in ``ckpt_dir`` (``checkpoint_final.pt`` included, and
    preferred on a tie); None when there is none. Temp files of interrupted saves are ignored; a newer file that
    cannot be read (empty, truncated...) is skipped with a warning naming it; when there are checkpoint files but
    none is readable, :class:`CheckpointReadError` lists them."""
    ckpt_dir = Path(ckpt_dir)
    unreadable: list[str] = []

    def readable(path: Path) -> int | None:
        try:
            return _checkpoint_iteration(path)
        except CheckpointReadError as error:
            logger.warning(f"skipping {error}; looking for an older checkpoint")
            unreadable.append(f"{path.name} ({error.problem})")
            return None

    candidates = [(it, 0, p) for it, p in list_checkpoints(ckpt_dir)]
    final = ckpt_dir / FINAL_CHECKPOINT_NAME
    if final.is_file():
        final_iteration = readable(final)
        if final_iteration is not None:
            candidates.append((final_iteration, 1, final))
    for _, is_final, path in sorted(candidates, reverse=True):
        if is_final or readable(path) is not None:
            return path
    if unreadable:
        raise CheckpointReadError(
            ckpt_dir,
            f"no readable checkpoint: {'; '.join(unreadable)}; delete these files to start a fresh run, or resume "
            "from another ckpt_dir",
        )
    return None


def rng_state() -> dict[str, Any]:
    """This process's global RNG states: Python ``random``, NumPy, torch CPU and (when CUDA is initialised) CUDA."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states returned by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointHandler:
    """Save training checkpoints atomically and resume from them (see the module docstring for the files).

    Args:
        ckpt_dir: directory of the checkpoints (created by rank 0).
        objects: ``{name: object with state_dict() / load_state_dict()}`` — the method, the optimiser, stateful
            handlers (EMA teacher, queues...). Default with an ``SSLTrainer``: ``{"method": engine.method,
            "optimizer": engine.optimizer}``. The trainer's ``scaler``, the loader's batch sampler, the engine state
            and the RNG states are always added. DDP-wrapped modules are saved unwrapped.
        save_every_iters: save every N iterations (None = not by iteration). With gradient accumulation a save that
            falls inside an accumulation window is postponed to the window's last iteration.
        save_every_epochs: save at the end of every N epochs (None or 0 = not by epoch).
        keep_last: number of periodic checkpoints kept (older ones are deleted); None or 0 = keep all.
            ``checkpoint_final.pt`` is never deleted.
        resume: False = fresh run (what happens to checkpoints already in ``ckpt_dir`` is ``existing_checkpoints``);
            True = resume from the latest complete checkpoint in ``ckpt_dir``, or start fresh with a warning when
            there is none; a path = resume from that file (it must exist). The strings "true" / "latest" and
            "false" / "" (command-line overrides) mean True and False.
        existing_checkpoints: what a fresh run (``resume`` False) does when ``ckpt_dir`` already holds checkpoints:
            ``"refuse"`` (default: a FileExistsError says to pass ``resume=True`` or use another directory, so runs
            are never mixed); ``"overwrite"`` (MONAI Label's convention: every ``/train/`` retrains into the same
            folder; the old checkpoints are deleted with a warning naming them, and the new run starts from
            iteration 0); ``"resume"`` (continue the latest one, as ``resume=True``).
        save_final: write ``checkpoint_final.pt`` at Events.COMPLETED when all ``max_epochs`` are done.
        strict: ``strict`` of ``nn.Module.load_state_dict`` for the modules in ``objects``.

    Rank 0 writes; every rank takes part in gathering the per-rank RNG states and loads the same file (rank 0
    chooses it). No checkpoint is written for an iteration whose loss is not finite (see
    :class:`medssl.engines.TerminateOnNanHandler`). ``engine.state.last_checkpoint`` is the path of the last
    checkpoint saved or resumed from. The checkpoint is restored when the handler is attached (before the run), so
    handlers and method hooks see the restored state from Events.STARTED on.
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        objects: Mapping[str, Any] | None = None,
        save_every_iters: int | None = None,
        save_every_epochs: int | None = 1,
        keep_last: int | None = 3,
        resume: bool | str | Path = False,
        save_final: bool = True,
        strict: bool = True,
        existing_checkpoints: str = "refuse",
    ) -> None:
        if existing_checkpoints not in EXISTING_CHECKPOINTS:
            raise ValueError(
                f"CheckpointHandler: existing_checkpoints={existing_checkpoints!r} must be one of "
                f"{EXISTING_CHECKPOINTS}"
            )
        if save_every_iters is not None and save_every_iters < 1:
            raise ValueError(f"CheckpointHandler: save_every_iters={save_every_iters} must be >= 1 or None")
        if save_every_epochs is not None and save_every_epochs < 0:
            raise ValueError(f"CheckpointHandler: save_every_epochs={save_every_epochs} must be >= 0 or None")
        if keep_last is not None and keep_last < 0:
            raise ValueError(f"CheckpointHandler: keep_last={keep_last} must be >= 0 or None")
        self.ckpt_dir = Path(ckpt_dir)
        self._objects = dict(objects) if objects is not None else None
        if self._objects is not None:
            self._check_objects(self._objects)
        self.save_every_iters = save_every_iters
        self.save_every_epochs = save_every_epochs or 0
        self.keep_last = keep_last or 0
        self.resume = resume
        self.save_final = save_final
        self.strict = strict
        self.existing_checkpoints = existing_checkpoints
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self._pending_save = False
        self._last_saved_iteration: int | None = None
        self._pending_rng: dict | None = None
        self._rng_at_start = False

    @staticmethod
    def _check_objects(objects: Mapping[str, Any]) -> None:
        for name, obj in objects.items():
            if name in _RESERVED:
                raise ValueError(f"CheckpointHandler: objects key {name!r} is reserved ({', '.join(_RESERVED)})")
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise TypeError(
                    f"CheckpointHandler: objects[{name!r}] ({type(obj).__name__}) has no state_dict()/load_state_dict()"
                )

    @property
    def objects(self) -> dict[str, Any]:
        return dict(self._objects or {})

    # ------------------------------------------------------------------ attach / resume
    def attach(self, engine: Engine) -> None:
        if self._objects is None:
            if not (hasattr(engine, "method") and hasattr(engine, "optimizer")):
                raise ValueError("CheckpointHandler: give `objects` (the engine has no .method / .optimizer)")
            self._objects = {"method": engine.method, "optimizer": engine.optimizer}
            self._check_objects(self._objects)
        if is_main_process():
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            for entry in self.ckpt_dir.iterdir():
                if _TEMP_RE.match(entry.name):
                    logger.warning(f"removing the temp file of an interrupted checkpoint save: {entry}")
                    entry.unlink(missing_ok=True)
        path = self._choose_resume_path()
        if path is not None:
            self.load(engine, path)
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._on_get_batch_completed)
        engine.add_event_handler(Events.COMPLETED, self._on_completed)
        # the saves are registered at Events.STARTED (_on_started), after every handler of the run is attached, so a
        # checkpoint holds the state after all of an iteration's handlers (an EMA teacher's update listed after this
        # handler in a config was otherwise saved one update behind, and a resumed run diverged)

    def _choose_resume_path(self) -> Path | None:
        """Rank 0 decides, every rank gets the same answer (a path, None, or an error to raise)."""
        decision: tuple[str, str | None] = ("none", None)
        if is_main_process():
            try:
                decision = self._decide()
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                decision = ("error", f"{type(e).__name__}: {e}")
        decision = broadcast_object(decision, src=0)
        kind, value = decision
        if kind == "error":
            raise RuntimeError(f"CheckpointHandler({self.ckpt_dir}): {value}")
        if kind == "exists":
            raise FileExistsError(
                f"CheckpointHandler: {self.ckpt_dir} already holds checkpoints of another run ({value}); pass "
                "resume=True to continue it, existing_checkpoints='overwrite' to start again over it (MONAI Label's "
                "retraining), or use an empty ckpt_dir"
            )
        if kind == "fresh":
            logger.warning(f"resume=True but {self.ckpt_dir} holds no checkpoint: starting a fresh run")
            return None
        return Path(value) if kind == "path" else None

    def _decide(self) -> tuple[str, str | None]:
        resume = self.resume
        if isinstance(resume, str) and resume.strip().lower() in ("", "false", "no", "none", "0"):
            resume = False
        elif isinstance(resume, str) and resume.strip().lower() in ("true", "yes", "latest", "1"):
            resume = True
        if (resume is False or resume is None) and self.existing_checkpoints == "resume":
            resume = True
        if resume is False or resume is None:
            existing = [p for _, p in list_checkpoints(self.ckpt_dir)]
            if (self.ckpt_dir / FINAL_CHECKPOINT_NAME).is_file():
                existing.append(self.ckpt_dir / FINAL_CHECKPOINT_NAME)
            if existing and self.existing_checkpoints == "overwrite":
                logger.warning(
                    f"existing_checkpoints='overwrite': deleting the {len(existing)} checkpoint(s) of the previous run "
                    f"in {self.ckpt_dir} ({', '.join(p.name for p in existing)}); this run starts from iteration 0"
                )
                for path in existing:
                    path.unlink(missing_ok=True)
                return ("none", None)
            return ("exists", ", ".join(p.name for p in existing[-3:])) if existing else ("none", None)
        if resume is True:
            latest = find_latest_checkpoint(self.ckpt_dir)
            return ("path", str(latest)) if latest is not None else ("fresh", None)
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"resume={str(resume)!r}: no such checkpoint file")
        return ("path", str(path))

    def load(self, engine: Engine, path: str | Path) -> None:
        """Restore ``objects``, scaler, sampler and engine state from ``path`` now; the RNG states are restored just
        before the first resumed step."""
        path = Path(path)
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, Mapping) or "engine" not in ckpt:
            raise ValueError(f"{path}: not a medssl checkpoint (no 'engine' entry)")
        for name, obj in (self._objects or {}).items():
            if name not in ckpt and getattr(obj, "optional_in_checkpoint", False):
                logger.warning(f"{path}: no entry {name!r} (saved by an earlier version); {name} starts afresh")
                continue
            if name not in ckpt:
                present = sorted(k for k in ckpt if k not in _RESERVED)
                raise KeyError(f"{path}: no entry {name!r} for objects[{name!r}]; the checkpoint has {present}")
            target = unwrap_module(obj)
            if isinstance(target, nn.Module):
                target.load_state_dict(ckpt[name], strict=self.strict)
            else:
                target.load_state_dict(ckpt[name])
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        elif ckpt.get("scaler") is not None:
            logger.warning(f"{path}: has a GradScaler state but the engine has no scaler (amp off?); ignored")
        sampler = epoch_sampler(getattr(engine, "data_loader", None))
        if sampler is not None and ckpt.get("sampler") is not None and hasattr(sampler, "load_state_dict"):
            sampler.load_state_dict(ckpt["sampler"])

        saved = ckpt["engine"]
        iteration, saved_length = int(saved["iteration"]), int(saved["epoch_length"])
        epoch_length = engine.state.epoch_length
        if epoch_length != saved_length:
            raise ValueError(
                f"{path}: written with epoch_length {saved_length} but the engine now has {epoch_length} iterations "
                "per epoch (dataset, batch size, number of ranks or epoch_length changed); cannot continue the run"
            )
        epoch = iteration // epoch_length
        max_epochs = engine.state.max_epochs
        if max_epochs is not None and epoch > max_epochs:
            raise ValueError(f"{path}: at epoch {epoch}, beyond max_epochs={max_epochs}")
        engine.state.iteration = iteration
        engine.state.epoch = epoch

        rng = ckpt.get("rng")
        if rng:
            saved_ws = int(ckpt.get("world_size", len(rng)))
            rank = get_rank()
            if saved_ws != get_world_size():
                logger.warning(
                    f"{path}: written by {saved_ws} ranks, resumed on {get_world_size()}: every rank takes rank 0's "
                    "RNG state"
                )
                rank = 0
            self._pending_rng = rng[rank] if rank < len(rng) else rng[0]
            self._rng_at_start = iteration % epoch_length == 0
        self.resumed_from = path
        self.last_checkpoint = path
        engine.state.last_checkpoint = str(path)
        offset = iteration % epoch_length
        where = (
            f"epoch {epoch + 1} continues at batch {offset + 1}/{epoch_length}" if offset else f"next epoch {epoch + 1}"
        )
        logger.info(
            f"resumed from {path} at epoch {epoch + (1 if offset else 0)} iteration {iteration} ({epoch} epochs "
            f"complete, {where})"
        )

    # ------------------------------------------------------------------ events
    def _on_started(self, engine: Engine) -> None:
        for event, save in ((Events.ITERATION_COMPLETED, self._on_iteration_completed),
                            (Events.EPOCH_COMPLETED, self._on_epoch_completed)):
            if not engine.has_event_handler(save, event):
                engine.add_event_handler(event, save)
        if self._pending_rng is not None and self._rng_at_start:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def _on_get_batch_completed(self, engine: Engine) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def _on_iteration_completed(self, engine: Engine) -> None:
        if self.save_every_iters and engine.state.iteration % self.save_every_iters == 0:
            self._pending_save = True
        if self._pending_save and getattr(engine.state, "optimizer_stepped", True):
            self._pending_save = False
            self._save_periodic(engine)

    def _on_epoch_completed(self, engine: Engine) -> None:
        if self.save_every_epochs and engine.state.epoch % self.save_every_epochs == 0:
            self._save_periodic(engine)

    def _on_completed(self, engine: Engine) -> None:
        state = engine.state
        finished = bool(state.epoch_length) and state.max_epochs is not None
        finished = finished and state.iteration >= state.max_epochs * state.epoch_length
        if not finished:
            # stopped before the end (engine.terminate() by a handler): a periodic checkpoint to resume from
            self._save_periodic(engine)
        elif self.save_final and self._can_save(engine, "final checkpoint"):
            self.save(engine, self.ckpt_dir / FINAL_CHECKPOINT_NAME)

    # ------------------------------------------------------------------ saving
    def _can_save(self, engine: Engine, what: str) -> bool:
        if getattr(engine.state, "nonfinite_loss", None) or not output_is_finite(engine.state.output):
            logger.warning(f"not writing the {what} at iteration {engine.state.iteration}: the loss is not finite")
            return False
        return True

    def _save_periodic(self, engine: Engine) -> None:
        iteration = engine.state.iteration
        if iteration == self._last_saved_iteration or not self._can_save(engine, "checkpoint"):
            return
        if not getattr(engine.state, "optimizer_stepped", True):
            logger.warning(
                f"not writing a checkpoint at iteration {iteration}: it is inside a gradient-accumulation window"
            )
            return
        self.save(engine, self.ckpt_dir / checkpoint_name(iteration))
        self._last_saved_iteration = iteration
        if is_main_process() and self.keep_last:
            for _, old in list_checkpoints(self.ckpt_dir)[: -self.keep_last]:
                old.unlink(missing_ok=True)

    def state_dict_of(self, engine: Engine) -> dict[str, Any]:
        """The checkpoint dict of the current state (rank 0's view; the "rng" entry needs every rank, see
        :meth:`save`)."""
        payload: dict[str, Any] = {name: unwrap_module(obj).state_dict() for name, obj in (self._objects or {}).items()}
        scaler = getattr(engine, "scaler", None)
        sampler = epoch_sampler(getattr(engine, "data_loader", None))
        payload.update(
            engine={
                "iteration": int(engine.state.iteration),
                "epoch": int(engine.state.epoch),
                "epoch_length": int(engine.state.epoch_length),
                "max_epochs": engine.state.max_epochs,
            },
            scaler=scaler.state_dict() if scaler is not None else None,
            sampler=sampler.state_dict() if sampler is not None and hasattr(sampler, "state_dict") else None,
            world_size=get_world_size(),
            format=CHECKPOINT_FORMAT,
        )
        return payload

    def save(self, engine: Engine, path: str | Path) -> None:
        """Write the checkpoint of the current state to ``path`` (a collective: call on every rank)."""
        path = Path(path)
        states = all_gather_object(rng_state())
        if is_main_process():
            payload = self.state_dict_of(engine)
            payload["rng"] = states
            atomic_torch_save(payload, path)
            logger.info(f"saved checkpoint {path} (epoch {engine.state.epoch}, iteration {engine.state.iteration})")
        self.last_checkpoint = path
        engine.state.last_checkpoint = str(path)


# What ours adds to MONAI's CheckpointSaver(key_metric_save_state=...): its best-so-far record goes into medssl's
# resumable checkpoint, so a resumed run keeps the best network instead of overwriting it at its first validation.
class BestModelState:
    """The best-model bookkeeping of a key-metric :class:`monai.handlers.CheckpointSaver` (its ignite ``Checkpoint``'s
    saved scores) and of the evaluator (``best_metric``, ``best_metric_epoch``), as one ``state_dict`` /
    ``load_state_dict`` object for :class:`CheckpointHandler`'s ``objects``. A checkpoint written before it existed
    resumes with a warning (``optional_in_checkpoint``)."""

    optional_in_checkpoint = True

    def __init__(self, saver: Any, evaluator: Any = None) -> None:
        if getattr(saver, "_key_metric_checkpoint", None) is None:
            raise ValueError("BestModelState: saver must be a monai.handlers.CheckpointSaver with save_key_metric=True")
        self.saver, self.evaluator = saver, evaluator

    def state_dict(self) -> dict[str, Any]:
        state = getattr(self.evaluator, "state", None)
        saved = self.saver._key_metric_checkpoint.state_dict()  # ignite: {"_saved": [(priority, filename), ...]}
        return {
            "checkpoint": {key: [(float(p), str(f)) for p, f in items] for key, items in saved.items()},
            "best_metric": getattr(state, "best_metric", None),
            "best_metric_epoch": getattr(state, "best_metric_epoch", None),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.saver.load_state_dict({key: [tuple(item) for item in items] for key, items in state["checkpoint"].items()})
        engine_state = getattr(self.evaluator, "state", None)
        for key in ("best_metric", "best_metric_epoch"):
            if engine_state is not None and state.get(key) is not None:
                setattr(engine_state, key, state[key])
