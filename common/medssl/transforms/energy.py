"""Energy-band decomposition and energy-based intensity augmentation (Ghesu et al. 2022, after Philipsen et al. 2015).

An image I is split into B = len(sigmas) + 1 energy bands by a cascade of Gaussian low-pass filters
(σ = 1, 2, 4, 8, 16 by default), each filter applied to the previous low-pass result:

    L_0 = I,   L_k = G_{σ_k} * L_{k-1},   B_k = L_{k-1} − L_k   (k = 1 .. K),   residual = L_K

so that ``I = L_K + Σ_k B_k`` exactly (up to float rounding). Bands are returned residual first, then from the
coarsest to the finest band: ``[L_16, B_16, B_8, B_4, B_2, B_1]`` for the default sigmas. The energy e_i(I, Ω) of a
band is its population standard deviation (ddof 0) inside a region Ω (the whole image by default). Ghesu et al.'s
normalised / augmented image (Eq. 8) is ``Σ_i (e_ref_i / e_i(I, Ω)) · I(i)``; the augmentation draws each e_ref_i
from a Gaussian fitted to reference energies, restricted to [mean − r·std, mean + r·std].

Axis convention: images are channel-first, 2D ``(C, H, W)`` or 3D ``(C, X, Y, Z)`` (MONAI / RAS, depth last). The
Gaussian filter is separable and acts on every spatial axis, never across channels. With ``spacing`` (mm per voxel,
one value per spatial axis in the same order) the sigmas are in millimetres and become ``σ / spacing[a]`` voxels on
axis a, so anisotropic volumes are filtered isotropically in physical space.

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
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft
import scipy.special
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type

__all__ = [
    "DEFAULT_SIGMAS",
    "BORDER_MODES",
    "SIGMA_UNITS",
    "energy_bands",
    "band_energies",
    "recombine_bands",
    "image_spacing_for_sigmas",
    "estimate_reference_energies",
    "load_energy_reference",
    "EnergyBandAugmentd",
]

logger = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------------------------------------------
# Reference energies
# ----------------------------------------------------------------------------------------------------------------


def estimate_reference_energies(
    items: Iterable[Any],
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    sigma_unit: str = "relative",
    mode: str = "reflect",
    truncate: float = 4.0,
    image_key: str = "image",
    modality_key: str = "modality",
) -> dict:
    """Fit the per-modality reference energies e_ref of Ghesu et al. (mean and std of each band's energy over images).

    Args:
        items: iterable of ``(image, modality)`` pairs or of sample dicts ``{image_key: image, modality_key: str}``
            (e.g. a MONAI Dataset after loading and intensity presets). Images are channel-first ``(C, H, W)`` or
            ``(C, X, Y, Z)`` (depth last), numpy or torch.
        sigmas, mode, truncate: the decomposition (must match the :class:`EnergyBandAugmentd` that uses the result).
        sigma_unit: 'voxel', 'relative' or 'mm' (see :func:`image_spacing_for_sigmas`).
        image_key, modality_key: keys of dict items.

    Returns:
        A JSON-serialisable dict ``{"sigmas": [...], "sigma_unit": str, "mode": str, "truncate": float,
        "bands": ["L16", "B16", ..., "B1"], "modalities": {modality: {"mean": [n_bands floats],
        "std": [n_bands floats], "n": int}}}``; energies over the whole image (Ω = image), std with ddof 0.
        ``tools/energy_reference.py`` writes it as JSON next to the datalist.
    """
    sigmas = [float(s) for s in sigmas]
    per_modality: dict[str, list[np.ndarray]] = {}
    for position, item in enumerate(items):
        if isinstance(item, Mapping):
            if image_key not in item or modality_key not in item:
                raise ValueError(
                    f"estimate_reference_energies: item {position} lacks '{image_key}' or '{modality_key}'"
                )
            image, modality = item[image_key], item[modality_key]
        else:
            image, modality = item
        if isinstance(modality, (list, tuple)):  # a collated batch of size 1
            modality = modality[0]
        spacing = image_spacing_for_sigmas(image, sigma_unit)
        bands = energy_bands(image, sigmas=sigmas, spacing=spacing, mode=mode, truncate=truncate)
        energies = band_energies(bands)
        energies = energies.cpu().numpy() if isinstance(energies, torch.Tensor) else energies
        per_modality.setdefault(str(modality), []).append(np.asarray(energies, dtype=np.float64))
    modalities = {}
    for modality, rows in sorted(per_modality.items()):
        table = np.stack(rows)
        modalities[modality] = {
            "mean": [float(v) for v in table.mean(axis=0)],
            "std": [float(v) for v in table.std(axis=0)],
            "n": int(table.shape[0]),
        }
    return {
        "sigmas": sigmas,
        "sigma_unit": sigma_unit,
        "mode": mode,
        "truncate": float(truncate),
        "bands": _band_names(sigmas),
        "modalities": modalities,
    }


def _band_names(sigmas: Sequence[float]) -> list[str]:
    def fmt(s: float) -> str:
        return f"{s:g}"

    return [f"L{fmt(sigmas[-1])}"] + [f"B{fmt(s)}" for s in reversed(sigmas)]


def load_energy_reference(reference: str | Path | Mapping) -> dict:
    """Read and validate a reference-energy file (or dict) as written from :func:`estimate_reference_energies`.

    Format: ``{"sigmas": [...], "modalities": {"CT": {"mean": [n], "std": [n], "n": int}, ...}}`` with
    n = len(sigmas) + 1 values in band order ``[L_K, B_K, ..., B_1]``; optional "sigma_unit", "mode", "truncate".
    Errors name the file and the field.
    """
    if isinstance(reference, Mapping):
        source, data = "reference dict", dict(reference)
    else:
        source = str(reference)
        try:
            with open(reference, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{source}: energy reference file not found") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: not valid JSON ({err})") from err
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a JSON object with 'sigmas' and 'modalities'")
    sigmas = data.get("sigmas")
    if not isinstance(sigmas, Sequence) or not sigmas or any(not isinstance(s, (int, float)) or s <= 0 for s in sigmas):
        raise ValueError(f"{source}: field 'sigmas' must be a non-empty list of positive numbers, got {sigmas!r}")
    n_bands = len(sigmas) + 1
    modalities = data.get("modalities")
    if not isinstance(modalities, Mapping):
        raise ValueError(f"{source}: field 'modalities' must be an object {{modality: {{mean, std, n}}}}")
    checked = {}
    for modality, stats in modalities.items():
        field = f"modalities.{modality}"
        if not isinstance(stats, Mapping):
            raise ValueError(f"{source}: field '{field}' must be an object with 'mean', 'std', 'n'")
        values = {}
        for name in ("mean", "std"):
            row = stats.get(name)
            if not isinstance(row, Sequence) or len(row) != n_bands:
                raise ValueError(f"{source}: field '{field}.{name}' must be a list of {n_bands} numbers, got {row!r}")
            row = [float(v) for v in row]
            if any(not math.isfinite(v) or v < 0 for v in row):
                raise ValueError(f"{source}: field '{field}.{name}' has a negative or non-finite value: {row}")
            values[name] = row
        checked[str(modality)] = {**values, "n": int(stats.get("n", 0))}
    result = {"sigmas": [float(s) for s in sigmas], "modalities": checked, "source": source}
    for key in ("sigma_unit", "mode", "truncate"):
        if key in data:
            result[key] = data[key]
    return result


# ----------------------------------------------------------------------------------------------------------------
# The augmentation
# ----------------------------------------------------------------------------------------------------------------


class EnergyBandAugmentd(RandomizableTransform, MapTransform):
    """Energy-based augmentation of Ghesu et al.: ``I' = Σ_i (e_ref_i / e_i(I)) · I(i)`` with e_ref_i drawn at random.

    Per call (with probability ``prob``): each image is decomposed by :func:`energy_bands`, its band energies e_i are
    measured over the whole image, and for each band a reference energy is drawn from the Gaussian N(mean_i, std_i)
    of the item's modality truncated to [mean_i − r·std_i, mean_i + r·std_i] (r = ``sample_range_sigma``; one
    standard truncated-normal draw z_i per band and call, by inverse CDF from ``self.R``, shared by all keys):
    e_ref_i = mean_i + std_i · z_i. With r = 0 the transform is the deterministic normalisation to the reference
    mean (seed Eq. 8); with e_ref = e it is the identity up to float error.

    Reference statistics come from ``reference`` (a JSON path or a dict from :func:`estimate_reference_energies`,
    per modality). Fallback (no reference: logged once, when the transform is built, not by each DataLoader worker
    of each epoch; the item's modality missing from the reference: logged once per modality and transform
    instance / worker): per-image statistics, mean_i = the image's own e_i and std_i = ``fallback_std_fraction`` ·
    e_i, i.e. each band's energy is scaled by a random factor in [1 − r·f, 1 + r·f].

    Guards: a band whose energy is at most ``1e-6 ×`` max(largest band energy, largest absolute value of the
    low-pass residual) — zero or float-rounding noise, e.g. every band of a constant image — is left unchanged
    (factor 1); drawn reference energies are clipped at 0.

    Images are channel-first 2D ``(C, H, W)`` or 3D ``(C, X, Y, Z)`` (depth last); numpy arrays and tensors
    (MetaTensor meta is kept); output float32 (float64 stays float64). ``sigma_unit`` (see
    :func:`image_spacing_for_sigmas`) turns a MetaTensor's voxel size into per-axis σ; it must match the reference.
    """

    backend = [torch.Tensor.__name__, np.ndarray.__name__]

    def __init__(
        self,
        keys: KeysCollection = "image",
        reference: str | Path | Mapping | None = None,
        modality_key: str = "modality",
        prob: float = 1.0,
        sigmas: Sequence[float] | None = None,
        sample_range_sigma: float = 1.0,
        fallback_std_fraction: float = 0.2,
        sigma_unit: str = "relative",
        mode: str = "reflect",
        truncate: float = 4.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if sample_range_sigma < 0:
            raise ValueError(f"EnergyBandAugmentd: sample_range_sigma must be >= 0, got {sample_range_sigma}")
        if fallback_std_fraction < 0:
            raise ValueError(f"EnergyBandAugmentd: fallback_std_fraction must be >= 0, got {fallback_std_fraction}")
        if sigma_unit not in SIGMA_UNITS:
            raise ValueError(f"EnergyBandAugmentd: unknown sigma_unit {sigma_unit!r}; expected one of {SIGMA_UNITS}")
        if mode not in BORDER_MODES:
            raise ValueError(f"EnergyBandAugmentd: unknown border mode {mode!r}; expected one of {BORDER_MODES}")
        self.reference = None if reference is None else load_energy_reference(reference)
        if self.reference is not None:
            source = self.reference["source"]
            ref_sigmas = self.reference["sigmas"]
            if sigmas is not None and [float(s) for s in sigmas] != ref_sigmas:
                raise ValueError(
                    f"{source}: field 'sigmas' {ref_sigmas} differs from the transform's sigmas {list(sigmas)}"
                )
            sigmas = ref_sigmas
            for key, mine in (("sigma_unit", sigma_unit), ("mode", mode), ("truncate", truncate)):
                if key in self.reference and self.reference[key] != mine:
                    raise ValueError(
                        f"{source}: field '{key}' is {self.reference[key]!r} but the transform uses {mine!r}"
                    )
        self.sigmas = [float(s) for s in (DEFAULT_SIGMAS if sigmas is None else sigmas)]
        self.n_bands = len(self.sigmas) + 1
        self.modality_key = modality_key
        self.sample_range_sigma = float(sample_range_sigma)
        self.fallback_std_fraction = float(fallback_std_fraction)
        self.sigma_unit = sigma_unit
        self.mode = mode
        self.truncate = float(truncate)
        self._z = np.zeros(self.n_bands, dtype=np.float64)
        self._warned: set[str] = set()
        if self.reference is None:  # said once here, in the process that builds the pipeline, not per worker / epoch
            logger.warning(
                "EnergyBandAugmentd: no reference energies were given (tools/energy_reference.py makes them); using "
                "per-image statistics (mean = the image's own band energies, std = %.3g x mean)",
                self.fallback_std_fraction,
            )

    def randomize(self, data: Any = None) -> None:
        """Draw whether to apply and one standard normal z_i per band truncated to [−r, r] (inverse CDF)."""
        super().randomize(None)
        r = self.sample_range_sigma
        uniforms = self.R.uniform(size=self.n_bands)
        if r == 0:
            self._z = np.zeros(self.n_bands, dtype=np.float64)
            return
        low, high = scipy.special.ndtr(-r), scipy.special.ndtr(r)
        u = np.clip(low + uniforms * (high - low), 1e-12, 1 - 1e-12)
        self._z = np.clip(scipy.special.ndtri(u), -r, r)

    def reference_stats(self, modality: Any, energies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of the reference energies for a modality; per-image fallback if unknown (see the class)."""
        modalities = {} if self.reference is None else self.reference["modalities"]
        key = None if modality is None else str(modality)
        if key is not None and key not in modalities and key.upper() in modalities:
            key = key.upper()
        if key is not None and key in modalities:
            stats = modalities[key]
            return np.asarray(stats["mean"], dtype=np.float64), np.asarray(stats["std"], dtype=np.float64)
        if self.reference is not None and str(key) not in self._warned:
            self._warned.add(str(key))
            logger.warning(
                "EnergyBandAugmentd: %s: modality %r has no reference energies; using per-image statistics (mean = "
                "the image's own band energies, std = %.3g x mean)",
                self.reference["source"],
                key,
                self.fallback_std_fraction,
            )
        return energies, self.fallback_std_fraction * energies

    def scale_factors(self, energies: np.ndarray, modality: Any, magnitude: float = 0.0) -> np.ndarray:
        """Per-band factors e_ref_i / e_i for the current draw.

        A band with e_i <= 1e-6 · max(max_i e_i, magnitude) keeps factor 1 (``magnitude``: the image's largest
        absolute value, so that float rounding noise in the bands of a constant image is never amplified).
        """
        energies = np.asarray(energies, dtype=np.float64)
        mean, std = self.reference_stats(modality, energies)
        target = np.maximum(mean + std * self._z, 0.0)
        floor = 1e-6 * max(float(np.max(energies)) if energies.size else 0.0, float(magnitude))
        valid = energies > floor
        scales = np.ones_like(energies)
        scales[valid] = target[valid] / energies[valid]
        return scales

    def augment(self, image: ArrayLike, modality: Any = None) -> ArrayLike:
        """Apply the current draw to one image (channel-first, 2D (C, H, W) or 3D (C, X, Y, Z), depth last)."""
        if image.ndim not in (3, 4):
            raise ValueError(
                f"EnergyBandAugmentd: image of shape {tuple(image.shape)}; expected (C, H, W) or (C, X, Y, Z)"
            )
        spacing = image_spacing_for_sigmas(image, self.sigma_unit)
        bands = energy_bands(image, sigmas=self.sigmas, spacing=spacing, mode=self.mode, truncate=self.truncate)
        energies = band_energies(bands)
        energies = energies.cpu().numpy() if isinstance(energies, torch.Tensor) else np.asarray(energies)
        magnitude = float(bands[0].abs().max()) if isinstance(bands, torch.Tensor) else float(np.abs(bands[0]).max())
        out = recombine_bands(bands, self.scale_factors(energies, modality, magnitude))
        out_dtype = torch.float64 if str(getattr(image, "dtype", "")).endswith("float64") else torch.float32
        return convert_to_dst_type(out, dst=image, dtype=out_dtype)[0]

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        modality = d.get(self.modality_key)
        if isinstance(modality, (list, tuple)):
            modality = modality[0] if modality else None
        for key in self.key_iterator(d):
            d[key] = self.augment(d[key], modality)
        return d
