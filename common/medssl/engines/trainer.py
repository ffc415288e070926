"""The self-supervised training engine: a MONAI ``Trainer`` (an Ignite ``Engine``) running ``method.training_step``.

Why MONAI's ``Trainer`` (not ``SupervisedTrainer``, not a bare Ignite ``Engine``): ``Trainer`` / ``Workflow`` give
the bundle-facing behaviour users know (``engine.state`` fields, ``IterationEvents``, ``get_stats``, ``handlers``
attached from the config, ``engine.optimizer`` / ``engine.network`` read by MONAI's MLflow / stats handlers) and
nothing of the supervised pipeline (inferer, loss function, decollation) is needed: this class replaces the
iteration, :meth:`SSLTrainer.run` (MONAI's ``Trainer.run`` builds a CUDA-only ``GradScaler`` on every call) and the
data feeding (so that a run resumed in the middle of an epoch continues on the same batches).

One iteration (``engine.state.iteration`` = i, 1-based):

1. ``prepare_batch`` moves every tensor of the collated batch to the device (lists of str such as ``"modality"``
   and other non-tensors are left as they are);
2. the (``DistributedDataParallel``-wrapped when the world size is above 1) method's forward = ``training_step``
   runs under ``torch.autocast`` when ``amp`` (bf16 or fp16, CUDA only; on CPU ``amp`` is turned off with one log
   line). ``amp`` left unset (None) means on with CUDA, off elsewhere, and ``amp_dtype`` defaults to bfloat16, so a
   CUDA run trains under bf16 autocast unless the config says ``amp: false``;
3. ``(loss / window).backward()`` through the ``GradScaler`` for fp16, where ``window`` is the number of batches
   accumulated into this optimiser step (``accumulate_grad_batches``, shorter for the last window of an epoch);
   the iterations that do not step run under ``DDP.no_sync()``;
4. on the stepping iterations: unscale (fp16), clip the gradient norm (``clip_grad_norm``), ``optimizer.step()``,
   ``zero_grad``;
5. ``engine.state.output`` = a :class:`StepOutput`: the step's scalars as Python floats, ``"loss"`` first, each the
   mean over the ranks (so every rank logs, and stops on a NaN, identically), plus ``"grad_norm"`` (the norm
   before clipping) when clipping is on.

Speed switches (issue #12), all off on CPU by default:

- ``channels_last`` (None = on with CUDA): when the method holds 2D convolutions (``nn.Conv2d``), its 4-D parameters
  and the 4-D floating tensors of every batch are put in ``torch.channels_last`` memory format (cuDNN's NHWC
  kernels; values are unchanged, only the strides). A method without 2D convolutions is left as it is.
- ``compile`` (default False): the method's ``backbone`` (the method itself when it has none) runs through
  ``torch.compile``; its parameters and ``state_dict`` keys stay those of the eager module (checkpoints are
  interchangeable); eval-mode calls (monitors) run eagerly. When ``torch.compile`` raises, or the compiled forward
  fails on its first call, one warning line is logged and the backbone runs eagerly from then on.

Boolean arguments accept the command-line spellings of :func:`medssl.bundle.as_bool` (``"true"``, ``"off"``...).

Epochs and the data order: the engine iterates ``epoch_length`` batches per epoch (default ``len(data_loader)``;
a smaller value uses the first ``epoch_length`` batches of each epoch). Each epoch starts a fresh pass over the
loader after ``sampler.set_epoch(epoch - 1)`` (0-based epoch index; the loader's ``batch_sampler``, else its
``sampler``, when it has ``set_epoch``). When the run resumes at iteration i in the middle of an epoch, the pass
starts at batch ``i % epoch_length`` through the sampler's ``skip_batches`` (medssl samplers), or by drawing and
dropping those batches (other samplers, with a warning).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents

from medssl.bundle.params import as_bool
from medssl.engines.speed import _params_channels_last, compile_backbone, has_conv2d, to_channels_last
from medssl.transforms.batched import BatchedMultiCrop
from medssl.transforms.batched_unimiss import BatchedUniMiSSViews, make_views
from medssl.utils.dist import all_reduce_sum, get_world_size, is_distributed

__all__ = [
    "SSLTrainer",
    "StepOutput",
    "sync_batchnorm_layers",
    "default_prepare_batch",
    "to_device",
    "get_output_value",
    "output_is_finite",
    "epoch_sampler",
    "epoch_started_fresh",
    "to_channels_last",
    "has_conv2d",
    "compile_backbone",
    "AugmentOnDevice",
    "UniMiSSAugmentOnDevice",
]

logger = logging.getLogger(__name__)

_AMP_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class StepOutput(list):
    """``engine.state.output`` of :class:`SSLTrainer`: a one-item list holding the step's dict of scalars (``"loss"``
    first), i.e. the "decollated" form MONAI's handlers expect (``StatsHandler`` / ``TensorBoardStatsHandler`` read
    ``output[0]``; ``--tracking mlflow`` reads ``from_engine(['loss'], first=True)``), that can also be indexed by
    key: ``output["loss"] == output[0]["loss"]``."""

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            return super().__getitem__(0)[key]
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        return super().__getitem__(0).get(key, default) if len(self) else default

    def as_dict(self) -> dict[str, Any]:
        return dict(super().__getitem__(0)) if len(self) else {}


def get_output_value(output: Any, key: str = "loss") -> Any:
    """``key`` of an engine output: a :class:`StepOutput`, a dict, a list of dicts (MONAI's decollated output) or a
    plain scalar (returned as is). None when absent."""
    if isinstance(output, Mapping):
        return output.get(key)
    if isinstance(output, Sequence) and not isinstance(output, str) and len(output) and isinstance(output[0], Mapping):
        return output[0].get(key)
    if isinstance(output, (int, float, torch.Tensor)):
        return output
    return None


def to_device(data: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``data`` with every tensor (MetaTensors stay MetaTensors) moved to ``device``, recursing into dicts, lists and
    tuples; anything else (str, numbers, None, lists of str such as ``"modality"``) is returned unchanged."""
    if isinstance(data, torch.Tensor):
        return data.to(device=device, non_blocking=non_blocking)
    if isinstance(data, Mapping):
        moved = {k: to_device(v, device, non_blocking) for k, v in data.items()}
        try:
            return type(data)(moved)
        except TypeError:
            return moved
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(to_device(v, device, non_blocking) for v in data))
    if isinstance(data, (list, tuple)):
        moved = [to_device(v, device, non_blocking) for v in data]
        return moved if isinstance(data, list) else tuple(moved)
    return data


def default_prepare_batch(batchdata: Any, device: torch.device | str, non_blocking: bool = False, **kwargs) -> Any:
    """The default ``prepare_batch`` of :class:`SSLTrainer`: the whole collated batch on ``device``
    (:func:`to_device`); the method's ``training_step`` receives it as is."""
    return to_device(batchdata, device, non_blocking)


class AugmentOnDevice:
    """A ``prepare_batch`` that makes the views on the training device: the batch moved by :func:`to_device`, then
    ``augment`` (a :class:`medssl.transforms.batched.BatchedMultiCrop`) on ``batch[image_key]`` (working-size images,
    ``loading_transforms(working_size=...)``) with ``batch[seed_key]`` (``SampleSeedd`` / ``make_dataset(seed_key=)``)
    and ``batch[modality_key]``; the list of crops goes to ``out_key`` (the ``"crops"`` the methods read) and the
    images are dropped unless ``keep_source``. Runs outside autocast (float32 views)."""

    def __init__(self, augment: BatchedMultiCrop, image_key: str = "image", seed_key: str = "seed",
                 modality_key: str = "modality", out_key: str = "crops", keep_source: bool = False) -> None:
        self.augment = augment
        self.image_key, self.seed_key, self.modality_key, self.out_key = image_key, seed_key, modality_key, out_key
        self.keep_source = bool(keep_source)

    def __call__(self, batchdata: Any, device: torch.device | str, non_blocking: bool = False, **kwargs) -> Any:
        batch = dict(to_device(batchdata, device, non_blocking))
        with torch.no_grad():
            images, seeds = batch[self.image_key], batch[self.seed_key]
            batch[self.out_key] = self.augment(images, seeds, batch.get(self.modality_key))
        if not self.keep_source:
            batch.pop(self.image_key)
        return batch


class UniMiSSAugmentOnDevice:
    """A ``prepare_batch`` for :class:`medssl.engines.SSLTrainer` that makes the UniMiSS views on the training device:
    the batch (collated by :class:`UniMiSSViewsCollate` without ``augment``) moved to the device, then
    :func:`make_views` outside autocast -- :class:`medssl.engines.trainer.AugmentOnDevice` for batches with extents
    and 3D lists."""

    def __init__(self, augment: BatchedUniMiSSViews, image_key: str = "image", seed_key: str = "seed",
                 extent_key: str = "extent", out_key: str = "crops") -> None:
        self.augment = augment
        self.image_key, self.seed_key, self.extent_key, self.out_key = image_key, seed_key, extent_key, out_key

    def __call__(self, batchdata: Any, device: torch.device | str, non_blocking: bool = False, **kwargs) -> Any:
        batch = dict(to_device(batchdata, device, non_blocking))
        with torch.no_grad():
            return make_views(batch, self.augment, self.image_key, self.seed_key, self.extent_key, self.out_key)


def output_is_finite(output: Any, key: str = "loss") -> bool:
    """False when ``key`` of the engine output (see :func:`get_output_value`) is a NaN or an infinity; True when it
    is finite or absent."""
    value = get_output_value(output, key)
    if value is None:
        return True
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, RuntimeError):
        return True


def epoch_sampler(data_loader: Any) -> Any:
    """The sampler whose ``set_epoch`` fixes the order of an epoch: ``data_loader.batch_sampler`` when it has
    ``set_epoch`` (the medssl samplers), else ``data_loader.sampler`` when it has (``DistributedSampler``), else
    None."""
    for attr in ("batch_sampler", "sampler"):
        sampler = getattr(data_loader, attr, None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            return sampler
    return None


def epoch_started_fresh(engine: Engine) -> bool:
    """At Events.EPOCH_STARTED: True when the epoch starts from its first batch, False for the partial epoch a
    resumed run continues (the epoch's start-of-epoch work, e.g. a k-means, was done before the checkpoint)."""
    epoch_length = engine.state.epoch_length
    return not epoch_length or engine.state.iteration % epoch_length == 0


class _EpochData:
    """What the engine iterates: one pass per epoch over the loader, positioned by the engine's state.

    ``iter()`` is called by Ignite at the first batch of each epoch (after Events.EPOCH_STARTED) and, on a resumed
    run, for the partial epoch: it sets the sampler's epoch, skips the batches already done in that epoch, and
    stops after the epoch's remaining ``epoch_length - offset`` batches.
    """

    def __init__(self, engine: Engine, data_loader: Iterable, epoch_length: int) -> None:
        self.engine = engine
        self.data_loader = data_loader
        self.epoch_length = int(epoch_length)
        self._warned = False

    def __len__(self) -> int:
        return self.epoch_length

    def __iter__(self) -> Iterator:
        state = self.engine.state
        epoch_index = max(int(state.epoch) - 1, 0)
        offset = max(int(state.iteration) - epoch_index * self.epoch_length, 0)
        if offset >= self.epoch_length:  # defensive: never start past the end of the epoch
            offset = 0
        sampler = epoch_sampler(self.data_loader)
        if sampler is not None:
            sampler.set_epoch(epoch_index)
        if offset and sampler is not None and hasattr(sampler, "skip_batches"):
            sampler.skip_batches(offset)
            iterator = iter(self.data_loader)
        else:
            iterator = iter(self.data_loader)
            if offset:
                if not self._warned:
                    logger.warning(
                        f"resuming inside epoch {epoch_index + 1}: the data loader's sampler has no skip_batches(), "
                        f"so the {offset} batches already done in this epoch are loaded and dropped "
                        "(the same batches only if the sampler's order is a function of its epoch)"
                    )
                    self._warned = True
                for _ in itertools.islice(iterator, offset):
                    pass
        return itertools.islice(iterator, self.epoch_length - offset)


def _resolve_amp_dtype(amp_dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(amp_dtype, torch.dtype):
        if amp_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype={amp_dtype}: expected torch.bfloat16 or torch.float16")
        return amp_dtype
    key = str(amp_dtype).lower().replace("torch.", "")
    if key not in _AMP_DTYPES:
        raise ValueError(f"amp_dtype={amp_dtype!r}: expected one of {sorted(_AMP_DTYPES)}")
    return _AMP_DTYPES[key]


def sync_batchnorm_layers(
    method: nn.Module, enabled: bool, device: torch.device, distributed: bool | None = None
) -> int:
    """Turn ``method``'s BatchNorm layers into ``torch.nn.SyncBatchNorm`` in place (same parameters and statistics, so
    the optimiser's references stay valid) when ``enabled`` in a distributed run on CUDA; returns how many were
    converted. torch's SyncBatchNorm runs on GPUs only: on CPU (gloo) nothing changes, with a log line."""
    distributed = is_distributed() if distributed is None else distributed
    if not enabled or not distributed:
        return 0
    if torch.device(device).type != "cuda":
        logger.info("sync_batchnorm: needs CUDA; on %s each rank normalises over its own batch", torch.device(device))
        return 0
    count = 0
    for name, child in list(method.named_children()):
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(child)
        count += sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
        if converted is not child:  # a BatchNorm child itself is replaced; deeper ones are converted in place
            setattr(method, name, converted)
    logger.info("sync_batchnorm: %d BatchNorm layers normalise over the global batch", count)
    return count


def _optional_bool(value: Any, key: str) -> bool | None:
    """None (also the command line's "none" / "null" / "auto") stays None (= the device's default); anything else
    through :func:`medssl.bundle.as_bool`."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "auto")):
        return None
    return as_bool(value, key)


class SSLTrainer(Trainer):
    """Ignite / MONAI training engine for a :class:`medssl.methods.SSLMethod` (see the module docstring for one
    iteration, the epoch / data order and the resume behaviour).

    Args:
        device: where the method and the batches go (``medssl.engines.local_device()`` under torchrun).
        max_epochs: number of epochs.
        data_loader: a DataLoader (typically with a medssl batch sampler over a ``SeededDataset``).
        method: the ``SSLMethod`` (any module whose forward(batch) returns a dict with ``"loss"``). It is moved to
            ``device`` and, when the default process group has more than one rank, wrapped in
            ``DistributedDataParallel`` (``engine.network``; ``engine.method`` stays the unwrapped module).
        optimizer: the optimiser over ``method``'s parameters (e.g. built from ``method.parameter_groups()``).
        epoch_length: batches per epoch; default ``len(data_loader)``; at most that.
        amp: mixed precision (CUDA only; on CPU turned off with a log line). Default None: on with CUDA (bf16
            autocast with the default ``amp_dtype``), off on other devices.
        amp_dtype: ``"bfloat16"`` (default; no scaler) or ``"float16"`` (with a ``GradScaler``, ``engine.scaler``).
        channels_last: put a method with 2D convolutions and the 4-D tensors of each batch in
            ``torch.channels_last`` memory format. Default None: on with CUDA, off on other devices.
        compile: run the method's ``backbone`` through ``torch.compile`` (:func:`compile_backbone`: eager
            fallback with a one-line warning when compiling fails). Default False.
        compile_kwargs: keyword arguments for ``torch.compile`` (e.g. ``{"mode": "max-autotune"}``).
        clip_grad_norm: max total L2 norm of the gradients (after unscaling); None = no clipping.
        accumulate_grad_batches: batches whose gradients are summed (loss / window) before one optimiser step;
            windows restart at each epoch (the last one of an epoch may be shorter).
        find_unused_parameters: passed to ``DistributedDataParallel``.
        sync_batchnorm: in a distributed CUDA run, BatchNorm layers normalise over the global batch
            (:func:`sync_batchnorm`, torch's ``SyncBatchNorm``, as the SwAV reference's ``--sync_bn``); default False:
            each rank over its own batch, so N processes do not equal one. Ignored, with a log line, on CPU.
        handlers: objects with ``attach(engine)``, attached in order after the engine is set up.
        prepare_batch: ``f(batchdata, device, non_blocking) -> batch`` given to the method; default moves all tensors.
        non_blocking: passed to ``prepare_batch``.
        reduce_outputs: average the scalar outputs over the ranks (one small all-reduce per iteration).
        ddp_kwargs: more keyword arguments for ``DistributedDataParallel``.

    Attributes read by handlers: ``method``, ``network``, ``optimizer``, ``scaler``, ``data_loader``, ``amp``,
    ``amp_dtype``, ``channels_last``, ``compiled``; ``engine.state.optimizer_stepped`` (whether the last iteration
    stepped the optimiser).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        data_loader: Iterable,
        method: nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch_length: int | None = None,
        amp: bool | str | None = None,
        amp_dtype: str | torch.dtype = "bfloat16",
        channels_last: bool | str | None = None,
        compile: bool | str = False,
        compile_kwargs: dict | None = None,
        clip_grad_norm: float | None = None,
        accumulate_grad_batches: int = 1,
        find_unused_parameters: bool = False,
        sync_batchnorm: bool | str = False,
        handlers: Sequence | None = None,
        prepare_batch: Callable = default_prepare_batch,
        non_blocking: bool = False,
        reduce_outputs: bool = True,
        ddp_kwargs: dict | None = None,
    ) -> None:
        device = torch.device(device)
        if accumulate_grad_batches < 1:
            raise ValueError(f"SSLTrainer: accumulate_grad_batches={accumulate_grad_batches} must be >= 1")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"SSLTrainer: clip_grad_norm={clip_grad_norm} must be > 0 or None")
        loader_length = None
        try:
            loader_length = len(data_loader)  # type: ignore[arg-type]
        except TypeError:
            pass
        if epoch_length is None:
            if loader_length is None:
                raise ValueError("SSLTrainer: the data loader has no len(); give epoch_length")
            epoch_length = loader_length
        if loader_length is not None and epoch_length > loader_length:
            raise ValueError(
                f"SSLTrainer: epoch_length={epoch_length} is larger than the data loader's {loader_length} batches "
                "per epoch"
            )
        dtype = _resolve_amp_dtype(amp_dtype)
        amp = _optional_bool(amp, "amp")
        if amp is None:
            amp = device.type == "cuda"
        channels_last = _optional_bool(channels_last, "channels_last")
        if channels_last is None:
            channels_last = device.type == "cuda"
        compile = as_bool(compile, "compile")
        if amp and device.type != "cuda":
            logger.info(
                f"amp=True ignored on device {device}: mixed precision is used on CUDA only; training in float32"
            )
            amp = False

        method = method.to(device)
        if channels_last and not has_conv2d(method):
            logger.info(f"channels_last: {type(method).__name__} has no 2D convolution; memory format left as is")
            channels_last = False
        if channels_last:
            _params_channels_last(method)
        compiled = False
        if compile:
            target = getattr(method, "backbone", None)
            target = target if isinstance(target, nn.Module) else method
            compiled = compile_backbone(target, **dict(compile_kwargs or {}))
        network: nn.Module = method
        self.sync_batchnorm = sync_batchnorm_layers(method, as_bool(sync_batchnorm, "sync_batchnorm"), device)
        if is_distributed():
            kwargs = dict(ddp_kwargs or {})
            kwargs.setdefault("find_unused_parameters", find_unused_parameters)
            if device.type == "cuda":
                kwargs.setdefault("device_ids", [device])
                kwargs.setdefault("output_device", device)
            network = nn.parallel.DistributedDataParallel(method, **kwargs)

        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            handlers=None,
            amp=amp,
            decollate=False,
        )
        self.method = method
        self.network = network
        self.optimizer = optimizer
        self.amp_dtype = dtype
        self.channels_last = bool(channels_last)
        self.compiled = compiled
        self.clip_grad_norm = clip_grad_norm
        self.accumulate_grad_batches = int(accumulate_grad_batches)
        self.reduce_outputs = reduce_outputs
        self.scaler = torch.amp.GradScaler(device.type) if amp and dtype == torch.float16 else None
        self._epoch_data = _EpochData(self, data_loader, epoch_length)
        self.state.optimizer_stepped = True
        self.state.last_checkpoint = None

        self.add_event_handler(Events.STARTED, self._on_started)
        self.add_event_handler(Events.EPOCH_STARTED, self._on_epoch_started)
        self.add_event_handler(Events.ITERATION_STARTED, self._on_iteration_started)
        if handlers is not None:
            self._register_handlers(handlers)

    # ------------------------------------------------------------------ events
    def _on_started(self, engine: Engine) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        hook = getattr(self.method, "on_train_start", None)
        if hook is not None:
            hook(engine)

    def _on_epoch_started(self, engine: Engine) -> None:
        hook = getattr(self.method, "on_epoch_start", None)
        if hook is not None and epoch_started_fresh(engine):
            hook(engine)

    def _on_iteration_started(self, engine: Engine) -> None:
        hook = getattr(self.method, "on_iteration_start", None)
        if hook is not None:
            hook(engine)

    # ------------------------------------------------------------------ run
    def run(self) -> None:  # type: ignore[override]
        """Train from the engine's state (iteration 0, or the one a CheckpointHandler restored) to ``max_epochs``."""
        state = self.state
        if not state.epoch_length:
            warnings.warn("SSLTrainer: the data loader is empty (epoch_length 0); nothing to train")
            return
        total = state.epoch_length * state.max_epochs
        if state.iteration >= total:
            logger.info(
                f"training already complete: iteration {state.iteration} of {total} (max_epochs {state.max_epochs} "
                f"x {state.epoch_length} iterations); nothing to do"
            )
            return
        Engine.run(self, data=self._epoch_data, max_epochs=state.max_epochs)

    # ------------------------------------------------------------------ one iteration
    def _accumulation_window(self, iteration: int) -> tuple[bool, int]:
        """(whether iteration ``iteration`` (1-based) steps the optimiser, number of batches in its window)."""
        n = self.accumulate_grad_batches
        if n == 1:
            return True, 1
        epoch_length = self.state.epoch_length
        pos = (iteration - 1) % epoch_length
        start = (pos // n) * n
        window = min(n, epoch_length - start)
        return pos - start + 1 == window, window

    def _iteration(self, engine: Engine, batchdata: Any) -> StepOutput:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("SSLTrainer: the data loader gave no batch for this iteration")
        batch = self.prepare_batch(batchdata, self.state.device, self.non_blocking)
        if self.channels_last:
            batch = to_channels_last(batch)
        step, window = self._accumulation_window(self.state.iteration)
        is_ddp = isinstance(self.network, nn.parallel.DistributedDataParallel)
        sync_context = self.network.no_sync() if (is_ddp and not step) else contextlib.nullcontext()
        self.network.train()
        with sync_context:
            with torch.autocast(device_type=self.state.device.type, dtype=self.amp_dtype, enabled=self.amp):
                outputs = self.network(batch)
            loss = self._check_outputs(outputs)
            self.state.output = outputs
            self.fire_event(IterationEvents.FORWARD_COMPLETED)
            self.fire_event(IterationEvents.LOSS_COMPLETED)
            scaled = loss.float() / window
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        self.fire_event(IterationEvents.BACKWARD_COMPLETED)

        grad_norm = None
        if step:
            if self.clip_grad_norm is not None:
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
                grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.state.optimizer_stepped = step
        self.fire_event(IterationEvents.MODEL_COMPLETED)
        return self._make_output(outputs, grad_norm)

    def _check_outputs(self, outputs: Any) -> torch.Tensor:
        name = type(self.method).__name__
        if not isinstance(outputs, Mapping) or "loss" not in outputs:
            keys = list(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise TypeError(f"{name}.training_step must return a dict with a 'loss' entry first; got {keys}")
        loss = outputs["loss"]
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TypeError(f"{name}.training_step: 'loss' must be a scalar tensor, got {got}")
        if not loss.requires_grad:
            raise RuntimeError(
                f"{name}.training_step: 'loss' does not require grad (detached, or computed under torch.no_grad?)"
            )
        return loss.reshape(())

    def _make_output(self, outputs: Mapping, grad_norm: torch.Tensor | None) -> StepOutput:
        items = [("loss", outputs["loss"])] + [(k, v) for k, v in outputs.items() if k != "loss"]
        if grad_norm is not None:
            items.append(("grad_norm", grad_norm))
        scalar_keys, scalars, record = [], [], {}
        for key, value in items:
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                scalar_keys.append(key)
                scalars.append(value.detach().reshape(()).float())
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                scalar_keys.append(key)
                scalars.append(torch.tensor(float(value), device=self.state.device))
            elif isinstance(value, torch.Tensor):
                record[key] = value.detach()
            else:
                record[key] = value
        values: list[float] = []
        if scalars:
            stacked = torch.stack([s.to(self.state.device) for s in scalars])
            if self.reduce_outputs and is_distributed():
                all_reduce_sum(stacked)
                stacked /= get_world_size()
            values = stacked.tolist()
        ordered = {k: v for k, v in zip(scalar_keys, values)}
        ordered.update(record)
        ordered = {k: ordered[k] for k, _ in items}  # keep the method's key order, "loss" first
        return StepOutput([ordered])

    # ------------------------------------------------------------------ helpers
    def current_lr(self) -> float:
        """Learning rate of the optimiser's first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])
