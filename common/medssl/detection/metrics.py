"""Detection metrics on per-image predictions and ground truth: COCO mAP per class (MONAI's ``COCOMetric`` on
``matching_batch``) and FROC (sensitivity at fixed false positives per image).

Inputs are per image: predictions ``{"boxes": (D, 4), "labels": (D,), "scores": (D,)}`` and ground truth
``{"boxes": (G, 4), "labels": (G,)}`` (numpy arrays or tensors; boxes ``[x1, y1, x2, y2]`` in pixels, labels
0 .. K-1). An image without findings has G = 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou

__all__ = ["FROC_RATES", "as_numpy_boxes", "match_boxes", "coco_map", "froc", "detection_summary"]

#: false positives per image at which the FROC sensitivity is read (Seed 002; LUNA16's 1/8 .. 8)
FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def _array(value: Any, dtype, shape_tail: tuple[int, ...] = ()) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    out = np.asarray(value if value is not None else [], dtype=dtype)
    if out.size == 0:
        return np.zeros((0, *shape_tail), dtype=dtype)
    return out.reshape(-1, *shape_tail) if shape_tail else out.reshape(-1)


def as_numpy_boxes(record: Mapping[str, Any], score_key: str | None = None) -> dict[str, np.ndarray]:
    """``{"boxes": (N, 4) float64, "labels": (N,) int64[, "scores": (N,) float64]}`` from a prediction / target dict
    (numpy, tensors or lists; an empty entry becomes a (0, 4) array). ``score_key``: the scores' key (MONAI's
    detector writes ``labels_scores``; None: no scores)."""
    out = {"boxes": _array(record.get("boxes"), np.float64, (4,)), "labels": _array(record.get("labels"), np.int64)}
    if score_key is not None:
        out["scores"] = _array(record.get(score_key), np.float64)
        if len(out["scores"]) != len(out["boxes"]):
            raise ValueError(f"{len(out['boxes'])} boxes but {len(out['scores'])} scores")
    if len(out["labels"]) != len(out["boxes"]):
        raise ValueError(f"{len(out['boxes'])} boxes but {len(out['labels'])} labels")
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(box_iou(a, b), dtype=np.float64)


def match_boxes(preds: Sequence[Mapping], targets: Sequence[Mapping], iou_thresholds: Sequence[float],
                max_detections: int = 100) -> list[dict]:
    """MONAI's ``matching_batch``: per image, per class, which detections match a ground-truth box (greedy by score,
    COCO style) at each IoU threshold."""
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} ground-truth images")
    return matching_batch(
        iou_fn=_iou,
        iou_thresholds=list(iou_thresholds),
        pred_boxes=[p["boxes"] for p in preds],
        pred_classes=[p["labels"] for p in preds],
        pred_scores=[p["scores"] for p in preds],
        gt_boxes=[t["boxes"] for t in targets],
        gt_classes=[t["labels"] for t in targets],
        max_detections=max_detections,
    )


def coco_map(preds: Sequence[Mapping], targets: Sequence[Mapping], class_names: Sequence[str],
             max_detections: int = 100) -> dict[str, float]:
    """mAP@0.5 and mAP@[0.5:0.95] (COCO: 101-point interpolated precision, IoU 0.50, 0.55, ..., 0.95), over all
    classes and per class, with MONAI's ``COCOMetric``: ``{"map50", "map50_95", "map50/<class>",
    "map50_95/<class>"}``. A class without any ground-truth box gets NaN (COCOMetric's -1) and is left out of the
    means over classes (``map50``, ``map50_95``), as in COCO."""
    metric = COCOMetric(classes=list(class_names), iou_list=(0.5,), iou_range=(0.5, 0.95, 0.05),
                        max_detection=(int(max_detections),), per_class=True, verbose=False)
    matches = match_boxes(preds, targets, metric.iou_thresholds, max_detections)
    if not any(matches):  # no prediction and no ground truth at all: COCOMetric has nothing to average
        return {key: float("nan") for key in _map_keys(class_names)}
    raw, _ = metric(matches)
    suffix_range = f"mAP_IoU_0.50_0.95_0.05_MaxDet_{int(max_detections)}"
    suffix_50 = f"AP_IoU_0.50_MaxDet_{int(max_detections)}"

    def value(key: str) -> float:
        v = float(raw[key])
        return float("nan") if v < 0 else v

    out: dict[str, float] = {}
    for name in class_names:
        out[f"map50/{name}"] = value(f"{name}_{suffix_50}")
        out[f"map50_95/{name}"] = value(f"{name}_{suffix_range}")
    # the means over the classes that have ground truth (COCOMetric's own overall value averages in the -1 of the
    # others)
    for metric in ("map50", "map50_95"):
        per_class = [out[f"{metric}/{name}"] for name in class_names]
        valid = [v for v in per_class if not np.isnan(v)]
        out[metric] = float(np.mean(valid)) if valid else float("nan")
    return {key: out[key] for key in _map_keys(class_names)}


def _map_keys(class_names: Sequence[str]) -> list[str]:
    return ["map50", "map50_95"] + [f"{m}/{n}" for n in class_names for m in ("map50", "map50_95")]


def froc(preds: Sequence[Mapping], targets: Sequence[Mapping], rates: Sequence[float] = FROC_RATES,
         iou_threshold: float = 0.5, max_detections: int = 100) -> dict[str, Any]:
    """FROC: sensitivity (matched ground-truth boxes / all ground-truth boxes, every class pooled) against false
    positives per image, with a detection counted true when MONAI's ``matching_batch`` matches it to a ground-truth
    box of its class at IoU >= ``iou_threshold``.

    Returns ``{"sensitivity@<rate>": ..., "froc_mean": mean over rates, "curve": [(fp_per_image, sensitivity), ...]}``;
    the sensitivity at a rate r is the highest sensitivity among the operating points (one per distinct score
    threshold, the lowest score included) with at most r false positives per image. NaN without ground truth.
    """
    # ours adds over monai.metrics.froc (interpolated, lowest score dropped): IoU matching per class, step read-out
    matches = match_boxes(preds, targets, [float(iou_threshold)], max_detections)
    num_images = len(targets)
    num_gt = int(sum(len(t["boxes"]) for t in targets))
    scores, is_tp = [], []
    for image in matches:
        for result in image.values():
            keep = ~result["dtIgnore"][0].astype(bool)
            scores.append(result["dtScores"][keep])
            is_tp.append(result["dtMatches"][0].astype(bool)[keep])
    scores_all = np.concatenate(scores) if scores else np.zeros(0)
    tp_all = np.concatenate(is_tp) if is_tp else np.zeros(0, dtype=bool)
    order = np.argsort(-scores_all, kind="stable")
    scores_all, tp_all = scores_all[order], tp_all[order]
    tps, fps = np.cumsum(tp_all), np.cumsum(~tp_all)
    # operating points: after the last detection of each distinct score (ties enter together), plus "nothing kept"
    last_of_score = np.r_[scores_all[1:] != scores_all[:-1], True] if len(scores_all) else np.zeros(0, dtype=bool)
    fp_rate = np.r_[0.0, fps[last_of_score] / max(num_images, 1)]
    sens = np.r_[0.0, tps[last_of_score] / num_gt] if num_gt else np.full(int(last_of_score.sum()) + 1, np.nan)
    out: dict[str, Any] = {}
    for rate in rates:
        ok = fp_rate <= rate + 1e-12
        out[f"sensitivity@{rate:g}"] = float(np.max(sens[ok])) if num_gt else float("nan")
    out["froc_mean"] = float(np.mean([out[f"sensitivity@{rate:g}"] for rate in rates]))
    out["curve"] = [(float(f), float(s)) for f, s in zip(fp_rate, sens)]
    return out


def detection_summary(preds: Sequence[Mapping], targets: Sequence[Mapping], class_names: Sequence[str],
                      rates: Sequence[float] = FROC_RATES, froc_iou: float = 0.5,
                      max_detections: int = 100) -> dict[str, Any]:
    """:func:`coco_map` and :func:`froc` in one dict (the FROC curve under ``"froc_curve"``), plus the counts
    ``num_images``, ``num_gt_boxes``, ``num_pred_boxes``."""
    summary: dict[str, Any] = dict(coco_map(preds, targets, class_names, max_detections))
    result = froc(preds, targets, rates, froc_iou, max_detections)
    summary["froc_curve"] = result.pop("curve")
    summary.update(result)
    summary["num_images"] = len(targets)
    summary["num_gt_boxes"] = int(sum(len(t["boxes"]) for t in targets))
    summary["num_pred_boxes"] = int(sum(len(p["boxes"]) for p in preds))
    return summary
