"""medssl.downstream: fine-tuning pretrained encoders on labelled data (classification and segmentation bundles).

* :class:`SupervisedTask` — a network + loss as an :class:`medssl.methods.SSLMethod`; ``finetune_mode``
  ``finetune`` / ``linear`` / ``scratch``; trained by :class:`SupervisedTrainer` (medssl's engine under the name
  and argument names of MONAI's ``SupervisedTrainer``);
* :func:`label_fraction_subset` — seeded, stratified label-fraction subsets;
* :func:`prepare_network`, :func:`training_dataset` — pretrained encoder loading and the (cached-feature)
  training set;
* evaluation: :func:`evaluate_classification`, :class:`ClassificationMetric` (the epoch metric of the validation
  evaluator: classification and segmentation bundles both validate with MONAI's ``ValidationHandler`` +
  ``SupervisedEvaluator`` and keep the best model with MONAI's ``CheckpointSaver``), :class:`ClassProbabilityWriter`
  (inference CSV), :func:`load_network_weights`.
"""

from .evaluation import (
    ClassificationMetric,
    ClassProbabilityWriter,
    Predictions,
    add_case_ids,
    classification_case_rows,
    evaluate_classification,
    load_network_weights,
    predict_probabilities,
)
from .evaluation import __all__ as _EVALUATION_NAMES
from .setup import (
    as_float, cached_feature_items, encoder_network, multimodal_vit_encoder, no_pretrained, prepare_network,
    training_dataset,
)
from .subsets import label_fraction_subset, stratum_of
from .task import FINETUNE_MODES, SupervisedTask, SupervisedTrainer, check_finetune_mode, get_submodule

__all__ = [
    "FINETUNE_MODES",
    "SupervisedTask",
    "SupervisedTrainer",
    "check_finetune_mode",
    "get_submodule",
    "label_fraction_subset",
    "stratum_of",
    "prepare_network",
    "training_dataset",
    "encoder_network",
    "multimodal_vit_encoder",
    "cached_feature_items",
    "as_float",
    "no_pretrained",
    *_EVALUATION_NAMES,  # Predictions, evaluate_classification, ClassificationMetric, ... (evaluation.__all__)
]
