"""tools/prepare_medmnist.py on small synthetic files in the MedMNIST v2 .npz format (2D grey, 2D RGB, multi-label,
2D CT, 3D), and on malformed ones: every user mistake is one line naming the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import PYTHON, TOOLS, load_tool, run_cmd

SPLIT_SIZES = {"train": 5, "val": 2, "test": 3}




TOOL = load_tool("prepare_medmnist.py", "prepare_medmnist_tool")


def write_npz(path: Path, item_shape: tuple, n_classes: int = 2, multi_label: int = 0, seed: int = 0,
              compressed: bool = True, drop: str | None = None, **replace) -> dict:
    """A file in the MedMNIST v2 layout: {split}_images uint8 (N, *item_shape), {split}_labels (N, 1) or (N, L)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in SPLIT_SIZES.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *item_shape), dtype=np.uint8)
        labels = rng.integers(0, 2, (n, multi_label)) if multi_label else rng.integers(0, n_classes, (n, 1))
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    arrays.update(replace)
    if drop:
        arrays.pop(drop)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return arrays


def run_tool(*args) -> tuple[int, str]:
    """main() in this process; returns (exit status, stderr text)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = TOOL.main([str(a) for a in args])
    return status, err.getvalue()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Grey 28 (pneumoniamnist, stored uncompressed), RGB (pathmnist), multi-label (chestmnist), 2D CT
    (organamnist_64), 3D (organmnist3d) converted into one folder."""
    src, out = tmp_path_factory.mktemp("npz"), tmp_path_factory.mktemp("medmnist")
    arrays = {
        "pneumoniamnist": write_npz(src / "pneumoniamnist.npz", (28, 28), 2, seed=1, compressed=False),
        "pathmnist": write_npz(src / "pathmnist.npz", (28, 28, 3), 9, seed=2),
        "chestmnist": write_npz(src / "chestmnist.npz", (28, 28), multi_label=14, seed=3),
        "organamnist_64": write_npz(src / "organamnist_64.npz", (64, 64), 11, seed=4),
        "organmnist3d": write_npz(src / "organmnist3d.npz", (28, 28, 28), 11, seed=5),
    }
    TOOL.prepare([src / f"{stem}.npz" for stem in arrays], out, workers=0)
    return out, arrays


def _datalist(out: Path, stem: str) -> dict:
    return json.loads((out / stem / "datalist.json").read_text())


def test_subset_datalists_images_and_labels(converted):
    out, arrays = converted
    for stem, sections in [("pneumoniamnist", ("XR", 2)), ("pathmnist", ("PATH", 2)), ("chestmnist", ("XR", 2)),
                           ("organamnist_64", ("CT", 2)), ("organmnist3d", ("CT", 3))]:
        datalist = _datalist(out, stem)
        for split, section in (("train", "training"), ("val", "validation"), ("test", "test")):
            items, labels = datalist[section], arrays[stem][f"{split}_labels"]
            assert len(items) == SPLIT_SIZES[split]
            assert {(it["modality"], it["dim"]) for it in items} == {sections}
            if stem == "chestmnist":
                assert [it["label"] for it in items] == labels.astype(int).tolist()
            else:
                assert [it["label"] for it in items] == labels[:, 0].astype(int).tolist()
    assert _datalist(out, "pathmnist")["classes"][0] == "adipose"
    assert len(_datalist(out, "chestmnist")["classes"]) == 14
    assert len(_datalist(out, "organmnist3d")["classes"]) == 11


def test_pixels_written_exactly(converted):
    out, arrays = converted
    grey = np.asarray(Image.open(out / "pneumoniamnist" / "val" / "000001.png"))
    assert np.array_equal(grey, arrays["pneumoniamnist"]["val_images"][1])
    rgb = Image.open(out / "pathmnist" / "test" / "000002.png")
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb), arrays["pathmnist"]["test_images"][2])
    # 3D: MedMNIST (D, H, W) -> (W, H, D), depth last; uint8 kept, NIfTI scaling to HU for CT
    volume = nib.load(out / "organmnist3d" / "train" / "000003.nii.gz")
    frames = arrays["organmnist3d"]["train_images"][3]
    assert volume.shape == (28, 28, 28) and volume.get_data_dtype() == np.uint8
    raw = np.asanyarray(volume.dataobj.get_unscaled())
    assert np.array_equal(raw, frames.transpose(2, 1, 0))
    assert np.allclose(volume.get_fdata()[..., 7], -1000.0 + frames[7].T * 2000.0 / 255.0, atol=1e-3)


def test_medssl_loading_gives_medmnist_images_back(converted):
    """Through the bundles' loading front: PNG and NIfTI slices agree with MedMNIST's frames (column index first),
    and the CT preset returns the 8-bit values / 255 (not squeezed into [0.50, 0.63])."""
    from monai.transforms import Compose

    from medssl.data.pipeline import load_items, loading_transforms

    out, arrays = converted
    front = Compose(loading_transforms(channels=1))
    raw = Compose(loading_transforms(channels=1, intensity=False))
    grey = raw(load_items(out / "pneumoniamnist" / "datalist.json", "training", keys=None)[2])["image"]
    assert np.array_equal(grey[0].numpy(), arrays["pneumoniamnist"]["train_images"][2].T.astype(np.float32))
    ct2d = front(load_items(out / "organamnist_64" / "datalist.json", "test", keys=None)[0])["image"]
    assert ct2d.shape == (1, 64, 64)
    assert np.allclose(ct2d[0].numpy(), arrays["organamnist_64"]["test_images"][0].T / 255.0, atol=1e-5)
    ct3d = front(load_items(out / "organmnist3d" / "datalist.json", "validation", keys=None)[1])["image"]
    frames = arrays["organmnist3d"]["val_images"][1]
    assert ct3d.shape == (1, 28, 28, 28)
    assert np.allclose(ct3d[0, :, :, 11].numpy(), frames[11].T / 255.0, atol=1e-5)


def test_union_datalist_global_labels_and_check(converted):
    from medssl.data.datalist import check_datalist

    out, arrays = converted
    union = json.loads((out / "datalist.json").read_text())
    assert sorted(union["subsets"]) == sorted(arrays)
    assert len(union["training"]) == 5 * SPLIT_SIZES["train"]
    classes = union["classes"]
    for stem, info in union["subsets"].items():
        local = _datalist(out, stem)
        items = [it for it in union["test"] if it["image"].startswith(f"{stem}/")]
        assert [it["image"] for it in items] == [f"{stem}/{it['image']}" for it in local["test"]]
        if stem == "chestmnist":  # multi-label: unlabelled in the union
            assert info["label_offset"] is None and all("label" not in it for it in items)
            continue
        for it, local_it in zip(items, local["test"]):
            assert it["label"] == info["label_offset"] + local_it["label"]
            assert classes[it["label"]] == f"{stem}: {local['classes'][local_it['label']]}"
    report = check_datalist(out / "datalist.json", verbose=False)
    assert report["summary"]["bad"] == 0 and report["summary"]["items"] == 5 * sum(SPLIT_SIZES.values())


def test_datalist_check_tool_and_task_configs(converted):
    out, _ = converted
    proc = run_cmd([PYTHON, str(TOOLS / "datalist.py"), "check", str(out / "datalist.json")], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    chest = json.loads((out / "chestmnist" / "task.json").read_text())
    assert chest["multi_label"] is True and chest["modalities"] == ["XR"] and len(chest["class_names"]) == 14
    organ3d = json.loads((out / "organmnist3d" / "task.json").read_text())
    assert organ3d["multi_label"] is False and organ3d["modalities"] == ["CT"]
    assert organ3d["class_names"] == _datalist(out, "organmnist3d")["classes"]


def test_limit_force_incremental_union_and_workers(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    arrays = write_npz(src / "retinamnist_64.npz", (64, 64, 3), 5, seed=6)
    write_npz(src / "synapsemnist3d.npz", (28, 28, 28), 2, seed=7)
    assert run_tool("--npz", src / "retinamnist_64.npz", "--out", out, "--limit", 2)[0] == 0
    assert [len(_datalist(out, "retinamnist_64")[s]) for s in ("training", "validation", "test")] == [2, 2, 2]
    status, err = run_tool("--npz", src / "retinamnist_64.npz", "--out", out)
    assert status == 2 and "--force" in err and "retinamnist_64" in err
    assert run_tool("--npz", src / "retinamnist_64.npz", "--out", out, "--force", "--workers", 2)[0] == 0
    assert len(_datalist(out, "retinamnist_64")["training"]) == SPLIT_SIZES["train"]
    png = np.asarray(Image.open(out / "retinamnist_64" / "train" / "000004.png"))
    assert np.array_equal(png, arrays["train_images"][4])
    assert json.loads((out / "retinamnist_64" / "task.json").read_text())["ordinal"] is True
    # a later conversion into the same folder: the union holds both subsets, labels offset after the first
    assert run_tool("--npz", src / "synapsemnist3d.npz", "--out", out, "--workers", 2)[0] == 0
    union = json.loads((out / "datalist.json").read_text())
    assert list(union["subsets"]) == ["retinamnist_64", "synapsemnist3d"]
    assert union["subsets"]["synapsemnist3d"]["label_offset"] == 5
    assert {it["modality"] for it in union["training"]} == {"FUNDUS", "PATH"}
    assert nib.load(out / "synapsemnist3d" / "val" / "000001.nii.gz").shape == (28, 28, 28)


def test_modality_override_and_custom_file(tmp_path):
    write_npz(tmp_path / "dermamnist.npz", (28, 28, 3), 7)
    write_npz(tmp_path / "mydata.npz", (28, 28), 3)
    status, err = run_tool("--npz", tmp_path / "dermamnist.npz", "--npz", tmp_path / "mydata.npz", "--out",
                           tmp_path / "out", "--modality", "dermamnist=fundus", "--modality", "mydata=MRI")
    assert status == 0, err
    assert {it["modality"] for it in _datalist(tmp_path / "out", "dermamnist")["training"]} == {"FUNDUS"}
    custom = _datalist(tmp_path / "out", "mydata")
    assert {it["modality"] for it in custom["training"]} == {"MR"}
    assert custom["classes"] == [str(i) for i in range(1 + max(it["label"] for s in ("training", "validation", "test")
                                                               for it in custom[s]))]


MALFORMED = [
    # (file name, write_npz arguments, extra command-line arguments, words the one-line error must contain)
    ("pathmnist.npz", dict(item_shape=(28, 28, 3), n_classes=9, drop="val_labels"), [], ["'val_labels'", "missing"]),
    ("pathmnist.npz", dict(item_shape=(28, 28), n_classes=9), [], ["'train_images'", "(5, 28, 28)", "RGB"]),
    ("organmnist3d.npz", dict(item_shape=(28, 28), n_classes=11), [], ["'train_images'", "volumes"]),
    ("pneumoniamnist_64.npz", dict(item_shape=(28, 28)), [], ["'train_images'", "(N, 64, 64)"]),
    ("pneumoniamnist.npz", dict(item_shape=(28, 28), test_images=np.zeros((3, 28, 28), np.float32)), [],
     ["'test_images'", "uint8"]),
    ("pneumoniamnist.npz", dict(item_shape=(28, 28), val_labels=np.array([[0], [5]], np.uint8)), [],
     ["'val_labels'", "item 1", "[5]"]),
    ("pneumoniamnist.npz", dict(item_shape=(28, 28), train_labels=np.zeros((4, 1), np.uint8)), [],
     ["'train_labels'", "(4, 1)"]),
    ("chestmnist.npz", dict(item_shape=(28, 28), n_classes=14), [], ["'train_labels'", "multi-label", "14"]),
    ("pathmnist_32.npz", dict(item_shape=(32, 32, 3), n_classes=9), [], ["32-pixel", "pathmnist"]),
    ("xyzmnist.npz", dict(item_shape=(28, 28)), [], ["no MedMNIST v2 subset", "--modality xyzmnist=MOD"]),
    ("octmnist.npz", dict(item_shape=(28, 28), n_classes=4), [], ["no default medssl modality", "--modality"]),
    ("pneumoniamnist.npz", dict(item_shape=(28, 28)), ["--modality", "pneumoniamnist=XRAY"], ["unknown modality"]),
    ("pneumoniamnist.npz", dict(item_shape=(28, 28)), ["--modality", "bloodmnist=PATH"], ["no --npz file", "blood"]),
]


@pytest.mark.parametrize("name, spec, extra, words", MALFORMED, ids=[f"{m[0]}-{m[3][0]}" for m in MALFORMED])
def test_malformed_file_one_line_error(tmp_path, name, spec, extra, words):
    spec = dict(spec)
    write_npz(tmp_path / name, spec.pop("item_shape"), **spec)
    status, err = run_tool("--npz", tmp_path / name, "--out", tmp_path / "out", *extra)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # every file is checked before anything is written


def test_cli_error_is_one_line_without_traceback(tmp_path):
    write_npz(tmp_path / "breastmnist.npz", (28, 28), drop="test_images")
    proc = run_cmd([PYTHON, str(TOOLS / "prepare_medmnist.py"), "--npz", str(tmp_path / "breastmnist.npz"),
                    "--out", str(tmp_path / "out")], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'breastmnist.npz'}: key 'test_images' missing (found: test_labels, train_images, "
        "train_labels, val_images, val_labels; a MedMNIST v2 file has train_images, train_labels, val_images, "
        "val_labels, test_images, test_labels) (--debug shows the traceback)"
    ]
