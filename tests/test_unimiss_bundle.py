"""bundles/ssl_unimiss_pretrain beyond the generic bundle tests (test_bundle_runs.py runs its smoke, torchrun and
verify_net_in_out): the smoke run alternates 2D and 3D batches with the volume-slice terms in the 3D steps, the
teacher follows the student, the teacher's MiT loads into inference.json's network and embeds 2D and 3D inputs, and
train.json holds the UniMiSS paper's numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLES, PYTHON, load_tool, run_cmd, write_unlabelled_datalist

BUNDLE = BUNDLES / "ssl_unimiss_pretrain"
CONFIGS = BUNDLE / "configs"


@pytest.fixture(scope="module")
def smoke_run(demo_datalist, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unimiss_smoke")
    config_list = "[" + ",".join(f"'{CONFIGS / c}'" for c in ("train.json", "smoke.json")) + "]"
    cmd = [
        PYTHON, "-m", "monai.bundle", "run", "--config_file", config_list, "--bundle_root", str(BUNDLE),
        "--dataset_dir", str(demo_datalist.parent), "--datalist", str(demo_datalist),
        "--output_dir", str(out), "--ckpt_dir", str(out / "ckpt"),
    ]
    proc = run_cmd(cmd, cwd=BUNDLE, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


def test_smoke_run_alternates_2d_and_3d_with_the_slice_terms(smoke_run):
    records = [json.loads(line) for line in (smoke_run / "train_log.jsonl").read_text().splitlines()]
    dims = [int(r["dim"]) for r in records]
    assert dims == [2, 3] * (len(dims) // 2) and len(dims) >= 4  # smoke.json: v = 1
    for r in records:
        assert math.isfinite(r["loss"])
        if r["dim"] == 3:
            total = r["loss_volume"] + r["loss_volume_slice"] + r["loss_slice"]
            assert r["loss"] == pytest.approx(total, rel=1e-4)
        else:
            assert "loss_slice" not in r and r["loss"] == pytest.approx(r["loss_volume"], rel=1e-6)
    momenta = [r["ema_momentum"] for r in records]
    assert momenta[0] == pytest.approx(0.996) and momenta[-1] == pytest.approx(1.0)


def test_smoke_run_logs_the_teacher_health(smoke_run):
    records = [json.loads(line) for line in (smoke_run / "health.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1)) and records
    for r in records:  # normalised entropies of the teacher output and of the centre, and the embedding spread
        assert 0.0 <= r["teacher_entropy"] <= 1.0 and 0.0 <= r["center_entropy"] <= 1.0 and r["teacher_dim"] >= 2
        assert r["emb_std_sqrt_d"] >= 0.0 and r["dim"] >= 2


def test_teacher_weights_load_into_the_inference_network(smoke_run):
    state = torch.load(smoke_run / "ckpt" / "checkpoint_final.pt", map_location="cpu", weights_only=False)["method"]
    prefix = "teacher.backbone."
    teacher = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    student = {k[len("student.backbone."):]: v for k, v in state.items() if k.startswith("student.backbone.")}
    assert teacher.keys() == student.keys()
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)  # EMA: close to, not equal to the student

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    smoke = json.loads((CONFIGS / "smoke.json").read_text())
    network_def = dict(smoke["backbone"])
    network_def["img_size_2d"], network_def["img_size_3d"] = smoke["image_size_2d"], smoke["volume_size"]
    parser["network_def"] = network_def
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(teacher, strict=True)
    network.eval()
    with torch.no_grad():
        emb_2d = network(torch.rand(2, 3, 64, 64))
        emb_3d = network(torch.rand(1, 1, 64, 64, 16))
    assert emb_2d.shape == (2, 8) and emb_3d.shape == (1, 8)
    assert torch.isfinite(emb_2d).all() and torch.isfinite(emb_3d).all()


def test_train_config_holds_the_seed_numbers():
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    expected = {
        "epochs": 200, "base_lr": 8e-4, "min_lr": 1e-6, "warmup_epochs": 10, "weight_decay": 0.04,
        "weight_decay_end": 0.4, "clip_grad": 0.3, "momentum_teacher": 0.996, "freeze_last_layer_epochs": 1,
        "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "student_temp": 0.1, "teacher_temp": 0.04,
        "center_momentum": 0.9, "alternation_v": 2, "n_views": 2, "image_size_2d": 224,
        "volume_size": [96, 96, 16], "crop_scale_2d": [0.14, 1.0], "find_unused_parameters": True,
    }
    for key, value in expected.items():
        assert parser[key] == value, key
    assert parser["backbone"]["_target_"] == "medssl.networks.mit_small"
    assert parser["method"]["_target_"] == "medssl.methods.unimiss.UniMiSS"
    assert parser["optimizer"]["_target_"] == "torch.optim.AdamW"


def test_exported_teacher_loads_into_a_2d_downstream_mit(smoke_run, tmp_path):
    """tools/export_encoder.py on the smoke run, then the downstream loader: every tensor of a one-path (2D) MiT
    classifier encoder is matched; the 3D path and the decoder are listed as ignored."""

    from medssl.networks.classification import EncoderClassifier
    from medssl.networks.mit import mit_tiny
    from medssl.weights import load_pretrained_encoder

    tool = load_tool("export_encoder.py", "export_encoder_tool")
    tool.main(str(BUNDLE), str(smoke_run / "ckpt"), str(tmp_path / "mit.pt"),
              config="configs/train.json,configs/smoke.json", encoder_key="teacher.backbone")
    smoke = json.loads((CONFIGS / "smoke.json").read_text())
    encoder = mit_tiny(decoder=False, spatial_dims=2, dims=smoke["backbone"]["dims"], img_size_2d=smoke["image_size_2d"])
    network = EncoderClassifier(encoder, num_classes=3)
    report = load_pretrained_encoder(network, tmp_path / "mit.json", spatial_dims=2, verbose=False)
    assert len(report.loaded) == len(encoder.state_dict()) and not report.not_loaded
    assert any("3D path" in k for k in report.ignored) and any("decoder" in k for k in report.ignored)


def test_unlabelled_datalist_turns_the_knn_monitor_off(demo_datalist, tmp_path):
    """Issue 13 item 8: on a datalist without class labels the run stopped while the kNN loaders were built ("no
    item with ... labelled_only=class"); now the monitor says once that it is off and the pretraining runs."""
    unlabelled = write_unlabelled_datalist(demo_datalist, tmp_path / "unlabelled.json")
    out = tmp_path / "run"
    config_list = "[" + ",".join(f"'{CONFIGS / c}'" for c in ("train.json", "smoke.json")) + "]"
    cmd = [
        PYTHON, "-m", "monai.bundle", "run", "--config_file", config_list, "--bundle_root", str(BUNDLE),
        "--dataset_dir", str(demo_datalist.parent), "--datalist", str(unlabelled), "--output_dir", str(out),
        "--ckpt_dir", str(out / "ckpt"), "--epochs", "1", "--train#sampler#num_batches", "2",
    ]
    proc = run_cmd(cmd, cwd=BUNDLE, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "kNN monitor off" in line]
    assert len(lines) == 1 and "no labelled item in its train_loader (memory bank) and val_loader" in lines[0]
    assert (out / "ckpt" / "checkpoint_final.pt").is_file() and not (out / "knn.jsonl").exists()
