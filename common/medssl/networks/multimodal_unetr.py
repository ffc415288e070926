"""MedCoSS's segmentation network (seed 004 appendix, Table 1): the MedCoSS encoder and a UNETR-style decoder, 2D or 3D.

:class:`MultiModalUNETR` keeps :class:`~medssl.networks.MultiModalViTEmbedder` as the sub-module ``encoder`` (so a
stage's ``encoder.pt`` loads into it key for key) and decodes the token maps of four of its blocks (4, 7, 10, 12 of
ViT-B, 1-based) as UNETR does (Hatamizadeh et al. 2022), with MONAI's UNETR blocks:

- the input image itself -> ``UnetrBasicBlock`` (``feature_size`` channels, full resolution);
- layer 4 -> ``UnetrPrUpBlock`` x 3 up-samplings (2 * feature_size, 1/2), layer 7 -> x 2 (4 * feature_size, 1/4),
  layer 10 -> x 1 (8 * feature_size, 1/8);
- layer 12 (1/16) -> four ``UnetrUpBlock`` (transposed conv x 2, concatenation with the skip, residual conv block)
  back to full resolution -> ``UnetOutBlock`` (1x1 conv to the classes).

MONAI's ``monai.networks.nets.UNETR`` builds its own ViT; ours adds the MedCoSS encoder (its tokenizers, LayerScale,
no final norm) in that decoder. The patch must be 16 in every axis (four x2 up-samplings). Inputs: 2D (B, C, X, Y),
3D (B, C, X, Y, Z) with the depth axis last, each side a multiple of 16 (other sizes than the pretraining's resample
the encoder's position table); grey inputs are repeated to the tokenizer's channels. Output: logits (B, K, *spatial).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

from .multimodal_vit import MultiModalViTEmbedder
from .segmentation import _match_channels

__all__ = ["MultiModalUNETR"]


class MultiModalUNETR(nn.Module):
    """See the module docstring.

    Args:
        encoder: a :class:`MultiModalViTEmbedder` of kind ``"2d"`` or ``"3d"`` (sets the spatial dims).
        out_channels: classes K, background included.
        in_channels: channels of the images the network is given (1: grey, repeated for a 3-channel tokenizer).
        layers: the four encoder blocks decoded, shallow to deep (1-based; ``(4, 7, 10, 12)`` for ViT-B).
        feature_size: channels of the full-resolution decoder level (UNETR's 16).
        norm_name: normalisation of the decoder's conv blocks ("instance", "batch").
        res_block: residual conv blocks, as UNETR.
    """

    def __init__(
        self,
        encoder: MultiModalViTEmbedder,
        out_channels: int,
        in_channels: int = 1,
        layers: Sequence[int] = (4, 7, 10, 12),
        feature_size: int = 16,
        norm_name: str = "instance",
        res_block: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, MultiModalViTEmbedder) or encoder.kind == "text":
            raise TypeError(
                f"MultiModalUNETR: encoder must be a 2d / 3d MultiModalViTEmbedder, got {type(encoder).__name__}"
                f"{' of kind text' if getattr(encoder, 'kind', None) == 'text' else ''}"
            )
        layers = tuple(int(i) for i in layers)
        depth = len(encoder.encoder.blocks)
        if len(layers) != 4 or list(layers) != sorted(set(layers)) or not 1 <= layers[0] or layers[-1] > depth:
            raise ValueError(f"MultiModalUNETR: layers {list(layers)} must be 4 increasing blocks in 1..{depth}")
        tokenizer = encoder.tokenizers[encoder.kind]
        if any(p != 16 for p in tokenizer.patch):
            raise ValueError(f"MultiModalUNETR: the encoder's patch {tokenizer.patch} must be 16 in every axis")
        self.encoder, self.kind, self.layers = encoder, encoder.kind, layers
        self.spatial_dims = 2 if self.kind == "2d" else 3
        self.in_channels, self.encoder_channels = int(in_channels), tokenizer.in_channels
        # the other kinds' tokenizers take no part: frozen, so DistributedDataParallel sees no unused parameter
        for name, module in encoder.tokenizers.items():
            module.requires_grad_(name == self.kind)
        d, f, n = encoder.dim, int(feature_size), self.spatial_dims
        common = dict(kernel_size=3, norm_name=norm_name, res_block=res_block)
        self.skip0 = UnetrBasicBlock(n, self.in_channels, f, stride=1, **common)
        pr_up = dict(stride=1, upsample_kernel_size=2, conv_block=True, **common)  # layer 4 / 7 / 10: x8 / x4 / x2
        self.skip1 = UnetrPrUpBlock(n, d, 2 * f, num_layer=2, **pr_up)
        self.skip2 = UnetrPrUpBlock(n, d, 4 * f, num_layer=1, **pr_up)
        self.skip3 = UnetrPrUpBlock(n, d, 8 * f, num_layer=0, **pr_up)
        self.up3 = UnetrUpBlock(n, d, 8 * f, upsample_kernel_size=2, **common)
        self.up2 = UnetrUpBlock(n, 8 * f, 4 * f, upsample_kernel_size=2, **common)
        self.up1 = UnetrUpBlock(n, 4 * f, 2 * f, upsample_kernel_size=2, **common)
        self.up0 = UnetrUpBlock(n, 2 * f, f, upsample_kernel_size=2, **common)
        self.out = UnetOutBlock(n, f, int(out_channels))
        self.out_channels = int(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"MultiModalUNETR: expected ({', '.join(['B', 'C', 'X', 'Y', 'Z'][: self.spatial_dims + 2])}) with "
                f"C = {self.in_channels}, got {tuple(x.shape)}"
            )
        hidden, grid = self.encoder.forward_layers(
            _match_channels(x, self.encoder_channels, "MultiModalUNETR"), self.kind, self.layers
        )
        maps = [h[:, 1:].transpose(1, 2).reshape(h.shape[0], h.shape[2], *grid) for h in hidden]
        y = self.up3(maps[3], self.skip3(maps[2]))
        y = self.up2(y, self.skip2(maps[1]))
        y = self.up1(y, self.skip1(maps[0]))
        y = self.up0(y, self.skip0(x))
        return self.out(y)
