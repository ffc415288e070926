"""Energy-band decomposition of an image (the math of :mod:`medssl.transforms.energy`, which describes the method
and re-exports these functions): the Gaussian cascade (:func:`energy_bands`), band energies and recombination.

Implementation. Every Gaussian is the one of ``scipy.ndimage.gaussian_filter1d`` (weights exp(−j²/2σ²) normalised,
truncated at ``radius = int(truncate·σ + 0.5)``, truncate = 4) with the same border modes, so the cascade equals a
``scipy.ndimage.gaussian_filter`` cascade to float precision. Two exact evaluations of the same operator:

* ``method="spectral"`` (default on CPU for the modes 'reflect', 'wrap', 'mirror'): with these borders a
  convolution by a symmetric kernel is diagonal in a fixed basis — the DCT-II for 'reflect' (half-sample symmetric
  extension), the DFT for 'wrap', the DCT-I for 'mirror' — with the kernel's cosine series as eigenvalues. The image
  is transformed once, multiplied by the cumulative product of the per-axis eigenvalues for each level and
  transformed back (one inverse transform per level, computed with ``scipy.fft``, single-threaded). This is several
  times faster than the direct cascade on a 512×512 image because the cost no longer grows with σ.
* ``method="direct"`` (default for CUDA tensors and for the modes 'nearest' and 'constant'): separable 1-D
  convolutions with torch (``conv{1,2,3}d`` with a kernel extended along one axis), border extension by index
  gathering, so any radius (even larger than the image) is handled as scipy does.

Results are computed in float32 by default (``dtype=np.float64`` for double precision) and are not differentiable.

:class:`ReflectBandSpectra` (the batched augmentation's CPU path, border 'reflect') never forms the bands: with the
orthonormal DCT-II, band i of a row is ``c · H_i`` in the transform domain (H_i the band's multiplier), so its energy
follows from Parseval's identity and ``Σ_i w_i · band_i`` is one inverse transform of ``c · Σ_i w_i H_i``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.fft
import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_SIGMAS",
    "BORDER_MODES",
    "SPECTRAL_MODES",
    "SIGMA_UNITS",
    "energy_bands",
    "band_energies",
    "recombine_bands",
    "image_spacing_for_sigmas",
    "ReflectBandSpectra",
]

DEFAULT_SIGMAS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
BORDER_MODES = ("reflect", "wrap", "mirror", "nearest", "constant")
SPECTRAL_MODES = ("reflect", "wrap", "mirror")
SIGMA_UNITS = ("voxel", "relative", "mm")

ArrayLike = np.ndarray | torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# Gaussian kernels and their spectra
# ----------------------------------------------------------------------------------------------------------------


def _gaussian_weights(sigma: float, truncate: float) -> np.ndarray:
    """Weights of scipy.ndimage.gaussian_filter1d (order 0): length 2r+1, r = int(truncate·σ + 0.5), sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    if sigma <= 0 or radius == 0:
        return np.ones(1, dtype=np.float64)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


@functools.lru_cache(maxsize=512)
def _kernel_eigenvalues(sigma: float, truncate: float, n: int, mode: str, n_freq: int) -> np.ndarray:
    """Eigenvalues of the border-extended convolution by the Gaussian kernel h, one per transform coefficient.

    'reflect' (period P = 2n, DCT-II): λ_k = Σ_j h_j cos(π k j / n); 'mirror' (P = 2n − 2, DCT-I):
    λ_k = Σ_j h_j cos(π k j / (n − 1)); 'wrap' (P = n, DFT): λ_k = Σ_j h_j cos(2π k j / n). Computed as the real
    DFT of h wrapped onto one period (O(P log P)); cached per (σ, truncate, n, mode, n_freq), read-only.
    """
    weights = _gaussian_weights(sigma, truncate)
    radius = (len(weights) - 1) // 2
    period = {"reflect": 2 * n, "mirror": 2 * n - 2, "wrap": n}[mode]
    wrapped = np.zeros(period, dtype=np.float64)
    np.add.at(wrapped, np.mod(np.arange(-radius, radius + 1), period), weights)
    eigenvalues = np.fft.fft(wrapped).real[:n_freq].copy()
    eigenvalues.setflags(write=False)
    return eigenvalues


def _extension_index(n: int, radius: int, mode: str) -> np.ndarray:
    """Indices into an axis of length n that extend it by `radius` on both sides with scipy.ndimage's border rule."""
    idx = np.arange(-radius, n + radius)
    if mode == "reflect":  # d c b a | a b c d | d c b a  (half-sample symmetric, period 2n)
        idx = np.mod(idx, 2 * n)
        idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
    elif mode == "mirror":  # d c b | a b c d | c b a  (whole-sample symmetric, period 2n − 2)
        if n == 1:
            return np.zeros_like(idx)
        idx = np.mod(idx, 2 * n - 2)
        idx = np.where(idx >= n, 2 * n - 2 - idx, idx)
    elif mode == "wrap":
        idx = np.mod(idx, n)
    elif mode == "nearest":
        idx = np.clip(idx, 0, n - 1)
    else:
        raise ValueError(f"energy_bands: no index extension for border mode {mode!r}")
    return idx


# ----------------------------------------------------------------------------------------------------------------
# Decomposition
# ----------------------------------------------------------------------------------------------------------------


def _check_image(image: ArrayLike, name: str = "image") -> None:
    if image.ndim not in (3, 4):
        raise ValueError(
            f"energy_bands: {name} has shape {tuple(image.shape)}; expected a channel-first 2D image (C, H, W) "
            "or 3D volume (C, X, Y, Z)"
        )


def _voxel_sigmas(sigmas: Sequence[float], spacing: Sequence[float] | None, n_spatial: int) -> list[list[float]]:
    """Per level, per spatial axis σ in voxels (σ_mm / spacing when spacing is given)."""
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(not math.isfinite(s) or s <= 0 for s in sigmas):
        raise ValueError(f"energy_bands: sigmas must be a non-empty sequence of positive numbers, got {sigmas}")
    if spacing is None:
        return [[s] * n_spatial for s in sigmas]
    spacing = [float(v) for v in np.asarray(spacing, dtype=np.float64).reshape(-1)]
    if len(spacing) != n_spatial or any(not math.isfinite(v) or v <= 0 for v in spacing):
        raise ValueError(
            f"energy_bands: spacing {spacing} must give one positive value per spatial axis ({n_spatial} axes)"
        )
    return [[s / v for v in spacing] for s in sigmas]


def _resolve_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    np_dtype = np.dtype(dtype)
    if np_dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"energy_bands: dtype must be float32 or float64, got {np_dtype}")
    return np_dtype


def _spectral_lowpasses(x: np.ndarray, level_sigmas: list[list[float]], mode: str, truncate: float):
    """Yield L_1 .. L_K (float arrays shaped like x) through one forward and K inverse transforms."""
    spatial = x.shape[1:]
    axes = tuple(range(1, x.ndim))
    if mode == "reflect":
        coeffs = scipy.fft.dctn(x, type=2, axes=axes)
    elif mode == "mirror":
        coeffs = scipy.fft.dctn(x, type=1, axes=axes)
    else:
        coeffs = scipy.fft.rfftn(x, axes=axes)
    cumulative = [np.ones(coeffs.shape[a], dtype=np.float64) for a in axes]
    for per_axis in level_sigmas:
        for a, (n, sigma) in enumerate(zip(spatial, per_axis)):
            n_freq = coeffs.shape[a + 1]
            cumulative[a] = cumulative[a] * _kernel_eigenvalues(float(sigma), float(truncate), n, mode, n_freq)
        multiplier = np.ones((1,) * x.ndim, dtype=x.dtype)
        for a, eig in enumerate(cumulative):
            shape = [1] * x.ndim
            shape[a + 1] = eig.shape[0]
            multiplier = multiplier * eig.astype(x.dtype).reshape(shape)
        if mode == "reflect":
            yield scipy.fft.idctn(coeffs * multiplier, type=2, axes=axes, overwrite_x=True)
        elif mode == "mirror":
            yield scipy.fft.idctn(coeffs * multiplier, type=1, axes=axes, overwrite_x=True)
        else:
            yield scipy.fft.irfftn(coeffs * multiplier, s=spatial, axes=axes, overwrite_x=True)


def _direct_lowpasses(x: torch.Tensor, level_sigmas: list[list[float]], mode: str, truncate: float):
    """Yield L_1 .. L_K by separable 1-D convolutions (torch, any device); x is (C, *spatial)."""
    n_spatial = x.ndim - 1
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n_spatial]
    current = x.unsqueeze(1)  # (C, 1, *spatial): channels become the batch, so they are never mixed
    for per_axis in level_sigmas:
        for a, sigma in enumerate(per_axis):
            weights = _gaussian_weights(sigma, truncate)
            if len(weights) == 1:
                continue
            radius = (len(weights) - 1) // 2
            dim = a + 2
            n = current.shape[dim]
            if mode == "constant":
                pad = [0, 0] * n_spatial
                pad[2 * (n_spatial - 1 - a)] = radius
                pad[2 * (n_spatial - 1 - a) + 1] = radius
                padded = F.pad(current, pad, mode="constant", value=0.0)
            else:
                index = torch.as_tensor(_extension_index(n, radius, mode), device=current.device)
                padded = current.index_select(dim, index)
            kshape = [1, 1] + [1] * n_spatial
            kshape[dim] = len(weights)
            kernel = torch.as_tensor(weights, dtype=current.dtype, device=current.device).reshape(kshape)
            current = conv(padded, kernel)
        yield current.squeeze(1)


def energy_bands(
    image: ArrayLike,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    spacing: Sequence[float] | None = None,
    mode: str = "reflect",
    truncate: float = 4.0,
    method: str = "auto",
    dtype: Any = np.float32,
) -> ArrayLike:
    """Decompose an image into energy bands by a cascade of Gaussian low-pass filters (Ghesu et al., Eq. 8).

    Args:
        image: channel-first 2D image ``(C, H, W)`` or 3D volume ``(C, X, Y, Z)`` (depth last), a numpy array or a
            torch tensor (CPU or CUDA; a MetaTensor is treated as a plain tensor).
        sigmas: σ of each successive Gaussian, each applied to the previous low-pass result (σ = 1, 2, 4, 8, 16 give
            cumulative σ ≈ 1, 2.24, 4.58, 9.22, 18.47). Voxels, or millimetres when ``spacing`` is given.
        spacing: voxel size per spatial axis (same order as the image axes, e.g. (sx, sy, sz) in mm); when given,
            σ on axis a is ``σ / spacing[a]`` voxels (anisotropic volumes are filtered isotropically in mm).
        mode: border extension, as ``scipy.ndimage``: 'reflect' (default, half-sample symmetric), 'wrap',
            'mirror', 'nearest', 'constant' (zeros).
        truncate: the Gaussian is cut at ``int(truncate·σ + 0.5)`` voxels (scipy's rule).
        method: 'auto' (spectral on CPU for reflect / wrap / mirror, direct otherwise), 'spectral' (a CUDA tensor
            is processed on the CPU and moved back) or 'direct' (separable torch convolutions).
        dtype: computation and output precision, float32 (default) or float64.

    Returns:
        The bands stacked on a new first axis, residual first then coarse to fine:
        ``[L_K, B_K, ..., B_1]`` (``[L16, B16, B8, B4, B2, B1]`` for the default sigmas), shape
        ``(len(sigmas) + 1, C, *spatial)``; a numpy array for a numpy input, otherwise a plain torch tensor on the
        input's device. The bands sum to the input up to float rounding.
    """
    _check_image(image)
    if mode not in BORDER_MODES:
        raise ValueError(f"energy_bands: unknown border mode {mode!r}; expected one of {BORDER_MODES}")
    if method not in ("auto", "spectral", "direct"):
        raise ValueError(f"energy_bands: unknown method {method!r}; expected 'auto', 'spectral' or 'direct'")
    np_dtype = _resolve_dtype(dtype)
    n_spatial = image.ndim - 1
    level_sigmas = _voxel_sigmas(sigmas, spacing, n_spatial)
    n_levels = len(level_sigmas)

    is_torch = isinstance(image, torch.Tensor)
    device = image.device if is_torch else torch.device("cpu")
    spectral_ok = mode in SPECTRAL_MODES and not (mode == "mirror" and min(image.shape[1:]) < 2)
    if method == "spectral" and not spectral_ok:
        raise ValueError(f"energy_bands: method 'spectral' does not support mode {mode!r} with shape {image.shape}")
    use_spectral = spectral_ok and (method == "spectral" or (method == "auto" and device.type == "cpu"))

    torch_dtype = torch.float32 if np_dtype == np.float32 else torch.float64
    if use_spectral:
        if is_torch:
            x = image.detach().as_subclass(torch.Tensor).to(device="cpu", dtype=torch_dtype).numpy()
        else:
            x = np.asarray(image)
        x = np.ascontiguousarray(x, dtype=np_dtype)
        out = np.empty((n_levels + 1,) + x.shape, dtype=np_dtype)
        previous = x
        for k, lowpass in enumerate(_spectral_lowpasses(x, level_sigmas, mode, truncate), start=1):
            np.subtract(previous, lowpass, out=out[n_levels + 1 - k])
            previous = lowpass
        out[0] = previous
        return torch.from_numpy(out).to(device) if is_torch else out

    if is_torch:
        x = image.detach().as_subclass(torch.Tensor).to(dtype=torch_dtype)
    else:
        x = torch.as_tensor(np.ascontiguousarray(image, dtype=np_dtype))
    out = torch.empty((n_levels + 1,) + tuple(x.shape), dtype=torch_dtype, device=x.device)
    # TF32 off for these convolutions: cuDNN's default TF32 (10-bit mantissa) puts the CUDA bands ~5e-4 away from
    # the float32 CPU result on 3D volumes; full float32 keeps them within 1e-4
    cudnn = torch.backends.cudnn
    no_tf32 = cudnn.flags(cudnn.enabled, cudnn.benchmark, cudnn.benchmark_limit, cudnn.deterministic, allow_tf32=False)
    with torch.no_grad(), no_tf32:
        previous = x
        for k, lowpass in enumerate(_direct_lowpasses(x, level_sigmas, mode, truncate), start=1):
            torch.sub(previous, lowpass, out=out[n_levels + 1 - k])
            previous = lowpass
        out[0] = previous
    return out if is_torch else out.numpy()


# ----------------------------------------------------------------------------------------------------------------
# Energies and recombination
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _reflect_band_multipliers(spatial: tuple[int, ...], level_sigmas: tuple[tuple[float, ...], ...],
                              truncate: float) -> np.ndarray:
    """(n_bands, prod(spatial)) float64, read-only: the DCT-II multipliers of ``[L_K, B_K, ..., B_1]`` (border
    'reflect'): L_k's is the outer product of the per-axis cumulative eigenvalues, B_k's is L_{k-1}'s − L_k's."""
    cumulative = [np.ones(n, dtype=np.float64) for n in spatial]
    lowpasses = [np.ones(int(np.prod(spatial)), dtype=np.float64)]
    for per_axis in level_sigmas:
        for a, (n, sigma) in enumerate(zip(spatial, per_axis)):
            cumulative[a] = cumulative[a] * _kernel_eigenvalues(float(sigma), float(truncate), n, "reflect", n)
        lowpasses.append(functools.reduce(np.multiply.outer, cumulative).reshape(-1))
    k = len(level_sigmas)
    multipliers = np.stack([lowpasses[k]] + [lowpasses[j - 1] - lowpasses[j] for j in range(k, 0, -1)])
    multipliers.setflags(write=False)
    return multipliers


class ReflectBandSpectra:
    """The energy bands of a stack of images (border 'reflect'), held in the transform domain: band energies per
    group of rows and any recombination ``Σ_i w_i · band_i``, without forming the bands.

    ``x`` is ``(R, *spatial)`` (rows = images or channels; 2 or 3 spatial axes), float32 or float64 (the computation's
    precision). One orthonormal DCT-II of every row (scipy.fft, one call for the stack); band i of row r is
    ``c_r · H_i`` with H_i its multiplier (:func:`energy_bands`' 'spectral' operator: the same bands, σ, truncation
    and border). Energies (float64): with the orthonormal transform ``Σ_v band² = Σ_f (c_f H_i,f)²`` (Parseval) and
    the band's mean is its DC coefficient / √N, so a row's centred sum of squares is the sum over the non-DC
    coefficients -- no cancellation; rows of a group are pooled as one population (ddof 0, as
    :func:`band_energies` over channels and voxels). :meth:`recombine` is one inverse transform per row. Cost: 2
    transforms instead of ``len(sigmas) + 1``, and no ``(n_bands, R, *spatial)`` array.
    """

    def __init__(self, x: np.ndarray, sigmas: Sequence[float] = DEFAULT_SIGMAS,
                 spacing: Sequence[float] | None = None, truncate: float = 4.0) -> None:
        if x.ndim not in (3, 4) or x.dtype not in (np.float32, np.float64):
            raise ValueError(f"ReflectBandSpectra: x must be a float32 / float64 array (R, *spatial) with 2 or 3 "
                             f"spatial axes, got {x.dtype} {tuple(x.shape)}")
        self.spatial = tuple(int(n) for n in x.shape[1:])
        self.axes = tuple(range(1, x.ndim))
        self.dtype = x.dtype
        level_sigmas = tuple(tuple(v) for v in _voxel_sigmas(sigmas, spacing, len(self.spatial)))
        self.multipliers = _reflect_band_multipliers(self.spatial, level_sigmas, float(truncate))
        self.coeffs = scipy.fft.dctn(x, type=2, norm="ortho", axes=self.axes).reshape(x.shape[0], -1)

    @property
    def n_bands(self) -> int:
        return self.multipliers.shape[0]

    def energies(self, n_groups: int) -> np.ndarray:
        """(n_bands, n_groups) float64: the population std of each band over each of ``n_groups`` equal groups of
        consecutive rows (e.g. the channels of one sample)."""
        rows, n = self.coeffs.shape
        if n_groups < 1 or rows % n_groups:
            raise ValueError(f"ReflectBandSpectra.energies: {rows} rows do not split into {n_groups} equal groups")
        squared = np.square(self.multipliers).T  # (F, bands)
        centred = np.empty((rows, self.n_bands), dtype=np.float64)
        step = max(1, (1 << 16) // n)  # rows per block: float64 temporaries of ~0.5 MB, not one of R x F
        for start in range(0, rows, step):
            power = np.square(self.coeffs[start:start + step], dtype=np.float64)
            power[:, 0] = 0.0  # the DC coefficient is the row's mean, not its spread
            centred[start:start + step] = power @ squared
        centred = centred.reshape(n_groups, -1, self.n_bands)  # (G, rows / G, bands)
        means = (self.coeffs[:, 0].astype(np.float64)[:, None] * self.multipliers[:, 0] / math.sqrt(n))
        means = means.reshape(n_groups, -1, self.n_bands)
        spread = n * np.square(means - means.mean(axis=1, keepdims=True)).sum(axis=1)  # between the group's rows
        variance = (centred.sum(axis=1) + spread) / (centred.shape[1] * n)
        return np.sqrt(np.maximum(variance, 0.0)).T

    def row_means(self) -> np.ndarray:
        """(R,) float64: each row's mean (the residual's mean too: every band but the residual has mean 0)."""
        return self.coeffs[:, 0].astype(np.float64) / math.sqrt(self.coeffs.shape[1])

    def residual(self, rows: Any = slice(None)) -> np.ndarray:
        """The low-pass residual L_K of ``rows`` (an index or slice), ``(r, *spatial)`` in the input's dtype."""
        coeffs = self.coeffs[rows] * self.multipliers[0].astype(self.dtype)
        return scipy.fft.idctn(coeffs.reshape((-1,) + self.spatial), type=2, norm="ortho", axes=self.axes,
                               overwrite_x=True)

    def recombine(self, weights: np.ndarray) -> np.ndarray:
        """``Σ_i weights[i, r] · band_i`` of every row r (``weights`` (n_bands, R)), ``(R, *spatial)``."""
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (self.n_bands, self.coeffs.shape[0]):
            raise ValueError(f"ReflectBandSpectra.recombine: weights of shape {weights.shape}, expected "
                             f"{(self.n_bands, self.coeffs.shape[0])}")
        combined = (weights.T @ self.multipliers).astype(self.dtype)  # (R, F): Σ_i w_i H_i per row
        combined *= self.coeffs
        return scipy.fft.idctn(combined.reshape((-1,) + self.spatial), type=2, norm="ortho", axes=self.axes,
                               overwrite_x=True)


def band_energies(bands: ArrayLike, mask: ArrayLike | None = None, per_channel: bool = False) -> ArrayLike:
    """Energy e_i(I, Ω) of each band: population standard deviation (ddof 0) of the band's values inside Ω.

    Args:
        bands: ``(n_bands, C, *spatial)`` as returned by :func:`energy_bands` (numpy or torch).
        mask: region Ω, boolean (non-zero = inside), shaped ``spatial``, ``(1, *spatial)`` or ``(C, *spatial)``;
            None = the whole image.
        per_channel: False (default): one energy per band over all channels and voxels of Ω; True: one per band
            and channel.

    Returns:
        float64 energies, shape ``(n_bands,)`` or ``(n_bands, C)``; numpy for numpy bands, else a torch tensor on
        the bands' device.
    """
    if bands.ndim not in (4, 5):
        raise ValueError(f"band_energies: bands have shape {tuple(bands.shape)}; expected (n_bands, C, *spatial)")
    is_torch = isinstance(bands, torch.Tensor)
    xp_bands = bands.detach().as_subclass(torch.Tensor) if is_torch else np.asarray(bands)
    channel_shape = tuple(bands.shape[1:])
    if mask is None:
        full = xp_bands.reshape(xp_bands.shape[0], channel_shape[0], -1)
        if is_torch:
            full = full.to(torch.float64)
            if per_channel:
                return full.std(dim=2, correction=0)
            return full.reshape(full.shape[0], -1).std(dim=1, correction=0)
        full = full.astype(np.float64)
        return full.std(axis=2) if per_channel else full.reshape(full.shape[0], -1).std(axis=1)

    if is_torch:
        m = mask.as_subclass(torch.Tensor) if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))
        m = m.to(device=xp_bands.device) != 0
    else:
        m = np.asarray(mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else mask) != 0
    if m.ndim == len(channel_shape) - 1:
        m = m[None]
    fits = m.ndim == len(channel_shape) and tuple(m.shape[1:]) == channel_shape[1:]
    if not fits or m.shape[0] not in (1, channel_shape[0]):
        raise ValueError(
            f"band_energies: mask shape {tuple(m.shape)} does not fit bands of shape {tuple(bands.shape)} "
            "(expected spatial, (1, *spatial) or (C, *spatial))"
        )
    if is_torch:
        m = m.expand(channel_shape)
    else:
        m = np.broadcast_to(m, channel_shape)
    if int(m.sum()) == 0:
        raise ValueError("band_energies: the mask selects no voxel")
    energies = []
    for band in xp_bands:
        if per_channel:
            row = []
            for c in range(channel_shape[0]):
                values = band[c][m[c]]
                if values.shape[0] == 0:
                    raise ValueError(f"band_energies: the mask selects no voxel in channel {c}")
                row.append(values.to(torch.float64).std(correction=0) if is_torch else values.astype(np.float64).std())
            energies.append(torch.stack(row) if is_torch else np.asarray(row))
        else:
            values = band[m]
            energies.append(values.to(torch.float64).std(correction=0) if is_torch else values.astype(np.float64).std())
    return torch.stack(energies) if is_torch else np.asarray(energies, dtype=np.float64)


def recombine_bands(bands: ArrayLike, weights: ArrayLike | Sequence[float] | None = None) -> ArrayLike:
    """``Σ_i w_i · band_i`` over the first axis of ``bands`` (all weights 1 when None: the input image)."""
    if weights is None:
        return bands.sum(0)
    if isinstance(bands, torch.Tensor):
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64) if not isinstance(weights, torch.Tensor) else weights)
        w = w.to(device=bands.device, dtype=bands.dtype)
        return torch.tensordot(w, bands, dims=([0], [0]))
    w = np.asarray(weights, dtype=np.float64).astype(bands.dtype)
    return np.tensordot(w, bands, axes=([0], [0]))


def image_spacing_for_sigmas(image: ArrayLike, sigma_unit: str = "relative") -> list[float] | None:
    """The ``spacing`` argument of :func:`energy_bands` that realises a sigma unit for this image.

    'voxel': None (σ in voxels on every axis). 'mm': the image's voxel size (MetaTensor ``pixdim``; σ in mm).
    'relative': the voxel size divided by its smallest value, i.e. σ in units of the finest voxel spacing (in-plane
    pixels of a CT/MR volume): 2D images and isotropic volumes behave as 'voxel' while a coarse slice axis gets a
    proportionally smaller σ. Images without spacing information (numpy, plain tensors) use voxel units.
    """
    if sigma_unit not in SIGMA_UNITS:
        raise ValueError(f"unknown sigma_unit {sigma_unit!r}; expected one of {SIGMA_UNITS}")
    if sigma_unit == "voxel":
        return None
    pixdim = getattr(image, "pixdim", None)
    if pixdim is None:
        if sigma_unit == "mm":
            raise ValueError("sigma_unit 'mm' needs an image with spacing information (a MONAI MetaTensor)")
        return None
    spacing = [float(v) for v in np.asarray(torch.as_tensor(pixdim).detach().cpu(), dtype=np.float64).reshape(-1)]
    n_spatial = image.ndim - 1
    spacing = (spacing + [1.0] * n_spatial)[:n_spatial]
    if any(not math.isfinite(v) or v <= 0 for v in spacing):
        return None
    if sigma_unit == "relative":
        smallest = min(spacing)
        spacing = [v / smallest for v in spacing]
    return spacing
