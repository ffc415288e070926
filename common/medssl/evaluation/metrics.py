"""Downstream metrics: one implementation shared by the classification / segmentation bundles, the probes and DVME.

* :func:`classification_metrics` — AUC (per class and macro; binary, one-vs-rest for multi-class, per label for
  multi-label), accuracy, macro F1 and Cohen's kappa (quadratic-weighted for ordinal grades, as APTOS-style tasks
  report it), computed with scikit-learn's reference implementations.
* :func:`segmentation_case_metrics` — Dice, IoU and HD95 per class of one case, with MONAI's metric functions
  (background channel 0 excluded from the report).
* :func:`write_metric_reports` — a per-case CSV and a summary JSON, written atomically.

A metric that is undefined for the given data (an AUC where only one class is present, an HD95 where the class is
absent from prediction or reference) is reported as NaN in the per-case rows and left out of means, never as 0.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.utils.io import atomic_write_text, json_safe
from medssl.utils.tensors import as_plain_tensor

__all__ = [
    "classification_metrics",
    "segmentation_case_metrics",
    "summarise_rows",
    "write_metric_reports",
]


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = as_plain_tensor(value.detach().cpu()).float().numpy()
    return np.asarray(value)


def _class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names for {num_classes} classes: {names}")
    return names


def classification_metrics(
    probs: Any,
    labels: Any,
    *,
    multi_label: bool = False,
    ordinal: bool = False,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Metrics of a classifier on N cases.

    Args:
        probs: (N, C) class probabilities (softmax for multi-class, sigmoid for multi-label); a binary task may give
            (N, 2) or (N,) / (N, 1) probabilities of the positive class.
        labels: (N,) class indices for multi-class, (N, C) 0/1 for multi-label.
        multi_label: independent labels (sigmoid + BCE tasks such as NIH findings).
        ordinal: classes are ordered grades: Cohen's kappa is quadratic-weighted.
        class_names: names for the per-class keys (default "0", "1", ...).

    Returns ``{"num_cases", "accuracy", "f1_macro", "kappa", "auc_macro", "auc/<class>"...}``. Accuracy of a
    multi-label task is the mean per-label accuracy at 0.5; kappa is omitted for multi-label tasks.
    """
    from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

    p, y = _numpy(probs).astype(np.float64), _numpy(labels)
    if p.ndim == 1 or (p.ndim == 2 and p.shape[1] == 1 and not multi_label):
        p = p.reshape(-1)
        p = np.stack([1.0 - p, p], axis=1)
    if p.ndim != 2:
        raise ValueError(f"classification_metrics: probs must be (N, C); got shape {p.shape}")
    n, c = p.shape
    if len(y) != n:
        raise ValueError(f"classification_metrics: {n} predictions but {len(y)} labels")
    if n == 0:
        raise ValueError("classification_metrics: no cases")
    if not np.all(np.isfinite(p)):
        raise ValueError("classification_metrics: probs contain NaN or inf")
    names = _class_names(c, class_names)
    out: dict[str, float] = {"num_cases": float(n)}
    aucs: list[float] = []
    if multi_label:
        y = y.reshape(n, -1).astype(int)
        if y.shape[1] != c:
            raise ValueError(f"classification_metrics: multi-label labels have {y.shape[1]} columns, probs {c}")
        pred = (p >= 0.5).astype(int)
        out["accuracy"] = float((pred == y).mean())
        out["f1_macro"] = float(f1_score(y, pred, average="macro", zero_division=0))
        for k in range(c):
            auc = float(roc_auc_score(y[:, k], p[:, k])) if len(np.unique(y[:, k])) == 2 else float("nan")
            out[f"auc/{names[k]}"] = auc
            aucs.append(auc)
    else:
        y = y.reshape(-1).astype(int)
        if y.min() < 0 or y.max() >= c:
            raise ValueError(f"classification_metrics: labels must be in 0..{c - 1}; found {sorted(set(y.tolist()))}")
        pred = p.argmax(axis=1)
        out["accuracy"] = float(accuracy_score(y, pred))
        out["f1_macro"] = float(f1_score(y, pred, average="macro", labels=list(range(c)), zero_division=0))
        if len(np.unique(np.concatenate([y, pred]))) > 1:
            kappa = cohen_kappa_score(y, pred, weights="quadratic" if ordinal else None, labels=list(range(c)))
        else:  # one class everywhere: kappa is 0/0
            kappa = float("nan")
        out["kappa"] = float(kappa)
        for k in range(c):  # one-vs-rest; for a binary task class 1's AUC is the task's AUC
            positives = y == k
            auc = float(roc_auc_score(positives, p[:, k])) if 0 < positives.sum() < n else float("nan")
            out[f"auc/{names[k]}"] = auc
            aucs.append(auc)
        if c == 2:
            aucs = [out[f"auc/{names[1]}"]]
    valid = [a for a in aucs if not math.isnan(a)]
    out["auc_macro"] = float(np.mean(valid)) if valid else float("nan")
    return out


def segmentation_case_metrics(
    pred: Any,
    label: Any,
    *,
    class_names: Sequence[str],
    spacing: Sequence[float] | None = None,
    include_hd95: bool = True,
) -> dict[str, float]:
    """Dice, IoU and HD95 per foreground class of ONE case.

    Args:
        pred, label: (C, *spatial) one-hot (or 0/1) tensors, channel 0 = background (not reported); a
            (*spatial) integer map is one-hot encoded with C = len(class_names).
        class_names: the C channel names, background first.
        spacing: voxel spacing for HD95 in mm (default: voxels).

    Returns ``{"dice/<class>", "iou/<class>", "hd95/<class>", "dice_mean", "iou_mean", "hd95_mean"}``; a class
    absent from both prediction and reference has Dice / IoU NaN (not counted), and HD95 is NaN when the class is
    empty in either.
    """
    from monai.metrics import compute_hausdorff_distance, compute_iou, compute_dice

    names = [str(n) for n in class_names]
    num = len(names)

    def one_hot(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == num and num > 1:
            return t
        if t.shape[0] == 1 and num > 1:  # (1, *spatial) integer map
            t = t[0]
        return torch.nn.functional.one_hot(t.round().long().clamp_(0, num - 1), num).movedim(-1, 0)

    p, y = one_hot(torch.as_tensor(_numpy(pred))), one_hot(torch.as_tensor(_numpy(label)))
    if p.shape != y.shape or p.shape[0] != len(names):
        raise ValueError(
            f"segmentation_case_metrics: pred {tuple(p.shape)} and label {tuple(y.shape)} must both be "
            f"(C={len(names)}, *spatial) one-hot"
        )
    p, y = (p > 0.5).float()[None], (y > 0.5).float()[None]
    dice = compute_dice(p, y, include_background=True, ignore_empty=True)[0]
    iou = compute_iou(p, y, include_background=True, ignore_empty=True)[0]
    out: dict[str, float] = {}
    for k in range(1, len(names)):
        out[f"dice/{names[k]}"] = float(dice[k])
        out[f"iou/{names[k]}"] = float(iou[k])
    if include_hd95:
        import warnings

        with warnings.catch_warnings():  # MONAI warns for empty classes; they are reported as NaN below
            warnings.simplefilter("ignore")
            hd = compute_hausdorff_distance(p, y, include_background=True, percentile=95, spacing=spacing)[0]
        for k in range(1, len(names)):
            empty = p[0, k].sum() == 0 or y[0, k].sum() == 0
            out[f"hd95/{names[k]}"] = float("nan") if empty else float(hd[k])
    for metric in ("dice", "iou", "hd95"):
        values = [v for key, v in out.items() if key.startswith(metric + "/") and not math.isnan(v)]
        if metric != "hd95" or include_hd95:
            out[f"{metric}_mean"] = float(np.mean(values)) if values else float("nan")
    return out


def summarise_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, std, median and count (NaN left out) of every numeric column of per-case rows."""
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
                columns.setdefault(key, []).append(float(value))
    summary = {}
    for key, values in columns.items():
        finite = np.array([v for v in values if not math.isnan(v)], dtype=np.float64)
        summary[key] = {
            "mean": float(finite.mean()) if finite.size else float("nan"),
            "std": float(finite.std()) if finite.size else float("nan"),
            "median": float(np.median(finite)) if finite.size else float("nan"),
            "count": int(finite.size),
        }
    return summary


def write_metric_reports(
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any] | None,
    out_dir: str | Path,
    name: str = "metrics",
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.csv`` (one row per case; columns = union of the rows' keys in first-seen order) and
    ``<out_dir>/<name>_summary.json`` (``summary``, or :func:`summarise_rows` of the rows when None; NaN as null).
    Both atomically. Returns the two paths."""
    out_dir = Path(out_dir)
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    csv_path, json_path = out_dir / f"{name}.csv", out_dir / f"{name}_summary.json"
    atomic_write_text(csv_path, buffer.getvalue())
    summary = summarise_rows(rows) if summary is None else summary
    atomic_write_text(json_path, json.dumps(json_safe(dict(summary)), indent=2) + "\n")
    return csv_path, json_path
