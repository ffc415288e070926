"""Intensity augmentations of Ghesu et al. 2022 (medssl.transforms.intensity): gamma, linear a·I + b, whole-image
rescale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medssl.transforms.intensity import RandGammad, RandLinearIntensityd, RandRescaleFractiond


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def ramp_image(shape=(1, 12, 10), low=-3.0, high=5.0) -> np.ndarray:
    """Distinct values from low to high (both attained) in a fixed shuffled order."""
    n = int(np.prod(shape))
    values = np.linspace(low, high, n)
    return np.random.default_rng(0).permutation(values).reshape(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------------- gamma
def test_gamma_formula_and_fixed_extremes():
    image = ramp_image()
    transform = RandGammad("image", prob=1.0).set_random_state(3)
    out = transform({"image": torch.from_numpy(image)})["image"]
    g = transform.exponent
    low, high = image.min(), image.max()
    expected = ((image.astype(np.float64) - low) / (high - low)) ** g * (high - low) + low
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert float(out.min()) == pytest.approx(low, abs=1e-5) and float(out.max()) == pytest.approx(high, abs=1e-4)


def test_gamma_exponents_stay_in_range_and_both_directions_occur():
    transform = RandGammad("image", gamma_range=(1.8, 2.6), reciprocal_prob=0.5, prob=1.0)
    image = {"image": torch.from_numpy(ramp_image())}
    exponents = []
    for seed in range(300):
        transform.set_random_state(seed)
        transform(image)
        exponents.append(transform.exponent)
    exponents = np.array(exponents)
    direct = exponents[exponents >= 1]
    reciprocal = 1.0 / exponents[exponents < 1]
    assert np.all((direct >= 1.8) & (direct <= 2.6))
    assert np.all((reciprocal >= 1.8) & (reciprocal <= 2.6))
    # both directions, roughly half each, and the range is covered
    assert 0.35 < len(direct) / len(exponents) < 0.65
    assert direct.min() < 1.9 and direct.max() > 2.5


def test_gamma_literal_reading_only_darkens_and_matches_monai():
    from monai.transforms import RandAdjustContrastd

    image = torch.from_numpy(ramp_image(low=0.0, high=1.0))
    ours = RandGammad("image", reciprocal_prob=0.0, prob=1.0)
    for seed in range(20):
        ours.set_random_state(seed)
        out = ours({"image": image})["image"]
        assert 1.8 <= ours.exponent <= 2.6
        assert torch.all(out <= image + 1e-6)  # γ > 1 on [0, 1]: darker everywhere
    monai_gamma = RandAdjustContrastd("image", prob=1.0, gamma=(ours.exponent, ours.exponent))
    np.testing.assert_allclose(monai_gamma({"image": image})["image"].numpy(), out.numpy(), atol=1e-6)


def test_gamma_types_meta_prob_and_determinism():
    image = ramp_image()
    transform = RandGammad(("image", "other"), prob=1.0)
    out = transform({"image": image, "other": image * 2})
    assert isinstance(out["image"], np.ndarray) and out["image"].shape == image.shape
    # one draw shared by the keys: the same normalised result
    np.testing.assert_allclose(out["other"], out["image"] * 2, rtol=1e-5, atol=1e-5)
    meta = MetaTensor(torch.from_numpy(image), affine=torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0])))
    meta_out = RandGammad("image", prob=1.0)({"image": meta})["image"]
    assert isinstance(meta_out, MetaTensor) and torch.equal(meta_out.affine, meta.affine)
    assert RandGammad("image", prob=0.0)({"image": image})["image"] is image
    a = RandGammad("image").set_random_state(9)({"image": image})["image"]
    b = RandGammad("image").set_random_state(9)({"image": image})["image"]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="gamma_range"):
        RandGammad("image", gamma_range=(2.6, 1.8))


# ------------------------------------------------------------------------------------------------------ linear
def test_linear_parameters_within_bounds_over_many_draws():
    image = ramp_image(low=-3.0, high=5.0)
    value_range = float(image.max() - image.min())
    flat = image.reshape(-1).astype(np.float64)
    i, j = int(np.argmin(flat)), int(np.argmax(flat))
    transform = RandLinearIntensityd("image", a_range=(0.9, 1.1), b_fraction=0.2, prob=1.0)
    scales, offsets = [], []
    for seed in range(300):
        transform.set_random_state(seed)
        out = transform({"image": torch.from_numpy(image)})["image"].numpy().reshape(-1).astype(np.float64)
        a = (out[j] - out[i]) / (flat[j] - flat[i])  # recover a and b from the output alone
        b = out[i] - a * flat[i]
        np.testing.assert_allclose(out, a * flat + b, atol=1e-4)
        scales.append(a)
        offsets.append(b / value_range)
    scales, offsets = np.array(scales), np.array(offsets)
    assert np.all((scales >= 0.9 - 1e-5) & (scales <= 1.1 + 1e-5))
    assert np.all(np.abs(offsets) <= 0.2 + 1e-5)
    assert scales.min() < 0.91 and scales.max() > 1.09  # the whole range is used
    assert offsets.min() < -0.18 and offsets.max() > 0.18


def test_linear_offset_relative_to_each_images_range_numpy_and_torch():
    small = ramp_image(low=0.0, high=1.0)
    big = ramp_image(low=0.0, high=100.0)
    transform = RandLinearIntensityd(("small", "big"), prob=1.0).set_random_state(5)
    out = transform({"small": small, "big": torch.from_numpy(big)})
    assert isinstance(out["small"], np.ndarray) and isinstance(out["big"], torch.Tensor)
    offset_small = out["small"].reshape(-1)[np.argmin(small)] - transform.scale * small.min()
    offset_big = float(out["big"].reshape(-1)[np.argmin(big)]) - transform.scale * big.min()
    assert abs(offset_small) > 0 and offset_big / 100.0 == pytest.approx(offset_small / 1.0, rel=1e-4)
    assert RandLinearIntensityd("small", prob=0.0)({"small": small})["small"] is small
    meta = MetaTensor(torch.from_numpy(small), affine=torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0])))
    meta_out = RandLinearIntensityd("image", prob=1.0).set_random_state(5)({"image": meta})["image"]
    assert isinstance(meta_out, MetaTensor) and torch.equal(meta_out.affine, meta.affine)
    np.testing.assert_allclose(meta_out.numpy(), out["small"], atol=1e-6)  # same seed, same draw
    integer = RandLinearIntensityd("x", prob=1.0)({"x": torch.arange(6).reshape(1, 2, 3)})["x"]
    assert integer.dtype == torch.float32
    with pytest.raises(ValueError, match="b_fraction"):
        RandLinearIntensityd("x", b_fraction=-0.1)


# ------------------------------------------------------------------------------------------------ rescale (A)
def test_rescale_fraction_sizes_spacing_and_determinism():
    image = MetaTensor(torch.rand(1, 200, 150), affine=torch.diag(torch.tensor([0.5, 0.5, 1.0, 1.0])))
    transform = RandRescaleFractiond("image", scale_range=(0.1, 0.7), prob=1.0)
    fractions = []
    for seed in range(40):
        transform.set_random_state(seed)
        out = transform({"image": image})["image"]
        s = transform.fraction
        fractions.append(s)
        assert 0.1 <= s <= 0.7
        assert tuple(out.shape[1:]) == (round(s * 200), round(s * 150))
        # the spacing grows as the pixel count shrinks (same physical extent)
        np.testing.assert_allclose(out.pixdim.numpy(), [0.5 * 200 / out.shape[1], 0.5 * 150 / out.shape[2]], rtol=1e-6)
    assert min(fractions) < 0.2 and max(fractions) > 0.6
    volume = np.random.default_rng(1).random((1, 20, 20, 10)).astype(np.float32)
    first = RandRescaleFractiond(prob=1.0).set_random_state(2)({"image": volume})["image"]
    again = RandRescaleFractiond(prob=1.0).set_random_state(2)({"image": volume})["image"]
    assert isinstance(first, np.ndarray) and first.ndim == 4
    np.testing.assert_array_equal(first, again)
    # area averaging keeps the mean of a downscale by an integer factor
    transform = RandRescaleFractiond(scale_range=(0.5, 0.5), prob=1.0)
    half = transform({"image": volume})["image"]
    assert half.shape == (1, 10, 10, 5)
    assert float(half.mean()) == pytest.approx(float(volume.mean()), rel=1e-5)
