"""The DVME transfer protocol (Truong et al., "How transferable are self-supervised features in medical image
classification tasks?", ML4H 2021, Sec. 3-4, Appendix E-F) on frozen-encoder embeddings, and its image-level
network.

What runs (:class:`DVMEProtocol`, the ``train#trainer`` of ``bundles/dvme_classification``):

1. **Embeddings.** Each encoder (``{"name", "path"}``: an encoder exported by ``tools/export_encoder.py`` /
   ``tools/convert_weights.py``, i.e. a ``medssl-encoder/1`` manifest ``.json`` or the ``.pt`` beside it; or
   ``{"name", "backbone": {"_target_", "kwargs"}}``: a randomly initialised architecture, for tests and where no
   pretrained encoder of a method exists) embeds the labelled 2D items of the datalist's ``training``, ``validation``
   and ``test`` sections once, through :func:`medssl.evaluation.cache.cached_embeddings` (keyed by the encoder's
   weights, the preprocessing description and the items; a second run reads the cache). ``embed_fn`` (optional, a
   dotted path ``fn(encoder, images) -> (B, D)``) chooses the embedding, e.g. :func:`mit_token_and_mean`; default:
   the encoder's ``forward`` (the pooled ResNet feature, MiT's SSL token...).
2. **Data regimes** (the paper's Small / Medium / Full, e.g. APTOS 50 / 500 / 3662): ``{"small": 50, "medium": 500,
   "full": null}`` sample counts; ``null`` / ``"all"`` = as many as the training split holds.
3. **Five folds of class-balanced sampling** (:func:`balanced_sample`): fold k of a regime draws ``count`` training
   items with an equal quota per class (seeded by ``(seed, regime, fold)``): a class with at least its quota gives a
   sample without replacement; a class too small for its quota gives all its items plus draws with replacement
   (oversampling). The datalist's ``validation`` section is the fixed validation set of every fold (learning-rate
   plateau and best-epoch choice); when it is empty, a seeded stratified 20 % of the training split is held out and
   never sampled. (The paper does not spell out how its folds are formed; independent balanced draws keep oversampled
   duplicates out of the validation data.)
4. **Training** (:func:`train_classifier`): Adam (lr 1e-3, the paper's range 1e-3…1e-4), ``ReduceLROnPlateau`` on the
   validation loss (patience 5 epochs, factor 0.1), cross-entropy, ``max_epochs``; the epoch with the best validation
   AUC (ties: lower loss) is kept. Models (``models``): ``"dvme"`` (the paper's listing: every scalar of the
   meta-embedding a token, ``medssl.networks.DVME(attention="scalar")``), ``"dvme_no_attention"`` (the ablation) and
   ``"single"`` = one linear probe per encoder (``Linear(dim_e, n_classes)``, the paper's 10.2 K / 7.7 K-parameter
   linear evaluation of a single ResNet-50 / ViT).
5. **Test.** Every fold's kept model is scored on the fixed ``test`` split: AUC (binary, or macro one-vs-rest) and
   Cohen's kappa (quadratic-weighted when ``ordinal``) through :func:`medssl.evaluation.metrics.classification_metrics`;
   the table gives mean ± std over the folds, and the best fold (highest validation AUC) is reported on its own, as
   the paper evaluates "the best fold's model on the fixed test set".
6. **Outputs** (rank 0, atomic files): ``<output_dir>/results.csv`` (+ ``results_summary.json``) one row per
   (model, regime, fold); ``results.md`` the paper-style table; ``train_log.jsonl`` one line per epoch of every fold
   (``iteration`` = running epoch count, ``loss``, ``val_loss``, ``val_auc``, ``lr``...); ``attention_map.png`` the
   encoder-to-encoder attention of the best DVME fold of ``picture_regime`` averaged over the test split (Appendix F);
   ``tsne.png`` t-SNE of the test split in each single encoder's embedding beside the DVME embedding;
   ``<ckpt_dir>/checkpoint_final.pt`` that DVME's state dict (``"model"``) plus what rebuilds it (encoders, sizes,
   classes): copy it to ``models/model.pt`` for inference.

``mode="finetune"`` trains the encoders too (the paper's fine-tuning): the same regimes / folds / models on images,
each fold starting from the encoders' weights, encoder learning rate ``lr * encoder_lr_scale``. It runs the image
pipeline every epoch (no cache) and is meant for small runs.

Distributed (``torchrun``, any backend with object collectives): every rank embeds (the cache is written by rank 0),
the (model, regime, fold) jobs are divided among the ranks, the results and the best folds' weights are gathered on
every rank, rank 0 writes the outputs. No gradient is shared between ranks: the jobs are independent.

Images are channels-first 2D ``(C, H, W)`` (the paper's tasks are 2D); a 3D encoder would get ``(C, X, Y, Z)`` with
depth last, unchanged by this module.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from medssl.data.pipeline import load_items
from medssl.evaluation.cache import cached_embeddings, encoder_fingerprint
from medssl.evaluation.metrics import classification_metrics, write_metric_reports
from medssl.evaluation.plots import EmbeddingPanel, plot_attention_map, plot_embedding_panels, tsne_embedding
from medssl.networks import DVME
from medssl.utils.dist import all_gather_object, barrier, get_rank, get_world_size
from medssl.utils.imports import locate
from medssl.utils.io import atomic_torch_save, atomic_write_text, file_sha256
from medssl.utils.tensors import as_plain_tensor
from medssl.weights.export import MANIFEST_FORMAT, build_encoder_from_manifest, load_manifest, write_encoder_files

__all__ = [
    "EncoderSpec",
    "parse_encoder_specs",
    "build_encoder",
    "EmbeddingFunction",
    "mit_token_and_mean",
    "write_random_encoders",
    "DVMEImageClassifier",
    "SingleEncoderHead",
    "parse_regimes",
    "balanced_sample",
    "fold_samples",
    "train_classifier",
    "predict_probabilities",
    "attention_map",
    "results_table",
    "DVMEProtocol",
    "encoders_from_checkpoint",
    "SMOKE_BACKBONES",
    "smoke_encoders",
    "evaluate_classifier",
]

logger = logging.getLogger(__name__)

MODEL_CHOICES = ("dvme", "dvme_no_attention", "single")


# ---------------------------------------------------------------------------------------------------------- encoders
@dataclass
class EncoderSpec:
    """One encoder of the meta-embedding: ``name`` (a key of the meta-embedding, no ``"."``), ``path`` (an exported
    encoder manifest ``.json`` or the weights ``.pt`` beside it) or ``backbone`` (``{"_target_", "kwargs"}``, random
    initialisation), and ``embed_fn`` (dotted path of ``fn(encoder, images) -> (B, D)``; None = ``encoder(images)``)."""

    name: str
    path: str | None = None
    backbone: dict | None = None
    embed_fn: str | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in (("name", self.name), ("path", self.path), ("backbone", self.backbone),
                                  ("embed_fn", self.embed_fn)) if v is not None}


def parse_encoder_specs(
    encoders: Sequence[Mapping[str, Any] | EncoderSpec], where: str = "encoders"
) -> list[EncoderSpec]:
    """Check a config's ``encoders`` list; errors name the entry and the field."""
    if isinstance(encoders, (str, bytes)) or not isinstance(encoders, Sequence) or not encoders:
        raise ValueError(
            f"{where}: a non-empty list of {{name, path | backbone, embed_fn?}} is required, got {encoders!r}"
        )
    specs, names = [], set()
    for i, entry in enumerate(encoders):
        if isinstance(entry, EncoderSpec):
            entry = entry.as_dict()
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}[{i}]: must be an object {{name, path, embed_fn?}}, got {entry!r}")
        unknown = sorted(set(entry) - {"name", "path", "backbone", "embed_fn"})
        if unknown:
            raise ValueError(f"{where}[{i}]: unknown fields {unknown} (known: name, path, backbone, embed_fn)")
        name = entry.get("name")
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"{where}[{i}]: field 'name' must be a non-empty string without '.', got {name!r}")
        if name in names:
            raise ValueError(f"{where}[{i}]: encoder name {name!r} is used twice")
        names.add(name)
        path, backbone = entry.get("path"), entry.get("backbone")
        if (path is None) == (backbone is None):
            raise ValueError(f"{where}[{i}] ({name}): give exactly one of 'path' (exported encoder) or 'backbone'")
        if path is not None and not Path(str(path)).exists():
            raise FileNotFoundError(f"{where}[{i}] ({name}): path {path}: no such encoder file")
        if backbone is not None and not (isinstance(backbone, Mapping) and isinstance(backbone.get("_target_"), str)):
            raise ValueError(f"{where}[{i}] ({name}): 'backbone' must be {{'_target_': 'pkg.Class', 'kwargs': {{}}}}")
        embed_fn = entry.get("embed_fn")
        if embed_fn is not None and not isinstance(embed_fn, str):
            raise ValueError(f"{where}[{i}] ({name}): 'embed_fn' must be a dotted path string, got {embed_fn!r}")
        specs.append(EncoderSpec(name, None if path is None else str(path), None if backbone is None else
                                 {"_target_": backbone["_target_"], "kwargs": dict(backbone.get("kwargs") or {})},
                                 embed_fn))
    return specs


def mit_token_and_mean(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """An ``embed_fn`` for :class:`medssl.networks.MiT`: the encoder's SSL token concatenated with the mean of its
    last-stage tokens, (B, 2·512) — a multi-part transformer embedding in the spirit of the paper's DINO feature
    (CLS tokens of the last blocks concatenated). ``images``: (B, C, H, W), or (B, C, X, Y, Z) depth last."""
    out = encoder.forward_features(images, decode=False)
    tokens = out["encoder_tokens"]  # (B, 1 + N, dim), SSL token first
    return torch.cat([out["encoder_token"], tokens[:, 1:].mean(dim=1)], dim=1)


class EmbeddingFunction(nn.Module):
    """``forward(images) = fn(encoder, images)``: an encoder with a chosen embedding function, as one module (so its
    state dict, and hence the embedding cache's fingerprint, is the encoder's, under ``encoder.``)."""

    def __init__(
        self,
        encoder: nn.Module,
        fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
        fn_name: str = "",
        channels: int | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.fn = fn
        self.fn_name = fn_name
        self.channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels and images.shape[1] == 1 and self.channels > 1:  # grey image, RGB-trained encoder
            images = images.expand(-1, self.channels, *images.shape[2:])
        return self.fn(self.encoder, images) if self.fn is not None else self.encoder(images)


def _expected_channels(encoder: nn.Module) -> int | None:
    """The 2D input channel count an encoder was built for (``in_channels``, or a MiT's ``in_channels_2d``)."""
    for name in ("in_channels", "in_channels_2d"):
        value = getattr(encoder, name, None)
        if isinstance(value, int):
            return value
    return None


def build_encoder(spec: EncoderSpec) -> nn.Module:
    """The encoder of ``spec`` (weights loaded strictly from the exported file, or randomly initialised from
    ``backbone``), wrapped in :class:`EmbeddingFunction` when ``embed_fn`` is set or when it takes more than one
    channel (grey images are then repeated). Returned in eval mode."""
    if spec.path is not None:
        encoder = build_encoder_from_manifest(load_manifest(spec.path))
    else:
        factory = locate(spec.backbone["_target_"], f"encoder {spec.name}: backbone")
        with torch.random.fork_rng(devices=[]):  # random init without touching the caller's global RNG
            torch.manual_seed(zlib.crc32(spec.name.encode()))
            encoder = factory(**spec.backbone.get("kwargs", {}))
    channels = _expected_channels(encoder)
    if spec.embed_fn:
        fn = locate(spec.embed_fn, f"encoder {spec.name}: embed_fn")
        encoder = EmbeddingFunction(encoder, fn, spec.embed_fn, channels=channels)
    elif channels and channels > 1:  # grey images are repeated to the encoder's channel count
        encoder = EmbeddingFunction(encoder, None, "", channels=channels)
    return encoder.eval()


def write_random_encoders(
    out_dir: str | Path,
    backbones: Mapping[str, Mapping[str, Any]],
    seed: int = 0,
    embed_fns: Mapping[str, str] | None = None,
    preprocessing: Mapping | None = None,
) -> list[dict]:
    """Write randomly initialised encoders as exported-encoder files (``<out_dir>/<name>.pt`` + ``.json``, through
    :func:`medssl.weights.write_encoder_files`), for smoke runs and tests where no pretrained encoder is at hand.

    Args:
        backbones: name → ``{"_target_": "medssl.networks.ResNetBackbone", "kwargs": {...}}``.
        seed: the weights are a pure function of (seed, name), so re-writing gives byte-identical files (and the
            embedding cache stays valid).
        embed_fns: name → ``embed_fn`` dotted path, copied into the returned specs.

    Returns the ``encoders`` list for :class:`DVMEProtocol`: ``[{"name", "path", "embed_fn"?}]``.
    """
    out_dir = Path(out_dir)
    specs = []
    for name, backbone in backbones.items():
        spec = parse_encoder_specs([{"name": name, "backbone": dict(backbone)}], "write_random_encoders")[0]
        path = out_dir / f"{name}.pt"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            module = locate(spec.backbone["_target_"], f"write_random_encoders: {name}")(**spec.backbone["kwargs"])
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        record = {
            "format": MANIFEST_FORMAT, "weights": path.name, "method": "random initialisation (no pretraining)",
            "backbone": spec.backbone, "spatial_dims": getattr(module, "spatial_dims", None),
            "in_channels": getattr(module, "in_channels", getattr(module, "in_channels_2d", None)),
            "feature_dim": getattr(module, "feature_dim", None), "preprocessing": dict(preprocessing or {}),
            "seed": seed,
        }
        manifest = path.with_suffix(".json")
        current = None
        if path.is_file() and manifest.is_file():
            try:
                current = load_manifest(manifest)
            except (OSError, ValueError):
                current = None
        # an identical earlier write is kept as is (a second run sees unchanged files)
        if not (current and current.get("backbone") == spec.backbone and current.get("seed") == seed
                and current.get("encoder_sha256") == file_sha256(path)):
            write_encoder_files(state, path, record, manifest)
        entry = {"name": name, "path": str(manifest)}
        if embed_fns and name in embed_fns:
            entry["embed_fn"] = embed_fns[name]
        specs.append(entry)
    return specs


#: tiny 2D architectures (randomly initialised) for smoke runs, tests and the inference fallback: a bottleneck ResNet
#: (256-d), a basic-block ResNet (64-d) and a small MiT (SSL token + mean token, 128-d, inputs of at least 64×64)
SMOKE_BACKBONES: dict[str, dict[str, Any]] = {
    "resnet_bottleneck": {"_target_": "medssl.networks.ResNetBackbone", "kwargs": {
        "spatial_dims": 2, "in_channels": 1, "layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 32, 64]}},
    "resnet_basic": {"_target_": "medssl.networks.ResNetBackbone", "kwargs": {
        "spatial_dims": 2, "in_channels": 1, "layers": [1, 1, 1, 1], "block": "basic",
        "block_inplanes": [8, 16, 32, 64]}},
    "mit": {"_target_": "medssl.networks.MiT", "kwargs": {
        "spatial_dims": 2, "decoder": False, "in_channels_2d": 1, "img_size_2d": 64, "dims": [8, 16, 32, 64],
        "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "stem_channels": 8}},
}
SMOKE_EMBED_FNS = {"mit": "medssl.evaluation.dvme_protocol.mit_token_and_mean"}


def smoke_encoders(out_dir: str | Path, seed: int = 0) -> list[dict]:
    """Write the three :data:`SMOKE_BACKBONES` as randomly initialised exported encoders in ``out_dir`` and return
    their ``encoders`` list (the bundle's ``smoke.json``)."""
    return write_random_encoders(out_dir, SMOKE_BACKBONES, seed=seed, embed_fns=SMOKE_EMBED_FNS,
                                 preprocessing={"note": "random weights, smoke runs only"})


# ------------------------------------------------------------------------------------------------------------ models
class SingleEncoderHead(nn.Module):
    """Linear evaluation of one encoder: ``Linear(dim, num_classes)`` on ``embeddings[name]`` (the other encoders'
    embeddings of the input mapping are ignored). The paper's linear probe (10.2 K parameters for ResNet-50 with five
    classes)."""

    def __init__(self, name: str, dim: int, num_classes: int):
        super().__init__()
        self.name = name
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, embeddings: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(embeddings[self.name])


def _make_head(model: str, embed_dims: Mapping[str, int], num_classes: int, proj_dim: int, dropout: float,
               seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # seeded init, global RNG untouched
        torch.manual_seed(seed)
        if model == "dvme":
            return DVME(embed_dims, proj_dim=proj_dim, num_classes=num_classes, attention="scalar", dropout=dropout)
        if model == "dvme_no_attention":
            return DVME(embed_dims, proj_dim=proj_dim, num_classes=num_classes, attention="none", dropout=dropout)
        if model.startswith("single:"):
            name = model.split(":", 1)[1]
            return SingleEncoderHead(name, embed_dims[name], num_classes)
    raise ValueError(f"unknown model {model!r}: expected 'dvme', 'dvme_no_attention' or 'single:<encoder>'")


class DVMEImageClassifier(nn.Module):
    """Image in, class logits out: the encoders (frozen unless ``trainable_encoders``) embed the image, a head
    (``dvme`` by default) classifies the embeddings. The network of ``inference.json`` (so MONAI's
    ``verify_net_in_out`` and TorchScript-free inference see one tensor in, one tensor out) and of fine-tuning.

    Args:
        encoders: the encoder list (see :class:`EncoderSpec`).
        num_classes, proj_dim, dropout: of the head.
        attention: ``"scalar"`` (DVME, the paper) or ``"none"`` (the ablation); ``head="single:<name>"`` replaces DVME
            with one encoder's linear probe.
        in_channels, probe_size: shape of the dummy image ``(1, in_channels, probe_size, probe_size)`` run once to
            learn each encoder's embedding size.
        trainable_encoders: fine-tuning; False keeps the encoders frozen and in eval mode.

    ``forward(image (B, C, H, W)) -> logits (B, num_classes)``; :meth:`embeddings` gives the per-encoder embeddings.
    The head is the ``head`` sub-module (its state dict is what :class:`DVMEProtocol` saves).
    """

    def __init__(
        self,
        encoders: Sequence[Mapping[str, Any] | EncoderSpec],
        num_classes: int = 2,
        proj_dim: int = 512,
        attention: str = "scalar",
        dropout: float = 0.2,
        head: str = "dvme",
        in_channels: int = 1,
        probe_size: int = 224,
        trainable_encoders: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.specs = parse_encoder_specs(encoders)
        self.encoders = nn.ModuleDict({s.name: build_encoder(s) for s in self.specs})
        self.trainable_encoders = trainable_encoders
        with torch.no_grad():
            probe = torch.zeros(1, in_channels, probe_size, probe_size)
            self.embed_dims = {name: int(enc(probe).reshape(1, -1).shape[1]) for name, enc in self.encoders.items()}
        if not trainable_encoders:
            self.encoders.requires_grad_(False)
        model = head if head != "dvme" else ("dvme" if attention == "scalar" else "dvme_no_attention")
        if attention not in ("scalar", "none"):
            raise ValueError(f"DVMEImageClassifier: attention must be 'scalar' or 'none', got {attention!r}")
        self.head = _make_head(model, self.embed_dims, num_classes, proj_dim, dropout, seed)
        self.class_names: list[str] | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, in_channels: int = 1, probe_size: int = 224) -> "DVMEImageClassifier":
        """The network of a :class:`DVMEProtocol` checkpoint (``checkpoint_final.pt`` / ``models/model.pt``): its
        encoders (from their files), head sizes and trained head weights."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in ("model", "encoders", "num_classes", "proj_dim", "attention") if k not in ckpt]
        if missing:
            raise KeyError(f"{path}: not a DVME checkpoint (missing {missing})")
        network = cls(ckpt["encoders"], num_classes=ckpt["num_classes"], proj_dim=ckpt["proj_dim"],
                      attention=ckpt["attention"], dropout=ckpt.get("dropout", 0.2), in_channels=in_channels,
                      probe_size=probe_size)
        network.head.load_state_dict(ckpt["model"])
        network.class_names = list(ckpt.get("class_names") or [str(i) for i in range(ckpt["num_classes"])])
        return network.eval()

    def train(self, mode: bool = True) -> "DVMEImageClassifier":
        super().train(mode)
        if not self.trainable_encoders:
            self.encoders.eval()  # frozen encoders keep their batch-norm statistics
        return self

    def embeddings(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(self.trainable_encoders and torch.is_grad_enabled()):
            return {name: enc(image).reshape(image.shape[0], -1) for name, enc in self.encoders.items()}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.embeddings(image))


def encoders_from_checkpoint(path: str | Path, default: Sequence[Mapping[str, Any]] | None = None) -> list[dict]:
    """The ``encoders`` list saved in a :class:`DVMEProtocol` checkpoint (``models/model.pt``), else ``default``
    (with a warning: inference then runs untrained encoders). ``default=None``: the randomly initialised
    :data:`SMOKE_BACKBONES` (so that the inference network can be built and checked before any training)."""
    path = Path(path)
    if default is None:
        default = [{"name": n, "backbone": b, **({"embed_fn": SMOKE_EMBED_FNS[n]} if n in SMOKE_EMBED_FNS else {})}
                   for n, b in SMOKE_BACKBONES.items()]
    if path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(ckpt, Mapping) and isinstance(ckpt.get("encoders"), list):
            return [dict(e) for e in ckpt["encoders"]]
        logger.warning(f"{path}: no 'encoders' list in the checkpoint; using the configured default encoders")
    else:
        logger.warning(f"{path}: not found; the network uses the configured default encoders (untrained head)")
    return [dict(e) for e in default]


# ---------------------------------------------------------------------------------------------- regimes and folds
def parse_regimes(regimes: Mapping[str, int | str | None]) -> dict[str, int | None]:
    """``{"small": 50, "medium": 500, "full": None}`` checked: counts are positive ints; ``None`` / ``"all"`` = every
    training item. The order is kept (it is the table's column order)."""
    if not isinstance(regimes, Mapping) or not regimes:
        raise ValueError(
            f"regimes: a non-empty mapping name → sample count (or null = all) is required, got {regimes!r}"
        )
    out: dict[str, int | None] = {}
    for name, count in regimes.items():
        if count is None or (isinstance(count, str) and count.lower() in ("all", "full")):
            out[str(name)] = None
        elif isinstance(count, int) and not isinstance(count, bool) and count > 0:
            out[str(name)] = count
        else:
            raise ValueError(f"regimes[{name!r}] = {count!r}: a positive sample count or null ('all') is required")
    return out


def balanced_sample(labels: Sequence[int] | np.ndarray, count: int | None, rng: np.random.RandomState) -> np.ndarray:
    """Indices of a class-balanced sample of ``count`` items (``None`` = ``len(labels)``) of ``labels``.

    Each class present gets ``count // C`` items, the first ``count % C`` classes of a random order one more. A class
    with at least its quota is sampled without replacement; a smaller class gives all its items plus draws with
    replacement up to its quota (oversampling). The result is shuffled; repeated indices are the oversampled items.
    """
    y = np.asarray(labels).reshape(-1)
    if y.size == 0:
        raise ValueError("balanced_sample: no labelled items to sample from")
    count = int(y.size if count is None else count)
    classes = np.unique(y)
    quotas = np.full(len(classes), count // len(classes))
    quotas[rng.permutation(len(classes))[: count % len(classes)]] += 1
    chosen = []
    for cls, quota in zip(classes, quotas):
        members = np.flatnonzero(y == cls)
        if quota <= len(members):
            chosen.append(rng.choice(members, size=quota, replace=False))
        else:
            chosen.append(np.concatenate([rng.permutation(members), rng.choice(members, quota - len(members))]))
    out = np.concatenate(chosen).astype(np.int64)
    return out[rng.permutation(len(out))]


def _fold_rng(seed: int, regime: str, fold: int) -> np.random.RandomState:
    return np.random.RandomState(np.random.SeedSequence([seed, zlib.crc32(regime.encode()), fold]).generate_state(1))


def fold_samples(labels: Sequence[int] | np.ndarray, count: int | None, folds: int = 5, seed: int = 0,
                 regime: str = "") -> list[np.ndarray]:
    """``folds`` independent class-balanced samples (:func:`balanced_sample`), fold k seeded by (seed, regime, k)."""
    if folds < 1:
        raise ValueError(f"fold_samples: folds must be >= 1, got {folds}")
    return [balanced_sample(labels, count, _fold_rng(seed, regime, k)) for k in range(folds)]


def _holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of training indices into (pool, held-out validation)."""
    rng = np.random.RandomState(seed)
    held = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        held.append(members[: max(1, int(round(fraction * len(members))))] if len(members) > 1 else members[:0])
    held_idx = np.sort(np.concatenate(held))
    pool = np.setdiff1d(np.arange(len(labels)), held_idx)
    return pool, held_idx


# ---------------------------------------------------------------------------------------------------------- training
def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, Mapping):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def predict_probabilities(
    model: nn.Module, batches: Iterable[tuple[Any, torch.Tensor]], device: torch.device, with_attention: bool = False
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
    """``(probabilities (N, C), labels (N,), mean cross-entropy, attention map (E, E) or None)`` of ``model`` (eval
    mode, no grad) over ``(inputs, labels)`` batches. The attention map is DVME's encoder-to-encoder map averaged
    over all N samples."""
    was_training = model.training
    model.eval()
    probs, labels, loss_sum, attn_sum = [], [], 0.0, None
    try:
        with torch.no_grad():
            for inputs, y in batches:
                logits = model(_to_device(inputs, device)).float()
                y = y.to(device)
                loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                probs.append(logits.softmax(dim=1).cpu())
                labels.append(y.cpu())
                head = model.head if isinstance(model, DVMEImageClassifier) else model
                maps = getattr(head, "last_sample_attention_maps", None)
                if with_attention and maps is not None:
                    attn_sum = maps.sum(0).cpu() if attn_sum is None else attn_sum + maps.sum(0).cpu()
    finally:
        model.train(was_training)
    p, y = torch.cat(probs), torch.cat(labels)
    return p, y, loss_sum / max(1, len(y)), None if attn_sum is None else attn_sum / len(y)


def _auc(probs: torch.Tensor, labels: torch.Tensor, ordinal: bool, class_names: Sequence[str] | None) -> dict:
    return classification_metrics(probs, labels, ordinal=ordinal, class_names=class_names)


def train_classifier(
    model: nn.Module,
    train_batches: Callable[[int], Iterable[tuple[Any, torch.Tensor]]],
    val_batches: Callable[[], Iterable[tuple[Any, torch.Tensor]]],
    *,
    max_epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    plateau_patience: int = 5,
    plateau_factor: float = 0.1,
    encoder_lr_scale: float = 1.0,
    device: torch.device | str = "cpu",
    ordinal: bool = False,
    class_names: Sequence[str] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    seed: int = 0,
) -> tuple[dict, dict]:
    """Train ``model`` with Adam + ``ReduceLROnPlateau`` (on the validation loss) and cross-entropy; keep the epoch
    with the best validation AUC (ties and undefined AUCs: lower validation loss).

    ``train_batches(epoch)`` yields ``(inputs, labels)`` for a 0-based epoch (the caller seeds the shuffle by epoch);
    ``val_batches()`` the validation batches. Parameters named ``encoders.*`` get ``lr * encoder_lr_scale``.
    ``on_epoch(record)`` receives ``{"epoch", "loss", "val_loss", "val_auc", "lr"}`` after each epoch.
    Dropout draws from a generator seeded with ``seed`` inside a forked RNG state (the caller's global RNG is left
    as it was), so a run is reproducible. Returns ``(best state dict (CPU copies), best record)``.
    """
    device = torch.device(device)
    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        return _train_loop(model, train_batches, val_batches, max_epochs=max_epochs, lr=lr, weight_decay=weight_decay,
                           plateau_patience=plateau_patience, plateau_factor=plateau_factor,
                           encoder_lr_scale=encoder_lr_scale, device=device, ordinal=ordinal, class_names=class_names,
                           on_epoch=on_epoch)


def _train_loop(model, train_batches, val_batches, *, max_epochs, lr, weight_decay, plateau_patience, plateau_factor,
                encoder_lr_scale, device, ordinal, class_names, on_epoch) -> tuple[dict, dict]:
    model.to(device)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"train_classifier: {type(model).__name__} has no trainable parameters")
    groups = [{"params": [p for n, p in params if not n.startswith("encoders.")], "lr": lr}]
    encoder_params = [p for n, p in params if n.startswith("encoders.")]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": lr * encoder_lr_scale})
    optimizer = torch.optim.Adam([g for g in groups if g["params"]], weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=plateau_factor,
                                                           patience=plateau_patience)
    best_state, best_record, best_key = None, None, None
    for epoch in range(max_epochs):
        model.train()
        total, seen = 0.0, 0
        for inputs, y in train_batches(epoch):
            logits = model(_to_device(inputs, device))
            loss = nn.functional.cross_entropy(logits.float(), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(y)
            seen += len(y)
        probs, labels, val_loss, _ = predict_probabilities(model, val_batches(), device)
        val_auc = _auc(probs, labels, ordinal, class_names)["auc_macro"]
        record = {"epoch": epoch + 1, "loss": total / max(1, seen), "val_loss": val_loss, "val_auc": val_auc,
                  "lr": optimizer.param_groups[0]["lr"]}
        scheduler.step(val_loss)
        key = (-math.inf if math.isnan(val_auc) else val_auc, -val_loss)
        if best_key is None or key > best_key:
            best_key, best_record = key, dict(record)
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if on_epoch is not None:
            on_epoch(record)
    return best_state, best_record


def attention_map(model: nn.Module, features: Mapping[str, torch.Tensor], batch_size: int = 64,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """DVME's encoder-to-encoder attention map (E, E) averaged over the N samples of ``features`` (name → (N, D))."""
    n = next(iter(features.values())).shape[0]
    labels = torch.zeros(n, dtype=torch.long)
    batches = (({k: v[i:i + batch_size] for k, v in features.items()}, labels[i:i + batch_size])
               for i in range(0, n, batch_size))
    _, _, _, attn = predict_probabilities(model, batches, torch.device(device), with_attention=True)
    if attn is None:
        raise ValueError(f"attention_map: {type(model).__name__} exposes no attention weights (attention='none'?)")
    return attn


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
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        summary: dict[str, Any] = {"regimes": dict(self.regimes), "folds": self.folds, "mode": self.mode,
                                   "class_names": self.class_names, "ordinal": self.ordinal, "results": {}}
        for model in self.model_names():
            for regime in self.regimes:
                rows = [r for r in self.rows if r["model"] == model and r["regime"] == regime]
                entry = {}
                for metric in ("test_auc", "test_kappa", "test_accuracy", "val_auc"):
                    mean, std = _mean_std([float(r[metric]) for r in rows])
                    entry[metric] = {"mean": mean, "std": std}
                best = [r for r in rows if r["best_fold"]]
                entry["best_fold"] = dict(best[0]) if best else None
                summary["results"][f"{model}/{regime}"] = entry
        csv_path, json_path = write_metric_reports(self.rows, summary, out, name="results")
        table = results_table(self.rows, list(self.regimes), self.model_names())
        md_path = out / "results.md"
        atomic_write_text(md_path, f"# DVME protocol ({self.mode})\n\n{table}")
        print(table, flush=True)
        log_path = out / "train_log.jsonl"
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in self.log_records))
        self.outputs.update(results_csv=csv_path, results_summary=json_path, results_md=md_path, train_log=log_path)

        test = self.splits["test"]
        names = list(self.embed_dims)
        if "dvme" in self.models:
            dvme = self.best_model("dvme")
            matrix = attention_map(dvme, test.features, device="cpu")
            self.outputs["attention_map"] = plot_attention_map(
                matrix, names, out / "attention_map.png",
                title=f"DVME attention, {self.picture_regime} regime, test split (n={len(test.labels)})")
            atomic_write_text(out / "attention_map.json", json.dumps({"encoders": names, "map": matrix.tolist()}) + "\n")
        panel_model = "dvme" if "dvme" in self.models else ("dvme_no_attention" if "dvme_no_attention" in self.models
                                                             else None)
        panels = [EmbeddingPanel(f"{n} ({self.embed_dims[n]}-d)", tsne_embedding(test.features[n], self.seed),
                                 test.labels, self.class_names) for n in names]
        if panel_model is not None:
            head = self.best_model(panel_model)
            with torch.no_grad():
                dvme_embedding = head.embed(test.features)
            panels.append(EmbeddingPanel(f"{panel_model} embedding ({dvme_embedding.shape[1]}-d)",
                                         tsne_embedding(dvme_embedding, self.seed), test.labels, self.class_names))
        self.outputs["tsne"] = plot_embedding_panels(panels, out_path=out / "tsne.png",
                                                     title=f"t-SNE of the test split ({self.picture_regime} regime)")
        if panel_model is not None:
            best_row = next(r for r in self.rows if r["model"] == panel_model and r["regime"] == self.picture_regime
                            and r["best_fold"])
            ckpt = {
                "model": self.best_states[(panel_model, self.picture_regime)],
                "encoders": [s.as_dict() for s in self.specs], "embed_dims": self.embed_dims,
                "num_classes": self.num_classes, "class_names": self.class_names, "proj_dim": self.proj_dim,
                "attention": "scalar" if panel_model == "dvme" else "none", "dropout": self.dropout,
                "regime": self.picture_regime, "fold": best_row["fold"], "mode": self.mode,
                "val_auc": best_row["val_auc"], "test_auc": best_row["test_auc"],
            }
            path = self.ckpt_dir / "checkpoint_final.pt"
            atomic_torch_save(ckpt, path)
            self.outputs["checkpoint"] = path
        for name, path in self.outputs.items():
            print(f"[dvme] wrote {name}: {path}", flush=True)
        return self.outputs


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
