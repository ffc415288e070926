"""bundles/xray_classification and bundles/ct_volume_classification on the demo data: smoke train -> evaluate ->
inference from scratch and from an encoder exported by ssl_swav_multimodal_pretrain (finetune and linear modes, the
2D ResNet also slice-wise inside the joint image-volume hybrid 3D network), a 2-process torchrun run, and TorchScript
export of the trained network. (The generic smoke / torchrun / verify_net_in_out / contract tests of every bundle are in
test_bundle_runs.py and test_bundle_contract.py.)"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import BUNDLES, PYTHON, load_tool, run_bundle_in_process, run_cmd

XRAY = BUNDLES / "xray_classification"
CT = BUNDLES / "ct_volume_classification"
SWAV = BUNDLES / "ssl_swav_multimodal_pretrain"


def _configs(bundle: Path, names: list[str]) -> list[str]:
    return [str(bundle / "configs" / n) for n in names]


@pytest.fixture(scope="session")
def resnet_encoder(demo_datalist, tmp_path_factory) -> Path:
    """A 2D ResNet encoder exported by tools/export_encoder.py from a tiny (1 epoch, kNN monitor off) smoke run of
    ssl_swav_multimodal_pretrain; both in this process."""

    root = tmp_path_factory.mktemp("swav_encoder")
    run_bundle_in_process(SWAV, ["train.json", "smoke.json"], out=root, datalist=demo_datalist, meta=True, epochs=1,
                          **{"knn#handlers": []})
    tool = load_tool("export_encoder.py", "export_encoder_tool")
    out = root / "encoder.pt"
    tool.main(bundle=str(SWAV), checkpoint=str(root / "ckpt"), out=str(out),
              config=["configs/train.json", "configs/smoke.json"])
    assert out.is_file() and out.with_suffix(".json").is_file()
    return out


def _model(out: Path) -> dict:
    return torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)


def _labelled(demo_datalist: Path, section: str, dim: int, modality: str) -> list[dict]:
    items = json.loads(demo_datalist.read_text())[section]
    return [it for it in items if it["dim"] == dim and it["modality"] == modality and isinstance(it.get("label"), int)]


def _check_reports(out: Path, expected_cases: int, class_names: list[str]) -> None:
    rows = list(csv.DictReader(open(out / "eval" / "metrics.csv")))
    assert len(rows) == expected_cases
    for row in rows:
        probs = [float(row[f"prob/{c}"]) for c in class_names]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert row["predicted"] == class_names[max(range(len(probs)), key=probs.__getitem__)]
    summary = json.loads((out / "eval" / "metrics_summary.json").read_text())
    assert summary["num_cases"] == expected_cases and summary["class_names"] == class_names
    accuracy = sum(int(r["correct"]) for r in rows) / len(rows)
    assert summary["accuracy"] == pytest.approx(accuracy)
    assert {"auc_macro", "f1_macro", "kappa"} <= set(summary) and all(f"auc/{c}" in summary for c in class_names)


def _check_inference(out: Path, demo_datalist: Path, dim: int, modality: str, class_names: list[str]) -> None:
    rows = list(csv.DictReader(open(out / "probabilities.csv")))
    test_items = json.loads(demo_datalist.read_text())["test"]
    test_items = [it for it in test_items if it["dim"] == dim and it["modality"] == modality]
    assert sorted(r["case"] for r in rows) == sorted(it["image"] for it in test_items)
    for row in rows:
        assert sum(float(row[f"prob/{c}"]) for c in class_names) == pytest.approx(1.0, abs=1e-4)


# ------------------------------------------------------------------------------------------------ 2D
def test_xray_scratch_train_evaluate_inference_and_torchscript(demo_datalist, tmp_path):
    from monai.bundle import ckpt_export

    names = ["normal", "nodule", "effusion"]
    run_bundle_in_process(XRAY, ["train.json", "smoke.json"], out=tmp_path, datalist=demo_datalist, meta=True,
                          finetune_mode="scratch")
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log and all(math.isfinite(r["loss"]) for r in log)
    assert len((tmp_path / "val_log.jsonl").read_text().splitlines()) == 2  # smoke: 2 epochs, validated each
    model_path = tmp_path / "models" / "model.pt"
    run_bundle_in_process(XRAY, ["train.json", "evaluate.json", "smoke.json"], out=tmp_path, datalist=demo_datalist,
                          meta=True, model_path=str(model_path))
    _check_reports(tmp_path, len(_labelled(demo_datalist, "test", 2, "XR")), names)
    run_bundle_in_process(XRAY, ["inference.json", "smoke.json"], out=tmp_path / "infer", datalist=demo_datalist,
                          meta=True, model_path=str(model_path))
    _check_inference(tmp_path / "infer", demo_datalist, 2, "XR", names)

    ts = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def", filepath=str(ts), ckpt_file=str(model_path),
        meta_file=str(XRAY / "configs" / "metadata.json"),
        config_file=_configs(XRAY, ["inference.json", "smoke.json"]), use_trace=True, input_shape=[2, 1, 32, 32],
    )
    scripted = torch.jit.load(str(ts))
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(_configs(XRAY, ["inference.json", "smoke.json"]))
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(_model(tmp_path))
    x = torch.rand(3, 1, 32, 32)
    assert torch.allclose(scripted(x), net(x), atol=1e-5)


def test_xray_from_pretrained_encoder_finetune_and_linear(demo_datalist, resnet_encoder, tmp_path, capfd):
    exported = torch.load(resnet_encoder, map_location="cpu", weights_only=True)
    linear = tmp_path / "linear"
    run_bundle_in_process(XRAY, ["train.json", "smoke.json"], out=linear, datalist=demo_datalist, meta=True,
                          finetune_mode="linear", pretrained_path=str(resnet_encoder), label_fraction=0.5)
    assert f"loaded {len(exported)} tensors from" in capfd.readouterr().out
    model = _model(linear)
    for key, tensor in exported.items():  # loaded and frozen (BatchNorm statistics included)
        assert torch.equal(model[f"encoder.{key}"], tensor), key
    cache_files = list((linear / "feature_cache").glob("encoder-*.pt"))
    assert len(cache_files) == 1
    cached = torch.load(cache_files[0], weights_only=True)
    assert cached["features"].shape[0] == 12  # label_fraction 0.5 of the 24 smoke items, stratified (4 per class)

    finetune = tmp_path / "finetune"
    run_bundle_in_process(XRAY, ["train.json", "smoke.json"], out=finetune, datalist=demo_datalist, meta=True,
                          pretrained_path=str(resnet_encoder))
    assert f"loaded {len(exported)} tensors from" in capfd.readouterr().out
    model = _model(finetune)
    changed = [k for k, t in exported.items() if t.is_floating_point() and not torch.equal(model[f"encoder.{k}"], t)]
    assert changed  # the encoder trained too (at encoder_lr_scale x lr)
    run_bundle_in_process(XRAY, ["train.json", "evaluate.json", "smoke.json"], out=finetune, datalist=demo_datalist,
                          meta=True, model_path=str(finetune / "models" / "model.pt"))
    _check_reports(finetune, len(_labelled(demo_datalist, "test", 2, "XR")), ["normal", "nodule", "effusion"])


@pytest.mark.distributed
def test_xray_two_process_finetune_from_pretrained(demo_datalist, resnet_encoder, tmp_path):
    files = _configs(XRAY, ["train.json", "smoke.json", "multi_gpu_train.json"])
    configs = "[" + ",".join(f"'{c}'" for c in files) + "]"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run",
           "--config_file", configs, "--bundle_root", str(XRAY), "--dataset_dir", str(demo_datalist.parent),
           "--datalist", str(demo_datalist), "--output_dir", str(tmp_path), "--ckpt_dir", str(tmp_path / "ckpt"),
           "--pretrained_path", str(resnet_encoder)]
    proc = run_cmd(cmd, cwd=XRAY, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    validations = [json.loads(line) for line in (tmp_path / "val_log.jsonl").read_text().splitlines()]
    assert [v["epoch"] for v in validations] == [1, 2]  # rank 0 logs; metrics over all validation items
    assert all(v["num_cases"] == len(_labelled(demo_datalist, "validation", 2, "XR")) for v in validations)
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "ckpt" / "checkpoint_final.pt").is_file()


# ------------------------------------------------------------------------------------------------ 3D
def test_ct_scratch_train_evaluate_inference(demo_datalist, tmp_path):
    names = ["normal", "nodule"]
    run_bundle_in_process(CT, ["train.json", "smoke.json"], out=tmp_path, datalist=demo_datalist, meta=True,
                          finetune_mode="scratch")
    model_path = tmp_path / "models" / "model.pt"
    run_bundle_in_process(CT, ["train.json", "evaluate.json", "smoke.json"], out=tmp_path, datalist=demo_datalist,
                          meta=True, model_path=str(model_path))
    _check_reports(tmp_path, len(_labelled(demo_datalist, "test", 3, "CT")), names)
    run_bundle_in_process(CT, ["inference.json", "smoke.json"], out=tmp_path / "infer", datalist=demo_datalist,
                          meta=True, model_path=str(model_path))
    _check_inference(tmp_path / "infer", demo_datalist, 3, "CT", names)


def test_ct_hybrid_with_slice_wise_pretrained_trunk_linear(demo_datalist, resnet_encoder, tmp_path, capfd):
    """The joint image-volume network (slice ResNet + deformable attention, head 640 -> 252 -> classes in full size)
    with the 2D ResNet of ssl_swav_multimodal_pretrain as its slice trunk, frozen; then evaluated and exported to
    TorchScript."""
    from monai.bundle import ckpt_export

    exported = torch.load(resnet_encoder, map_location="cpu", weights_only=True)
    trunk = {"encoder_hybrid#block_inplanes": [8, 16, 32, 64]}  # the swav smoke ResNet's widths
    names = ["train.json", "hybrid.json", "smoke.json", "smoke_hybrid.json"]
    run_bundle_in_process(CT, names, out=tmp_path, datalist=demo_datalist, meta=True, finetune_mode="linear",
                          pretrained_path=str(resnet_encoder), load_prefix="encoder.slice_encoder.backbone",
                          slice_wise=True, **trunk)
    assert f"loaded {len(exported)} tensors from" in capfd.readouterr().out
    model = _model(tmp_path)
    for key, tensor in exported.items():
        assert torch.equal(model[f"encoder.slice_encoder.backbone.{key}"], tensor), key
    model_path = tmp_path / "models" / "model.pt"
    run_bundle_in_process(CT, ["train.json", "hybrid.json", "evaluate.json", "smoke.json", "smoke_hybrid.json"],
                          out=tmp_path, datalist=demo_datalist, meta=True, model_path=str(model_path), **trunk)
    _check_reports(tmp_path, len(_labelled(demo_datalist, "test", 3, "CT")), ["normal", "nodule"])

    infer = _configs(CT, ["inference.json", "hybrid.json", "smoke.json", "smoke_hybrid.json"])
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(model_path),
                meta_file=str(CT / "configs" / "metadata.json"), config_file=infer, use_trace=True,
                input_shape=[1, 1, 32, 32, 16], **trunk)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(infer)
    parser.update(trunk)
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(_model(tmp_path))
    x = torch.rand(2, 1, 32, 32, 16)
    assert torch.allclose(torch.jit.load(str(ts))(x), net(x), atol=1e-4)
