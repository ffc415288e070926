"""tools/show_views.py: the grid of a pretraining bundle's augmented views, for the three pretraining bundles."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BUNDLES, load_tool


TOOL = load_tool("show_views.py", "show_views_tool")


def _png(path) -> np.ndarray:
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.std() > 5  # something is drawn
    return image


def test_choose_items_spreads_over_kinds_and_classes():
    items = (
        [{"image": f"xr{i}", "modality": "XR", "dim": 2, "label": i % 3} for i in range(9)]
        + [{"image": f"ct{i}", "modality": "CT", "dim": 3, "label": i % 2} for i in range(4)]
        + [{"image": f"mr{i}", "modality": "MR", "dim": 3} for i in range(5)]
    )
    chosen = TOOL.choose_items(items, 6, seed=0)
    kinds = [(items[i]["modality"], items[i].get("label")) for i in chosen]
    # class-labelled items first, the kinds in turn, each kind's classes in turn; the unlabelled kind after them
    assert kinds == [("CT", 0), ("XR", 0), ("CT", 1), ("XR", 1), ("CT", 0), ("XR", 2)]
    assert [items[i]["modality"] for i in TOOL.choose_items(items, 15, seed=0)[13:]] == ["MR", "MR"]
    assert chosen == TOOL.choose_items(items, 6, seed=0)
    assert sorted(TOOL.choose_items(items, 100, seed=1)) == list(range(len(items)))


def test_display_layout():
    grey = torch.rand(1, 5, 7)  # (C, X, Y): medssl's column-index-first 2D layout
    assert np.array_equal(TOOL._display(grey), grey[0].numpy().T)
    rgb = torch.rand(3, 5, 7)
    assert TOOL._display(rgb).shape == (7, 5, 3) and np.allclose(TOOL._display(rgb)[2, 4], rgb[:, 4, 2].numpy())
    volume = torch.rand(1, 5, 7, 9) * 3 - 1  # middle depth slice, clipped to [0, 1]
    assert np.array_equal(TOOL._display(volume), np.clip(volume[0, :, :, 4].numpy(), 0, 1).T)


def test_swav_views(demo_datalist, tmp_path):
    out = tmp_path / "views.png"
    result = TOOL.show_views(BUNDLES / "ssl_swav_multimodal_pretrain", demo_datalist.parent, out,
                             ["configs/demo.json"], n_items=3, seed=0)
    rows = result["rows"]
    assert len(rows) == 3
    # demo.json: 2 large crops of 64 and 4 small ones of 32, grey
    assert all(row["views"] == [(1, 64, 64)] * 2 + [(1, 32, 32)] * 4 for row in rows)
    # the demo's class-labelled 2D items (X-rays of three classes) come first, one of each class
    assert [row["modality"] for row in rows] == ["XR"] * 3 and sorted(row["label"] for row in rows) == [0, 1, 2]
    _png(out)


def test_unimiss_views_2d_and_3d(demo_datalist, tmp_path):
    out = tmp_path / "views.png"
    result = TOOL.show_views(BUNDLES / "ssl_unimiss_pretrain", demo_datalist.parent, out,
                             ["configs/smoke.json", "configs/demo.json"], n_items=2, seed=0)
    views = {row["dim"]: row["views"] for row in result["rows"]}
    assert set(views) == {2, 3}
    assert len(views[2]) == 2 and all(len(v) == 3 for v in views[2])  # two (C, H, W) views
    assert len(views[3]) == 2 and all(len(v) == 4 and v[-1] < v[1] for v in views[3])  # (C, X, Y, Z), depth last
    _png(out)


def test_joint_stage1_slices_and_stage3_volumes(demo_datalist, tmp_path):
    bundle = BUNDLES / "ssl_joint_image_volume_pretrain"
    stage1 = TOOL.show_views(bundle, demo_datalist.parent, tmp_path / "s1.png", ["configs/demo.json"], n_items=2)
    assert {row["dim"] for row in stage1["rows"]} == {2, 3}
    assert all(len(v) == 3 for row in stage1["rows"] for v in row["views"])  # 2D crops, also of the volumes' slices
    stage3 = TOOL.show_views(bundle, demo_datalist.parent, tmp_path / "s3.png",
                             ["configs/train_stage3.json", "configs/demo.json"], n_items=2)
    assert {row["dim"] for row in stage3["rows"]} == {3}
    assert all(len(v) == 4 for row in stage3["rows"] for v in row["views"])
    _png(tmp_path / "s1.png")
    _png(tmp_path / "s3.png")


@pytest.mark.parametrize("args, words", [
    (["--config", "configs/nope.json"], ["configs/nope.json", "not found"]),
    (["--n-items", "0"], ["--n-items 0"]),
])
def test_one_line_errors(demo_datalist, tmp_path, args, words):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = TOOL.main(["--bundle", str(BUNDLES / "ssl_swav_multimodal_pretrain"), "--dataset-dir",
                            str(demo_datalist.parent), "--out", str(tmp_path / "v.png"), *args])
    lines = err.getvalue().strip().splitlines()
    assert status == 2 and len(lines) == 1 and all(w in lines[0] for w in words), lines
    assert not (tmp_path / "v.png").exists()


def test_recipe_overlays_on_converted_medmnist(tmp_path):
    """recipes/medmnist.md's config overlays build every pretraining pipeline, at 64 pixels, on the union that
    tools/prepare_medmnist.py writes (synthetic files in the MedMNIST+ 64-pixel format)."""
    prepare = load_tool("prepare_medmnist.py", "prepare_medmnist_for_views")
    rng = np.random.default_rng(0)
    for name, shape, classes in (("pathmnist_64", (64, 64, 3), 9), ("organmnist3d_64", (64, 64, 64), 11)):
        arrays = {}
        for split, n in (("train", 3), ("val", 2), ("test", 2)):
            arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
            arrays[f"{split}_labels"] = rng.integers(0, classes, (n, 1)).astype(np.uint8)
        np.savez_compressed(tmp_path / f"{name}.npz", **arrays)
    data = tmp_path / "medmnist"
    prepare.prepare([tmp_path / "pathmnist_64.npz", tmp_path / "organmnist3d_64.npz"], data)

    recipe = BUNDLES.parent / "recipes" / "medmnist"
    swav, unimiss, joint = (BUNDLES / b for b in ("ssl_swav_multimodal_pretrain", "ssl_unimiss_pretrain",
                                                  "ssl_joint_image_volume_pretrain"))
    cases = [
        (swav, [recipe / "swav_2d.json"], {2: [(1, 64, 64)] * 2 + [(1, 32, 32)] * 6}),
        (swav, ["configs/train_3d.json", recipe / "swav_3d.json"], {3: [(1, 64, 64, 64)] + [(1, 32, 32, 32)] * 4}),
        (unimiss, [recipe / "unimiss.json"], {2: [(1, 64, 64)] * 2, 3: [(1, 64, 64, 16)] * 2}),
        (joint, [recipe / "joint.json"], {d: [(1, 64, 64)] * 2 + [(1, 32, 32)] * 6 for d in (2, 3)}),  # slices too
        (joint, ["configs/train_stage3.json", recipe / "joint.json"], {3: [(1, 64, 64, 64)] * 2}),
    ]
    for bundle, configs, expected in cases:
        result = TOOL.show_views(bundle, data, tmp_path / "v.png", [str(c) for c in configs], n_items=2)
        for row in result["rows"]:
            assert row["views"] == expected[row["dim"]], (bundle.name, configs, row)
            assert isinstance(row["label"], int)  # the union's global class index
