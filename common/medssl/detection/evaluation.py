"""Validation and evaluation of the detection bundle, on MONAI's ``SupervisedEvaluator`` (``decollate=False``,
``prepare_batch=medssl.detection.prepare_detection_batch``, the detector as its network): ``engine.state.output``
holds ``pred`` (the detector's list of ``{"boxes", "labels", "labels_scores"}``) and ``label`` (the targets).

* :class:`DetectionMetric` — the evaluator's key metric (mAP@0.5 by default); it also puts
  mAP@[0.5:0.95] and the mean FROC sensitivity in ``engine.state.metrics``;
* :class:`DetectionReport` — per-image CSV of predictions, summary JSON (mAP per class, FROC) and a PNG of a few
  images with ground-truth and predicted boxes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric

from medssl.evaluation.plots import save_figure
from medssl.utils.dist import is_main_process
from medssl.utils.io import atomic_write_text, json_safe

from .metrics import FROC_RATES, as_numpy_boxes, detection_summary

__all__ = ["DetectionMetric", "DetectionReport", "detection_output", "plot_detections"]

logger = logging.getLogger(__name__)


def detection_output(output: dict) -> tuple[list, list]:
    """``(preds, targets)`` of the evaluator's output (its ``pred`` and ``label``)."""
    return output["pred"], output["label"]


def _records(preds: Sequence[dict], targets: Sequence[dict], score_key: str) -> list[dict[str, Any]]:
    out = []
    for pred, target in zip(preds, targets):
        p = as_numpy_boxes(pred, score_key=score_key)
        t = as_numpy_boxes(target)
        out.append({"case": str(target.get("case", "?")), "pred": p, "gt": t,
                    "scale": np.asarray(target.get("box_scale", [1.0, 1.0]), dtype=np.float64)})
    return out


def _summary(records: list[dict[str, Any]], class_names: Sequence[str], froc_iou: float,
             max_detections: int) -> dict[str, Any]:
    return detection_summary([r["pred"] for r in records], [r["gt"] for r in records], class_names,
                             rates=FROC_RATES, froc_iou=froc_iou, max_detections=max_detections)


class DetectionMetric(Metric):
    """Key metric of the detection evaluators: ``key`` (``map50``, ``map50_95``, ``froc_mean``, ...) of
    :func:`medssl.detection.metrics.detection_summary` over every validation image (as in the other bundles, every
    rank validates on the whole validation set, so every rank gets the same value; nothing is gathered). ``extra``
    summary keys go to ``engine.state.metrics`` as ``<prefix><key>``.
    ``summary`` keeps the last full result."""

    def __init__(self, class_names: Sequence[str], key: str = "map50", extra: Sequence[str] = ("map50_95", "froc_mean"),
                 prefix: str = "val_", froc_iou: float = 0.5, max_detections: int = 100,
                 score_key: str = "labels_scores", output_transform: Callable = detection_output) -> None:
        self.class_names = list(class_names)
        self.key, self.extra, self.prefix = key, tuple(extra), prefix
        self.froc_iou, self.max_detections, self.score_key = float(froc_iou), int(max_detections), score_key
        self.summary: dict[str, Any] = {}
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._records: list[dict[str, Any]] = []

    def update(self, output: tuple[list, list]) -> None:
        preds, targets = output
        self._records.extend(_records(preds, targets, self.score_key))

    def compute(self) -> float:
        self.summary = _summary(self._records, self.class_names, self.froc_iou, self.max_detections)
        value = self.summary[self.key]
        return 0.0 if value != value else float(value)  # NaN (no ground truth at all) -> 0 for the best-model logic

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        for key in self.extra:
            engine.state.metrics[f"{self.prefix}{key}"] = self.summary.get(key)


class DetectionReport:
    """Attach to an evaluator: at the end of its run writes, on rank 0, in ``output_dir``:

    * ``<name>_predictions.csv``: one row per image: ``case``, ``num_gt``, ``num_pred`` (score >= ``min_score``),
      ``max_score``, ``gt`` and ``pred`` as JSON lists of ``[x1, y1, x2, y2, class]`` / ``[..., class, score]``
      (boxes in the original image's pixels: the network-space boxes times the item's ``box_scale``);
    * ``<name>_summary.json``: mAP@0.5 and mAP@[0.5:0.95] over all and per class, FROC sensitivity at
      1/8 .. 8 false positives per image and its mean, the FROC curve, counts, class names;
    * ``<name>_boxes.png``: the first ``figure_images`` images with ground truth (green) and predictions with score
      >= ``figure_min_score`` (red, score written).

    ``with_metrics=False`` (inference, no ground truth): the CSV and the figure only.
    """

    def __init__(self, output_dir: str | os.PathLike, class_names: Sequence[str], name: str = "metrics",
                 froc_iou: float = 0.5, max_detections: int = 100, min_score: float = 0.0,
                 figure_images: int = 6, figure_min_score: float = 0.3, score_key: str = "labels_scores",
                 with_metrics: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.name = name
        self.froc_iou, self.max_detections = float(froc_iou), int(max_detections)
        self.min_score, self.figure_images, self.figure_min_score = float(min_score), int(figure_images), \
            float(figure_min_score)
        self.score_key = score_key
        self.with_metrics = bool(with_metrics)
        self.summary: dict[str, Any] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._records: list[dict[str, Any]] = []
        self._images: list[np.ndarray] = []

    def _collect(self, engine: Engine) -> None:
        preds, targets = detection_output(engine.state.output)
        self._records.extend(_records(preds, targets, self.score_key))
        for image in engine.state.output.get("image", []):
            if len(self._images) < self.figure_images:
                self._images.append(torch.as_tensor(image).detach().float().cpu().numpy()[0])

    def _write(self, engine: Engine) -> None:
        records = self._records
        if self.with_metrics:
            self.summary = _summary(records, self.class_names, self.froc_iou, self.max_detections)
        if not is_main_process():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        summary = {"class_names": self.class_names, "froc_iou": self.froc_iou, **self.summary}
        if self.with_metrics:
            atomic_write_text(self.output_dir / f"{self.name}_summary.json",
                              json.dumps(json_safe(summary), indent=2) + "\n")
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["case", "num_gt", "num_pred", "max_score", "gt", "pred"])
        for r in records:
            keep = r["pred"]["scores"] >= self.min_score
            scale = np.tile(r["scale"], 2)
            gt = [[*np.round(b * scale, 1).tolist(), int(c)] for b, c in zip(r["gt"]["boxes"], r["gt"]["labels"])]
            pred = [[*np.round(b * scale, 1).tolist(), int(c), round(float(s), 4)] for b, c, s in
                    zip(r["pred"]["boxes"][keep], r["pred"]["labels"][keep], r["pred"]["scores"][keep])]
            max_score = float(r["pred"]["scores"].max()) if len(r["pred"]["scores"]) else ""
            writer.writerow([r["case"], len(gt), len(pred), max_score, json.dumps(gt), json.dumps(pred)])
        atomic_write_text(self.output_dir / f"{self.name}_predictions.csv", buffer.getvalue())
        if self._images:
            plot_detections(self._images, self._records[: len(self._images)], self.class_names,
                            self.output_dir / f"{self.name}_boxes.png", self.figure_min_score)
        if self.with_metrics:
            logger.info(
                f"detection: {summary['num_images']} images, mAP@0.5 {summary['map50']:.4f}, mAP@[0.5:0.95] "
                f"{summary['map50_95']:.4f}, FROC mean {summary['froc_mean']:.4f}; {self.output_dir}/{self.name}_*"
            )
        else:
            logger.info(f"detection: predictions of {len(records)} images in {self.output_dir}/{self.name}_*")


def plot_detections(images: Sequence[np.ndarray], records: Sequence[dict[str, Any]], class_names: Sequence[str],
                    out_path: str | os.PathLike, min_score: float = 0.3) -> Path:
    """A PNG of ``images`` (arrays (X, Y), network space: shown with x across and y down) with ground-truth boxes
    (green, class name) and predicted boxes of score >= ``min_score`` (red, class name and score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, image, record in zip(axes[0], images, records):
        ax.imshow(np.asarray(image).T, cmap="gray")  # array (X, Y) -> rows = y, columns = x
        for box, label in zip(record["gt"]["boxes"], record["gt"]["labels"]):
            ax.add_patch(Rectangle((box[0] - 0.5, box[1] - 0.5), box[2] - box[0], box[3] - box[1], fill=False,
                                   edgecolor="lime", linewidth=1.2))
            ax.text(box[0], box[1] - 1, class_names[int(label)], color="lime", fontsize=6)
        pred = record["pred"]
        for box, label, score in zip(pred["boxes"], pred["labels"], pred["scores"]):
            if score < min_score:
                continue
            ax.add_patch(Rectangle((box[0] - 0.5, box[1] - 0.5), box[2] - box[0], box[3] - box[1], fill=False,
                                   edgecolor="red", linewidth=1.0, linestyle="--"))
            ax.text(box[0], box[3] + 5, f"{class_names[int(label)]} {score:.2f}", color="red", fontsize=6)
        ax.set_title(Path(record["case"]).name, fontsize=7)
        ax.axis("off")
    fig.suptitle("ground truth (green), predictions (red, dashed)", fontsize=8)
    try:
        return save_figure(fig, out_path)
    finally:
        plt.close(fig)
