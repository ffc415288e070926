"""Issue 14 item 3: the segmentation bundles' inference.json as MONAI Label's ``monaibundle`` app runs it.

MONAI Label parses ``preprocessing``, ``inferer`` and ``postprocessing`` (without ``SaveImaged``), hands the
pre-processing ``{"image": path}`` (no ``modality``) and writes ``pred`` itself: a PNG for 2D (which needs a 2D
uint8 mask), a NIfTI for 3D (it drops the channel axis itself). Images without a modality get the one the bundle
metadata declares, so a CT volume gets its HU window, and a log line says so."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BUNDLES

SMOKE_NET = {"resnet_layers": [1, 1, 1, 1], "resnet_block_inplanes": [8, 16, 32, 64],
             "decoder_channels": [32, 16, 16, 8, 8]}


def _parser(bundle: Path, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), "device": "cpu", **SMOKE_NET, **overrides})
    return parser


def _first(demo_datalist: Path, modality: str, dim: int) -> str:
    item = next(it for it in json.loads(demo_datalist.read_text())["training"]
                if it["modality"] == modality and it["dim"] == dim and isinstance(it.get("label"), str))
    return str(demo_datalist.parent / item["image"])


def _monai_label_infer(parser, image: str) -> dict:
    """What MONAI Label's BundleInferTask does with the bundle's components: pre-processing, inferer, the
    post-processing without SaveImaged."""
    from monai.transforms import Compose, SaveImaged

    pre = parser.get_parsed_content("preprocessing")
    post = parser.get_parsed_content("postprocessing")
    network = parser.get_parsed_content("network").eval()
    data = pre({"image": image})
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], network)[0]
    return Compose([t for t in post.transforms if not isinstance(t, SaveImaged)])(data)


def test_2d_segmentation_returns_a_2d_uint8_mask(demo_datalist, caplog):
    from medssl.data import load_medical_image

    image = _first(demo_datalist, "XR", 2)
    parser = _parser(BUNDLES / "xray_segmentation_2d", image_size=[64, 64])
    with caplog.at_level(logging.INFO):
        out = _monai_label_infer(parser, image)
    pred = np.asarray(out["pred"])
    original = load_medical_image(image)
    assert pred.dtype == np.uint8 and pred.ndim == 2
    assert pred.shape == tuple(original.shape[-2:])
    assert pred.max() < 4
    assert "no 'modality' given: XR from the bundle metadata" in caplog.text


def test_3d_ct_without_modality_gets_the_hu_window(demo_datalist, caplog):
    bundle = BUNDLES / "ct_mr_segmentation_3d"
    image = _first(demo_datalist, "CT", 3)
    parser = _parser(bundle, patch_size=[64, 64, 16])
    pre = parser.get_parsed_content("preprocessing")
    with caplog.at_level(logging.INFO):
        without = pre({"image": image})
    assert "no 'modality' given: CT from the bundle metadata (its intensity preset applies)" in caplog.text
    with_ct = pre({"image": image, "modality": "CT"})
    assert without["modality"] == "CT"
    assert torch.equal(torch.as_tensor(without["image"]), torch.as_tensor(with_ct["image"]))
    as_mr = pre({"image": image, "modality": "MR"})  # percentiles: what MONAI Label got before
    assert not torch.allclose(torch.as_tensor(without["image"]), torch.as_tensor(as_mr["image"]))

    out = _monai_label_infer(parser, image)
    pred = np.asarray(out["pred"])
    assert pred.dtype == np.uint8 and pred.ndim == 4 and pred.shape[0] == 1  # MONAI Label drops the channel for 3D


def test_metadata_modality_reads_the_first_declared(tmp_path):
    from medssl.data.bundle_datasets import metadata_modality

    assert metadata_modality(BUNDLES / "ct_mr_segmentation_3d") == "CT"
    assert metadata_modality(BUNDLES / "xray_segmentation_2d") == "XR"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps({"network_data_format": {"inputs": {}}}))
    with pytest.raises(ValueError, match="modality is not set"):
        metadata_modality(tmp_path)
