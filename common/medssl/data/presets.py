"""Modality intensity presets: bring every modality to [0, 1] before augmentation, with MONAI's scaling transforms.

=================  =====================================================================================
modality           preset
=================  =====================================================================================
CT                 HU window: v' = clip((v - w_lo) / (w_hi - w_lo), 0, 1), default window (-1000, 1000) HU
MR                 percentile scaling: v' = clip((v - P_lo) / (P_hi - P_lo), 0, 1), P_q the q-th percentile
                   of the image, default (0.5, 99.5)
XR, MG             percentile scaling, default (0.5, 99.5)
US, NM, PT         percentile scaling, default (0.5, 99.5)
PATH, FUNDUS       unit range: v' = clip(v / 255, 0, 1) (8-bit photographs / slides)
=================  =====================================================================================

The transforms are thin subclasses of ``monai.transforms.ScaleIntensityRanged`` /
``ScaleIntensityRangePercentilesd``; they work on channel-first images of any spatial rank, (C, H, W) or volumes
(C, X, Y, Z) with the depth axis last, and keep ``MetaTensor`` metadata. A constant image (P_lo = P_hi) comes out
as zeros (MONAI warns about the division by zero).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRanged, ScaleIntensityRangePercentilesd

from medssl.data.datalist import normalize_modality

__all__ = ["CTWindowd", "PercentileScaled", "UnitRangeRGBd", "ModalityIntensityd", "MODALITY_PRESETS"]

# which preset each canonical modality uses in ModalityIntensityd
MODALITY_PRESETS = {
    "CT": "ct",
    "MR": "mr",
    "XR": "xr",
    "MG": "xr",
    "US": "percentile",
    "NM": "percentile",
    "PT": "percentile",
    "PATH": "unit",
    "FUNDUS": "unit",
}

#: every preset maps its source range to [0, 1] and clips (the MONAI scalers' target-range arguments)
_TO_UNIT_RANGE = {"b_min": 0.0, "b_max": 1.0, "clip": True}


class CTWindowd(ScaleIntensityRanged):
    """Map a Hounsfield-unit window to [0, 1], clipped: v' = clip((v - w_lo) / (w_hi - w_lo), 0, 1).

    Args:
        keys: keys of the images (CT in HU, as ``medssl.data.readers`` loads them).
        window: (w_lo, w_hi) in HU; default (-1000, 1000) keeps air to dense bone.
        dtype: output dtype.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        window: Sequence[float] = (-1000.0, 1000.0),
        dtype: DtypeLike = np.float32,
        allow_missing_keys: bool = False,
    ):
        low, high = (float(w) for w in window)
        if not high > low:
            raise ValueError(f"CT window must be (low, high) with high > low, got {tuple(window)}")
        super().__init__(
            keys,
            a_min=low,
            a_max=high,
            **_TO_UNIT_RANGE,
            dtype=dtype,
            allow_missing_keys=allow_missing_keys,
        )
        self.window = (low, high)


class PercentileScaled(ScaleIntensityRangePercentilesd):
    """Map the [P_lower, P_upper] percentile range of each image to [0, 1], clipped (MR, X-ray, US, NM, PET).

    Args:
        keys: keys of the images.
        lower: lower percentile in [0, 100] (default 0.5).
        upper: upper percentile in [0, 100] (default 99.5).
        channel_wise: percentiles per channel (e.g. RGB ultrasound) instead of over the whole image.
        dtype: output dtype.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        lower: float = 0.5,
        upper: float = 99.5,
        channel_wise: bool = False,
        dtype: DtypeLike = np.float32,
        allow_missing_keys: bool = False,
    ):
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got ({lower}, {upper})")
        super().__init__(
            keys,
            lower=lower,
            upper=upper,
            **_TO_UNIT_RANGE,
            relative=False,
            channel_wise=channel_wise,
            dtype=dtype,
            allow_missing_keys=allow_missing_keys,
        )
        self.percentiles = (float(lower), float(upper))


class UnitRangeRGBd(ScaleIntensityRanged):
    """Map 8-bit photographs / pathology slides from 0..``max_value`` (255) to [0, 1], clipped."""

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        max_value: float = 255.0,
        dtype: DtypeLike = np.float32,
        allow_missing_keys: bool = False,
    ):
        super().__init__(
            keys,
            a_min=0.0,
            a_max=float(max_value),
            **_TO_UNIT_RANGE,
            dtype=dtype,
            allow_missing_keys=allow_missing_keys,
        )


class ModalityIntensityd(MapTransform):
    """Scale each item's image to [0, 1] with the preset of its modality (``d[modality_key]``), see the module table.

    Args:
        keys: keys of the images.
        modality_key: item key holding the modality (any alias accepted by ``normalize_modality``).
        ct_window: HU window of CT.
        mr_percentiles: (lower, upper) percentiles of MR.
        xr_percentiles: (lower, upper) percentiles of X-ray and mammography.
        other_percentiles: (lower, upper) percentiles of US, NM and PT.
        default: preset for items without a modality or with an unknown one: ``"percentile"`` (other_percentiles),
            ``"ct"``, ``"mr"``, ``"xr"``, ``"unit"``, ``"none"`` (unchanged) or ``"raise"`` (ValueError naming the
            value).
        presets: overrides of ``MODALITY_PRESETS``, e.g. ``{"US": "unit"}``.
        allow_missing_keys: don't raise when a key is absent.
    """

    _CHOICES = ("ct", "mr", "xr", "percentile", "unit", "none")

    def __init__(
        self,
        keys: KeysCollection = "image",
        modality_key: str = "modality",
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        mr_percentiles: Sequence[float] = (0.5, 99.5),
        xr_percentiles: Sequence[float] = (0.5, 99.5),
        other_percentiles: Sequence[float] = (0.5, 99.5),
        default: str = "percentile",
        presets: Mapping[str, str] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.modality_key = modality_key
        if default not in self._CHOICES + ("raise",):
            raise ValueError(f"default must be one of {self._CHOICES + ('raise',)}, got {default!r}")
        self.default = default
        self.presets = dict(MODALITY_PRESETS)
        for modality, preset in (presets or {}).items():
            if preset not in self._CHOICES:
                raise ValueError(f"preset for {modality} must be one of {self._CHOICES}, got {preset!r}")
            self.presets[normalize_modality(modality)] = preset
        missing = allow_missing_keys
        self.transforms: dict[str, Any] = {
            "ct": CTWindowd(keys, window=ct_window, allow_missing_keys=missing),
            "mr": PercentileScaled(keys, *mr_percentiles, allow_missing_keys=missing),
            "xr": PercentileScaled(keys, *xr_percentiles, allow_missing_keys=missing),
            "percentile": PercentileScaled(keys, *other_percentiles, allow_missing_keys=missing),
            "unit": UnitRangeRGBd(keys, allow_missing_keys=missing),
        }

    def preset_of(self, modality: Any) -> str:
        """The preset name used for ``modality`` (``"none"`` leaves the image unchanged)."""
        try:
            code = normalize_modality(modality)
        except ValueError:
            if self.default == "raise":
                raise
            return self.default
        return self.presets.get(code, self.default if self.default != "raise" else "percentile")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        preset = self.preset_of(d.get(self.modality_key))
        for key in self.key_iterator(d):
            _check_finite(d[key])
        if preset == "none":
            return d
        return self.transforms[preset](d)


def _check_finite(image: Any) -> None:
    """Raise ValueError when ``image`` holds NaN / Inf values (the message of ``tools/datalist.py check``): a percentile
    or window of such an image is NaN, and so would be the loss of every step it joins."""
    values = torch.as_tensor(image)
    if values.is_floating_point():
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise ValueError(f"NaN/Inf values ({bad} of {values.numel()} voxels)")
