"""The DVME protocol as one runnable object (:class:`DVMEProtocol`, described in
:mod:`medssl.evaluation.dvme_protocol`): embeddings, regimes and folds, one training job per (model, regime,
fold), divided among the ranks."""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from medssl.data.pipeline import load_items
from medssl.evaluation.cache import cached_embeddings, encoder_fingerprint
from medssl.utils.dist import all_gather_object, barrier, get_rank, get_world_size
from medssl.utils.tensors import as_plain_tensor

from .encoders import build_encoder, parse_encoder_specs
from .folds import _holdout_split, fold_samples, parse_regimes
from .heads import DVMEImageClassifier, _make_head
from .reporting import write_protocol_outputs
from .training import _auc, predict_probabilities, train_classifier

logger = logging.getLogger(__name__)

MODEL_CHOICES = ("dvme", "dvme_no_attention", "single")


# ---------------------------------------------------------------------------------------------------------- protocol
@dataclass
class FeatureSplit:
    """Embeddings of one datalist section: ``features`` name → (N, D), ``labels`` (N,), ``keys`` image paths,
    ``from_cache`` name → bool."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    keys: list[str]
    modalities: list[str] = field(default_factory=list)
    from_cache: dict[str, bool] = field(default_factory=dict)

    def subset(self, index: np.ndarray) -> "FeatureSplit":
        idx = torch.as_tensor(index, dtype=torch.long)
        return FeatureSplit({k: v[idx] for k, v in self.features.items()}, self.labels[idx],
                            [self.keys[i] for i in index], [self.modalities[i] for i in index] if self.modalities
                            else [], dict(self.from_cache))


class DVMEProtocol:
    """The paper's evaluation protocol as one runnable object (``run()``); see the module docstring.

    Args:
        encoders: the encoder list (:class:`EncoderSpec` fields).
        datalist, dataset_dir: the datalist (2D items with int ``label`` are used; sections training / validation /
            test) and the root of its relative paths.
        output_dir, ckpt_dir: where the results / pictures / log and ``checkpoint_final.pt`` go.
        transform: deterministic MONAI transform item → ``{"image": (C, H, W)}`` (linear mode: the embedding input).
        preprocessing: JSON description of ``transform`` (part of the embedding cache key).
        cache_dir: embedding cache folder (None: no caching).
        regimes: name → sample count or None (all), e.g. ``{"small": 50, "medium": 500, "full": None}``.
        folds: class-balanced samples per regime (5).
        models: any of ``"dvme"``, ``"dvme_no_attention"``, ``"single"`` (one linear probe per encoder).
        max_epochs, batch_size, lr, weight_decay, plateau_patience, plateau_factor: training (Adam, plateau on the
            validation loss).
        proj_dim, dropout: DVME (512, 0.2).
        class_names: default: the datalist's ``classes``; ``num_classes``: default len(class_names) or max label + 1.
        ordinal: grades are ordered (kappa quadratic-weighted).
        mode: ``"linear"`` (frozen encoders, cached embeddings) or ``"finetune"`` (encoders trained, images).
        encoder_lr_scale: encoder learning rate factor in fine-tuning.
        picture_regime: the regime whose best DVME fold gives the pictures and the checkpoint (default: the last).
        dims, max_items: items kept (2D by default; the first ``max_items`` of each section for quick runs).
        seed, device, embed_batch_size, num_workers: as named; amp: mixed precision of the embedding pass (CUDA).
        in_channels, image_size: of the images (fine-tuning's dummy probe of the embedding sizes).
    """

    def __init__(
        self,
        encoders: Sequence[Mapping[str, Any]],
        datalist: str | Path,
        output_dir: str | Path,
        ckpt_dir: str | Path,
        transform: Any,
        preprocessing: Mapping[str, Any] | None = None,
        dataset_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        regimes: Mapping[str, int | str | None] | None = None,
        folds: int = 5,
        models: Sequence[str] = MODEL_CHOICES,
        max_epochs: int = 100,
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        plateau_patience: int = 5,
        plateau_factor: float = 0.1,
        proj_dim: int = 512,
        dropout: float = 0.2,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        ordinal: bool = False,
        mode: str = "linear",
        encoder_lr_scale: float = 0.1,
        picture_regime: str | None = None,
        dims: Sequence[int] = (2,),
        max_items: int | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        embed_batch_size: int = 8,
        num_workers: int = 0,
        in_channels: int = 1,
        image_size: int = 224,
        amp: bool | str = False,
    ):
        self.specs = parse_encoder_specs(encoders)
        self.datalist = Path(datalist)
        self.dataset_dir = dataset_dir
        self.output_dir, self.ckpt_dir = Path(output_dir), Path(ckpt_dir)
        self.transform = transform
        self.preprocessing = dict(preprocessing or {})
        self.cache_dir = cache_dir
        self.regimes = parse_regimes(regimes or {"full": None})
        if folds < 1:
            raise ValueError(f"DVMEProtocol: folds must be >= 1, got {folds}")
        self.folds = int(folds)
        unknown = [m for m in models if m not in MODEL_CHOICES]
        if unknown or not models:
            raise ValueError(f"DVMEProtocol: models {list(models)}: each must be one of {MODEL_CHOICES}")
        self.models = list(models)
        self.max_epochs, self.batch_size = int(max_epochs), int(batch_size)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.plateau_patience, self.plateau_factor = int(plateau_patience), float(plateau_factor)
        self.proj_dim, self.dropout = int(proj_dim), float(dropout)
        self.class_names = list(class_names) if class_names is not None else None
        self.num_classes = num_classes
        self.ordinal = bool(ordinal)
        if mode not in ("linear", "finetune"):
            raise ValueError(f"DVMEProtocol: mode must be 'linear' or 'finetune', got {mode!r}")
        self.mode = mode
        self.encoder_lr_scale = float(encoder_lr_scale)
        if picture_regime is not None and picture_regime not in self.regimes:
            raise ValueError(f"DVMEProtocol: picture_regime {picture_regime!r} is not one of {list(self.regimes)}")
        self.picture_regime = picture_regime or list(self.regimes)[-1]
        self.dims, self.max_items, self.seed = list(dims), max_items, int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.embed_batch_size, self.num_workers = int(embed_batch_size), int(num_workers)
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.amp = amp
        if self.max_epochs < 1 or self.batch_size < 1:
            raise ValueError(f"DVMEProtocol: max_epochs ({self.max_epochs}) and batch_size ({self.batch_size}) "
                             "must be >= 1")
        self.splits: dict[str, FeatureSplit] = {}
        self.items: dict[str, list[dict]] = {}
        self.rows: list[dict] = []
        self.log_records: list[dict] = []
        self.outputs: dict[str, Path] = {}

    # ------------------------------------------------------------------ data
    def _load_items(self, section: str) -> list[dict]:
        items = load_items(self.datalist, section, self.dataset_dir, dims=self.dims,
                           keys=["image", "modality", "dim", "label"], labelled_only="class", max_items=self.max_items)
        for i, it in enumerate(items):
            if not isinstance(it["label"], int) or isinstance(it["label"], bool):
                raise ValueError(f"{self.datalist} section {section!r} item {i}: {it['image']}: label {it['label']!r} "
                                 "is not a class index (DVME classifies single-label items)")
        return items

    def _class_info(self, labels: Sequence[int]) -> None:
        if self.class_names is None:
            try:
                classes = json.loads(self.datalist.read_text()).get("classes")
            except (OSError, json.JSONDecodeError):
                classes = None
            if isinstance(classes, list) and classes:
                self.class_names = [str(c) for c in classes]
        if self.num_classes is None:
            self.num_classes = len(self.class_names) if self.class_names else int(max(labels)) + 1
        if self.class_names is None:
            self.class_names = [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"DVMEProtocol: {len(self.class_names)} class names for num_classes={self.num_classes}")
        bad = sorted({int(v) for v in labels if not 0 <= int(v) < self.num_classes})
        if bad:
            raise ValueError(f"{self.datalist}: labels {bad} outside 0..{self.num_classes - 1} ({self.class_names})")

    def embed(self) -> dict[str, FeatureSplit]:
        """Embed the training / validation / test items with every encoder (cached). Sets ``self.splits``."""
        for section in ("training", "validation", "test"):
            self.items[section] = self._load_items(section)
        if not self.items["training"] or not self.items["test"]:
            raise ValueError(f"{self.datalist}: DVME needs labelled 2D items in 'training' and 'test' (found "
                             f"{len(self.items['training'])} and {len(self.items['test'])})")
        self._class_info([it["label"] for s in self.items.values() for it in s])
        splits: dict[str, FeatureSplit] = {}
        for spec in self.specs:
            encoder = build_encoder(spec).to(self.device)
            fingerprint = None
            if spec.path is not None:
                fingerprint = encoder_fingerprint(manifest_path=spec.path)
            preprocessing = dict(self.preprocessing, embed_fn=spec.embed_fn)
            for section, items in self.items.items():
                if not items:
                    continue
                print(f"[dvme] embedding {len(items)} {section} items with {spec.name} ...", flush=True)
                emb = cached_embeddings(encoder, items, self.transform, cache_dir=self.cache_dir, encoder_id=spec.name,
                                        preprocessing=preprocessing, batch_size=self.embed_batch_size,
                                        device=self.device, num_workers=self.num_workers, fingerprint=fingerprint,
                                        amp=self.amp)
                print(f"[dvme]   {spec.name}/{section}: {tuple(emb.features.shape)} "
                      f"{'read from cache' if emb.from_cache else 'computed'} ({emb.path})", flush=True)
                split = splits.setdefault(section, FeatureSplit(
                    {}, torch.tensor([it["label"] for it in items], dtype=torch.long), emb.keys,
                    [str(it.get("modality", "")) for it in items]))
                split.features[spec.name] = emb.features.float()
                split.from_cache[spec.name] = bool(emb.from_cache)
            del encoder
        self.splits = splits
        return splits

    @property
    def embed_dims(self) -> dict[str, int]:
        return {name: int(v.shape[1]) for name, v in self.splits["training"].features.items()}

    def _pool_and_validation(self) -> tuple[np.ndarray, FeatureSplit]:
        train = self.splits["training"]
        if "validation" in self.splits and len(self.splits["validation"].labels):
            return np.arange(len(train.labels)), self.splits["validation"]
        pool, held = _holdout_split(train.labels.numpy(), 0.2, self.seed)
        logger.warning(f"{self.datalist}: no labelled validation items; holding out {len(held)} training items")
        return pool, train.subset(held)

    # ------------------------------------------------------------------ jobs
    def model_names(self) -> list[str]:
        names = [m for m in self.models if m != "single"]
        if "single" in self.models:
            names += [f"single:{s.name}" for s in self.specs]
        return names

    def jobs(self) -> list[tuple[str, str, int]]:
        """Every (model, regime, fold), in the fixed order the ranks divide and the log numbers."""
        return [(m, r, k) for r in self.regimes for k in range(self.folds) for m in self.model_names()]

    def _feature_batches(self, split: FeatureSplit, index: np.ndarray | None, shuffle_seed: int | None):
        n = len(split.labels)
        index = np.arange(n) if index is None else np.asarray(index)
        if shuffle_seed is not None:
            index = index[np.random.RandomState(shuffle_seed).permutation(len(index))]
        for i in range(0, len(index), self.batch_size):
            idx = torch.as_tensor(index[i:i + self.batch_size], dtype=torch.long)
            yield {k: v[idx] for k, v in split.features.items()}, split.labels[idx]

    def _image_batches(self, items: list[dict], index: np.ndarray | None, shuffle_seed: int | None):
        from monai.data import DataLoader, Dataset

        index = np.arange(len(items)) if index is None else np.asarray(index)
        if shuffle_seed is not None:
            index = index[np.random.RandomState(shuffle_seed).permutation(len(index))]
        data = [items[i] for i in index]
        loader = DataLoader(Dataset(data, transform=self.transform), batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers)
        for batch in loader:
            image = batch["image"]
            image = as_plain_tensor(image)
            yield image, torch.as_tensor(batch["label"], dtype=torch.long)

    def _run_job(self, model_name: str, regime: str, fold: int, sample: np.ndarray, val: FeatureSplit,
                 val_items: list[dict], log: list[dict]) -> tuple[dict, dict]:
        job_seed = int(np.random.SeedSequence([self.seed, zlib.crc32(f"{model_name}|{regime}".encode()), fold])
                       .generate_state(1)[0])
        if self.mode == "linear":
            model = _make_head(model_name, self.embed_dims, self.num_classes, self.proj_dim, self.dropout, job_seed)
            train = self.splits["training"]
            train_batches = lambda epoch: self._feature_batches(train, sample, job_seed + epoch)  # noqa: E731
            val_batches = lambda: self._feature_batches(val, None, None)  # noqa: E731
            test_batches = lambda: self._feature_batches(self.splits["test"], None, None)  # noqa: E731
        else:
            model = DVMEImageClassifier([s.as_dict() for s in self.specs], self.num_classes, self.proj_dim,
                                        head=model_name, dropout=self.dropout, in_channels=self.in_channels,
                                        probe_size=self.image_size, trainable_encoders=True, seed=job_seed)
            train_items = self.items["training"]
            train_batches = lambda epoch: self._image_batches(train_items, sample, job_seed + epoch)  # noqa: E731
            val_batches = lambda: self._image_batches(val_items, None, None)  # noqa: E731
            test_batches = lambda: self._image_batches(self.items["test"], None, None)  # noqa: E731

        def on_epoch(record: dict) -> None:
            log.append(dict(record, model=model_name, regime=regime, fold=fold))

        state, best = train_classifier(
            model, train_batches, val_batches, max_epochs=self.max_epochs, lr=self.lr, weight_decay=self.weight_decay,
            plateau_patience=self.plateau_patience, plateau_factor=self.plateau_factor,
            encoder_lr_scale=self.encoder_lr_scale, device=self.device, ordinal=self.ordinal,
            class_names=self.class_names, on_epoch=on_epoch, seed=job_seed)
        model.load_state_dict(state)
        probs, labels, test_loss, _ = predict_probabilities(model, test_batches(), self.device)
        test = _auc(probs, labels, self.ordinal, self.class_names)
        row = {
            "model": model_name, "regime": regime, "fold": fold, "mode": self.mode,
            "n_train": int(len(sample)), "n_unique_train": int(len(np.unique(sample))),
            "best_epoch": best["epoch"], "val_auc": best["val_auc"], "val_loss": best["val_loss"],
            "test_auc": test["auc_macro"], "test_kappa": test.get("kappa", float("nan")),
            "test_accuracy": test["accuracy"], "test_f1_macro": test["f1_macro"], "test_loss": test_loss,
            "num_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        }
        head_state = state if self.mode == "linear" else {k[5:]: v for k, v in state.items() if k.startswith("head.")}
        return row, head_state

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Path]:
        """Embed, train every (model, regime, fold), write the outputs; returns ``{output name: path}`` (rank 0)."""
        if not self.splits:
            self.embed()
        rank, world = get_rank(), get_world_size()
        pool, val = self._pool_and_validation()
        train_labels = self.splits["training"].labels.numpy()
        samples = {r: [pool[s] for s in fold_samples(train_labels[pool], c, self.folds, self.seed, r)]
                   for r, c in self.regimes.items()}
        val_items = self.items.get("validation") or []
        if self.mode == "finetune" and not val_items:
            raise ValueError(f"{self.datalist}: fine-tuning needs labelled validation items")
        jobs = self.jobs()
        local_rows, local_states, local_logs = {}, {}, {}
        for j, (model_name, regime, fold) in enumerate(jobs):
            if j % world != rank:
                continue
            log: list[dict] = []
            row, state = self._run_job(model_name, regime, fold, samples[regime][fold], val, val_items, log)
            print(f"[dvme] {model_name} {regime} fold {fold}: val AUC {row['val_auc']:.3f} test AUC "
                  f"{row['test_auc']:.3f} kappa {row['test_kappa']:.3f} (epoch {row['best_epoch']})", flush=True)
            local_rows[j], local_states[j], local_logs[j] = row, state, log
        all_rows: dict[int, dict] = {}
        all_logs: dict[int, list] = {}
        for part_rows, part_logs in all_gather_object((local_rows, local_logs)):
            all_rows.update(part_rows)
            all_logs.update(part_logs)
        # best fold per (model, regime): highest validation AUC, ties → lower validation loss, then lower fold
        best_jobs: dict[tuple[str, str], int] = {}
        for j in sorted(all_rows):
            row = all_rows[j]
            key = (row["model"], row["regime"])
            score = (-math.inf if math.isnan(row["val_auc"]) else row["val_auc"], -row["val_loss"])
            if key not in best_jobs:
                best_jobs[key] = j
            else:
                other = all_rows[best_jobs[key]]
                if score > (-math.inf if math.isnan(other["val_auc"]) else other["val_auc"], -other["val_loss"]):
                    best_jobs[key] = j
        for j, row in all_rows.items():
            row["best_fold"] = best_jobs[(row["model"], row["regime"])] == j
        wanted = set(best_jobs.values())
        best_states: dict[int, dict] = {}
        for part in all_gather_object({j: s for j, s in local_states.items() if j in wanted}):
            best_states.update(part)
        self.rows = [all_rows[j] for j in sorted(all_rows)]
        iteration = 0
        self.log_records = []
        for j in sorted(all_logs):
            for record in all_logs[j]:
                iteration += 1
                self.log_records.append(dict(record, iteration=iteration))
        self.best_states = {(all_rows[j]["model"], all_rows[j]["regime"]): s for j, s in best_states.items()}
        if rank == 0:
            self.write_outputs()
        barrier()
        return self.outputs

    def best_model(self, model_name: str = "dvme", regime: str | None = None) -> nn.Module:
        """The best fold's head of ``model_name`` in ``regime`` (default: ``picture_regime``), in eval mode."""
        regime = regime or self.picture_regime
        state = self.best_states.get((model_name, regime))
        if state is None:
            raise KeyError(f"no trained {model_name} model for regime {regime} (models run: {self.model_names()})")
        model = _make_head(model_name, self.embed_dims, self.num_classes, self.proj_dim, self.dropout, 0)
        model.load_state_dict(state)
        return model.eval()

    def write_outputs(self) -> dict[str, Path]:
        return write_protocol_outputs(self)
