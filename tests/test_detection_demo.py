"""The demo detection set (medssl.data.detection_demo): deterministic, fast, boxes inside the images around the
lesions, and the axis order of the boxes against the arrays MONAI loads ((C, X, Y): column index first)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from medssl.data.detection_demo import (
    DETECTION_CLASSES,
    DETECTION_DATALIST,
    DETECTION_SPLIT,
    build_detection_set,
    detection_set_is_current,
    synthetic_xr_lesions,
)


@pytest.fixture(scope="module")
def detection_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("detect")
    start = time.perf_counter()
    path = build_detection_set(out, seed=0)
    return out, json.loads(path.read_text()), time.perf_counter() - start


def test_fast_deterministic_and_current(detection_set, tmp_path):
    out, datalist, seconds = detection_set
    assert seconds < 5.0, f"{seconds:.1f} s"
    assert [len(datalist[s]) for s in ("training", "validation", "test")] == list(DETECTION_SPLIT)
    assert datalist["detection_classes"] == list(DETECTION_CLASSES)
    assert (out / DETECTION_DATALIST).is_file() and (out / datalist["training"][0]["image"]).is_file()
    assert detection_set_is_current(out, 0) and not detection_set_is_current(out, 1)
    again = json.loads(build_detection_set(tmp_path, seed=0).read_text())
    assert again == datalist
    first = datalist["training"][0]["image"]
    assert (tmp_path / first).read_bytes() == (out / first).read_bytes()


def test_boxes_valid_normals_and_every_kind(detection_set):
    out, datalist, _ = detection_set
    kinds, normals = set(), 0
    for section in ("training", "validation", "test"):
        for item in datalist[section]:
            assert item["modality"] == "XR" and item["dim"] == 2
            assert len(item["boxes"]) == len(item["labels"])
            normals += not item["boxes"]
            width, height = Image.open(out / item["image"]).size
            for (x1, y1, x2, y2), label in zip(item["boxes"], item["labels"]):
                assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, item
                kinds.add(DETECTION_CLASSES[label])
    assert kinds == set(DETECTION_CLASSES)
    assert normals == sum(DETECTION_SPLIT) // 4


def test_box_axis_order_against_the_loaded_array(detection_set):
    """A box [x1, y1, x2, y2] (x = column) is png[y1:y2, x1:x2] in the PNG's (H, W) array and image[0, x1:x2, y1:y2]
    in the (C, X, Y) array medssl's loader (MONAI's PIL reader) returns; the lesion is brighter inside than in a
    ring around it."""
    from medssl.data import LoadMedicalImaged

    out, datalist, _ = detection_set
    item = next(it for it in datalist["training"] if it["boxes"])
    png = np.asarray(Image.open(out / item["image"]), dtype=np.float64)
    loaded = LoadMedicalImaged(keys="image", orientation="RAS")({"image": str(out / item["image"]), "modality": "XR"})
    image = np.asarray(loaded["image"], dtype=np.float64)
    image = image[None] if image.ndim == 2 else image
    assert image.shape[1:] == (png.shape[1], png.shape[0])  # (C, X = width, Y = height)
    np.testing.assert_array_equal(image[0], png.T)
    x1, y1, x2, y2 = item["boxes"][0]
    np.testing.assert_array_equal(image[0, x1:x2, y1:y2], png[y1:y2, x1:x2].T)


def test_lesion_is_inside_its_box():
    """The image minus the same phantom drawn as normal (same random stream): where the difference exceeds half its
    maximum lies inside the boxes (2 px of rounding allowed), and every box holds such pixels: the lesions are drawn
    where the boxes say."""
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    lesioned, boxes, labels = synthetic_xr_lesions(rng_a, normal=False)
    normal, no_boxes, _ = synthetic_xr_lesions(rng_b, normal=True)
    assert boxes and not no_boxes and len(labels) == len(boxes)
    difference = np.abs(lesioned.astype(np.int16) - normal.astype(np.int16))  # (H, W): rows = y
    strong = difference > 0.5 * difference.max()
    inside = np.zeros_like(strong)
    for x1, y1, x2, y2 in boxes:
        inside[max(y1 - 2, 0):y2 + 2, max(x1 - 2, 0):x2 + 2] = True
        assert difference[y1:y2, x1:x2].max() > 0.25 * difference.max()
    assert strong.any() and not (strong & ~inside).any()


def test_bundle_transforms_keep_boxes_on_their_lesions(tmp_path):
    """The bundle's training pipeline (loading, ResizeBoxd, MONAI's RandZoomBoxd / RandFlipBoxd /
    RandCropBoxByPosNegLabeld / ClipBoxToImaged, each forced on) on a PNG whose only bright pixels are two box-shaped
    lesions: after the transforms every box still covers bright pixels only, and no bright pixel lies outside the
    boxes (1 px of interpolation allowed)."""
    from monai.bundle import ConfigParser

    from conftest import BUNDLES

    png = np.full((100, 120), 20, dtype=np.uint8)  # (H, W) = (rows y, columns x)
    png[::7, ::5] = 40  # a texture, so the percentile scaling has a range
    boxes = [[10, 20, 30, 32], [70, 60, 100, 90]]  # [x1, y1, x2, y2]
    for x1, y1, x2, y2 in boxes:
        png[y1:y2, x1:x2] = 255
    Image.fromarray(png).save(tmp_path / "lesions.png")
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "xray_lesion_detection" / "configs" / "train.json"))
    parser.update({"image_size": [128, 128], "crop_size": [96, 96], "train#augmentation#0#prob": 1.0,
                   "train#augmentation#1#prob": 1.0})
    transform = parser.get_parsed_content("train#preprocessing", instantiate=True)
    transform.set_random_state(seed=3)
    item = {"image": str(tmp_path / "lesions.png"), "modality": "XR", "dim": 2, "boxes": boxes, "labels": [0, 1]}
    out = transform(item)
    out = out[0] if isinstance(out, list) else out
    image = np.asarray(out["image"])[0]  # (X, Y)
    assert image.shape == (96, 96) and len(out["boxes"]) >= 1
    bright = image > 0.5 * image.max()
    covered = np.zeros_like(bright)
    for x1, y1, x2, y2 in np.asarray(out["boxes"]).round().astype(int):
        inner = image[x1 + 1:x2 - 1, y1 + 1:y2 - 1]
        assert inner.size and (inner > 0.5 * image.max()).mean() > 0.95, (x1, y1, x2, y2)
        covered[max(x1 - 1, 0):x2 + 1, max(y1 - 1, 0):y2 + 1] = True
    assert bright.any() and not (bright & ~covered).any()
