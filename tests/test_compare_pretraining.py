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


def _parsed(bundle: str, overrides: dict, key: str):
    """``key`` of ``bundle``'s train.json with the tool's ``overrides`` set."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / "train.json")])
    for name, value in overrides.items():
        parser[name] = value
    return parser.get_parsed_content(key)


def test_resnet_overrides_build_the_exported_architecture():
    tool = _tool()
    encoder = _parsed("xray_classification", tool._encoder_overrides(RESNET), "encoder")
    assert type(encoder).__name__ == "ResNetBackbone" and encoder.feature_dim == 128 * 4
    with pytest.raises(ValueError, match="no fine-tuning mapping"):
        tool._encoder_overrides({"backbone": {"_target_": "x.DenseNet3D", "kwargs": {}}})


def _row(method, mean, ci, random=False, arch="resnet-small", dims=2):
    return {"method": method, "encoder": f"random ({method} arch.)" if random else method, "dims": dims,
            "random": random, "arch": arch, "linear@0.1": {"mean": mean, "ci95": ci, "values": []},
            "knn@0.1": {"mean": mean - 0.05, "ci95": ci, "values": []}}


def test_table_verdict_needs_confidence_intervals_apart():
    tool = _tool()
    base = _row("swav", 0.40, 0.02, random=True)
    clear, overlapping = _row("swav", 0.50, 0.03), _row("deepcluster", 0.43, 0.03)
    assert tool.beats_random(clear, base) is True
    assert tool.beats_random(overlapping, base) is False  # 0.43 - 0.03 < 0.40 + 0.02
    assert tool.beats_random({"method": "x"}, base) is None
    table = tool.format_table([clear, base, overlapping], fractions=[0.1], seeds=3)
    lines = table.splitlines()
    assert lines[0].startswith("| method | dims | encoder | kNN 10 % | linear 10 % |")
    assert "| swav | 2D | swav | 0.450 ± 0.030 | 0.500 ± 0.030 | **yes** |" in table
    assert "| deepcluster | 2D | deepcluster | 0.380 ± 0.030 | 0.430 ± 0.030 | no |" in table
    # a method whose architecture has no random baseline gets no verdict
    other = _row("unimiss", 0.9, 0.01, arch="mit", dims=3)
    assert "| unimiss | 3D | unimiss | 0.850 ± 0.010 | 0.900 ± 0.010 | n/a |" in tool.format_table([other], [0.1], 3)


def test_xr_datalist_keeps_xray_items_with_labels_from_zero(tmp_path):
    tool = _tool()
    learn = {"classes": [f"c{i}" for i in range(15)], "label_offsets": {"XR": 0, "FUNDUS": 3},
             "modality_classes": {"XR": ["normal", "nodules", "effusion"], "FUNDUS": ["a", "b", "c"]},
             "training": [{"image": "learn/xr/0.png", "modality": "XR", "dim": 2, "label": 2},
                          {"image": "learn/fundus/0.png", "modality": "FUNDUS", "dim": 2, "label": 4}],
             "validation": [], "test": [{"image": "learn/xr/1.png", "modality": "XR", "dim": 2, "label": 1}]}
    (tmp_path / "datalist_learn.json").write_text(json.dumps(learn))
    out = json.loads(tool.xr_datalist(tmp_path, tmp_path / "work").read_text())
    assert out["classes"] == ["normal", "nodules", "effusion"]
    assert [(it["label"], it["modality"]) for it in out["training"]] == [(2, "XR")]
    assert out["training"][0]["image"] == str(tmp_path / "learn/xr/0.png") and len(out["test"]) == 1


def test_argument_errors():
    tool = _tool()
    with pytest.raises(ValueError, match="unknown \\['byol'\\]"):
        tool.compare(methods="swav,byol")
    with pytest.raises(ValueError, match="--fractions"):
        tool.compare(methods="swav", fractions="0.1,2")


def test_detection_column_builds_the_exported_architecture_and_shows_in_the_table():
    tool = _tool()
    network = _parsed("xray_lesion_detection", tool._detection_overrides(RESNET), "network_def")
    encoder_state = {k.split("encoder.", 1)[1]: v.shape for k, v in network.state_dict().items() if ".encoder." in k
                     or k.startswith("encoder.")}
    from medssl.networks import ResNetBackbone

    exported = ResNetBackbone(**RESNET["backbone"]["kwargs"]).state_dict()
    assert exported and all(encoder_state.get(k) == v.shape for k, v in exported.items())
    with pytest.raises(ValueError, match="no detection mapping"):
        tool._detection_overrides({"backbone": {"_target_": "x.MiT", "kwargs": {}}})
    base = dict(_row("swav", 0.40, 0.02, random=True), detection_map50=0.61)
    row = dict(_row("swav", 0.50, 0.03), detection_map50=0.68)
    table = tool.format_table([row, base, _row("unimiss", 0.3, 0.01, arch="mit")], [0.1], 3, detection_epochs=40)
    assert table.splitlines()[0].endswith("| detection mAP@0.5 (test) | beats random (linear 10 %, CIs apart) |")
    assert "| 0.500 ± 0.030 | 0.680 | **yes** |" in table and "| 0.400 ± 0.020 | 0.610 | (baseline) |" in table
    assert "| 0.300 ± 0.010 | — | n/a |" in table
