"""A plain vision transformer encoder in the DINO / timm key layout, for 2D images or 3D volumes.

What ours adds over MONAI's ``ViT``: the published DINO checkpoints' key names and numerics (LayerNorm eps 1e-6,
the class token's own position embedding, biased qkv), position embeddings resampled to any input size as DINO does
(:func:`medssl.networks.mit_blocks.resample_position_embedding`: bicubic / trilinear, each axis scaled by
``(target + 0.1) / source``), and 3D patches in medssl's (B, C, X, Y, Z) depth-last layout.

Keys: ``cls_token`` (1, 1, D), ``pos_embed`` (1, 1 + N, D), ``patch_embed.proj`` (a strided convolution),
``blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2``, ``norm``. ``forward`` returns the class
token after the final norm, (B, D): the feature DINO's linear and kNN evaluations use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medssl.networks.mit_blocks import DropPath, resample_position_embedding

__all__ = ["ViTBackbone", "VIT_VARIANTS", "vit_small", "vit_base"]

# embed_dim, depth, num_heads of the published DINO backbones (head width 64)
VIT_VARIANTS = {"small": (384, 12, 6), "base": (768, 12, 12)}


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ViTBackbone: embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """Pre-norm transformer block. ``layer_scale_init`` (e.g. 1e-3 for MedCoSS, None = off) adds LayerScale: the
    (dim,) parameters ``ls1`` / ``ls2`` multiply the attention / MLP branch before DropPath. ``attn_mask`` (boolean,
    True = may attend, broadcast to (B, heads, N, N)) is passed to the attention, e.g. to leave out text padding."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        eps: float,
        drop_path: float,
        layer_scale_init: float | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        for name in ("ls1", "ls2"):
            value = None if layer_scale_init is None else nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.register_parameter(name, value)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        branch = self.attn(self.norm1(x), attn_mask)
        x = x + self.drop_path(branch if self.ls1 is None else branch * self.ls1)
        branch = self.mlp(self.norm2(x))
        return x + self.drop_path(branch if self.ls2 is None else branch * self.ls2)


def _as_size(value: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    size = (int(value),) * spatial_dims if isinstance(value, (int, float)) else tuple(int(v) for v in value)
    if len(size) != spatial_dims or min(size) < 1:
        raise ValueError(f"ViTBackbone: {name} {value!r} must be one positive int or {spatial_dims} of them")
    return size


class ViTBackbone(nn.Module):
    """Vision transformer encoder (see the module docstring).

    Args:
        spatial_dims: 2 (images (B, C, W, H), medssl's column-first 2D layout) or 3 (volumes (B, C, X, Y, Z)).
        in_channels: input channels (3 for the published RGB checkpoints).
        img_size: the input size the position embeddings are stored for (224 for DINO); other sizes are resampled.
        patch_size: patch edge (16 or 8 for DINO).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer (ViT-S: 384, 12, 6; ViT-B: 768, 12, 12).
        norm_eps: LayerNorm epsilon (1e-6, as DINO and timm).
        final_norm: apply the final LayerNorm ``norm`` (DINO: yes).
        drop_path_rate: stochastic depth, rising linearly to this rate over the blocks.
        layer_scale_init: LayerScale's initial value in every block (None: no LayerScale, as DINO).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        final_norm: bool = True,
        drop_path_rate: float = 0.0,
        layer_scale_init: float | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"ViTBackbone: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.spatial_dims, self.in_channels, self.feature_dim = spatial_dims, int(in_channels), int(embed_dim)
        self.patch_size = _as_size(patch_size, spatial_dims, "patch_size")
        self.img_size = _as_size(img_size, spatial_dims, "img_size")
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"ViTBackbone: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.patch_embed = nn.Module()
        self.patch_embed.proj = conv(in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(self.grid), embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # torch.linspace, meta-device safe
        self.blocks = nn.ModuleList(
            _Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_eps, rate, layer_scale_init) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"cls": (B, D), "tokens": (B, N, D) patch tokens, "grid": patch grid}``, both after the final norm."""
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ViTBackbone: expected (B, {self.in_channels}, {', '.join('XYZ'[:self.spatial_dims])}) input, "
                f"got shape {tuple(x.shape)}"
            )
        patches = self.patch_embed.proj(x)  # a remainder smaller than a patch is dropped, as DINO's convolution does
        grid = tuple(patches.shape[2:])
        tokens = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), patches.flatten(2).transpose(1, 2)), dim=1)
        tokens = tokens + resample_position_embedding(self.pos_embed, self.grid, grid)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return {"cls": tokens[:, 0], "tokens": tokens[:, 1:], "grid": grid}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["cls"]


def _variant(name: str, **kwargs) -> ViTBackbone:
    dim, depth, heads = VIT_VARIANTS[name]
    return ViTBackbone(**{"embed_dim": dim, "depth": depth, "num_heads": heads, **kwargs})


def vit_small(patch_size: int = 16, **kwargs) -> ViTBackbone:
    """ViT-S (384-d, 12 blocks, 6 heads): DINO ViT-S/16 and ViT-S/8."""
    return _variant("small", patch_size=patch_size, **kwargs)


def vit_base(patch_size: int = 16, **kwargs) -> ViTBackbone:
    """ViT-B (768-d, 12 blocks, 12 heads): DINO ViT-B/16 and ViT-B/8."""
    return _variant("base", patch_size=patch_size, **kwargs)
