"""Training and validation plumbing of the detection bundle: :class:`DetectionTask` (the loss of one batch for
medssl's engine), the collate function and the evaluator's ``prepare_batch``.

Batches are lists of items (``collate_detection``: images of one batch may carry different numbers of boxes), each
``{"image": (C, X, Y), "boxes": (G, 4) [x1, y1, x2, y2] in array order, "labels": (G,)}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from medssl.downstream.task import SupervisedTask
from medssl.utils.tensors import as_plain_tensor

__all__ = ["DetectionTask", "collate_detection", "prepare_detection_batch", "detection_targets"]

logger = logging.getLogger(__name__)


def collate_detection(items: Sequence[Any]) -> list:
    """A batch as the list of its items (MONAI's ``no_collation``); nested lists of items (from transforms that
    return several samples) are flattened."""
    out: list = []
    for item in items:
        out.extend(item if isinstance(item, (list, tuple)) else [item])
    return out


def detection_targets(items: Sequence[Mapping[str, Any]], device: torch.device | str | None = None,
                      box_key: str = "boxes", label_key: str = "labels") -> list[dict[str, torch.Tensor]]:
    """``[{"boxes": (G, 4) float32, "labels": (G,) int64}]`` of a list of items; an item without boxes gets a
    (0, 4) tensor (an image without findings)."""
    targets = []
    for item in items:
        boxes = torch.as_tensor(as_plain_tensor(item.get(box_key, [])), dtype=torch.float32, device=device)
        labels = torch.as_tensor(as_plain_tensor(item.get(label_key, [])), dtype=torch.long, device=device)
        targets.append({"boxes": boxes.reshape(-1, 4), "labels": labels.reshape(-1)})
    return targets


def prepare_detection_batch(batchdata: Sequence[Mapping[str, Any]], device: torch.device | str,
                            non_blocking: bool = False, **kwargs: Any) -> tuple[list, list]:
    """The ``prepare_batch`` of the detection evaluators: ``(images, targets)``, images a list of (C, X, Y) tensors on
    ``device``, targets :func:`detection_targets` plus each item's ``case`` (its image path), ``image_size`` and
    ``box_scale`` (original / network pixel size per axis, from :class:`medssl.detection.transforms.ResizeBoxd`)."""
    images = [as_plain_tensor(item["image"]).to(device=device, non_blocking=non_blocking) for item in batchdata]
    targets = detection_targets(batchdata, device=device)
    for target, item, image in zip(targets, batchdata, images):
        target["case"] = str(item.get("case") or _image_path(item))
        target["image_size"] = tuple(int(s) for s in image.shape[1:])
        target["box_scale"] = list(item.get("box_scale", [1.0] * (image.dim() - 1)))
    return images, targets


def _image_path(item: Mapping[str, Any]) -> str:
    image = item.get("image")
    meta = getattr(image, "meta", None) or {}
    return str(meta.get("filename_or_obj", "") or item.get("image_path", "?"))


class DetectionTask(SupervisedTask):
    """A RetinaNet detector (MONAI's ``RetinaNetDetector`` around :class:`medssl.detection.ResNetRetinaNet`) as a
    :class:`medssl.downstream.SupervisedTask`: same fine-tuning modes (``finetune`` / ``linear`` / ``scratch``), same
    parameter groups (the encoder at ``encoder_lr_scale``), trained by ``medssl.downstream.SupervisedTrainer``.

    ``training_step(batch)`` (a list of items) returns ``{"loss": classification + box_weight * box regression,
    "cls_loss", "box_loss"}``: the detector's focal-free BCE over the sampled anchors and its smooth-L1 box loss
    (MONAI's defaults), with anchors matched by ATSS and negatives drawn by the hard-negative sampler. When MONAI's
    heads raise on non-finite outputs (a diverged network), the step returns a NaN loss instead, so that the
    engine's ``TerminateOnNanHandler`` stops the run and names the last good checkpoint (every rank alike).
    """

    def __init__(self, detector: nn.Module, *, encoder_prefix: str = "network.feature_extractor.encoder",
                 finetune_mode: str = "finetune", encoder_lr_scale: float = 0.1, box_weight: float = 1.0,
                 image_key: str = "image") -> None:
        super().__init__(detector, _no_loss, image_key=image_key, label_key="boxes", encoder_prefix=encoder_prefix,
                         finetune_mode=finetune_mode, encoder_lr_scale=encoder_lr_scale, metrics="none")
        self.box_weight = float(box_weight)

    def training_step(self, batch: Any) -> dict[str, Any]:
        items = collate_detection(batch) if isinstance(batch, (list, tuple)) else _uncollate(batch)
        device = next(self.network.parameters()).device
        images = [as_plain_tensor(item[self.image_key]).to(device) for item in items]
        targets = detection_targets(items, device=device)
        try:
            losses = self.network(images, targets)
        except ValueError as error:  # MONAI's heads raise on non-finite outputs in training; the engine's NaN stop
            if "NaN or Inf" not in str(error):  # (TerminateOnNanHandler: last good checkpoint named) handles a NaN loss
                raise
            logger.warning(f"DetectionTask: {error} (the network diverged): the step's loss is NaN")
            nan = torch.full((), float("nan"), device=device)
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0  # a loss that requires grad
            return {"loss": zero + nan, "cls_loss": nan, "box_loss": nan}
        cls_loss = losses[self.network.cls_key]
        box_loss = losses[self.network.box_reg_key]
        if not box_loss.requires_grad:  # no positive anchor in the batch (normal images): keep DDP's every-parameter
            box_loss = box_loss + 0.0 * sum(p.sum() for p in self.network.network.regression_head.parameters())
        return {"loss": cls_loss + self.box_weight * box_loss, "cls_loss": cls_loss.detach(),
                "box_loss": box_loss.detach()}


def _no_loss(*_: Any) -> torch.Tensor:  # the detector computes its own losses
    raise RuntimeError("DetectionTask: the detector computes the losses")


def _uncollate(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    raise TypeError("DetectionTask: expected a list of items (DataLoader collate_fn=medssl.detection."
                    f"collate_detection); got a collated {type(batch).__name__} with keys {sorted(batch)}")
