"""Batched multi-crop augmentation: random resized crops, flips, gamma / linear intensity, blur and noise applied to a
whole batch tensor on its device (issue #12, "feed the GPU").

The per-item path (:class:`medssl.transforms.views.MultiCropd` + its ``augment``) runs in the DataLoader workers, one
crop and one small tensor op at a time. :class:`BatchedMultiCrop` does the same work on a collated batch of
working-size images ``(B, C, *spatial)`` (2D ``(H, W)`` or 3D ``(X, Y, Z)``, depth last), with one ``grid_sample``
per crop index for the whole batch and per-sample parameters as tensors, so it runs where the batch is (CPU for CPU
training and tests, the GPU otherwise).

Randomness: every per-sample parameter is drawn from that item's seed alone -- derived from its
:class:`medssl.data.samplers.SampleKey` seed (a pure function of the run seed, epoch and dataset index), put in the
sample by :class:`SampleSeedd` after the deterministic front, or by ``make_dataset(..., seed_key="seed")``. Item i
therefore gets the same crops and augmentations whether it is alone or in a batch, at any position, with any number
of ranks / workers, and after a resume -- bit for bit without energy bands, up to float rounding with them (their
decomposition transforms the batch at once). Each item draws a fixed number of values per crop from
``numpy.random.RandomState(seed)`` (whatever the probabilities, so changing one probability does not shift the other
draws); Gaussian noise is drawn on the batch's device from a ``torch.Generator`` seeded per item and crop (same
values on one device type; CPU and CUDA generators differ).

Distributions (the same as the per-item transforms' with the same arguments, checked by tests/test_batched_augment.py
on statistics over many draws; the values differ, the streams being different):

* crop region: covered fraction s ~ U(``scales``) of the image area / volume; with ``ratio=None`` the region has the
  crop's proportions (as :class:`MultiCropd`; a side longer than the image is clipped to it), with ``ratio=(lo, hi)``
  (2D) its width / height is log-uniform in that range (torchvision's ``RandomResizedCrop``); start uniform in
  ``[0, n - r]``. Unlike :class:`MultiCropd` the region is not rounded to whole voxels (sub-voxel positions are what
  ``grid_sample`` is for), and resampling is bilinear / trilinear (``align_corners=False``, border clamp) also when
  the region is larger than the crop, where :class:`MultiCropd` uses box averaging ("area"): a downsampled crop keeps
  more aliasing. Voxel map: source index = start + (i + 0.5) · r / c − 0.5, :class:`MultiCropd`'s; the outermost
  output voxels of an upsampled crop read the image just outside the region, where :class:`MultiCropd` (which
  resizes the cut-out region) repeats the region's edge.
* flip (``flip_prob`` per axis in ``flip_axes``): mirror the crop along that spatial axis (MONAI ``RandFlipd``).
* gamma (:class:`medssl.transforms.intensity.RandGammad`): with ``gamma_prob``, γ ~ U(``gamma_range``), used as 1/γ
  with ``gamma_reciprocal_prob``; ``((I − min) / (max − min + 1e-7)) ** g · (max − min) + min`` per crop (MONAI's
  ``AdjustContrast`` formula).
* linear (:class:`~medssl.transforms.intensity.RandLinearIntensityd`): with ``linear_prob``, ``a · I + u ·
  b_fraction · (max − min)``, a ~ U(``a_range``), u ~ U(−1, 1).
* blur (MONAI ``RandGaussianSmoothd`` as in :func:`~medssl.transforms.views.view_nuisance_augmentations`): with
  ``blur_prob``, σ ~ U(``blur_sigma``) per axis, in voxels; erf-sampled kernels truncated at 4σ, zero padding.
  Samples of a batch without blur pass through unchanged (weight 1 at the centre tap).
* noise (MONAI ``RandGaussianNoised(sample_std=True)``): with ``noise_prob``, std ~ U(0, ``noise_std``), N(0, std²)
  per voxel.

* energy bands (optional, ``energy=`` an :class:`medssl.transforms.energy.EnergyBandAugmentd`):
  :func:`energy_band_augment` -- the transform's decomposition of the whole batch at once (on CPU with the border
  'reflect' in the DCT domain, :class:`~medssl.transforms.energy_decomposition.ReflectBandSpectra`; otherwise each
  sample a channel of one :func:`~medssl.transforms.energy.energy_bands` call), its band energies per sample, and
  per sample its own draw (``prob``, the truncated-normal z per band, the modality's reference) from a seed drawn
  from the item's stream, so the parameters follow the transform's configuration exactly. σ is in voxels (the batch
  is plain tensors; the per-item transform's ``sigma_unit="relative"`` is the same for 2D crops and isotropic
  volumes).

Order per crop: crop + flip, energy bands, gamma, linear (Ghesu et al.'s set A order), blur, noise.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import list_data_collate
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import Randomizable, Transform

from .energy import EnergyBandAugmentd, energy_bands
from .energy_decomposition import ReflectBandSpectra
from .views import MULTICROP_SCALE_RANGE, expand_crop_size

__all__ = ["ViewParams", "BatchedMultiCrop", "resized_crops", "adjust_gamma", "linear_intensity", "gaussian_blur",
           "gaussian_noise", "energy_band_augment", "BatchedViewsCollate", "SampleSeedd"]


@dataclass
class ViewParams:
    """Per-sample parameters of one crop index, for a batch of B items (numpy arrays, axis 0 = item).

    ``start``/``region`` (B, D) in source voxels (floats); ``flip`` (B, D) bool; ``gamma`` (B,) the exponent (1.0 =
    not applied); ``scale`` / ``offset_fraction`` (B,) of the linear transform (1.0 / 0.0 = not applied);
    ``blur_sigma`` (B, D) in voxels (0 = no blur); ``noise_std`` (B,) (0 = no noise); ``noise_seed`` and
    ``energy_seed`` (B,) ints (the seeds of the noise and of the energy-band transform's draw).
    """

    size: tuple[int, ...]
    start: np.ndarray
    region: np.ndarray
    flip: np.ndarray
    gamma: np.ndarray
    scale: np.ndarray
    offset_fraction: np.ndarray
    blur_sigma: np.ndarray
    noise_std: np.ndarray
    noise_seed: np.ndarray
    energy_seed: np.ndarray

    @staticmethod
    def stack(items: Sequence[ViewParams]) -> ViewParams:
        fields = ("start", "region", "flip", "gamma", "scale", "offset_fraction", "blur_sigma", "noise_std",
                  "noise_seed", "energy_seed")
        return ViewParams(items[0].size, **{f: np.concatenate([getattr(it, f) for it in items]) for f in fields})


# ------------------------------------------------------------------------------------------------ functional ops
def _per_sample(values: Any, like: torch.Tensor) -> torch.Tensor:
    """(B,) values as a float tensor on ``like``'s device, shaped to broadcast over (B, C, *spatial)."""
    t = torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=like.dtype, device=like.device)
    return t.reshape((-1,) + (1,) * (like.ndim - 1))


def resized_crops(
    images: torch.Tensor, start: Any, region: Any, size: Sequence[int], flip: Any = None, mode: str = "bilinear"
) -> torch.Tensor:
    """Crops ``(B, C, *size)`` of ``images`` ``(B, C, *spatial)``: item b covers ``region[b]`` voxels from
    ``start[b]`` (floats, (B, D)), mirrored along the axes where ``flip[b]`` is True, resampled by one
    ``grid_sample`` (``align_corners=False``, border clamp) for the whole batch.

    Output voxel i samples source index ``start + (i + 0.5) · region / size − 0.5`` along each axis. The sampling grid
    is what ``affine_grid`` would give for this axis-aligned map, but computed per axis in float64 and broadcast (no
    batched matrix product), so each item's crop is bit-identical whatever the batch it is in.
    """
    spatial = images.shape[2:]
    dims = len(spatial)
    size = tuple(int(c) for c in size)
    if dims not in (2, 3) or len(size) != dims:
        raise ValueError(f"resized_crops: images {tuple(images.shape)} and size {size} must be 2D or 3D alike")
    batch = images.shape[0]
    start_a = np.asarray(start, dtype=np.float64).reshape(batch, dims)
    region_a = np.asarray(region, dtype=np.float64).reshape(batch, dims)
    n = np.asarray(spatial, dtype=np.float64)
    scale = region_a / n
    shift = (2.0 * start_a + region_a) / n - 1.0
    if flip is not None:
        scale = np.where(np.asarray(flip, dtype=bool).reshape(batch, dims), -scale, scale)
    work = images if images.is_floating_point() else images.float()
    axes = []
    for axis, c in enumerate(size):
        u = (2.0 * np.arange(c, dtype=np.float64) + 1.0) / c - 1.0  # output voxel centres, normalised
        values = torch.as_tensor(scale[:, axis, None] * u[None, :] + shift[:, axis, None])  # (B, c) in [-1, 1] coords
        shape = [batch] + [1] * dims
        shape[1 + axis] = c
        axes.append(values.to(device=work.device, dtype=work.dtype).reshape(shape).expand(batch, *size))
    grid = torch.stack(axes[::-1], dim=-1)  # grid_sample's last dim is (x, y[, z]) = last spatial axis first
    return F.grid_sample(work, grid, mode=mode, padding_mode="border", align_corners=False)


def _minmax(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = images.reshape(images.shape[0], -1)
    shape = (-1,) + (1,) * (images.ndim - 1)
    return flat.amin(dim=1).reshape(shape), flat.amax(dim=1).reshape(shape)


def adjust_gamma(images: torch.Tensor, gamma: Any) -> torch.Tensor:
    """``((I − min) / (range + 1e-7)) ** gamma[b] · range + min`` per sample (min / range over the sample); a sample
    with ``gamma[b] == 1`` is returned exactly as it is (the formula would round it)."""
    gamma = np.asarray(gamma, dtype=np.float64).reshape(-1)
    applied = np.flatnonzero(gamma != 1.0)  # the others stay exactly as they are (the formula would round them)
    if len(applied) == 0:
        return images
    part = images if len(applied) == len(gamma) else images[torch.as_tensor(applied, device=images.device)]
    low, high = _minmax(part)
    value_range = high - low
    result = ((part - low) / (value_range + 1e-7)) ** _per_sample(gamma[applied], part) * value_range + low
    if len(applied) == len(gamma):
        return result
    out = images.clone()
    out[torch.as_tensor(applied, device=images.device)] = result
    return out


def linear_intensity(images: torch.Tensor, scale: Any, offset_fraction: Any) -> torch.Tensor:
    """``scale[b] · I + offset_fraction[b] · (max − min)`` per sample (exactly unchanged where (1, 0))."""
    low, high = _minmax(images)
    out = images * _per_sample(scale, images) + (high - low) * _per_sample(offset_fraction, images)
    applied = (np.asarray(scale) != 1.0) | (np.asarray(offset_fraction) != 0.0)
    return torch.where(_per_sample(applied, images) > 0, out, images)  # (1, 0): exactly unchanged


def gaussian_blur(images: torch.Tensor, sigma: Any, truncated: float = 4.0, max_sigma: float | None = None
                  ) -> torch.Tensor:
    """Separable Gaussian blur with per-sample, per-axis ``sigma`` (B, D) in voxels (0 = that axis untouched):
    MONAI ``GaussianFilter``'s erf kernels (truncated at ``truncated`` σ, zero padding).

    Each axis is a weighted sum of shifted copies of the zero-padded batch, with per-sample weights (element-wise
    ops only: an item's result does not depend on the other items of the batch). The kernels are zero-extended to
    the radius of ``max_sigma`` (default: the batch's largest σ; :class:`BatchedMultiCrop` passes its configured
    upper bound so that the radius does not depend on the batch either).
    """
    batch = images.shape[0]
    dims = images.ndim - 2
    sig = np.asarray(sigma, dtype=np.float64).reshape(batch, dims)
    bound = float(sig.max()) if max_sigma is None else max(float(max_sigma), float(sig.max()))
    radius = int(max(bound * truncated, 0.5) + 0.5)  # gaussian_1d's tail for the largest sigma
    out = images
    for axis in range(dims):
        if not np.any(sig[:, axis] > 0):
            continue
        weight = torch.zeros(batch, 2 * radius + 1, dtype=torch.float64)
        for b, s in enumerate(sig[:, axis]):
            if s > 0:
                k = gaussian_1d(torch.tensor(float(s), dtype=torch.float64), truncated=truncated, approx="erf")
                r = (len(k) - 1) // 2
                weight[b, radius - r: radius + r + 1] = k
            else:
                weight[b, radius] = 1.0
        weight = weight.to(device=images.device, dtype=images.dtype)
        dim = 2 + axis
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = radius
        padded = F.pad(out, pad)
        length = out.shape[dim]
        shape = (batch,) + (1,) * (images.ndim - 1)
        acc = torch.zeros_like(out)
        for t in range(2 * radius + 1):
            acc = acc + padded.narrow(dim, t, length) * weight[:, t].reshape(shape)
        out = acc
    return out


def energy_band_augment(
    images: torch.Tensor, transform: EnergyBandAugmentd, seeds: Any, modalities: Sequence[Any] | None = None,
    spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """:class:`EnergyBandAugmentd` on every sample of ``images`` ``(B, C, *spatial)``: the decomposition of the whole
    batch at once (samples x channels as rows), band energies per sample (over its channels and voxels, as the
    transform measures a whole image), and per sample the transform's draw after ``set_random_state(seeds[b])``
    (whether to apply, z per band; ``modalities[b]`` picks the reference), recombined with its factors; a sample the
    draw does not transform (``prob``) is returned as it is. The transform's random state is left at the last
    sample's draw.

    CPU tensors with the transform's border 'reflect' (its default): :class:`ReflectBandSpectra` -- one DCT of every
    crop, the energies from its coefficients, one inverse DCT of the recombination -- instead of
    ``len(sigmas) + 1`` transforms and the bands in memory (one thread, 32 crops: 114 -> 25 ms at 224², 20 -> 6 ms at
    92²). Otherwise (CUDA; other
    borders): one :func:`energy_bands` call for the batch, energies and recombination of the bands. Either way the
    bands, σ, truncation and border are the transform's, computed in float32 with float64 energies; the result
    equals the transform's definition evaluated in float64 within 2e-6 of the sample's largest |value| (+ 1e-5
    relative; measured: at most 6e-7), and the per-item transform within 2e-6 + 1e-5 relative for images in
    [-0.5, 1.5] where its float32 energies are exact to float32 (always without a reference: the factors 1 + 0.2 z
    do not depend on them). With a reference the factors are e_ref / e, and the per-item transform's energy of a
    band far below the image's values loses digits (a σ=16 residual of energy 1.6e-5: 5e-4 relative) where the
    transform-domain path's keeps 1e-6 (tests/test_batched_augment.py)."""
    seeds = np.asarray(seeds).reshape(-1)
    if images.device.type == "cpu" and transform.mode == "reflect":
        return _energy_band_augment_spectral(images, transform, seeds, modalities, spacing)
    batch, channels = images.shape[:2]
    spatial = tuple(images.shape[2:])
    bands = energy_bands(images.reshape((batch * channels,) + spatial), sigmas=transform.sigmas, spacing=spacing,
                         mode=transform.mode, truncate=transform.truncate)
    flat = bands.reshape(bands.shape[0], batch, -1)
    if flat.device.type == "cpu":  # numpy's float64-accumulated std reads float32 without a float64 copy: 4x faster
        energies = flat.detach().numpy().std(axis=2, dtype=np.float64)  # (n_bands, B)
    else:
        energies = flat.to(torch.float64).std(dim=2, correction=0).cpu().numpy()
    magnitude = flat[0].abs().amax(dim=1).to(torch.float64).cpu().numpy()  # the residual's largest |value|
    weights = np.ones((bands.shape[0], batch), dtype=np.float64)
    applied = np.zeros(batch, dtype=bool)
    for b, seed in enumerate(seeds):
        _reseed(transform, seed, first=b == 0)
        transform.randomize(None)
        if transform._do_transform:
            applied[b] = True
            modality = None if modalities is None else modalities[b]
            weights[:, b] = transform.scale_factors(energies[:, b], modality, float(magnitude[b]))
    w = torch.as_tensor(weights, dtype=bands.dtype, device=bands.device).reshape(bands.shape[0], batch, 1)
    out = (flat * w).sum(dim=0).reshape(images.shape).to(images.dtype)
    keep = torch.as_tensor(~applied, device=images.device).reshape((-1,) + (1,) * (images.ndim - 1))
    return torch.where(keep, images, out)  # not drawn: exactly the input, as the per-item transform


def _reseed(transform: EnergyBandAugmentd, seed: Any, first: bool) -> None:
    """``transform.set_random_state(seed=seed)`` (uint32): a new ``RandomState`` for the first sample of a batch
    (MONAI's class-level default is shared by all instances), then ``R.seed(seed)`` on it -- the same stream as a new
    ``RandomState(seed)``, 70x cheaper (0.002 against 0.13 ms, per sample and crop)."""
    if first:
        transform.set_random_state(seed=int(seed) & 0xFFFFFFFF)
    else:
        transform.R.seed(int(seed) & 0xFFFFFFFF)


def _energy_band_augment_spectral(images: torch.Tensor, transform: EnergyBandAugmentd, seeds: np.ndarray,
                                  modalities: Sequence[Any] | None, spacing: Sequence[float] | None) -> torch.Tensor:
    """:func:`energy_band_augment` on a CPU batch with border 'reflect', through :class:`ReflectBandSpectra`.

    ours: the transform's arithmetic rearranged, not changed. The largest |value| of the low-pass residual (which
    only sets the transform's noise floor for near-zero bands) is bracketed without computing the residual: at
    least |the sample's mean| (the residual keeps the mean) and at most the sample's largest |value| (a normalised
    positive kernel); when both give the same factors, those are the transform's factors, otherwise the residual is
    computed for that sample (a band within a factor ~1e6 of those bounds: a near-constant crop)."""
    batch, channels = images.shape[:2]
    x = images.detach().as_subclass(torch.Tensor).reshape((batch * channels,) + tuple(images.shape[2:]))
    x = x.to(torch.float32).numpy()  # float32, energy_bands' default precision; no copy for a float32 batch
    spectra = ReflectBandSpectra(x, transform.sigmas, spacing, transform.truncate)
    energies = spectra.energies(batch)  # (n_bands, B) float64
    mean_bound = np.abs(spectra.row_means().reshape(batch, channels).mean(axis=1))
    peak_bound = np.abs(x.reshape(batch, -1)).max(axis=1).astype(np.float64)
    weights = np.ones((spectra.n_bands, batch * channels), dtype=np.float64)
    applied = np.zeros(batch, dtype=bool)
    for b, seed in enumerate(seeds):
        _reseed(transform, seed, first=b == 0)
        transform.randomize(None)
        if not transform._do_transform:
            continue
        applied[b] = True
        modality = None if modalities is None else modalities[b]
        factors = transform.scale_factors(energies[:, b], modality, float(peak_bound[b]))
        if not np.array_equal(factors, transform.scale_factors(energies[:, b], modality, float(mean_bound[b]))):
            residual = spectra.residual(slice(b * channels, (b + 1) * channels))
            factors = transform.scale_factors(energies[:, b], modality, float(np.abs(residual).max()))
        weights[:, b * channels:(b + 1) * channels] = factors[:, None]
    if not applied.any():
        return images
    out = torch.from_numpy(spectra.recombine(weights)).reshape(images.shape).to(images.dtype)
    keep = torch.as_tensor(~applied).reshape((-1,) + (1,) * (images.ndim - 1))
    return torch.where(keep, images, out)  # not drawn: exactly the input, as the per-item transform


def gaussian_noise(images: torch.Tensor, std: Any, seeds: Any) -> torch.Tensor:
    """``I + N(0, std[b]²)`` per voxel, sample b's noise drawn on the images' device from ``seeds[b]`` (skipped where
    ``std[b]`` is 0)."""
    std = np.asarray(std, dtype=np.float64).reshape(-1)
    seeds = np.asarray(seeds).reshape(-1)
    if not np.any(std > 0):
        return images
    noise = torch.zeros_like(images)
    for b in np.flatnonzero(std > 0):
        generator = torch.Generator(device=images.device).manual_seed(int(seeds[b]))
        noise[b] = torch.randn(images.shape[1:], generator=generator, device=images.device, dtype=images.dtype)
    return images + noise * _per_sample(std, images)


# ------------------------------------------------------------------------------------------------ the transform
def _check_pair(name: str, value: Any, low_bound: float | None = None, owner: str = "BatchedMultiCrop"
                ) -> tuple[float, float]:
    if not (isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, numbers.Real) for v in value)):
        raise ValueError(f"{owner}: {name} must be a (low, high) pair, got {value!r}")
    low, high = float(value[0]), float(value[1])
    if low > high or (low_bound is not None and low <= low_bound):
        bound = f"{low_bound} < low <= high" if low_bound is not None else "low <= high"
        raise ValueError(f"{owner}: {name}={value!r} must satisfy {bound}")
    return low, high


def _check_prob(name: str, value: float, owner: str = "BatchedMultiCrop") -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}: {name} must be in [0, 1], got {value!r}")
    return value


class BatchedMultiCrop:
    """Multi-crop views of a batch: ``crops = BatchedMultiCrop(...)(images, seeds)`` is a list of ``(B, C, *size)``
    tensors, one per crop (groups in order, large crops first) -- the collated form of :class:`MultiCropd`'s
    ``"crops"``. See the module docstring for the distributions and the randomness contract.

    Args:
        crops: groups ``[(count, size), ...]``; size as in :class:`MultiCropd` (int, per-axis, 3D (in-plane, depth)).
        scales: (low, high) of the covered fraction s, one pair for all groups or one per group (None = plain
            crops of the crop's size in voxels, no resizing; outside a smaller image the border values are repeated,
            where :class:`MultiCropd` pads with the image minimum).
        ratio: None (the region has the crop's proportions) or a (low, high) range of width / height (2D only).
        flip_prob, flip_axes: probability of mirroring each of these spatial axes (0 = X / H).
        gamma_prob, gamma_range, gamma_reciprocal_prob: :class:`RandGammad`'s arguments (Ghesu et al. 2022 defaults).
        linear_prob, a_range, b_fraction: :class:`RandLinearIntensityd`'s arguments (Ghesu et al. 2022 defaults).
        blur_prob, blur_sigma: Gaussian blur probability and σ range (voxels, drawn per axis).
        noise_prob, noise_std: Gaussian noise probability and the upper bound of its std.
        mode: ``grid_sample`` interpolation ("bilinear" = trilinear in 3D, or "nearest").
        energy: an :class:`EnergyBandAugmentd` applied to every crop after the crop (set A's first step; None: none);
            ``__call__`` then takes the items' ``modalities`` for its references.
    """

    def __init__(
        self,
        crops: Sequence[tuple[int, Any]] = ((2, 224), (6, 92)),
        scales: Any = MULTICROP_SCALE_RANGE,
        ratio: Sequence[float] | None = None,
        flip_prob: float = 0.0,
        flip_axes: Sequence[int] = (0,),
        gamma_prob: float = 0.5,
        gamma_range: Sequence[float] = (1.8, 2.6),
        gamma_reciprocal_prob: float = 0.5,
        linear_prob: float = 0.5,
        a_range: Sequence[float] = (0.9, 1.1),
        b_fraction: float = 0.2,
        blur_prob: float = 0.0,
        blur_sigma: Sequence[float] = (0.25, 1.5),
        noise_prob: float = 0.0,
        noise_std: float = 0.08,
        mode: str = "bilinear",
        energy: EnergyBandAugmentd | None = None,
    ) -> None:
        groups = [(int(count), size) for count, size in crops]
        if not any(count > 0 for count, _ in groups) or any(count < 0 for count, _ in groups):
            raise ValueError(f"BatchedMultiCrop: crops must be a list of (count >= 0, size) with a crop, got {crops!r}")
        if scales is None or (isinstance(scales, Sequence) and len(scales) == 2 and all(
                isinstance(v, numbers.Real) for v in scales)):
            per_group = [scales] * len(groups)
        else:
            per_group = list(scales)
            if len(per_group) != len(groups):
                raise ValueError(f"BatchedMultiCrop: scales needs one entry per crop group, got {scales!r}")
        # a group of 0 crops (e.g. SwAV's 2-crop setting, n_small_crops 0) is dropped with its scale range
        self.groups = [group for group in groups if group[0] > 0]
        per_group = [scale for group, scale in zip(groups, per_group) if group[0] > 0]
        self.scales = [None if s is None else _check_pair("scales", s, 0.0) for s in per_group]
        for s in self.scales:
            if s is not None and s[1] > 1.0:
                raise ValueError(f"BatchedMultiCrop: scales must be within (0, 1], got {s}")
        self.ratio = None if ratio is None else _check_pair("ratio", ratio, 0.0)
        self.flip_prob = _check_prob("flip_prob", flip_prob)
        self.flip_axes = tuple(int(a) for a in flip_axes)
        self.gamma_prob = _check_prob("gamma_prob", gamma_prob)
        self.gamma_range = _check_pair("gamma_range", gamma_range, 0.0)
        self.gamma_reciprocal_prob = _check_prob("gamma_reciprocal_prob", gamma_reciprocal_prob)
        self.linear_prob = _check_prob("linear_prob", linear_prob)
        self.a_range = _check_pair("a_range", a_range, 0.0)
        self.b_fraction = float(b_fraction)
        self.blur_prob = _check_prob("blur_prob", blur_prob)
        self.blur_sigma = _check_pair("blur_sigma", blur_sigma, 0.0)
        self.noise_prob = _check_prob("noise_prob", noise_prob)
        self.noise_std = float(noise_std)
        self.mode = mode
        self.energy = energy

    @property
    def n_crops(self) -> int:
        return sum(count for count, _ in self.groups)

    def crop_sizes(self, spatial_dims: int) -> list[tuple[int, ...]]:
        """The size of every crop, in output order, for images with ``spatial_dims`` axes."""
        return [expand_crop_size(size, spatial_dims) for count, size in self.groups for _ in range(count)]

    # -------------------------------------------------------------------------------------------- parameters
    def _draw_one(self, rng: np.random.RandomState, shape: Sequence[int], size: Sequence[int],
                  scale: tuple[float, float] | None) -> dict[str, Any]:
        """One crop's parameters for one item: always the same number of draws, in this order."""
        dims = len(shape)
        n = np.asarray(shape, dtype=np.float64)
        c = np.asarray(size, dtype=np.float64)
        u_scale, u_ratio = rng.uniform(), rng.uniform()
        u_start = rng.uniform(size=3)[:dims]
        u_flip = rng.uniform(size=3)[:dims]
        g_do, g_val, g_rec = rng.uniform(size=3)
        l_do, l_a, l_u = rng.uniform(size=3)
        b_do = rng.uniform()
        b_sig = rng.uniform(size=3)[:dims]
        n_do, n_std = rng.uniform(size=2)
        noise_seed = int(rng.randint(0, 2**31 - 1))
        energy_seed = int(rng.randint(0, 2**31 - 1))
        if scale is None:
            region = c.copy()
        else:
            fraction = scale[0] + (scale[1] - scale[0]) * u_scale
            if self.ratio is not None and dims == 2:
                log_lo, log_hi = np.log(self.ratio[0]), np.log(self.ratio[1])
                aspect = np.exp(log_lo + (log_hi - log_lo) * u_ratio)  # width / height = axis 1 / axis 0
                area = fraction * n[0] * n[1]
                region = np.array([np.sqrt(area / aspect), np.sqrt(area * aspect)])
            else:
                zoom = (fraction * np.prod(n) / np.prod(c)) ** (1.0 / dims)
                region = zoom * c
            region = np.clip(region, 1.0, n)
        start = np.maximum(n - region, 0.0) * u_start if scale is not None else (
            np.minimum(n - region, 0.0) + np.abs(n - region) * u_start)
        flip = np.zeros(dims, dtype=bool)
        for axis in self.flip_axes:
            if axis < dims:
                flip[axis] = u_flip[axis] < self.flip_prob
        gamma_value = self.gamma_range[0] + (self.gamma_range[1] - self.gamma_range[0]) * g_val
        gamma = (1.0 / gamma_value if g_rec < self.gamma_reciprocal_prob else gamma_value) if g_do < self.gamma_prob \
            else 1.0
        linear = l_do < self.linear_prob
        a = self.a_range[0] + (self.a_range[1] - self.a_range[0]) * l_a if linear else 1.0
        offset = (2.0 * l_u - 1.0) * self.b_fraction if linear else 0.0
        sigma = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * b_sig if b_do < self.blur_prob \
            else np.zeros(dims)
        std = self.noise_std * n_std if n_do < self.noise_prob else 0.0
        return {"start": start, "region": region, "flip": flip, "gamma": gamma, "scale": a, "offset_fraction": offset,
                "blur_sigma": sigma, "noise_std": std, "noise_seed": noise_seed, "energy_seed": energy_seed}

    def draw(self, seeds: Sequence[int], spatial_shape: Sequence[int]) -> list[ViewParams]:
        """The parameters of every crop (one :class:`ViewParams` per crop, in output order) for items with these
        ``seeds`` (uint32, e.g. their ``SampleKey`` seeds) and images of ``spatial_shape``."""
        shape = tuple(int(v) for v in spatial_shape)
        if self.ratio is not None and len(shape) != 2:
            raise ValueError(f"BatchedMultiCrop: ratio applies to 2D images only; got images of shape {shape}")
        sizes = self.crop_sizes(len(shape))
        scales = [s for (count, _), s in zip(self.groups, self.scales) for _ in range(count)]
        per_item = []
        for seed in np.asarray(seeds).reshape(-1):
            rng = np.random.RandomState(int(seed) & 0xFFFFFFFF)
            per_item.append([self._draw_one(rng, shape, size, scale) for size, scale in zip(sizes, scales)])
        views = []
        for k, size in enumerate(sizes):
            fields = {f: np.stack([np.asarray(item[k][f]) for item in per_item]) for f in per_item[0][k]}
            views.append(ViewParams(size=size, **fields))
        return views

    # -------------------------------------------------------------------------------------------- application
    def apply(self, images: torch.Tensor, params: ViewParams, modalities: Sequence[Any] | None = None
              ) -> torch.Tensor:
        """One crop index for the whole batch: crop + flip, energy bands, gamma, linear, blur, noise (each skipped
        when no item of the batch uses it)."""
        out = resized_crops(images, params.start, params.region, params.size, params.flip, mode=self.mode)
        if self.energy is not None:
            out = energy_band_augment(out, self.energy, params.energy_seed, modalities)
        if np.any(params.gamma != 1.0):
            out = adjust_gamma(out, params.gamma)
        if np.any(params.scale != 1.0) or np.any(params.offset_fraction != 0.0):
            out = linear_intensity(out, params.scale, params.offset_fraction)
        if np.any(params.blur_sigma > 0):
            out = gaussian_blur(out, params.blur_sigma, max_sigma=self.blur_sigma[1])
        if np.any(params.noise_std > 0):
            out = gaussian_noise(out, params.noise_std, params.noise_seed)
        return out

    def __call__(self, images: torch.Tensor, seeds: Any, modalities: Sequence[Any] | None = None
                 ) -> list[torch.Tensor]:
        """``(B, C, *spatial)`` images and their B seeds (a sequence, numpy array or tensor) -> the list of crops;
        ``modalities`` (B codes) for the energy-band references."""
        if isinstance(seeds, torch.Tensor):
            seeds = seeds.detach().cpu().numpy()
        seeds = np.asarray(seeds).reshape(-1)
        if images.ndim not in (4, 5) or len(seeds) != images.shape[0]:
            raise ValueError(
                f"BatchedMultiCrop: expected images (B, C, *spatial) with 2 or 3 spatial axes and B seeds; got images "
                f"{tuple(images.shape)} and {len(seeds)} seeds"
            )
        data = images.as_subclass(torch.Tensor) if type(images) is not torch.Tensor else images
        if not data.is_floating_point():
            data = data.float()
        return [self.apply(data, params, modalities) for params in self.draw(seeds, data.shape[2:])]


class BatchedViewsCollate:
    """A DataLoader ``collate_fn`` for CPU training: MONAI's ``list_data_collate``, then ``augment`` (a
    :class:`BatchedMultiCrop`) on the collated ``image_key`` with the items' ``seed_key`` and ``modality_key``; the
    crops go to ``out_key`` and the working-size images are dropped (``keep_source=False``). The batch's views are
    then made in the DataLoader workers, one batch per worker at a time; on a GPU apply ``augment`` to the batch on
    the device instead. Picklable (worker processes)."""

    def __init__(self, augment: BatchedMultiCrop, image_key: str = "image", seed_key: str = "seed",
                 modality_key: str = "modality", out_key: str = "crops", keep_source: bool = False) -> None:
        self.augment = augment
        self.image_key, self.seed_key, self.modality_key, self.out_key = image_key, seed_key, modality_key, out_key
        self.keep_source = bool(keep_source)

    def __call__(self, items: Sequence[dict]) -> dict:
        batch = list_data_collate(items)
        images = batch[self.image_key]
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"BatchedViewsCollate: '{self.image_key}' did not collate into a tensor: items of one "
                            "batch need one shape (loading_transforms(working_size=...))")
        batch[self.out_key] = self.augment(images, batch[self.seed_key], batch.get(self.modality_key))
        if not self.keep_source:
            batch.pop(self.image_key)
        return batch


class SampleSeedd(Randomizable, Transform):
    """Put a seed for the batched augmentations in the sample (``data[key]``, an int in [0, 2**31)), drawn from this
    transform's ``self.R``.

    Placed after the deterministic front of a pipeline wrapped in :class:`medssl.data.samplers.SeededDataset`
    (every bundle's ``make_dataset``), the seed is a pure function of the item's ``SampleKey`` seed (the dataset
    reseeds the pipeline's random transforms from it), so :class:`BatchedMultiCrop` gets per-item seeds with the
    usual contract (any batch, ranks, workers, resume) without a change to the dataset. Random itself, it also marks
    the end of what a ``CacheDataset`` / ``PersistentDataset`` caches.
    """

    def __init__(self, key: str = "seed") -> None:
        self.key = key
        self.seed = 0

    def randomize(self, data: Any = None) -> None:
        self.seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Any) -> dict:
        self.randomize()
        return {**dict(data), self.key: self.seed}
