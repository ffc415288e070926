"""Tests of the embedded demo dataset (medssl.data.demo, tools/demo_data.py).

Reads the written files with MONAI / nibabel / pydicom / pillow directly (not medssl's readers).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from medssl.data.demo import (
    CLASSES,
    CT_VOLUME_CLASSES,
    DEMO_VERSION,
    MASK_CLASSES,
    REAL_SOURCES,
    SEGMENTATION_LABELS,
    build_demo_dataset,
    synthetic_chest_ct_nodules,
)

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("training", "validation", "test")
CANONICAL_MODALITIES = {"CT", "MR", "XR", "US", "NM", "PT", "MG", "PATH", "FUNDUS"}
BUILD_TIME_LIMIT_S = 60.0
SIZE_LIMIT_BYTES = 20 * 1024 * 1024


def _digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` except the build lock."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".medssl_demo")
    }


def _items(datalist: dict) -> list[tuple[str, dict]]:
    return [(section, item) for section in SECTIONS for item in datalist[section]]


def _read_2d(path: Path) -> np.ndarray:
    """(H, W) or (H, W, 3) pixels of a PNG or single-file DICOM."""
    if path.suffix == ".dcm":
        return pydicom.dcmread(path).pixel_array
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One fresh build shared by the tests of this module: (directory, datalist dict, build seconds)."""
    root = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    datalist_path = build_demo_dataset(root, seed=0, learn=False)  # the learnability set: the tests at the end
    seconds = time.perf_counter() - start
    assert datalist_path == root.resolve() / "datalist.json"
    return root.resolve(), json.loads(datalist_path.read_text()), seconds


def test_build_is_fast_small_and_offline(demo):
    root, datalist, seconds = demo
    assert seconds < BUILD_TIME_LIMIT_S, f"build took {seconds:.1f} s"
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < SIZE_LIMIT_BYTES, f"{total / 2**20:.1f} MB"
    assert datalist["builder"] == {"module": "medssl.data.demo", "version": DEMO_VERSION, "seed": 0}
    assert int(DEMO_VERSION) >= 2  # version 2 added the labelled 3D split and the X-ray organ masks
    # every real file found on disk in this environment was written (none failed, none needed a download)
    used = {(source["distribution"].split("==")[0], source["path"]) for source in datalist["sources"].values()}
    for real in REAL_SOURCES:
        found = real.locate()
        assert found is None or (found[0], found[1]) in used, (real.name, datalist["skipped_sources"])
    assert len(datalist["sources"]) + len(datalist["skipped_sources"]) == len(REAL_SOURCES)
    assert (root / "README.md").read_text().startswith("# medssl demo dataset")


@pytest.mark.parametrize("section", SECTIONS)
def test_sections_load_with_monai_and_files_exist(demo, section):
    from monai.data import load_decathlon_datalist

    root, datalist, _ = demo
    items = load_decathlon_datalist(root / "datalist.json", is_segmentation=True, data_list_key=section)
    assert len(items) == len(datalist[section]) > 0
    for item in items:
        assert set(item) <= {"image", "modality", "dim", "label"}, item
        assert item["modality"] in CANONICAL_MODALITIES, item
        assert item["dim"] in (2, 3), item
        assert Path(item["image"]).is_absolute() and Path(item["image"]).exists(), item
        label = item.get("label")
        if isinstance(label, str):
            assert Path(label).is_file(), item
        elif label is not None:
            assert isinstance(label, int) and 0 <= label < len(datalist["classes"]), item
    # no item's modality was mistaken for a path by MONAI (a folder named like a modality would do that)
    assert all(os.path.sep not in item["modality"] for item in items)


def test_task_datalists_are_consistent_subsets(demo):
    from monai.data import load_decathlon_datalist

    root, datalist, _ = demo
    kinds = {
        "datalist_classification_2d.json": lambda it: it["dim"] == 2 and isinstance(it.get("label"), int),
        "datalist_segmentation_2d.json": lambda it: it["dim"] == 2 and isinstance(it.get("label"), str),
        "datalist_segmentation_3d.json": lambda it: it["dim"] == 3 and isinstance(it.get("label"), str),
        "datalist_classification_3d.json": lambda it: it["dim"] == 3 and isinstance(it.get("label"), int),
    }
    for name, keep in kinds.items():
        task = json.loads((root / name).read_text())
        for section in SECTIONS:
            expected = [item for item in datalist[section] if keep(item)]
            assert task[section] == expected and len(expected) > 0, (name, section)
            assert len(load_decathlon_datalist(root / name, data_list_key=section)) == len(expected)


def test_modalities_and_dims_cover_the_promise(demo):
    _, datalist, _ = demo
    pairs = {(item["modality"], item["dim"]) for _, item in _items(datalist)}
    promised = {("CT", 2), ("CT", 3), ("MR", 2), ("MR", 3), ("XR", 2), ("US", 2), ("NM", 2), ("PATH", 2)}
    promised |= {("FUNDUS", 2)}
    assert promised <= pairs, promised - pairs
    # the real part holds every modality whose files are installed (all seven with the optional packages)
    real = {item["modality"] for _, item in _items(datalist) if item["image"].startswith("real/")}
    assert real == {source.modality for source in REAL_SOURCES if source.locate() is not None}
    # at least ~40 labelled 2D class items and ~8 labelled volumes
    class_items = [item for _, item in _items(datalist) if isinstance(item.get("label"), int)]
    volumes = [item for _, item in _items(datalist) if item["dim"] == 3 and isinstance(item.get("label"), str)]
    assert len(class_items) >= 40 and len(volumes) >= 8
    assert any(item["image"].endswith(".nii.gz") for item in volumes)  # NIfTI volumes and a DICOM series
    assert any(not item["image"].endswith((".nii", ".nii.gz")) for item in volumes)


@pytest.mark.parametrize("section", ["training", "validation", "test"])
def test_every_class_is_present(demo, section):
    _, datalist, _ = demo
    assert datalist["classes"] == list(CLASSES) and len(CLASSES) >= 2
    class_items = [item for item in datalist[section] if isinstance(item.get("label"), int)]
    xr = [item["label"] for item in class_items if (item["modality"], item["dim"]) == ("XR", 2)]
    ct = [item["label"] for item in class_items if (item["modality"], item["dim"]) == ("CT", 3)]
    assert len(xr) + len(ct) == len(class_items)  # class labels only on 2D X-rays and 3D CT volumes
    counts = np.bincount(xr, minlength=len(CLASSES))
    assert (counts > 0).all() and counts.min() == counts.max(), counts  # all classes, balanced
    counts = np.bincount(ct, minlength=len(CLASSES))
    assert counts[list(CT_VOLUME_CLASSES)].min() == counts[list(CT_VOLUME_CLASSES)].max() > 0, counts
    assert counts.sum() == counts[list(CT_VOLUME_CLASSES)].sum(), counts  # normal / nodule only
    # validation / test: only labelled items
    if section != "training":
        assert all("label" in item for item in datalist[section])


def test_images_have_the_declared_dims_and_masks_match(demo):
    root, datalist, _ = demo
    for section, item in _items(datalist):
        path = root / item["image"]
        where = f"{section}: {item['image']}"
        if path.is_dir():
            slices = sorted(path.iterdir())
            assert len(slices) > 1, where
            shape = (*pydicom.dcmread(slices[0]).pixel_array.shape, len(slices))
        elif path.name.endswith((".nii", ".nii.gz")):
            shape = nib.load(path).shape
        else:
            pixels = _read_2d(path)
            shape = pixels.shape[:2]
            assert pixels.ndim == 2 or pixels.shape[-1] == 3, where
            assert max(shape) <= 128, where
        assert len(shape) == item["dim"], (where, shape)
        if item["dim"] == 3:
            assert max(shape) <= 64, (where, shape)
        if isinstance(item.get("label"), str):
            mask_path = root / item["label"]
            mask = np.asanyarray(nib.load(mask_path).dataobj) if item["dim"] == 3 else _read_2d(mask_path)
            assert mask.shape == tuple(shape), (where, mask.shape, shape)
            values = {str(v) for v in np.unique(mask)}
            assert values <= set(SEGMENTATION_LABELS[item["modality"]]), (where, values)
            assert mask.max() > 0, f"{where}: empty mask"


def test_every_image_loads_with_monai(demo):
    import warnings

    from monai.transforms import LoadImage

    root, datalist, _ = demo
    load = LoadImage(image_only=True, ensure_channel_first=True)
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, item in _items(datalist):
            if item["image"] in seen:
                continue
            seen.add(item["image"])
            image = load(str(root / item["image"]))
            spatial = tuple(image.shape[1:])
            if len(spatial) == item["dim"] + 1 and spatial[-1] == 3:  # MONAI leaves RGB DICOM samples last
                spatial = spatial[:-1]
            assert len(spatial) == item["dim"], (item, tuple(image.shape))
            assert np.isfinite(image.numpy()).all() and float(image.max()) > float(image.min()), item


def test_dicom_series_reads_back_in_hounsfield_units(demo):
    import warnings

    from monai.data import PydicomReader
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    root, datalist, _ = demo
    series = [item for _, item in _items(datalist) if (root / item["image"]).is_dir()]
    assert len(series) == 1
    item = series[0]
    assert item["modality"] == "CT" and item["dim"] == 3
    headers = [pydicom.dcmread(p) for p in sorted((root / item["image"]).iterdir())]
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    assert len({h.SOPInstanceUID for h in headers}) == len(headers)
    assert {h.Modality for h in headers} == {"CT"}
    assert {(float(h.RescaleSlope), float(h.RescaleIntercept)) for h in headers} == {(1.0, -1024.0)}
    z = sorted(float(h.ImagePositionPatient[2]) for h in headers)
    assert np.allclose(np.diff(z), float(headers[0].SliceThickness))

    load = Compose(
        [
            LoadImaged("image", reader=PydicomReader()),
            LoadImaged("label"),
            EnsureChannelFirstd(["image", "label"]),
            Orientationd(["image", "label"], axcodes="RAS"),
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load({"image": str(root / item["image"]), "label": str(root / item["label"])})
    image, mask = data["image"][0].numpy(), data["label"][0].numpy()
    assert image.ndim == 3 and image.shape == mask.shape == (64, 64, len(headers))
    assert np.allclose(data["image"].affine.numpy(), data["label"].affine.numpy(), atol=1e-3)
    # Hounsfield units, and the NIfTI mask lands on the right voxels
    assert image.min() >= -1024 and np.median(image[0]) < -900  # air at the patient's left edge
    liver_hu, lesion_hu = image[mask == 1].mean(), image[mask == 2].mean()
    assert 40 < liver_hu < 80  # liver ~60 HU
    assert -20 < lesion_hu < liver_hu - 20  # hypodense lesions ~10 HU
    assert (image > 500).sum() > 50  # bone
    # the liver lies on the patient's right (RAS: +x) and low (inferior: small z)
    xs, _, zs = np.nonzero(mask == 1)
    assert xs.mean() > image.shape[0] / 2 and zs.mean() < image.shape[2] / 2


def test_real_files_are_recorded_with_licence_and_documented(demo):
    root, datalist, _ = demo
    readme = (REPO / "common" / "medssl" / "data" / "DEMO_DATA.md").read_text()
    assert len(datalist["sources"]) >= 10
    for file, source in datalist["sources"].items():
        distribution, version = source["distribution"].split("==")
        assert importlib.metadata.version(distribution) == version
        original = Path(str(importlib.metadata.distribution(distribution).locate_file(source["path"])))
        assert original.is_file(), source
        assert (root / file).is_file() and source["licence"], source
        assert source["path"] in readme and file in readme, source
    # only the sections are lists of objects (tools treat every list of objects as a section)
    lists_of_objects = [k for k, v in datalist.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    assert sorted(lists_of_objects) == sorted(SECTIONS)
    for real in REAL_SOURCES:
        assert real.path in readme, real.path


def test_same_seed_gives_identical_files(demo, tmp_path):
    root, _, _ = demo
    build_demo_dataset(tmp_path / "again", seed=0, learn=False)
    assert _digests(tmp_path / "again") == _digests(root)


def test_reuse_force_repair_and_seed_change(demo, tmp_path):
    root, _, _ = demo
    out = tmp_path / "demo"
    shutil.copytree(root, out)  # a copy of the module's build: same version and seed, so it is reused
    datalist_path = out / "datalist.json"
    stamp = datalist_path.stat().st_mtime_ns
    time.sleep(0.01)
    assert build_demo_dataset(out, seed=0, learn=False) == datalist_path.resolve()
    assert datalist_path.stat().st_mtime_ns == stamp  # reused, not rewritten
    build_demo_dataset(out, seed=0, force=True, learn=False)
    assert datalist_path.stat().st_mtime_ns != stamp  # rebuilt
    victim = out / json.loads(datalist_path.read_text())["validation"][0]["image"]
    victim.unlink()
    build_demo_dataset(out, seed=0, learn=False)
    assert victim.is_file()  # a missing file triggers a rebuild
    (out / "mine.txt").write_text("not the builder's")
    build_demo_dataset(out, seed=1, learn=False)  # another seed: rebuilt without force
    assert json.loads(datalist_path.read_text())["builder"]["seed"] == 1
    assert (out / "mine.txt").read_text() == "not the builder's"  # foreign files are left alone
    reference, other = _digests(root), _digests(out)
    assert other.keys() - {"mine.txt"} == reference.keys()
    changed = {name for name in reference if other[name] != reference[name]}
    assert any(name.startswith("synthetic/") for name in changed)
    assert not any(name.startswith("real/") for name in changed)  # real files don't depend on the seed


def test_refuses_to_replace_a_foreign_datalist(tmp_path):
    foreign = {"name": "someone's data", "training": [{"image": "a.nii.gz", "modality": "CT", "dim": 3}]}
    (tmp_path / "datalist.json").write_text(json.dumps(foreign))
    (tmp_path / "synthetic").mkdir()
    with pytest.raises(FileExistsError, match="datalist.json"):
        build_demo_dataset(tmp_path, seed=0, force=True)
    assert json.loads((tmp_path / "datalist.json").read_text()) == foreign
    assert (tmp_path / "synthetic").is_dir() and not any((tmp_path / "synthetic").iterdir())


def test_cli_builds_the_dataset(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "common"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo_data.py"), "--out", str(tmp_path / "cli"), "--seed", "3"]
        + ["--no-learn"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    datalist = json.loads((tmp_path / "cli" / "datalist.json").read_text())
    assert datalist["builder"]["seed"] == 3
    assert "validation: " in result.stdout and str(tmp_path / "cli" / "datalist.json") in result.stdout
    assert not (tmp_path / "cli" / "datalist_learn.json").exists() and not (tmp_path / "cli" / "learn").exists()


def test_labelled_3d_split_is_balanced_ras_hounsfield_volumes(demo):
    """The class-labelled 3D split (kNN of volume embeddings): 16 / 6 / 6 CT volumes, normal / nodule alternating."""
    from medssl.data import load_items

    root, datalist, _ = demo
    sizes = []
    for section in SECTIONS:
        items = load_items(root / "datalist.json", section, dims=[3], labelled_only="class", keys=None)
        assert all(item["modality"] == "CT" and type(item["label"]) is int for item in items), items
        labels = [item["label"] for item in items]
        assert labels == [CT_VOLUME_CLASSES[i % 2] for i in range(len(labels))]  # alternating, so balanced
        sizes.append(len(items))
        for item in items:
            volume = nib.load(item["image"])
            assert volume.shape == (48, 48, 32) and volume.get_data_dtype() == np.int16, item
            assert nib.aff2axcodes(volume.affine) == ("R", "A", "S") and volume.affine[2, 2] == 8.0, item
            hu = np.asanyarray(volume.dataobj)
            assert hu.min() >= -1024 and (hu < -700).mean() > 0.3 and (hu > 400).sum() > 20, item  # air, lungs, bone
    assert sizes == [16, 6, 6]
    task = json.loads((root / "datalist_classification_3d.json").read_text())
    assert [len(task[s]) for s in SECTIONS] == sizes and task["classes"] == list(CLASSES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ct_classes_differ_only_by_nodules_inside_the_lungs(seed):
    normal = synthetic_chest_ct_nodules(np.random.default_rng(seed), CLASSES.index("normal")).astype(np.float64)
    nodule = synthetic_chest_ct_nodules(np.random.default_rng(seed), CLASSES.index("nodule")).astype(np.float64)
    changed = normal != nodule
    # 1-3 spheres of radius 1.5-3.5 voxels (plus their partial-volume rim): between ~10 and ~3 x 4/3 pi 4^3 voxels
    assert 10 <= changed.sum() <= 3 * 4 / 3 * np.pi * 4**3, changed.sum()
    assert np.median(normal[changed]) < -600  # in the lungs
    assert (nodule[changed] - normal[changed]).mean() > 150  # denser than lung parenchyma
    with pytest.raises(ValueError, match="not a CT volume class"):
        synthetic_chest_ct_nodules(np.random.default_rng(seed), CLASSES.index("effusion"))


def test_xr_organ_masks_name_lungs_heart_and_clavicles(demo):
    from scipy import ndimage

    root, datalist, _ = demo
    assert datalist["mask_classes"] == {m: list(names) for m, names in MASK_CLASSES.items()}
    assert datalist["mask_classes"]["XR"] == ["background", "lungs", "heart", "clavicles"]
    assert datalist["segmentation_labels"]["XR"] == {"0": "background", "1": "lungs", "2": "heart", "3": "clavicles"}
    for modality, names in datalist["mask_classes"].items():
        assert names[0] == "background" and datalist["segmentation_labels"][modality] == dict(
            (str(i), n) for i, n in enumerate(names)
        )
    sizes = []
    for section in SECTIONS:
        items = [it for it in datalist[section] if it["modality"] == "XR" and isinstance(it.get("label"), str)]
        sizes.append(len(items))
        for item in items:
            image, mask = _read_2d(root / item["image"]), _read_2d(root / item["label"])
            assert mask.dtype == np.uint8 and mask.shape == image.shape == (128, 128), item
            assert set(np.unique(mask).tolist()) == {0, 1, 2, 3}, item
            lungs, n_lungs = ndimage.label(mask == 1)
            assert n_lungs >= 2, item  # left and right lung fields
            big = sorted(np.bincount(lungs.ravel())[1:])[-2:]
            assert min(big) > 0.04 * mask.size, item
            rows_heart, cols_heart = np.nonzero(mask == 2)
            rows_clav, _ = np.nonzero(mask == 3)
            assert rows_clav.mean() < np.nonzero(mask == 1)[0].mean() < rows_heart.mean(), item  # top to bottom
            assert abs(cols_heart.mean() - 64) < 20, item  # heart near the midline
            # the lungs are dark on the image (air), the heart and clavicles brighter
            assert image[mask == 1].mean() + 20 < min(image[mask == 2].mean(), image[mask == 3].mean()), item
    assert sizes == [12, 4, 4]


# --------------------------------------------------------------------------------------------------
# the learnability set (demo data v3, medssl.data.learnability)
# --------------------------------------------------------------------------------------------------
LEARN_2D, LEARN_3D = (4, 2, 2), (2, 1, 1)  # items per class and section of the reduced builds below


@pytest.fixture(scope="module")
def learn(tmp_path_factory):
    """A reduced learnability build (same generators, fewer items per class) with the rest of the demo data:
    (directory, {datalist name: dict})."""
    from medssl.data import learnability

    root = tmp_path_factory.mktemp("learn")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(learnability, "PER_CLASS_2D", LEARN_2D)
        patch.setattr(learnability, "PER_CLASS_3D", LEARN_3D)
        build_demo_dataset(root, seed=0)
    datalists = {name: json.loads((root / name).read_text()) for name in learnability.LEARN_DATALISTS}
    return root.resolve(), datalists


def test_learn_set_has_balanced_splits_sizes_and_its_own_datalists(learn):
    from medssl.data import load_items
    from medssl.data.learnability import LABEL_OFFSETS, LEARN_CLASSES

    root, datalists = learn
    full = datalists["datalist_learn.json"]
    assert full["builder"] == {"module": "medssl.data.demo", "part": "learn", "version": DEMO_VERSION, "seed": 0,
                               "per_class_2d": list(LEARN_2D), "per_class_3d": list(LEARN_3D)}
    assert DEMO_VERSION == "3"
    # one flat label space, a disjoint range of 3 per modality
    assert full["classes"] == [f"{m}: {name}" for m, names in LEARN_CLASSES.items() for name in names]
    assert full["modality_classes"] == {m: list(names) for m, names in LEARN_CLASSES.items()}
    assert full["label_offsets"] == LABEL_OFFSETS == {"XR": 0, "FUNDUS": 3, "PATH": 6, "CT": 9, "MR": 12}
    for section, n2, n3 in zip(SECTIONS, LEARN_2D, LEARN_3D):
        items = full[section]
        assert full[f"num{section.capitalize()}"] == len(items)
        for modality, offset in LABEL_OFFSETS.items():
            labels = [it["label"] for it in items if it["modality"] == modality]
            expected = n2 if modality in ("XR", "FUNDUS", "PATH") else n3
            assert np.bincount(np.array(labels) - offset, minlength=3).tolist() == [expected] * 3, (section, modality)
            kept = load_items(root / "datalist_learn.json", section, modalities=[modality], labelled_only="class")
            assert len(kept) == 3 * expected and all(Path(it["image"]).is_file() for it in kept)
        # the 2D / 3D datalists are the dim subsets; datalist.json lists none of these items
        for name, dim in (("datalist_learn_2d.json", 2), ("datalist_learn_3d.json", 3)):
            assert datalists[name][section] == [it for it in items if it["dim"] == dim]
    main = json.loads((root / "datalist.json").read_text())
    assert not any(it["image"].startswith("learn/") for section in SECTIONS for it in main[section])
    shapes = Counter()
    for item in (it for section in SECTIONS for it in full[section]):
        path = root / item["image"]
        if item["dim"] == 2:
            with Image.open(path) as image:
                shapes[(item["modality"], image.mode, image.size)] += 1
        else:
            volume = nib.load(path)
            assert volume.get_data_dtype() == np.int16 and nib.aff2axcodes(volume.affine) == ("R", "A", "S")
            shapes[(item["modality"], "int16", volume.shape)] += 1
    n2, n3 = 3 * sum(LEARN_2D), 3 * sum(LEARN_3D)
    assert shapes == {("XR", "L", (128, 128)): n2, ("FUNDUS", "RGB", (128, 128)): n2, ("PATH", "RGB", (128, 128)): n2,
                      ("CT", "int16", (64, 64, 64)): n3, ("MR", "int16", (64, 64, 64)): n3}


def test_learn_datalist_passes_the_datalist_check(learn):
    from medssl.data.datalist import check_datalist

    root, _ = learn
    result = check_datalist(root / "datalist_learn.json", verbose=False, print_fn=lambda *_: None)
    assert result["summary"]["bad"] == 0 and result["summary"]["items"] == 3 * 3 * sum(LEARN_2D) + 2 * 3 * sum(LEARN_3D)
    assert {item["dim"] for item in result["items"]} == {2, 3}


def test_learn_classes_do_not_differ_by_global_intensity():
    """The class is not global brightness or contrast: per modality, the class means of the per-image mean and std of
    the (grey) intensities differ by less than 1.5 within-class standard deviations (a fixed sample of 20 images /
    8 volumes per class)."""
    from medssl.data import learnability

    generators = {"XR": (learnability.learn_chest_xr, 20), "FUNDUS": (learnability.learn_fundus, 20),
                  "PATH": (learnability.learn_histology, 20), "CT": (learnability.learn_chest_ct, 8),
                  "MR": (learnability.learn_brain_mr, 8)}  # fmt: skip
    for modality, (generator, n) in generators.items():
        stats = []
        for class_index in range(3):
            rows = []
            for i in range(n):
                pixels = generator(np.random.default_rng([0, class_index, i]), class_index)
                if pixels.dtype == np.uint8:
                    pixels = np.asarray(Image.fromarray(pixels).convert("L"))
                rows.append((pixels.mean(), pixels.std()))
            stats.append(np.array(rows))
        means = np.array([s.mean(axis=0) for s in stats])
        spread = np.sqrt(np.mean([s.var(axis=0, ddof=1) for s in stats], axis=0))
        assert ((means.max(axis=0) - means.min(axis=0)) < 1.5 * spread).all(), (modality, means, spread)


def test_learn_builds_are_byte_identical_and_independent_of_workers(learn, tmp_path):
    from medssl.data import learnability
    from medssl.data.demo import dataset_digest

    root, datalists = learn
    sections = learnability.build_learnability_set(tmp_path, seed=0, per_class_2d=LEARN_2D, per_class_3d=LEARN_3D,
                                                   workers=2)
    assert sections == {s: datalists["datalist_learn.json"][s] for s in SECTIONS}
    reference = {name: digest for name, digest in dataset_digest(root).items() if name.startswith("learn/")}
    assert len(reference) == 3 * 3 * sum(LEARN_2D) + 2 * 3 * sum(LEARN_3D)
    assert {name: digest for name, digest in dataset_digest(tmp_path).items() if name.startswith("learn/")} == reference
    for name in ("learn/mr/mr_000.nii.gz", "learn/ct/ct_000.nii.gz"):  # gzip header: no time stamp
        header = (root / name).read_bytes()[:10]
        assert header[:2] == b"\x1f\x8b" and header[4:8] == b"\x00\x00\x00\x00", header
    # another seed gives other images under the same names
    other = learnability.build_learnability_set(tmp_path / "seed1", seed=1, per_class_2d=(1, 1, 1),
                                                per_class_3d=(1, 1, 1))
    assert other["training"][0]["image"] == "learn/xr/xr_000.png"
    assert (tmp_path / "seed1" / "learn/xr/xr_000.png").read_bytes() != (root / "learn/xr/xr_000.png").read_bytes()


def test_learn_set_is_added_reused_and_left_out_on_its_own(learn, tmp_path):
    from medssl.data import learnability

    root, _ = learn
    out = tmp_path / "demo"
    shutil.copytree(root, out)  # parts 1 and 2 up to date, and a learnability set of LEARN_2D / LEARN_3D items
    datalist_path, learn_path = out / "datalist.json", out / "datalist_learn.json"
    stamps = datalist_path.stat().st_mtime_ns, learn_path.stat().st_mtime_ns
    build_demo_dataset(out, seed=0, learn=False)  # leaves a learnability set alone, even one of other counts
    assert (datalist_path.stat().st_mtime_ns, learn_path.stat().st_mtime_ns) == stamps
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(learnability, "PER_CLASS_2D", (1, 1, 1))
        patch.setattr(learnability, "PER_CLASS_3D", (1, 1, 1))
        build_demo_dataset(out, seed=0)  # other counts: only the learnability set is rebuilt
        assert datalist_path.stat().st_mtime_ns == stamps[0] and learn_path.stat().st_mtime_ns != stamps[1]
        assert not (out / "learn" / "xr" / "xr_009.png").exists()  # the old, larger set's files are gone
        learn_stamp = learn_path.stat().st_mtime_ns
        build_demo_dataset(out, seed=0)  # up to date: reused
        assert learn_path.stat().st_mtime_ns == learn_stamp
        (out / "learn" / "mr" / "mr_000.nii.gz").unlink()
        build_demo_dataset(out, seed=0)  # a missing file: rebuilt
        assert (out / "learn" / "mr" / "mr_000.nii.gz").is_file() and datalist_path.stat().st_mtime_ns == stamps[0]
        build_demo_dataset(out, seed=2, learn=False)  # another seed: the stale learnability set is removed
        assert not (out / "learn").exists() and not learn_path.exists()
        assert datalist_path.stat().st_mtime_ns != stamps[0]
        patch.setattr(learnability, "PER_CLASS_2D", (1, 0, 1))
        with pytest.raises(ValueError, match="3 positive counts"):
            build_demo_dataset(out, seed=2)


def test_learn_generators_reject_unknown_classes():
    from medssl.data import learnability

    for generator in (learnability.learn_chest_xr, learnability.learn_fundus, learnability.learn_histology,
                      learnability.learn_chest_ct, learnability.learn_brain_mr):
        with pytest.raises(ValueError, match="class_index 3 outside 0..2"):
            generator(np.random.default_rng(0), 3)


def test_random_init_knn_reports_every_modality_and_encoder(learn, capsys):
    from medssl.evaluation.random_init import _main, random_init_knn

    root, _ = learn
    results = random_init_knn(root / "datalist_learn.json", ["PATH", "MR"], ["resnet_small_2d", "resnet_small_3d"],
                              seeds=(0,), k=3, eval_section="test")
    assert set(results) == {"PATH", "MR"}
    for modality, rows in results.items():
        expected = {"raw_pixels", "resnet_small_2d" if modality == "PATH" else "resnet_small_3d"}
        assert set(rows) == expected, modality
        assert all(0.0 <= row["accuracy"] <= 1.0 and len(row["per_seed"]) == 1 for row in rows.values())
    _main([str(root), "--modalities", "XR", "--encoders", "resnet_small_2d", "--seeds", "1", "--k", "3"])
    out = capsys.readouterr().out
    assert "| XR | raw_pixels | 64x64 |" in out and "| XR | resnet_small_2d | 64x64 |" in out


@pytest.mark.slow
def test_full_learn_build_and_random_init_knn_at_most_chance_plus_15_points(tmp_path):
    """The full build (timed, printed; the figure in DEMO_DATA.md) and the documented target: random-init kNN of the
    quick start's ResNet and raw-pixel kNN at most 1/3 + 0.15 on every modality."""
    from medssl.evaluation.random_init import random_init_knn

    started, cpu = time.perf_counter(), time.process_time()
    build_demo_dataset(tmp_path / "full", seed=0)
    print(f"full demo build: {time.perf_counter() - started:.1f} s wall, {time.process_time() - cpu:.1f} s CPU")
    datalist = json.loads((tmp_path / "full" / "datalist_learn.json").read_text())
    assert sum(it["dim"] == 2 for s in SECTIONS for it in datalist[s]) >= 3000
    assert sum(it["dim"] == 3 for s in SECTIONS for it in datalist[s]) >= 300
    results = random_init_knn(tmp_path / "full" / "datalist_learn.json",
                              encoders=["resnet_small_2d", "resnet_small_3d"])
    for modality, rows in results.items():
        for name, row in rows.items():
            assert row["accuracy"] <= 1 / 3 + 0.15, (modality, name, row)
