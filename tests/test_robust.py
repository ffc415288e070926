"""medssl.data.robust: SafeDataset names the datalist item and the file of a bad input; raise or skip."""

from __future__ import annotations

import logging
import pickle
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, Lambdad
from PIL import Image

from medssl.data.readers import LoadMedicalImaged
from medssl.data.robust import BadItemError, SafeDataset


class Key(NamedTuple):  # the shape of medssl.data.samplers.SampleKey
    index: int
    seed: int


@pytest.fixture()
def items(tmp_path):
    rng = np.random.RandomState(0)
    for k in range(3):
        nib.save(nib.Nifti1Image(rng.rand(4, 4, 3).astype(np.float32), np.eye(4)), tmp_path / f"mr{k}.nii.gz")
    for k in range(2):
        Image.fromarray(rng.randint(0, 256, (5, 6)).astype(np.uint8)).save(tmp_path / f"xr{k}.png")
    nib.save(nib.Nifti1Image(rng.rand(16, 16, 16).astype(np.float32), np.eye(4)), tmp_path / "big.nii.gz")
    raw = (tmp_path / "big.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])  # header intact, data stream cut short
    return [
        {"image": str(tmp_path / "mr0.nii.gz"), "modality": "MR", "dim": 3},  # 0
        {"image": str(tmp_path / "xr0.png"), "modality": "XR", "dim": 2},  # 1
        {"image": str(tmp_path / "cut.nii.gz"), "modality": "MR", "dim": 3},  # 2: truncated
        {"image": str(tmp_path / "xr_missing.png"), "modality": "XR", "dim": 2},  # 3: missing
        {"image": str(tmp_path / "xr1.png"), "modality": "XR", "dim": 2},  # 4
        {"image": str(tmp_path / "mr1.nii.gz"), "modality": "MR", "dim": 3},  # 5
        {"image": str(tmp_path / "mr2.nii.gz"), "modality": "MR", "dim": 3},  # 6
    ]


def monai_dataset(items, extra=None):
    return Dataset(items, transform=Compose([LoadMedicalImaged()] + ([extra] if extra else [])))


def test_raise_names_item_file_and_reader_error(items):
    dataset = SafeDataset(monai_dataset(items), datalist_name="dl.json")
    assert dataset[0]["image"].shape == (1, 4, 4, 3)
    with pytest.raises(BadItemError) as info:
        dataset[2]
    message = str(info.value)
    assert message.startswith(f"dl.json item 2: {items[2]['image']}: ")
    assert "EOFError" in message and "applying transform" not in message
    assert info.value.index == 2 and info.value.path == items[2]["image"] and info.value.__cause__ is not None
    with pytest.raises(BadItemError, match=rf"dl.json item 3: {items[3]['image']}: file not found"):
        dataset[np.int64(3)]
    copy = pickle.loads(pickle.dumps(info.value))  # survives DataLoader worker pickling
    assert str(copy) == message and copy.path == items[2]["image"]


def test_errors_of_other_transforms_name_the_file_from_the_item(items):
    def fail_on_png(image):
        if image.ndim == 3:
            raise ValueError("crop larger than the image")
        return image

    dataset = SafeDataset(monai_dataset(items, Lambdad("image", fail_on_png)), datalist_name="dl.json")
    with pytest.raises(BadItemError) as info:
        dataset[4]
    assert str(info.value) == f"dl.json item 4: {items[4]['image']}: ValueError: crop larger than the image"


def test_skip_replaces_with_same_modality_and_dim_and_counts(items, caplog):
    dataset = SafeDataset(monai_dataset(items), on_error="skip", max_skipped=2, datalist_name="dl.json")
    with caplog.at_level(logging.WARNING, logger="medssl.data.robust"):
        replaced = dataset[2]  # truncated MR volume -> the next MR 3D item (5), not the XR item 4 in between
    assert replaced["image"].meta["filename_or_obj"] == items[5]["image"] and replaced["dim"] == 3
    assert len(caplog.records) == 1
    assert f"dl.json item 2: {items[2]['image']}: " in caplog.records[0].getMessage()
    assert "1 bad item(s)" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medssl.data.robust"):
        again = dataset[2]  # a known bad item is not read (nor reported) again
    assert again["image"].meta["filename_or_obj"] == items[5]["image"] and not caplog.records
    assert dataset[3]["image"].meta["filename_or_obj"] == items[4]["image"]  # XR 2D -> XR 2D
    assert sorted(dataset.bad_items) == [2, 3]
    xr_only = [items[1], items[3], items[4]]  # good, missing, good
    loader = DataLoader(SafeDataset(monai_dataset(xr_only), on_error="skip"), batch_size=2)
    batches = list(loader)
    assert [b["image"].shape for b in batches] == [(2, 1, 6, 5), (1, 1, 6, 5)]
    assert batches[0]["image"].meta["filename_or_obj"] == [items[1]["image"], items[4]["image"]]


def test_skip_beyond_max_skipped_raises(items):
    dataset = SafeDataset(monai_dataset(items), on_error="skip", max_skipped=1)
    dataset[2]
    with pytest.raises(BadItemError, match=r"datalist item 3: .*xr_missing\.png.*max_skipped=1"):
        dataset[3]


class RecordingDataset:
    """A SeededDataset-like wrapper: accepts Key(index, seed) and ints; item 1 is bad."""

    def __init__(self):
        self.data = [{"image": f"/data/{i}.nii.gz", "modality": "CT", "dim": 3} for i in range(4)]
        self.transform = "the transform"
        self.received = []

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        self.received.append(index)
        position = index.index if isinstance(index, Key) else index
        if position == 1:
            raise RuntimeError("applying transform <LoadMedicalImaged>") from OSError("disk error")
        return {"index": index}


def test_sample_keys_pass_through_and_keep_their_seed():
    inner = RecordingDataset()
    dataset = SafeDataset(inner, on_error="skip")
    assert dataset[Key(3, 11)] == {"index": Key(3, 11)}
    assert dataset[Key(1, 77)] == {"index": Key(2, 77)}  # replacement: next index, same seed, same key type
    assert inner.received == [Key(3, 11), Key(1, 77), Key(2, 77)]
    assert dataset[0] == {"index": 0}
    with pytest.raises(BadItemError, match=r"datalist item 1: /data/1\.nii\.gz: OSError: disk error"):
        SafeDataset(inner)[Key(1, 5)]
    assert dataset.transform == "the transform" and dataset.data is inner.data and len(dataset) == 4
    dataset.transform = "new"
    assert inner.transform == "new"
    with pytest.raises(ValueError):
        SafeDataset(inner, on_error="ignore")


def test_with_seeded_dataset_the_replacement_keeps_the_augmentation_seed(items):
    from monai.transforms import RandGaussianNoised

    from medssl.data.samplers import SampleKey, SeededDataset

    def seeded():
        transform = Compose([LoadMedicalImaged(), RandGaussianNoised("image", prob=1.0, std=0.5)])
        return SeededDataset(Dataset(items, transform=transform))

    safe = SafeDataset(seeded(), on_error="skip")
    replaced = safe[SampleKey(2, 123)]  # truncated -> item 5, augmented with seed 123
    reference = seeded()[SampleKey(5, 123)]
    assert replaced["image"].meta["filename_or_obj"] == items[5]["image"]
    assert torch.equal(replaced["image"], reference["image"])
    assert not torch.equal(replaced["image"], seeded()[SampleKey(5, 124)]["image"])
    assert safe.data is safe.dataset.data and safe.transform is safe.dataset.transform


def test_skip_names_each_bad_item_with_its_own_file_and_error(tmp_path, caplog):
    # issue 13 item 4: a replacement that is bad too was reported with the first bad file's path and error
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (8, 8)).astype(np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "not_dicom.dcm").write_text("this is not a DICOM file\n")
    Image.fromarray(rng.randint(0, 256, (64, 64)).astype(np.uint8)).save(tmp_path / "big.png")
    raw = (tmp_path / "big.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    names = ("good.png", "not_dicom.dcm", "cut.png", "good.png")
    xr = [{"image": str(tmp_path / n), "modality": "XR", "dim": 2} for n in names]
    dataset = SafeDataset(monai_dataset(xr), on_error="skip", datalist_name="dl.json")
    with caplog.at_level(logging.WARNING, logger="medssl.data.robust"):
        replaced = dataset[1]  # item 1 bad, its replacement item 2 bad too -> item 3
    assert replaced["image"].meta["filename_or_obj"] == xr[3]["image"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith(f"dl.json item 1: {xr[1]['image']}: InvalidDicomError")
    assert messages[1].startswith(f"dl.json item 2: {xr[2]['image']}: ") and "truncated" in messages[1]
    assert "DICOM" not in messages[1] and "not_dicom" not in messages[1]
    assert dataset.bad_items[2].startswith(f"dl.json item 2: {xr[2]['image']}: ")


def test_volume_slice_dataset_skips_unreadable_volumes_when_built(items, caplog):
    # issue 13 item 6: a truncated volume stopped VolumeSliceDataset's construction whatever on_bad_item said
    from medssl.data import VolumeSliceDataset

    volumes = [items[0], items[2], items[5]]  # good, truncated, good
    with pytest.raises(BadItemError, match=rf"^dl\.json item 1: {items[2]['image']}: .*EOFError") as info:
        VolumeSliceDataset(volumes, LoadMedicalImaged(), source="dl.json")
    assert info.value.index == 1 and info.value.path == items[2]["image"]
    with caplog.at_level(logging.WARNING, logger="medssl.data.slices"):
        slices = VolumeSliceDataset(
            volumes, LoadMedicalImaged(), source="dl.json", on_error="skip", cache_rate=0.5, cache_num_workers=2
        )
    assert [r.getMessage().split(": ")[:2] for r in caplog.records] == [["dl.json item 1", items[2]["image"]]]
    assert "skipped (1 bad item(s) so far, at most 10)" in caplog.records[0].getMessage()
    assert slices.num_slices == [3, 0, 3] and sorted(set(slices.volume_ids.tolist())) == [0, 2]
    assert list(slices.bad_items) == [1]
    safe = SafeDataset(slices, on_error="skip", max_skipped=1)  # the item left out counts toward max_skipped
    assert list(safe.bad_items) == [1]
    with pytest.raises(BadItemError, match="more than max_skipped=0"):
        VolumeSliceDataset(volumes, LoadMedicalImaged(), on_error="skip", max_skipped=0)
    with pytest.raises(BadItemError, match=r"no usable item, all 1 are unreadable"):
        VolumeSliceDataset([items[2]], LoadMedicalImaged(), on_error="skip")


def test_all_nan_image_is_a_bad_item_at_training_time(tmp_path, items):
    """An all-NaN volume loads fine but has no usable intensity: the modality preset rejects it, so training names the
    file (raise) or replaces it (skip) instead of running into a NaN loss."""
    from medssl.data.presets import ModalityIntensityd

    nib.save(nib.Nifti1Image(np.full((4, 4, 3), np.nan, np.float32), np.eye(4)), tmp_path / "nan.nii.gz")
    bad = [items[0], {"image": str(tmp_path / "nan.nii.gz"), "modality": "MR", "dim": 3}, items[5]]
    dataset = SafeDataset(monai_dataset(bad, ModalityIntensityd()), datalist_name="dl.json")
    assert torch.isfinite(torch.as_tensor(dataset[0]["image"])).all()
    with pytest.raises(BadItemError, match=r"dl.json item 1: .*nan.nii.gz: ValueError: NaN/Inf values \(48 of 48 voxels\)"):
        dataset[1]
    skipping = SafeDataset(monai_dataset(bad, ModalityIntensityd()), on_error="skip", datalist_name="dl.json")
    assert torch.isfinite(torch.as_tensor(skipping[1]["image"])).all() and 1 in skipping.bad_items
