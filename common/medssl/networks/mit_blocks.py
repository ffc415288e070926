"""The building blocks of :class:`medssl.networks.mit.MiT` (UniMiSS's dimension-free transformer): the switchable
patch embedding's conv step, spatial-reduction attention, the pre-norm transformer block shared by the 2D and 3D
paths, stochastic depth, and the token / grid helpers (position-embedding resampling, tokens <-> channel-first maps).
The architecture and its reference numbers are described in :mod:`medssl.networks.mit`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Grid",
    "ConvNormAct",
    "DropPath",
    "SpatialReductionAttention",
    "MLP",
    "TransformerBlock",
    "resample_position_embedding",
]

Grid = tuple[int, ...]


def _key(spatial_dims: int) -> str:
    """Sub-module key of a per-dimension alternative: ``"2d"`` / ``"3d"``."""
    return f"{spatial_dims}d"


def _down(size: int) -> int:
    """Output length of a stride-2 conv with ``padding = kernel // 2`` (k3 p1 or k7 p3): ceil(size / 2)."""
    return (size + 1) // 2


class ConvNormAct(nn.Module):
    """Conv (no bias) → InstanceNorm (affine) → LeakyReLU(0.01), 2D or 3D: one step of the switchable patch
    embedding. Channel-first input, 3D ``(B, C, X, Y, Z)`` depth last."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int | Sequence[int],
        padding: int,
    ) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        self.conv = conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.norm = norm(out_channels, affine=True)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at ``p = 0`` and in eval mode). Like ``nn.Dropout`` it draws from the
    device's default generator (seeded by ``monai.utils.set_determinism``)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys / values come from a spatially reduced copy of the tokens (SRA).

    Tokens are ``(B, 1 + N, dim)``: the SSL token first, then the N patch tokens of a grid (row-major over the grid's
    axes). With ``sr_ratio > 1`` the patch tokens are put back on their grid, reduced by a Conv(kernel = stride =
    sr_ratio) — a Conv2d for a 2D grid, a cubic Conv3d for a 3D grid, each present only when its path is built —, the
    SSL token is prepended again and the result LayerNorm-ed; queries always come from all tokens.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        qkv_bias: bool,
        spatial_dims: Sequence[int] = (2, 3),
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attention: str = "sdpa",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SpatialReductionAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.sr_ratio = dim, num_heads, sr_ratio
        self.attn_drop = float(attn_drop)
        self.attention = _check_attention(attention)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            convs = {2: nn.Conv2d, 3: nn.Conv3d}
            self.sr = nn.ModuleDict(
                {_key(d): convs[d](dim, dim, kernel_size=sr_ratio, stride=sr_ratio) for d in spatial_dims}
            )
            self.sr_norm = nn.LayerNorm(dim)  # default eps 1e-5 in encoder and decoder, as the reference

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        batch, n_tokens, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.q(x).reshape(batch, n_tokens, heads, head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            patches = x[:, 1:].transpose(1, 2).reshape(batch, dim, *grid)
            reduced = self.sr[_key(len(grid))](patches).flatten(2).transpose(1, 2)
            kv_input = self.sr_norm(torch.cat((x[:, :1], reduced), dim=1))
        else:
            kv_input = x
        k, v = self.kv(kv_input).reshape(batch, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        drop = self.attn_drop if self.training else 0.0
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:  # explicit softmax(Q Kᵀ / sqrt(d)) V, the reference's formulation
            weights = (q @ k.transpose(-2, -1) * head_dim**-0.5).softmax(dim=-1)
            out = F.dropout(weights, drop) @ v
        out = out.transpose(1, 2).reshape(batch, n_tokens, dim)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, attention={self.attention!r}"


class MLP(nn.Module):
    """Linear → GELU → Linear (hidden = mlp_ratio × dim)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm block, shared by the 2D and 3D paths: x + SRA(LN(x)), then x + MLP(LN(x)).

    ``drop`` is the MLP's dropout and the attention's ``proj_drop``; ``attention_kwargs`` (``attn_drop``,
    ``attention``) go to :class:`SpatialReductionAttention` as given.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        qkv_bias: bool,
        norm_eps: float,
        spatial_dims: Sequence[int],
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        **attention_kwargs: Any,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SpatialReductionAttention(
            dim, num_heads, sr_ratio, qkv_bias, spatial_dims, proj_drop=drop, **attention_kwargs
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _check_attention(attention: str) -> str:
    if attention not in ("sdpa", "explicit"):
        raise ValueError(f"MiT: attention={attention!r}; expected 'sdpa' or 'explicit'")
    return attention


def resample_position_embedding(pos_embed: torch.Tensor, source_grid: Grid, target_grid: Grid) -> torch.Tensor:
    """Position embedding ``(1, 1 + prod(source_grid), C)`` (SSL-token entry first) resampled to ``target_grid``,
    as the UniMiSS authors resize it (``MiT_encoder.interpolate_pos_encoding2D`` / ``3D``): bicubic for a 2D grid,
    trilinear for a 3D grid, ``align_corners=False``, and every axis scaled by ``(target + 0.1) / source``, the factor
    ``F.interpolate`` also places its samples with (``interpolate(size=...)`` would place them at ``target /
    source`` and differ by up to a few per cent at fine-tuning sizes). The SSL-token entry is kept as is; the
    reference grid is returned untouched. Each axis is scaled on its own, so the result does not depend on the axis
    order (ours is depth last). Where the authors' code is defined (a square in-plane reference grid and, in 3D, the
    reference depth) this is their result; elsewhere it is the same rule per axis (their code stops there)."""
    if tuple(source_grid) == tuple(target_grid):
        return pos_embed
    channels = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].reshape(1, *source_grid, channels).movedim(-1, 1)
    mode = "bicubic" if len(source_grid) == 2 else "trilinear"
    factors = tuple((t + 0.1) / s for s, t in zip(source_grid, target_grid))
    compute = torch.promote_types(patch.dtype, torch.float32)  # half / bfloat16 resized in float32, float64 kept
    patch = F.interpolate(
        patch.to(compute), scale_factor=factors, mode=mode, align_corners=False, recompute_scale_factor=False
    ).to(pos_embed.dtype)
    if tuple(patch.shape[2:]) != tuple(target_grid):  # floor(s * (t + 0.1) / s) is t for every grid size in use
        raise RuntimeError(f"resample_position_embedding: got grid {tuple(patch.shape[2:])} for {tuple(target_grid)}")
    return torch.cat((pos_embed[:, :1], patch.flatten(2).transpose(1, 2)), dim=1)


def _tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, *grid) -> (B, prod(grid), C)."""
    return feature_map.flatten(2).transpose(1, 2)


def _feature_map(tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Patch tokens (B, prod(grid), C) -> channel-first map (B, C, *grid)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def _transformer_stages(dims, num_heads, sr_ratios, depths, drop_path_rates, **block_kwargs) -> nn.ModuleList:
    """``stages[i][j]``: the j-th TransformerBlock of stage i (encoder and decoder share this layout; the keys match
    the reference checkpoints). ``drop_path_rates`` is an iterator giving one rate per block, in order."""
    return nn.ModuleList(
        nn.ModuleList(
            TransformerBlock(dims[i], num_heads[i], sr_ratios[i], drop_path=next(drop_path_rates), **block_kwargs)
            for _ in range(depths[i])
        )
        for i in range(len(dims))
    )
