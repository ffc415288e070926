"""The decoded-item cache of the pretraining data path (make_dataset(cache_dir=...), issue #12): results equal the
uncached path, entries are keyed by file content + preprocessing, and cache hits do not decode."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose

from medssl.data import SampleKey, load_items
from medssl.data import pipeline as pipeline_mod
from medssl.data.pipeline import item_fingerprint, loading_transforms, make_dataset, transform_fingerprint
from medssl.transforms import ClassLabeld, MultiCropd, PlainTensord

from conftest import BUNDLES


def items_2d(demo_datalist, n=6):
    return load_items(demo_datalist, "training", dims=[2], keys=["image", "modality", "dim", "label"], max_items=n)


def crop_pipeline():
    crops = MultiCropd(keys="image", crops=[(2, 24), (2, 12)], scales=(0.2, 0.6))
    return Compose(loading_transforms(channels=1) + [ClassLabeld(keys="label"), crops, PlainTensord(keys="crops")])


def test_cached_path_equals_the_uncached_path_and_hits_do_not_decode(demo_datalist, tmp_path, monkeypatch):
    items = items_2d(demo_datalist)
    keys = [SampleKey(i, 1000 + i) for i in range(len(items))]
    reference = [make_dataset(items, crop_pipeline())[k] for k in keys]
    cached = make_dataset(items, crop_pipeline(), cache_dir=tmp_path / "cache")
    first = [cached[k] for k in keys]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == len(items)

    def no_decoding(self, data):
        raise AssertionError("a cache hit decoded the file")

    monkeypatch.setattr(pipeline_mod.LoadMedicalImaged, "__call__", no_decoding)
    second = [cached[k] for k in keys]
    for ref, a, b in zip(reference, first, second):
        assert len(ref["crops"]) == 4
        for x, y, z in zip(ref["crops"], a["crops"], b["crops"]):
            assert torch.equal(x, y) and torch.equal(x, z)
        assert ref["label"] == a["label"] == b["label"]


def test_working_size_gives_square_batchable_items_and_the_seed(demo_datalist, tmp_path):
    items = items_2d(demo_datalist, 4)
    front = Compose(loading_transforms(channels=1, working_size=40) + [PlainTensord(keys="image")])
    ds = make_dataset(items, front, cache_dir=tmp_path / "c", seed_key="seed")
    for i in range(len(items)):
        sample = ds[SampleKey(i, 77 + i)]
        assert tuple(sample["image"].shape) == (1, 40, 40) and sample["seed"] == 77 + i
    assert "seed" not in ds[0]


def test_working_size_keeps_the_aspect_and_pads_at_the_end():
    front = Compose(loading_transforms(channels=1, intensity=False, working_size=20)[2:])  # resize + pad only
    image = torch.arange(40 * 10, dtype=torch.float32).reshape(1, 40, 10) + 1
    out = front({"image": image})["image"]
    assert tuple(out.shape) == (1, 20, 20)
    assert float(out[:, :, 5:].abs().max()) == 0.0 and float(out[:, :, :5].min()) > 0


def test_entries_are_keyed_by_content_not_path(demo_datalist, tmp_path):
    item = items_2d(demo_datalist, 1)[0]
    src = tmp_path / "a" / ("img" + "".join(Path(item["image"]).suffixes))
    src.parent.mkdir()
    shutil.copyfile(item["image"], src)
    moved = tmp_path / "b" / src.name
    moved.parent.mkdir()
    shutil.copyfile(src, moved)
    key = item_fingerprint({**item, "image": str(src)})
    assert key == item_fingerprint({**item, "image": str(moved)})  # a moved dataset keeps its entries
    assert key != item_fingerprint({**item, "image": str(src), "modality": "MR"})
    other = items_2d(demo_datalist, 2)[1]
    shutil.copyfile(other["image"], src)  # edited in place: new content, new key
    assert item_fingerprint({**item, "image": str(src)}) != key


def test_preprocessing_changes_the_key_and_equal_preprocessing_does_not():
    a = transform_fingerprint(loading_transforms(channels=1, working_size=64))
    assert a == transform_fingerprint(loading_transforms(channels=1, working_size=64))
    assert a != transform_fingerprint(loading_transforms(channels=1, working_size=96))
    assert a != transform_fingerprint(loading_transforms(channels=1, working_size=64, ct_window=(-500, 500)))
    assert a != transform_fingerprint(loading_transforms(channels=3, working_size=64))


def test_fingerprint_of_deeply_nested_transforms_is_a_hash_not_an_error():
    """A transform whose attributes nest past the description depth (a Compose of a Compose of RandAffined:
    resampler, grid, ...) is described down to class names there instead of raising TypeError."""
    from monai.transforms import RandAffined, RandRotated

    def deep(transform) -> list:
        return [Compose([Compose([transform])])]

    affine = transform_fingerprint(deep(RandAffined(keys="image", prob=0.5, rotate_range=0.17)))
    assert affine == transform_fingerprint(deep(RandAffined(keys="image", prob=0.5, rotate_range=0.17)))
    assert affine != transform_fingerprint(deep(RandRotated(keys="image", range_x=0.17)))  # classes still count


def test_a_changed_preprocessing_writes_new_entries(demo_datalist, tmp_path):
    items = items_2d(demo_datalist, 3)
    for size in (32, 48):
        ds = make_dataset(items, Compose(loading_transforms(channels=1, working_size=size)), cache_dir=tmp_path)
        assert all(tuple(ds[SampleKey(i, 0)]["image"].shape) == (1, size, size) for i in range(3))
    assert len(list(tmp_path.glob("*.pt"))) == 6


def test_cache_dir_and_cache_rate_are_exclusive(demo_datalist, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        make_dataset(items_2d(demo_datalist, 2), crop_pipeline(), cache_rate=1.0, cache_dir=tmp_path)


def test_default_is_unchanged(demo_datalist):
    ds = make_dataset(items_2d(demo_datalist, 2), crop_pipeline())
    assert type(ds.dataset.dataset).__name__ == "Dataset"
    assert np.all([("seed" not in ds[SampleKey(i, 3)]) for i in range(2)])


@pytest.mark.parametrize("bundle", ["ssl_swav_multimodal_pretrain", "ssl_unimiss_pretrain"])
def test_the_bundles_cache_dir_key_reaches_the_training_dataset(bundle, demo_datalist, tmp_path):
    root = BUNDLES / bundle
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / "train.json"), str(root / "configs" / "smoke.json")])
    assert parser["cache_dir"] is None  # off unless asked
    parser.update({"bundle_root": str(root), "dataset_dir": str(demo_datalist.parent), "datalist": str(demo_datalist),
                   "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "run")})
    dataset = parser.get_parsed_content("train#dataset")
    dataset[SampleKey(0, 7)]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
