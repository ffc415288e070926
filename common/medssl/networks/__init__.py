"""medssl.networks: backbones and heads (2D/3D through spatial_dims or input rank)."""

from .backbones import DenseNet3D, ResNetBackbone, resnet50_2d
from .heads import PerModalityPrototypes, ProjectionHead, SwAVPrototypes
from .dvme import ATTENTION_MODES, DVME, MetaEmbeddingAttention
from .deformable_attention import (
    DeformableSliceAttention,
    DeformableSliceTransformer,
    DeformableTransformerLayer,
    interpolate_slices,
    interpolate_table,
    sinusoidal_positions,
    volume_embedding,
)
from .hybrid_volume import (
    REFERENCE_PARAMETER_COUNTS,
    HybridVolumeBackbone,
    HybridVolumeEncoder,
    crop_or_pad_slices,
    random_slice_mask,
)
from .slice_encoder import SliceEncoder, volume_to_slices
from .dino_head import DINOHead, WeightNormLinear
from .mit import MIT_VARIANTS, MiT, mit_small, mit_tiny, resample_position_embedding
from .segmentation import RESNET_SKIP_LEVELS, MiTSegmenter, ResNetUNet, SegmentationHead, SliceWiseResNetUNet
from .classification import ClassificationHead, EncoderClassifier
from .vit import VIT_VARIANTS, ViTBackbone, vit_base, vit_small
from .multimodal_vit import (
    KINDS as MULTIMODAL_KINDS,
    MultiModalClassifier,
    MultiModalEncoder,
    MultiModalViT,
    MultiModalViTEmbedder,
    pack_text,
    random_masking,
)
from .medcoss_heads import MAEDecoder, MLMHead
from .multimodal_unetr import MultiModalUNETR
