"""Weighted k-nearest-neighbour classification of frozen features, and the kNN monitor of SSL training.

The classifier is the non-parametric monitor of instance discrimination (Wu et al. 2018, "InstDisc") as used by
DINO (Caron et al. 2021, eval_knn): features are L2-normalised, so the similarity of a test feature ``x`` and a
training feature ``x_i`` is the cosine ``s_i = <x, x_i> / (|x| |x_i|)``; among the ``k`` most similar training items
N_k(x), class ``c`` gets the vote

    w_c(x) = sum_{i in N_k(x), y_i = c} exp(s_i / τ)

and the prediction is ``argmax_c w_c(x)`` (ties go to the lower class index). ``k = 20``, ``τ = 0.07`` are the
defaults of both papers (DINO reports k = 20 as its main setting).

:func:`knn_evaluate` embeds a labelled training loader and a labelled validation loader with an encoder
(:func:`medssl.evaluation.features.extract_features`, distributed-aware) and returns the accuracy; a tool compares
a pretrained encoder with a randomly initialised one by calling it twice. :class:`KNNMonitorHandler` runs it during
pretraining every N epochs and at the end of training.

Labels are class indices; items whose label is negative (e.g. -1 = unlabelled) are left out of both sides.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medssl.evaluation.features import extract_features
from medssl.utils.dist import is_main_process
from medssl.utils.io import json_safe
from medssl.utils.tensors import unwrap_module

__all__ = ["knn_classify", "knn_accuracy", "knn_evaluate", "KNNMonitorHandler"]

logger = logging.getLogger(__name__)

#: query loaders whose monitors were turned off and said so: monitors sharing them log one line together
_ANNOUNCED_OFF: weakref.WeakSet = weakref.WeakSet()


def _class_labels(labels: torch.Tensor, what: str) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 1:
        raise ValueError(
            f"kNN: {what} labels of shape {tuple(labels.shape)}; expected (N,) class indices (multi-label vectors are "
            "not supported by the kNN vote)"
        )
    if labels.is_floating_point():
        if not torch.equal(labels, labels.round()):
            raise ValueError(f"kNN: {what} labels are not integer class indices")
    return labels.long()


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    return_scores: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Predicted class of each test feature by the temperature-weighted vote of its ``k`` nearest training features
    (cosine similarity; see the module docstring).

    Args:
        train_features: (N_train, D) features of the labelled training items.
        train_labels: (N_train,) class indices in ``[0, num_classes)``.
        test_features: (N_test, D) features to classify.
        k: number of neighbours (clamped to N_train).
        temperature: τ of the vote weights exp(s / τ).
        num_classes: number of classes C; default ``max(train_labels) + 1``.
        chunk_size: test rows per similarity block (memory: chunk_size x N_train floats).
        return_scores: also return the (N_test, C) vote totals, normalised to sum to 1 per row.

    Returns:
        (N_test,) long tensor of predictions (on the device of ``train_features``), and the scores when asked.
    """
    if temperature <= 0:
        raise ValueError(f"knn_classify: temperature={temperature} must be > 0")
    if k < 1:
        raise ValueError(f"knn_classify: k={k} must be >= 1")
    train_labels = _class_labels(train_labels, "training")
    if train_features.dim() != 2 or test_features.dim() != 2:
        raise ValueError(
            f"knn_classify: features must be (N, D); got train {tuple(train_features.shape)}, test "
            f"{tuple(test_features.shape)}"
        )
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(
            f"knn_classify: {train_features.shape[0]} training features but {train_labels.shape[0]} labels"
        )
    if train_features.shape[0] == 0:
        raise ValueError("knn_classify: no training features")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"knn_classify: feature sizes differ: train D={train_features.shape[1]}, test D={test_features.shape[1]}"
        )
    if int(train_labels.min()) < 0:
        raise ValueError("knn_classify: negative training labels; leave unlabelled items out")
    n_classes = int(train_labels.max()) + 1 if num_classes is None else int(num_classes)
    if int(train_labels.max()) >= n_classes:
        raise ValueError(f"knn_classify: training label {int(train_labels.max())} >= num_classes={n_classes}")
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(device)
    k = min(int(k), train.shape[0])
    predictions, all_scores = [], []
    for start in range(0, test_features.shape[0], chunk_size):
        test = F.normalize(test_features[start : start + chunk_size].to(device).float(), dim=1)
        similarity = test @ train.T  # (b, N_train) cosine similarities s_i
        top_sim, top_idx = similarity.topk(k, dim=1)  # N_k(x)
        weights = (top_sim / temperature).exp()  # exp(s_i / τ)
        votes = torch.zeros((test.shape[0], n_classes), device=device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)  # w_c(x)
        predictions.append(votes.argmax(dim=1))
        if return_scores:
            all_scores.append(votes / votes.sum(dim=1, keepdim=True))
    preds = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long, device=device)
    if return_scores:
        scores = torch.cat(all_scores) if all_scores else torch.zeros((0, n_classes), device=device)
        return preds, scores
    return preds


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> float:
    """Fraction of test items whose :func:`knn_classify` prediction equals their label."""
    test_labels = _class_labels(test_labels, "test")
    if test_labels.shape[0] != test_features.shape[0]:
        raise ValueError(f"knn_accuracy: {test_features.shape[0]} test features but {test_labels.shape[0]} labels")
    if test_labels.numel() == 0:
        raise ValueError("knn_accuracy: no test items")
    predictions = knn_classify(train_features, train_labels, test_features, k, temperature, num_classes)
    return float((predictions.cpu() == test_labels.cpu()).float().mean())


def _labelled(features: torch.Tensor, labels: torch.Tensor | None, extras: dict, what: str):
    if labels is None:
        raise ValueError(
            f"knn_evaluate: the {what} loader gives no numeric 'label' per item; the kNN monitor needs labelled items"
        )
    labels = _class_labels(labels, what)
    keep = labels >= 0
    modality = extras.get("modality")
    if modality is not None:
        modality = [m for m, kept in zip(modality, keep.tolist()) if kept]
    return features[keep], labels[keep], modality


def knn_evaluate(
    encoder: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    train_loader: Iterable,
    val_loader: Iterable,
    k: int = 20,
    temperature: float = 0.07,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
    amp: bool | str = False,
    log_every: int = 50,
) -> dict[str, Any]:
    """kNN accuracy of ``encoder``'s frozen features: the labelled ``val_loader`` items classified by the labelled
    ``train_loader`` items (:func:`knn_classify`). A collective in a multi-process run (every rank calls it and gets
    the same result; see :func:`medssl.evaluation.features.extract_features` for how the loaders split the items).

    Returns ``{"acc", "n_train", "n_val", "k", "temperature", "num_classes", "seconds"}`` plus ``"acc_per_modality"``
    (``{modality: accuracy}``) when the batches carry ``"modality"``. ``k`` is the number of neighbours actually
    used (at most ``n_train``).
    """
    start = time.perf_counter()
    train_f, train_y, train_x = extract_features(
        encoder, train_loader, device, image_key, label_key, amp, log_every=log_every, description="kNN train"
    )
    val_f, val_y, val_x = extract_features(
        encoder, val_loader, device, image_key, label_key, amp, log_every=log_every, description="kNN val"
    )
    train_f, train_y, _ = _labelled(train_f, train_y, train_x, "training")
    val_f, val_y, val_modality = _labelled(val_f, val_y, val_x, "validation")
    if train_y.numel() == 0 or val_y.numel() == 0:
        raise ValueError(f"knn_evaluate: {train_y.numel()} labelled training and {val_y.numel()} validation items")
    if num_classes is None:
        num_classes = int(max(int(train_y.max()), int(val_y.max()))) + 1
    predictions = knn_classify(train_f, train_y, val_f, k, temperature, num_classes).cpu()
    correct = predictions == val_y
    result: dict[str, Any] = {
        "acc": float(correct.float().mean()),
        "n_train": int(train_y.numel()),
        "n_val": int(val_y.numel()),
        "k": min(int(k), int(train_y.numel())),
        "temperature": float(temperature),
        "num_classes": int(num_classes),
    }
    if val_modality is not None and len(val_modality) == len(val_y):
        totals, hits = Counter(val_modality), Counter(m for m, ok in zip(val_modality, correct.tolist()) if ok)
        result["acc_per_modality"] = {m: hits[m] / totals[m] for m in sorted(totals)}
    result["seconds"] = time.perf_counter() - start
    return result


@contextlib.contextmanager
def _preserve_global_rng():
    """Restore the global Python / NumPy / torch (CPU and CUDA) RNG states on exit: an evaluation between epochs
    (a DataLoader draws its base seed from torch's RNG) must not change the training's random stream, or a resumed
    run would not follow the uninterrupted one."""
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda_in_use else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _resolve_attribute(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = unwrap_module(obj)
        if not hasattr(obj, part):
            raise AttributeError(
                f"KNNMonitorHandler: {type(obj).__name__} has no attribute {part!r} (encoder={path!r})"
            )
        obj = getattr(obj, part)
    return obj


class KNNMonitorHandler:
    """kNN accuracy of the encoder being pretrained, every ``every_n_epochs`` epochs and at the end of training.

    At Events.EPOCH_COMPLETED of every ``every_n_epochs``-th epoch, and at Events.COMPLETED when the last epoch was
    not evaluated yet (unless ``at_end=False``), the labelled ``val_loader`` items are classified by the labelled
    ``train_loader`` items with the current encoder (:func:`knn_evaluate`). The accuracy is

    * logged: ``epoch 3: kNN accuracy (k=20) = 0.8125 on 64 validation items`` (rank 0);
    * stored in ``engine.state.metrics[name]`` (every rank), where MONAI's ``StatsHandler`` /
      ``TensorBoardStatsHandler`` / MLflow handler and ignite handlers read metrics; the per-modality accuracies go
      to ``engine.state.metrics[f"{name}_{modality}"]`` when the validation items have more than one modality;
    * appended to ``<output_dir>/knn.jsonl`` (rank 0; one JSON object per evaluation: epoch, iteration, the
      accuracy, k, τ, item counts, seconds). A resumed run appends to the same file.

    Args:
        encoder: what embeds the images, ``(B, C, H, W)`` / ``(B, C, X, Y, Z)`` (depth last) -> ``(B, D)``: an
            ``nn.Module`` (e.g. ``method.backbone``), any callable, or a dotted attribute path (``"backbone"``,
            ``"teacher.backbone"``) resolved on the engine's method (``engine.method``, else ``engine.network``,
            DDP wrappers removed) when the handler is attached. Runs in eval mode; its modes are restored after.
        train_loader, val_loader: loaders of labelled items (``"image"``, ``"label"`` class index, optionally
            ``"modality"``) with deterministic evaluation transforms. In a multi-process run give each rank its share
            (see :mod:`medssl.evaluation.features`) or the full set on every rank.
        every_n_epochs: evaluation period in epochs (0 = only at the end of training).
        k, temperature: the vote (:func:`knn_classify`): k = 20, τ = 0.07 (DINO / InstDisc).
        device: where the encoder runs; default ``engine.state.device`` (MONAI workflows), else the encoder's.
        name: the metric name.
        output_dir: directory of ``knn.jsonl`` (None = no file).
        at_start: also evaluate at Events.STARTED of a fresh run (iteration 0): the accuracy of the initial
            (randomly initialised, or loaded) encoder, stored as ``metrics[f"{name}_init"]`` and as epoch 0 in
            ``knn.jsonl`` — the baseline the pretraining must beat.
        at_end: evaluate at Events.COMPLETED when the last epoch was not evaluated yet (default). A baseline monitor
            of another encoder (e.g. a randomly initialised copy, when the trained one starts from a previous stage)
            uses ``every_n_epochs=0, at_start=True, at_end=False``: it writes only the epoch-0 record of
            ``knn.jsonl``, which :func:`print_knn_summary` reports as "random init".
        num_classes, image_key, label_key, amp, log_every: passed to :func:`knn_evaluate`.

    The global RNG states are restored after each evaluation, so the monitor does not change the training's random
    stream. Every rank must attach it (the evaluation is a collective when the loaders are split across ranks).

    A loader without any item (a datalist without class labels: the bundles build the loaders with
    ``medssl.data.load_items(..., labelled_only='class', allow_empty=True)``) turns the monitor off when it is
    attached, with one warning (one per query loader, however many monitors share it); ``enabled`` is then
    False and nothing is evaluated or written.
    """

    def __init__(
        self,
        encoder: nn.Module | Callable[[torch.Tensor], torch.Tensor] | str,
        train_loader: Iterable,
        val_loader: Iterable,
        every_n_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        device: torch.device | str | None = None,
        name: str = "knn_acc",
        output_dir: str | Path | None = None,
        at_start: bool = False,
        at_end: bool = True,
        num_classes: int | None = None,
        image_key: str = "image",
        label_key: str = "label",
        amp: bool | str = False,
        log_every: int = 50,
    ) -> None:
        if every_n_epochs < 0:
            raise ValueError(f"KNNMonitorHandler: every_n_epochs={every_n_epochs} must be >= 0")
        if k < 1 or temperature <= 0:
            raise ValueError(f"KNNMonitorHandler: k={k} must be >= 1 and temperature={temperature} > 0")
        self.encoder = encoder
        self.train_loader, self.val_loader = train_loader, val_loader
        self.every_n_epochs = int(every_n_epochs)
        self.k, self.temperature = int(k), float(temperature)
        self.device = device
        self.name = name
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.at_start, self.at_end = at_start, at_end
        self.num_classes = num_classes
        self.image_key, self.label_key, self.amp, self.log_every = image_key, label_key, amp, log_every
        self.history: list[dict[str, Any]] = []
        self._resolved: Any = None if isinstance(encoder, str) else unwrap_module(encoder)
        self._last_epoch: int | None = None
        self.enabled = True

    def _empty_loaders(self) -> list[str]:
        """Which of the loaders hold no item (map-style datasets; a loader of unknown length counts as not empty)."""
        empty = []
        loaders = (("train_loader (memory bank)", self.train_loader), ("val_loader (queries)", self.val_loader))
        for what, loader in loaders:
            try:
                if len(getattr(loader, "dataset", loader)) == 0:
                    empty.append(what)
            except TypeError:
                pass
        return empty

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if isinstance(self.encoder, str):
            root = getattr(engine, "method", None)
            root = getattr(engine, "network", None) if root is None else root
            if root is None:
                raise ValueError(
                    f"KNNMonitorHandler: encoder={self.encoder!r} is an attribute path but the engine has no "
                    ".method / .network to resolve it on"
                )
            self._resolved = _resolve_attribute(root, self.encoder)
        if not callable(self._resolved):
            raise TypeError(f"KNNMonitorHandler: the encoder ({type(self._resolved).__name__}) is not callable")
        empty = self._empty_loaders()
        if empty:
            self.enabled = False
            try:
                said = self.val_loader in _ANNOUNCED_OFF
                _ANNOUNCED_OFF.add(self.val_loader)
            except TypeError:  # a loader without weak references (a plain list): say it every time
                said = False
            if is_main_process() and not said:
                logger.warning(
                    f"kNN monitor off: no labelled item in its {' and '.join(empty)} (a datalist without class "
                    "labels); pretraining goes on without it"
                )
            return
        if self.at_start:
            engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)
        if self.at_end:
            engine.add_event_handler(Events.COMPLETED, self._on_completed)

    # ------------------------------------------------------------------ events
    def _on_started(self, engine: Any) -> None:
        if engine.state.iteration == 0:
            self.evaluate(engine, suffix="_init")

    def _on_epoch_completed(self, engine: Any) -> None:
        if self.every_n_epochs and engine.state.epoch % self.every_n_epochs == 0:
            self.evaluate(engine)

    def _on_completed(self, engine: Any) -> None:
        if getattr(engine.state, "nonfinite_loss", None):
            logger.warning("KNNMonitorHandler: no final kNN evaluation, the run stopped on a non-finite loss")
            return
        if engine.state.epoch > 0 and self._last_epoch != engine.state.epoch:
            self.evaluate(engine)

    # ------------------------------------------------------------------ evaluation
    def _device(self, engine: Any) -> torch.device | str | None:
        if self.device is not None:
            return self.device
        return getattr(engine.state, "device", None)

    def evaluate(self, engine: Any, suffix: str = "") -> dict[str, Any]:
        """Run :func:`knn_evaluate` now and report it (see the class docstring); returns the record."""
        epoch = int(engine.state.epoch) if not suffix else 0
        with _preserve_global_rng():
            result = knn_evaluate(
                self._resolved,
                self.train_loader,
                self.val_loader,
                k=self.k,
                temperature=self.temperature,
                device=self._device(engine),
                num_classes=self.num_classes,
                image_key=self.image_key,
                label_key=self.label_key,
                amp=self.amp,
                log_every=self.log_every,
            )
        metric = self.name + suffix
        metrics = getattr(engine.state, "metrics", None)
        if metrics is None:
            metrics = {}
            engine.state.metrics = metrics
        metrics[metric] = result["acc"]
        for modality, acc in result.get("acc_per_modality", {}).items():
            if len(result["acc_per_modality"]) > 1:
                metrics[f"{metric}_{modality}"] = acc
        record = {"epoch": epoch, "iteration": int(engine.state.iteration), "metric": metric, **result}
        self.history.append(record)
        if not suffix:
            self._last_epoch = epoch
        if is_main_process():
            # at start, the metric's name says which encoder: knn_acc_init (the model itself) or a baseline's
            when = f"at start ({metric})" if suffix else f"epoch {epoch}"
            logger.info(
                f"{when}: kNN accuracy (k={result['k']}) = {result['acc']:.4f} on {result['n_val']} validation items "
                f"({result['n_train']} training items, {result['seconds']:.1f} s)"
            )
            if self.output_dir is not None:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                with open(self.output_dir / "knn.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(json_safe(record)) + "\n")
        return record


def knn_summary(output_dir: str | Path) -> dict[str, Any] | None:
    """The randomly initialised encoder's kNN accuracy (epoch 0, from ``at_start=True``) and the last one, read from
    ``<output_dir>/knn.jsonl``; None when the file is missing or empty."""
    path = Path(output_dir) / "knn.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        return None
    by_epoch: dict[int, dict] = {}
    for rec in records:  # a resumed run may repeat an epoch: the last record wins
        by_epoch[int(rec["epoch"])] = rec
    last_epoch = max(by_epoch)
    init = by_epoch.get(0)
    return {
        "random_init_acc": None if init is None else init["acc"],
        "pretrained_acc": by_epoch[last_epoch]["acc"] if last_epoch > 0 else None,
        "epoch": last_epoch,
        "k": by_epoch[last_epoch].get("k"),
        "n_train": by_epoch[last_epoch].get("n_train"),
        "n_val": by_epoch[last_epoch].get("n_val"),
        "file": str(path),
    }


def print_knn_summary(output_dir: str | Path) -> dict[str, Any] | None:
    """Print (rank 0) the kNN accuracy of the pretrained encoder beside the randomly initialised one (see
    :func:`knn_summary`); bundles call it in ``finalize``."""
    if not is_main_process():
        return None
    summary = knn_summary(output_dir)
    if summary is None:
        print(f"kNN summary: no kNN evaluation recorded in {output_dir} (knn.jsonl)")
        return None

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    print(
        f"kNN accuracy (k={summary['k']}, {summary['n_val']} validation vs {summary['n_train']} training items): "
        f"random init {fmt(summary['random_init_acc'])} -> pretrained {fmt(summary['pretrained_acc'])} "
        f"(epoch {summary['epoch']}; {summary['file']})"
    )
    return summary
