"""The hybrid volume encoder of Nguyen et al. (joint image-volume SSL, AAAI 2023): f_intra (slice CNN) + f_inter
(deformable transformer over slices).

``HybridVolumeEncoder(num_slices=64, embed_dim=640)``:

1. the volume (B, C, X, Y, Z), depth LAST (MONAI / RAS: Z = inferior → superior), is cropped or zero-padded along Z
   to F = ``num_slices`` slices (:func:`crop_or_pad_slices`, centred; the paper crops / pads inputs to 64 × 128 × 128);
2. f_intra (:class:`~medssl.networks.slice_encoder.SliceEncoder`) embeds every slice: (B, F, D);
3. (stage 2) a learnable [MASK] embedding replaces the embeddings of the masked slices (:meth:`mask_slices`);
4. f_inter (:class:`~medssl.networks.deformable_attention.DeformableSliceTransformer`) contextualises them: (B, F, D);
5. the volume embedding Z is the L2-normalised mean over slices: (B, D).

A 2D image (B, C, H, W) goes through f_intra only and gives its slice embedding (B, D) (not normalised).

Stages (Nguyen et al. 2023): stage 1 trains ``slice_encoder`` alone on 2D slices / images; stage 2 freezes it and trains
``slice_transformer`` + ``mask_embedding`` (+ the method's f_decode) by masked slice-embedding prediction
(``embed_slices`` → ``mask_slices`` → ``contextualize``); stage 3 trains everything on the volume embeddings.

Parameters (F = 64, D = 640, defaults; prototypes excluded), see :meth:`HybridVolumeEncoder.parameter_breakdown`:

============  ===========  ========================
part          this module  authors' code (31.16 M)
============  ===========  ========================
trunk          23,508,032   23,508,032
projection      3,768,960    3,768,960
transformer     7,647,016    3,885,892
[MASK]                640   (in their stage-2 model)
total          34,924,648   31,162,884
============  ===========  ========================

The +12 % comes from the transformer: the authors' ``DeformableAttention1D(dim=n_frames)`` takes the 64 frames as
its channels and attends over the 640 feature positions ("frames-as-channels", see
:mod:`medssl.networks.deformable_attention`), so its projections are 64 × 64 matrices. We attend over the slices as
the paper describes, with 6 heads × 64 and full query / key / value / output projections (4 × ~246 k per layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .deformable_attention import DeformableSliceTransformer, volume_embedding
from .slice_encoder import SliceEncoder

__all__ = [
    "HybridVolumeEncoder",
    "HybridVolumeBackbone",
    "crop_or_pad_slices",
    "random_slice_mask",
    "REFERENCE_PARAMETER_COUNTS",
]

#: Parameter counts of the authors' model (Nguyen et al. 2023: 31.16 M in total), prototypes excluded.
REFERENCE_PARAMETER_COUNTS = {
    "trunk": 23_508_032,
    "projection": 3_768_960,
    "transformer": 3_885_892,
    "total": 31_162_884,
}


def crop_or_pad_slices(
    volume: torch.Tensor, num_slices: int, start: int | None = None, pad_value: float = 0.0
) -> torch.Tensor:
    """Crop or pad the LAST (depth) axis of a volume to exactly ``num_slices`` slices.

    Args:
        volume: (..., Z) tensor, e.g. a MONAI volume (C, X, Y, Z) or a batch (B, C, X, Y, Z), depth last.
        num_slices: F.
        start: first kept slice when cropping (None: centred, (Z − F) // 2); ignored when padding.
        pad_value: value of the added slices; padding is split evenly before / after (the extra one after).
    Returns:
        (..., F) tensor; the input itself when Z == F.
    """
    if volume.dim() < 1 or num_slices < 1:
        raise ValueError(f"crop_or_pad_slices: num_slices={num_slices} for a volume of shape {tuple(volume.shape)}")
    depth = volume.shape[-1]
    if depth == num_slices:
        return volume
    if depth > num_slices:
        first = (depth - num_slices) // 2 if start is None else int(start)
        if not 0 <= first <= depth - num_slices:
            raise ValueError(
                f"crop_or_pad_slices: start={start} outside 0..{depth - num_slices} for {depth} slices cropped to "
                f"{num_slices}"
            )
        return volume[..., first : first + num_slices]
    before = (num_slices - depth) // 2
    return F.pad(volume, (before, num_slices - depth - before), value=pad_value)


def random_slice_mask(
    batch_size: int,
    num_slices: int,
    ratio: float = 0.1,
    *,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Masks for masked slice-embedding prediction: (B, F) bool with exactly ceil(ratio · F) True per volume (at
    least one; 7 of 64 for the paper's 10 %), drawn uniformly without replacement with ``generator`` (a CPU
    ``torch.Generator`` seeded by the caller — never the global RNG); the mask is then moved to ``device``."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"random_slice_mask: ratio must be in (0, 1), got {ratio}")
    if not isinstance(generator, torch.Generator):
        raise TypeError("random_slice_mask: pass a seeded torch.Generator (generator=...); the global RNG is not used")
    count = max(1, math.ceil(ratio * num_slices - 1e-9))
    scores = torch.rand(batch_size, num_slices, generator=generator)
    chosen = scores.argsort(dim=1)[:, :count]
    mask = torch.zeros(batch_size, num_slices, dtype=torch.bool)
    mask.scatter_(1, chosen, True)
    return mask.to(device) if device is not None else mask


def _count(module: nn.Module | nn.Parameter) -> int:
    if isinstance(module, nn.Parameter):
        return module.numel()
    return sum(p.numel() for p in module.parameters())


class HybridVolumeEncoder(nn.Module):
    """f_intra + f_inter of Nguyen et al. 2023: volume (B, C, X, Y, Z), depth last -> volume embedding Z (B, D).

    Args:
        num_slices: F (64): volumes are cropped / padded to F slices (``fit_slices``); size of the position tables.
        embed_dim: D (640).
        in_channels: trunk input channels (3, the reference trunk; grey-level input is repeated).
        feature_levels: L last trunk levels in the multi-level slice feature (5 → 5888-d).
        layers, block_inplanes, backbone_kwargs: the ResNet trunk (ResNet-50 by default).
        chunk_size, checkpoint: slice chunking / activation checkpointing of f_intra (see :class:`SliceEncoder`).
        fit_slices: crop (centred) / zero-pad volumes whose depth is not F; False: use every slice as given.
        **transformer_kwargs: passed once, by keyword, to f_inter (:class:`DeformableSliceTransformer`, which gets
            ``embed_dim`` and ``num_slices`` from here): num_layers, num_heads, head_dim, offset_groups, downsample,
            offset_kernel_size, offset_scale, ffn_dim, dropout, attention_dropout, positional_encoding (its defaults:
            4 layers, 6 heads × 64, 6 groups, r = 4, k = 6, s = 2, FFN 720, dropout 0.1, sinusoidal positions).

    Sub-modules: ``slice_encoder`` (f_intra; its ``backbone`` is the ResNet trunk), ``slice_transformer`` (f_inter),
    ``mask_embedding`` (the learnable [MASK] of stage 2, (D,)).
    """

    def __init__(
        self,
        num_slices: int = 64,
        embed_dim: int = 640,
        in_channels: int = 3,
        feature_levels: int | str | Sequence[str] = 5,
        layers: Sequence[int] = (3, 4, 6, 3),
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
        backbone_kwargs: dict | None = None,
        chunk_size: int | None = 64,
        checkpoint: bool = False,
        fit_slices: bool = True,
        **transformer_kwargs: Any,
    ) -> None:
        super().__init__()
        self.num_slices = num_slices
        self.embed_dim = embed_dim
        self.fit_slices = fit_slices
        self.slice_encoder = SliceEncoder(
            in_channels=in_channels,
            embed_dim=embed_dim,
            feature_levels=feature_levels,
            layers=layers,
            block_inplanes=block_inplanes,
            chunk_size=chunk_size,
            checkpoint=checkpoint,
            backbone_kwargs=backbone_kwargs,
        )
        self.slice_transformer = DeformableSliceTransformer(
            embed_dim=embed_dim, num_slices=num_slices, **transformer_kwargs
        )
        self.mask_embedding = nn.Parameter(torch.zeros(embed_dim))
        nn.init.trunc_normal_(self.mask_embedding, std=0.02)

    def fit(self, volume: torch.Tensor) -> torch.Tensor:
        """Crop (centred) / zero-pad the depth (last) axis of (B, C, X, Y, Z) to F slices when ``fit_slices``."""
        return crop_or_pad_slices(volume, self.num_slices) if self.fit_slices else volume

    def embed_slices(self, volume: torch.Tensor) -> torch.Tensor:
        """f_intra on every slice: (B, C, X, Y, Z), depth last -> (B, F, D) slice embeddings."""
        if volume.dim() != 5:
            raise ValueError(
                f"HybridVolumeEncoder.embed_slices: (B, C, X, Y, Z) volume expected (depth last), got "
                f"{tuple(volume.shape)}"
            )
        return self.slice_encoder(self.fit(volume))

    def mask_slices(self, slice_embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace the embeddings of masked slices by the learnable [MASK] embedding.

        Args:
            slice_embeddings: (B, F, D).
            mask: (B, F) bool, True = masked (see :func:`random_slice_mask`).
        """
        if mask.shape != slice_embeddings.shape[:2] or slice_embeddings.shape[-1] != self.embed_dim:
            raise ValueError(
                f"HybridVolumeEncoder.mask_slices: mask of shape {tuple(mask.shape)} for slice embeddings "
                f"{tuple(slice_embeddings.shape)}; expected (B, F) and (B, F, {self.embed_dim})"
            )
        token = self.mask_embedding.to(slice_embeddings.dtype).expand_as(slice_embeddings)
        return torch.where(mask.to(torch.bool).unsqueeze(-1), token, slice_embeddings)

    def contextualize(self, slice_embeddings: torch.Tensor) -> torch.Tensor:
        """f_inter: (B, F, D) slice embeddings -> (B, F, D) contextualised slice embeddings."""
        return self.slice_transformer(slice_embeddings)

    @staticmethod
    def pool(contextual: torch.Tensor) -> torch.Tensor:
        """Volume embedding Z: L2-normalised mean over slices, (B, F, D) -> (B, D)."""
        return volume_embedding(contextual)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, X, Y, Z) volume, depth last -> volume embedding Z (B, D), L2-normalised (``mask`` (B, F): slices
        replaced by [MASK] before f_inter). (B, C, H, W) image -> its slice embedding f_intra(x) (B, D)."""
        if x.dim() == 4:
            if mask is not None:
                raise ValueError("HybridVolumeEncoder: a slice mask was given for a 2D image batch (B, C, H, W)")
            return self.slice_encoder(x)
        slices = self.embed_slices(x)
        if mask is not None:
            slices = self.mask_slices(slices, mask)
        return self.pool(self.contextualize(slices))

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameter counts: trunk (ResNet), projection (Linear 5888 → D), transformer (f_inter), mask_embedding,
        total. Compare with :data:`REFERENCE_PARAMETER_COUNTS`."""
        parts = {
            "trunk": _count(self.slice_encoder.backbone),
            "projection": _count(self.slice_encoder.projection),
            "transformer": _count(self.slice_transformer),
            "mask_embedding": _count(self.mask_embedding),
        }
        parts["total"] = sum(parts.values())
        return parts


class HybridVolumeBackbone(HybridVolumeEncoder):
    """:class:`~medssl.networks.HybridVolumeEncoder` as a backbone of the clustering methods (stage 3).

    Same arguments, sub-modules and state-dict keys; adds ``feature_dim`` = D, the size of the volume embedding Z
    that ``forward`` returns for a (B, C, X, Y, Z) volume (depth last), which :class:`medssl.methods.SwAV` and
    :class:`medssl.methods.DeepClusterV2` read. The [MASK] embedding (``mask_embedding``), which a backbone's forward
    never uses, does not require a gradient (an unused trainable parameter stops DistributedDataParallel);
    :class:`medssl.methods.joint_volume.MaskedSliceEmbeddingPrediction` makes it trainable again for stage 2.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mask_embedding.requires_grad_(False)

    @property
    def feature_dim(self) -> int:
        return int(self.embed_dim)
