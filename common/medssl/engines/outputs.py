"""What a run leaves for its users beside the checkpoints (split from :mod:`medssl.engines.handlers`, which
re-exports these names):

* :func:`plot_training_curves` -- the PNG of the loss, kNN and validation curves that
  :class:`medssl.engines.TrainingLogHandler` writes at the end of every run;
* :class:`PublishModelHandler` -- at the end of a run, copies the model file a bundle wrote (the best, else the
  final) to where a consumer loads it (MONAI Label: ``<bundle_root>/models/model.pt``);
* :class:`EmbeddingWriter` -- on an evaluator (the pretraining bundles' ``inference.json``), one ``.npy`` embedding
  per item and an index CSV.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from medssl.utils.dist import is_main_process

__all__ = ["plot_training_curves", "PublishModelHandler", "EmbeddingWriter"]

logger = logging.getLogger(__name__)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a killed writer
                continue
    return records


def plot_training_curves(train_log: str | Path, metrics_log: str | Path | None, out: str | Path) -> Path | None:
    """A PNG of a run's curves: the loss per iteration (``train_log.jsonl``; the last line of an iteration wins,
    as after a resume) and, one panel each, the kNN accuracies and the other epoch metrics (``metrics_log.jsonl``).
    Returns ``out``, or None when the log holds no loss. Needs matplotlib (ImportError otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses: dict[int, float] = {}
    for rec in _read_jsonl(Path(train_log)):
        value = rec.get("loss")
        if isinstance(value, (int, float)) and math.isfinite(value):
            losses[int(rec["iteration"])] = float(value)
    if not losses:
        return None
    epochs: dict[int, dict[str, Any]] = {}
    for rec in _read_jsonl(Path(metrics_log)) if metrics_log is not None else []:
        epochs[int(rec["epoch"])] = rec
    names = sorted({k for rec in epochs.values() for k in rec if k not in ("epoch", "iteration")})
    groups = [("kNN accuracy", [n for n in names if n.startswith("knn")]),
              ("validation", [n for n in names if not n.startswith("knn")])]
    groups = [(title, group) for title, group in groups if group]
    fig, axes = plt.subplots(1, 1 + len(groups), figsize=(5 * (1 + len(groups)), 3.6), squeeze=False)
    its = sorted(losses)
    axes[0][0].plot(its, [losses[i] for i in its], lw=1)
    axes[0][0].set(title="training loss", xlabel="iteration", ylabel="loss")
    for ax, (title, group) in zip(axes[0][1:], groups):
        for name in group:
            points = sorted((e, rec[name]) for e, rec in epochs.items() if isinstance(rec.get(name), (int, float)))
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=name)
        ax.set(title=title, xlabel="epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    logger.info(f"training curves: {out}")
    return out


class PublishModelHandler:
    """Copy the model a run wrote to ``target`` when the run completes (rank 0; nothing when ``target`` is None).

    MONAI Label loads ``<bundle_root>/models/model.pt`` and retrains into the same bundle; our runs write their
    models under ``output_dir``. The first file of ``sources`` that exists (e.g. the best-validation ``model.pt``, then
    ``model_final.pt``) is copied through a temp file and ``os.replace``, so a reader never sees half a file. No
    source at all is an error: the run was asked to publish a model and has none.

    Attach it after the handlers that write the sources (ignite runs Events.COMPLETED handlers in attach order).
    """

    def __init__(self, target: str | os.PathLike | None, sources: Sequence[str | os.PathLike] | str = ()) -> None:
        self.target = Path(target) if target not in (None, "") else None
        self.sources = [Path(sources)] if isinstance(sources, (str, os.PathLike)) else [Path(s) for s in sources]
        if self.target is not None and not self.sources:
            raise ValueError("PublishModelHandler: give the model file(s) to publish in sources")
        self.published: Path | None = None

    def attach(self, engine: Engine) -> None:
        if self.target is not None and is_main_process():
            engine.add_event_handler(Events.COMPLETED, self.publish)

    def publish(self, engine: Engine | None = None) -> Path:
        source = next((s for s in self.sources if s.is_file()), None)
        if source is None:
            raise FileNotFoundError(
                f"PublishModelHandler: none of {[str(s) for s in self.sources]} exists: no model to copy to "
                f"{self.target}"
            )
        self.target.parent.mkdir(parents=True, exist_ok=True)
        temp = self.target.with_name(f".{self.target.name}.tmp.{os.getpid()}")
        shutil.copyfile(source, temp)
        os.replace(temp, self.target)
        self.published = source
        logger.info(f"published {source} as {self.target}")
        return self.target


class EmbeddingWriter:
    """Write each item's ``pred`` (an embedding) of an evaluator's run as ``<output_dir>/<folder>/<index>_<stem>.npy``
    (float32, index = the item's position in the run, so equal file names never collide) and, at the end, the index
    ``<output_dir>/<index_name>``: one row per item with ``index``, ``image`` (the source file), ``modality``,
    ``embedding`` (the .npy path relative to ``output_dir``) and ``dim`` (the embedding length).

    Attach to a MONAI ``SupervisedEvaluator`` (``val_handlers``); it reads the decollated ``engine.state.output``
    (``pred``) and ``engine.state.batch`` (the image's ``filename_or_obj``, ``modality``). Rank 0 only.
    """

    COLUMNS = ("index", "image", "modality", "embedding", "dim")

    def __init__(self, output_dir: str | os.PathLike, folder: str = "embeddings", index_name: str = "embeddings.csv",
                 pred_key: str = "pred", image_key: str = "image") -> None:
        self.output_dir = Path(output_dir)
        self.folder, self.index_name = folder, index_name
        self.pred_key, self.image_key = pred_key, image_key
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        if not is_main_process():
            return
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._write_index)

    def _on_started(self, engine: Engine) -> None:
        self.rows = []
        (self.output_dir / self.folder).mkdir(parents=True, exist_ok=True)

    def _source(self, item: Any) -> str:
        image = item.get(self.image_key) if isinstance(item, Mapping) else None
        meta = getattr(image, "meta", None) or {}
        source = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
        if source is None and isinstance(item, Mapping):
            source = (item.get(f"{self.image_key}_meta_dict") or {}).get("filename_or_obj")
        return str(source) if source is not None else ""

    def _on_iteration_completed(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [None] * len(outputs)
        for output, item in zip(outputs, batch):
            pred = output[self.pred_key] if isinstance(output, Mapping) else output
            embedding = torch.as_tensor(pred).detach().float().cpu().reshape(-1).numpy()
            index = len(self.rows)
            source = self._source(item) or self._source(output)
            stem = Path(source).name.split(".")[0] if source else "item"
            name = f"{self.folder}/{index:06d}_{stem}.npy"
            np.save(self.output_dir / name, embedding)
            modality = item.get("modality") if isinstance(item, Mapping) else None
            self.rows.append({"index": index, "image": source, "modality": modality or "", "embedding": name,
                              "dim": int(embedding.size)})

    def _write_index(self, engine: Engine | None = None) -> Path:
        path = self.output_dir / self.index_name
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        logger.info(f"wrote {len(self.rows)} embeddings to {self.output_dir / self.folder} (index {path})")
        return path
