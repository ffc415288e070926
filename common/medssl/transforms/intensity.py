"""Intensity augmentations of set A of Ghesu et al. 2022: gamma, linear a·I + b, whole-image rescaling.

Ghesu et al. list their augmentation set A as: rescale to a fraction s ∈ [0.1, 0.7] of the image size; energy-based
augmentation (:class:`medssl.transforms.energy.EnergyBandAugmentd`); gamma with γ ∈ [1.8, 2.6]; linear a·I + b with
a ∈ [0.9, 1.1] and |b| ≤ 20 % of the intensity range; random crops last. This module holds the gamma and linear
transforms and the literal "rescale the whole image by s" reading of the first item; the default reading of that item
(a random region covering a fraction s of the image, resized to the crop size) lives in
:mod:`medssl.transforms.views` next to the crops (see there for why it is the default).

All transforms are MONAI ``RandomizableTransform`` dictionary transforms: every random number comes from ``self.R``
(seeded by ``set_random_state``, e.g. through :class:`medssl.data.samplers.SeededDataset`), one draw per call shared by
all keys. Images are channel-first 2D ``(C, H, W)`` or 3D ``(C, X, Y, Z)`` (MONAI / RAS, depth last); numpy arrays,
torch tensors on any device (GPU included) and ``MetaTensor`` (meta kept) are accepted and the output has the input's
type and device. Intensity statistics (min, max) are taken over the whole image, all channels together.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import AdjustContrast, MapTransform, RandomizableTransform, Resize
from monai.utils import convert_to_dst_type, ensure_tuple_rep

__all__ = ["RandGammad", "RandLinearIntensityd", "RandRescaleFractiond"]


def _check_range(name: str, owner: str, value: Sequence[float], positive: bool = True) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{owner}: {name} must be a (low, high) pair of numbers, got {value!r}") from err
    if not (np.isfinite(low) and np.isfinite(high)) or low > high or (positive and low <= 0):
        kind = "positive " if positive else ""
        raise ValueError(f"{owner}: {name} must be a {kind}(low, high) pair with low <= high, got {value!r}")
    return low, high


def _check_prob(owner: str, name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}: {name} must be in [0, 1], got {value}")
    return value


class _RandIntensityd(RandomizableTransform, MapTransform):
    """What the transforms of this module share: ``keys`` / ``prob`` / ``allow_missing_keys`` set up and checked, the
    (low, high) range of the drawn value checked and stored as ``range_name``, and a ``__call__`` that draws once
    (``randomize``) and, when applied, replaces each present key's image by ``transform_key(key, image)``."""

    def __init__(
        self,
        owner: str,
        keys: KeysCollection,
        prob: float,
        allow_missing_keys: bool,
        range_name: str,
        value_range: Sequence[float],
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, _check_prob(owner, "prob", prob))
        setattr(self, range_name, _check_range(range_name, owner, value_range))

    def transform_key(self, key: Hashable, image: Any) -> Any:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self.transform_key(key, d[key])
        return d


class RandGammad(_RandIntensityd):
    """Gamma augmentation of Ghesu et al.: ``I' = ((I − min) / (max − min))^g · (max − min) + min`` with g = γ or 1/γ.

    γ is drawn uniformly from ``gamma_range`` (the paper's [1.8, 2.6]); with probability ``reciprocal_prob`` the exponent
    is g = 1/γ instead of γ. The intensity is normalised to [0, 1] by the image's own min and max, raised to g and
    mapped back, so min and max are fixed points and the output stays inside the input's range.

    Relation to MONAI: ``monai.transforms.RandAdjustContrastd(gamma=(1.8, 2.6))`` applies exactly this formula (it is
    MONAI's ``AdjustContrast``, which this class calls; its range has a 1e-7 guard) with g = γ always. That is the
    literal reading of "gamma γ ∈ [1.8, 2.6]", but an exponent > 1 only darkens: every intensity strictly inside
    (min, max) goes down, so the views never get brighter mid-tones. Our default ``reciprocal_prob=0.5`` applies γ
    or 1/γ with equal chance (1/γ ∈ [0.385, 0.556] brightens), i.e. the gamma *magnitude* is the paper's and the
    direction is symmetric; ``reciprocal_prob=0`` gives MONAI's / the literal behaviour.

    Args:
        keys: keys of the images; all keys share one draw per call.
        gamma_range: (low, high) of γ, both > 0.
        reciprocal_prob: probability of using 1/γ instead of γ.
        prob: probability of applying the transform at all.
        allow_missing_keys: don't raise when a key is absent.

    After a call, ``self.exponent`` is the exponent g that was applied (1.0 when not applied).
    """

    backend = AdjustContrast.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        gamma_range: Sequence[float] = (1.8, 2.6),
        reciprocal_prob: float = 0.5,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__("RandGammad", keys, prob, allow_missing_keys, "gamma_range", gamma_range)
        self.reciprocal_prob = _check_prob("RandGammad", "reciprocal_prob", reciprocal_prob)
        self.exponent = 1.0
        self._adjust = AdjustContrast(gamma=1.0)

    def randomize(self, data: Any = None) -> None:
        """Draw whether to apply, γ ~ U(gamma_range) and whether to use 1/γ (always three draws: stable streams)."""
        super().randomize(None)
        gamma = float(self.R.uniform(*self.gamma_range))
        use_reciprocal = bool(self.R.uniform() < self.reciprocal_prob)
        self.exponent = (1.0 / gamma if use_reciprocal else gamma) if self._do_transform else 1.0

    def transform_key(self, key: Hashable, image: Any) -> Any:
        return convert_to_dst_type(self._adjust(image, gamma=self.exponent), dst=image)[0]


class RandLinearIntensityd(_RandIntensityd):
    """Linear intensity augmentation of Ghesu et al.: ``I' = a · I + b``, a ∈ a_range, |b| ≤ b_fraction · (max − min).

    Per call one a ~ U(a_range) (the paper's [0.9, 1.1]) and one u ~ U(−1, 1) are drawn; each image gets
    ``b = u · b_fraction · (max(I) − min(I))`` with its own intensity range (the paper's b_fraction = 0.2, "20 % of the
    intensity range"). The output is not clipped (it may leave the input range by up to 10 % + 20 %).

    Args:
        keys: keys of the images; all keys share one draw (a, u) per call.
        a_range: (low, high) of the multiplicative factor a (> 0).
        b_fraction: bound of |b| as a fraction of the image's intensity range (>= 0).
        prob: probability of applying the transform.
        allow_missing_keys: don't raise when a key is absent.

    After a call, ``self.scale`` is a and ``self.offset_fraction`` is u · b_fraction (1.0 and 0.0 when not applied).
    """

    backend = [torch.Tensor.__name__, np.ndarray.__name__]

    def __init__(
        self,
        keys: KeysCollection = "image",
        a_range: Sequence[float] = (0.9, 1.1),
        b_fraction: float = 0.2,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__("RandLinearIntensityd", keys, prob, allow_missing_keys, "a_range", a_range)
        self.b_fraction = float(b_fraction)
        if not np.isfinite(self.b_fraction) or self.b_fraction < 0:
            raise ValueError(f"RandLinearIntensityd: b_fraction must be a finite number >= 0, got {b_fraction!r}")
        self.scale = 1.0
        self.offset_fraction = 0.0

    def randomize(self, data: Any = None) -> None:
        """Draw whether to apply, a ~ U(a_range) and u ~ U(−1, 1) (always three draws)."""
        super().randomize(None)
        scale = float(self.R.uniform(*self.a_range))
        unit = float(self.R.uniform(-1.0, 1.0))
        self.scale, self.offset_fraction = (scale, unit * self.b_fraction) if self._do_transform else (1.0, 0.0)

    def apply(self, image: Any) -> Any:
        """``a · I + u · b_fraction · (max − min)`` with the current draw (numpy or torch, any device, no sync)."""
        if isinstance(image, torch.Tensor):
            work = image if image.is_floating_point() else image.float()
            value_range = work.amax() - work.amin()
            return work * self.scale + value_range * self.offset_fraction
        work = np.asarray(image)
        work = work if np.issubdtype(work.dtype, np.floating) else work.astype(np.float32)
        value_range = work.max() - work.min()
        return (work * self.scale + value_range * self.offset_fraction).astype(work.dtype, copy=False)

    def transform_key(self, key: Hashable, image: Any) -> Any:
        return self.apply(image)


class RandRescaleFractiond(_RandIntensityd):
    """Literal reading of Ghesu et al.'s "rescale to a fraction s ∈ [0.1, 0.7] of the image size": resample the WHOLE
    image so that every spatial side n becomes ``max(min_size, round(s · n))``.

    One s ~ U(scale_range) per call, shared by all keys and all axes (isotropic in voxels, aspect ratio kept).
    Resampling uses ``monai.transforms.Resize`` (``mode`` "area", i.e. box averaging, for downscaling; a
    ``MetaTensor``'s affine is updated, so the voxel spacing grows by 1/s). Followed by plain random crops
    (``MultiCropd(..., scales=None)``, which pads images smaller than the crop) this reproduces the paper's list
    order "rescale ..., random crops last" literally.

    This is NOT the default of :func:`medssl.transforms.views.multicrop_views`: how many pixels a crop of fixed
    size covers would then depend on the image's native resolution (a 512² CT slice at s = 0.1 is 51² and a 224 crop
    is mostly padding, a 3000² radiograph is 300²). The default reads s as the fraction of the image that each crop
    covers (random-resized-crop style, resolution independent); see :class:`medssl.transforms.views.MultiCropd`.

    Args:
        keys: keys of the images; all keys get the same s.
        scale_range: (low, high) of s (> 0).
        mode: interpolation mode(s) of ``monai.transforms.Resize``, one or one per key ("area", "bilinear",
            "trilinear", "nearest" for label maps, ...).
        min_size: smallest side after rescaling (voxels).
        prob: probability of applying the transform.
        allow_missing_keys: don't raise when a key is absent.

    Images are channel-first 2D ``(C, H, W)`` or 3D ``(C, X, Y, Z)`` (depth last). After a call ``self.fraction``
    is s (1.0 when not applied).
    """

    backend = Resize.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        scale_range: Sequence[float] = (0.1, 0.7),
        mode: str | Sequence[str] = "area",
        min_size: int = 1,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__("RandRescaleFractiond", keys, prob, allow_missing_keys, "scale_range", scale_range)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        if int(min_size) < 1:
            raise ValueError(f"RandRescaleFractiond: min_size must be >= 1, got {min_size}")
        self.min_size = int(min_size)
        self.fraction = 1.0

    def randomize(self, data: Any = None) -> None:
        """Draw whether to apply and s ~ U(scale_range) (always two draws)."""
        super().randomize(None)
        fraction = float(self.R.uniform(*self.scale_range))
        self.fraction = fraction if self._do_transform else 1.0

    def rescaled_size(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial size after rescaling by the current s: ``max(min_size, round(s · n))`` per axis."""
        return tuple(max(self.min_size, int(round(self.fraction * int(n)))) for n in spatial_shape)

    def transform_key(self, key: Hashable, image: Any) -> Any:
        if image.ndim not in (3, 4):
            raise ValueError(
                f"RandRescaleFractiond: '{key}' has shape {tuple(image.shape)}; expected (C, H, W) or (C, X, Y, Z)"
            )
        mode = self.mode[list(self.keys).index(key)]  # the mode given for this key (one per key, in keys' order)
        resize = Resize(spatial_size=self.rescaled_size(image.shape[1:]), mode=mode)
        out = resize(image)  # a tensor (MetaTensor: affine updated); numpy input comes back as numpy
        return out.numpy() if isinstance(image, np.ndarray) else out
