"""medssl.data.slices: 2D slices of cached volumes (index mapping, content, affine, read-once caching, LRU with
grouped batches, foreground filtering, SampleKey seeding across DataLoader workers)."""

from __future__ import annotations

from collections import Counter

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, LoadImaged, MapTransform, RandFlipd, RandGaussianNoised
from PIL import Image
from torch.utils.data import DataLoader

from medssl.data.samplers import (
    DistributedBatchSampler,
    ModalityBatchSampler,
    SampleKey,
    SeededDataset,
    VolumeGroupedBatchSampler,
)
from medssl.data.slices import VolumeSliceDataset, make_slice_batch_sampler

DEPTHS = [4, 5, 3]
# affine with an oblique term: world x moves 0.5 mm per slice, so each axial slice has its own in-plane origin
AFFINE = np.array([[2.0, 0.0, 0.5, 10.0], [0.0, 3.0, 0.0, 20.0], [0.0, 0.0, 4.0, 30.0], [0, 0, 0, 1]])


class CountingLoadImaged(MapTransform):
    """LoadImaged(ensure_channel_first) that counts reads per file (in this process)."""

    reads: Counter = Counter()

    def __init__(self):
        super().__init__(keys=["image"])
        self.loader = LoadImaged(keys="image", ensure_channel_first=True, image_only=True)

    def __call__(self, data):
        type(self).reads[str(data["image"])] += 1
        return self.loader(data)


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    """3 NIfTI volumes (6, 5, D) and 2 PNG images (loaded as (1, 6, 5)); volume 2 has an empty slice 0 and a
    10 %-foreground slice 2."""
    root = tmp_path_factory.mktemp("slices")
    rng = np.random.default_rng(0)
    items, arrays = [], []
    for v, (depth, modality) in enumerate(zip(DEPTHS, ["CT", "MR", "CT"])):
        data = rng.uniform(1.0, 2.0, size=(6, 5, depth)).astype(np.float32)
        if v == 2:
            data[..., 0] = 0.0
            data[..., 2] = 0.0
            data[0, :3, 2] = 1.5  # 3 of 30 pixels
        path = root / f"vol{v}.nii.gz"
        nib.save(nib.Nifti1Image(data, AFFINE), str(path))
        items.append({"image": str(path), "modality": modality, "dim": 3})
        arrays.append(data)
    for i in range(2):
        img = rng.integers(1, 255, size=(5, 6), dtype=np.uint8)
        path = root / f"img{i}.png"
        Image.fromarray(img).save(path)
        items.append({"image": str(path), "modality": "XR", "dim": 2})
        arrays.append(None)
    return items, arrays


def _dataset(items, **kwargs):
    CountingLoadImaged.reads.clear()
    return VolumeSliceDataset(items, Compose([CountingLoadImaged()]), **kwargs)


def _as_list(batch):
    return batch


def _images(batch):
    return torch.stack([torch.as_tensor(s["image"]) for s in batch])


def test_index_mapping_content_and_keys(datalist):
    items, arrays = datalist
    ds = _dataset(items)
    assert len(ds) == sum(DEPTHS) + 2
    expected = {(v, s) for v, d in enumerate(DEPTHS) for s in range(d)} | {(3, -1), (4, -1)}
    assert {ds.locate(j) for j in range(len(ds))} == expected
    assert ds.modalities == [items[v]["modality"] for v in ds.volume_ids.tolist()]
    loader = LoadImaged(keys="image", ensure_channel_first=True, image_only=True)
    for j in range(len(ds)):
        v, s = ds.locate(j)
        sample = ds[j]
        assert (sample["volume_index"], sample["slice_index"], sample["dim"]) == (v, s, 2)
        assert sample["modality"] == items[v]["modality"]
        image = sample["image"]
        assert image.shape == (1, 6, 5)
        if s >= 0:  # the axial slice (last spatial axis) of the channel-first volume
            np.testing.assert_array_equal(image[0].numpy(), arrays[v][:, :, s])
            affine = image.affine.numpy()
            np.testing.assert_allclose(affine[:2, :2], AFFINE[:2, :2])
            np.testing.assert_allclose(affine[:2, 2], [10.0 + 0.5 * s, 20.0])  # the slice's own origin
            assert image.meta["slice_index"] == s and list(image.meta["spatial_shape"]) == [6, 5]
        else:  # a 2D item passes through as loaded
            np.testing.assert_array_equal(image.numpy(), loader({"image": items[v]["image"]})["image"].numpy())


def test_slice_axis_zero(datalist):
    items, arrays = datalist
    ds = _dataset(items[:3], slice_axis=0)
    assert len(ds) == 3 * 6
    for j in (0, 7, 17):
        v, s = ds.locate(j)
        np.testing.assert_array_equal(ds[j]["image"][0].numpy(), arrays[v][s])
        assert ds[j]["image"].shape == (1, 5, DEPTHS[v])


def test_each_volume_read_once_with_cache(datalist):
    items, _ = datalist
    ds = _dataset(items, cache_rate=1.0)
    assert not ds.lru_limited
    assert CountingLoadImaged.reads == Counter(it["image"] for it in items)  # read once, at construction
    sampler = make_slice_batch_sampler(ds, 4, seed=1, drop_last=False, rank=0, world_size=1)
    assert isinstance(sampler, DistributedBatchSampler) and not isinstance(sampler, VolumeGroupedBatchSampler)
    seen = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for batch in DataLoader(SeededDataset(ds), batch_sampler=sampler, collate_fn=_as_list):
            seen += [(s["volume_index"], s["slice_index"]) for s in batch]
    assert set(seen) == {ds.locate(j) for j in range(len(ds))}
    assert CountingLoadImaged.reads == Counter(it["image"] for it in items)  # iterating all slices read nothing


def test_lru_reads_once_per_volume_with_grouped_batches(datalist):
    items, _ = datalist
    depths = DEPTHS + [None, None]
    ds = _dataset(items, cache_rate=0.0, cache_size=1, depths=depths)
    assert ds.lru_limited and sum(CountingLoadImaged.reads.values()) == 0  # depths given: nothing read yet
    sampler = make_slice_batch_sampler(ds, 2, seed=3, drop_last=False, rank=0, world_size=1)
    assert isinstance(sampler, VolumeGroupedBatchSampler) and len(sampler) == 7  # 14 samples, no padding
    n = sum(len(b) for b in DataLoader(ds, batch_sampler=sampler, collate_fn=_as_list))
    assert n == len(ds) == 14
    assert CountingLoadImaged.reads == Counter(it["image"] for it in items)  # one read per volume / image
    # the same LRU with slices in random order re-reads volumes
    ds = _dataset(items, cache_rate=0.0, cache_size=1, depths=depths)
    random_order = make_slice_batch_sampler(ds, 2, seed=3, rank=0, world_size=1, group_by_volume=False)
    for _ in DataLoader(ds, batch_sampler=random_order, collate_fn=_as_list):
        pass
    assert sum(CountingLoadImaged.reads.values()) > len(items)
    # without depths the uncached items are read once at construction to measure them
    ds = _dataset(items, cache_rate=0.0, cache_size=1)
    assert CountingLoadImaged.reads == Counter(it["image"] for it in items) and len(ds) == 14


def test_min_foreground_and_slices_per_volume(datalist):
    items, _ = datalist
    ds = _dataset(items, min_foreground=0.5)
    assert sorted(ds.locate(j) for j in range(len(ds)) if ds.locate(j)[0] == 2) == [(2, 1)]  # slices 0, 2 dropped
    assert len(ds) == 4 + 5 + 1 + 2
    ds = _dataset(items, min_foreground=0.05, slices_per_volume=2)  # 10 % slice kept, empty one not
    per_volume = {v: sorted(s for (u, s) in map(ds.locate, range(len(ds))) if u == v) for v in range(5)}
    assert per_volume == {0: [0, 3], 1: [0, 4], 2: [1, 2], 3: [-1], 4: [-1]}  # evenly spaced, ends included
    with pytest.warns(UserWarning, match="no slice with foreground"):
        ds = _dataset(items, min_foreground=1.5)
    assert len(ds) == 2 and ds.num_slices == [0, 0, 0, 1, 1]


def test_errors_name_the_problem(datalist):
    items, _ = datalist
    with pytest.raises(ValueError, match="RandFlipd"):
        VolumeSliceDataset(items, Compose([CountingLoadImaged(), RandFlipd(keys="image", prob=0.5)]))
    bad = [dict(items[0], dim=2)]
    with pytest.raises(ValueError, match=r"train\.json item 0: .*vol0\.nii\.gz: dim=2 .*3 spatial dims"):
        VolumeSliceDataset(bad, Compose([CountingLoadImaged()]), source="train.json")
    with pytest.raises(ValueError, match="slice_axis=3"):
        VolumeSliceDataset(items, Compose([CountingLoadImaged()]), slice_axis=3)


def test_cached_volume_is_never_modified(datalist):
    items, arrays = datalist
    ds = _dataset(items)
    for j in (0, len(ds) - 1):  # a slice and a 2D item
        before = ds[j]["image"].clone()
        sample = ds[j]
        sample["image"] += 1000.0
        assert torch.equal(ds[j]["image"], before)


def _slice_transform():
    return Compose([RandGaussianNoised(keys="image", prob=1.0, std=0.5), RandFlipd(keys="image", prob=0.5)])


def test_sample_key_seeding_same_across_workers(datalist):
    items, _ = datalist
    ds = _dataset(items, slice_transform=_slice_transform(), cache_rate=0.5, cache_size=2)
    assert ds.lru_limited
    key = SampleKey(5, 1234)
    a, b = ds[key], ds[key]
    assert torch.equal(a["image"], b["image"])
    assert torch.equal(SeededDataset(ds)[key]["image"], a["image"])  # SeededDataset reseeds ds.transform
    assert not torch.equal(ds[SampleKey(5, 1235)]["image"], a["image"])

    sampler = ModalityBatchSampler(ds.modalities, 2, seed=7, drop_last=False, rank=0, world_size=1)
    results = []
    for workers, persistent in [(0, False), (2, False), (2, True)]:
        kwargs = dict(persistent_workers=persistent) if workers else {}
        loader = DataLoader(
            SeededDataset(ds), batch_sampler=sampler, num_workers=workers, collate_fn=_images, **kwargs
        )
        out = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            out += list(loader)
        results.append(torch.cat(out))
    assert results[0].shape[0] == 2 * len(sampler) * 2
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
