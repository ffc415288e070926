"""Multi-crop view generation for 2D and 3D images (SwAV-style, Ghesu et al. 2022 Table I) and their augmentation set A.

:class:`MultiCropd` turns one image into a list of crops (the views of SwAV / DeepCluster-v2): groups of
``count`` crops of one size each, every crop an independent random region (optionally resized, see below) followed by
an independent draw of an augmentation pipeline. ``sample["crops"] = [crop_0, ..., crop_{n-1}]`` in the order of the
groups (large crops first), each ``(C, *crop_size)``; the default collation of a batch then gives a list of
``(B, C, *crop_size)`` tensors, one per crop index.

Ghesu et al., "Self-supervised learning from 100 million medical images" (2022), Table I and set A, and how they are
read here:

* Crop counts and sizes, 2D: 2 × 224 + 6 × 92 (square crops of the (C, H, W) image).
* 3D: 1 × (224, 192) + 4 × (112, 96), read as (in-plane size, depth): crops of ``(224, 224, 192)`` and
  ``(112, 112, 96)`` voxels in our axis order (C, X, Y, Z) -- X, Y in-plane, the depth (slice) axis Z last. Reason:
  the paper's 3D network treats the first two blocks as in-plane only ((1, 3, 3) kernels), i.e. it reasons in
  (in-plane, slices), the usual notation for anisotropic CT / MR; a 2-tuple size given for a 3D image is expanded the
  same way, ``(a, b) -> (a, a, b)``. A 224 x 224 x 192 crop is 9.6 M voxels (38 MB in float32); demo / smoke configs
  pass small sizes (``sizes=[(32, 16), (16, 8)]`` etc.).
* "Rescale to a fraction s ∈ [0.1, 0.7] of the image size ... random crops last" is read as a random-resized crop:
  each crop is a random region covering the fraction s (uniform in ``scale``) of the image's area (2D) / volume (3D),
  resized to the crop size -- the role of SwAV's ``RandomResizedCrop(scale=(min_scale, max_scale))``, whose ranges
  Ghesu et al.'s Table I replaces by this one s range (used for the large and the small crops alike by default). It is
  resolution independent: the same anatomy fraction whatever the native pixel count. The region has the crop's
  proportions (zoom is isotropic in voxels, anatomy is not stretched) and volume s × the image's; a side that would
  exceed the image is clipped to it (that axis is then stretched and the covered fraction is smaller than s). The
  literal alternative -- downscale the whole image by s, then take plain crops -- is
  ``Compose([RandRescaleFractiond(...), MultiCropd(..., scales=None)])`` (:mod:`medssl.transforms.intensity`).
* With ``scale=None`` for a group the crops are plain random crops of the crop size at native resolution. An image
  smaller than the crop along an axis is padded on that axis (with the image minimum by default), the image placed at
  a random offset inside the crop, never an error. (Resized crops never need padding: the region is resampled.)

Resampling uses ``torch.nn.functional.interpolate``: "area" (box average, no aliasing) when the region is at least as
large as the crop on every axis, else bilinear / trilinear (``align_corners=False``). A ``MetaTensor`` input gives
``MetaTensor`` crops whose affine maps crop voxels to the scanner space of the source (so the voxel spacing seen by
later transforms, e.g. :class:`EnergyBandAugmentd` with ``sigma_unit="relative"``, is the crop's), with an empty
transform history; plain tensors give plain tensors; numpy input is converted to torch. Works on CPU and GPU tensors.

Randomness: every crop position / size comes from ``self.R``. ``set_random_state(seed)`` reseeds ``self.R`` and then
the augmentation pipeline from a seed drawn from ``self.R`` (as MONAI's ``Compose`` does for its members), so a
:class:`medssl.data.samplers.SeededDataset` that reseeds the top-level transform with an item's ``SampleKey`` seed
fixes every crop and every augmentation of that item.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, Randomizable, RandFlipd, RandGaussianNoised, RandGaussianSmoothd
from monai.utils import MAX_SEED

from .energy import EnergyBandAugmentd
from .intensity import RandGammad, RandLinearIntensityd

__all__ = [
    "MULTICROP_COUNTS",
    "MULTICROP_SIZES",
    "MULTICROP_SCALE_RANGE",
    "expand_crop_size",
    "MultiCropd",
    "multicrop_views",
    "swav_intensity_augmentations",
    "view_nuisance_augmentations",
    "seed002_augmentations",
    "seed002_multicrop",
]

# The multi-crop preset of Ghesu et al., "Self-supervised learning from 100 million medical images" (2022), Table I:
# crops [2, 6] (2D) / [1, 4] (3D); sizes [224, 92] / [(224, 192), (112, 96)] = (in-plane, depth)
MULTICROP_COUNTS: dict[int, tuple[int, ...]] = {2: (2, 6), 3: (1, 4)}
MULTICROP_SIZES: dict[int, tuple[Any, ...]] = {2: (224, 92), 3: ((224, 224, 192), (112, 112, 96))}
# the same paper, augmentation set A: "rescale to a fraction s ∈ [0.1, 0.7] of the image size"
MULTICROP_SCALE_RANGE: tuple[float, float] = (0.1, 0.7)

# the old names (a paper's number in an internal list) stay importable for existing configs; they warn when used
_DEPRECATED_CONSTANTS = {
    "SEED002_CROP_COUNTS": "MULTICROP_COUNTS",
    "SEED002_CROP_SIZES": "MULTICROP_SIZES",
    "SEED002_SCALE_RANGE": "MULTICROP_SCALE_RANGE",
}


def _deprecated_alias(function: Callable, old_name: str) -> Callable:
    """``function`` under its old name ``old_name``, emitting a DeprecationWarning at each call."""

    @functools.wraps(function)
    def alias(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(
            f"medssl.transforms.{old_name} is deprecated, use medssl.transforms.{function.__name__}",
            DeprecationWarning,
            stacklevel=2,
        )
        return function(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old_name
    alias.__doc__ = f"Deprecated alias of :func:`{function.__name__}` (same arguments)."
    return alias


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED_CONSTANTS:
        new = _DEPRECATED_CONSTANTS[name]
        warnings.warn(f"medssl.transforms.{name} is deprecated, use {new}", DeprecationWarning, stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

ScaleRange = tuple[float, float] | None


def expand_crop_size(size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """Crop size per spatial axis: an int is used on every axis; a tuple of ``spatial_dims`` ints as it is; for 3D a
    2-tuple is (in-plane, depth) -> ``(a, a, b)`` in the (X, Y, Z) order, depth last (Ghesu et al. Table I notation)."""
    if isinstance(size, numbers.Integral):
        out = (int(size),) * spatial_dims
    else:
        values = tuple(int(v) for v in size)
        if len(values) == spatial_dims:
            out = values
        elif spatial_dims == 3 and len(values) == 2:
            out = (values[0], values[0], values[1])
        else:
            raise ValueError(
                f"crop size {tuple(size)} does not fit a {spatial_dims}D image: give an int, {spatial_dims} ints"
                + (" or (in-plane, depth)" if spatial_dims == 3 else "")
            )
    if any(v < 1 for v in out):
        raise ValueError(f"crop size {out} must be positive on every axis")
    return out


def _is_pair(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, numbers.Real) for v in value)
    )


def _check_scale(value: Any, where: str) -> ScaleRange:
    if value is None:
        return None
    if not _is_pair(value):
        raise ValueError(f"MultiCropd: {where} must be None or a (low, high) pair, got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"MultiCropd: {where} must satisfy 0 < low <= high <= 1, got {value!r}")
    return low, high


def _dim_key(key: Any) -> int:
    try:
        dim = int(key)
    except (TypeError, ValueError) as err:
        raise ValueError(f"MultiCropd: mapping keys must be spatial dims 2 or 3, got {key!r}") from err
    if dim not in (2, 3):
        raise ValueError(f"MultiCropd: mapping keys must be spatial dims 2 or 3, got {key!r}")
    return dim


class MultiCropd(Randomizable, MapTransform):
    """Generate ``sum(count)`` random crops of one image, each augmented independently (see the module docstring).

    Args:
        keys: the image key (exactly one), channel-first 2D ``(C, H, W)`` or 3D ``(C, X, Y, Z)``, depth last.
        crops: groups ``[(count, size), ...]`` in output order (large crops first: SwAV computes codes on the first
            ones). ``size``: int (every axis), one int per spatial axis, or for 3D (in-plane, depth). A mapping
            ``{2: groups_2d, 3: groups_3d}`` (keys may be strings, as in JSON configs) picks the groups by the
            image's spatial dims, so one pipeline serves mixed 2D / 3D datasets.
        scales: fraction range (low, high) of the image area / volume covered by each crop before resizing (Ghesu
            et al. 2022, Table I: (0.1, 0.7)); ``None`` = plain random crops at native resolution, padded when the
            image is smaller. One value for every group, a sequence with one value per group, or a mapping by
            spatial dims like ``crops``.
        augment: a callable on a sample dict (e.g. a MONAI ``Compose``; :func:`swav_intensity_augmentations`) applied
            to each crop separately: it receives the sample with ``keys`` replaced by the crop (``modality`` etc.
            available) and must return it with the crop's shape unchanged. Reseeded by ``set_random_state``.
        out_key: where the list of crops is written.
        keep_source: keep the full image under ``keys`` (default False: it is removed, since images of different
            sizes cannot be collated into a batch).
        pad_value: value of the padding of plain crops of too-small images: "min" (the image minimum) or a number.
        allow_missing_keys: return the sample unchanged when the key is absent.

    After a call, ``self.last_regions`` lists each crop's ``(start, region_size)`` in source voxels (start may be
    negative, when padded).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        crops: Sequence[tuple[int, Any]] | Mapping[Any, Sequence[tuple[int, Any]]] = ((2, 224), (6, 92)),
        scales: Any = MULTICROP_SCALE_RANGE,
        augment: Callable[[dict], dict] | None = None,
        out_key: str = "crops",
        keep_source: bool = False,
        pad_value: str | float = "min",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"MultiCropd: exactly one image key is supported, got {self.keys}")
        self.key = self.keys[0]
        if isinstance(crops, Mapping):
            scale_map = scales if isinstance(scales, Mapping) else {k: scales for k in crops}
            scale_map = {_dim_key(k): v for k, v in scale_map.items()}
            self.plan: dict[int | None, list[tuple[int, Any, ScaleRange]]] = {}
            for key, groups in crops.items():
                dim = _dim_key(key)
                if dim not in scale_map:
                    raise ValueError(f"MultiCropd: scales has no entry for {dim}D crops")
                self.plan[dim] = self._parse_groups(groups, scale_map[dim], dim)
        else:
            if isinstance(scales, Mapping):
                raise ValueError("MultiCropd: scales may be a mapping by spatial dims only when crops is one")
            self.plan = {None: self._parse_groups(crops, scales, None)}
        self.augment = augment
        self.out_key = out_key
        self.keep_source = bool(keep_source)
        if not (pad_value == "min" or isinstance(pad_value, numbers.Real)):
            raise ValueError(f"MultiCropd: pad_value must be 'min' or a number, got {pad_value!r}")
        self.pad_value = pad_value
        self.last_regions: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    @staticmethod
    def _parse_groups(groups: Any, scales: Any, dim: int | None) -> list[tuple[int, Any, ScaleRange]]:
        where = "crops" if dim is None else f"crops[{dim}]"
        if not isinstance(groups, Sequence) or isinstance(groups, str) or not groups:
            raise ValueError(f"MultiCropd: {where} must be a non-empty list of (count, size), got {groups!r}")
        if scales is None or _is_pair(scales):
            per_group = [scales] * len(groups)
        elif isinstance(scales, Sequence) and not isinstance(scales, str) and len(scales) == len(groups):
            per_group = list(scales)
        else:
            raise ValueError(
                f"MultiCropd: scales must be None, a (low, high) pair or one per crop group ({len(groups)}), "
                f"got {scales!r}"
            )
        parsed = []
        for i, (group, scale) in enumerate(zip(groups, per_group)):
            if not isinstance(group, Sequence) or len(group) != 2:
                raise ValueError(f"MultiCropd: {where}[{i}] must be (count, size), got {group!r}")
            count, size = group
            if not isinstance(count, numbers.Integral) or count < 0:
                raise ValueError(f"MultiCropd: {where}[{i}] count must be an int >= 0, got {count!r}")
            if count == 0:  # an empty group (e.g. SwAV's 2-crop setting, n_small_crops 0) is dropped with its scale
                continue
            if dim is not None:
                size = expand_crop_size(size, dim)
            elif isinstance(size, numbers.Integral):
                expand_crop_size(size, 2)  # validates: positive
            elif not isinstance(size, Sequence) or len(size) not in (2, 3):
                raise ValueError(f"MultiCropd: {where}[{i}] size must be an int or 2 / 3 ints, got {size!r}")
            else:
                size = expand_crop_size(size, len(size))
            parsed.append((int(count), size, _check_scale(scale, f"scales[{i}]")))
        if not parsed:
            raise ValueError(f"MultiCropd: {where} has no crops (every count is 0), got {groups!r}")
        return parsed

    def groups_for(self, spatial_dims: int) -> list[tuple[int, tuple[int, ...], ScaleRange]]:
        """The crop groups ``(count, size per axis, scale range)`` used for an image with ``spatial_dims`` axes."""
        if spatial_dims in self.plan:
            groups = self.plan[spatial_dims]
        elif None in self.plan:
            groups = self.plan[None]
        else:
            configured = ", ".join(f"{d}D" for d in sorted(k for k in self.plan if k is not None))
            raise ValueError(f"MultiCropd: no crops configured for {spatial_dims}D images (configured: {configured})")
        return [(count, expand_crop_size(size, spatial_dims), scale) for count, size, scale in groups]

    @property
    def n_crops(self) -> dict[int | None, int]:
        """Total crops per configured spatial dims (None: any)."""
        return {dim: sum(count for count, _, _ in groups) for dim, groups in self.plan.items()}

    # ------------------------------------------------------------------------------------------------ randomness
    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> MultiCropd:
        """Reseed ``self.R`` (crop regions), then ``augment`` from a seed drawn from ``self.R``.

        The augmentation seed is drawn whether or not there is a ``Randomizable`` augment, so the crop regions of a
        seed do not depend on the augmentation pipeline.
        """
        super().set_random_state(seed=seed, state=state)
        augment_seed = int(self.R.randint(MAX_SEED, dtype="uint32"))
        if isinstance(self.augment, Randomizable):
            self.augment.set_random_state(seed=augment_seed)
        return self

    def randomize(self, data: Any = None) -> None:
        """Regions are drawn per crop in ``__call__`` (their number depends on the image); nothing to do here."""

    def draw_region(
        self, spatial_shape: Sequence[int], crop_size: Sequence[int], scale: ScaleRange
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Random ``(start, region_size)`` in source voxels for one crop (from ``self.R``).

        ``scale=None``: region = crop size, start uniform in [min(0, n − c), max(0, n − c)] per axis (negative start =
        padding before). Otherwise s ~ U(scale); the region has the crop's proportions and volume s · prod(n)
        (sides clipped to [1, n]); start uniform in [0, n − r].
        """
        shape = [int(n) for n in spatial_shape]
        crop = [int(c) for c in crop_size]
        if scale is None:
            region = crop
        else:
            fraction = float(self.R.uniform(*scale))
            zoom = (fraction * float(np.prod(shape, dtype=np.float64)) / float(np.prod(crop, dtype=np.float64))) ** (
                1.0 / len(shape)
            )
            region = [min(n, max(1, int(round(zoom * c)))) for n, c in zip(shape, crop)]
        start = []
        for n, r in zip(shape, region):
            low, high = min(0, n - r), max(0, n - r)
            start.append(int(self.R.randint(low, high + 1)))
        return tuple(start), tuple(region)

    # ------------------------------------------------------------------------------------------------ extraction
    def extract(
        self, image: torch.Tensor, start: Sequence[int], region: Sequence[int], crop_size: Sequence[int]
    ) -> torch.Tensor:
        """The crop ``(C, *crop_size)`` of ``image`` (C, *spatial) covering ``region`` voxels from ``start``:
        out-of-image parts padded (``pad_value``), then resized to ``crop_size`` when ``region`` differs from it."""
        spatial = image.shape[1:]
        data = image.as_tensor() if isinstance(image, MetaTensor) else image
        if not data.is_floating_point():
            data = data.float()
        index: list[slice] = [slice(None)]
        pad: list[int] = []
        for n, s, r in zip(spatial, start, region):
            low, high = max(s, 0), min(s + r, int(n))
            index.append(slice(low, high))
            pad.append((low - s, s + r - high))
        out = data[tuple(index)]
        if any(before or after for before, after in pad):
            value = float(data.min()) if self.pad_value == "min" else float(self.pad_value)
            flat = [v for before_after in reversed(pad) for v in before_after]  # F.pad: last axis first
            out = F.pad(out, flat, mode="constant", value=value)
        if tuple(region) != tuple(crop_size):
            downsampling = all(r >= c for r, c in zip(region, crop_size))
            mode = "area" if downsampling else ("bilinear" if len(region) == 2 else "trilinear")
            kwargs = {} if mode == "area" else {"align_corners": False}
            out = F.interpolate(out.unsqueeze(0), size=tuple(int(c) for c in crop_size), mode=mode, **kwargs)[0]
        elif not any(before or after for before, after in pad):
            # a plain slice is a view: copy it so that a crop never keeps (or pickles) the whole source image
            out = out.clone(memory_format=torch.contiguous_format)
        out = out.contiguous()
        if isinstance(image, MetaTensor):
            meta = dict(image.meta)
            meta["affine"] = self._crop_affine(image, start, region, crop_size)
            out = MetaTensor(out, meta=meta)
        return out

    @staticmethod
    def _crop_affine(image: MetaTensor, start: Sequence[int], region: Sequence[int], crop_size: Sequence[int]):
        """Source affine composed with the crop's voxel map: source index = start + (i + 0.5) · r / c − 0.5."""
        affine = torch.as_tensor(image.affine, dtype=torch.float64)
        size = affine.shape[-1]
        voxel_map = torch.eye(size, dtype=torch.float64, device=affine.device)
        for axis, (s, r, c) in enumerate(zip(start, region, crop_size)):
            if axis >= size - 1:
                break
            zoom = float(r) / float(c)
            voxel_map[axis, axis] = zoom
            voxel_map[axis, -1] = float(s) + 0.5 * zoom - 0.5
        return affine @ voxel_map

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.key not in d:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"MultiCropd: key '{self.key}' is not in the sample (keys: {sorted(map(str, d))})")
        image = d[self.key]
        if not isinstance(image, torch.Tensor):
            image = torch.as_tensor(np.ascontiguousarray(image))
        if image.ndim not in (3, 4):
            raise ValueError(
                f"MultiCropd: '{self.key}' has shape {tuple(image.shape)}; expected a channel-first 2D image (C, H, W) "
                "or 3D volume (C, X, Y, Z)"
            )
        spatial_dims = image.ndim - 1
        groups = self.groups_for(spatial_dims)
        base = {k: v for k, v in d.items() if k not in (self.key, self.out_key)}
        crops: list[torch.Tensor] = []
        self.last_regions = []
        for group, (count, crop_size, scale) in enumerate(groups):
            for _ in range(count):
                start, region = self.draw_region(image.shape[1:], crop_size, scale)
                self.last_regions.append((start, region))
                crop = self.extract(image, start, region, crop_size)
                if self.augment is not None:
                    crop = self.augment({**base, self.key: crop})[self.key]
                    expected = (image.shape[0],) + tuple(crop_size)
                    if tuple(crop.shape) != expected:
                        raise ValueError(
                            f"MultiCropd: augment changed crop group {group}'s shape from {expected} to "
                            f"{tuple(crop.shape)}; crops of one index must share a shape to be batched"
                        )
                crops.append(crop)
        d[self.out_key] = crops
        if not self.keep_source:
            d.pop(self.key)
        return d


def swav_intensity_augmentations(
    spatial_dims: int | Sequence[int] = 2,
    energy_reference: str | Path | Mapping | None = None,
    keys: KeysCollection = "image",
    energy_prob: float = 1.0,
    gamma_prob: float = 0.5,
    gamma_range: Sequence[float] = (1.8, 2.6),
    gamma_reciprocal_prob: float = 0.5,
    linear_prob: float = 0.5,
    a_range: Sequence[float] = (0.9, 1.1),
    b_fraction: float = 0.2,
    energy_kwargs: Mapping[str, Any] | None = None,
) -> Compose:
    """The intensity augmentation set A of Ghesu et al., "Self-supervised learning from 100 million medical images"
    (2022, Sec. 2 and Table I; SwAV-style clustering at scale), in the paper's order, as one ``Compose`` (the
    ``augment`` of crops):

    1. :class:`EnergyBandAugmentd` -- energy bands with per-band reference energies drawn within ±σ of the modality's
       mean (``energy_reference``: the JSON of ``tools/energy_reference.py`` or its dict; None = per-image fallback);
    2. :class:`RandGammad` -- γ ∈ [1.8, 2.6], applied as γ or 1/γ with equal chance (see its docstring);
    3. :class:`RandLinearIntensityd` -- a·I + b, a ∈ [0.9, 1.1], |b| ≤ 20 % of the intensity range.

    The spatial items of set A (rescale to a fraction s, random crops) are :class:`MultiCropd`'s job. The paper gives
    no application probabilities; ours are the defaults above (energy every time, as the paper's normalisation;
    gamma and linear half of the time). The set is the same for 2D and 3D (``spatial_dims`` is checked only).
    ``energy_kwargs`` go to :class:`EnergyBandAugmentd` (e.g. ``sample_range_sigma``, ``sigma_unit``).
    """
    for dim in (spatial_dims,) if isinstance(spatial_dims, numbers.Integral) else tuple(spatial_dims):
        if int(dim) not in (2, 3):
            raise ValueError(f"swav_intensity_augmentations: spatial_dims must be 2 and/or 3, got {spatial_dims!r}")
    return Compose(
        [
            EnergyBandAugmentd(keys, reference=energy_reference, prob=energy_prob, **dict(energy_kwargs or {})),
            RandGammad(keys, gamma_range=gamma_range, reciprocal_prob=gamma_reciprocal_prob, prob=gamma_prob),
            RandLinearIntensityd(keys, a_range=a_range, b_fraction=b_fraction, prob=linear_prob),
        ]
    )


def view_nuisance_augmentations(
    spatial_dims: int = 2,
    keys: KeysCollection = "image",
    flip_prob: float = 0.5,
    blur_prob: float = 0.5,
    blur_sigma: Sequence[float] = (0.25, 1.5),
    noise_prob: float = 0.5,
    noise_std: float = 0.08,
) -> Compose:
    """Per-view left-right flip, Gaussian blur and Gaussian noise (MONAI's ``RandFlipd``, ``RandGaussianSmoothd``,
    ``RandGaussianNoised``; the noise standard deviation drawn in [0, ``noise_std``] on the [0, 1]-scaled image).

    Not part of Ghesu et al.'s set A. Added after set A by the SwAV bundle's small-data ``demo.json``: two
    crops of one image share its noise level, sharpness and orientation, so without these a small network matches views
    by those nuisances instead of by anatomy (measured in the SwAV bundle's ``docs/README.md``, "Does it learn?").
    ``blur_sigma`` is in voxels, drawn per axis; the flip mirrors the first spatial axis (X, left-right in RAS).
    """
    if int(spatial_dims) not in (2, 3):
        raise ValueError(f"view_nuisance_augmentations: spatial_dims must be 2 or 3, got {spatial_dims!r}")
    sigma = tuple(float(v) for v in blur_sigma)
    sigmas = {f"sigma_{axis}": sigma for axis in "xyz"[: int(spatial_dims)]}
    return Compose(
        [
            RandFlipd(keys, prob=flip_prob, spatial_axis=0),
            RandGaussianSmoothd(keys, prob=blur_prob, **sigmas),
            RandGaussianNoised(keys, prob=noise_prob, std=noise_std, sample_std=True),
        ]
    )


def multicrop_views(
    spatial_dims: int | Sequence[int] = 2,
    sizes: Sequence[Any] | Mapping[Any, Sequence[Any]] | None = None,
    counts: Sequence[int] | Mapping[Any, Sequence[int]] | None = None,
    scales: Any = MULTICROP_SCALE_RANGE,
    augment: Callable[[dict], dict] | None = None,
    energy_reference: str | Path | Mapping | None = None,
    keys: KeysCollection = "image",
    out_key: str = "crops",
    **kwargs: Any,
) -> MultiCropd:
    """The multi-crop views of one image: a :class:`MultiCropd` whose defaults are the preset of Ghesu et al.,
    "Self-supervised learning from 100 million medical images" (2022), Table I (SwAV-style clustering at scale):
    2D 2 × 224 + 6 × 92; 3D 1 × (224, 224, 192) + 4 × (112, 112, 96) (X, Y in-plane, Z depth last), s ∈ [0.1, 0.7]
    for every crop (:data:`MULTICROP_COUNTS`, :data:`MULTICROP_SIZES`, :data:`MULTICROP_SCALE_RANGE`), each crop
    augmented by :func:`swav_intensity_augmentations` (with ``energy_reference``) unless ``augment`` is given.

    Args:
        spatial_dims: 2, 3, or both (e.g. ``(2, 3)`` for a mixed dataset: the crops follow each image's dims).
        sizes: crop size per group replacing Table I's (int, per-axis tuple, or for 3D (in-plane, depth)); with
            several ``spatial_dims`` a mapping ``{dim: sizes}`` (a dim it lacks keeps Table I's). Small sizes for
            demo / smoke configs.
        counts: crops per group replacing Table I's; a mapping ``{dim: counts}`` with several dims (same rule).
        scales, keys, out_key, kwargs: see :class:`MultiCropd`.
    """
    dims = (int(spatial_dims),) if isinstance(spatial_dims, numbers.Integral) else tuple(int(d) for d in spatial_dims)
    if not dims or any(d not in (2, 3) for d in dims):
        raise ValueError(f"multicrop_views: spatial_dims must be 2 and/or 3, got {spatial_dims!r}")

    def per_dim(value: Any, dim: int, default: Sequence[Any]) -> Sequence[Any]:
        if value is None:
            return default
        if isinstance(value, Mapping):
            found = {_dim_key(k): v for k, v in value.items()}
            return found.get(dim, default)
        if len(dims) > 1:
            raise ValueError("multicrop_views: with several spatial_dims give sizes / counts as {dim: values}")
        return value

    plan = {}
    for dim in dims:
        dim_sizes = per_dim(sizes, dim, MULTICROP_SIZES[dim])
        dim_counts = per_dim(counts, dim, MULTICROP_COUNTS[dim])
        if len(dim_sizes) != len(dim_counts):
            raise ValueError(
                f"multicrop_views: {dim}D has {len(dim_counts)} crop counts but {len(dim_sizes)} crop sizes"
            )
        plan[dim] = [(int(c), s) for c, s in zip(dim_counts, dim_sizes)]
    if augment is None:
        augment = swav_intensity_augmentations(dims, energy_reference=energy_reference, keys=keys)
    return MultiCropd(keys=keys, crops=plan, scales=scales, augment=augment, out_key=out_key, **kwargs)


seed002_multicrop = _deprecated_alias(multicrop_views, "seed002_multicrop")
seed002_augmentations = _deprecated_alias(swav_intensity_augmentations, "seed002_augmentations")
