"""Supervised fine-tuning: one network, one loss (:class:`SupervisedTask`), trained by :class:`SupervisedTrainer`
(medssl's engine under MONAI's name).

A downstream bundle (classification or segmentation) trains ``SupervisedTask(network, loss)``: the task is an
:class:`medssl.methods.SSLMethod`, so the same engine, checkpoint / resume, distributed set-up, schedules and logs
as pretraining serve fine-tuning. ``training_step(batch)`` runs ``network(batch[image_key])`` and
``loss(output, label)``; the network holds its pretrained encoder as the sub-module ``encoder_prefix``
(``"encoder"``), which is what :func:`medssl.weights.load_pretrained_encoder` fills and what ``finetune_mode``
acts on:

* ``"finetune"``: every layer trains; the encoder's parameter groups get ``lr_scale = encoder_lr_scale`` (0.1 by
  default: the pretrained features move slower than the freshly initialised head);
* ``"linear"``: the encoder is frozen — ``requires_grad`` off and kept in eval mode (BatchNorm statistics and
  dropout fixed) even when the task is put in train mode — and only the rest (the head) is optimised. For
  classification the encoder's features can be computed once and cached (``medssl.downstream.linear``): a batch
  holding ``cached_features_key`` (``"features"``) skips the encoder and feeds the features to ``head_name``;
* ``"scratch"``: every layer trains with ``lr_scale`` 1.0 (the random-initialisation baseline; the bundle loads no
  pretrained weights).

Images are channels-first: 2D batches (B, C, H, W), 3D batches (B, C, X, Y, Z) with the depth axis last.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from medssl.engines.trainer import SSLTrainer
from medssl.methods.base import SSLMethod, build_param_groups
from medssl.utils.tensors import as_plain_tensor

__all__ = ["FINETUNE_MODES", "SupervisedTask", "SupervisedTrainer", "check_finetune_mode", "get_submodule"]

#: the values of ``finetune_mode`` every downstream bundle accepts
FINETUNE_MODES = ("finetune", "linear", "scratch")


def check_finetune_mode(mode: str) -> str:
    """``mode`` when it is one of :data:`FINETUNE_MODES`; a ValueError naming the known modes otherwise."""
    if mode not in FINETUNE_MODES:
        raise ValueError(f"finetune_mode={mode!r}: expected one of {list(FINETUNE_MODES)}")
    return mode


def get_submodule(network: nn.Module, prefix: str, owner: str = "SupervisedTask") -> nn.Module:
    """The sub-module of ``network`` at dotted path ``prefix`` (``""`` = the network itself); a clear error when
    there is none."""
    if not prefix:
        return network
    try:
        return network.get_submodule(prefix)
    except AttributeError:
        children = [name for name, _ in network.named_children()]
        raise ValueError(
            f"{owner}: the network ({type(network).__name__}) has no sub-module {prefix!r}; its children are {children}"
        ) from None


class SupervisedTask(SSLMethod):
    """A supervised downstream task on a network with a (pretrained) encoder sub-module.

    Args:
        network: the downstream network (e.g. :class:`medssl.networks.classification.EncoderClassifier` or a
            segmentation network); ``network(images)`` returns the logits the loss takes.
        loss: ``loss(output, target) -> scalar`` (``torch.nn.CrossEntropyLoss``, ``BCEWithLogitsLoss``, MONAI's
            ``DiceCELoss``...).
        image_key / label_key: the batch keys of the input and of the target.
        encoder_prefix: the network's encoder sub-module (``""`` = the whole network is the encoder).
        finetune_mode: ``"finetune"``, ``"linear"`` or ``"scratch"`` (module docstring).
        encoder_lr_scale: learning-rate multiplier of the encoder in ``"finetune"`` mode.
        label_transform: ``f(label_tensor) -> target`` applied before the loss (e.g. ``lambda y: y.float()`` for
            BCE); default: as collated.
        cached_features_key: a batch with this key holds encoder features computed beforehand (linear mode with
            cached features): the task then runs ``network.<head_name>`` on them instead of the whole network.
        head_name: the sub-module that maps encoder features to logits (used with cached features only).
        metrics: ``"accuracy"`` adds the batch accuracy of single-label classification to the step's logs
            (``"none"`` for segmentation).

    ``training_step(batch) -> {"loss": ..., "accuracy"?: ...}``; :meth:`parameter_groups` gives ``"encoder_*"``
    groups (``lr_scale`` = ``encoder_lr_scale`` / 1.0) and ``"head_*"`` groups (every other trainable parameter,
    ``lr_scale`` 1.0), biases and norm weights without weight decay.
    """

    def __init__(
        self,
        network: nn.Module,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        image_key: str = "image",
        label_key: str = "label",
        encoder_prefix: str = "encoder",
        finetune_mode: str = "finetune",
        encoder_lr_scale: float = 0.1,
        label_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cached_features_key: str = "features",
        head_name: str = "head",
        metrics: str = "accuracy",
    ) -> None:
        super().__init__()
        self.finetune_mode = check_finetune_mode(finetune_mode)
        if encoder_lr_scale <= 0:
            raise ValueError(f"SupervisedTask: encoder_lr_scale={encoder_lr_scale} must be > 0")
        if metrics not in ("accuracy", "none"):
            raise ValueError(f"SupervisedTask: metrics={metrics!r}; expected 'accuracy' or 'none'")
        self.network = network
        self.loss = loss
        self.image_key, self.label_key = image_key, label_key
        self.encoder_prefix = encoder_prefix
        self.encoder_lr_scale = float(encoder_lr_scale) if finetune_mode == "finetune" else 1.0
        self.label_transform = label_transform
        self.cached_features_key = cached_features_key
        self.head_name = head_name
        self.metrics = metrics
        encoder = self.encoder  # checks the prefix now, not at the first step
        if self.finetune_mode == "linear":
            encoder.requires_grad_(False)
            encoder.eval()

    # ------------------------------------------------------------------ parts
    @property
    def encoder(self) -> nn.Module:
        """The network's encoder sub-module (``encoder_prefix``)."""
        return get_submodule(self.network, self.encoder_prefix)

    def _encoder_prefix_dot(self) -> str:
        return f"network.{self.encoder_prefix}." if self.encoder_prefix else "network."

    def train(self, mode: bool = True) -> "SupervisedTask":
        """As ``nn.Module.train``; in ``"linear"`` mode the frozen encoder stays in eval mode."""
        super().train(mode)
        if self.finetune_mode == "linear":
            self.encoder.eval()
        return self

    # ------------------------------------------------------------------ step
    def logits(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The network's output for a batch: ``network(batch[image_key])``, or ``network.<head_name>(features)`` when
        the batch holds cached encoder features."""
        if self.cached_features_key and self.cached_features_key in batch:
            if self.finetune_mode != "linear":
                raise ValueError(
                    f"SupervisedTask: the batch holds cached encoder features ({self.cached_features_key!r}) but "
                    f"finetune_mode={self.finetune_mode!r}; cached features only make sense with a frozen encoder "
                    "(finetune_mode='linear')"
                )
            head = get_submodule(self.network, self.head_name)
            return head(as_plain_tensor(batch[self.cached_features_key]))
        if self.image_key not in batch:
            raise KeyError(f"SupervisedTask: the batch has no {self.image_key!r}; its keys are {sorted(batch)}")
        return self.network(as_plain_tensor(batch[self.image_key]))

    def target(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The loss target: ``label_transform(batch[label_key])`` (as collated when no transform is given)."""
        if self.label_key not in batch:
            raise KeyError(f"SupervisedTask: the batch has no {self.label_key!r}; its keys are {sorted(batch)}")
        label = as_plain_tensor(batch[self.label_key])
        if not isinstance(label, torch.Tensor):
            label = torch.as_tensor(label)
        return self.label_transform(label) if self.label_transform is not None else label

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """``{"loss": loss(logits, target), "accuracy": batch accuracy}`` (accuracy only for single-label
        classification logits (B, C) with integer targets (B,))."""
        logits = self.logits(batch)
        target = self.target(batch).to(logits.device)
        loss = self.loss(logits, target)
        out: dict[str, Any] = {"loss": loss}
        if (
            self.metrics == "accuracy"
            and logits.dim() == 2
            and target.dim() == 1
            and not torch.is_floating_point(target)
        ):
            out["accuracy"] = (logits.detach().argmax(dim=1) == target).float().mean()
        return out

    # ------------------------------------------------------------------ optimiser
    def parameter_groups(
        self, base_lr: float | None = None, weight_decay: float | None = None, no_decay_bias_norm: bool = True
    ) -> list[dict[str, Any]]:
        """``encoder_decay`` / ``encoder_no_decay`` groups (``lr_scale`` = the encoder's) and ``head_decay`` /
        ``head_no_decay`` (every other trainable parameter, ``lr_scale`` 1.0); only trainable parameters, so in
        ``"linear"`` mode only the head's. With ``base_lr`` each group's ``"lr"`` is ``base_lr * lr_scale`` (so the
        encoder multiplier applies even without a schedule handler)."""
        prefix = self._encoder_prefix_dot()
        named = list(self.named_parameters())
        encoder_params = [(n, p) for n, p in named if n.startswith(prefix)]
        other_params = [(n, p) for n, p in named if not n.startswith(prefix)]
        seen: set[int] = set()
        groups = build_param_groups(
            encoder_params,
            base_lr=base_lr,
            weight_decay=weight_decay,
            no_decay_bias_norm=no_decay_bias_norm,
            lr_scale=self.encoder_lr_scale,
            name="encoder",
            exclude=seen,
        )
        groups += build_param_groups(
            other_params,
            base_lr=base_lr,
            weight_decay=weight_decay,
            no_decay_bias_norm=no_decay_bias_norm,
            lr_scale=1.0,
            name="head",
            exclude=seen,
        )
        if not groups:
            raise ValueError(f"SupervisedTask ({self.finetune_mode}): the network has no trainable parameter")
        return groups

    def extra_repr(self) -> str:
        return (
            f"finetune_mode={self.finetune_mode!r}, encoder_prefix={self.encoder_prefix!r}, "
            f"encoder_lr_scale={self.encoder_lr_scale}"
        )


class SupervisedTrainer(SSLTrainer):
    """Supervised fine-tuning: medssl's engine under the name and argument names of MONAI's
    ``monai.engines.SupervisedTrainer`` (``train_data_loader``, ``network``, ``loss_function``, ``train_handlers``).

    What ours adds over MONAI's: the engine pretraining uses (:class:`medssl.engines.SSLTrainer`: checkpoints that
    resume exactly mid-epoch, bf16 autocast on CUDA by default, per-rank state, DDP set-up) and the fine-tuning modes
    of :class:`SupervisedTask` (frozen encoder, cached features, the encoder's learning-rate scale).

    Args:
        device, max_epochs, optimizer: as :class:`medssl.engines.SSLTrainer`.
        train_data_loader: the training batches (dicts with ``image`` / ``label``).
        network: a :class:`SupervisedTask` (what the bundles pass: the optimiser and the checkpoints use its
            parameter groups), or a plain network, then wrapped as ``SupervisedTask(network, loss_function,
            encoder_prefix="", finetune_mode="scratch")``.
        loss_function: the loss of a plain ``network``; must be None with a :class:`SupervisedTask` (it has one).
        train_handlers: handlers attached in order (SSLTrainer's ``handlers``).
        kwargs: every other :class:`medssl.engines.SSLTrainer` argument (``amp``, ``amp_dtype``, ``epoch_length``,
            ``clip_grad_norm``, ...).

    ``engine.task`` is the :class:`SupervisedTask` (the same object as ``engine.method``).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Any,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(network, SupervisedTask):
            if loss_function is not None:
                raise ValueError("SupervisedTrainer: give loss_function only with a plain network; the "
                                 "SupervisedTask already has its loss")
            task = network
        elif loss_function is None:
            raise ValueError(f"SupervisedTrainer: network is a plain {type(network).__name__}: give loss_function")
        else:
            task = SupervisedTask(network, loss_function, encoder_prefix="", finetune_mode="scratch")
        super().__init__(device, max_epochs, train_data_loader, task, optimizer, handlers=train_handlers, **kwargs)
        self.task = task
