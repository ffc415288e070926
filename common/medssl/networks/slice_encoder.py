"""f_intra of Nguyen et al. (joint image-volume SSL, AAAI 2023): a 2D ResNet-50 applied to every slice of a volume,
multi-level features projected to D.

For each slice (or 2D image) the trunk (:class:`~medssl.networks.backbones.ResNetBackbone`, MONAI's ResNet-50 with
the torchvision / SwAV layout) gives the global-average-pooled outputs of its last L levels (default L = 5:
layer1..layer4 and the final pooled feature, 256 + 512 + 1024 + 2048 + 2048 = 5888-d), each L2-normalised and
concatenated; a per-slice Linear(5888 → D = 640) maps them to the slice embedding (the authors' ``ConvTranspose1d``
with kernel 1 over the frames is the same map: 3,768,960 parameters).

Volumes are processed slice-wise in chunks of ``chunk_size`` 2D images (the B × F slices of a batch flattened), so a
batch of 64-slice volumes fits in memory. Chunking alone bounds memory when no gradient is kept (inference, or
stage 2 where f_intra is frozen); for training set ``checkpoint=True`` as well: each chunk's activations are then
recomputed during backward (``torch.utils.checkpoint``, non-reentrant) and only the chunk being recomputed is held.
BatchNorm running statistics are restored after a recomputation, so checkpointing updates them exactly once, like a
plain forward. In training mode BatchNorm normalises each chunk with its own batch statistics (as a smaller batch
would); in eval mode chunked and unchunked outputs are identical.

Axis convention: volumes are MONAI-style channel-first (B, C, X, Y, Z) with the DEPTH axis LAST (RAS: Z = inferior →
superior, axial slices in the X, Y plane); slice z is the 2D image ``volume[..., z]`` of shape (B, C, X, Y). 2D
images are (B, C, H, W). Grey-level input (C = 1) is repeated to the trunk's ``in_channels`` (3 by default: the
authors repeat each slice to 3 channels, and published ImageNet / SwAV trunks expect RGB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from .backbones import ResNetBackbone

from medssl.utils.tensors import as_plain_tensor

__all__ = ["SliceEncoder", "volume_to_slices"]


def volume_to_slices(volume: torch.Tensor) -> torch.Tensor:
    """(B, C, X, Y, Z) volume, depth last -> (B·Z, C, X, Y) slice images, ordered volume by volume then by z."""
    if volume.dim() != 5:
        raise ValueError(f"volume_to_slices: (B, C, X, Y, Z) volume expected (depth last), got {tuple(volume.shape)}")
    batch, channels, size_x, size_y, depth = volume.shape
    return volume.permute(0, 4, 1, 2, 3).reshape(batch * depth, channels, size_x, size_y)


class _RestoreBatchNormStatistics:
    """Context manager: BatchNorm buffers (running mean / var, batches tracked) of ``module`` are put back on exit.

    Used around the recomputation of a checkpointed chunk, whose training-mode forward would otherwise update the
    running statistics a second time."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self):
        self.saved = [
            (buffer, buffer.detach().clone())
            for layer in self.module.modules()
            if isinstance(layer, nn.modules.batchnorm._BatchNorm)
            for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked)
            if buffer is not None
        ]
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for buffer, value in self.saved:
                buffer.copy_(value)
        self.saved = []


class SliceEncoder(nn.Module):
    """f_intra: slice-wise 2D ResNet with multi-level features and a per-slice projection to D.

    Args:
        in_channels: trunk input channels (3: the reference trunk, 23,508,032 parameters; 1-channel input is
            repeated). Use 1 for a grey-level trunk (6,272 fewer parameters).
        embed_dim: D, slice-embedding width (640).
        feature_levels: L, the number of last trunk levels pooled and concatenated (5 → 5888-d for ResNet-50), or
            level names (see ``ResNetBackbone.level_names``).
        normalize_levels: L2-normalise each level before concatenating (True, as the paper).
        layers, block_inplanes: trunk depth / widths ((3, 4, 6, 3), (64, 128, 256, 512) = ResNet-50); tiny values
            for tests.
        chunk_size: at most this many slices (2D images) per trunk call, over the B·Z slices of a batch (split into
            near-equal chunks); None or 0: all at once.
        checkpoint: recompute each chunk's activations in backward (training with many slices).
        backbone_kwargs: further :class:`ResNetBackbone` arguments (``width``, ``norm``, ``bias_downsample``...).

    ``forward``: (B, C, X, Y, Z) volume (depth last) -> (B, Z, D) slice embeddings; (B, C, H, W) image -> (B, D).
    ``forward_features``: the same without the projection (``feature_dim`` = 5888 channels).
    ``backbone`` is the ResNet trunk (export it alone for 2D downstream tasks), ``projection`` the Linear to D.
    """

    def __init__(
        self,
        in_channels: int = 3,
        embed_dim: int = 640,
        feature_levels: int | str | Sequence[str] = 5,
        normalize_levels: bool = True,
        layers: Sequence[int] = (3, 4, 6, 3),
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
        chunk_size: int | None = 64,
        checkpoint: bool = False,
        backbone_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size < 0:
            raise ValueError(
                f"SliceEncoder: chunk_size must be positive (or None / 0 for no chunking), got {chunk_size}"
            )
        self.backbone = ResNetBackbone(
            spatial_dims=2,
            in_channels=in_channels,
            layers=layers,
            block_inplanes=block_inplanes,
            return_levels=feature_levels,
            normalize_levels=normalize_levels,
            **(backbone_kwargs or {}),
        )
        self.projection = nn.Linear(self.backbone.feature_dim, embed_dim)
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.feature_dim = self.backbone.feature_dim
        self.chunk_size = chunk_size or None
        self.checkpoint = checkpoint

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> 2D images (N, in_channels, H, W); volumes are split into their slices (depth last)."""
        x = as_plain_tensor(x)  # MetaTensor: plain tensor ops are faster and keep no meta in the graph
        if x.dim() not in (4, 5):
            raise ValueError(
                f"SliceEncoder: input of shape {tuple(x.shape)}; expected a 2D image batch (B, C, H, W) or a volume "
                f"batch (B, C, X, Y, Z) with the depth (slice) axis last"
            )
        channels = x.shape[1]
        if channels != self.in_channels:
            if channels != 1:
                raise ValueError(
                    f"SliceEncoder: input of shape {tuple(x.shape)} has {channels} channels; the trunk takes "
                    f"{self.in_channels} (or 1, repeated)"
                )
            x = x.expand(-1, self.in_channels, *x.shape[2:])
        return volume_to_slices(x) if x.dim() == 5 else x

    def _encode(self, images: torch.Tensor, project: bool) -> torch.Tensor:
        features = self.backbone(images)
        return self.projection(features) if project else features

    def _encode_chunk(self, images: torch.Tensor, project: bool) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            contexts = lambda: (nullcontext(), _RestoreBatchNormStatistics(self.backbone))  # noqa: E731
            return activation_checkpoint(self._encode, images, project, use_reentrant=False, context_fn=contexts)
        return self._encode(images, project)

    def encode_images(self, images: torch.Tensor, project: bool = True) -> torch.Tensor:
        """2D images (N, in_channels, H, W) -> (N, D) embeddings (``project=False``: (N, feature_dim)), in chunks.

        The N images are split into ceil(N / chunk_size) chunks of near-equal size (never a lone trailing image,
        whose training-mode BatchNorm statistics would be degenerate)."""
        size = self.chunk_size or images.shape[0]
        if images.shape[0] <= size:
            return self._encode_chunk(images, project)
        chunks = torch.tensor_split(images, math.ceil(images.shape[0] / size))
        return torch.cat([self._encode_chunk(chunk, project) for chunk in chunks], dim=0)

    def _run(self, x: torch.Tensor, project: bool) -> torch.Tensor:
        images = self._images(x)
        out = self.encode_images(images, project=project)
        if x.dim() == 5:
            return out.reshape(x.shape[0], x.shape[-1], out.shape[-1])
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-level features before the projection: (B, C, X, Y, Z) -> (B, Z, feature_dim); (B, C, H, W) ->
        (B, feature_dim)."""
        return self._run(x, project=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Slice embeddings: (B, C, X, Y, Z) volume, depth last -> (B, Z, D); (B, C, H, W) image -> (B, D)."""
        return self._run(x, project=True)
