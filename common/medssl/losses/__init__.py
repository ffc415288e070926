"""medssl.losses: SSL objectives, each owning its distributed logic (Sinkhorn, SwAV, DeepCluster-v2, DINO, the
hybrid supervised term, the masked slice-embedding loss)."""

from .deepcluster import IGNORE_INDEX, DeepClusterV2Loss, MemoryBank, cluster_memory_bank, spherical_kmeans
from .sinkhorn import sinkhorn_knopp
from .swav import (
    PerModalityPrototypes,
    SwAVLoss,
    SwAVPrototypes,
    SwAVQueue,
    cancel_prototype_grads,
    per_modality_swav_loss,
    split_crops,
)
from .dino import DINOLoss
from .masked_embedding import masked_embedding_loss
from .supervised import supervised_loss
from .mae import IGNORE_LABEL, mlm_loss, mlm_mask, normalized_pixel_loss, patchify
