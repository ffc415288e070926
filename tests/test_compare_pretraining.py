"""tools/compare_pretraining.py without running it (the comparison itself is a long CPU job, not a default test):
the overrides that give a downstream bundle an exported encoder's architecture, the table, argument errors."""

from __future__ import annotations

import json

import pytest
from monai.bundle import ConfigParser

from conftest import BUNDLES, load_tool


def _tool():
    return load_tool("compare_pretraining.py", "compare_tool")


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


def test_joint_3d_encoder_chains_stages_2_and_3_on_the_volumes_from_stage_1(tmp_path, monkeypatch):
    """The joint method's 3D row: stage 1 on the 2D items, then stages 2 and 3 on the 3D items, each from the
    previous stage's checkpoint, and the volume encoder (f_intra + f_inter) exported; finished stages are skipped."""
    tool = _tool()
    runs, exports = [], []

    def fake_bundle_run(bundle, configs, overrides, log):
        runs.append((configs[1], overrides))
        ckpt = tmp_path / overrides["ckpt_dir"]
        ckpt.mkdir(parents=True)
        (ckpt / "checkpoint_final.pt").write_bytes(b"")

    def fake_run(cmd, log):
        exports.append(cmd)
        manifest = (tmp_path / cmd[cmd.index("--out") + 1]).with_suffix(".json")
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text("{}")

    monkeypatch.setattr(tool, "_bundle_run", fake_bundle_run)
    monkeypatch.setattr(tool, "_run", fake_run)
    data, work = tmp_path / "demo", tmp_path / "work"
    manifest_2d = tool.pretrain_and_export("joint", data, work, seed=1, dims=2)
    manifest_3d = tool.pretrain_and_export("joint", data, work, seed=1, dims=3)
    assert manifest_2d.name == "joint_seed1.json" and manifest_3d.name == "joint_seed1_3d.json"
    assert [c for c, _ in runs] == ["configs/train_stage1.json", "configs/train_stage2.json",
                                    "configs/train_stage3.json"]  # stage 1 ran once, for both rows
    (_, s1), (_, s2), (_, s3) = runs
    assert s1["datalist"] == str(data / "datalist_learn_2d.json") and "pretrained_path" not in s1
    assert s2["datalist"] == s3["datalist"] == str(data / "datalist_learn_3d.json")
    assert s2["pretrained_path"] == s1["ckpt_dir"] and s3["pretrained_path"] == s2["ckpt_dir"]
    assert s2["epochs"] == 5 and s3["epochs"] == 10 and "epochs" not in s1  # stage 1 keeps demo.json's budget
    assert all(o["seed"] == 1 and o["resume"] is False for _, o in runs)
    last = exports[-1]
    assert last[last.index("--checkpoint") + 1] == s3["ckpt_dir"]
    assert last[last.index("--encoder-id") + 1] == "encoder" and last[last.index("--encoder-key") + 1] == "backbone"
    assert "--encoder-id" not in exports[0]  # the 2D row exports stage 1's trunk, as before
    # a rerun finds the encoders; a lost export re-exports without pretraining again
    assert tool.pretrain_and_export("joint", data, work, seed=1, dims=3) == manifest_3d and len(runs) == 3
    manifest_3d.unlink()
    tool.pretrain_and_export("joint", data, work, seed=1, dims=3)
    assert len(runs) == 3 and len(exports) == 3
    # the other methods probe one encoder on each of their dims
    assert tool.pretrain_and_export("unimiss", data, work, seed=0, dims=3).name == "unimiss_seed0.json"


def test_joint_stage_3_records_the_volume_size_the_probe_resizes_to():
    parser = ConfigParser()
    configs = BUNDLES / "ssl_joint_image_volume_pretrain" / "configs"
    parser.read_config([str(configs / f) for f in ("train.json", "train_stage3.json", "demo.json")])
    spec = parser.get_parsed_content("preprocessing_spec")
    assert spec["input_size_3d"] == [48, 48, 16] and spec["input_size"] == 48
    probe = load_tool("probe.py", "probe_tool")
    assert probe._input_size({"preprocessing": spec}, 3, None) == [48, 48, 16]
    assert probe._input_size({"preprocessing": spec}, 2, None) == [48, 48]
