"""Per-case segmentation metrics for the segmentation bundles' validation and evaluation runs.

:class:`SegmentationMetricsHandler` attaches to a MONAI ``SupervisedEvaluator`` whose post-processing gives one-hot
``pred`` and ``label`` per case (``(K, *spatial)``, background channel 0; volumes ``(K, X, Y, Z)`` with the depth
axis last). After each iteration it computes Dice, IoU and (optionally) HD95 per foreground class of every case with
:func:`medssl.evaluation.metrics.segmentation_case_metrics` (HD95 in the voxel spacing of the label's metadata, mm
for NIfTI / DICOM); when the evaluator's (single) epoch completes it writes ``<output_dir>/<name>.csv`` (one row
per case: ``case``, then ``dice/<class>``, ``iou/<class>``, ``hd95/<class>`` and their means) and
``<output_dir>/<name>_summary.json`` (mean / std / median / count of every column) through
:func:`medssl.evaluation.metrics.write_metric_reports`, and puts the means into ``engine.state.metrics``
(``<prefix>dice/<class>``, ``<prefix>dice_mean``...) so MONAI's ``StatsHandler`` and checkpoint savers see them.

The training configs use it on the validation evaluator (Dice / IoU per class, no HD95, every ``val_interval``
epochs), the evaluate configs on the test set (with HD95).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from medssl.evaluation.metrics import segmentation_case_metrics, summarise_rows, write_metric_reports
from medssl.utils.dist import is_main_process

__all__ = ["SegmentationMetricsHandler", "case_name"]

logger = logging.getLogger(__name__)


def case_name(sample: dict, index: int, keys: Sequence[str] = ("image", "label")) -> str:
    """The case's source file (``filename_or_obj`` of the image's, else the label's, MONAI metadata); ``case_<index>``
    when neither has one."""
    for key in keys:
        meta = getattr(sample.get(key), "meta", None) or sample.get(f"{key}_meta_dict") or {}
        name = meta.get("filename_or_obj") if isinstance(meta, dict) else None
        if name:
            return str(name[0] if isinstance(name, (list, tuple)) else name)
    return f"case_{index:04d}"


def _spacing(label: Any, spatial_dims: int) -> list[float] | None:
    pixdim = getattr(label, "pixdim", None)
    if pixdim is None:
        return None
    values = [float(v) for v in torch.as_tensor(pixdim).flatten().tolist()][:spatial_dims]
    if len(values) != spatial_dims or not all(math.isfinite(v) and v > 0 for v in values):
        return None
    return values


class SegmentationMetricsHandler:
    """Per-case Dice / IoU / HD95 per class of an evaluator's outputs, written as CSV + summary JSON.

    Args:
        class_names: the K channel names, background first (``pred`` / ``label`` channel order).
        output_dir: where the reports go (rank 0 writes; created when needed).
        name: file stem: ``<name>.csv`` and ``<name>_summary.json``.
        include_hd95: compute the 95th-percentile Hausdorff distance too (slower; the evaluation default).
        use_spacing: HD95 in the label's voxel spacing (``MetaTensor.pixdim``, e.g. mm) instead of voxels.
        pred_key / label_key: keys of the one-hot (K, *spatial) prediction and reference in each decollated output.
        metric_prefix: prefix of the means put into ``engine.state.metrics`` (e.g. ``"val_"``).
        write_every_run: write the files at every completion (validation rounds overwrite them), else only once.

    Attributes: ``rows`` (the last run's per-case rows), ``summary`` (the last run's column means).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        output_dir: str | Path,
        name: str = "metrics",
        include_hd95: bool = True,
        use_spacing: bool = True,
        pred_key: str = "pred",
        label_key: str = "label",
        metric_prefix: str = "",
        write_every_run: bool = True,
    ) -> None:
        if len(class_names) < 2:
            raise ValueError(
                f"SegmentationMetricsHandler: class_names={list(class_names)} needs the background and at least one "
                "foreground class"
            )
        self.class_names = [str(c) for c in class_names]
        self.output_dir = Path(output_dir)
        self.name = name
        self.include_hd95 = include_hd95
        self.use_spacing = use_spacing
        self.pred_key, self.label_key = pred_key, label_key
        self.metric_prefix = metric_prefix
        self.write_every_run = write_every_run
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, float] = {}
        self._written = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._finish)  # before StatsHandler's print when listed first

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        outputs = engine.state.output
        if isinstance(outputs, dict):
            raise ValueError(
                "SegmentationMetricsHandler: the evaluator's output is not decollated (one dict per case); keep "
                "decollate=True on the evaluator"
            )
        for sample in outputs:
            if self.pred_key not in sample or self.label_key not in sample:
                raise KeyError(
                    f"SegmentationMetricsHandler: an evaluator output has no {self.pred_key!r} / {self.label_key!r}; "
                    f"its keys are {sorted(sample)}"
                )
            pred, label = sample[self.pred_key], sample[self.label_key]
            spatial_dims = label.dim() - 1
            spacing = _spacing(label, spatial_dims) if self.use_spacing else None
            metrics = segmentation_case_metrics(
                pred.detach().cpu(),
                label.detach().cpu(),
                class_names=self.class_names,
                spacing=spacing,
                include_hd95=self.include_hd95,
            )
            self.rows.append({"case": case_name(sample, len(self.rows)), **metrics})

    def _finish(self, engine: Engine) -> None:
        summary = summarise_rows(self.rows)
        self.summary = {key: stats["mean"] for key, stats in summary.items()}
        for key, value in self.summary.items():
            engine.state.metrics[f"{self.metric_prefix}{key}"] = value
        shown = {k: v for k, v in self.summary.items() if k.endswith("_mean") or k.startswith("dice/")}
        text = ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
        logger.info(f"{self.name}: {len(self.rows)} cases: {text}")
        if is_main_process() and (self.write_every_run or not self._written):
            csv_path, json_path = write_metric_reports(self.rows, summary, self.output_dir, name=self.name)
            self._written = True
            logger.info(f"{self.name}: per-case metrics {csv_path}, summary {json_path}")

