"""medssl.data.datalist and tools/datalist.py: datalist format, build from a folder, check for bad items."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medssl.data.datalist import (
    MODALITIES,
    build_datalist,
    check_datalist,
    load_datalist,
    normalize_modality,
    save_datalist,
)

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "datalist.py"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


# ------------------------------------------------------------------------------------------------------- fixtures
def write_dicom(path, pixels, modality="CT", position=None, series_uid=None, instance=1, sop_class=CTImageStorage):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = modality, series_uid or generate_uid(), instance
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(directory, z_positions, modality="CT", constant=False):
    os.makedirs(directory, exist_ok=True)
    uid = generate_uid()
    rng = np.random.RandomState(len(z_positions))
    for k, z in enumerate(z_positions):
        pixels = np.full((4, 5), 1000, np.uint16) if constant else rng.randint(0, 2000, (4, 5)).astype(np.uint16)
        write_dicom(os.path.join(directory, f"{uid[-4:]}_{k:03d}.dcm"), pixels, modality, (0.0, 0.0, z), uid, k + 1)
    return uid


def write_nifti(path, data, zooms=None):
    image = nib.Nifti1Image(np.asarray(data, np.float32), np.diag(list(zooms or (1.0, 1.0, 1.0)) + [1.0]))
    nib.save(image, path)


def make_good_files(root: Path) -> dict[str, dict]:
    """Good images of every supported kind; returns {relative path: expected item fields}."""
    rng = np.random.RandomState(0)
    write_series(root / "ct", [0.0, 2.0, 4.0, 6.0])
    (root / "xr").mkdir(parents=True)
    # an extension-less DICOM file (found by its DICM preamble), modality DX -> XR
    write_dicom(root / "xr" / "chest", rng.randint(0, 4000, (6, 7)).astype(np.uint16), "DX", sop_class=DX_STORAGE)
    (root / "nifti").mkdir()
    write_nifti(root / "nifti" / "brain.nii.gz", rng.rand(5, 6, 7), zooms=(1.0, 1.2, 2.0))
    write_nifti(root / "nifti" / "slice.nii", rng.rand(6, 5, 1))
    Image.fromarray(rng.randint(0, 256, (8, 9, 3)).astype(np.uint8)).save(root / "photo.png")
    import nrrd

    nrrd.write(
        str(root / "vol.nrrd"),
        rng.rand(4, 5, 6).astype(np.float32),
        {"space": "left-posterior-superior", "space directions": np.eye(3), "space origin": np.zeros(3)},
    )
    return {
        "ct": {"modality": "CT", "dim": 3},
        "xr/chest": {"modality": "XR", "dim": 2},
        "nifti/brain.nii.gz": {"modality": "MR", "dim": 3},
        "nifti/slice.nii": {"modality": "MR", "dim": 2},
        "photo.png": {"modality": "MR", "dim": 2},
        "vol.nrrd": {"modality": "MR", "dim": 3},
    }


def make_bad_files(root: Path) -> dict[str, dict]:
    """The corrupt inputs of the issue; returns {relative path: item fields}."""
    write_nifti(root / "full.nii.gz", np.random.RandomState(1).rand(16, 16, 16))
    raw = (root / "full.nii.gz").read_bytes()
    (root / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (root / "full.nii.gz").unlink()
    (root / "text.dcm").write_text("patient notes, not an image\n")
    (root / "empty_series").mkdir()
    write_nifti(root / "fourd.nii.gz", np.random.RandomState(2).rand(4, 4, 4, 3))
    write_nifti(root / "allnan.nii.gz", np.full((4, 4, 4), np.nan))
    return {
        "truncated.nii.gz": {"modality": "MR", "dim": 3},
        "text.dcm": {"modality": "CT", "dim": 2},
        "empty_series": {"modality": "CT", "dim": 3},
        "fourd.nii.gz": {"modality": "MR", "dim": 3},
        "allnan.nii.gz": {"modality": "MR", "dim": 3},
    }


def run_tool(*args, cwd=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "common"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


BAD_LINE = re.compile(r"^(training|validation|test) item (\d+): (.+?): (.+)$")


# ----------------------------------------------------------------------------------------------------------- tests
def test_normalize_modality_aliases_and_error():
    assert [normalize_modality(v) for v in ("ct", " MRI", "CR", "DX", "dr", "RG", "PET", "SM", "WSI", "OP")] == [
        "CT",
        "MR",
        "XR",
        "XR",
        "XR",
        "XR",
        "PT",
        "PATH",
        "PATH",
        "FUNDUS",
    ]
    assert all(normalize_modality(m) == m for m in MODALITIES)
    with pytest.raises(ValueError) as info:
        normalize_modality("OT")
    assert "'OT'" in str(info.value) and all(m in str(info.value) for m in MODALITIES)


def test_load_datalist_resolves_paths_and_keeps_values(tmp_path):
    data = tmp_path / "data"
    (data / "MR").mkdir(parents=True)  # a folder named like a modality must not turn "MR" into a path
    items = [
        {"image": "MR/a.nii.gz", "modality": "MR", "dim": 3, "label": "MR/a_seg.nii.gz"},
        {"image": "b.png", "modality": "dx", "dim": 2, "label": 1},
        {"image": "c.png", "modality": "PATH", "dim": 2, "label": [0, 1, 1]},
    ]
    (tmp_path / "lists").mkdir()
    path = tmp_path / "lists" / "dl.json"
    path.write_text(json.dumps({"dataset_dir": "../data", "training": items, "validation": items[:1]}))
    loaded = load_datalist(path)
    assert loaded[0]["image"] == str(data / "MR" / "a.nii.gz")
    assert loaded[0]["label"] == str(data / "MR" / "a_seg.nii.gz")
    assert loaded[0]["modality"] == "MR" and loaded[0]["dim"] == 3
    assert loaded[1]["modality"] == "XR" and loaded[1]["label"] == 1
    assert loaded[2]["label"] == [0, 1, 1]
    assert load_datalist(path, "validation", dataset_dir=tmp_path / "other")[0]["image"] == str(
        tmp_path / "other" / "MR" / "a.nii.gz"
    )
    path.write_text(json.dumps({"training": items}))  # no dataset_dir entry: the datalist's folder
    assert load_datalist(path)[1]["image"] == str(tmp_path / "lists" / "b.png")


def test_load_datalist_errors_name_file_and_item(tmp_path):
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"training": [{"image": "a.png", "modality": "CT"}, {"modality": "CT"}]}))
    with pytest.raises(ValueError, match=r"dl\.json training item 1: no \"image\""):
        load_datalist(path)
    path.write_text(json.dumps({"training": [{"image": "a.png", "modality": "XX"}]}))
    with pytest.raises(ValueError, match=r"dl\.json training item 0: unknown modality 'XX'.*CT, MR, XR"):
        load_datalist(path)
    with pytest.raises(ValueError, match=r"no 'test' list"):
        load_datalist(path, "test")


def test_save_datalist_round_trip(tmp_path):
    data = tmp_path / "data"
    out = tmp_path / "out" / "dl.json"
    save_datalist(
        out,
        [{"image": str(data / "x" / "a.nii.gz"), "modality": "mri", "dim": 3}],
        [{"image": str(data / "b.png"), "modality": "XR", "dim": 2, "label": str(data / "b_mask.png")}],
        name="demo",
        dataset_dir=data,
    )
    raw = json.loads(out.read_text())
    assert raw["training"][0] == {"image": "x/a.nii.gz", "modality": "MR", "dim": 3}
    assert raw["validation"][0]["label"] == "b_mask.png" and raw["name"] == "demo"
    assert load_datalist(out)[0]["image"] == str(data / "x" / "a.nii.gz")
    assert load_datalist(out, "validation")[0]["label"] == str(data / "b_mask.png")
    with pytest.raises(ValueError, match="training item 0"):
        save_datalist(out, [{"image": "a.png", "modality": "CT", "dim": 4}])


def test_build_datalist_mixed_folder(tmp_path, capsys):
    root = tmp_path / "data"
    expected = make_good_files(root)
    uid_a = write_series(root / "two", [0.0, 3.0, 6.0], modality="MR")
    uid_b = write_series(root / "two", [100.0, 103.0], modality="MR")
    write_series(root / "dup", [0.0, 1.0, 1.0, 2.0])
    write_nifti(root / "fourd.nii.gz", np.zeros((3, 3, 3, 2)))
    (root / "text.dcm").write_text("not dicom")
    (root / "notes.txt").write_text("ignored")
    out = tmp_path / "dl.json"

    # without --modality: the non-DICOM files are reported, not dropped silently
    written = build_datalist(root, out, progress_every=3)
    listed = {it["image"] for it in written["training"]}
    assert listed == {"ct", "xr/chest", "two"}  # the two series of "two" share the directory
    excluded = {e["image"]: e["reason"] for e in written["excluded"]}
    assert "no modality" in excluded["nifti/brain.nii.gz"] and "no modality" in excluded["photo.png"]
    assert "4-D image" in excluded["fourd.nii.gz"]
    assert "text.dcm" in excluded and "duplicate slice" in excluded["dup"]
    captured = capsys.readouterr()
    assert "scanned 3 files" in captured.err  # progress
    assert f"excluded: {root / 'fourd.nii.gz'}: " in captured.out

    written = build_datalist(root, out, modality="MR", val_fraction=0.25, test_fraction=0.25, seed=3, verbose=False)
    items = written["training"] + written["validation"] + written["test"]
    by_image = {}
    for it in items:
        by_image.setdefault(it["image"], []).append(it)
    for image, fields in expected.items():
        assert by_image[image] == [dict(image=image, **fields)], image
    assert sorted(it["series_uid"] for it in by_image["two"]) == sorted([uid_a, uid_b])
    assert all(it["modality"] == "MR" and it["dim"] == 3 for it in by_image["two"])
    n = len(items)
    assert n == len(expected) + 2 and len(written["validation"]) == round(n * 0.25) == len(written["test"])
    again = build_datalist(
        root, tmp_path / "again.json", modality="MR", val_fraction=0.25, test_fraction=0.25, seed=3, verbose=False
    )
    assert again["validation"] == written["validation"] and again["test"] == written["test"]

    # everything listed loads with the training readers, with the declared dimension
    from medssl.data.readers import LoadMedicalImaged

    loader = LoadMedicalImaged()
    for section in ("training", "validation", "test"):
        for item in load_datalist(out, section):
            sample = loader(item)
            assert sample["image"].ndim - 1 == item["dim"], item["image"]


def test_check_cli_names_every_bad_file_and_only_those(tmp_path):
    root = tmp_path / "data"
    good = make_good_files(root)
    bad = make_bad_files(root)
    items = [dict(image=k, **v) for k, v in list(good.items()) + list(bad.items())]
    mixed = root / "mixed.json"
    mixed.write_text(json.dumps({"training": items[::2], "validation": items[1::2]}))
    report = tmp_path / "report.json"

    result = run_tool("check", mixed, "--report", report)
    assert result.returncode != 0, result.stdout + result.stderr
    named = {}
    for line in result.stdout.splitlines():
        match = BAD_LINE.match(line)
        if match:
            named[os.path.relpath(match.group(3), root)] = match.group(4)
    assert set(named) == set(bad), result.stdout
    assert "EOFError" in named["truncated.nii.gz"] or "corrupt" in named["truncated.nii.gz"]
    assert "not a DICOM file" in named["text.dcm"]
    assert "empty series directory" in named["empty_series"]
    assert "4-D image" in named["fourd.nii.gz"]
    assert "NaN/Inf" in named["allnan.nii.gz"]
    assert re.search(r"CT 3D: \d+ items? \(1 bad\)", result.stdout)  # per-modality / per-dimension summary
    written = json.loads(report.read_text())
    assert {os.path.relpath(i["image"], root) for i in written["items"] if not i["ok"]} == set(bad)
    assert written["summary"]["bad"] == len(bad) and written["summary"]["ok"] == len(good)
    for entry in written["items"]:
        assert set(entry) >= {"image", "ok", "error", "dim", "shape", "spacing", "modality"}
    brain = next(i for i in written["items"] if i["image"].endswith("brain.nii.gz"))
    assert brain["ok"] and brain["shape"] == [5, 6, 7] and brain["spacing"] == pytest.approx([1.0, 1.2, 2.0])

    # build + check on good data: exit status 0
    for name in bad:
        target = root / name
        target.rmdir() if target.is_dir() else target.unlink()
    mixed.unlink()
    built = run_tool("build", "--root", root, "--out", tmp_path / "good.json", "--modality", "MR")
    assert built.returncode == 0, built.stderr
    checked = run_tool("check", tmp_path / "good.json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(good)} ok, 0 bad" in checked.stdout


def test_check_detects_series_spacing_dim_and_modality_problems(tmp_path):
    root = tmp_path
    write_series(root / "dup", [0.0, 2.0, 2.0, 4.0])
    write_series(root / "gap", [0.0, 2.0, 4.0, 10.0, 12.0])
    write_series(root / "flat", [0.0, 2.0, 4.0], constant=True)
    write_series(root / "ok", [0.0, 2.0, 4.0])
    write_series(root / "multi", [0.0, 2.0])
    write_series(root / "multi", [50.0, 52.0])
    zero = nib.Nifti1Image(np.random.RandomState(0).rand(4, 4, 4).astype(np.float32), None)
    zero.header["pixdim"][1:4] = [0.0, 1.0, 1.0]
    nib.save(zero, root / "zero.nii")
    write_nifti(root / "vol.nii.gz", np.random.RandomState(1).rand(4, 4, 4))
    items = {
        "dup": ({"image": "dup", "modality": "CT", "dim": 3}, "duplicate slice"),
        "gap": ({"image": "gap", "modality": "CT", "dim": 3}, "missing slice"),
        "flat": ({"image": "flat", "modality": "CT", "dim": 3}, "constant image"),
        "multi": ({"image": "multi", "modality": "CT", "dim": 3}, "2 DICOM series"),
        "dim": ({"image": "vol.nii.gz", "modality": "MR", "dim": 2}, "declares dim=2"),
        "unknown": ({"image": "vol.nii.gz", "modality": "XX", "dim": 3}, "unknown modality 'XX'"),
        "nomod": ({"image": "vol.nii.gz", "dim": 3}, "no modality"),
        "tag": ({"image": "ok", "modality": "MR", "dim": 3}, "DICOM Modality tag is CT"),
        "noimage": ({"modality": "CT", "dim": 3}, 'no "image"'),
        "missing": ({"image": "gone.nii.gz", "modality": "CT", "dim": 3}, "file not found"),
    }
    good = [{"image": "ok", "modality": "CT", "dim": 3}, {"image": "vol.nii.gz", "modality": "mri", "dim": 3}]
    good.append({"image": "zero.nii", "modality": "MR", "dim": 3})  # zero pixdim: a warning, read as 1 mm
    path = root / "dl.json"
    path.write_text(json.dumps({"training": good + [v[0] for v in items.values()]}))
    lines = []
    report = check_datalist(path, print_fn=lines.append, progress_every=0)
    results = report["items"]
    assert results[0]["ok"] and results[1]["ok"] and results[2]["ok"], results[:3]
    assert results[0]["shape"] == [5, 4, 3] and results[0]["spacing"] == pytest.approx([0.5, 0.5, 2.0])
    assert results[2]["warnings"] == ["zero spacing (pixdim) [0.0, 1.0, 1.0]: read as 1 mm"]
    assert f"warning: training item 2: {root / 'zero.nii'}: zero spacing (pixdim)" in "\n".join(lines)
    for result, (name, (_, problem)) in zip(results[3:], items.items()):
        assert not result["ok"] and problem in result["error"], (name, result["error"])
    bad_lines = [line for line in lines if BAD_LINE.match(line) or "(no image)" in line]
    assert len(bad_lines) == len(items)
    parallel = check_datalist(path, workers=2, verbose=False)
    assert [(r["ok"], r["error"]) for r in parallel["items"]] == [(r["ok"], r["error"]) for r in results]


def test_help_documents_every_command():
    result = run_tool("--help")  # fire prints help on stderr
    text = result.stdout + result.stderr
    assert result.returncode == 0
    assert "Scan a folder of images" in text and "Open every item of a datalist" in text
    for command, flags in {
        "build": ("ROOT", "OUT", "--modality", "--val_fraction", "--test_fraction", "--seed"),
        "check": ("--dataset_dir", "--report", "--workers", "--sections"),
    }.items():
        result = run_tool(command, "--help")
        text = result.stdout + result.stderr
        assert all(flag in text for flag in flags), (command, text)


# ------------------------------------------------------------------------------------- datalists from the wild
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def test_msd_style_datalist_without_dim_or_item_modality(tmp_path):
    """Medical Segmentation Decathlon dataset.json: image / label items, a channel-map "modality", plain test paths."""
    from medssl.data import load_items
    from medssl.data.readers import LoadMedicalImaged

    rng = np.random.RandomState(0)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (tmp_path / folder).mkdir()
    for name in ("la_003", "la_004"):
        write_nifti(tmp_path / "imagesTr" / f"{name}.nii.gz", rng.rand(6, 5, 4), zooms=(1.0, 1.0, 2.5))
        write_nifti(tmp_path / "labelsTr" / f"{name}.nii.gz", rng.rand(6, 5, 4) > 0.5)
    write_nifti(tmp_path / "imagesTr" / "flat.nii.gz", rng.rand(6, 5, 1))  # (X, Y, 1): a 2D image
    write_nifti(tmp_path / "imagesTs" / "la_010.nii.gz", rng.rand(6, 5, 4))
    dataset = {
        "name": "Heart",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "left atrium"},
        "numTraining": 3,
        "training": [
            {"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in ("la_003", "la_004")
        ]
        + [{"image": "./imagesTr/flat.nii.gz"}],
        "test": ["./imagesTs/la_010.nii.gz"],
    }
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(dataset))

    lines = []
    report = check_datalist(path, print_fn=lines.append, progress_every=0)
    assert report["summary"]["bad"] == 0, lines
    assert report["summary"]["dim_from_header"] == {"2D": 1, "3D": 3}
    assert '"dim" read from the image headers (as the bundles do at load): 2D: 1, 3D: 3' in "\n".join(lines)
    assert "  MR 3D: 3 items" in lines and "  MR 2D: 1 item" in lines
    assert run_tool("check", path).returncode == 0

    items = load_items(path, "training", dims=[3], keys=["image", "modality", "dim", "label"], labelled_only="mask")
    assert [(Path(it["image"]).name, it["modality"], it["dim"]) for it in items] == [
        ("la_003.nii.gz", "MR", 3),
        ("la_004.nii.gz", "MR", 3),
    ]
    assert items[0]["label"] == str(tmp_path / "labelsTr" / "la_003.nii.gz")
    assert [it["dim"] for it in load_items(path, "training", dims=[2])] == [2]
    (test_item,) = load_items(path, "test", dims=[3])
    assert test_item["image"] == str(tmp_path / "imagesTs" / "la_010.nii.gz") and test_item["modality"] == "MR"
    sample = LoadMedicalImaged()(dict(items[0]))
    assert tuple(sample["image"].shape) == (1, 6, 5, 4)

    # no "dim" and a header that gives none: one error naming the item, its file and the way out
    dataset["training"].append({"image": "./imagesTr/gone.nii.gz"})
    path.write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match=r'dataset\.json training item 3: no "dim", and the header of .*gone\.nii\.gz '
                       r"gives none \(file not found\).*tools/datalist.py check"):
        load_datalist(path)
    # a channel map naming several modalities gives the items none: check says so
    dataset["training"].pop()
    dataset["modality"] = {"0": "T2", "1": "ADC"}
    path.write_text(json.dumps(dataset))
    report = check_datalist(path, verbose=False, sections="training")
    assert all("no modality" in r["error"] and "{'0': 'T2', '1': 'ADC'}" in r["error"] for r in report["items"])


def test_zero_or_missing_pixel_spacing_is_a_warning_and_the_image_loads(tmp_path):
    """A computed radiograph with PixelSpacing [0, 0]: check and build warn (read as 1 mm), the readers load it."""
    import nrrd
    import pydicom

    from medssl.data.readers import load_medical_image

    rng = np.random.RandomState(0)
    root = tmp_path / "data"
    root.mkdir()
    write_dicom(root / "cr_zero.dcm", rng.randint(0, 4000, (6, 7)).astype(np.uint16), "CR", sop_class=CR_STORAGE)
    write_dicom(root / "cr_none.dcm", rng.randint(0, 4000, (6, 7)).astype(np.uint16), "CR", sop_class=CR_STORAGE)
    write_series(root / "ct_zero", [0.0, 2.0, 4.0])
    for file, change in [(root / "cr_zero.dcm", [0.0, 0.0]), (root / "cr_none.dcm", None)]:
        ds = pydicom.dcmread(file)
        if change is None:
            del ds.PixelSpacing
        else:
            ds.PixelSpacing = change
        ds.save_as(file)
    for file in (root / "ct_zero").iterdir():
        ds = pydicom.dcmread(file)
        ds.PixelSpacing = [0.0, 0.0]
        ds.save_as(file)
    header = {"space": "left-posterior-superior", "space directions": np.diag([0.0, 1.0, 1.0]), "space origin": [0, 0, 0]}
    nrrd.write(str(root / "mr_zero.nrrd"), rng.rand(4, 5, 6).astype(np.float32), header)
    expected = {
        "cr_zero.dcm": "zero PixelSpacing [0.0, 0.0]: read as 1 mm",
        "cr_none.dcm": "no PixelSpacing in the header: read as 1 mm",
        "ct_zero": "zero spacing [0.0, 0.0, 2.0]: read as 1 mm",
        "mr_zero.nrrd": "zero spacing (space directions) [0.0, 1.0, 1.0]: read as 1 mm",
    }

    built = run_tool("build", "--root", root, "--out", tmp_path / "dl.json", "--modality", "MR")
    assert built.returncode == 0, built.stderr
    written = json.loads((tmp_path / "dl.json").read_text())
    assert {it["image"] for it in written["training"]} == set(expected) and written["excluded"] == []
    for name, warning in expected.items():
        assert f"warning: {root / name}: {warning}" in built.stdout, built.stdout

    checked = run_tool("check", tmp_path / "dl.json")
    assert checked.returncode == 0, checked.stdout
    assert "4 ok (4 with warnings), 0 bad" in checked.stdout
    report = check_datalist(tmp_path / "dl.json", verbose=False)
    assert {Path(r["image"]).name: r["warnings"] for r in report["items"]} == {k: [v] for k, v in expected.items()}
    for item in load_datalist(tmp_path / "dl.json"):  # what check promises: each loads, at 1 mm
        image = load_medical_image(item["image"])
        assert image.ndim - 1 == item["dim"] and torch_allclose(image.pixdim[:2], [1.0, 1.0]), item["image"]


def torch_allclose(values, expected) -> bool:
    return bool(np.allclose(np.asarray(values, dtype=float), expected))


def test_build_pairs_masks_with_their_images(tmp_path):
    import nrrd

    rng = np.random.RandomState(0)
    root = tmp_path / "data"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    space = {"space": "left-posterior-superior", "space directions": np.eye(3), "space origin": np.zeros(3)}
    for case, mask_shape in (("case1", (4, 5, 6)), ("case2", (4, 5, 6)), ("case3", (4, 5, 7))):
        nrrd.write(str(root / f"{case}_image.nrrd"), rng.rand(4, 5, 6).astype(np.float32), space)
        nrrd.write(str(root / f"{case}_label.nrrd"), (rng.rand(*mask_shape) > 0.5).astype(np.uint8), space)
    Image.fromarray(rng.randint(0, 256, (8, 9)).astype(np.uint8)).save(root / "benign (1).png")
    Image.fromarray((rng.rand(8, 9) > 0.5).astype(np.uint8) * 255).save(root / "benign (1)_mask.png")
    Image.fromarray((rng.rand(8, 9) > 0.5).astype(np.uint8) * 255).save(root / "benign (1)_mask_1.png")
    write_nifti(root / "imagesTr" / "la_003.nii.gz", rng.rand(6, 5, 4))
    write_nifti(root / "labelsTr" / "la_003.nii.gz", rng.rand(6, 5, 4) > 0.5)
    write_nifti(root / "orphan_seg.nii.gz", rng.rand(6, 5, 4) > 0.5)

    result = run_tool("build", "--root", root, "--out", tmp_path / "dl.json", "--modality", "MR")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "dl.json").read_text())
    labels = {it["image"]: it.get("label") for it in written["training"]}
    assert labels == {
        "case1_image.nrrd": "case1_label.nrrd",
        "case2_image.nrrd": "case2_label.nrrd",
        "case3_image.nrrd": None,
        "benign (1).png": "benign (1)_mask.png",
        "imagesTr/la_003.nii.gz": "labelsTr/la_003.nii.gz",
    }
    left_out = {e["image"]: e["reason"] for e in written["excluded"]}
    assert set(left_out) == {"case3_label.nrrd", "benign (1)_mask_1.png", "orphan_seg.nii.gz"}
    assert "shape [4, 5, 7] differs" in left_out["case3_label.nrrd"]
    assert "already has the mask benign (1)_mask.png" in left_out["benign (1)_mask_1.png"]
    assert "no listed image of the same name" in left_out["orphan_seg.nii.gz"]
    assert (
        'masks: 7 files named like masks (*_label*, *_seg*, *mask*, or in labels/masks folders): 4 paired with '
        'their image as "label", 3 left out (see excluded)' in result.stdout
    )
    loaded = {Path(it["image"]).name: it.get("label") for it in load_datalist(tmp_path / "dl.json")}
    assert loaded["case1_image.nrrd"] == str(root / "case1_label.nrrd")


def test_empty_folder_or_datalist_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    for folder in (empty, tmp_path / "notes"):
        result = run_tool("build", "--root", folder, "--out", tmp_path / "dl.json")
        assert result.returncode == 2 and not (tmp_path / "dl.json").exists(), result.stdout + result.stderr
        assert re.fullmatch(rf"error: {re.escape(str(folder))}: no image to list \(.*nothing written.*\n", result.stderr)

    for content in ({"training": []}, {"training": [], "validation": [], "test": []}, {"name": "x"}):
        path = tmp_path / "dl.json"
        path.write_text(json.dumps(content))
        result = run_tool("check", path)
        assert result.returncode == 2 and result.stderr.startswith(f"error: {path}: the datalist has no items ")
        with pytest.raises(ValueError, match="the datalist has no items"):
            load_datalist(path)
    # an empty section of a datalist with items is just empty
    path.write_text(json.dumps({"training": [{"image": "a.png", "modality": "XR", "dim": 2}], "test": []}))
    assert load_datalist(path, "test") == []


def test_build_reads_headers_only_and_points_to_check(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_nifti(root / "good.nii.gz", np.random.RandomState(0).rand(8, 8, 8))
    write_nifti(root / "full.nii.gz", np.random.RandomState(1).rand(32, 32, 32))
    raw = (root / "full.nii.gz").read_bytes()
    (root / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (root / "full.nii.gz").unlink()
    write_nifti(root / "allnan.nii.gz", np.full((4, 4, 4), np.nan))

    built = run_tool("build", "--root", root, "--out", tmp_path / "dl.json", "--modality", "MR")
    assert built.returncode == 0, built.stderr
    listed = {it["image"] for it in json.loads((tmp_path / "dl.json").read_text())["training"]}
    assert listed == {"good.nii.gz", "truncated.nii.gz", "allnan.nii.gz"}  # headers only: all three get in
    assert (
        "note: build reads headers only, so truncated files, NaN/Inf values and constant images are listed too: "
        f"run `python tools/datalist.py check {tmp_path / 'dl.json'}` before training" in built.stdout
    )
    checked = run_tool("check", tmp_path / "dl.json")
    assert checked.returncode == 1 and "1 ok, 2 bad" in checked.stdout
    bad = {Path(m.group(3)).name for m in map(BAD_LINE.match, checked.stdout.splitlines()) if m}
    assert bad == {"truncated.nii.gz", "allnan.nii.gz"}
