"""medssl.data.presets: CT window, percentile scaling, unit range and the per-modality dispatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medssl.data.presets import MODALITY_PRESETS, CTWindowd, ModalityIntensityd, PercentileScaled, UnitRangeRGBd
from medssl.data.datalist import MODALITIES


def volume(values, affine=None):
    """A (1, X, Y, Z) MetaTensor volume (depth last) holding ``values``."""
    data = torch.as_tensor(np.asarray(values, dtype=np.float32)).reshape(1, 2, 2, -1)
    return MetaTensor(data, affine=torch.diag(torch.tensor([0.5, 0.5, 2.0, 1.0])) if affine is None else affine)


def test_ct_window_maps_hounsfield_units_to_unit_range():
    hu = volume([-2000.0, -1000.0, -500.0, 0.0, 500.0, 1000.0, 3000.0, 40.0])
    out = CTWindowd("image")({"image": hu})["image"].flatten().tolist()
    assert out == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.52])
    narrow = CTWindowd("image", window=(-160, 240))({"image": hu})["image"].flatten().tolist()
    assert narrow[3] == pytest.approx(160 / 400) and narrow[7] == pytest.approx(200 / 400)
    with pytest.raises(ValueError):
        CTWindowd("image", window=(100, 100))


def test_percentile_scaling_clips_outliers_and_keeps_metadata():
    rng = np.random.RandomState(0)
    values = rng.normal(300.0, 50.0, 2 * 2 * 250)
    values[0], values[1] = 1e6, -1e6  # outliers beyond the 0.5 / 99.5 percentiles
    image = volume(values)
    out = PercentileScaled("image", lower=0.5, upper=99.5)({"image": image})["image"]
    low, high = np.percentile(values, [0.5, 99.5])
    expected = np.clip((values - low) / (high - low), 0.0, 1.0)
    np.testing.assert_allclose(out.flatten().numpy(), expected, rtol=1e-4, atol=1e-5)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, image.affine)
    with pytest.raises(ValueError):
        PercentileScaled("image", lower=60, upper=40)


def test_unit_range_for_photographs():
    rgb = torch.tensor([[[0.0, 51.0], [255.0, 300.0]]]).repeat(3, 1, 1)  # (3, H, W)
    out = UnitRangeRGBd("image")({"image": rgb})["image"]
    assert out.shape == (3, 2, 2)
    assert out[0].flatten().tolist() == pytest.approx([0.0, 0.2, 1.0, 1.0])


def test_modality_dispatch_per_item():
    transform = ModalityIntensityd(keys="image", modality_key="modality")
    hu = volume([-1000.0, 0.0, 1000.0, 2000.0])
    ct = transform({"image": hu, "modality": "CT"})["image"].flatten().tolist()
    assert ct == pytest.approx([0.0, 0.5, 1.0, 1.0])  # the HU window, not the image's percentiles
    # the same values as MR are percentile-scaled: min -> 0, max -> 1
    mr = transform({"image": hu, "modality": "MRI"})["image"].flatten()
    assert float(mr.min()) == 0.0 and float(mr.max()) == 1.0 and 0.0 < float(mr[1]) < 0.5
    photo = torch.full((3, 2, 2), 127.5)
    assert float(transform({"image": photo, "modality": "PATH"})["image"].mean()) == pytest.approx(0.5)
    assert float(transform({"image": photo, "modality": "FUNDUS"})["image"].mean()) == pytest.approx(0.5)
    # unknown or missing modality: the default preset (percentile), or an error naming the value
    unknown = transform({"image": hu, "modality": "OT"})["image"].flatten()
    assert float(unknown.max()) == 1.0 and float(unknown.min()) == 0.0
    assert float(transform({"image": hu})["image"].max()) == 1.0
    with pytest.raises(ValueError, match="'OT'"):
        ModalityIntensityd("image", default="raise")({"image": hu, "modality": "OT"})
    unchanged = ModalityIntensityd("image", presets={"US": "none"})({"image": hu, "modality": "US"})["image"]
    assert torch.equal(unchanged, hu)
    windowed = ModalityIntensityd("image", ct_window=(-500, 500))({"image": hu, "modality": "CT"})["image"]
    assert windowed.flatten().tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert set(MODALITY_PRESETS) == set(MODALITIES)


def test_xray_percentiles_differ_from_mr_percentiles():
    values = np.linspace(0.0, 100.0, 2 * 2 * 101)
    transform = ModalityIntensityd("image", mr_percentiles=(0.0, 100.0), xr_percentiles=(10.0, 90.0))
    mr = transform({"image": volume(values), "modality": "MR"})["image"].flatten().numpy()
    xr = transform({"image": volume(values), "modality": "CR"})["image"].flatten().numpy()
    np.testing.assert_allclose(mr, values / 100.0, atol=1e-6)
    np.testing.assert_allclose(xr, np.clip((values - 10.0) / 80.0, 0.0, 1.0), atol=1e-5)
