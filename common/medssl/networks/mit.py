"""MiT, the dimension-free medical transformer of UniMiSS: one network for 2D images and 3D volumes.

Architecture (paper: Xie et al., "UniMiSS: Universal Medical Self-Supervised Learning via Breaking Dimensionality
Barrier", ECCV 2022; the numbers below are those of the authors' code, YtongXie/UniMiSS-code):

- **Switchable patch embedding (SPE)**: the input's rank picks the path, ``(B, C, H, W)`` → 2D, ``(B, C, X, Y, Z)``
  → 3D. Each path has its own stem (Conv k7 s2 p3 → InstanceNorm(affine) → LeakyReLU(0.01); the 3D stem keeps the
  depth axis: stride (2, 2, 1)) and four stage embeddings (Conv k3 s2 p1 → InstanceNorm → LeakyReLU). Only these
  convs, the spatial-reduction convs and the position embeddings are per-dimension; the transformer blocks, the SSL
  token and its stage projections are shared by both paths.
- **Pyramid encoder**: dims [48, 128, 256, 512], depths [2, 3, 4, 3] (small) / [1, 1, 1, 1] (tiny), heads
  [1, 2, 4, 8], spatial-reduction ratios [6, 4, 2, 1], MLP ratio 4, qkv bias, LayerNorm eps 1e-6, no final norm.
- **Spatial-reduction attention (SRA)**: queries from all tokens; keys / values from ``[SSL token ; Conv(kernel =
  stride = r)(patch tokens on their grid)]`` followed by LayerNorm (a Conv2d or a cubic Conv3d per block). The
  attention itself is ``torch.nn.functional.scaled_dot_product_attention`` (``attention="explicit"`` computes
  softmax(QKᵀ/√d)V by hand instead, for benchmarks and checks).
- **SSL token**: a learnable (1, 1, 48) token prepended at stage 1, carried to the next stage by Linear 48→128→256→512
  (and through the decoder by Linear 512→256→128→48). Learnable absolute position embeddings per stage and per path,
  sized for the reference inputs (2D 224², 3D 96×96×16) and resampled (bicubic 2D, trilinear 3D) for other sizes.
- **Symmetric decoder** (``decoder=True``, the default as in the reference): 3 stages, dims [256, 128, 48], depths
  [3, 4, 3] (small) / [1, 1, 1] (tiny), heads [8, 4, 2], sr [2, 4, 6], no qkv bias, LayerNorm eps 1e-5; each stage
  up-samples with ConvTranspose(k2, s2) and adds the encoder map of the same resolution (skip); final LayerNorm(48).

Outputs (see :meth:`MiT.forward_features`):

- ``forward(x) -> (B, feature_dim)``: the SSL-token embedding, the pretraining output — the decoder's normed 48-d
  token with ``decoder=True``, the encoder's 512-d token with ``decoder=False`` (classification: FC on it).
- ``forward_features(x) -> dict``: the stem and the four encoder maps (channel-first), the encoder's last tokens
  ``(B, 1 + N, 512)`` (SSL token first), the decoder maps (segmentation) and the SSL tokens.

Axis convention: channel-first. 2D images ``(B, C, H, W)`` as the loader gives them (medssl's readers give PNG /
DICOM images column-index first); 3D volumes ``(B, C, X, Y, Z)`` with the DEPTH axis LAST (MONAI / RAS: Z = inferior
→ superior, axial slices in the X, Y plane). The reference code works on ``(B, C, D, H, W)`` = (Z, X, Y) crops with
stem stride (1, 2, 2); here the same network is expressed on (X, Y, Z): stem stride (2, 2, 1) and position-embedding
grids (24, 24, 8) / (12, 12, 4) / (6, 6, 2) / (3, 3, 1) for a 96×96×16 input. All other kernels are cubic, so only
the weights (not the layer shapes) depend on the axis order: ``medssl.weights.convert_unimiss`` permutes the
reference's 3D kernels and position embeddings from (D, H, W) to (H, W, D) = (X, Y, Z) when it converts a published
checkpoint (and transposes the 2D ones to the column-first order of medssl's 2D loader).

Variants: ``spatial_dims=2`` or ``3`` builds one path only (the other path's modules do not exist), ``decoder=False``
the encoder alone. Parameter counts equal those of the authors' released models, e.g. ``mit_small()`` 43,942,944
and ``mit_small(decoder=False)`` 28,523,888.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from .mit_blocks import (
    ConvNormAct,
    Grid,
    SpatialReductionAttention,
    _check_attention,
    _down,
    _feature_map,
    _key,
    _tokens,
    _transformer_stages,
    resample_position_embedding,
)

__all__ = ["MiT", "mit_tiny", "mit_small", "MIT_VARIANTS"]

# encoder / decoder hyper-parameters of the two published variants (the authors' code, UniMiss_tiny / UniMiss_small)
MIT_VARIANTS: dict[str, dict[str, tuple[int, ...]]] = {
    "tiny": {"depths": (1, 1, 1, 1), "decoder_depths": (1, 1, 1)},
    "small": {"depths": (2, 3, 4, 3), "decoder_depths": (3, 4, 3)},
}


def _position_embeddings(spatial_dims: Sequence[int], pos_grids: dict[int, list[Grid]], dims: Sequence[int]):
    """One learnable (1, 1 + cells, dim) position embedding per stage and path (SSL token first), zero-initialised."""
    return nn.ModuleDict(
        {
            _key(d): nn.ParameterList(
                nn.Parameter(torch.zeros(1, 1 + math.prod(grid), dim)) for grid, dim in zip(pos_grids[d], dims)
            )
            for d in spatial_dims
        }
    )


class _MiTStages(nn.Module):
    """What the encoder and the decoder share: a stage's token sequence (SSL token + the map's cells) gets the stage's
    position embedding (resampled to the map's grid) and dropout, then goes through the stage's blocks."""

    def __init__(
        self, dims: Sequence[int], depths: Sequence[int], sr_ratios: Sequence[int], pos_grids: dict[int, list[Grid]]
    ) -> None:
        super().__init__()
        self.dims, self.depths, self.sr_ratios = tuple(dims), tuple(depths), tuple(sr_ratios)
        self.pos_grids = pos_grids

    def _run_stage(self, i: int, token: torch.Tensor, feature: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """(tokens (B, 1 + cells, C) after stage ``i``'s blocks, the grid) for the (B, 1, C) token and (B, C, *grid)
        map entering stage ``i``."""
        d = feature.dim() - 2
        grid = tuple(feature.shape[2:])
        tokens = torch.cat((token, _tokens(feature)), dim=1)
        tokens = self.pos_drop(
            tokens + resample_position_embedding(self.pos_embed[_key(d)][i], self.pos_grids[d][i], grid)
        )
        for block in self.stages[i]:
            tokens = block(tokens, grid)
        return tokens, grid


class MiTEncoder(_MiTStages):
    """The pyramid encoder: switchable patch embedding, 4 transformer stages, the SSL token. See :class:`MiT`.
    ``block_kwargs`` (``mlp_ratio``, ``attn_drop``, ``attention``) go to every :class:`TransformerBlock`."""

    def __init__(
        self,
        spatial_dims: Sequence[int],
        in_channels_2d: int,
        in_channels_3d: int,
        dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        sr_ratios: Sequence[int],
        pos_grids: dict[int, list[Grid]],
        stem_channels: int,
        drop_rate: float,
        drop_path_rates: Sequence[float],
        **block_kwargs: Any,
    ) -> None:
        super().__init__(dims, depths, sr_ratios, pos_grids)
        in_channels = {2: in_channels_2d, 3: in_channels_3d}
        stem_stride = {2: 2, 3: (2, 2, 1)}  # the 3D stem keeps the depth axis (last)
        self.stem = nn.ModuleDict(
            {_key(d): ConvNormAct(d, in_channels[d], stem_channels, 7, stem_stride[d], 3) for d in spatial_dims}
        )
        widths = [stem_channels, *dims]
        self.patch_embed = nn.ModuleDict(
            {
                _key(d): nn.ModuleList(ConvNormAct(d, widths[i], widths[i + 1], 3, 2, 1) for i in range(len(dims)))
                for d in spatial_dims
            }
        )
        self.pos_embed = _position_embeddings(spatial_dims, pos_grids, dims)
        self.ssl_token = nn.Parameter(torch.zeros(1, 1, dims[0]))
        # the SSL token of stage s + 1 is a linear map of stage s's output token
        self.ssl_token_proj = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(len(dims) - 1))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = iter(drop_path_rates)
        self.stages = _transformer_stages(
            dims, num_heads, sr_ratios, depths, rates, qkv_bias=True, norm_eps=1e-6, spatial_dims=spatial_dims,
            drop=drop_rate, **block_kwargs,
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"stem", "encoder1".."encoder4": maps (B, C, *grid), "encoder_tokens": (B, 1 + N4, C4),
        "encoder_token": (B, C4)}`` for a 2D ``(B, C, H, W)`` or 3D ``(B, C, X, Y, Z)`` (depth last) input."""
        key = _key(x.dim() - 2)
        out: dict[str, torch.Tensor] = {}
        feature = self.stem[key](x)
        out["stem"] = feature
        token = self.ssl_token.expand(x.shape[0], -1, -1)
        for i in range(len(self.stages)):
            feature = self.patch_embed[key][i](feature)
            if i > 0:
                token = self.ssl_token_proj[i - 1](token)
            tokens, grid = self._run_stage(i, token, feature)
            token, feature = tokens[:, :1], _feature_map(tokens[:, 1:], grid)
            out[f"encoder{i + 1}"] = feature
        out["encoder_tokens"] = tokens
        out["encoder_token"] = tokens[:, 0]
        return out


class MiTDecoder(_MiTStages):
    """The symmetric decoder: ConvTranspose up-sampling, encoder skips, transformer stages, SSL token, final norm.
    ``block_kwargs`` (``mlp_ratio``, ``attn_drop``, ``attention``) go to every :class:`TransformerBlock`."""

    def __init__(
        self,
        spatial_dims: Sequence[int],
        encoder_dim: int,
        dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        sr_ratios: Sequence[int],
        pos_grids: dict[int, list[Grid]],
        drop_rate: float,
        drop_path_rates: Sequence[float],
        **block_kwargs: Any,
    ) -> None:
        super().__init__(dims, depths, sr_ratios, pos_grids)
        widths = [encoder_dim, *dims]
        convs = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
        self.upsample = nn.ModuleDict(
            {
                _key(d): nn.ModuleList(
                    convs[d](widths[i], widths[i + 1], kernel_size=2, stride=2) for i in range(len(dims))
                )
                for d in spatial_dims
            }
        )
        self.pos_embed = _position_embeddings(spatial_dims, pos_grids, dims)
        self.ssl_token_proj = nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(len(dims)))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = iter(drop_path_rates)
        self.stages = _transformer_stages(
            dims, num_heads, sr_ratios, depths, rates, qkv_bias=False, norm_eps=1e-5, spatial_dims=spatial_dims,
            drop=drop_rate, **block_kwargs,
        )
        self.norm = nn.LayerNorm(dims[-1])

    def forward(self, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"decoder1".."decoder3": maps (B, C, *grid) (the last one after the final LayerNorm),
        "decoder_token": (B, C)}`` from the encoder's outputs (its last tokens and its maps as skips)."""
        feature = encoded["encoder4"]
        key = _key(feature.dim() - 2)
        token = encoded["encoder_token"].unsqueeze(1)
        n_stages = len(self.stages)
        out: dict[str, torch.Tensor] = {}
        for i in range(n_stages):
            feature = self.upsample[key][i](feature)
            skip = encoded[f"encoder{n_stages - i}"]
            if feature.shape != skip.shape:
                raise ValueError(
                    f"MiT decoder stage {i + 1}: up-sampled map {tuple(feature.shape)} does not match the encoder "
                    f"skip {tuple(skip.shape)}; with the decoder, 2D inputs need H, W multiples of 32 and 3D inputs "
                    "X, Y multiples of 32 and Z (depth) a multiple of 16"
                )
            token = self.ssl_token_proj[i](token)
            tokens, grid = self._run_stage(i, token, feature + skip)
            if i == n_stages - 1:
                tokens = self.norm(tokens)
            token, feature = tokens[:, :1], _feature_map(tokens[:, 1:], grid)
            out[f"decoder{i + 1}"] = feature
        out["decoder_token"] = token[:, 0]
        return out


class MiT(nn.Module):
    """UniMiSS's MiT: one transformer for 2D images and 3D volumes (see the module docstring).

    Args:
        spatial_dims: the paths to build: ``(2, 3)`` (default, the reference), ``2`` or ``3``.
        decoder: build the symmetric decoder (default, the pretraining network); ``False`` = encoder alone.
        in_channels_2d / in_channels_3d: input channels of the 2D (3, RGB or grey repeated) and 3D (1) paths.
        img_size_2d: the 2D input size the position embeddings are sized for (224 → 56², 28², 14², 7² grids).
        img_size_3d: the 3D input size (X, Y, Z), depth last, the embeddings are sized for (the reference's
            16×96×96 D×H×W crops are (96, 96, 16) here).
        dims / depths / num_heads / sr_ratios: encoder stages. decoder_dims / decoder_depths / decoder_num_heads /
            decoder_sr_ratios: decoder stages (``decoder_dims[-1]`` is the pretraining embedding size).
        stem_channels: output channels of the stem conv (32).
        mlp_ratio: MLP hidden size / dim (4).
        drop_rate / attn_drop_rate / drop_path_rate: dropout after the position embedding, in the MLP and after the
            projection / on the attention weights / stochastic depth, linearly increasing over the blocks of the
            encoder and of the decoder. All 0 by default (the reference's drop-path rate never reaches its blocks).
        attention: ``"sdpa"`` (``F.scaled_dot_product_attention``) or ``"explicit"`` (softmax(QKᵀ/√d)V written out);
            :meth:`set_attention` switches a built model.

    Attributes:
        paths: the built paths, e.g. ``(2, 3)``; spatial_dims: the single path's int for a one-path model, else None.
        feature_dim: size of ``forward``'s output (48 with the decoder, 512 without).
        feature_channels: channels of every map returned by :meth:`forward_features`.
    """

    def __init__(
        self,
        spatial_dims: int | Sequence[int] = (2, 3),
        decoder: bool = True,
        in_channels_2d: int = 3,
        in_channels_3d: int = 1,
        img_size_2d: int | Sequence[int] = 224,
        img_size_3d: Sequence[int] = (96, 96, 16),
        dims: Sequence[int] = (48, 128, 256, 512),
        depths: Sequence[int] = (2, 3, 4, 3),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        sr_ratios: Sequence[int] = (6, 4, 2, 1),
        decoder_dims: Sequence[int] = (256, 128, 48),
        decoder_depths: Sequence[int] = (3, 4, 3),
        decoder_num_heads: Sequence[int] = (8, 4, 2),
        decoder_sr_ratios: Sequence[int] = (2, 4, 6),
        stem_channels: int = 32,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attention: str = "sdpa",
    ) -> None:
        super().__init__()
        paths = (spatial_dims,) if isinstance(spatial_dims, int) else tuple(int(d) for d in spatial_dims)
        if not paths or any(d not in (2, 3) for d in paths) or len(set(paths)) != len(paths):
            raise ValueError(f"MiT: spatial_dims={spatial_dims!r}; expected 2, 3 or (2, 3)")
        self.paths = tuple(sorted(paths))
        self.spatial_dims = self.paths[0] if len(self.paths) == 1 else None
        n_stages = len(dims)
        for name, value in (("depths", depths), ("num_heads", num_heads), ("sr_ratios", sr_ratios)):
            if len(value) != n_stages:
                raise ValueError(f"MiT: {name}={tuple(value)} must have one entry per encoder stage ({n_stages})")
        if decoder:
            for name, value in (
                ("decoder_depths", decoder_depths),
                ("decoder_num_heads", decoder_num_heads),
                ("decoder_sr_ratios", decoder_sr_ratios),
            ):
                if len(value) != len(decoder_dims):
                    raise ValueError(f"MiT: {name}={tuple(value)} must have one entry per decoder stage")
            if len(decoder_dims) >= n_stages:
                raise ValueError(
                    f"MiT: {len(decoder_dims)} decoder stages need at least {len(decoder_dims) + 1} encoder stages, "
                    f"got {n_stages}"
                )
            expected = tuple(reversed(tuple(dims)[: len(decoder_dims)]))
            if tuple(decoder_dims) != expected:
                raise ValueError(f"MiT: decoder_dims={tuple(decoder_dims)} must mirror the encoder's: {expected}")
        self.img_size_2d = (img_size_2d, img_size_2d) if isinstance(img_size_2d, int) else tuple(img_size_2d)
        self.img_size_3d = tuple(img_size_3d)
        if len(self.img_size_2d) != 2 or len(self.img_size_3d) != 3:
            raise ValueError(f"MiT: img_size_2d={img_size_2d!r} needs 2 sizes, img_size_3d={img_size_3d!r} needs 3")
        self.in_channels_2d, self.in_channels_3d = in_channels_2d, in_channels_3d
        self.in_channels = {2: in_channels_2d, 3: in_channels_3d}[self.paths[0]] if len(self.paths) == 1 else None
        self.attention = _check_attention(attention)

        # position-embedding grids of every stage for the reference input sizes, per path (depth last in 3D)
        encoder_grids: dict[int, list[Grid]] = {}
        for d in (2, 3):
            grid = self._stem_grid(self.img_size_2d if d == 2 else self.img_size_3d)
            encoder_grids[d] = []
            for _ in range(n_stages):
                grid = tuple(_down(s) for s in grid)
                encoder_grids[d].append(grid)
        n_blocks = sum(depths) + (sum(decoder_depths) if decoder else 0)
        # stochastic-depth rate rising linearly 0 -> drop_path_rate over the blocks (python floats: meta-device safe)
        rates = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        block_kwargs = {"mlp_ratio": mlp_ratio, "attn_drop": attn_drop_rate, "attention": attention}
        self.encoder = MiTEncoder(
            self.paths,
            in_channels_2d,
            in_channels_3d,
            dims,
            depths,
            num_heads,
            sr_ratios,
            {d: encoder_grids[d] for d in self.paths},
            stem_channels,
            drop_rate,
            rates[: sum(depths)],
            **block_kwargs,
        )
        self.decoder: MiTDecoder | None = None
        if decoder:
            n_dec = len(decoder_dims)
            decoder_grids = {d: [encoder_grids[d][n_stages - 2 - i] for i in range(n_dec)] for d in self.paths}
            self.decoder = MiTDecoder(
                self.paths,
                dims[-1],
                decoder_dims,
                decoder_depths,
                decoder_num_heads,
                decoder_sr_ratios,
                decoder_grids,
                drop_rate,
                rates[sum(depths) :],
                **block_kwargs,
            )
        self.feature_dim = int(decoder_dims[-1]) if decoder else int(dims[-1])
        self.feature_channels: dict[str, int] = {"stem": stem_channels}
        self.feature_channels.update({f"encoder{i + 1}": int(c) for i, c in enumerate(dims)})
        if decoder:
            self.feature_channels.update({f"decoder{i + 1}": int(c) for i, c in enumerate(decoder_dims)})
        self._init_weights()

    @staticmethod
    def _stem_grid(size: Sequence[int]) -> Grid:
        if len(size) == 2:
            return tuple(_down(s) for s in size)
        return (_down(size[0]), _down(size[1]), size[2])  # stride (2, 2, 1): depth kept

    def _init_weights(self) -> None:
        """The reference's initialisation: trunc-normal(0.02) Linear weights and embeddings, zero Linear biases,
        Kaiming-normal (fan_out) conv weights, unit / zero norm affines (transposed convs keep PyTorch's default)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, (nn.LayerNorm, nn.InstanceNorm2d, nn.InstanceNorm3d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if ".pos_embed." in f".{name}" or name.endswith("ssl_token"):
                nn.init.trunc_normal_(param, std=0.02)

    # ------------------------------------------------------------------ inputs
    def _check_input(self, x: torch.Tensor) -> None:
        d = x.dim() - 2
        if d not in self.paths:
            built = " and ".join(f"{p}D" for p in self.paths)
            layouts = {2: "(B, C, H, W)", 3: "(B, C, X, Y, Z) with depth last"}
            expected = " or ".join(layouts[p] for p in self.paths)
            raise ValueError(f"MiT ({built} path): input of shape {tuple(x.shape)}; expected {expected}")
        channels = self.in_channels_2d if d == 2 else self.in_channels_3d
        if x.shape[1] != channels:
            layout = "(B, C, H, W)" if d == 2 else "(B, C, X, Y, Z), depth last"
            raise ValueError(
                f"MiT {d}D path: input of shape {tuple(x.shape)} has {x.shape[1]} channels; expected {channels} "
                f"({layout})"
            )
        grid = self._stem_grid(tuple(x.shape[2:]))
        for i, ratio in enumerate(self.encoder.sr_ratios):
            grid = tuple(_down(s) for s in grid)
            if min(grid) < ratio or math.prod(grid) < 2:
                problem = (
                    f"encoder stage {i + 1} would have a {'×'.join(map(str, grid))} token grid, which its spatial "
                    f"reduction (ratio {ratio}) and instance norm cannot take (the smallest inputs are 64×64 in 2D and "
                    "64×64×16 in 3D)"
                )
                if d == 3 and x.shape[2] < x.shape[4]:  # e.g. (B, C, 16, 96, 96): the depth axis given first
                    raise ValueError(
                        f"MiT 3D path: input of shape {tuple(x.shape)} looks depth-first: volumes are (B, C, X, Y, Z), "
                        f"depth last (move the depth axis with x.movedim(2, -1)); as given, {problem}"
                    )
                layout = " (volumes are (B, C, X, Y, Z), depth last)" if d == 3 else ""
                raise ValueError(f"MiT {d}D path: input of shape {tuple(x.shape)} is too small{layout}: {problem}")

    # ------------------------------------------------------------------ outputs
    def forward_features(self, x: torch.Tensor, decode: bool = True) -> dict[str, torch.Tensor]:
        """All outputs of one forward pass, as ``{name: tensor}``.

        Args:
            x: a 2D batch ``(B, C, H, W)`` or a 3D batch ``(B, C, X, Y, Z)`` with the DEPTH axis LAST; the rank picks
                the path.
            decode: run the decoder too (when built); ``False`` stops after the encoder (classification).

        Returns:
            ``"stem"``: the stem's map ``(B, 32, *grid)``; ``"encoder1"`` .. ``"encoder4"``: the encoder stage maps
            (channels 48, 128, 256, 512; 2D 224² → 56², 28², 14², 7²; 3D 96×96×16 → 24×24×8, 12×12×4, 6×6×2,
            3×3×1); ``"encoder_tokens"``: the last stage's tokens ``(B, 1 + N, 512)``, SSL token first;
            ``"encoder_token"``: that SSL token ``(B, 512)``. With the decoder: ``"decoder1"`` .. ``"decoder3"``: its
            maps (256, 128, 48 channels at the resolutions of encoder3, encoder2, encoder1; the last one after the
            final LayerNorm), ``"decoder_token"``: its normed SSL token ``(B, 48)``. Always ``"ssl_token"``: what
            :meth:`forward` returns (the decoder's token when it ran, else the encoder's).
        """
        self._check_input(x)
        out = self.encoder(x)
        if decode and self.decoder is not None:
            out.update(self.decoder(out))
            out["ssl_token"] = out["decoder_token"]
        else:
            out["ssl_token"] = out["encoder_token"]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The SSL-token embedding ``(B, feature_dim)`` of a 2D ``(B, C, H, W)`` or 3D ``(B, C, X, Y, Z)`` (depth last)
        batch: the pretraining network's output (decoder token, 48-d) or, without the decoder, the encoder's 512-d
        token."""
        return self.forward_features(x)["ssl_token"]

    # ------------------------------------------------------------------ helpers
    def set_attention(self, attention: str) -> "MiT":
        """Switch every attention layer to ``"sdpa"`` or ``"explicit"`` (same weights, same maths)."""
        self.attention = _check_attention(attention)
        for module in self.modules():
            if isinstance(module, SpatialReductionAttention):
                module.attention = attention
        return self

    @staticmethod
    def path_of(name: str) -> int | None:
        """The path a parameter / state-dict key belongs to: 2 or 3 for the per-dimension modules (their keys hold
        a ``.2d.`` / ``.3d.`` component), None for the shared ones (blocks, SSL token, its projections, norms)."""
        parts = name.split(".")
        for d in (2, 3):
            if _key(d) in parts:
                return d
        return None

    def named_path_parameters(self, spatial_dims: int, shared: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters a ``spatial_dims``-D forward pass uses: that path's own ones and (``shared=True``) the shared
        ones. The parameters of the other path are the ones to freeze during this path's phases (they get no
        gradient from it anyway)."""
        if spatial_dims not in self.paths:
            raise ValueError(f"MiT: no {spatial_dims}D path in this model (paths {self.paths})")
        for name, param in self.named_parameters():
            owner = self.path_of(name)
            if owner == spatial_dims or (shared and owner is None):
                yield name, param


def _variant(name: str, decoder: bool, spatial_dims: int | Sequence[int], **kwargs) -> MiT:
    if name not in MIT_VARIANTS:
        raise ValueError(f"MiT: unknown variant {name!r}; known: {sorted(MIT_VARIANTS)}")
    config = dict(MIT_VARIANTS[name])
    config.update(kwargs)
    return MiT(spatial_dims=spatial_dims, decoder=decoder, **config)


def mit_tiny(decoder: bool = True, spatial_dims: int | Sequence[int] = (2, 3), **kwargs) -> MiT:
    """MiT-tiny: encoder depths [1, 1, 1, 1], decoder depths [1, 1, 1] (20,380,336 parameters with the decoder and
    both paths; 13,859,392 for the encoder). Other :class:`MiT` arguments pass through ``kwargs``."""
    return _variant("tiny", decoder, spatial_dims, **kwargs)


def mit_small(decoder: bool = True, spatial_dims: int | Sequence[int] = (2, 3), **kwargs) -> MiT:
    """MiT-small: encoder depths [2, 3, 4, 3], decoder depths [3, 4, 3] (43,942,944 parameters with the decoder and
    both paths; 28,523,888 for the encoder). Other :class:`MiT` arguments pass through ``kwargs``."""
    return _variant("small", decoder, spatial_dims, **kwargs)
