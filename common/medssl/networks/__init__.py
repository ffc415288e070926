"""medssl.networks: backbones and heads (2D/3D through spatial_dims or input rank)."""

from .backbones import DenseNet3D, ResNetBackbone, resnet50_2d
from .heads import PerModalityPrototypes, ProjectionHead, SwAVPrototypes
from .dvme import ATTENTION_MODES, DVME, MetaEmbeddingAttention
