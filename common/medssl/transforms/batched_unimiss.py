"""Batched UniMiSS views (issue #12): :func:`medssl.transforms.unimiss_views.unimiss_views`'s crops and
augmentations made on a collated batch of one spatial dimension, on the batch's device, with each item's parameters
drawn from its own seed (its ``SampleKey`` seed through :class:`medssl.transforms.batched.SampleSeedd`), so an item's
views do not depend on the batch, the ranks, the workers or a resume (the contract of
:class:`medssl.transforms.batched.BatchedMultiCrop`, whose functions do the work: ``resized_crops``,
``gaussian_blur``, ``gaussian_noise``, ``adjust_gamma``, ``linear_intensity``).

Input, one dimension per batch (:class:`medssl.data.DimensionAlternatingBatchSampler` gives such batches, as
:class:`medssl.methods.unimiss.UniMiSS` requires):

* **2D**: working-size images ``(B, C, W, W)`` (:class:`UniMiSSWorkingSized`: longest side resized to ``W``, aspect
  kept, padded at the end to a square) and their extents ``(B, 2)`` (the image's size inside the padded square).
  Each view is a random-resized crop of the extent: area fraction s ~ U(``scale_2d``) of the extent's area, the
  view's proportions (sides clipped to the extent), start uniform in ``[0, extent − region]`` -- the distribution of
  :class:`medssl.transforms.views.MultiCropd`, not rounded to whole pixels; bilinear resampling (``grid_sample``),
  where :class:`MultiCropd` averages boxes when it downsamples. Then left-right flip (axis 0), brightness ``x · (1 +
  b)`` and contrast ``(x − mean) · (1 + c) + mean`` (each with ``jitter_prob``, b, c ~ U(±0.4)), blur (σ per axis ~
  U(``blur_sigma_2d``) with ``blur_prob_2d``).
* **3D**: volumes at native resolution, a ``(B, C, X, Y, Z)`` tensor or a list of ``(C, X, Y, Z)`` tensors of any
  shapes (depth last). Each view is a plain sub-volume crop of ``size_3d`` at a whole-voxel start uniform in
  ``[min(0, n − c), max(0, n − c)]``, padded with the volume's minimum where the volume is smaller
  (:class:`MultiCropd` with ``scale=None``, exactly); then flips of X, Y, Z, noise, blur, brightness, contrast (range
  preserved), gamma with nnU-Net's default parameters (see :mod:`medssl.transforms.unimiss_views`).

Each item draws a fixed number of values per view from ``numpy.random.RandomState(seed)`` whatever the
probabilities; noise is drawn on the batch's device from a ``torch.Generator`` seeded per item and view. The values
differ from the per-item path's (other random streams); the distributions are the same
(tests/test_batched_unimiss.py).
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import list_data_collate
from monai.transforms import MapTransform, Resized, SpatialPadd

from .batched import (
    _check_pair, _check_prob, adjust_gamma, gaussian_blur, gaussian_noise, linear_intensity, resized_crops,
)
from .unimiss_views import UNIMISS_SCALE_2D, UNIMISS_VIEW_SIZE_2D, UNIMISS_VIEW_SIZE_3D
from .views import expand_crop_size

__all__ = ["UniMiSSViewParams", "BatchedUniMiSSViews", "UniMiSSWorkingSized", "UniMiSSViewsCollate",
           "contrast_about_mean", "make_views", "plain_crops"]


@dataclass
class UniMiSSViewParams:
    """Per-sample parameters of one view for B items (numpy arrays, axis 0 = item): ``start`` / ``region`` (B, D)
    source voxels (whole voxels in 3D), ``flip`` (B, D) bool, ``brightness`` / ``contrast`` (B,) the factors 1 + b,
    1 + c (1.0 = not applied), ``gamma`` (B,) (1.0 = not applied), ``blur_sigma`` (B, D) (0 = no blur),
    ``noise_std`` (B,) (0 = none), ``noise_seed`` (B,)."""

    size: tuple[int, ...]
    start: np.ndarray
    region: np.ndarray
    flip: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    gamma: np.ndarray
    blur_sigma: np.ndarray
    noise_std: np.ndarray
    noise_seed: np.ndarray


def _per_sample(values: Any, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=like.dtype, device=like.device)
    return t.reshape((-1,) + (1,) * (like.ndim - 1))


def contrast_about_mean(images: torch.Tensor, factor: Any, preserve_range: bool = False) -> torch.Tensor:
    """``(x − mean) · factor[b] + mean`` per sample (mean over the sample's channels and voxels), clipped to the
    sample's input range with ``preserve_range`` -- MONAI ``ScaleIntensityFixedMean(fixed_mean=True)`` with
    ``1 + factor``; ours adds per-sample factors on a batch. Samples with factor 1 are returned exactly."""
    factor = np.asarray(factor, dtype=np.float64).reshape(-1)
    if not np.any(factor != 1.0):
        return images
    flat = images.reshape(images.shape[0], -1)
    shape = (-1,) + (1,) * (images.ndim - 1)
    mean = flat.mean(dim=1).reshape(shape)
    out = (images - mean) * _per_sample(factor, images) + mean
    if preserve_range:
        out = torch.minimum(torch.maximum(out, flat.amin(dim=1).reshape(shape)), flat.amax(dim=1).reshape(shape))
    return torch.where(_per_sample(factor != 1.0, images) > 0, out, images)


def plain_crops(volumes: torch.Tensor | Sequence[torch.Tensor], start: Any, size: Sequence[int]) -> torch.Tensor:
    """Whole-voxel crops ``(B, C, *size)`` of each item (a batch tensor or a list of ``(C, *spatial)`` tensors of any
    shapes) at integer ``start`` (B, D), the parts outside the item padded with the item's minimum -- what
    :class:`MultiCropd` does with ``scale=None``, on items of different shapes (ours: a list input)."""
    size = tuple(int(c) for c in size)
    start = np.asarray(start, dtype=np.int64).reshape(len(volumes), len(size))
    out = []
    for item, s in zip(volumes, start):
        spatial = item.shape[1:]
        if len(spatial) != len(size):
            raise ValueError(f"plain_crops: an item of shape {tuple(item.shape)} for crops of size {size}")
        index, pad = [slice(None)], []
        for n, lo, c in zip(spatial, s, size):
            a, b = max(int(lo), 0), min(int(lo) + c, int(n))
            index.append(slice(a, b))
            pad.append((a - int(lo), int(lo) + c - b))
        crop = item[tuple(index)]
        if any(before or after for before, after in pad):
            flat = [v for before_after in reversed(pad) for v in before_after]  # F.pad: last axis first
            crop = F.pad(crop, flat, mode="constant", value=float(item.min()))
        out.append(crop)
    return torch.stack(out)


def _blur_some(images: torch.Tensor, sigma: np.ndarray, max_sigma: float) -> torch.Tensor:
    """``gaussian_blur`` on the samples with a σ > 0 only (the others are unchanged; an item's result is the same
    either way, gaussian_blur being per-sample element-wise ops with a fixed radius): ours saves the work on the
    rest of the batch (most of it in 3D, where p = 0.2)."""
    rows = np.flatnonzero(np.any(sigma > 0, axis=1))
    if len(rows) == 0:
        return images
    if len(rows) == len(sigma):
        return gaussian_blur(images, sigma, max_sigma=max_sigma)
    index = torch.as_tensor(rows, device=images.device)
    out = images.clone()
    out[index] = gaussian_blur(images[index], sigma[rows], max_sigma=max_sigma)
    return out


def _flip(images: torch.Tensor, flip: np.ndarray) -> torch.Tensor:
    """Mirror sample b along the spatial axes where ``flip[b]`` is True (a batch op per flip pattern)."""
    if not flip.any():
        return images
    out = images.clone()
    for pattern in {tuple(row) for row in flip.tolist()}:
        axes = [2 + a for a, f in enumerate(pattern) if f]
        if not axes:
            continue
        rows = torch.as_tensor(np.flatnonzero((flip == np.asarray(pattern)).all(axis=1)), device=images.device)
        out[rows] = torch.flip(images[rows], axes)
    return out


def _pair(name: str, value: Any, positive: bool = False) -> tuple[float, float]:
    return _check_pair(name, value, 0.0 if positive else None, owner="BatchedUniMiSSViews")


def _prob(name: str, value: Any) -> float:
    return _check_prob(name, value, owner="BatchedUniMiSSViews")


class BatchedUniMiSSViews:
    """UniMiSS's views of a batch of one dimension: ``views = BatchedUniMiSSViews()(images, seeds, extents)`` is a list
    of ``n_views`` tensors ``(B, C, *view_size)`` -- the collated ``"crops"`` of :func:`unimiss_views`, which
    :class:`medssl.methods.unimiss.UniMiSS` reads. The defaults are :func:`unimiss_views`' (see the module docstring
    for the distributions and the randomness contract).

    ``images``: 2D ``(B, C, H, W)`` working-size images (``extents`` (B, 2): the image's size inside; None = the
    whole array), or 3D volumes ``(B, C, X, Y, Z)`` / a list of ``(C, X, Y, Z)`` of any shapes. ``seeds``: B ints
    (sequence, array or tensor).
    """

    def __init__(
        self,
        n_views: int = 2,
        size_2d: Any = UNIMISS_VIEW_SIZE_2D,
        size_3d: Any = UNIMISS_VIEW_SIZE_3D,
        scale_2d: Sequence[float] = UNIMISS_SCALE_2D,
        flip_prob_2d: float = 0.5,
        jitter_prob: float = 0.8,
        brightness_2d: float = 0.4,
        contrast_2d: float = 0.4,
        blur_prob_2d: float = 0.5,
        blur_sigma_2d: Sequence[float] = (0.1, 2.0),
        flip_prob_3d: float = 0.5,
        noise_prob: float = 0.1,
        noise_std: float = 0.1,
        blur_prob_3d: float = 0.2,
        blur_sigma_3d: Sequence[float] = (0.5, 1.0),
        brightness_prob_3d: float = 0.15,
        brightness_3d: float = 0.25,
        contrast_prob_3d: float = 0.15,
        contrast_3d: float = 0.25,
        gamma_prob: float = 0.3,
        gamma_range: Sequence[float] = (0.7, 1.5),
        mode: str = "bilinear",
    ) -> None:
        if not isinstance(n_views, numbers.Integral) or n_views < 2:
            raise ValueError(f"BatchedUniMiSSViews: n_views={n_views!r} must be an int >= 2")
        self.n_views = int(n_views)
        self.size_2d = expand_crop_size(size_2d, 2)
        self.size_3d = expand_crop_size(size_3d, 3)
        self.scale_2d = _pair("scale_2d", scale_2d, positive=True)
        if self.scale_2d[1] > 1.0:
            raise ValueError(f"BatchedUniMiSSViews: scale_2d must be within (0, 1], got {scale_2d!r}")
        self.flip_prob = {2: _prob("flip_prob_2d", flip_prob_2d), 3: _prob("flip_prob_3d", flip_prob_3d)}
        self.blur_prob = {2: _prob("blur_prob_2d", blur_prob_2d), 3: _prob("blur_prob_3d", blur_prob_3d)}
        self.blur_sigma = {2: _pair("blur_sigma_2d", blur_sigma_2d, True),
                           3: _pair("blur_sigma_3d", blur_sigma_3d, True)}
        # brightness / contrast: (probability, half-width of the factor range) per dimension
        self.brightness = {2: (_prob("jitter_prob", jitter_prob), float(brightness_2d)),
                           3: (_prob("brightness_prob_3d", brightness_prob_3d), float(brightness_3d))}
        self.contrast = {2: (_prob("jitter_prob", jitter_prob), float(contrast_2d)),
                         3: (_prob("contrast_prob_3d", contrast_prob_3d), float(contrast_3d))}
        for name, value in (("brightness_2d", brightness_2d), ("contrast_2d", contrast_2d),
                            ("brightness_3d", brightness_3d), ("contrast_3d", contrast_3d), ("noise_std", noise_std)):
            if not 0.0 <= float(value) < (1.0 if name != "noise_std" else float("inf")):
                raise ValueError(f"BatchedUniMiSSViews: {name}={value!r} must be >= 0" +
                                 (" and < 1" if name != "noise_std" else ""))
        self.noise_prob = _prob("noise_prob", noise_prob)
        self.noise_std = float(noise_std)
        self.gamma_prob = _prob("gamma_prob", gamma_prob)
        self.gamma_range = _pair("gamma_range", gamma_range, positive=True)
        self.mode = mode

    # -------------------------------------------------------------------------------------------- parameters
    def _draw_one(self, rng: np.random.RandomState, extent: np.ndarray, dims: int) -> dict[str, Any]:
        """One view's parameters for one item: always the same number of draws, in this order."""
        u_scale = rng.uniform()
        u_start = rng.uniform(size=3)[:dims]
        u_flip = rng.uniform(size=3)[:dims]
        b_do, b_val, c_do, c_val = rng.uniform(size=4)
        blur_do = rng.uniform()
        blur_val = rng.uniform(size=3)[:dims]
        n_do, n_val = rng.uniform(size=2)
        g_do, g_val = rng.uniform(size=2)
        noise_seed = int(rng.randint(0, 2**31 - 1))
        n = np.asarray(extent, dtype=np.float64)
        if dims == 2:
            c = np.asarray(self.size_2d, dtype=np.float64)
            fraction = self.scale_2d[0] + (self.scale_2d[1] - self.scale_2d[0]) * u_scale
            region = np.clip(np.sqrt(fraction * np.prod(n) / np.prod(c)) * c, 1.0, n)
            start = (n - region) * u_start
        else:
            region = np.asarray(self.size_3d, dtype=np.float64)
            low, high = np.minimum(n - region, 0), np.maximum(n - region, 0)
            start = np.minimum(low + np.floor(u_start * (high - low + 1)), high)  # integer uniform in [low, high]
        flip = (u_flip < self.flip_prob[dims]) & (np.arange(dims) == 0 if dims == 2 else True)  # 2D: left-right only
        b_prob, b_width = self.brightness[dims]
        c_prob, c_width = self.contrast[dims]
        brightness = 1.0 + (2.0 * b_val - 1.0) * b_width if b_do < b_prob else 1.0
        contrast = 1.0 + (2.0 * c_val - 1.0) * c_width if c_do < c_prob else 1.0
        lo, hi = self.blur_sigma[dims]
        sigma = lo + (hi - lo) * blur_val if blur_do < self.blur_prob[dims] else np.zeros(dims)
        noise = self.noise_std * n_val if dims == 3 and n_do < self.noise_prob else 0.0
        gamma = self.gamma_range[0] + (self.gamma_range[1] - self.gamma_range[0]) * g_val \
            if dims == 3 and g_do < self.gamma_prob else 1.0
        return {"start": start, "region": region, "flip": flip, "brightness": brightness, "contrast": contrast,
                "gamma": gamma, "blur_sigma": sigma, "noise_std": noise, "noise_seed": noise_seed}

    def draw(self, seeds: Sequence[int], extents: Any) -> list[UniMiSSViewParams]:
        """The parameters of every view (one :class:`UniMiSSViewParams` per view) for items with these ``seeds`` and
        spatial ``extents`` (B, D): the 2D image's size inside the working array, the 3D volume's shape."""
        seeds = np.asarray(seeds).reshape(-1)
        extents = np.asarray(extents, dtype=np.float64).reshape(len(seeds), -1)
        dims = extents.shape[1]
        if dims not in (2, 3):
            raise ValueError(f"BatchedUniMiSSViews: extents of {dims} axes; expected 2D or 3D items")
        per_item = []
        for seed, extent in zip(seeds, extents):
            rng = np.random.RandomState(int(seed) & 0xFFFFFFFF)
            per_item.append([self._draw_one(rng, extent, dims) for _ in range(self.n_views)])
        size = self.size_2d if dims == 2 else self.size_3d
        return [UniMiSSViewParams(size=size, **{f: np.stack([np.asarray(item[v][f]) for item in per_item])
                                                  for f in per_item[0][v]}) for v in range(self.n_views)]

    # -------------------------------------------------------------------------------------------- application
    def apply(self, images: torch.Tensor | Sequence[torch.Tensor], params: UniMiSSViewParams) -> torch.Tensor:
        """One view for the whole batch, in :func:`unimiss_views`' order -- 2D: crop + flip, brightness, contrast,
        blur; 3D: crop, flips, noise, blur, brightness, contrast (range preserved), gamma."""
        dims = len(params.size)
        if dims == 2:
            out = resized_crops(images, params.start, params.region, params.size, params.flip, mode=self.mode)
            out = linear_intensity(out, params.brightness, np.zeros_like(params.brightness))
            out = contrast_about_mean(out, params.contrast)
            return _blur_some(out, params.blur_sigma, self.blur_sigma[2][1])
        out = _flip(plain_crops(images, params.start, params.size), params.flip)
        if np.any(params.noise_std > 0):
            out = gaussian_noise(out, params.noise_std, params.noise_seed)
        out = _blur_some(out, params.blur_sigma, self.blur_sigma[3][1])
        out = linear_intensity(out, params.brightness, np.zeros_like(params.brightness))
        out = contrast_about_mean(out, params.contrast, preserve_range=True)
        return adjust_gamma(out, params.gamma)

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor], seeds: Any, extents: Any = None
                 ) -> list[torch.Tensor]:
        """The list of ``n_views`` views ``(B, C, *view_size)`` (see the class docstring)."""
        if isinstance(seeds, torch.Tensor):
            seeds = seeds.detach().cpu().numpy()
        seeds = np.asarray(seeds).reshape(-1)
        if isinstance(images, torch.Tensor):
            items = None
            data = images.as_subclass(torch.Tensor) if type(images) is not torch.Tensor else images
            if data.ndim not in (4, 5):
                raise ValueError(f"BatchedUniMiSSViews: images of shape {tuple(data.shape)}; expected (B, C, H, W) "
                                 "or (B, C, X, Y, Z)")
            data = data if data.is_floating_point() else data.float()
            dims, batch, shapes = data.ndim - 2, data.shape[0], [tuple(data.shape[2:])] * data.shape[0]
        else:
            items = [t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t for t in images]
            items = [t if t.is_floating_point() else t.float() for t in items]
            ranks = {t.ndim for t in items}
            if ranks != {4}:
                raise ValueError(f"BatchedUniMiSSViews: a list of items must hold 3D volumes (C, X, Y, Z) only; got "
                                 f"shapes {[tuple(t.shape) for t in items]}")
            data, dims, batch, shapes = items, 3, len(items), [tuple(t.shape[1:]) for t in items]
        if len(seeds) != batch:
            raise ValueError(f"BatchedUniMiSSViews: {batch} items and {len(seeds)} seeds")
        if extents is None:
            extents = np.asarray(shapes, dtype=np.float64)
        else:
            if isinstance(extents, torch.Tensor):
                extents = extents.detach().cpu().numpy()
            extents = np.asarray(extents, dtype=np.float64).reshape(batch, -1)
            if dims != 2 or extents.shape[1] != 2 or np.any(extents < 1) or np.any(extents > np.asarray(shapes)):
                raise ValueError(f"BatchedUniMiSSViews: extents {extents.tolist()} must be 2D image sizes within the "
                                 f"images' {shapes[0]} (extents are for padded 2D working images)")
        return [self.apply(data, params) for params in self.draw(seeds, extents)]


class UniMiSSWorkingSized(MapTransform):
    """The deterministic front's last step for :class:`BatchedUniMiSSViews`: a 2D image's longest side resized to
    ``working_size`` (aspect kept, area resampling), ``data[extent_key]`` = its size then (an int64 tensor (2,)), and
    the image padded at its end with ``pad_value`` to ``working_size`` squared (so 2D items batch); a 3D volume is left
    as it is (its views are plain crops at native resolution) with ``data[extent_key]`` = its shape (3,). MONAI's
    ``Resized`` / ``SpatialPadd``; ours adds the extent and the choice by dimension."""

    def __init__(self, keys: Any = "image", working_size: int = 256, extent_key: str = "extent",
                 pad_value: float = 0.0) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"UniMiSSWorkingSized: exactly one image key, got {self.keys}")
        if not isinstance(working_size, numbers.Integral) or working_size < 1:
            raise ValueError(f"UniMiSSWorkingSized: working_size={working_size!r} must be a positive int")
        self.working_size, self.extent_key = int(working_size), extent_key
        self.resize = Resized(self.keys, spatial_size=self.working_size, size_mode="longest", mode="area")
        self.pad = SpatialPadd(self.keys, spatial_size=self.working_size, method="end", mode="constant",
                               value=float(pad_value))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        key = self.keys[0]
        d = dict(data)
        dims = int(d[key].ndim) - 1
        if dims == 3:
            d[self.extent_key] = torch.tensor(d[key].shape[1:], dtype=torch.int64)
            return d
        if dims != 2:
            raise ValueError(f"UniMiSSWorkingSized: {key!r} of shape {tuple(d[key].shape)} is neither (C, H, W) nor "
                             "(C, X, Y, Z)")
        d = self.resize(d)
        d[self.extent_key] = torch.tensor(d[key].shape[1:], dtype=torch.int64)
        return self.pad(d)


class UniMiSSViewsCollate:
    """A DataLoader ``collate_fn`` for a UniMiSS batch of one dimension: MONAI's ``list_data_collate`` for every key
    but ``image_key``, which is stacked when its items share a shape (2D working-size images) and kept as a list
    otherwise (3D volumes of different shapes). With ``augment`` (a :class:`BatchedUniMiSSViews`) it then makes the
    views (``out_key``) from ``seed_key`` and ``extent_key`` and drops the images and extents (CPU training: the views
    are made in the DataLoader workers); without, the batch goes to
    :class:`medssl.engines.UniMiSSAugmentOnDevice`. Picklable."""

    def __init__(self, augment: BatchedUniMiSSViews | None = None, image_key: str = "image", seed_key: str = "seed",
                 extent_key: str = "extent", out_key: str = "crops") -> None:
        self.augment = augment
        self.image_key, self.seed_key, self.extent_key, self.out_key = image_key, seed_key, extent_key, out_key

    def __call__(self, items: Sequence[dict]) -> dict:
        images = [it[self.image_key] for it in items]
        ranks = {int(t.ndim) for t in images}
        if len(ranks) != 1:
            raise ValueError(f"UniMiSSViewsCollate: a batch mixes 2D and 3D items (shapes "
                             f"{[tuple(t.shape) for t in images]}); use DimensionAlternatingBatchSampler")
        batch = list_data_collate([{k: v for k, v in it.items() if k != self.image_key} for it in items])
        if len({tuple(t.shape) for t in images}) == 1:
            batch[self.image_key] = torch.stack([t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor)
                                                 else torch.as_tensor(t) for t in images])
        elif ranks == {4}:
            batch[self.image_key] = [torch.as_tensor(t).as_subclass(torch.Tensor) for t in images]
        else:
            raise ValueError(f"UniMiSSViewsCollate: 2D items of different shapes {[tuple(t.shape) for t in images]}: "
                             "resize them to one working size (UniMiSSWorkingSized)")
        return make_views(batch, self.augment, self.image_key, self.seed_key, self.extent_key, self.out_key) \
            if self.augment is not None else batch


def make_views(batch: dict, augment: BatchedUniMiSSViews, image_key: str = "image", seed_key: str = "seed",
               extent_key: str = "extent", out_key: str = "crops") -> dict:
    """``batch`` with ``augment``'s views in ``out_key``, the images and extents dropped. 2D extents are passed on
    (the image inside a padded working array); 3D volumes need none."""
    if seed_key not in batch:
        raise KeyError(f"UniMiSS batched views: the batch has no {seed_key!r} (add medssl.transforms.batched."
                       "SampleSeedd to the pipeline)")
    images = batch.pop(image_key)
    extents = batch.pop(extent_key, None)
    is_2d = isinstance(images, torch.Tensor) and images.ndim == 4
    batch[out_key] = augment(images, batch[seed_key], extents if is_2d else None)
    return batch

