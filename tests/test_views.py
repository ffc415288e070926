"""Multi-crop view generation (medssl.transforms.views): Table I crops for 2D and 3D, resized / padded crops,
determinism through set_random_state and SeededDataset, collation, and Ghesu et al.'s augmentation set A."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import Dataset, MetaTensor, list_data_collate
from monai.transforms import Compose, MapTransform, RandomizableTransform
from torch.utils.data import default_collate

import medssl.transforms as transforms
from medssl.data.samplers import SampleKey, SeededDataset
from medssl.transforms.energy import EnergyBandAugmentd
from medssl.transforms.intensity import RandGammad, RandLinearIntensityd
from medssl.transforms.views import (
    MULTICROP_SCALE_RANGE,
    MultiCropd,
    expand_crop_size,
    swav_intensity_augmentations,
    multicrop_views,
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class AddRandomConstantd(RandomizableTransform, MapTransform):
    """Test augmentation: adds one value drawn from self.R per call (reveals per-crop draws and reseeding)."""

    def __init__(self, keys="image"):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, 1.0)
        self.values = []

    def __call__(self, data):
        d = dict(data)
        value = float(self.R.uniform(0, 100))
        self.values.append(value)
        for key in self.key_iterator(d):
            d[key] = d[key] + value
        return d


def image2d(shape=(1, 40, 36), seed=0):
    return MetaTensor(torch.from_numpy(np.random.default_rng(seed).random(shape).astype(np.float32)))


def sample(image, modality="XR"):
    return {"image": image, "modality": modality, "dim": image.ndim - 1}


# ------------------------------------------------------------------------------------------------ configuration
def test_table1_defaults_and_size_reading():
    groups_2d = multicrop_views(2).groups_for(2)
    assert [(c, s) for c, s, _ in groups_2d] == [(2, (224, 224)), (6, (92, 92))]
    groups_3d = multicrop_views(3).groups_for(3)
    # (224, 192) / (112, 96) = (in-plane, depth): X, Y in-plane, depth Z last
    assert [(c, s) for c, s, _ in groups_3d] == [(1, (224, 224, 192)), (4, (112, 112, 96))]
    assert all(scale == MULTICROP_SCALE_RANGE == (0.1, 0.7) for _, _, scale in groups_2d + groups_3d)
    assert expand_crop_size((224, 192), 3) == (224, 224, 192)
    assert expand_crop_size((20, 30), 2) == (20, 30) and expand_crop_size(7, 3) == (7, 7, 7)
    with pytest.raises(ValueError, match="does not fit a 2D image"):
        expand_crop_size((1, 2, 3), 2)
    with pytest.raises(ValueError, match="no crops configured for 2D"):
        multicrop_views(3, sizes=[(8, 4), (4, 2)])(sample(image2d()))
    with pytest.raises(ValueError, match="count"):
        MultiCropd(crops=((0, 8),))
    with pytest.raises(ValueError, match="scales"):
        MultiCropd(crops=((1, 8), (2, 4)), scales=[(0.1, 0.5)] * 3)
    with pytest.raises(ValueError, match="0 < low <= high <= 1"):
        MultiCropd(crops=((1, 8),), scales=(0.5, 1.5))


def test_full_size_2d_table1_crops():
    transform = multicrop_views(2, augment=Compose([]))
    transform.set_random_state(0)
    out = transform(sample(image2d((1, 300, 260))))
    assert "image" not in out and out["modality"] == "XR"
    assert [tuple(c.shape) for c in out["crops"]] == [(1, 224, 224)] * 2 + [(1, 92, 92)] * 6


# ------------------------------------------------------------------------------------------------ shapes, regions
def test_2d_and_3d_shapes_counts_and_mixed_dims():
    transform = multicrop_views((2, 3), sizes={2: [16, 8], 3: [(12, 6), (8, 4)]}, augment=Compose([]))
    transform.set_random_state(1)
    out2 = transform(sample(image2d((1, 40, 36))))
    assert [tuple(c.shape) for c in out2["crops"]] == [(1, 16, 16)] * 2 + [(1, 8, 8)] * 6
    volume = MetaTensor(torch.rand(2, 30, 28, 14))
    out3 = transform(sample(volume, "CT"))
    assert [tuple(c.shape) for c in out3["crops"]] == [(2, 12, 12, 6)] + [(2, 8, 8, 4)] * 4
    assert all(c.dtype == torch.float32 for c in out3["crops"])
    kept = MultiCropd(crops=((1, 8),), keep_source=True, out_key="views")(sample(image2d()))
    assert "image" in kept and len(kept["views"]) == 1
    # JSON-style string keys
    json_style = MultiCropd(crops={"2": [[1, 8]], "3": [[1, [6, 3]]]}, scales={"2": None, "3": [0.2, 0.4]})
    assert [tuple(c.shape) for c in json_style(sample(MetaTensor(torch.rand(1, 10, 10, 10))))["crops"]] == [
        (1, 6, 6, 3)
    ]


def test_resized_regions_cover_a_fraction_s_with_crop_proportions():
    transform = MultiCropd(crops=((30, (20, 10)),), scales=(0.1, 0.7))
    transform.set_random_state(2)
    shape = (400, 300)
    transform(sample(image2d((1,) + shape)))
    fractions = []
    for start, region in transform.last_regions:
        fraction = region[0] * region[1] / (shape[0] * shape[1])
        fractions.append(fraction)
        assert 0.1 * 0.97 <= fraction <= 0.7 * 1.03
        assert region[0] / region[1] == pytest.approx(2.0, rel=0.05)  # the crop's 2:1 proportions
        assert all(0 <= s and s + r <= n for s, r, n in zip(start, region, shape))
    assert min(fractions) < 0.2 and max(fractions) > 0.6


def test_resampled_values_follow_the_crop_affine():
    """Area downsampling by 2 of a ramp gives the ramp at the crop voxel centres mapped by the crop affine."""
    x = torch.arange(32, dtype=torch.float32).reshape(32, 1).expand(32, 24)
    spacing = torch.diag(torch.tensor([0.5, 0.8, 1.0, 1.0], dtype=torch.float64))
    image = MetaTensor(x[None].clone(), affine=spacing)
    transform = MultiCropd(crops=((1, 8),))
    crop = transform.extract(image, start=(4, 2), region=(16, 16), crop_size=(8, 8))
    assert isinstance(crop, MetaTensor) and crop.applied_operations == []
    voxel_centres = torch.stack([torch.arange(8.0, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)])
    homogeneous = torch.cat([voxel_centres, torch.zeros(1, 8, dtype=torch.float64), torch.ones(1, 8)], 0)
    world = crop.affine @ homogeneous
    source_x = world[0] / 0.5  # back to source voxel index along x
    np.testing.assert_allclose(crop[0, :, 0].numpy(), source_x.numpy(), atol=1e-5)
    np.testing.assert_allclose(crop.pixdim.numpy(), [1.0, 1.6])
    # plain crop at native resolution: the exact values, a copy (not a view of the source)
    plain = transform.extract(image, start=(3, 5), region=(8, 8), crop_size=(8, 8))
    assert torch.equal(plain.as_tensor(), image.as_tensor()[:, 3:11, 5:13])
    assert plain.untyped_storage().data_ptr() != image.untyped_storage().data_ptr()


def test_pad_when_image_smaller_than_crop():
    image = torch.full((1, 10, 30), 3.0)
    image[0, 0, 0] = 1.0  # minimum
    transform = MultiCropd(crops=((4, 16),), scales=None, pad_value=-5.0)
    transform.set_random_state(0)
    out = transform({"image": image})
    offsets = set()
    for crop, (start, region) in zip(out["crops"], transform.last_regions):
        assert crop.shape == (1, 16, 16) and region == (16, 16)
        assert int((crop == -5.0).sum()) == (16 - 10) * 16  # rows outside the image, every column inside
        assert -6 <= start[0] <= 0 and 0 <= start[1] <= 14
        offsets.add(start[0])
    assert len(offsets) > 1  # the image lands at random offsets inside the crop
    minimum = MultiCropd(crops=((1, (16, 16)),), scales=None).set_random_state(1)({"image": image})["crops"][0]
    assert float(minimum.min()) == 1.0 and int((minimum == 1.0).sum()) >= (16 - 10) * 16
    volume = torch.rand(1, 12, 12, 3).numpy()  # numpy input, too thin along depth
    crop3 = MultiCropd(crops=((1, (8, 8, 6)),), scales=None)({"image": volume})["crops"][0]
    assert isinstance(crop3, torch.Tensor) and crop3.shape == (1, 8, 8, 6)


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_crops_different_seed_different():
    def run(seed):
        transform = multicrop_views(2, sizes=[12, 6], counts=[2, 3])
        transform.set_random_state(seed)
        return transform(sample(image2d()))["crops"]

    first, again, other = run(11), run(11), run(12)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_set_random_state_reseeds_the_inner_augmentation():
    augment = AddRandomConstantd()
    transform = MultiCropd(crops=((3, 8),), scales=None, augment=augment)
    image = torch.zeros(1, 8, 8)  # crop regions cannot differ: only the augmentation can
    transform.set_random_state(4)
    first = [float(c.mean()) for c in transform({"image": image})["crops"]]
    assert len(set(first)) == 3  # an independent draw per crop
    advanced = [float(c.mean()) for c in transform({"image": image})["crops"]]
    assert advanced != first  # without reseeding the streams move on
    transform.set_random_state(4)
    assert [float(c.mean()) for c in transform({"image": image})["crops"]] == first


def test_seeded_dataset_fixes_crops_and_augmentations():
    images = [image2d((1, 30, 26), seed=i) for i in range(3)]
    data = [sample(img) for img in images]
    pipeline = Compose([multicrop_views(2, sizes=[12, 6], counts=[2, 2])])
    dataset = SeededDataset(Dataset(data, transform=pipeline))
    first = dataset[SampleKey(0, 7)]["crops"]
    dataset[SampleKey(1, 3)]  # another item in between must not matter
    dataset[1]  # nor an unseeded access
    again = dataset[SampleKey(0, 7)]["crops"]
    other = dataset[SampleKey(0, 8)]["crops"]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


# ------------------------------------------------------------------------------------------------ batching, errors
@pytest.mark.parametrize("collate", [default_collate, list_data_collate])
def test_collation_gives_one_batch_tensor_per_crop_index(collate):
    transform = multicrop_views(2, sizes=[10, 6], counts=[2, 3], augment=Compose([]))
    batch = collate([transform(sample(image2d((1, 25 + i, 21), seed=i))) for i in range(4)])
    assert isinstance(batch["crops"], list) and len(batch["crops"]) == 5
    assert [tuple(t.shape) for t in batch["crops"]] == [(4, 1, 10, 10)] * 2 + [(4, 1, 6, 6)] * 3
    assert list(batch["modality"]) == ["XR"] * 4


def test_augment_that_changes_the_shape_is_refused():
    def shrink(d):
        return {**d, "image": d["image"][:, :4]}

    with pytest.raises(ValueError, match="changed crop group 0's shape"):
        MultiCropd(crops=((1, 8),), augment=shrink)(sample(image2d()))


# ------------------------------------------------------------------------------------------------ augmentation set A
def test_set_a_augmentation_order_and_modality_reaches_energy_bands():
    compose = swav_intensity_augmentations(2)
    assert [type(t) for t in compose.transforms] == [EnergyBandAugmentd, RandGammad, RandLinearIntensityd]
    gamma, linear = compose.transforms[1], compose.transforms[2]
    assert gamma.gamma_range == (1.8, 2.6) and linear.a_range == (0.9, 1.1) and linear.b_fraction == 0.2
    # with a reference and no spread (r = 0) each crop is normalised to the reference of the item's modality;
    # without one (modality not passed on) r = 0 would leave the crop unchanged
    reference = {
        "sigmas": [1.0, 2.0],
        "modalities": {"XR": {"mean": [0.3, 0.2, 0.1], "std": [0, 0, 0], "n": 1}},
    }
    normalise = EnergyBandAugmentd(reference=reference, sample_range_sigma=0.0)
    augmented = MultiCropd(crops=((2, 16),), augment=Compose([normalise])).set_random_state(0)
    plain = MultiCropd(crops=((2, 16),)).set_random_state(0)  # same seed: same regions
    image = sample(image2d((1, 40, 36)))
    for crop, raw in zip(augmented(image)["crops"], plain(image)["crops"]):
        expected = normalise.augment(raw, "XR")
        np.testing.assert_allclose(crop.numpy(), expected.numpy(), atol=1e-6)
        assert not torch.allclose(crop, raw, atol=1e-3)
    with pytest.raises(ValueError, match="spatial_dims"):
        swav_intensity_augmentations(4)


def test_full_table_i_pipeline_on_a_volume_with_reference_file(tmp_path):
    import json

    path = tmp_path / "ref.json"
    path.write_text(
        json.dumps(
            {
                "sigmas": [1, 2, 4, 8, 16],
                "sigma_unit": "relative",
                "mode": "reflect",
                "modalities": {"CT": {"mean": [0.1, 0.05, 0.04, 0.03, 0.02, 0.01], "std": [0.01] * 6, "n": 3}},
            }
        )
    )
    spacing = torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0], dtype=torch.float64))
    volume = MetaTensor(torch.rand(1, 24, 24, 10), affine=spacing)
    transform = multicrop_views(3, sizes=[(12, 6), (8, 4)], energy_reference=str(path))
    transform.set_random_state(3)
    crops = transform(sample(volume, "CT"))["crops"]
    assert [tuple(c.shape) for c in crops] == [(1, 12, 12, 6)] + [(1, 8, 8, 4)] * 4
    assert all(torch.isfinite(c).all() for c in crops)


@pytest.mark.gpu
def test_cuda_crops_and_augmentations_stay_on_the_device():
    image = MetaTensor(torch.rand(1, 40, 36, device="cuda"))
    transform = multicrop_views(2, sizes=[16, 8], counts=[2, 2])
    transform.set_random_state(0)
    crops = transform(sample(image))["crops"]
    assert all(c.is_cuda and c.shape[1:] in ((16, 16), (8, 8)) for c in crops)
    cpu = multicrop_views(2, sizes=[16, 8], counts=[2, 2]).set_random_state(0)(sample(image.cpu()))["crops"]
    for a, b in zip(crops, cpu):
        np.testing.assert_allclose(a.cpu().numpy(), b.numpy(), atol=1e-4)


def test_view_nuisance_augmentations_flip_blur_noise_and_reproducible():
    from medssl.transforms import view_nuisance_augmentations

    image = torch.zeros(1, 16, 16)
    image[0, :4, :] = 1.0  # a bright band at low X: a left-right flip (axis 0) moves it to high X
    flip_only = view_nuisance_augmentations(2, flip_prob=1.0, blur_prob=0.0, noise_prob=0.0)
    out = flip_only({"image": image.clone()})["image"]
    assert torch.equal(torch.as_tensor(out), torch.flip(image, dims=[1]))
    blur_only = view_nuisance_augmentations(2, flip_prob=0.0, blur_prob=1.0, noise_prob=0.0, blur_sigma=(1.0, 1.0))
    blurred = torch.as_tensor(blur_only({"image": image.clone()})["image"])
    assert 0.0 < blurred[0, 4, 8] < 0.5 < blurred[0, 3, 8] < 1.0  # the band's edge is softened both ways
    noisy = view_nuisance_augmentations(2, flip_prob=0.0, blur_prob=0.0, noise_prob=1.0, noise_std=0.1)
    noisy.set_random_state(3)
    a = torch.as_tensor(noisy({"image": image.clone()})["image"])
    noisy.set_random_state(3)
    b = torch.as_tensor(noisy({"image": image.clone()})["image"])
    assert torch.equal(a, b) and not torch.equal(a, image) and float((a - image).std()) < 0.1
    volume = view_nuisance_augmentations(3)({"image": torch.rand(1, 8, 8, 4)})["image"]
    assert tuple(volume.shape) == (1, 8, 8, 4)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        view_nuisance_augmentations(1)


def test_the_old_paper_numbered_names_still_work_and_warn():
    with pytest.warns(DeprecationWarning, match="multicrop_views"):
        old = transforms.seed002_multicrop(2)
    assert old.groups_for(2) == multicrop_views(2).groups_for(2)
    with pytest.warns(DeprecationWarning, match="swav_intensity_augmentations"):
        transforms.seed002_augmentations(2)
    with pytest.warns(DeprecationWarning):
        assert transforms.SEED002_SCALE_RANGE == MULTICROP_SCALE_RANGE


def test_a_group_of_zero_crops_is_dropped_with_its_scale_range():
    """SwAV's 2-crop setting (``n_small_crops`` 0): the empty group and its scale range go, the others stay."""
    transform = multicrop_views(2, sizes=[16, 8], counts=[2, 0], scales=[(0.9, 1.0), (0.05, 0.1)], augment=Compose([]))
    assert transform.groups_for(2) == [(2, (16, 16), (0.9, 1.0))]
    transform.set_random_state(0)
    assert [tuple(c.shape) for c in transform(sample(image2d((1, 40, 36))))["crops"]] == [(1, 16, 16)] * 2
    with pytest.raises(ValueError, match="every count is 0"):
        MultiCropd(crops=((0, 8), (0, 4)))
    with pytest.raises(ValueError, match=r"count must be an int >= 0, got -1"):
        MultiCropd(crops=((2, 8), (-1, 4)))
