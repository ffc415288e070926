"""1-D deformable multi-head self-attention over the slices of a volume, and the transformer f_inter of Nguyen et al.
2023.

Nguyen et al. ("Joint self-supervised image-volume representation learning with intra-inter contrastive
clustering", AAAI 2023, Eq. 6–8) contextualise the per-slice embeddings of a volume with a Deformable
Attention Transformer (DAT, Xia et al.) reduced to one dimension, the slice axis:

- Queries q = x W_q for every slice i (x: the F slice embeddings, (B, F, D)).
- An offset network θ_offset on the queries predicts, for each of G offset groups, a shift Δp_j of each of the
  F / r reference points p_j (evenly spaced, one per block of r slices, at the block centre):
  depthwise Conv1d (kernel k, stride r) → LayerNorm over channels → GELU → 1×1 Conv1d to one channel (no bias);
  Δp = s · r · tanh(·), i.e. at most s reference spacings (s = ``offset_scale``, 2 as in DAT-T and the authors'
  code). The network is shared by the groups (each group feeds its own C / G query channels), as in DAT.
- Keys and values at the shifted points p_j + Δp_j: x̃ = φ(x; p + Δp) is the linear interpolation between the two
  neighbouring slices (zero outside the volume), k̃ = x̃ W_k, ṽ = x̃ W_v (Eq. 7). Because interpolation is linear we
  project first and interpolate the projected keys / values, adding the bias afterwards — exactly φ(x) W + b, at a
  fraction of the cost (F slices projected once instead of F / r samples per group).
- The H heads are split over the G groups; the H / G heads of a group share its sampled points.
- Attention of head m (Eq. 8): softmax(q⁽ᵐ⁾ k̃⁽ᵐ⁾ᵀ / √d + φ(B̂; R)) ṽ⁽ᵐ⁾, where B̂ is a learnable relative position
  bias table of length 2F − 1 per head (DAT v1) and φ(B̂; R) its linear interpolation at the fractional
  displacements R = i − (p_j + Δp_j) between query slice i and sampled point (displacements outside the table are
  clamped to its ends). With r = 1 and zero offsets this is ordinary multi-head attention over all slices with a
  relative position bias B̂[i − j] (the tests check exactly that).
- 640 is not divisible by 6, so attention runs at an inner width H × d (6 × 64 = 384) projected back to D by W_o.

f_inter (:class:`DeformableSliceTransformer`): positional encoding added to the input, then 4 post-LayerNorm
transformer layers x = LN(x + Dropout(Attn(x))); x = LN(x + Dropout(FFN(x))) with FFN D → 720 → D (GELU, dropout 0.1)
— the layout of the authors' code. The volume embedding (Z = L2-normalised mean of the output over slices) is
:func:`volume_embedding`.

Difference from the authors' code (duyhominhnguyen/Self-supervised-Image-Volume-Intra-Inter-Contrastive,
``utils/models.py``): there the slice embeddings (B, F = 64, D = 640) are handed to a third-party
``DeformableAttention1D(dim=n_frames, downsample_factor=4, offset_scale=2, offset_kernel_size=6)`` that treats its
*second* axis as channels and its last axis as the sequence — i.e. the 64 frames are the channels and attention runs
over the 640 feature positions, not over slices ("frames-as-channels"). That is also why its parameter count is
small (31.16 M in total) and why 6 heads / 6 offset groups could not be built there (its grouped convolutions need
64 and 640 divisible by 6). We implement what the paper describes — deformable attention over the slice axis, with
the authors' r = 4, k = 6 and s = 2 as defaults and the appendix's 6 heads / 6 groups — which costs about 0.99 M
parameters per layer (full query / key / value / output projections) instead of the authors' ~46 k, so the whole
hybrid encoder has ~34.9 M parameters instead of 31.16 M (within the accepted −10 % / +25 %).

Tensor layout: slice embeddings are (B, F, D): batch, slices (the volume's depth axis — the LAST spatial axis of a
MONAI (C, X, Y, Z) volume, inferior → superior), embedding channels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "interpolate_slices",
    "interpolate_table",
    "sinusoidal_positions",
    "volume_embedding",
    "DeformableSliceAttention",
    "DeformableTransformerLayer",
    "DeformableSliceTransformer",
]


def interpolate_slices(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Linear interpolation along the slice axis: φ(x; p).

    Args:
        values: (N, L, C): L slices of C channels.
        positions: (N, S) fractional slice positions (slice i sits at position i).
    Returns:
        (N, S, C): exact at integer positions, linear between neighbours, zero-padded outside [0, L − 1] (a point
        at −0.25 gets 0.75 × slice 0; a point at or beyond −1 or L gets zeros), like ``grid_sample`` with zero
        padding and ``align_corners=True``. Differentiable with respect to ``values`` and ``positions``; the weights
        are computed in the positions' dtype (keep them float32 under mixed precision) and cast to ``values``'.
    """
    if values.dim() != 3 or positions.dim() != 2 or positions.shape[0] != values.shape[0]:
        raise ValueError(
            f"interpolate_slices: values (N, L, C) and positions (N, S) expected, got {tuple(values.shape)} and "
            f"{tuple(positions.shape)}"
        )
    n, length, channels = values.shape
    lower = torch.floor(positions)
    weight_upper = (positions - lower).unsqueeze(-1)
    lower = lower.long()
    out = values.new_zeros(n, positions.shape[1], channels)
    for index, weight in ((lower, 1.0 - weight_upper), (lower + 1, weight_upper)):
        inside = ((index >= 0) & (index < length)).unsqueeze(-1)
        gathered = values.gather(1, index.clamp(0, length - 1).unsqueeze(-1).expand(-1, -1, channels))
        out = out + torch.where(inside, weight, torch.zeros_like(weight)).to(values.dtype) * gathered
    return out


def interpolate_table(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of a per-head 1-D table at fractional indices, clamped to the table's ends.

    Args:
        table: (H, T) — one row per head.
        index: (B, H, ...) fractional indices into each head's row.
    Returns:
        (B, H, ...) interpolated values (exact at integer indices).
    """
    heads, length = table.shape
    index = index.clamp(0, length - 1)
    lower = torch.floor(index)
    frac = index - lower
    lower = lower.long()
    upper = (lower + 1).clamp(max=length - 1)
    head = torch.arange(heads, device=table.device).view(1, heads, *([1] * (index.dim() - 2)))
    return table[head, lower] * (1.0 - frac) + table[head, upper] * frac


def sinusoidal_positions(num_positions: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Transformer sine / cosine positional encoding (Vaswani et al.): (num_positions, dim)."""
    position = torch.arange(num_positions, device=device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    encoding = torch.zeros(num_positions, dim, device=device, dtype=torch.float32)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return encoding.to(dtype) if dtype is not None else encoding


def volume_embedding(slice_embeddings: torch.Tensor) -> torch.Tensor:
    """Z = L2-normalise(mean over slices of f_inter's output): (B, F, D) -> (B, D)."""
    if slice_embeddings.dim() != 3:
        raise ValueError(f"volume_embedding: (B, F, D) slice embeddings expected, got {tuple(slice_embeddings.shape)}")
    return F.normalize(slice_embeddings.mean(dim=1), dim=1)


def _check_sequence(x: torch.Tensor, embed_dim: int, owner: str) -> None:
    if x.dim() != 3:
        raise ValueError(
            f"{owner}: input of shape {tuple(x.shape)}; expected slice embeddings (B, F, D={embed_dim}) — batch, "
            f"slices (the volume's last, depth axis), channels. A {x.dim()}-D tensor is not a sequence of slices "
            f"(embed a volume with SliceEncoder first; a 2D image has no slice axis to attend over)."
        )
    if x.shape[-1] != embed_dim:
        raise ValueError(f"{owner}: input of shape {tuple(x.shape)} has {x.shape[-1]} channels, expected {embed_dim}")


class DeformableSliceAttention(nn.Module):
    """1-D deformable multi-head self-attention over the slice axis (Nguyen et al. 2023 Eq. 6–8; DAT in 1-D).

    Args:
        embed_dim: D, slice-embedding width (640).
        num_slices: F, the number of slices the relative position bias table is sized for (its length is 2F − 1);
            shorter sequences work, longer ones clamp displacements beyond F − 1.
        num_heads: H (6, seed appendix).
        head_dim: d, width of each head (64): attention runs at H × d channels, projected back to D.
        offset_groups: G (6, seed appendix); must divide ``num_heads``. Each group's H / G heads share its points.
        downsample: r: one reference point per r slices (F / r points; 4 as in the authors' code). r = 1 with zero
            offsets is ordinary attention over all slices.
        offset_kernel_size: k of the offset network's depthwise convolution (6 as in the authors' code).
        offset_scale: s: offsets are s · r · tanh(·) slices, i.e. at most s reference spacings (2).
        attention_dropout: dropout on the attention weights.
        use_position_bias: add the interpolated relative position bias φ(B̂; R).

    Input (B, F, D), output (B, F, D). ``forward(x, return_positions=True)`` also returns the sampled positions
    (B, G, F / r) in slice units. See the module docstring for the equations and the difference from the authors'
    code. Parameters with the defaults (D = 640, F = 64): 986,234.
    """

    def __init__(
        self,
        embed_dim: int = 640,
        num_slices: int = 64,
        num_heads: int = 6,
        head_dim: int = 64,
        offset_groups: int = 6,
        downsample: int = 4,
        offset_kernel_size: int = 6,
        offset_scale: float = 2.0,
        attention_dropout: float = 0.0,
        use_position_bias: bool = True,
    ) -> None:
        super().__init__()
        if num_heads < 1 or offset_groups < 1 or num_heads % offset_groups:
            raise ValueError(
                f"DeformableSliceAttention: num_heads={num_heads} must be a positive multiple of "
                f"offset_groups={offset_groups} (the heads of a group share its sampled points)"
            )
        if downsample < 1 or offset_kernel_size < 1 or num_slices < 1:
            raise ValueError(
                f"DeformableSliceAttention: downsample={downsample}, offset_kernel_size={offset_kernel_size} and "
                f"num_slices={num_slices} must be positive"
            )
        self.embed_dim = embed_dim
        self.num_slices = num_slices
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.offset_groups = offset_groups
        self.downsample = downsample
        self.offset_kernel_size = offset_kernel_size
        self.offset_scale = float(offset_scale)
        self.attention_dropout = attention_dropout
        inner = num_heads * head_dim
        self.inner_dim = inner
        self.group_channels = inner // offset_groups

        self.query = nn.Linear(embed_dim, inner)
        self.key = nn.Linear(embed_dim, inner)
        self.value = nn.Linear(embed_dim, inner)
        self.output = nn.Linear(inner, embed_dim)
        # θ_offset, shared by the groups: depthwise conv (stride r) -> LayerNorm -> GELU -> 1x1 conv to one offset
        self.offset_conv = nn.Conv1d(
            self.group_channels, self.group_channels, offset_kernel_size, stride=downsample, groups=self.group_channels
        )
        self.offset_norm = nn.LayerNorm(self.group_channels)
        self.offset_out = nn.Conv1d(self.group_channels, 1, 1, bias=False)
        if use_position_bias:
            self.position_bias = nn.Parameter(torch.zeros(num_heads, 2 * num_slices - 1))
            nn.init.trunc_normal_(self.position_bias, std=0.01)
        else:
            self.register_parameter("position_bias", None)

    def reference_points(self, num_slices: int, device=None) -> torch.Tensor:
        """p_j: the centre of each block of r slices, (ceil(F / r),), in slice units."""
        starts = torch.arange(0, num_slices, self.downsample, device=device, dtype=torch.float32)
        ends = (starts + self.downsample).clamp(max=num_slices)
        return (starts + ends - 1) / 2

    def sampling_positions(self, queries: torch.Tensor) -> torch.Tensor:
        """p + Δp for every group: queries (B, F, H·d) -> positions (B, G, ceil(F / r)) in slice units."""
        batch, num_slices, _ = queries.shape
        reference = self.reference_points(num_slices, device=queries.device)
        n_points = reference.numel()
        grouped = queries.reshape(batch, num_slices, self.offset_groups, self.group_channels)
        grouped = grouped.permute(0, 2, 3, 1).reshape(batch * self.offset_groups, self.group_channels, num_slices)
        # padding so that exactly n_points windows fit, each roughly centred on its block of r slices
        pad_left = max(0, (self.offset_kernel_size - self.downsample) // 2)
        pad_right = max(0, (n_points - 1) * self.downsample + self.offset_kernel_size - num_slices - pad_left)
        hidden = self.offset_conv(F.pad(grouped, (pad_left, pad_right)))[..., :n_points]
        hidden = F.gelu(self.offset_norm(hidden.transpose(1, 2)).transpose(1, 2))
        raw = self.offset_out(hidden).reshape(batch, self.offset_groups, n_points)
        offsets = self.offset_scale * self.downsample * torch.tanh(raw.float())
        return reference.view(1, 1, n_points) + offsets

    def _sample(self, projected: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x W (B, F, H·d) sampled at each group's positions (B, G, S), plus the bias -> (B, H, S, d)."""
        batch, num_slices, _ = projected.shape
        n_points = positions.shape[-1]
        grouped = projected.reshape(batch, num_slices, self.offset_groups, self.group_channels)
        grouped = grouped.transpose(1, 2).reshape(batch * self.offset_groups, num_slices, self.group_channels)
        sampled = interpolate_slices(grouped, positions.reshape(batch * self.offset_groups, n_points))
        sampled = sampled.reshape(batch, self.offset_groups, n_points, self.group_channels).transpose(1, 2)
        sampled = sampled.reshape(batch, n_points, self.inner_dim) + bias
        return sampled.reshape(batch, n_points, self.num_heads, self.head_dim).transpose(1, 2)

    def relative_bias(self, positions: torch.Tensor, num_queries: int) -> torch.Tensor:
        """φ(B̂; R): bias of query slice i towards sampled point p, R = i − p -> (B, H, F, S)."""
        heads_per_group = self.num_heads // self.offset_groups
        key_positions = positions.repeat_interleave(heads_per_group, dim=1)  # (B, H, S): head m uses group m // (H/G)
        query_positions = torch.arange(num_queries, device=positions.device, dtype=positions.dtype)
        displacement = query_positions.view(1, 1, -1, 1) - key_positions.unsqueeze(2)
        return interpolate_table(self.position_bias, displacement + (self.num_slices - 1))

    def forward(self, x: torch.Tensor, return_positions: bool = False):
        _check_sequence(x, self.embed_dim, type(self).__name__)
        batch, num_slices, _ = x.shape
        queries = self.query(x)
        positions = self.sampling_positions(queries)
        keys = self._sample(F.linear(x, self.key.weight), self.key.bias, positions)
        values = self._sample(F.linear(x, self.value.weight), self.value.bias, positions)
        queries = queries.reshape(batch, num_slices, self.num_heads, self.head_dim).transpose(1, 2)
        bias = None
        if self.position_bias is not None:
            bias = self.relative_bias(positions, num_slices).to(queries.dtype)
        attended = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=bias, dropout_p=self.attention_dropout if self.training else 0.0
        )
        out = self.output(attended.transpose(1, 2).reshape(batch, num_slices, self.inner_dim))
        return (out, positions) if return_positions else out


class DeformableTransformerLayer(nn.Module):
    """One post-LayerNorm transformer layer of f_inter: deformable slice attention + FFN (D → ffn_dim → D, GELU).

    x = LN₁(x + Dropout(Attn(x))); x = LN₂(x + Dropout(FFN(x))). Input / output (B, F, D). ``attention_kwargs`` go to
    :class:`DeformableSliceAttention`.
    """

    def __init__(
        self,
        embed_dim: int = 640,
        ffn_dim: int = 720,
        dropout: float = 0.1,
        num_slices: int = 64,
        **attention_kwargs: Any,
    ) -> None:
        super().__init__()
        self.attention = DeformableSliceAttention(embed_dim=embed_dim, num_slices=num_slices, **attention_kwargs)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.ffn = nn.Sequential(
            nn.Linear(embed_dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, embed_dim)
        )
        self.norm2 = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attention(x)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class DeformableSliceTransformer(nn.Module):
    """f_inter: positional encoding + a stack of deformable transformer layers over the slice embeddings.

    Args:
        embed_dim: D (640).
        num_slices: F (64): size of the relative position bias tables (and of the learned positional encoding).
        num_layers: transformer layers (4, seed appendix).
        ffn_dim: FFN hidden width (720, the authors' code).
        dropout: dropout after the positional encoding, in the FFN and on each sub-layer's output (0.1).
        positional_encoding: "sinusoidal" (default: no parameters, any number of slices), "learned"
            (F × D parameters, at most F slices) or "none".
        **attention_kwargs: passed once, by keyword, to every layer's :class:`DeformableSliceAttention`:
            num_heads, head_dim, offset_groups, downsample, offset_kernel_size, offset_scale, attention_dropout,
            use_position_bias (its defaults: 6 heads of 64, 6 groups, r = 4, k = 6, s = 2, no attention dropout).

    Input (B, F, D) slice embeddings (slices along the volume's last, depth axis); output (B, F, D) contextualised
    slice embeddings. :func:`volume_embedding` of the output is the volume embedding Z.
    Parameters with the defaults: 7,647,016.
    """

    def __init__(
        self,
        embed_dim: int = 640,
        num_slices: int = 64,
        num_layers: int = 4,
        ffn_dim: int = 720,
        dropout: float = 0.1,
        positional_encoding: str = "sinusoidal",
        **attention_kwargs: Any,
    ) -> None:
        super().__init__()
        if positional_encoding not in ("sinusoidal", "learned", "none"):
            raise ValueError(
                f"DeformableSliceTransformer: positional_encoding={positional_encoding!r}; "
                "expected 'sinusoidal', 'learned' or 'none'"
            )
        self.embed_dim = embed_dim
        self.num_slices = num_slices
        self.positional_encoding = positional_encoding
        if positional_encoding == "learned":
            self.position_embedding = nn.Parameter(torch.zeros(num_slices, embed_dim))
            nn.init.trunc_normal_(self.position_embedding, std=0.02)
        else:
            self.register_parameter("position_embedding", None)
        self.input_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            DeformableTransformerLayer(
                embed_dim=embed_dim, ffn_dim=ffn_dim, dropout=dropout, num_slices=num_slices, **attention_kwargs
            )
            for _ in range(num_layers)
        )

    def add_positions(self, x: torch.Tensor) -> torch.Tensor:
        """x + positional encoding of the slice index."""
        num_slices = x.shape[1]
        if self.positional_encoding == "sinusoidal":
            return x + sinusoidal_positions(num_slices, self.embed_dim, device=x.device, dtype=x.dtype)
        if self.positional_encoding == "learned":
            if num_slices > self.num_slices:
                raise ValueError(
                    f"DeformableSliceTransformer: {num_slices} slices but the learned positional encoding has "
                    f"{self.num_slices}; crop the volume (crop_or_pad_slices) or use positional_encoding='sinusoidal'"
                )
            return x + self.position_embedding[:num_slices].to(x.dtype)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_sequence(x, self.embed_dim, type(self).__name__)
        x = self.input_dropout(self.add_positions(x))
        for layer in self.layers:
            x = layer(x)
        return x
