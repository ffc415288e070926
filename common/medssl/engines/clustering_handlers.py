"""Handlers for the stateful tricks of the online-clustering methods (SwAV, DeepCluster-v2), each with
``attach(engine)`` so bundle configs list them in ``train#handlers``.

* :class:`SwAVQueueHandler` — starts the method's feature queue (its :class:`medssl.losses.swav.SwAVQueues`) at a
  given epoch (SwAV ``epoch_queue_starts``); the method uses the queue once it is full.
* :class:`FreezePrototypesHandler` — drops the prototypes' gradients for the first N iterations (SwAV
  ``freeze_prototypes_niters``), between backward and the optimiser step (``IterationEvents.BACKWARD_COMPLETED``,
  which :class:`medssl.engines.SSLTrainer` fires there).
* :class:`DeepClusterEpochHandler` — spherical k-means over the global memory bank at the start of every epoch,
  prototypes set to the centroids, new assignment table, bank emptied; optionally a forward-only pass that fills
  the bank before training (the reference's ``init_memory``).

None of them holds state of its own: the queue, the memory bank, the assignment table and the prototypes are part
of the method's ``state_dict`` (saved in the checkpoint's ``"method"`` entry), and the schedules are functions of
``engine.state.epoch`` / ``iteration``. So a resumed run continues correctly without listing these handlers in
:class:`medssl.engines.CheckpointHandler`'s ``objects``. Multi-rank limitation: a checkpoint holds rank 0's
per-rank state; on resume the other ranks restart their queue / memory bank empty (see
:class:`medssl.losses.swav.SwAVQueues` and :class:`medssl.methods.DeepClusterV2`), so a multi-rank resume is
close to, not exactly, the uninterrupted run.

``method`` may be given explicitly (the unwrapped ``SSLMethod`` or its DDP wrapper) or left None to use
``engine.method`` of an ``SSLTrainer`` at attach time.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from medssl.engines.trainer import epoch_sampler, epoch_started_fresh
from medssl.losses import cancel_prototype_grads
from medssl.utils.tensors import unwrap_module

__all__ = ["SwAVQueueHandler", "FreezePrototypesHandler", "DeepClusterEpochHandler"]

logger = logging.getLogger(__name__)


def _resolve_method(method: Any, engine: Engine, owner: str, needs: str) -> Any:
    if method is None:
        method = getattr(engine, "method", None)
        if method is None:
            raise ValueError(f"{owner}: give `method` (the engine has no .method attribute)")
    method = unwrap_module(method)
    if not hasattr(method, needs):
        raise TypeError(f"{owner}: {type(method).__name__} has no {needs!r} (expected a SwAV / DeepClusterV2 method)")
    return method


class SwAVQueueHandler:
    """Start the SwAV feature queue at the start of epoch ``start_epoch`` (0-based, as the reference's
    ``--epoch_queue_starts``: 0 = from the first epoch; Ghesu et al. 2022 Table I: 10 (2D) / 3 (3D)).

    At Events.EPOCH_STARTED of the epoch with 0-based index ``engine.state.epoch - 1 >= start_epoch`` and a queue
    not yet active, calls ``method.queues.start(length)`` (:meth:`medssl.losses.swav.SwAVQueues.start`, which owns
    the queue): an empty queue of ``length // world_size`` rows per rank and assignment crop (one queue per modality
    with per-modality prototypes). From then on every step pushes its assignment-crop embeddings, and the step's
    codes use the queue once it is full (the step after it filled: ``ceil(L_rank / B_local)`` steps). The queue is
    never restarted (it is kept across epochs, as the reference); a resumed run gets it back from the method's
    state (an active queue is left alone).

    Args:
        method: the :class:`medssl.methods.SwAV` (or its DDP wrapper); None = ``engine.method``.
        start_epoch: 0-based index of the first epoch with a queue.
        length: global queue length L (3840 / 1920 in Ghesu et al. Table I); None = the method's ``queue_length``. The
            reference trims L to a multiple of the global batch size; here the queue is full once L // world_size
            rows were pushed, whatever the batch size.
    """

    def __init__(self, method: Any = None, start_epoch: int = 0, length: int | None = None) -> None:
        if start_epoch < 0:
            raise ValueError(f"SwAVQueueHandler: start_epoch={start_epoch} must be >= 0 (0-based epoch index)")
        if length is not None and length < 1:
            raise ValueError(f"SwAVQueueHandler: length={length} must be >= 1 or None")
        self.method = method
        self.start_epoch = int(start_epoch)
        self.length = length

    def attach(self, engine: Engine) -> None:
        self.method = _resolve_method(self.method, engine, "SwAVQueueHandler", "queues")
        length = self.method.queues.length if self.length is None else self.length
        if not length:
            raise ValueError("SwAVQueueHandler: no queue length (give `length` or the method's queue_length)")
        engine.add_event_handler(Events.EPOCH_STARTED, self._on_epoch_started)

    def _on_epoch_started(self, engine: Engine) -> None:
        if engine.state.epoch - 1 < self.start_epoch or self.method.queues.active:
            return
        per_rank = self.method.queues.start(self.length)
        logger.info(
            f"SwAV queue started at epoch {engine.state.epoch} (0-based {engine.state.epoch - 1}): {per_rank} rows per "
            f"rank and assignment crop; used once full"
        )


class FreezePrototypesHandler:
    """Drop the prototypes' gradients (``grad = None``: no update, no momentum, no weight decay) during the first
    ``freeze_iters`` iterations (SwAV ``freeze_prototypes_niters``; Ghesu et al. Table I: 10000 (2D) / 4000 (3D)).

    Runs at ``IterationEvents.BACKWARD_COMPLETED`` (after backward, before clipping and the optimiser step in
    :class:`medssl.engines.SSLTrainer`), for iterations ``engine.state.iteration`` (1-based) ``<= freeze_iters``,
    i.e. the reference's 0-based iterations ``0 … freeze_iters − 1``. The decision is a function of the iteration,
    so a resumed run needs no saved state. With gradient accumulation the count is in batches (as the reference).

    Args:
        method: a method with a ``prototypes`` module (SwAV; its DDP wrapper), or the prototypes module itself;
            None = ``engine.method``.
        freeze_iters: number of iterations whose prototype gradients are dropped (0 = never).
    """

    def __init__(self, method: Any = None, freeze_iters: int = 0) -> None:
        if freeze_iters < 0:
            raise ValueError(f"FreezePrototypesHandler: freeze_iters={freeze_iters} must be >= 0")
        self.method = method
        self.freeze_iters = int(freeze_iters)
        self.prototypes: nn.Module | None = None
        self.dropped_last = False  # whether the last iteration's prototype gradients were dropped

    def attach(self, engine: Engine) -> None:
        target = unwrap_module(self.method if self.method is not None else getattr(engine, "method", None))
        if target is None:
            raise ValueError("FreezePrototypesHandler: give `method` (the engine has no .method attribute)")
        prototypes = getattr(target, "prototypes", target)
        if not isinstance(prototypes, nn.Module) or not list(prototypes.parameters()):
            raise TypeError(
                f"FreezePrototypesHandler: {type(target).__name__} has no `prototypes` module with parameters"
            )
        self.prototypes = prototypes
        if IterationEvents.BACKWARD_COMPLETED not in getattr(engine, "_allowed_events", []):
            raise ValueError(
                "FreezePrototypesHandler: the engine does not fire IterationEvents.BACKWARD_COMPLETED between backward "
                "and the optimiser step (use medssl.engines.SSLTrainer, or register_events(*IterationEvents) and fire "
                "it there)"
            )
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.dropped_last = cancel_prototype_grads(self.prototypes, engine.state.iteration - 1, self.freeze_iters)


class DeepClusterEpochHandler:
    """DeepCluster-v2's k-means at the start of every epoch (Events.EPOCH_STARTED of each epoch that starts from its
    first batch; not for the partial epoch a resumed run continues, whose clustering is in the checkpoint).

    Calls ``method.cluster_memory(n_iters, seed=seed + 1000 · (epoch − 1), epoch)`` (epoch 1-based; head h adds h to
    the seed): global spherical k-means per head over the memory bank, prototypes = centroids (identical on every
    rank), new assignment table, empty bank. An empty global bank (epoch 1 without ``init_memory_pass``) is skipped:
    epoch 1 then only fills the bank (its loss is 0, every assignment being the ignore index −100).

    Args:
        method: the :class:`medssl.methods.DeepClusterV2` (or its DDP wrapper); None = ``engine.method``.
        n_iters: k-means iterations (10).
        seed: base seed of the k-means initialisations (the run's seed).
        init_memory_pass: on a fresh run, fill the bank before training with one forward-only pass (train mode,
            no gradient) over the epoch-0 batches of ``engine.data_loader`` (``epoch_length`` batches), so that
            epoch 1 already trains on k-means targets, as the reference's ``init_memory``.
    """

    def __init__(self, method: Any = None, n_iters: int = 10, seed: int = 0, init_memory_pass: bool = False) -> None:
        if n_iters < 0:
            raise ValueError(f"DeepClusterEpochHandler: n_iters={n_iters} must be >= 0")
        self.method = method
        self.n_iters = int(n_iters)
        self.seed = int(seed)
        self.init_memory_pass = bool(init_memory_pass)

    def epoch_seed(self, epoch: int) -> int:
        """Seed of the k-means of (1-based) ``epoch``; heads use ``epoch_seed + h``."""
        return self.seed + 1000 * (int(epoch) - 1)

    def attach(self, engine: Engine) -> None:
        self.method = _resolve_method(self.method, engine, "DeepClusterEpochHandler", "cluster_memory")
        if self.init_memory_pass:
            engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._on_epoch_started)

    def _on_started(self, engine: Engine) -> None:
        if engine.state.iteration != 0:  # resumed: the bank / clustering are in the checkpoint
            return
        self.fill_memory(engine)

    @torch.no_grad()
    def fill_memory(self, engine: Engine) -> int:
        """One forward-only pass over the first ``epoch_length`` batches of epoch 0 into the memory bank; returns the
        number of batches. Uses the engine's ``prepare_batch``, device and autocast settings."""
        loader = engine.data_loader
        sampler = epoch_sampler(loader)
        if sampler is not None:
            sampler.set_epoch(0)
        network = getattr(engine, "network", self.method)
        network.train()
        device = engine.state.device
        amp = bool(getattr(engine, "amp", False))
        dtype = getattr(engine, "amp_dtype", torch.bfloat16)
        n_batches = 0
        for batchdata in itertools.islice(iter(loader), engine.state.epoch_length):
            batch = engine.prepare_batch(batchdata, device, getattr(engine, "non_blocking", False))
            with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=amp):
                self.method.fill_memory(batch)
            n_batches += 1
        logger.info(f"DeepCluster-v2: memory bank filled by an init pass over {n_batches} batches")
        return n_batches

    def _on_epoch_started(self, engine: Engine) -> None:
        if not epoch_started_fresh(engine):
            return
        epoch = engine.state.epoch
        done = self.method.cluster_memory(n_iters=self.n_iters, seed=self.epoch_seed(epoch), epoch=epoch)
        if done:
            logger.info(f"DeepCluster-v2: k-means ({self.n_iters} iterations) at the start of epoch {epoch}")
        else:
            logger.info(
                f"DeepCluster-v2: epoch {epoch} starts with an empty memory bank: no targets this epoch (it fills the "
                "bank)"
            )
