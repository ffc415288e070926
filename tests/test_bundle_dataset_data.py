"""Issue 14 item 1: ``train#dataset#data`` is settable on every training bundle, as MONAI Label's ``/train/`` sets it.

Each bundle runs its smoke configuration with ``--train#dataset#data "[...]"``: a few demo items given on the
command line replace the datalist's. The segmentation and classification bundles get MONAI-Label-style items
(``image`` and ``label`` only): the bundle's modality and dimension fill the rest, and the run says so."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from medssl.bundle import find_bundles
from medssl.data.bundle_datasets import with_defaults

from conftest import BUNDLES, PYTHON, run_cmd

# the MedCoSS chain runs five stages, each of its own modality and kind: its train#dataset is the rehearsal wrapper
# around the stage's items (train#current#data), which a list of items for every stage would not fit; no MONAI Label
# use either (it pretrains)
NOT_SETTABLE = {"ssl_medcoss_continual_pretrain"}
TRAINING_BUNDLES = [
    b for b in find_bundles(BUNDLES) if (b / "configs" / "train.json").is_file() and b.name not in NOT_SETTABLE
]


def _items(demo_datalist: Path, n: int, *, dims=(2,), modalities=None, label=None, keys=None) -> list[dict]:
    """The first ``n`` demo training items of these dims / modalities / label kind (int class, str mask), absolute
    paths, only ``keys`` (all when None)."""
    out = []
    for it in json.loads(demo_datalist.read_text())["training"]:
        if it["dim"] not in dims or (modalities and it["modality"] not in modalities):
            continue
        if label is not None and not isinstance(it.get("label"), label):
            continue
        it = dict(it, image=str(demo_datalist.parent / it["image"]))
        if isinstance(it.get("label"), str):
            it["label"] = str(demo_datalist.parent / it["label"])
        out.append({k: it[k] for k in (keys or it) if k in it})
        if len(out) == n:
            return out
    raise AssertionError(f"the demo datalist has fewer than {n} such items")


MONAI_LABEL_KEYS = ("image", "label")


def _data_for(bundle: str, demo: Path) -> tuple[list[dict], bool]:
    """(the items for ``train#dataset#data``, whether they are MONAI-Label-style: image and label only)."""
    if bundle == "xray_segmentation_2d":
        return _items(demo, 4, modalities=("XR",), label=str, keys=MONAI_LABEL_KEYS), True
    if bundle == "ct_mr_segmentation_3d":
        return _items(demo, 2, dims=(3,), modalities=("CT",), label=str, keys=MONAI_LABEL_KEYS), True
    if bundle == "xray_classification":
        return _items(demo, 8, modalities=("XR",), label=int, keys=MONAI_LABEL_KEYS), True
    if bundle == "ct_volume_classification":
        return _items(demo, 4, dims=(3,), modalities=("CT",), label=int, keys=MONAI_LABEL_KEYS), True
    if bundle == "dvme_classification":
        return _items(demo, 8, modalities=("XR",), label=int, keys=("image", "modality", "dim", "label")), False
    if bundle == "ssl_swav_multimodal_pretrain":
        return _items(demo, 12, keys=("image", "modality", "dim", "label")), False
    if bundle in ("ssl_unimiss_pretrain", "ssl_joint_image_volume_pretrain"):
        return _items(demo, 6, keys=("image", "modality", "dim")) + _items(demo, 2, dims=(3,), keys=(
            "image", "modality", "dim")), False
    if bundle == "xray_lesion_detection":
        items = json.loads((demo.parent / "datalist_detection_2d.json").read_text())["training"][:4]
        boxes = [{"image": str(demo.parent / it["image"]), "boxes": it["boxes"], "labels": it["labels"]} for it in items]
        return boxes, True
    if bundle == "report_classification":
        items = json.loads((demo.parent / "datalist_sentences.json").read_text())["training"][:10]
        return [{"text": it["text"], "label": it["label"]} for it in items], False
    raise AssertionError(f"no test data for the training bundle {bundle}: add it here")


# bundles MONAI Label does not train, whose train#dataset is built as in a bundle tested here: under -m slow
SLOW = {
    "dvme_classification": "a plain MONAI Dataset whose data MONAI's config override sets as in the others",
    "report_classification": "medssl.data.bundle_datasets.bundle_dataset, as xray_classification's",
    "ssl_joint_image_volume_pretrain": "medssl.data.bundle_datasets.bundle_slice_dataset, whose data key MONAI's "
                                       "config override sets as bundle_dataset's in the others",
    "ssl_swav_multimodal_pretrain": "medssl.data.bundle_datasets.bundle_dataset, as xray_lesion_detection's",
    "ssl_unimiss_pretrain": "medssl.data.bundle_datasets.bundle_dataset, as xray_lesion_detection's",
}
PARAMS = [pytest.param(b, id=b.name, marks=[pytest.mark.slow] if b.name in SLOW else []) for b in TRAINING_BUNDLES]


@pytest.mark.parametrize("bundle", PARAMS)
def test_train_dataset_data_set_on_the_command_line(bundle, demo_datalist, tmp_path):
    data, monai_label_style = _data_for(bundle.name, demo_datalist)
    configs = "[" + ",".join(f"'{bundle / 'configs' / c}'" for c in ("train.json", "smoke.json")) + "]"
    cmd = [
        PYTHON, "-m", "monai.bundle", "run",
        "--config_file", configs,
        "--bundle_root", str(bundle),
        "--dataset_dir", str(demo_datalist.parent),
        "--datalist", str(demo_datalist),
        "--output_dir", str(tmp_path),
        "--ckpt_dir", str(tmp_path / "ckpt"),
        "--train#dataset#data", json.dumps(data),
        "--epochs", "1",  # one epoch shows the items reached the training run
    ]
    proc = run_cmd(cmd, cwd=bundle, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- output ---\n{out[-6000:]}"
    if bundle.name != "dvme_classification":  # a plain MONAI Dataset: nothing of ours logs its size
        assert f"training data: {len(data)} items" in out, out[-3000:]
    if monai_label_style:
        assert re.search(rf"{len(data)} of {len(data)} items had no 'modality'", out), out[-3000:]


def test_with_defaults_fills_only_missing_keys():
    items = with_defaults(["/a.png", {"image": "/b.png", "modality": "MR"}], {"modality": "CT", "dim": 3})
    assert items == [{"image": "/a.png", "modality": "CT", "dim": 3}, {"image": "/b.png", "modality": "MR", "dim": 3}]
    with pytest.raises(ValueError, match="empty"):
        with_defaults([], None)
    with pytest.raises(TypeError, match="list of items"):
        with_defaults("/a.png", None)
