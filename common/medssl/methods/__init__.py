"""medssl.methods: one class per SSL method (backbone + head + loss), exposing training_step and parameter_groups."""

from .base import SSLMethod, build_param_groups, crops_from_batch, forward_multi_crop
from .deepcluster import DeepClusterV2
from .swav import SwAV
from .unimiss import DistillationNetwork, UniMiSS
from .joint_volume import MaskedSliceEmbeddingPrediction
from .medcoss import MedCoSS, intra_modal_mixup
