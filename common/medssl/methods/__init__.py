"""medssl.methods: one class per SSL method (backbone + head + loss), exposing training_step and parameter_groups."""

from .base import SSLMethod, build_param_groups
from .deepcluster import DeepClusterV2
from .swav import UNLABELLED, ClassLabeld, SwAV
from .unimiss import DistillationNetwork, UniMiSS
from .joint_volume import HybridVolumeBackbone, MaskedSliceEmbeddingPrediction, masked_embedding_loss
