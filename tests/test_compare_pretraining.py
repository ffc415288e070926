"""tools/compare_pretraining.py without running it (the comparison itself is a long CPU job, not a default test):
the overrides that give a downstream bundle an exported encoder's architecture, the table, argument errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
from monai.bundle import ConfigParser

from conftest import BUNDLES, TOOLS


def _tool():
    spec = importlib.util.spec_from_file_location("compare_tool", TOOLS / "compare_pretraining.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RESNET = {"backbone": {"_target_": "medssl.networks.ResNetBackbone",
                       "kwargs": {"spatial_dims": 2, "in_channels": 1, "layers": [1, 1, 1, 1],
                                  "block_inplanes": [16, 32, 64, 128], "width": 1}}}


def test_resnet_overrides_build_the_exported_architecture():
    tool = _tool()
    configs, overrides = tool._encoder_overrides("xray_classification", RESNET)
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / "xray_classification" / "configs" / c) for c in ["train.json", *configs]])
    for key, value in overrides.items():
        parser[key] = value
    encoder = parser.get_parsed_content("encoder")
    assert type(encoder).__name__ == "ResNetBackbone" and encoder.feature_dim == 128 * 4
    configs, overrides = tool._encoder_overrides("xray_segmentation_2d", RESNET)
    assert overrides["resnet_layers"] == [1, 1, 1, 1] and overrides["resnet_block_inplanes"] == [16, 32, 64, 128]
    with pytest.raises(ValueError, match="no downstream mapping"):
        tool._encoder_overrides("xray_classification", {"backbone": {"_target_": "x.DenseNet3D", "kwargs": {}}})


def test_table_and_errors():
    tool = _tool()
    rows = [{"encoder": "swav", "knn_acc": "0.5 ± 0.1", "linear_acc": "0.6 ± 0.0", "finetune_auc": "0.700",
             "finetune_acc": "0.500", "seg_dice": "0.300"}]
    table = tool.format_table(rows, epochs=8, seeds=3)
    assert table.splitlines()[0].startswith("| encoder | kNN acc (probe, 3 seeds)") and "| swav | 0.5 ± 0.1 |" in table
    with pytest.raises(ValueError, match="unknown \\['byol'\\]"):
        tool.compare(methods="swav,byol")
