"""medssl.data.pipeline: the datalist → transforms → dataset front every bundle wires, on the demo data."""

from __future__ import annotations

import pytest
import torch

from medssl.data import SampleKey, load_items, loading_transforms, make_dataset


def test_load_items_filters(demo_datalist):
    every = load_items(demo_datalist, "training", keys=None)
    two_d = load_items(demo_datalist, "training", dims=[2])
    assert 0 < len(two_d) < len(every) and all(it["dim"] == 2 for it in two_d)
    assert set(two_d[0]) <= {"image", "modality", "dim"}
    ct = load_items(demo_datalist, "training", modalities=["ct"], keys=None)
    assert ct and all(it["modality"] == "CT" for it in ct)
    classes = load_items(demo_datalist, "validation", labelled_only="class", keys=None)
    masks = load_items(demo_datalist, "validation", labelled_only="mask", keys=None)
    assert classes and all(isinstance(it["label"], int) for it in classes)
    assert masks and all(isinstance(it["label"], str) for it in masks)
    assert len(load_items(demo_datalist, "training", max_items=5)) == 5


def test_load_items_empty_selection_names_the_datalist(demo_datalist):
    with pytest.raises(ValueError, match="datalist.json.*section 'training'"):
        load_items(demo_datalist, "training", modalities=["MG"])


def test_dataset_loads_mixed_modalities_to_one_channel(demo_datalist):
    from monai.transforms import Compose, Resized

    items = load_items(demo_datalist, "training", dims=[2])
    ds = make_dataset(items, Compose(loading_transforms(channels=1) + [Resized(keys="image", spatial_size=(16, 16))]))
    modalities = set()
    for i in range(len(ds)):
        sample = ds[SampleKey(i, 7)]
        assert sample["image"].shape == (1, 16, 16)
        assert torch.isfinite(sample["image"]).all()
        assert float(sample["image"].min()) >= 0.0 and float(sample["image"].max()) <= 1.0 + 1e-6
        modalities.add(sample["modality"])
    assert len(modalities) >= 4


def test_bad_file_in_training_is_named_or_skipped(demo_datalist, tmp_path):
    from monai.transforms import Compose

    items = load_items(demo_datalist, "training", dims=[2], max_items=6)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    items[2] = dict(items[2], image=str(bad))
    transform = Compose(loading_transforms(channels=1))
    strict = make_dataset(items, transform, datalist_name="my_datalist.json")
    with pytest.raises(Exception) as err:
        strict[SampleKey(2, 0)]
    assert "broken.png" in str(err.value) and "item 2" in str(err.value)
    lenient = make_dataset(items, transform, on_bad_item="skip", max_bad_items=1)
    sample = lenient[SampleKey(2, 0)]
    assert sample["modality"] == items[2]["modality"] or sample["image"].shape[0] == 1


def test_index_key_adds_the_dataset_index_without_touching_the_item(demo_datalist):
    from monai.transforms import Compose

    items = load_items(demo_datalist, "training", dims=[2], max_items=4)
    ds = make_dataset(items, Compose(loading_transforms(channels=1)), index_key="index")
    assert ds[SampleKey(3, 1)]["index"] == 3 and ds[1]["index"] == 1
    assert "index" not in items[3]
