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

Modules (every name is re-exported here): :mod:`.encoders` (encoder specs, building, embedding functions),
:mod:`.heads` (the heads and :class:`DVMEImageClassifier`), :mod:`.folds` (regimes, class-balanced folds),
:mod:`.training` (:func:`train_classifier` on an Ignite ``Engine``, evaluation pass, attention map),
:mod:`.reporting` (results table, output files, :func:`evaluate_classifier`), :mod:`.protocol`
(:class:`DVMEProtocol`) and :mod:`.smoke` (randomly initialised encoders for smoke runs and tests).
"""

from __future__ import annotations

from .encoders import EmbeddingFunction, EncoderSpec, build_encoder, mit_token_and_mean, parse_encoder_specs
from .folds import balanced_sample, fold_samples, parse_regimes
from .heads import DVMEImageClassifier, SingleEncoderHead, encoders_from_checkpoint
from .protocol import MODEL_CHOICES, DVMEProtocol, FeatureSplit
from .reporting import evaluate_classifier, results_table, write_protocol_outputs
from .smoke import SMOKE_BACKBONES, SMOKE_EMBED_FNS, smoke_encoders, write_random_encoders
from .training import attention_map, predict_probabilities, train_classifier

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
    "FeatureSplit",
    "MODEL_CHOICES",
    "write_protocol_outputs",
    "SMOKE_EMBED_FNS",
]
