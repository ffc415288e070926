"""medssl.transforms.batched: exact results for fixed parameters, the per-item transforms' distributions over many
draws, and independence of the batch composition (issue #12)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import AdjustContrast, GaussianSmooth, RandGaussianNoise, RandFlip
from scipy import stats

from medssl.data.samplers import item_seeds
from medssl.transforms.batched import (
    BatchedMultiCrop,
    adjust_gamma,
    energy_band_augment,
    gaussian_blur,
    gaussian_noise,
    linear_intensity,
    resized_crops,
)
from medssl.transforms.energy import energy_bands
from medssl.transforms.intensity import RandGammad, RandLinearIntensityd
from medssl.transforms.views import MultiCropd

N_DRAWS = 4000


def images_2d(batch=3, channels=1, shape=(32, 48), seed=0):
    return torch.rand((batch, channels) + shape, generator=torch.Generator().manual_seed(seed))


def bilinear_reference(image: np.ndarray, start, region, size) -> np.ndarray:
    """Independent float64 statement of the documented map: output i samples source start + (i + .5) r / c − .5,
    linear interpolation per axis, coordinates clamped to the image (border)."""
    out = image.astype(np.float64)
    for axis, (s, r, c) in enumerate(zip(start, region, size)):
        n = out.shape[1 + axis]
        pos = np.clip(s + (np.arange(c) + 0.5) * r / c - 0.5, 0, n - 1)
        low = np.floor(pos).astype(int)
        high = np.minimum(low + 1, n - 1)
        frac = pos - low
        shape = [1] * out.ndim
        shape[1 + axis] = c
        out = np.take(out, low, axis=1 + axis) * (1 - frac).reshape(shape) + np.take(out, high, axis=1 + axis) * \
            frac.reshape(shape)
    return out


# ------------------------------------------------------------------------------------------------ fixed parameters
def test_whole_voxel_crop_equals_slicing_exactly():
    x = images_2d(2, 2, (64, 32))
    out = resized_crops(x, [[8, 4], [0, 16]], [[16, 8], [16, 8]], (16, 8))
    assert torch.equal(out[0], x[0, :, 8:24, 4:12]) and torch.equal(out[1], x[1, :, 0:16, 16:24])


@pytest.mark.parametrize("shape,size", [((32, 48), (12, 20)), ((20, 24, 16), (10, 8, 6))])
def test_resized_crops_match_an_independent_reference(shape, size):
    x = torch.rand((2, 1) + shape, generator=torch.Generator().manual_seed(3))
    starts = [[1.25] * len(shape), [3.5, 0.0, 2.75][: len(shape)]]
    regions = [[9.5, 17.0, 5.5][: len(shape)], [15.0, 11.25, 7.0][: len(shape)]]
    out = resized_crops(x, starts, regions, size)
    for b in range(2):
        expected = bilinear_reference(x[b].numpy(), starts[b], regions[b], size)
        np.testing.assert_allclose(out[b].numpy(), expected, atol=2e-6)


@pytest.mark.parametrize("shape,start,region,size", [((32, 40), (3, 5), (10, 12), (20, 24)),
                                                     ((16, 20, 12), (2, 3, 1), (8, 10, 6), (16, 20, 12))])
def test_upsampling_crop_equals_multicropd_extract(shape, start, region, size):
    """2x upsampling: equal inside; the outermost output voxels sample half a voxel outside the region, which
    MultiCropd clamps to the region's edge (it resizes the cut-out) and the batched crop reads from the image."""
    x = torch.rand((1,) + shape, generator=torch.Generator().manual_seed(1))
    expected = MultiCropd(keys="image", crops=[(1, size)]).extract(x, start, region, size)
    out = resized_crops(x[None], [start], [region], size)[0]
    inner = (slice(None),) + (slice(1, -1),) * len(size)
    torch.testing.assert_close(out[inner], expected[inner], atol=2e-6, rtol=0)
    assert not torch.allclose(out, expected, atol=1e-3)


def test_flip_mirrors_the_crop():
    x = images_2d(1, 1, (32, 32))
    plain = resized_crops(x, [[3.0, 5.0]], [[17.0, 11.0]], (9, 7))
    flipped = resized_crops(x, [[3.0, 5.0]], [[17.0, 11.0]], (9, 7), flip=[[True, False]])
    torch.testing.assert_close(flipped, torch.flip(plain, dims=[2]), atol=1e-6, rtol=0)
    assert torch.equal(torch.flip(RandFlip(prob=1.0, spatial_axis=0)(x[0]).as_tensor(), [1]), x[0])


def test_gamma_and_linear_equal_the_per_item_transforms():
    x = images_2d(3, 2, (16, 16)) * 3 - 1
    gammas = [0.45, 1.0, 2.3]
    out = adjust_gamma(x, gammas)
    for b, g in enumerate(gammas):
        expected = x[b] if g == 1.0 else AdjustContrast(gamma=g)(x[b]).as_tensor()
        torch.testing.assert_close(out[b], expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(out[1], x[1])
    linear = RandLinearIntensityd(keys="image")
    scales, offsets = [0.9, 1.0, 1.07], [0.15, 0.0, -0.2]
    out = linear_intensity(x, scales, offsets)
    for b in range(3):
        linear.scale, linear.offset_fraction = scales[b], offsets[b]
        torch.testing.assert_close(out[b], linear.apply(x[b]), atol=1e-6, rtol=1e-6)
    assert torch.equal(out[1], x[1])


@pytest.mark.parametrize("shape,sigmas", [((24, 20), [[0.6, 1.4], [1.5, 0.25]]),
                                          ((12, 10, 8), [[0.5, 1.0, 0.3], [1.2, 0.8, 1.5]])])
def test_blur_equals_monai_gaussian_smooth(shape, sigmas):
    x = torch.rand((2, 2) + shape, generator=torch.Generator().manual_seed(2))
    out = gaussian_blur(x, sigmas, max_sigma=1.5)
    for b in range(2):
        expected = GaussianSmooth(sigma=sigmas[b])(x[b])
        torch.testing.assert_close(out[b], torch.as_tensor(expected), atol=1e-6, rtol=1e-5)
    untouched = gaussian_blur(x, [[0.0] * len(shape), sigmas[1]], max_sigma=1.5)
    assert torch.equal(untouched[0], x[0])


def test_noise_is_the_seeded_reference_draw():
    x = images_2d(2, 1, (8, 8))
    out = gaussian_noise(x, [0.05, 0.0], [123, 456])
    expected = x[0] + 0.05 * torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(out[0], expected, atol=1e-7, rtol=0)
    assert torch.equal(out[1], x[1])


def test_apply_composes_the_steps_in_the_documented_order():
    t = BatchedMultiCrop(crops=[(2, 12)], flip_prob=0.5, blur_prob=0.7, noise_prob=0.7, gamma_prob=0.7,
                         linear_prob=0.7)
    x = images_2d(4, 1, (40, 40))
    seeds = [11, 12, 13, 14]
    crops = t(x, seeds)
    for out, p in zip(crops, t.draw(seeds, (40, 40))):
        expected = resized_crops(x, p.start, p.region, p.size, p.flip)
        expected = linear_intensity(adjust_gamma(expected, p.gamma), p.scale, p.offset_fraction)
        expected = gaussian_noise(gaussian_blur(expected, p.blur_sigma, max_sigma=1.5), p.noise_std, p.noise_seed)
        assert torch.equal(out, expected)


# ------------------------------------------------------------------------------------------------ distributions
def many_views(t: BatchedMultiCrop, shape, n=N_DRAWS):
    seeds = item_seeds(7, 0, np.arange(n))
    return t.draw(seeds, shape)


def test_crop_scale_and_aspect_match_multicropd():
    shape, size, scale = (384, 192), (64, 32), (0.1, 0.7)  # no side is clipped: the region keeps 2:1
    views = many_views(BatchedMultiCrop(crops=[(1, size)], scales=scale), shape)[0]
    covered = views.region.prod(axis=1) / np.prod(shape)
    per_item = MultiCropd(keys="image", crops=[(1, size)], scales=scale)
    per_item.set_random_state(seed=0)
    regions = np.array([per_item.draw_region(shape, size, scale)[1] for _ in range(N_DRAWS)], dtype=float)
    covered_ref = regions.prod(axis=1) / np.prod(shape)
    assert covered.min() >= 0.1 - 1e-9 and covered.max() <= 0.7 + 1e-9
    assert stats.kstest(covered, "uniform", args=(0.1, 0.6)).pvalue > 1e-3
    assert stats.ks_2samp(covered, covered_ref).pvalue > 1e-3
    np.testing.assert_allclose(views.region[:, 0] / views.region[:, 1], 2.0)  # the crop's proportions
    np.testing.assert_allclose(np.median(regions[:, 0] / regions[:, 1]), 2.0, rtol=0.05)
    # starts uniform over the free range, as MultiCropd's
    rel = views.start / (np.asarray(shape) - views.region)
    assert stats.kstest(rel[:, 0], "uniform").pvalue > 1e-3 and stats.kstest(rel[:, 1], "uniform").pvalue > 1e-3


def test_aspect_range_is_log_uniform():
    views = many_views(BatchedMultiCrop(crops=[(1, 32)], scales=(0.2, 0.3), ratio=(0.75, 4 / 3)), (512, 512))[0]
    log_aspect = np.log(views.region[:, 1] / views.region[:, 0])
    assert stats.kstest(log_aspect, "uniform", args=(np.log(0.75), np.log(4 / 3) - np.log(0.75))).pvalue > 1e-3
    np.testing.assert_allclose(views.region.prod(axis=1) / 512**2 >= 0.2 - 1e-9, True)


def test_3d_scale_covers_the_volume_fraction():
    views = many_views(BatchedMultiCrop(crops=[(1, (16, 8))], scales=(0.1, 0.5)), (64, 64, 48), n=2000)[0]
    covered = views.region.prod(axis=1) / (64 * 64 * 48)
    assert stats.kstest(covered, "uniform", args=(0.1, 0.4)).pvalue > 1e-3
    np.testing.assert_allclose(views.region[:, 0] / views.region[:, 2], 2.0)


def binomial_ok(successes, n, p):
    return stats.binomtest(int(successes), n, p).pvalue > 1e-3


def test_flip_rate_and_axes():
    views = many_views(BatchedMultiCrop(crops=[(1, 16)], flip_prob=0.3, flip_axes=(0,)), (32, 32))[0]
    assert binomial_ok(views.flip[:, 0].sum(), N_DRAWS, 0.3) and not views.flip[:, 1].any()
    flips = RandFlip(prob=0.3, spatial_axis=0)
    flips.set_random_state(0)
    rate = np.mean([flips.randomize(None) or flips._do_transform for _ in range(N_DRAWS)])
    assert abs(views.flip[:, 0].mean() - rate) < 0.04


def test_gamma_and_linear_parameters_match_the_per_item_transforms():
    views = many_views(BatchedMultiCrop(crops=[(1, 16)]), (32, 32))[0]
    gamma_t, linear_t = RandGammad(keys="image", prob=0.5), RandLinearIntensityd(keys="image", prob=0.5)
    gamma_t.set_random_state(0)
    linear_t.set_random_state(0)
    ref_gamma, ref_scale, ref_offset = [], [], []
    for _ in range(N_DRAWS):
        gamma_t.randomize()
        linear_t.randomize()
        ref_gamma.append(gamma_t.exponent)
        ref_scale.append(linear_t.scale)
        ref_offset.append(linear_t.offset_fraction)
    ref_gamma, ref_scale, ref_offset = map(np.asarray, (ref_gamma, ref_scale, ref_offset))
    g = views.gamma
    applied = g != 1.0
    assert binomial_ok(applied.sum(), N_DRAWS, 0.5)
    assert binomial_ok((g[applied] < 1).sum(), int(applied.sum()), 0.5)  # reciprocal half of the time
    above = g[g > 1]
    assert above.min() >= 1.8 and above.max() <= 2.6
    assert stats.kstest(above, "uniform", args=(1.8, 0.8)).pvalue > 1e-3
    assert (1 / g[g < 1]).min() >= 1.8 and (1 / g[g < 1]).max() <= 2.6
    assert stats.ks_2samp(g, ref_gamma).pvalue > 1e-3
    lin = views.scale != 1.0
    assert binomial_ok(lin.sum(), N_DRAWS, 0.5)
    assert views.scale[lin].min() >= 0.9 and views.scale[lin].max() <= 1.1
    assert np.abs(views.offset_fraction).max() <= 0.2
    assert stats.ks_2samp(views.scale, ref_scale).pvalue > 1e-3
    assert stats.ks_2samp(views.offset_fraction, ref_offset).pvalue > 1e-3


def test_blur_and_noise_parameters_match_monai():
    views = many_views(BatchedMultiCrop(crops=[(1, 16)], blur_prob=0.5, blur_sigma=(0.25, 1.5), noise_prob=0.5,
                                        noise_std=0.08), (32, 32))[0]
    blurred = views.blur_sigma[:, 0] > 0
    assert binomial_ok(blurred.sum(), N_DRAWS, 0.5)
    assert stats.kstest(views.blur_sigma[blurred].ravel(), "uniform", args=(0.25, 1.25)).pvalue > 1e-3
    noisy = views.noise_std > 0
    assert binomial_ok(noisy.sum(), N_DRAWS, 0.5)
    assert stats.kstest(views.noise_std[noisy], "uniform", args=(0, 0.08)).pvalue > 1e-3
    # MONAI's RandGaussianNoise(sample_std=True): std ~ U(0, std), read back from its noise over many voxels
    noise = RandGaussianNoise(prob=1.0, std=0.08, sample_std=True)
    noise.set_random_state(0)
    ref = []
    for _ in range(500):
        noise.randomize(np.zeros(4096))
        ref.append(float(np.std(noise.noise)))
    assert stats.ks_2samp(views.noise_std[noisy], ref).pvalue > 1e-3


# ------------------------------------------------------------------------------------------------ batch independence
@pytest.mark.parametrize("shape,crops", [((48, 40), [(2, 24), (3, 12)]), ((24, 24, 16), [(1, (16, 8)), (2, (8, 4))])])
def test_an_item_gets_the_same_views_alone_or_in_any_batch(shape, crops):
    t = BatchedMultiCrop(crops=crops, flip_prob=0.5, blur_prob=0.5, noise_prob=0.5)
    x = torch.rand((5, 1) + shape, generator=torch.Generator().manual_seed(4))
    seeds = item_seeds(0, 3, np.arange(5))
    full = t(x, seeds)
    alone = t(x[2:3], seeds[2:3])
    reordered = t(x[[4, 2, 0]], seeds[[4, 2, 0]])
    for a, b, c in zip(full, alone, reordered):
        assert torch.equal(a[2:3], b) and torch.equal(a[2], c[1])
    assert len(full) == sum(count for count, _ in crops)


def test_seeds_as_tensor_and_distinct_seeds_give_distinct_views():
    t = BatchedMultiCrop(crops=[(1, 8)])
    x = images_2d(2, 1, (32, 32))
    a = t(x, torch.tensor([5, 6]))
    b = t(x, [5, 6])
    assert torch.equal(a[0], b[0])
    p = t.draw([5, 6], (32, 32))[0]
    assert not np.allclose(p.start[0], p.start[1])


def test_bad_inputs_raise():
    t = BatchedMultiCrop(crops=[(1, 8)])
    with pytest.raises(ValueError, match="seeds"):
        t(images_2d(2), [1])
    with pytest.raises(ValueError):
        BatchedMultiCrop(crops=[(1, 8)], scales=(0.5, 1.5))
    with pytest.raises(ValueError):
        BatchedMultiCrop(crops=[(1, 8)], flip_prob=2.0)


# ------------------------------------------------------------------------------------------------ energy bands
def energy_transform(prob=1.0, **kwargs):
    from medssl.transforms import EnergyBandAugmentd

    return EnergyBandAugmentd(keys="image", prob=prob, **kwargs)


# a reference for "XR" only (factors e_ref / e: the energies matter), "CT" items take the per-image fallback
XR_REFERENCE = {"sigmas": [1, 2, 4, 8, 16], "modalities": {"XR": {"mean": [0.4, 0.1, 0.08, 0.06, 0.05, 0.04],
                                                                  "std": [0.05, 0.02, 0.02, 0.01, 0.01, 0.01], "n": 3}}}


def energy_transform_float64(transform, image: torch.Tensor, seed: int, modality) -> torch.Tensor | None:
    """The transform's definition for one image and seed evaluated in float64 (bands, energies, recombination), or
    None where the draw does not apply it."""
    from medssl.transforms.energy import band_energies, energy_bands, recombine_bands

    transform.set_random_state(seed=seed)
    transform.randomize(None)
    if not transform._do_transform:
        return None
    bands = energy_bands(image.double().numpy(), sigmas=transform.sigmas, mode=transform.mode, dtype=np.float64)
    factors = transform.scale_factors(band_energies(bands), modality, float(np.abs(bands[0]).max()))
    return torch.as_tensor(recombine_bands(bands, factors))


# border 'reflect' (the default) takes the transform-domain path on CPU, 'nearest' the bands path (as CUDA does)
@pytest.mark.parametrize("mode", ["reflect", "nearest"])
@pytest.mark.parametrize("reference", [None, XR_REFERENCE], ids=["per-image", "reference"])
@pytest.mark.parametrize("shape", [(2, 40, 36), (1, 16, 12, 10)])
def test_batched_energy_bands_equal_the_per_item_transform(shape, reference, mode):
    """The tolerance, float32 rounding: the batched result equals the transform's definition evaluated in float64
    within 2e-6 of the sample's largest |value| + 1e-5 relative (measured: at most 6e-7 of it). Without a reference
    (set A's default; the factors 1 + 0.2 z do not depend on the energies' rounding) it equals the per-item float32
    transform within 2e-6 + 1e-5 relative too; with one, the factors are e_ref / e and the per-item transform's
    float32 energies of a band far below the image's values lose digits (the σ=16 residual of a 16x12x10 volume:
    energy 1.6e-5, 5e-4 relative error, where the batched path's, from the float32 DCT by Parseval, keeps 1e-6).
    Samples the draw does not transform (prob 0.7) are returned exactly."""
    x = torch.rand((4,) + shape, generator=torch.Generator().manual_seed(5)) * 2 - 0.5
    seeds, modalities = [101, 202, 303, 404], ["XR", "CT", "XR", "XR"]
    options = {"prob": 0.7, "reference": reference, "sigma_unit": "voxel", "mode": mode}
    out = energy_band_augment(x, energy_transform(**options), seeds, modalities)
    item_t, definition_t = energy_transform(**options), energy_transform(**options)
    changed = unchanged = 0
    for b in range(4):
        item_t.set_random_state(seed=seeds[b])
        item = torch.as_tensor(item_t({"image": x[b], "modality": modalities[b]})["image"])
        expected = energy_transform_float64(definition_t, x[b], seeds[b], modalities[b])
        if expected is None:
            unchanged += 1
            assert torch.equal(out[b], x[b]) and torch.equal(item, x[b])
            continue
        scale = float(expected.abs().max())
        torch.testing.assert_close(out[b], expected.float(), atol=2e-6 * scale, rtol=1e-5)
        if reference is None:
            torch.testing.assert_close(out[b], item, atol=2e-6, rtol=1e-5)
        changed += int(not torch.allclose(expected.float(), x[b], atol=1e-4))
    assert changed >= 1 and unchanged >= 1


@pytest.mark.parametrize("mode", ["reflect", "nearest"])
def test_batched_energy_bands_noise_floor_of_near_constant_crops(mode):
    """Crops whose bands are at the transform's noise floor (1e-6 x max(largest energy, the residual's largest
    |value|)): a constant crop, one with a 1e-6 ripple and an ordinary crop, against the per-item transform."""
    y = torch.linspace(0, 1, 24)
    ripple = 3.0 + 1e-6 * torch.sin(y * 40).reshape(1, -1, 1) * torch.cos(y * 30).reshape(1, 1, -1)
    x = torch.stack([torch.full((1, 24, 24), 3.0), ripple, torch.rand((1, 24, 24), generator=torch.Generator())])
    seeds = [7, 8, 9]
    out = energy_band_augment(x, energy_transform(mode=mode), seeds, ["XR"] * 3)
    item_t = energy_transform(mode=mode)
    for b in range(3):
        item_t.set_random_state(seed=seeds[b])
        expected = torch.as_tensor(item_t({"image": x[b], "modality": "XR"})["image"])
        torch.testing.assert_close(out[b], expected, atol=2e-6, rtol=1e-5)
    assert torch.all(torch.isfinite(out))


def test_views_with_energy_bands_do_not_depend_on_the_batch():
    t = BatchedMultiCrop(crops=[(1, 24), (2, 12)], energy=energy_transform())
    x = images_2d(4, 1, (40, 40))
    seeds = item_seeds(1, 0, np.arange(4))
    full = t(x, seeds, ["XR", "MR", "CT", "XR"])
    alone = t(x[1:2], seeds[1:2], ["MR"])
    plain = BatchedMultiCrop(crops=[(1, 24), (2, 12)])(x, seeds)
    for a, b, c in zip(full, alone, plain):
        # the decomposition transforms the whole batch at once (matrix products): equal up to float rounding
        torch.testing.assert_close(a[1:2], b, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(a, c, atol=1e-4)  # the energy bands did change the crops


def test_collate_makes_the_views_in_the_workers_as_on_the_batch():
    import pickle

    from monai.data import DataLoader

    from medssl.transforms.batched import BatchedViewsCollate

    x = images_2d(6, 1, (24, 24))
    items = [{"image": x[i], "seed": int(s), "modality": "XR"} for i, s in enumerate(item_seeds(0, 0, np.arange(6)))]
    augment = BatchedMultiCrop(crops=[(1, 16), (2, 8)], flip_prob=0.5)
    collate = pickle.loads(pickle.dumps(BatchedViewsCollate(augment)))
    batches = list(DataLoader(items, batch_size=3, num_workers=0, collate_fn=collate))
    assert "image" not in batches[0] and len(batches[0]["crops"]) == 3
    expected = augment(x[3:], [it["seed"] for it in items[3:]])
    for a, b in zip(batches[1]["crops"], expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["reflect", "nearest"])
def test_batched_energy_bands_pass_the_residuals_largest_value(mode):
    """The factors get the low-pass residual's largest |value| (the transform's noise-floor input), which the
    transform-domain path brackets by the crop's |mean| and largest |value| and computes where the bracket leaves the
    factors open: here a transform whose factors are 1 + that value, so every crop needs it."""
    from medssl.transforms import EnergyBandAugmentd

    class PeakFactors(EnergyBandAugmentd):
        def scale_factors(self, energies, modality, magnitude=0.0):
            return np.full(len(energies), 1.0 + magnitude)

    x = torch.rand((3, 2, 20, 18), generator=torch.Generator().manual_seed(2)) * 2 - 1.0
    out = energy_band_augment(x, PeakFactors(mode=mode), [1, 2, 3], ["XR"] * 3)
    for b in range(3):
        peak = np.abs(energy_bands(x[b].numpy(), mode=mode)[0]).max()
        assert 0.0 < peak < float(x[b].abs().max())  # strictly inside the bracket: the crop's own peak would differ
        torch.testing.assert_close(out[b], x[b] * (1.0 + peak), atol=2e-6, rtol=1e-5)


def test_a_group_of_zero_crops_is_dropped_with_its_scale_range():
    t = BatchedMultiCrop(crops=[(2, 12), (0, 6)], scales=[(0.9, 1.0), (0.05, 0.1)])
    assert t.groups == [(2, 12)] and t.scales == [(0.9, 1.0)]
    crops = t(torch.rand(3, 1, 32, 32), [1, 2, 3])
    assert [tuple(c.shape) for c in crops] == [(3, 1, 12, 12)] * 2
    with pytest.raises(ValueError, match="with a crop"):
        BatchedMultiCrop(crops=[(0, 12)])
