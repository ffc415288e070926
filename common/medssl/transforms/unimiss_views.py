"""UniMiSS views (Xie et al., ECCV 2022): two (or more) augmented views of each 2D image or 3D volume, as MONAI
transforms.

:func:`unimiss_views` returns one :class:`medssl.transforms.views.MultiCropd` that serves a mixed 2D / 3D dataset:
the crop plan and the augmentation pipeline are picked by each sample's spatial dims. ``sample["crops"]`` becomes
``[view_0, ..., view_{n-1}]``, each ``(C, *view_size)``; the collated batch is a list of ``(B, C, *view_size)``
tensors, the input of :class:`medssl.methods.unimiss.UniMiSS`.

What the paper and the authors' code (YtongXie/UniMiSS-code, ``main.py`` / data loaders) specify and how it is read
here:

* **2D** (DINO-style global views): random-resized crop to 224 × 224 with area fraction s ∈ [0.14, 1] (the
  reference's scale), horizontal flip, intensity ("colour") jitter, Gaussian blur. Our 2D
  medical images are grey or RGB; the jitter is brightness (x · (1 + b), |b| ≤ 0.4) and contrast (scaling about
  the mean, |c| ≤ 0.4) with probability 0.8 — DINO's ColorJitter(0.4, 0.4, ...) with p = 0.8 (saturation and hue
  are meaningless for grey images and left out). Blur σ ∈ [0.1, 2.0] pixels with probability 0.5 (DINO: 1.0 for
  the first global view, 0.1 for the second; one pipeline for every view here, the mean of the two). The
  reference first resizes X-rays to 512²; the random-resized crop already resamples any input size to 224².
  The crop keeps the view's aspect ratio (see :class:`MultiCropd`; DINO also draws ratios 3/4 – 4/3).
* **3D**: sub-volume crops of 16 × 96 × 96 (D × H × W in the reference) = ``(96, 96, 16)`` here — volumes are
  ``(C, X, Y, Z)`` with the DEPTH axis LAST (MONAI / RAS) — taken at native resolution (the reference resamples to
  1 × 1 × 3 mm beforehand; resample your volumes, e.g. with ``Spacingd``, before this transform), padded with the
  volume minimum where the volume is smaller. Then flips, Gaussian noise, Gaussian blur, brightness, contrast and
  gamma. The seed names the operations, not their parameters; the values here are nnU-Net's default
  augmentation parameters (our choice, stated as such): flip each axis p = 0.5; noise p = 0.1, σ ≤ 0.1; blur
  p = 0.2, σ ∈ [0.5, 1.0] voxels; brightness (multiplicative) p = 0.15, × [0.75, 1.25]; contrast p = 0.15,
  × [0.75, 1.25] about the mean, range preserved; gamma p = 0.3, γ ∈ [0.7, 1.5].

Every random draw goes through MONAI's ``Randomizable`` (``self.R``): reseeding the top-level ``Compose`` (as
:class:`medssl.data.samplers.SeededDataset` does with an item's ``SampleKey`` seed) fixes every crop and every
augmentation of that item.

Channels: the views keep the loaded channel count (1 for grey images and volumes). MiT's 2D path takes 3 channels;
:class:`medssl.methods.unimiss.UniMiSS` repeats a grey channel to 3 (the reference's channel repeat) on the device,
so the data loader does not carry three copies.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    Randomizable,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
)
from monai.utils import MAX_SEED

from .views import MultiCropd, expand_crop_size

__all__ = [
    "UNIMISS_VIEW_SIZE_2D",
    "UNIMISS_VIEW_SIZE_3D",
    "UNIMISS_SCALE_2D",
    "ByDimensiond",
    "unimiss_augmentations_2d",
    "unimiss_augmentations_3d",
    "unimiss_views",
]

UNIMISS_VIEW_SIZE_2D: tuple[int, int] = (224, 224)
"""2D view size (the authors' code: inputs 224 × 224)."""
UNIMISS_VIEW_SIZE_3D: tuple[int, int, int] = (96, 96, 16)
"""3D view size (X, Y, Z), depth last: the reference's 16 × 96 × 96 (D × H × W) sub-volumes."""
UNIMISS_SCALE_2D: tuple[float, float] = (0.14, 1.0)
"""Area fraction range of the 2D random-resized crop (the authors' code: scale 0.14–1)."""


class ByDimensiond(Randomizable, MapTransform):
    """Apply ``transforms[d]`` where ``d`` is the spatial dims (2 or 3) of ``data[key]`` (a channel-first
    ``(C, H, W)`` image or ``(C, X, Y, Z)`` volume, depth last): one augmentation entry for a mixed 2D / 3D dataset.

    Args:
        transforms: ``{2: callable, 3: callable}`` (keys may be strings, as in JSON configs); a missing dimension is a
            ValueError naming it when such a sample arrives.
        keys: the image key whose rank decides (exactly one).

    ``set_random_state`` reseeds ``self.R`` and then every Randomizable member from seeds drawn from ``self.R`` (in
    the order 2, 3), so one seed fixes both pipelines.
    """

    def __init__(self, transforms: Mapping[Any, Callable[[dict], dict]], keys: KeysCollection = "image") -> None:
        MapTransform.__init__(self, keys)
        if len(self.keys) != 1:
            raise ValueError(f"ByDimensiond: exactly one key decides the dimension, got {self.keys}")
        self.transforms: dict[int, Callable[[dict], dict]] = {}
        for key, transform in dict(transforms).items():
            try:
                dim = int(key)
            except (TypeError, ValueError) as err:
                raise ValueError(f"ByDimensiond: keys must be spatial dims 2 or 3, got {key!r}") from err
            if dim not in (2, 3):
                raise ValueError(f"ByDimensiond: keys must be spatial dims 2 or 3, got {key!r}")
            if not callable(transform):
                raise TypeError(f"ByDimensiond: the {dim}D transform is a {type(transform).__name__}, not callable")
            self.transforms[dim] = transform
        if not self.transforms:
            raise ValueError("ByDimensiond: give at least one of the 2D / 3D transforms")

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> ByDimensiond:
        super().set_random_state(seed=seed, state=state)
        for dim in (2, 3):
            member_seed = int(self.R.randint(MAX_SEED, dtype="uint32"))  # drawn always: seeds independent of the plan
            transform = self.transforms.get(dim)
            if isinstance(transform, Randomizable):
                transform.set_random_state(seed=member_seed)
        return self

    def randomize(self, data: Any = None) -> None:
        """The members draw their own parameters."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        key = self.keys[0]
        if key not in data:
            raise KeyError(f"ByDimensiond: key {key!r} is not in the sample (keys: {sorted(map(str, data))})")
        dim = int(data[key].ndim) - 1
        if dim not in self.transforms:
            raise ValueError(
                f"ByDimensiond: {key!r} of shape {tuple(data[key].shape)} is {dim}D; transforms are configured for "
                f"{sorted(self.transforms)}D only"
            )
        return self.transforms[dim](dict(data))


def unimiss_augmentations_2d(
    keys: KeysCollection = "image",
    flip_prob: float = 0.5,
    jitter_prob: float = 0.8,
    brightness: float = 0.4,
    contrast: float = 0.4,
    blur_prob: float = 0.5,
    blur_sigma: Sequence[float] = (0.1, 2.0),
) -> Compose:
    """UniMiSS's 2D augmentations after the random-resized crop (see the module docstring): horizontal (left-right)
    flip, brightness and contrast jitter (each with ``jitter_prob``), Gaussian blur. Images ``(C, *spatial)`` as
    medssl's loader gives them, column (x) index first, so the left-right flip reverses spatial axis 0."""
    sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
    return Compose(
        [
            RandFlipd(keys, prob=flip_prob, spatial_axis=0),  # left-right (column index first)
            RandScaleIntensityd(keys, factors=brightness, prob=jitter_prob),
            RandScaleIntensityFixedMeand(keys, factors=contrast, prob=jitter_prob),
            RandGaussianSmoothd(keys, sigma_x=sigma, sigma_y=sigma, prob=blur_prob),
        ]
    )


def unimiss_augmentations_3d(
    keys: KeysCollection = "image",
    flip_prob: float = 0.5,
    noise_prob: float = 0.1,
    noise_std: float = 0.1,
    blur_prob: float = 0.2,
    blur_sigma: Sequence[float] = (0.5, 1.0),
    brightness_prob: float = 0.15,
    brightness: float = 0.25,
    contrast_prob: float = 0.15,
    contrast: float = 0.25,
    gamma_prob: float = 0.3,
    gamma: Sequence[float] = (0.7, 1.5),
) -> Compose:
    """UniMiSS's 3D augmentations after the sub-volume crop (see the module docstring; nnU-Net's default
    parameters): flips along X, Y and Z, Gaussian noise, Gaussian blur, brightness, contrast (range preserved),
    gamma. Volumes ``(C, X, Y, Z)``, depth last."""
    sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
    return Compose(
        [
            RandFlipd(keys, prob=flip_prob, spatial_axis=0),
            RandFlipd(keys, prob=flip_prob, spatial_axis=1),
            RandFlipd(keys, prob=flip_prob, spatial_axis=2),
            RandGaussianNoised(keys, prob=noise_prob, std=noise_std, sample_std=True),
            RandGaussianSmoothd(keys, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=blur_prob),
            RandScaleIntensityd(keys, factors=brightness, prob=brightness_prob),
            RandScaleIntensityFixedMeand(keys, factors=contrast, preserve_range=True, prob=contrast_prob),
            RandAdjustContrastd(keys, gamma=(float(gamma[0]), float(gamma[1])), prob=gamma_prob),
        ]
    )


def unimiss_views(
    n_views: int = 2,
    size_2d: int | Sequence[int] = UNIMISS_VIEW_SIZE_2D,
    size_3d: Sequence[int] = UNIMISS_VIEW_SIZE_3D,
    scale_2d: Sequence[float] = UNIMISS_SCALE_2D,
    keys: KeysCollection = "image",
    out_key: str = "crops",
    augment_2d: Callable[[dict], dict] | None = None,
    augment_3d: Callable[[dict], dict] | None = None,
    **kwargs: Any,
) -> MultiCropd:
    """The views of UniMiSS for a mixed 2D / 3D dataset: ``n_views`` random-resized crops of ``size_2d`` (area
    fraction in ``scale_2d``) of a 2D image, or ``n_views`` plain sub-volume crops of ``size_3d`` (X, Y, Z — depth
    last; an int is used on every axis, a pair is (in-plane, depth)) of a 3D volume, each augmented independently by
    :func:`unimiss_augmentations_2d` / :func:`unimiss_augmentations_3d` (or the given ``augment_2d`` / ``augment_3d``).
    Other ``kwargs`` go to :class:`MultiCropd` (e.g. ``pad_value``)."""
    if not isinstance(n_views, numbers.Integral) or n_views < 2:
        raise ValueError(f"unimiss_views: n_views={n_views!r} must be an int >= 2 (self-distillation pairs views)")
    size_2d = expand_crop_size(size_2d, 2)
    size_3d = expand_crop_size(size_3d, 3)
    scale = (float(scale_2d[0]), float(scale_2d[1]))
    augment = ByDimensiond(
        {
            2: augment_2d if augment_2d is not None else unimiss_augmentations_2d(keys),
            3: augment_3d if augment_3d is not None else unimiss_augmentations_3d(keys),
        },
        keys=keys,
    )
    return MultiCropd(
        keys=keys,
        crops={2: [(int(n_views), size_2d)], 3: [(int(n_views), size_3d)]},
        scales={2: scale, 3: None},
        augment=augment,
        out_key=out_key,
        **kwargs,
    )

