"""Energy-band decomposition and the energy-based augmentation (Ghesu et al. 2022)."""

from __future__ import annotations

import copy
import json
import logging
import pickle
import time

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from monai.data import MetaTensor

from medssl.transforms.energy_decomposition import ReflectBandSpectra
from medssl.transforms.energy import (
    BORDER_MODES,
    EnergyBandAugmentd,
    band_energies,
    energy_bands,
    estimate_reference_energies,
    image_spacing_for_sigmas,
    load_energy_reference,
    recombine_bands,
)

SIGMAS = (1, 2, 4, 8, 16)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Intra-op threads on a shared CPU spin against each other; the small torch convolutions here need one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def scipy_cascade(image: np.ndarray, mode: str = "reflect", spacing=None, sigmas=SIGMAS) -> np.ndarray:
    """Straightforward reference: scipy.ndimage.gaussian_filter cascade per channel, bands [L_K, B_K, .., B_1]."""
    lowpass, bands = image, []
    for sigma in sigmas:
        per_axis = sigma if spacing is None else [sigma / s for s in spacing]
        smoothed = np.stack([ndi.gaussian_filter(c, per_axis, mode=mode, truncate=4.0) for c in lowpass])
        bands.append(lowpass - smoothed)
        lowpass = smoothed
    return np.stack([lowpass] + bands[::-1])


def toy_image() -> np.ndarray:
    y, x = np.mgrid[0:256, 0:256].astype(np.float64)
    return 1000 + 300 * np.sin(x / 9) * np.cos(y / 13) + 50 * np.sin((x + 2 * y) / 2.5) + 0.02 * (x - 128) ** 2


# ------------------------------------------------------------------------------------------------ decomposition


@pytest.mark.parametrize("method", ["spectral", "direct"])
def test_spec_toy_energies(method):
    image = toy_image()[None]
    box = np.zeros((256, 256), dtype=bool)
    box[int(0.15 * 256) : int(0.85 * 256), int(0.15 * 256) : int(0.85 * 256)] = True
    expected = [48.2826, 65.5095, 57.4128, 20.9513, 19.7186, 11.7419]  # spec: [L16, B16, B8, B4, B2, B1]
    bands = energy_bands(image, mode="wrap", method=method)
    assert bands.shape == (6, 1, 256, 256)
    np.testing.assert_allclose(band_energies(bands, mask=box), expected, atol=1e-3)
    tensor_bands = energy_bands(torch.as_tensor(image), mode="wrap", method=method)
    energies = band_energies(tensor_bands, mask=torch.as_tensor(box))
    assert isinstance(energies, torch.Tensor)
    np.testing.assert_allclose(energies.numpy(), expected, atol=1e-3)


@pytest.mark.parametrize("mode", BORDER_MODES)
@pytest.mark.parametrize("method", ["auto", "direct"])
def test_matches_scipy_cascade(mode, method):
    rng = np.random.default_rng(1)
    image2d = rng.normal(size=(2, 23, 18)) * 100  # radius 64 of σ=16 exceeds the image: repeated extension
    np.testing.assert_allclose(
        energy_bands(image2d, mode=mode, method=method, dtype=np.float64), scipy_cascade(image2d, mode), atol=1e-9
    )
    volume = rng.normal(size=(1, 20, 16, 6)) * 100
    spacing = (0.7, 0.9, 3.0)
    np.testing.assert_allclose(
        energy_bands(volume, spacing=spacing, mode=mode, method=method, dtype=np.float64),
        scipy_cascade(volume, mode, spacing=spacing),
        atol=1e-9,
    )


def test_float32_close_to_float64_reference():
    image = toy_image()[None]
    bands = energy_bands(image)
    assert bands.dtype == np.float32
    np.testing.assert_allclose(bands, scipy_cascade(image), atol=2e-3)


@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("shape,spacing", [((1, 48, 40), None), ((3, 33, 29), None), ((1, 24, 20, 9), (0.8, 0.8, 4.0))])
def test_bands_sum_to_input(as_torch, shape, spacing):
    rng = np.random.default_rng(2)
    image = (rng.normal(size=shape) * 200 + 500).astype(np.float32)
    data = torch.from_numpy(image) if as_torch else image
    bands = energy_bands(data, spacing=spacing)
    assert isinstance(bands, torch.Tensor) == as_torch
    assert tuple(bands.shape) == (6,) + shape
    total = bands.sum(0).numpy() if as_torch else bands.sum(0)
    np.testing.assert_allclose(total, image, atol=5e-4)
    # every band carries signal, and the residual is the smoothest (lowest energy of its first differences)
    diffs = [np.abs(np.diff(np.asarray(b), axis=1)).mean() for b in bands]
    assert diffs[0] < diffs[-1]


def test_anisotropic_spacing_changes_only_the_scaled_axes():
    rng = np.random.default_rng(3)
    volume = rng.normal(size=(1, 20, 20, 12)).astype(np.float32)
    isotropic = energy_bands(volume, spacing=(1.0, 1.0, 1.0))
    np.testing.assert_allclose(isotropic, energy_bands(volume), atol=1e-5)
    thick = energy_bands(volume, spacing=(1.0, 1.0, 5.0))
    assert np.abs(thick - isotropic).max() > 1e-2
    np.testing.assert_allclose(thick.sum(0), volume, atol=1e-5)
    with pytest.raises(ValueError, match="spacing"):
        energy_bands(volume, spacing=(1.0, 1.0))


def test_input_validation():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        energy_bands(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="border mode"):
        energy_bands(np.zeros((1, 8, 8)), mode="edge")
    with pytest.raises(ValueError, match="sigmas"):
        energy_bands(np.zeros((1, 8, 8)), sigmas=(1, -2))


def test_metatensor_input_gives_plain_tensor():
    image = MetaTensor(torch.rand(1, 16, 16))
    bands = energy_bands(image)
    assert type(bands) is torch.Tensor and bands.shape == (6, 1, 16, 16)


@pytest.mark.gpu
def test_cuda_same_device_and_values():
    rng = np.random.default_rng(4)
    image = rng.normal(size=(1, 64, 48)).astype(np.float32)
    cuda_bands = energy_bands(torch.from_numpy(image).cuda())
    assert cuda_bands.is_cuda
    np.testing.assert_allclose(cuda_bands.cpu().numpy(), energy_bands(image), atol=1e-4)
    volume = torch.from_numpy(rng.normal(size=(1, 24, 24, 8)).astype(np.float32)).cuda()
    np.testing.assert_allclose(
        energy_bands(volume, spacing=(1, 1, 3)).cpu().numpy(),
        energy_bands(volume.cpu(), spacing=(1, 1, 3)).numpy(),
        atol=1e-4,
    )


def test_speed_against_scipy_cascade_printed():
    """Timing only (printed with `pytest -s`); the project benchmark asserts the ratio."""
    image = np.random.default_rng(5).normal(size=(1, 512, 512)).astype(np.float32)
    energy_bands(image)

    def best_of(fn, repeats=3):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    ours, reference = best_of(lambda: energy_bands(image)), best_of(lambda: scipy_cascade(image))
    ratio = reference / ours
    print(f"\nenergy_bands 512x512: {ours * 1e3:.1f} ms; scipy cascade: {reference * 1e3:.1f} ms; {ratio:.1f}x")
    np.testing.assert_allclose(energy_bands(image), scipy_cascade(image.astype(np.float64)), atol=1e-3)


# ------------------------------------------------------------------------------------------------ energies


def test_band_energies_regions_and_channels():
    rng = np.random.default_rng(6)
    bands = rng.normal(size=(6, 2, 10, 12))
    np.testing.assert_allclose(band_energies(bands), [b.std() for b in bands])
    np.testing.assert_allclose(band_energies(bands, per_channel=True), [[c.std() for c in b] for b in bands])
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:7, 3:9] = True
    np.testing.assert_allclose(band_energies(bands, mask=mask), [b[:, mask].std() for b in bands])
    np.testing.assert_allclose(band_energies(bands, mask=mask[None]), [b[:, mask].std() for b in bands])
    torch_energies = band_energies(torch.from_numpy(bands), mask=torch.from_numpy(mask), per_channel=True)
    np.testing.assert_allclose(torch_energies.numpy(), [[c[mask].std() for c in b] for b in bands])
    with pytest.raises(ValueError, match="no voxel"):
        band_energies(bands, mask=np.zeros((10, 12), dtype=bool))
    with pytest.raises(ValueError, match="mask shape"):
        band_energies(bands, mask=np.ones((5, 5), dtype=bool))


def test_recombine_bands():
    bands = np.random.default_rng(7).normal(size=(6, 1, 8, 8)).astype(np.float32)
    weights = [0.5, 1, 2, 0, 1, 3]
    expected = sum(w * b for w, b in zip(weights, bands))
    np.testing.assert_allclose(recombine_bands(bands, weights), expected, atol=1e-5)
    np.testing.assert_allclose(recombine_bands(torch.from_numpy(bands), weights).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(recombine_bands(bands), bands.sum(0))


# ------------------------------------------------------------------------------------------------ augmentation


def _image(shape=(1, 48, 40), seed=8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (ndi.gaussian_filter(rng.normal(size=shape), 1.5) * 400 + 300).astype(np.float32)


def _reference(mean, std, modality="XR") -> dict:
    return {"sigmas": list(SIGMAS), "modalities": {modality: {"mean": list(mean), "std": list(std), "n": 3}}}


def test_identity_when_reference_is_own_energies():
    image = _image()
    energies = band_energies(energy_bands(image))
    transform = EnergyBandAugmentd(reference=_reference(energies, [0.0] * 6))
    transform.set_random_state(0)
    out = transform({"image": image, "modality": "XR"})["image"]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, image, atol=1e-3)

    volume = MetaTensor(torch.from_numpy(_image((1, 24, 24, 6))), affine=torch.diag(torch.tensor([0.7, 0.7, 2.5, 1.0])))
    spacing = image_spacing_for_sigmas(volume, "relative")
    np.testing.assert_allclose(spacing, [1.0, 1.0, 2.5 / 0.7], rtol=1e-6)
    own = band_energies(energy_bands(volume, spacing=spacing)).numpy()
    transform = EnergyBandAugmentd(reference=_reference(own, [0.0] * 6, modality="CT"))
    out = transform({"image": volume, "modality": "CT"})["image"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, volume.affine)
    np.testing.assert_allclose(out.numpy(), volume.numpy(), atol=1e-3)


def test_sample_range_zero_normalises_to_reference_mean():
    image = _image()
    bands = energy_bands(image)
    energies = band_energies(bands)
    target = energies * np.array([1.5, 0.5, 2.0, 1.0, 0.8, 1.2])
    transform = EnergyBandAugmentd(reference=_reference(target, energies * 0.3), sample_range_sigma=0.0)
    out = transform({"image": image, "modality": "XR"})["image"]
    np.testing.assert_allclose(out, recombine_bands(bands, target / energies), atol=1e-3)


def test_truncated_sampling_stays_within_one_sigma():
    image = _image()
    bands = energy_bands(image)
    energies = band_energies(bands)
    mean, std = energies * 1.3, energies * 0.25
    transform = EnergyBandAugmentd(reference=_reference(mean, std), sample_range_sigma=1.0)
    transform.set_random_state(123)
    draws = []
    for _ in range(400):
        transform.randomize()
        draws.append(transform.scale_factors(energies, "XR") * energies)
    draws = np.asarray(draws)
    assert np.all(draws >= mean - std - 1e-9) and np.all(draws <= mean + std + 1e-9)
    z = (draws - mean) / std
    assert z.min() < -0.9 and z.max() > 0.9  # the whole interval is used ...
    assert abs(z.mean()) < 0.1 and 0.45 < z.std() < 0.65  # ... with a truncated-normal spread (std 0.54)
    # the transform applies exactly the drawn factors
    transform.set_random_state(5)
    out = transform({"image": image, "modality": "XR"})["image"]
    np.testing.assert_allclose(out, recombine_bands(bands, transform.scale_factors(energies, "XR")), atol=1e-3)


def test_deterministic_with_set_random_state():
    image = _image()
    transform = EnergyBandAugmentd(reference=_reference(band_energies(energy_bands(image)) * 1.1, [5.0] * 6))
    outputs = []
    for seed in (7, 7, 8):
        transform.set_random_state(seed)
        outputs.append(transform({"image": image, "modality": "XR"})["image"])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert np.abs(outputs[0] - outputs[2]).max() > 1e-3


def test_fallback_per_image_statistics_warns_once(caplog):
    image = _image()
    energies = band_energies(energy_bands(image))
    with caplog.at_level(logging.WARNING, logger="medssl.transforms.energy"):
        transform = EnergyBandAugmentd(fallback_std_fraction=0.2)
        transform.set_random_state(1)
        # issue 13 item 11: a DataLoader worker runs a copy of the transform (a fork per worker and epoch); the
        # copies warned again: 40 of the quick start's 152 lines
        for worker_copy in (transform, copy.deepcopy(transform), pickle.loads(pickle.dumps(transform))):
            for _ in range(2):
                out = worker_copy({"image": image, "modality": "MR"})["image"]
                scales = worker_copy.scale_factors(energies, "MR")
                assert np.all(scales >= 0.8 - 1e-9) and np.all(scales <= 1.2 + 1e-9)
    assert out.shape == image.shape and np.abs(out - image).max() > 1e-3
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "EnergyBandAugmentd: no reference energies were given (tools/energy_reference.py makes them)"
    ]

    caplog.clear()
    with_reference = EnergyBandAugmentd(reference=_reference(energies, [0.0] * 6, modality="CT"))
    with caplog.at_level(logging.WARNING, logger="medssl.transforms.energy"):
        with_reference({"image": image, "modality": "US"})
        with_reference({"image": image, "modality": "US"})
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "'US'" in messages[0]


@pytest.mark.parametrize("shape, spacing", [((6, 40, 36), None), ((4, 12, 10, 9), (1.0, 1.0, 2.5))])
def test_reflect_band_spectra_equal_the_bands_energies_and_recombination(shape, spacing):
    """The transform-domain evaluation (the batched augmentation's CPU path) is the bands' math rearranged: in
    float64 its energies per group of rows, its residual and any recombination equal band_energies / energy_bands /
    recombine_bands to 1e-12 (float64 rounding; a wrong multiplier, band order or DC handling is off by > 1e-3)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape) + np.arange(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))  # rows' means differ
    bands = energy_bands(x, spacing=spacing, dtype=np.float64)
    spectra = ReflectBandSpectra(x, SIGMAS, spacing)
    groups = 2
    per_group = shape[0] // groups
    expected = np.stack([band_energies(bands[:, g * per_group:(g + 1) * per_group]) for g in range(groups)], axis=1)
    np.testing.assert_allclose(spectra.energies(groups), expected, rtol=1e-12)
    np.testing.assert_allclose(spectra.energies(shape[0]), band_energies(bands, per_channel=True), rtol=1e-12)
    np.testing.assert_allclose(spectra.residual(), bands[0], atol=1e-12)
    np.testing.assert_allclose(spectra.row_means(), x.reshape(shape[0], -1).mean(axis=1), atol=1e-12)
    weights = rng.uniform(0.5, 1.5, size=(len(SIGMAS) + 1, shape[0]))
    np.testing.assert_allclose(spectra.recombine(weights), np.einsum("br...,br->r...", bands, weights), atol=1e-12)
    np.testing.assert_allclose(spectra.recombine(np.ones_like(weights)), x, atol=1e-12)  # the bands sum to x
    float32 = ReflectBandSpectra(x.astype(np.float32), SIGMAS, spacing)
    assert float32.recombine(weights).dtype == np.float32
    np.testing.assert_allclose(float32.energies(groups), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="do not split into 5 equal groups"):
        spectra.energies(5)
    with pytest.raises(ValueError, match="weights of shape"):
        spectra.recombine(weights[:3])
    with pytest.raises(ValueError, match="2 or 3 spatial axes"):
        ReflectBandSpectra(x.reshape(shape[0], -1))


def test_constant_band_guard_and_prob_zero():
    constant = np.full((1, 16, 16), 7.0, dtype=np.float32)
    transform = EnergyBandAugmentd(reference=_reference([1.0] * 6, [0.5] * 6))
    out = transform({"image": constant, "modality": "XR"})["image"]
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, constant, atol=1e-4)

    image = _image()
    skip = EnergyBandAugmentd(prob=0.0)
    assert skip({"image": image, "modality": "XR"})["image"] is image


def test_reference_file_roundtrip_and_errors(tmp_path):
    images = [(_image(seed=s), "XR") for s in range(3)] + [{"image": _image((1, 20, 20, 5), seed=9), "modality": "CT"}]
    reference = estimate_reference_energies(images, sigmas=SIGMAS, sigma_unit="voxel")
    assert reference["modalities"]["XR"]["n"] == 3 and reference["modalities"]["CT"]["n"] == 1
    table = np.stack([band_energies(energy_bands(img)) for img, _ in images[:3]])
    np.testing.assert_allclose(reference["modalities"]["XR"]["mean"], table.mean(0), rtol=1e-9)
    np.testing.assert_allclose(reference["modalities"]["XR"]["std"], table.std(0), rtol=1e-9)
    assert reference["modalities"]["CT"]["std"] == [0.0] * 6
    assert reference["bands"] == ["L16", "B16", "B8", "B4", "B2", "B1"]

    path = tmp_path / "energy_reference.json"
    path.write_text(json.dumps(reference))
    loaded = load_energy_reference(path)
    assert loaded["modalities"]["XR"]["mean"] == reference["modalities"]["XR"]["mean"]
    transform = EnergyBandAugmentd(reference=str(path), sigma_unit="voxel")
    assert transform.sigmas == [float(s) for s in SIGMAS]
    ct = images[3]["image"]
    np.testing.assert_allclose(transform({"image": ct, "modality": "CT"})["image"], ct, atol=1e-3)

    with pytest.raises(ValueError, match="energy_reference.json: field 'sigma_unit'"):
        EnergyBandAugmentd(reference=path, sigma_unit="relative")
    with pytest.raises(ValueError, match="energy_reference.json: field 'sigmas'"):
        EnergyBandAugmentd(reference=path, sigmas=(1, 2, 4), sigma_unit="voxel")
    broken = dict(reference, modalities={"XR": {"mean": [1.0] * 5, "std": [1.0] * 6, "n": 1}})
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"broken.json: field 'modalities.XR.mean'"):
        load_energy_reference(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_energy_reference(tmp_path / "missing.json")
