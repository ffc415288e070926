"""The DVME protocol's outputs: the paper-style results table (:func:`results_table`), the files of a run
(:func:`write_protocol_outputs`: CSV / JSON / markdown results, the training log, the pictures, the checkpoint) and
the per-case evaluation of an image classifier (:func:`evaluate_classifier`)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from medssl.evaluation.metrics import classification_metrics, write_metric_reports
from medssl.evaluation.plots import EmbeddingPanel, plot_attention_map, plot_embedding_panels, tsne_embedding
from medssl.utils.io import atomic_torch_save, atomic_write_text
from medssl.utils.tensors import as_plain_tensor

from .training import attention_map

if TYPE_CHECKING:
    from .protocol import DVMEProtocol


# ------------------------------------------------------------------------------------------------------------ tables
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan")
    return float(np.mean(finite)), float(np.std(finite))


def results_table(rows: Sequence[Mapping[str, Any]], regimes: Sequence[str], models: Sequence[str],
                  metrics: Sequence[str] = ("auc", "kappa")) -> str:
    """The paper-style markdown table: one row per model, per regime the test metrics as "mean ± std" over folds,
    then the best fold's test metrics (fold chosen on validation AUC)."""
    header = ["model"] + [f"{r} {m}" for r in regimes for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best_lines = list(lines)
    for model in models:
        cells, best_cells = [model], [model]
        for regime in regimes:
            fold_rows = [r for r in rows if r["model"] == model and r["regime"] == regime]
            best = [r for r in fold_rows if r.get("best_fold")]
            for metric in metrics:
                mean, std = _mean_std([float(r[f"test_{metric}"]) for r in fold_rows])
                cells.append("n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}")
                value = float(best[0][f"test_{metric}"]) if best else float("nan")
                best_cells.append("n/a" if math.isnan(value) else f"{value:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
        best_lines.append("| " + " | ".join(best_cells) + " |")
    return ("Test split, mean ± std over folds\n\n" + "\n".join(lines) + "\n\nBest fold (validation AUC) on the test "
            "split\n\n" + "\n".join(best_lines) + "\n")


# ---------------------------------------------------------------------------------------------------------- outputs
def write_protocol_outputs(protocol: DVMEProtocol) -> dict[str, Path]:
    """Write the outputs of a :class:`DVMEProtocol` that has run (rank 0): ``results.csv`` / ``results_summary.json``,
    ``results.md``, ``train_log.jsonl``, the attention map and t-SNE pictures, ``checkpoint_final.pt`` (see
    :mod:`medssl.evaluation.dvme_protocol`). Returns ``protocol.outputs``."""
    out = protocol.output_dir
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"regimes": dict(protocol.regimes), "folds": protocol.folds, "mode": protocol.mode,
                               "class_names": protocol.class_names, "ordinal": protocol.ordinal, "results": {}}
    for model in protocol.model_names():
        for regime in protocol.regimes:
            rows = [r for r in protocol.rows if r["model"] == model and r["regime"] == regime]
            entry = {}
            for metric in ("test_auc", "test_kappa", "test_accuracy", "val_auc"):
                mean, std = _mean_std([float(r[metric]) for r in rows])
                entry[metric] = {"mean": mean, "std": std}
            best = [r for r in rows if r["best_fold"]]
            entry["best_fold"] = dict(best[0]) if best else None
            summary["results"][f"{model}/{regime}"] = entry
    csv_path, json_path = write_metric_reports(protocol.rows, summary, out, name="results")
    table = results_table(protocol.rows, list(protocol.regimes), protocol.model_names())
    md_path = out / "results.md"
    atomic_write_text(md_path, f"# DVME protocol ({protocol.mode})\n\n{table}")
    print(table, flush=True)
    log_path = out / "train_log.jsonl"
    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in protocol.log_records))
    protocol.outputs.update(results_csv=csv_path, results_summary=json_path, results_md=md_path, train_log=log_path)

    test = protocol.splits["test"]
    names = list(protocol.embed_dims)
    if "dvme" in protocol.models:
        dvme = protocol.best_model("dvme")
        matrix = attention_map(dvme, test.features, device="cpu")
        protocol.outputs["attention_map"] = plot_attention_map(
            matrix, names, out / "attention_map.png",
            title=f"DVME attention, {protocol.picture_regime} regime, test split (n={len(test.labels)})")
        atomic_write_text(out / "attention_map.json", json.dumps({"encoders": names, "map": matrix.tolist()}) + "\n")
    models = protocol.models
    panel_model = "dvme" if "dvme" in models else ("dvme_no_attention" if "dvme_no_attention" in models else None)
    panels = [EmbeddingPanel(f"{n} ({protocol.embed_dims[n]}-d)", tsne_embedding(test.features[n], protocol.seed),
                             test.labels, protocol.class_names) for n in names]
    if panel_model is not None:
        head = protocol.best_model(panel_model)
        with torch.no_grad():
            dvme_embedding = head.embed(test.features)
        panels.append(EmbeddingPanel(f"{panel_model} embedding ({dvme_embedding.shape[1]}-d)",
                                     tsne_embedding(dvme_embedding, protocol.seed), test.labels, protocol.class_names))
    protocol.outputs["tsne"] = plot_embedding_panels(
        panels, out_path=out / "tsne.png", title=f"t-SNE of the test split ({protocol.picture_regime} regime)")
    if panel_model is not None:
        best_row = next(r for r in protocol.rows if r["model"] == panel_model and r["regime"] == protocol.picture_regime
                        and r["best_fold"])
        ckpt = {
            "model": protocol.best_states[(panel_model, protocol.picture_regime)],
            "encoders": [s.as_dict() for s in protocol.specs], "embed_dims": protocol.embed_dims,
            "num_classes": protocol.num_classes, "class_names": protocol.class_names, "proj_dim": protocol.proj_dim,
            "attention": "scalar" if panel_model == "dvme" else "none", "dropout": protocol.dropout,
            "regime": protocol.picture_regime, "fold": best_row["fold"], "mode": protocol.mode,
            "val_auc": best_row["val_auc"], "test_auc": best_row["test_auc"],
        }
        path = protocol.ckpt_dir / "checkpoint_final.pt"
        atomic_torch_save(ckpt, path)
        protocol.outputs["checkpoint"] = path
    for name, path in protocol.outputs.items():
        print(f"[dvme] wrote {name}: {path}", flush=True)
    return protocol.outputs


# ---------------------------------------------------------------------------------------------------------- evaluate
def evaluate_classifier(network: nn.Module, items: Sequence[Mapping[str, Any]], transform: Any, out_dir: str | Path,
                        *, class_names: Sequence[str] | None = None, ordinal: bool = False, batch_size: int = 8,
                        device: torch.device | str = "cpu", name: str = "metrics") -> tuple[Path, Path]:
    """Per-case probabilities and metrics of an image classifier (e.g. :class:`DVMEImageClassifier`) on ``items``:
    ``<out_dir>/<name>.csv`` (image, label, predicted class, one probability per class) and ``<name>_summary.json``
    (:func:`medssl.evaluation.metrics.classification_metrics`). ``class_names`` default: ``network.class_names``
    (set by :meth:`DVMEImageClassifier.from_checkpoint`), else "0", "1", ..."""
    from monai.data import DataLoader, Dataset

    items = list(items)
    if not items:
        raise ValueError("evaluate_classifier: no items to evaluate")
    loader = DataLoader(Dataset(items, transform=transform), batch_size=batch_size, shuffle=False)
    device = torch.device(device)
    network = network.to(device).eval()
    probs = []
    with torch.no_grad():
        for batch in loader:
            image = batch["image"]
            image = as_plain_tensor(image)
            probs.append(network(image.to(device)).float().softmax(dim=1).cpu())
    p = torch.cat(probs)
    labels = torch.tensor([int(it["label"]) for it in items])
    if class_names is None:
        class_names = getattr(network, "class_names", None) or [str(i) for i in range(p.shape[1])]
    rows = []
    for it, pi, yi in zip(items, p, labels):
        row = {"image": str(it["image"]), "label": int(yi), "pred": int(pi.argmax())}
        row.update({f"prob/{c}": float(v) for c, v in zip(class_names, pi)})
        rows.append(row)
    summary = classification_metrics(p, labels, ordinal=ordinal, class_names=class_names)
    return write_metric_reports(rows, summary, out_dir, name=name)
