"""Evaluation of downstream classifiers: predictions, metrics, per-case reports, validation during training, and the
class-probability CSV of inference.

* :func:`predict_probabilities` runs a network over a loader (every rank its share, gathered, in dataset order —
  :func:`medssl.evaluation.extract_features` does the distributed bookkeeping) and applies softmax (multi-class) or
  sigmoid (multi-label) to the logits;
* :func:`evaluate_classification` turns them into the metrics of
  :func:`medssl.evaluation.metrics.classification_metrics` (the one implementation of AUC / accuracy / F1 / kappa)
  and writes a per-case CSV and a summary JSON
  (:func:`medssl.evaluation.metrics.write_metric_reports`);
* :class:`ClassificationMetric` is the ignite ``Metric`` of the training configs' validation: MONAI's
  ``ValidationHandler`` runs a ``SupervisedEvaluator`` every ``val_every_n_epochs`` epochs, the metric gives the key
  metric (``auc_macro``, ``kappa``...) by which MONAI's ``CheckpointSaver`` keeps the best network as a plain state
  dict — the ``models/model.pt`` of the bundle —, the other metrics (``val_`` prefix) and ``val_log.jsonl``;
* :class:`ClassProbabilityWriter` is a handler of MONAI's ``SupervisedEvaluator`` (inference.json) writing one CSV
  row of class probabilities per image.

Images are channels-first: 2D (B, C, H, W), 3D (B, C, X, Y, Z) with the depth axis last.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from ignite.metrics.metric import EpochWise
from monai.handlers import from_engine

from medssl.evaluation.features import extract_features
from medssl.evaluation.metrics import classification_metrics, write_metric_reports
from medssl.utils.dist import get_rank, get_world_size, is_main_process
from medssl.utils.io import atomic_write_text

__all__ = [
    "Predictions",
    "add_case_ids",
    "predict_probabilities",
    "classification_case_rows",
    "evaluate_classification",
    "ClassificationMetric",
    "ClassProbabilityWriter",
    "load_network_weights",
]

logger = logging.getLogger(__name__)

CASE_KEY = "case"


def add_case_ids(items: Sequence[dict], case_key: str = CASE_KEY, dataset_dir: str | os.PathLike | None = None) -> list:
    """Items with ``case_key`` = the image path (relative to ``dataset_dir`` when given and inside it): the id of
    each row in per-case reports and probability CSVs (it survives the loading transforms and collation as a str)."""
    out = []
    for item in items:
        case = str(item.get("image", ""))
        if dataset_dir is not None:
            try:
                case = str(Path(case).resolve().relative_to(Path(dataset_dir).resolve()))
            except ValueError:
                pass
        out.append({**item, case_key: case})
    return out


@dataclass
class Predictions:
    """Predictions on N cases in dataset order: ``probs`` (N, C) float32, ``labels`` (N,) / (N, C) or None,
    ``cases`` (ids, ``"#<index>"`` when the batches hold none), ``indices`` (dataset index of each row)."""

    probs: torch.Tensor
    labels: torch.Tensor | None
    cases: list[str]
    indices: list[int]


def _activation(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)


def predict_probabilities(
    network: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    data_loader: Any,
    *,
    multi_label: bool = False,
    device: torch.device | str | None = None,
    image_key: str = "image",
    label_key: str | None = "label",
    case_key: str = CASE_KEY,
    amp: bool | str = False,
) -> Predictions:
    """Class probabilities of every item of ``data_loader`` (collective in a distributed run: every rank calls it
    with its share of the items and gets all of them). The network runs in eval mode under no_grad."""
    logits, labels, extras = extract_features(
        network,
        data_loader,
        device=device,
        image_key=image_key,
        label_key=label_key,
        amp=amp,
        extra_keys=(case_key,),
        log_every=0,
        description="predictions",
    )
    indices = extras.get("indices")
    indices = [int(i) for i in indices] if indices is not None else list(range(logits.shape[0]))
    cases = extras.get(case_key)
    if cases is not None and len(cases) == logits.shape[0]:
        cases = [str(c) for c in cases]
    else:
        cases = [f"#{i}" for i in indices]
    return Predictions(_activation(logits, multi_label), labels, cases, indices)


def _label_value(label: torch.Tensor) -> Any:
    if label.dim() == 0:
        return int(label.item()) if not label.is_floating_point() or float(label).is_integer() else float(label)
    return json.dumps([int(v) if float(v).is_integer() else float(v) for v in label.tolist()])


def classification_case_rows(
    predictions: Predictions, class_names: Sequence[str], multi_label: bool = False
) -> list[dict[str, Any]]:
    """One row per case: ``case``, ``label`` (when known), ``predicted`` (class name; for multi-label the ``;``-joined
    names at probability >= 0.5), ``correct`` (single-label, when the label is known), ``prob/<class>``..."""
    names = [str(n) for n in class_names]
    probs = predictions.probs
    if probs.shape[1] != len(names):
        raise ValueError(f"classification_case_rows: {probs.shape[1]} probabilities per case for {len(names)} classes")
    rows = []
    for i, case in enumerate(predictions.cases):
        row: dict[str, Any] = {"case": case}
        if multi_label:
            predicted = ";".join(n for n, p in zip(names, probs[i].tolist()) if p >= 0.5)
        else:
            predicted_index = int(probs[i].argmax())
            predicted = names[predicted_index]
        if predictions.labels is not None:
            row["label"] = _label_value(predictions.labels[i])
        row["predicted"] = predicted
        if predictions.labels is not None and not multi_label:
            row["correct"] = int(int(predictions.labels[i].reshape(-1)[0]) == predicted_index)
        for name, p in zip(names, probs[i].tolist()):
            row[f"prob/{name}"] = float(p)
        rows.append(row)
    return rows


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"class_names {names} has {len(names)} names but the network gives {num_classes} outputs")
    return names


def evaluate_classification(
    network: nn.Module,
    data_loader: Any,
    *,
    output_dir: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    multi_label: bool = False,
    ordinal: bool = False,
    device: torch.device | str | None = None,
    name: str = "metrics",
    amp: bool | str = False,
) -> dict[str, float]:
    """Metrics of ``network`` on the labelled items of ``data_loader``; rank 0 writes ``<output_dir>/<name>.csv``
    (per case: label, prediction, probabilities) and ``<output_dir>/<name>_summary.json`` (the metrics of
    :func:`medssl.evaluation.metrics.classification_metrics`, plus the task description). Returns the metrics."""
    predictions = predict_probabilities(network, data_loader, multi_label=multi_label, device=device, amp=amp)
    if predictions.labels is None:
        raise ValueError(
            "evaluate_classification: the batches hold no numeric 'label'; evaluation needs labelled items"
        )
    names = _class_names(class_names, predictions.probs.shape[1])
    metrics = classification_metrics(
        predictions.probs, predictions.labels, multi_label=multi_label, ordinal=ordinal, class_names=names
    )
    if is_main_process():
        rows = classification_case_rows(predictions, names, multi_label=multi_label)
        summary = dict(metrics)
        summary.update({"class_names": names, "multi_label": bool(multi_label), "ordinal": bool(ordinal)})
        csv_path, json_path = write_metric_reports(rows, summary, output_dir, name=name)
        logger.info(f"evaluation on {len(rows)} cases: {_format_metrics(metrics)}; wrote {csv_path} and {json_path}")
    return metrics


def _format_metrics(metrics: Mapping[str, float]) -> str:
    return " ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "/" not in k and k != "num_cases"
    )


def _stacked(values: Any) -> torch.Tensor:
    """A batch tensor from a batch tensor or from the decollated per-item tensors (``from_engine`` gives lists)."""
    if isinstance(values, (list, tuple)):
        return torch.stack([_stacked(v) for v in values]) if values else torch.empty(0)
    tensor = torch.as_tensor(getattr(values, "as_tensor", lambda: values)())
    return tensor.detach().cpu()


class ClassificationMetric(Metric):
    """Epoch-level classification metrics of a MONAI ``SupervisedEvaluator``, as one ignite ``Metric``.

    What ours adds to MONAI's metrics: :func:`medssl.evaluation.metrics.classification_metrics` (AUC per class /
    macro, F1, quadratic kappa, accuracy; multi-label and ordinal targets) over the items of ALL ranks, gathered
    with ``ignite.distributed.all_gather`` and de-duplicated by dataset index (the padding of a distributed sampler).

    ``update((pred, label))`` takes the class probabilities (softmax / sigmoid of the logits: the evaluator's
    post-processing) and the labels (class indices, or 0/1 vectors when ``multi_label``), as a batch or as the
    decollated per-item lists of ``output_transform`` (default ``monai.handlers.from_engine(["pred", "label"])``).
    The dataset index of each item is read from the evaluator's batch (``index_key``) when every item has one.

    ``compute()`` returns the scalar ``key`` metric (``auc_macro``, ``kappa``, ``accuracy``...: the key metric of
    MONAI's best-model logic, an undefined value (NaN, e.g. an AUC on a single-class set) as -inf so that it ranks
    below every defined one); ``results`` holds all metrics. When attached (``key_val_metric`` of the evaluator),
    every metric also goes into ``engine.state.metrics`` as ``<metric_prefix><name>`` and, with ``output_dir``,
    rank 0 appends one JSON line per run to ``<output_dir>/<log_name>``: ``epoch``, the metrics (NaN as null) and
    ``best`` (whether this run gave the evaluator's best key metric so far).
    """

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        multi_label: bool = False,
        ordinal: bool = False,
        key: str = "auc_macro",
        metric_prefix: str = "val_",
        output_dir: str | os.PathLike | None = None,
        log_name: str = "val_log.jsonl",
        index_key: str | None = "index",
        output_transform: Callable | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        self.multi_label, self.ordinal = bool(multi_label), bool(ordinal)
        self.key, self.metric_prefix = key, metric_prefix
        self.output_dir = Path(output_dir) if output_dir else None
        self.log_name, self.index_key = log_name, index_key
        self.results: dict[str, float] = {}
        super().__init__(output_transform=output_transform or from_engine(["pred", "label"]), device=device)

    def reset(self) -> None:
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._indices: list[int] | None = []

    def update(self, output: Sequence[Any]) -> None:
        probs, labels = _stacked(output[0]).float(), _stacked(output[1])
        if probs.dim() != 2 or labels.shape[0] != probs.shape[0]:
            raise ValueError(
                f"ClassificationMetric: expected (N, C) probabilities and N labels, got {tuple(probs.shape)} and "
                f"{tuple(labels.shape)}"
            )
        self._probs.append(probs)
        self._labels.append(labels.reshape(probs.shape) if self.multi_label else labels.reshape(-1))

    def iteration_completed(self, engine: Engine) -> None:
        before = sum(p.shape[0] for p in self._probs)
        super().iteration_completed(engine)
        indices = self._batch_indices(engine)
        added = sum(p.shape[0] for p in self._probs) - before
        if self._indices is not None and indices is not None and len(indices) == added:
            self._indices.extend(indices)
        else:
            self._indices = None

    def _batch_indices(self, engine: Engine) -> list[int] | None:
        batch = getattr(engine.state, "batch", None)
        if self.index_key is None or batch is None:
            return None
        values = batch.get(self.index_key) if isinstance(batch, Mapping) else [
            b.get(self.index_key) if isinstance(b, Mapping) else None for b in batch
        ]
        try:
            return [int(v) for v in torch.as_tensor(_stacked(values)).reshape(-1).tolist()]
        except (TypeError, ValueError, RuntimeError):
            return None

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.cat(self._probs) if self._probs else torch.empty(0, len(self.class_names or []))
        labels = torch.cat(self._labels) if self._labels else torch.empty(0, dtype=torch.long)
        local = (probs, labels, self._indices)
        parts = idist.all_gather(local) if idist.get_world_size() > 1 else [local]
        probs, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if all(p[2] is not None and len(p[2]) == p[0].shape[0] for p in parts):  # dataset order, each item once
            first: dict[int, int] = {}
            for row, index in enumerate(i for p in parts for i in p[2]):
                first.setdefault(index, row)
            rows = [first[i] for i in sorted(first)]
            probs, labels = probs[rows], labels[rows]
        return probs, labels

    def compute(self) -> float:
        probs, labels = self._gathered()
        if probs.shape[0] == 0:
            raise ValueError("ClassificationMetric: no validation items were seen")
        names = _class_names(self.class_names, probs.shape[1])
        self.results = classification_metrics(
            probs, labels, multi_label=self.multi_label, ordinal=self.ordinal, class_names=names
        )
        if self.key not in self.results:
            raise KeyError(f"ClassificationMetric: key {self.key!r} is not among the metrics {sorted(self.results)}")
        value = float(self.results[self.key])
        return -math.inf if math.isnan(value) else value

    def attach(self, engine: Engine, name: str, usage: Any = EpochWise()) -> None:
        usage = self._check_usage(usage)
        super().attach(engine, name, usage)
        # the log line is written after MONAI's best-metric comparison (registered after the metrics): at the start
        engine.add_event_handler(Events.STARTED, self._attach_log, usage)

    def _attach_log(self, engine: Engine, usage: Any) -> None:
        if not engine.has_event_handler(self._write_log, usage.COMPLETED):
            engine.add_event_handler(usage.COMPLETED, self._write_log)

    def completed(self, engine: Engine, name: str) -> None:
        value = self.compute()
        numeric = {k: float(v) for k, v in self.results.items() if isinstance(v, (int, float))}
        engine.state.metrics.update({f"{self.metric_prefix}{k}": v for k, v in numeric.items()})
        engine.state.metrics[name] = value

    def _write_log(self, engine: Engine) -> None:
        if self.output_dir is None or not is_main_process():
            return
        record: dict[str, Any] = {"epoch": int(engine.state.epoch)}
        record.update({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.results.items()})
        record["best"] = int(getattr(engine.state, "best_metric_epoch", -1)) == int(engine.state.epoch)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / self.log_name, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        logger.info(f"validation epoch {record['epoch']}: {_format_metrics(self.results)}")


class ClassProbabilityWriter:
    """Handler of MONAI's ``SupervisedEvaluator`` writing ``<output_dir>/<filename>``: one row per image — ``case``
    (the item's ``case`` id, else the image file from its meta data), ``predicted`` (class name; multi-label: the
    ``;``-joined names at >= 0.5) and ``prob/<class>`` for every class. The engine's decollated output must hold
    ``pred_key`` = the (C,) class probabilities (post-processing applies the softmax / sigmoid). In a run of several
    ranks each rank writes ``<stem>_rank<r>.csv``."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        filename: str = "probabilities.csv",
        pred_key: str = "pred",
        case_key: str = CASE_KEY,
        multi_label: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = [str(n) for n in class_names]
        self.filename = filename
        self.pred_key, self.case_key = pred_key, case_key
        self.multi_label = bool(multi_label)
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _case_of(self, item: Mapping[str, Any]) -> str:
        if self.case_key in item and item[self.case_key] is not None:
            return str(item[self.case_key])
        image = item.get("image")
        meta = getattr(image, "meta", None) or item.get("image_meta_dict") or {}
        return str(meta.get("filename_or_obj", f"#{len(self.rows)}"))

    def _on_iteration(self, engine: Engine) -> None:
        output = engine.state.output
        items = output if isinstance(output, list) else [output]
        batch = getattr(engine.state, "batch", None)
        if isinstance(batch, Mapping):  # collated
            batch_cases = batch.get(self.case_key)
        elif isinstance(batch, (list, tuple)):  # decollated by the evaluator
            batch_cases = [b.get(self.case_key) if isinstance(b, Mapping) else None for b in batch]
        else:
            batch_cases = None
        if not isinstance(batch_cases, (list, tuple)) or len(batch_cases) != len(items) or None in batch_cases:
            batch_cases = None
        for i, item in enumerate(items):
            if batch_cases is not None and self.case_key not in item:
                item = {**item, self.case_key: batch_cases[i]}
            probs = item[self.pred_key]
            probs = torch.as_tensor(getattr(probs, "as_tensor", lambda: probs)()).detach().float().reshape(-1).cpu()
            if probs.numel() != len(self.class_names):
                raise ValueError(
                    f"ClassProbabilityWriter: {probs.numel()} probabilities for {len(self.class_names)} classes "
                    f"{self.class_names}"
                )
            row: dict[str, Any] = {"case": self._case_of(item)}
            if self.multi_label:
                row["predicted"] = ";".join(n for n, p in zip(self.class_names, probs.tolist()) if p >= 0.5)
            else:
                row["predicted"] = self.class_names[int(probs.argmax())]
            row.update({f"prob/{n}": float(p) for n, p in zip(self.class_names, probs.tolist())})
            self.rows.append(row)

    @property
    def path(self) -> Path:
        if get_world_size() > 1:
            stem, suffix = os.path.splitext(self.filename)
            return self.output_dir / f"{stem}_rank{get_rank()}{suffix}"
        return self.output_dir / self.filename

    def write(self, engine: Engine | None = None) -> Path:
        """Write the CSV now (atomically); returns its path."""
        columns = ["case", "predicted"] + [f"prob/{n}" for n in self.class_names]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        path = atomic_write_text(self.path, buffer.getvalue())
        logger.info(f"class probabilities of {len(self.rows)} images written to {path}")
        return path


def load_network_weights(network: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a trained downstream network's weights (the ``models/model.pt`` written by MONAI's ``CheckpointSaver``:
    a plain state dict) with ``torch.load(weights_only=True)``; a state dict of the whole task (keys ``network.*``) is
    accepted too. A missing file or mismatching keys are errors naming the file. Returns ``network``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained network weights (train first, or pass --model_path)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "network" in state and isinstance(state["network"], Mapping):
        state = state["network"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    if state and all(k.startswith("network.") for k in state):
        state = {k[len("network.") :]: v for k, v in state.items()}
    try:
        network.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise RuntimeError(
            f"{path}: does not fit {type(network).__name__} (same network options as training?): {e}"
        ) from e
    logger.info(f"{path}: loaded {len(state)} tensors into {type(network).__name__}")
    return network
