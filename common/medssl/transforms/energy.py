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

The decomposition, the band energies and the recombination (the math, with how they are computed) are in
:mod:`medssl.transforms.energy_decomposition`, re-exported here; this module holds the reference energies and the
MONAI transform.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.special
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type

from .energy_decomposition import (
    BORDER_MODES,
    DEFAULT_SIGMAS,
    SIGMA_UNITS,
    ArrayLike,
    band_energies,
    energy_bands,
    image_spacing_for_sigmas,
    recombine_bands,
)

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
