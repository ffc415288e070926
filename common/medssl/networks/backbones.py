"""Backbones of Ghesu et al. 2022 (the SwAV bundle; reused by Nguyen et al. 2023): MONAI's ResNet-50 (and wider
variants) and a 3D dense network, both returning pooled features ``forward(x) -> (B, feature_dim)``.

- :class:`ResNetBackbone` / :func:`resnet50_2d`: ``monai.networks.nets.ResNet`` (bottleneck blocks, layers
  (3, 4, 6, 3), 7×7 stride-2 stem + max-pool, shortcut "B" without bias) without its classifier. ``width=2`` doubles
  every stage (MONAI ``widen_factor``), which is SwAV's ResNet-50w2 (conv1 128 channels, 4096-d output). The module's
  state-dict keys and shapes are those of torchvision / SwAV trunks (``conv1``, ``bn1``, ``layer1.0.conv1``, ...),
  so published checkpoints load without renaming. Multi-level features: :meth:`ResNetBackbone.forward_features`
  returns the (pooled) outputs of any of the stages ``stem, layer1, layer2, layer3, layer4, pool``;
  ``return_levels=L`` makes ``forward`` return the concatenation of the last L of them (Nguyen et al. 2023: L = 5, each
  L2-normalised, 256 + 512 + 1024 + 2048 + 2048 = 5888-d).
- :class:`DenseNet3D`: the 3D dense network of Ghesu et al. 2022 (5 dense blocks of (1, 2, 3, 3, 3) Conv3d-BN-LeakyReLU
  units, 16 initial features, growth rate 7, in-plane-only first blocks, 1024-d max + avg pooled features).

Axis convention: inputs are channel-first, 2D ``(B, C, H, W)`` or 3D ``(B, C, X, Y, Z)`` with the DEPTH axis LAST
(MONAI / RAS after loading: Z = inferior → superior, axial slices in the X, Y plane).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.utils import split_args
from monai.networks.nets import ResNet

__all__ = ["ResNetBackbone", "resnet50_2d", "DenseNet3D"]


def _pool_flat(feature: torch.Tensor) -> torch.Tensor:
    """Global average pool over all spatial axes: (B, C, *spatial) -> (B, C)."""
    return feature.flatten(2).mean(dim=2) if feature.dim() > 2 else feature


def _resolve_levels(levels: int | str | Sequence[str] | None, names: Sequence[str], owner: str) -> tuple[str, ...]:
    """An int L means the last L levels of ``names``; a str or a sequence names them."""
    if levels is None:
        return ()
    if isinstance(levels, int) and not isinstance(levels, bool):
        if not 1 <= levels <= len(names):
            raise ValueError(f"{owner}: return_levels={levels} must be between 1 and {len(names)} (levels {names})")
        return tuple(names[-levels:])
    chosen = (levels,) if isinstance(levels, str) else tuple(levels)
    unknown = [name for name in chosen if name not in names]
    if unknown or not chosen:
        raise ValueError(f"{owner}: unknown feature levels {unknown or chosen}; available: {tuple(names)}")
    return chosen


class _MultiLevelFeatures:
    """Shared multi-level feature logic: subclasses define ``level_names``, ``level_dims``, ``_stages`` and
    ``_final_pool``; the last level name ("pool") is the backbone's final pooled feature."""

    level_names: tuple[str, ...]
    level_dims: dict[str, int]
    return_levels: tuple[str, ...]
    normalize_levels: bool

    def _set_return_levels(
        self, return_levels: int | str | Sequence[str] | None, normalize_levels: bool, owner: str
    ) -> None:
        """Resolve ``return_levels`` against ``level_names`` (set before) and set ``normalize_levels`` and
        ``feature_dim``: the summed widths of the returned levels, or the pooled feature's width when none."""
        self.return_levels = _resolve_levels(return_levels, self.level_names, owner)
        self.normalize_levels = normalize_levels
        if self.return_levels:
            self.feature_dim = sum(self.level_dims[name] for name in self.return_levels)
        else:
            self.feature_dim = self.level_dims["pool"]

    def _make_layer(self, *args, **kwargs) -> nn.Sequential:
        """MONAI's stage builder with the backbone's ``norm`` (MONAI's ``ResNet.__init__`` does not pass it on)."""
        kwargs["norm"] = self._block_norm
        return super()._make_layer(*args, **kwargs)

    def _stages(self, x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _final_pool(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor) -> None:
        expected = self.spatial_dims + 2
        if x.dim() != expected or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: input of shape {tuple(x.shape)}; expected (B, {self.in_channels}, "
                f"{'H, W' if self.spatial_dims == 2 else 'X, Y, Z (depth last)'})"
            )

    def forward_features(
        self, x: torch.Tensor, levels: int | str | Sequence[str] | None = None, pooled: bool = True
    ) -> dict[str, torch.Tensor]:
        """Features of several stages, in network order, as ``{level name: tensor}``.

        Args:
            x: input batch (channel-first; volumes (B, C, X, Y, Z), depth last).
            levels: level names (see ``level_names``), an int L for the last L levels, or None for
                ``return_levels`` (or just "pool" when that is unset).
            pooled: True: every level is globally average pooled to (B, C_level); False: stage outputs keep
                their spatial maps ("pool" is always (B, C)).
        Only the stages up to the deepest requested level are computed.
        """
        self._check_input(x)
        wanted = _resolve_levels(levels, self.level_names, type(self).__name__) or self.return_levels or ("pool",)
        last = max(self.level_names.index(name) for name in wanted)
        found: dict[str, torch.Tensor] = {}
        current = x
        for position, (name, current) in enumerate(self._stages(x)):
            if name in wanted:
                found[name] = _pool_flat(current) if pooled else current
            if position == last:
                break
        if "pool" in wanted:
            found["pool"] = self._final_pool(current)
        return {name: found[name] for name in self.level_names if name in found}

    def _forward_levels(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x, levels=self.return_levels, pooled=True)
        parts = [F.normalize(f, dim=1) if self.normalize_levels else f for f in features.values()]
        return torch.cat(parts, dim=1)


def _norm_with_affine(norm: str | tuple) -> str | tuple:
    """``norm`` with ``affine=True`` for instance norm unless given: MONAI's ResNet sets every norm layer's weight
    to 1 at construction, which fails for a layer without one (InstanceNorm's default)."""
    name, args = split_args(norm)
    if str(name).lower() not in ("instance", "instance_nvfuser"):
        return norm
    if not args.get("affine", True):
        raise ValueError(f"ResNetBackbone: norm {norm!r} has no affine weights, which MONAI's ResNet initialises; "
                         "use affine=True")
    return (name, {**args, "affine": True})


class ResNetBackbone(_MultiLevelFeatures, ResNet):
    """MONAI ResNet trunk without classifier, returning pooled features (B, feature_dim).

    Args:
        spatial_dims: 2 for images (B, C, H, W), 3 for volumes (B, C, X, Y, Z), depth last.
        in_channels: input channels (3 for published RGB checkpoints; 1 for grey-level medical images).
        layers: residual blocks per stage ((3, 4, 6, 3) = ResNet-50).
        block: "bottleneck" (expansion 4) or "basic".
        width: stage width multiplier (MONAI ``widen_factor``): 2 = ResNet-50w2 of SwAV.
        block_inplanes: base stage widths before ``width``.
        conv1_t_size, conv1_t_stride, no_max_pool: the stem (7×7, stride 2, max-pool: the ImageNet ResNet).
        bias_downsample: bias in the 1×1 shortcut convolutions (False, as torchvision / SwAV; MONAI's default
            True adds one bias per shortcut).
        act, norm: MONAI activation / normalisation specs.
        return_levels: None: ``forward`` gives the final pooled feature (``feature_dim`` = 2048 for ResNet-50,
            4096 for w2). An int L or level names: ``forward`` gives the concatenation of those pooled levels
            (last L of ``stem, layer1, layer2, layer3, layer4, pool``) and ``feature_dim`` is their sum.
        normalize_levels: L2-normalise each level before concatenating (the multi-level slice feature of Nguyen et al.
        2023).

    Parameters: ResNet-50, 3 input channels: 23,508,032 (the torchvision / SwAV trunk); ResNet-50w2: 93,907,072.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        layers: Sequence[int] = (3, 4, 6, 3),
        block: str = "bottleneck",
        width: float = 1,
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
        conv1_t_size: int | tuple[int, ...] = 7,
        conv1_t_stride: int | tuple[int, ...] = 2,
        no_max_pool: bool = False,
        bias_downsample: bool = False,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = "batch",
        return_levels: int | str | Sequence[str] | None = None,
        normalize_levels: bool = False,
    ) -> None:
        if width <= 0:
            raise ValueError(f"ResNetBackbone: width must be positive, got {width}")
        norm = _norm_with_affine(norm)
        # MONAI's ResNet builds its residual blocks with BatchNorm whatever ``norm`` says (only the stem gets it):
        # read by _make_layer below, set before nn.Module.__init__ runs
        object.__setattr__(self, "_block_norm", norm)
        super().__init__(
            block=block,
            layers=list(layers),
            block_inplanes=list(block_inplanes),
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=conv1_t_size,
            conv1_t_stride=conv1_t_stride,
            no_max_pool=no_max_pool,
            shortcut_type="B",
            widen_factor=width,
            feed_forward=False,
            bias_downsample=bias_downsample,
            act=act,
            norm=norm,
        )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.width = width
        expansion = 4 if block == "bottleneck" else 1
        planes = [int(p * width) for p in block_inplanes]
        self.level_names = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")
        self.level_dims = {"stem": planes[0], "pool": planes[3] * expansion}
        self.level_dims.update({f"layer{i + 1}": p * expansion for i, p in enumerate(planes)})
        self._set_return_levels(return_levels, normalize_levels, "ResNetBackbone")

    def _stages(self, x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        x = self.act(self.bn1(self.conv1(x)))
        yield "stem", x
        if not self.no_max_pool:
            x = self.maxpool(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            yield name, x

    def _final_pool(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) or (B, C, X, Y, Z) -> (B, feature_dim)."""
        if self.return_levels:
            return self._forward_levels(x)
        return self.forward_features(x, levels=("pool",))["pool"]


def resnet50_2d(
    in_channels: int = 3,
    width: float = 1,
    return_levels: int | str | Sequence[str] | None = None,
    normalize_levels: bool = False,
    **kwargs,
) -> ResNetBackbone:
    """2D ResNet-50 (``width=2``: ResNet-50w2) trunk of Ghesu et al. 2022 / Nguyen et al. 2023; input (B, C, H, W).

    ``forward`` returns (B, 2048) (width 1) or (B, 4096) (width 2); see :class:`ResNetBackbone` for
    ``return_levels`` (e.g. ``return_levels=5, normalize_levels=True`` for Nguyen et al.'s 5888-d slice feature).
    """
    return ResNetBackbone(
        spatial_dims=2,
        in_channels=in_channels,
        width=width,
        return_levels=return_levels,
        normalize_levels=normalize_levels,
        **kwargs,
    )


class _DenseBlock(nn.Module):
    """Dense block: each unit's output (``growth_rate`` channels) is concatenated to its input."""

    def __init__(self, in_channels: int, n_units: int, growth_rate: int, kernel_size, act, norm) -> None:
        super().__init__()
        self.units = nn.ModuleList(
            Convolution(
                spatial_dims=3,
                in_channels=in_channels + i * growth_rate,
                out_channels=growth_rate,
                kernel_size=kernel_size,
                act=act,
                norm=norm,
                bias=False,
            )
            for i in range(n_units)
        )
        self.out_channels = in_channels + n_units * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = torch.cat([x, unit(x)], dim=1)
        return x


class _Downsample(nn.Module):
    """Average pooling with kernel = stride = ``factors`` per spatial axis; an axis shorter than its factor is not
    pooled and odd sizes are rounded up (ceil mode), so small or thin volumes never fail."""

    def __init__(self, factors: Sequence[int]) -> None:
        super().__init__()
        self.factors = tuple(int(f) for f in factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = tuple(f if size >= f else 1 for f, size in zip(self.factors, x.shape[2:]))
        if all(k == 1 for k in kernel):
            return x
        return F.avg_pool3d(x, kernel_size=kernel, stride=kernel, ceil_mode=True)

    def extra_repr(self) -> str:
        return f"factors={self.factors}"


class DenseNet3D(_MultiLevelFeatures, nn.Module):
    """3D dense network of Ghesu et al. 2022: input (B, C, X, Y, Z), DEPTH LAST, output (B, feature_dim).

    Layout (each "unit" and each 1×1×1 convolution is MONAI ``Convolution``: Conv3d (no bias) → BatchNorm →
    LeakyReLU(0.01)):

    - stem: a unit from ``in_channels`` to ``init_features`` (16), full resolution;
    - 5 dense blocks with ``block_units`` (1, 2, 3, 3, 3) units of ``growth_rate`` (7) channels, each unit's output
      concatenated to its input (channels 16 → 23 → 37 → 58 → 79 → 100 with the defaults);
    - between blocks a transition: 1×1×1 unit (channels kept — with growth 7 there is nothing to compress) and
      2× average-pool downsampling.
    - The first ``inplane_only_blocks`` (2) blocks (and the stem) are in-plane: the paper's (1, 3, 3) kernels in
      (D, H, W) terms are (3, 3, 1) kernels here because our depth axis is the LAST one, and their transitions
      downsample (2, 2, 1), X and Y only; later blocks use 3×3×3 kernels and (2, 2, 2) downsampling. A 64×64×16
      input reaches block 5 at 4×4×4.
    - Final features: concat(adaptive max-pool, adaptive avg-pool) over the whole volume. With growth rate 7 the
      last block has only 100 channels (a 200-d concat), so to obtain the paper's 1024-d feature a 1×1×1 unit first
      maps them to ``out_dim / 2`` = 512 channels; the feature is then exactly [max-pool, avg-pool] of that map, as
      the paper describes. (Chosen over a Linear(200 → 1024) after pooling: the per-voxel projection lets max and
      average pooling act on 512 learned channels, keeps the two pooled halves separate, and costs 4× fewer
      parameters.) ``out_dim=None`` skips the projection (feature_dim = 2 × last block channels).

    Multi-level features (``forward_features``): levels ``stem, block1 .. block5, pool``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        block_units: Sequence[int] = (1, 2, 3, 3, 3),
        init_features: int = 16,
        growth_rate: int = 7,
        inplane_only_blocks: int = 2,
        out_dim: int | None = 1024,
        negative_slope: float = 0.01,
        norm: str | tuple = "batch",
        return_levels: int | str | Sequence[str] | None = None,
        normalize_levels: bool = False,
    ) -> None:
        super().__init__()
        if not block_units or any(n < 1 for n in block_units):
            raise ValueError(f"DenseNet3D: block_units must be positive unit counts, got {tuple(block_units)}")
        if not 0 <= inplane_only_blocks <= len(block_units):
            raise ValueError(f"DenseNet3D: inplane_only_blocks={inplane_only_blocks} outside 0..{len(block_units)}")
        if out_dim is not None and (out_dim < 2 or out_dim % 2):
            raise ValueError(f"DenseNet3D: out_dim must be even (max + avg halves), got {out_dim}")
        self.spatial_dims = 3
        self.in_channels = in_channels
        act = ("leakyrelu", {"negative_slope": negative_slope, "inplace": True})
        inplane_kernel, full_kernel = (3, 3, 1), (3, 3, 3)

        def unit(cin: int, cout: int, kernel) -> Convolution:
            return Convolution(3, cin, cout, kernel_size=kernel, act=act, norm=norm, bias=False)

        self.stem = unit(in_channels, init_features, inplane_kernel if inplane_only_blocks > 0 else full_kernel)
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        channels = init_features
        self.level_names = ("stem",) + tuple(f"block{i + 1}" for i in range(len(block_units))) + ("pool",)
        self.level_dims = {"stem": init_features}
        for i, n_units in enumerate(block_units):
            inplane = i < inplane_only_blocks
            block = _DenseBlock(channels, n_units, growth_rate, inplane_kernel if inplane else full_kernel, act, norm)
            self.blocks.append(block)
            channels = block.out_channels
            self.level_dims[f"block{i + 1}"] = channels
            if i < len(block_units) - 1:
                factors = (2, 2, 1) if inplane else (2, 2, 2)
                self.transitions.append(nn.Sequential(unit(channels, channels, 1), _Downsample(factors)))
        self.head = nn.Identity() if out_dim is None else unit(channels, out_dim // 2, 1)
        self.level_dims["pool"] = 2 * channels if out_dim is None else out_dim
        self._set_return_levels(return_levels, normalize_levels, "DenseNet3D")

    def _stages(self, x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        x = self.stem(x)
        yield "stem", x
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = self.transitions[i - 1](x)
            x = block(x)
            yield f"block{i + 1}", x

    def _final_pool(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x)
        return torch.cat([torch.amax(x, dim=(2, 3, 4)), x.mean(dim=(2, 3, 4))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) with depth last -> (B, feature_dim)."""
        if self.return_levels:
            return self._forward_levels(x)
        return self.forward_features(x, levels=("pool",))["pool"]
