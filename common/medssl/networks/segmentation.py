"""Segmentation networks of the downstream bundles, built around the pretraining encoders so that an exported encoder
loads into the sub-module ``encoder`` key for key (no renaming).

- :class:`ResNetUNet` (Nguyen et al. 2023, 2D): a U-Net whose encoder is :class:`~medssl.networks.ResNetBackbone`
  (ResNet-50 by default). The stage maps ``stem`` (stride 2), ``layer1`` .. ``layer4`` (strides 4, 8, 16, 32) are the
  skips (``ResNetBackbone.forward_features(..., pooled=False)``); the decoder is five MONAI ``UpCat`` blocks
  (transposed-conv up-sampling ×2, concatenation with the skip, two Conv-Norm-Act) back to full resolution and a 1×1
  convolution to the classes. Input ``(B, C, H, W)``, output logits ``(B, K, H, W)``; H and W multiples of 32.
- :class:`SliceWiseResNetUNet` (Nguyen et al. 2023, 3D): the same 2D U-Net applied to every axial slice of a volume and
  the slice predictions stacked back. Input ``(B, C, X, Y, Z)`` with the DEPTH axis LAST (MONAI / RAS: Z = inferior →
  superior, axial slices in the X, Y plane), output ``(B, K, X, Y, Z)``; a 4-D input is segmented as a 2D batch.
- :class:`MiTSegmenter` (UniMiSS, Xie et al. ECCV 2022, 2D or 3D): the MiT of UniMiSS (encoder and its symmetric
  decoder, the whole pretraining network, sub-module ``encoder``) and the paper's segmentation head: ConvTranspose (k2,
  s2) → Conv-InstanceNorm-LeakyReLU → 1×1 conv to the classes, on the decoder's last map (``decoder3``: 48 channels at
  the resolution of the first encoder stage). Input ``(B, C, H, W)`` or ``(B, C, X, Y, Z)`` (depth last), output logits
  of the same spatial size.

All networks return ONE tensor of logits (MONAI's ``verify_net_in_out`` and TorchScript tracing need that); softmax /
argmax are post-processing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UpSample
from monai.networks.nets.basic_unet import UpCat

from .backbones import ResNetBackbone
from .mit import MIT_VARIANTS, MiT

__all__ = ["ResNetUNet", "SliceWiseResNetUNet", "MiTSegmenter", "SegmentationHead", "RESNET_SKIP_LEVELS"]

#: the ResNetBackbone stage maps used as U-Net skips, shallow to deep (strides 2, 4, 8, 16, 32)
RESNET_SKIP_LEVELS = ("stem", "layer1", "layer2", "layer3", "layer4")


def _match_channels(x: torch.Tensor, channels: int, owner: str) -> torch.Tensor:
    """Grey images offered to an RGB-trained encoder are repeated to its channel count (1 → C); anything else must
    already match."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, *x.shape[2:])
    raise ValueError(f"{owner}: input of shape {tuple(x.shape)} has {x.shape[1]} channels; expected {channels} (or 1)")


class ResNetUNet(nn.Module):
    """2D U-Net with a :class:`~medssl.networks.ResNetBackbone` encoder (Nguyen et al.'s downstream segmentation
    network).

    Args:
        out_channels: number of classes K (background included).
        in_channels: channels of the images the network is given (1: grey). When the encoder was pretrained on more
            channels (``encoder_in_channels``, e.g. 3 for an RGB / ImageNet trunk), grey inputs are repeated.
        encoder_in_channels: input channels of the encoder (default ``in_channels``); must equal the pretraining
            backbone's ``in_channels`` for its weights to load.
        layers, block, width, block_inplanes, bias_downsample: the encoder (:class:`ResNetBackbone` arguments;
            default ResNet-50 as the pretraining bundles build it).
        decoder_channels: output channels of the five decoder blocks, deep to shallow (strides 16, 8, 4, 2, 1).
        norm, act: MONAI norm / activation of the decoder convolutions.
        dropout: dropout in the decoder convolutions.

    Input ``(B, in_channels, H, W)`` with H, W multiples of 32 (the encoder's total stride; other sizes are padded
    inside the decoder's up-sampling, which only fixes off-by-one sizes); output logits ``(B, K, H, W)``.
    """

    def __init__(
        self,
        out_channels: int,
        in_channels: int = 1,
        encoder_in_channels: int | None = None,
        layers: Sequence[int] = (3, 4, 6, 3),
        block: str = "bottleneck",
        width: float = 1,
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
        bias_downsample: bool = False,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        norm: str | tuple = "batch",
        act: str | tuple = ("relu", {"inplace": True}),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(decoder_channels) != len(RESNET_SKIP_LEVELS):
            raise ValueError(
                f"ResNetUNet: decoder_channels={tuple(decoder_channels)} needs {len(RESNET_SKIP_LEVELS)} entries "
                "(strides 16, 8, 4, 2, 1)"
            )
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.encoder = ResNetBackbone(
            spatial_dims=2,
            in_channels=in_channels if encoder_in_channels is None else encoder_in_channels,
            layers=layers,
            block=block,
            width=width,
            block_inplanes=block_inplanes,
            bias_downsample=bias_downsample,
        )
        skips = [self.encoder.level_dims[name] for name in RESNET_SKIP_LEVELS]  # shallow -> deep
        skip_channels = list(reversed(skips[:-1])) + [0]  # layer3, layer2, layer1, stem, (full resolution: none)
        blocks = []
        previous = skips[-1]
        for skip, channels in zip(skip_channels, decoder_channels):
            blocks.append(UpCat(2, previous, skip, channels, act=act, norm=norm, bias=False, dropout=dropout))
            previous = channels
        self.decoder = nn.ModuleList(blocks)
        self.segmentation_head = Convolution(2, previous, out_channels, kernel_size=1, conv_only=True, bias=True)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The skip maps ``[stem, layer1, layer2, layer3, layer4]`` of a 2D batch (B, C, H, W)."""
        x = _match_channels(x, self.encoder.in_channels, type(self).__name__)
        features = self.encoder.forward_features(x, levels=RESNET_SKIP_LEVELS, pooled=False)
        return [features[name] for name in RESNET_SKIP_LEVELS]

    def forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, K, H, W). H and W that are not multiples of 32 (the encoder's stride) are
        zero-padded at the end for the network and the logits cropped back."""
        height, width = int(x.shape[-2]), int(x.shape[-1])
        pad_h, pad_w = (-height) % 32, (-width) % 32
        if pad_h or pad_w:
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h))
        skips = self.encode(x)
        y = skips[-1]
        for i, block in enumerate(self.decoder):
            skip_index = len(skips) - 2 - i
            y = block(y, skips[skip_index] if skip_index >= 0 else None)
        logits = self.segmentation_head(y)
        return logits[..., :height, :width] if pad_h or pad_w else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, K, H, W)."""
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: input of shape {tuple(x.shape)}; expected (B, C, H, W)")
        return self.forward_2d(x)


class SliceWiseResNetUNet(ResNetUNet):
    """The 2D :class:`ResNetUNet` applied to each axial slice of a volume, predictions stacked back (Nguyen et al., 3D).

    Input ``(B, C, X, Y, Z)`` with the DEPTH axis LAST: the Z slices ``x[..., z]`` (each ``(B, C, X, Y)``) go through
    the 2D network (as one batch of B·Z slices, or in chunks of ``slices_per_pass``) and the logits are put back at
    their z: output ``(B, K, X, Y, Z)``. A 4-D input ``(B, C, H, W)`` is segmented as a 2D batch. The module's
    state dict is the 2D network's (``encoder`` = the 2D ResNetBackbone), so a 2D encoder loads unchanged
    (``load_pretrained_encoder(..., slice_wise=True)``). Arguments as :class:`ResNetUNet` plus
    ``slices_per_pass`` (None: all slices at once).
    """

    def __init__(self, out_channels: int, *args, slices_per_pass: int | None = None, **kwargs) -> None:
        super().__init__(out_channels, *args, **kwargs)
        if slices_per_pass is not None and slices_per_pass < 1:
            raise ValueError(f"SliceWiseResNetUNet: slices_per_pass={slices_per_pass} must be >= 1 or None")
        self.slices_per_pass = slices_per_pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z), depth last -> logits (B, K, X, Y, Z); (B, C, H, W) -> (B, K, H, W)."""
        if x.dim() == 4:
            return self.forward_2d(x)
        if x.dim() != 5:
            raise ValueError(
                f"SliceWiseResNetUNet: input of shape {tuple(x.shape)}; expected (B, C, X, Y, Z) with depth last"
            )
        batch, channels, size_x, size_y, depth = x.shape
        slices = x.permute(0, 4, 1, 2, 3).reshape(batch * depth, channels, size_x, size_y)  # (B·Z, C, X, Y)
        if self.slices_per_pass is None:
            logits = self.forward_2d(slices)
        else:
            logits = torch.cat([self.forward_2d(chunk) for chunk in slices.split(self.slices_per_pass)], dim=0)
        return logits.reshape(batch, depth, logits.shape[1], size_x, size_y).permute(0, 2, 3, 4, 1)


class SegmentationHead(nn.Module):
    """UniMiSS's segmentation head: ConvTranspose (kernel = stride = 2) → Conv 3 (no bias) → InstanceNorm
    (affine) → LeakyReLU(0.01) → 1×1 conv to the classes. 2D or 3D by ``spatial_dims``; channel-first, 3D depth
    last."""

    def __init__(self, spatial_dims: int, in_channels: int, hidden_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upsample = UpSample(spatial_dims, in_channels, hidden_channels, scale_factor=2, mode="deconv")
        self.conv = Convolution(
            spatial_dims,
            hidden_channels,
            hidden_channels,
            kernel_size=3,
            norm=("instance", {"affine": True}),
            act=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
            bias=False,
        )
        self.classifier = Convolution(spatial_dims, hidden_channels, out_channels, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(self.upsample(x)))


class MiTSegmenter(nn.Module):
    """UniMiSS's MiT (encoder + symmetric decoder) with UniMiSS's segmentation head, 2D or 3D.

    The sub-module ``encoder`` is a one-path :class:`~medssl.networks.MiT` with its decoder: exactly the modules of
    the pretraining network that a ``spatial_dims``-D input uses, so an exported UniMiSS MiT (both paths) loads into
    it with the other path's tensors ignored. Its decoder's last map (``decoder3``, ``decoder_dims[-1]`` channels at
    1/4 of the input in-plane, 1/2 in depth) goes through :class:`SegmentationHead` (to 1/2 in-plane, full depth) and
    the logits are interpolated (bilinear / trilinear) to the input size — that last up-sampling is ours, the spec
    names the head's layers only. The MiT carries its SSL token through the decoder as in pretraining (the authors'
    downstream network drops it; keeping it lets every pretrained tensor load one-to-one).

    Args:
        out_channels: classes K (background included).
        spatial_dims: 2 (input ``(B, C, H, W)``) or 3 (input ``(B, C, X, Y, Z)``, DEPTH LAST).
        in_channels: channels of the images given to the network; grey inputs are repeated when the MiT path takes
            more (the 2D path of UniMiSS takes 3).
        variant: ``"tiny"`` or ``"small"`` (encoder / decoder depths, ``MIT_VARIANTS``).
        img_size: the input size the position embeddings are sized for (2D: 224 or (H, W); 3D: (X, Y, Z), e.g. the
            sliding-window patch); other sizes resample them.
        mit_in_channels: input channels of the MiT path (default: 3 in 2D, 1 in 3D, as UniMiSS).
        head_channels: hidden channels of the head (default: the decoder's last width).
        mit_kwargs: more :class:`MiT` arguments (dims, decoder_dims, num_heads, drop_path_rate...).

    Inputs must be 2D H, W multiples of 32, 3D X, Y multiples of 32 and Z a multiple of 16, at least 64 (×16).
    """

    def __init__(
        self,
        out_channels: int,
        spatial_dims: int = 3,
        in_channels: int = 1,
        variant: str = "small",
        img_size: int | Sequence[int] | None = None,
        mit_in_channels: int | None = None,
        head_channels: int | None = None,
        **mit_kwargs,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"MiTSegmenter: spatial_dims={spatial_dims}; expected 2 or 3")
        if variant not in MIT_VARIANTS:
            raise ValueError(f"MiTSegmenter: unknown variant {variant!r}; known: {sorted(MIT_VARIANTS)}")
        self.spatial_dims = spatial_dims
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        config = dict(MIT_VARIANTS[variant])
        config.update(mit_kwargs)
        mit_in = (3 if spatial_dims == 2 else 1) if mit_in_channels is None else int(mit_in_channels)
        if spatial_dims == 2:
            config["in_channels_2d"] = mit_in
            if img_size is not None:
                config["img_size_2d"] = img_size
        else:
            config["in_channels_3d"] = mit_in
            if img_size is not None:
                config["img_size_3d"] = tuple(img_size)
        self.mit_in_channels = mit_in
        self.encoder = MiT(spatial_dims=spatial_dims, decoder=True, **config)
        feature_channels = self.encoder.feature_dim  # decoder_dims[-1]
        self.head = SegmentationHead(
            spatial_dims, feature_channels, feature_channels if head_channels is None else head_channels, out_channels
        )
        self._mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self._decoder_output = f"decoder{len(self.encoder.decoder.dims)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) or (B, C, X, Y, Z) (depth last) -> logits of the same spatial size, K channels."""
        if x.dim() != self.spatial_dims + 2:
            layout = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, X, Y, Z) with depth last"
            raise ValueError(f"MiTSegmenter ({self.spatial_dims}D): input of shape {tuple(x.shape)}; expected {layout}")
        x = _match_channels(x, self.mit_in_channels, "MiTSegmenter")
        features = self.encoder.forward_features(x)[self._decoder_output]
        logits = self.head(features)
        return F.interpolate(logits, size=x.shape[2:], mode=self._mode, align_corners=False)
