"""The base class of every self-supervised method: a module whose forward is one training step.

A method composes backbone + head(s) + loss and exposes

* ``training_step(batch) -> dict``: the loss of one batch, ``"loss"`` first (a scalar tensor with grad), then any
  other scalar logs (detached tensors or floats); ``forward`` is ``training_step`` so that a
  ``DistributedDataParallel`` wrapper's gradient hooks fire when the engine calls ``network(batch)``;
* ``parameter_groups()``: the optimiser's parameter groups (``"params"`` plus optional ``"name"``, ``"lr_scale"``,
  ``"weight_decay"``, ``"wd_scale"``, read by :class:`medssl.engines.CosineScheduleHandler`);
* optional hooks the engine calls: ``on_train_start(engine)`` (Events.STARTED, also when a run resumes),
  ``on_epoch_start(engine)`` (Events.EPOCH_STARTED, not when a run resumes in the middle of an epoch) and
  ``on_iteration_start(engine)`` (Events.ITERATION_STARTED).

No loop, no I/O, no device placement: the engine (``medssl.engines.SSLTrainer``) moves the batch, runs the step
under autocast, does backward / accumulation / clipping / the optimiser step, and the handlers do the stateful
tricks (EMA teachers, queues, schedules).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from medssl.utils.tensors import as_plain_tensor

__all__ = ["SSLMethod", "build_param_groups", "crops_from_batch", "forward_multi_crop"]


def build_param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    base_lr: float | None = None,
    weight_decay: float | None = None,
    no_decay_bias_norm: bool = True,
    lr_scale: float = 1.0,
    name: str = "",
    exclude: set[int] | None = None,
) -> list[dict[str, Any]]:
    """Optimiser parameter groups for the trainable (``requires_grad``) parameters in ``named_parameters``.

    With ``no_decay_bias_norm`` the parameters with at most one dimension (biases, the weights of normalisation
    layers, scalars such as a learnable temperature) go to a second group ``"<name>no_decay"`` with
    ``"weight_decay": 0.0`` and ``"wd_scale": 0.0`` — :class:`medssl.engines.CosineScheduleHandler` then keeps it at
    zero when it schedules the weight decay. Each group gets ``"name"`` and ``"lr_scale"``; ``"lr"`` =
    ``base_lr * lr_scale`` when ``base_lr`` is given; ``"weight_decay"`` of the decayed group when ``weight_decay``
    is given (otherwise the optimiser's default applies). Empty groups are left out. Parameters whose ``id`` is in
    ``exclude`` are skipped and every taken parameter is added to it (pass one set to several calls so that a
    parameter shared by two sub-modules lands in one group only).
    """
    seen = set() if exclude is None else exclude
    decay, no_decay = [], []
    for _, param in named_parameters:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if no_decay_bias_norm and param.ndim <= 1 else decay).append(param)
    prefix = f"{name}_" if name else ""
    groups: list[dict[str, Any]] = []
    for params, suffix, decayed in ((decay, "decay", True), (no_decay, "no_decay", False)):
        if not params:
            continue
        if not no_decay_bias_norm:
            suffix = "all"
        group: dict[str, Any] = {"params": params, "name": prefix + suffix, "lr_scale": float(lr_scale)}
        if base_lr is not None:
            group["lr"] = float(base_lr) * float(lr_scale)
        if not decayed:
            group["weight_decay"] = 0.0
            group["wd_scale"] = 0.0
        elif weight_decay is not None:
            group["weight_decay"] = float(weight_decay)
        groups.append(group)
    return groups


# --------------------------------------------------------------------------------------------- batch helpers
def crops_from_batch(batch: Mapping[str, Any], crops_key: str, owner: str) -> list[torch.Tensor]:
    """The list of crop tensors ``batch[crops_key]`` (each (B, C, *spatial), the same B), checked."""
    if not isinstance(batch, Mapping) or crops_key not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(f"{owner}: the batch has no {crops_key!r} entry (the list of crops); batch keys: {keys}")
    crops = batch[crops_key]
    if isinstance(crops, torch.Tensor) or not isinstance(crops, (list, tuple)) or not crops:
        raise TypeError(
            f"{owner}: batch[{crops_key!r}] must be a non-empty list of crop tensors (B, C, *spatial), large crops "
            f"first; got {type(crops).__name__}"
        )
    sizes = {int(c.shape[0]) for c in crops}
    if len(sizes) != 1:
        raise ValueError(f"{owner}: the crops hold different batch sizes {[int(c.shape[0]) for c in crops]}")
    return [as_plain_tensor(c) for c in crops]


def forward_multi_crop(backbone: nn.Module, crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """Backbone features of every crop, stacked view-major (V·B, F): one forward per run of consecutive crops of
    the same spatial size (multi-crop: 2 large + N small crops give two forwards)."""
    features, start = [], 0
    while start < len(crops):
        end = start + 1
        while end < len(crops) and crops[end].shape[1:] == crops[start].shape[1:]:
            end += 1
        features.append(backbone(torch.cat(list(crops[start:end]), dim=0)))
        start = end
    return torch.cat(features, dim=0) if len(features) > 1 else features[0]


# --------------------------------------------------------------------------------------------- base class
class SSLMethod(nn.Module, abc.ABC):
    """Base class of the self-supervised methods (see the module docstring for the protocol).

    Subclasses implement :meth:`training_step`; they override :meth:`parameter_groups` to give a part of the model
    its own learning-rate scale (e.g. SwAV's prototypes) and the hooks when they hold state that follows the run.
    Hooks that initialise state (a queue, prototypes from k-means) should do it only on a fresh run:
    ``engine.state.iteration == 0`` in ``on_train_start`` (a resumed run has the state from the checkpoint).
    """

    @abc.abstractmethod
    def training_step(self, batch: Any) -> dict[str, Any]:
        """One step on ``batch`` (the collated, device-placed sample dict: tensors channels-first, 2D ``(N, C, H, W)``,
        3D ``(N, C, X, Y, Z)`` with the depth axis last; ``"modality"`` a list of str). Returns ``{"loss": scalar
        tensor with grad, <other scalar logs>...}`` with ``"loss"`` as the first key."""

    def forward(self, batch: Any) -> dict[str, Any]:  # noqa: D102 - the engine calls forward so DDP hooks fire
        return self.training_step(batch)

    def parameter_groups(
        self, base_lr: float | None = None, weight_decay: float | None = None, no_decay_bias_norm: bool = True
    ) -> list[dict[str, Any]]:
        """The optimiser's parameter groups: all trainable parameters, split into a decayed group and (with
        ``no_decay_bias_norm``) a ``weight_decay = 0`` group of biases / norm weights (see :func:`build_param_groups`).
        """
        return build_param_groups(
            self.named_parameters(), base_lr=base_lr, weight_decay=weight_decay, no_decay_bias_norm=no_decay_bias_norm
        )

    # ------------------------------------------------------------------ hooks (no-ops by default)
    def on_train_start(self, engine: Any) -> None:
        """Called at Events.STARTED, after a checkpoint (if any) was restored; ``engine.state.iteration`` > 0 when
        the run resumes."""

    def on_epoch_start(self, engine: Any) -> None:
        """Called at Events.EPOCH_STARTED (``engine.state.epoch`` is 1-based) of every epoch that starts from its
        first batch; not called for the partial epoch a run resumes in."""

    def on_iteration_start(self, engine: Any) -> None:
        """Called at Events.ITERATION_STARTED (``engine.state.iteration`` is the 1-based index of this step)."""
