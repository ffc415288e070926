"""bundles/ssl_swav_multimodal_pretrain beyond the generic bundle tests: its 3D, DeepCluster-v2 and hybrid variants run
on the demo data, the trained backbone exports to an encoder file that rebuilds exactly, and inference.json loads it
and embeds images. (The plain 2D smoke run and the torchrun run are in test_bundle_runs.py.)"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import BUNDLES, PYTHON, REPO, run_cmd

BUNDLE = BUNDLES / "ssl_swav_multimodal_pretrain"
CONFIGS = BUNDLE / "configs"


def _run(configs: list[str], demo_datalist: Path, out: Path, *extra: str, bundle: Path = BUNDLE):
    config_list = "[" + ",".join(f"'{bundle / 'configs' / c}'" for c in configs) + "]"
    cmd = [
        PYTHON, "-m", "monai.bundle", "run", "--config_file", config_list, "--bundle_root", str(bundle),
        "--dataset_dir", str(demo_datalist.parent), "--datalist", str(demo_datalist),
        "--output_dir", str(out), "--ckpt_dir", str(out / "ckpt"), *extra,
    ]
    proc = run_cmd(cmd, cwd=bundle, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_3d_column_runs_on_volumes(demo_datalist, tmp_path):
    _run(["train.json", "train_3d.json", "smoke.json", "smoke_3d.json"], demo_datalist, tmp_path)
    records = _log(tmp_path)
    assert records and all(math.isfinite(r["loss"]) for r in records)
    state = torch.load(tmp_path / "ckpt" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    # the backbone is the 3D dense network: its convolutions have 5-D kernels
    assert any(k.startswith("backbone.") and v.ndim == 5 for k, v in state["method"].items())


def test_deepcluster_v2_variant_clusters_every_epoch(demo_datalist, tmp_path):
    proc = _run(["train.json", "deepcluster_v2.json", "smoke.json"], demo_datalist, tmp_path,
                "--n_heads_prototypes", "[8,8,8]")
    records = _log(tmp_path)
    assert records and all(math.isfinite(r["loss"]) for r in records)
    # with the memory pass before epoch 1 every epoch has k-means targets, so the loss is never the all-ignored 0
    assert all(r["loss"] > 0 for r in records)
    state = torch.load(tmp_path / "ckpt" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    protos = [v for k, v in state["method"].items() if "prototypes" in k and k.endswith("weight")]
    assert protos and all(torch.allclose(p.norm(dim=1), torch.ones(p.shape[0]), atol=1e-4) for p in protos)
    assert "kNN accuracy" in proc.stdout + proc.stderr


def test_hybrid_variant_trains_the_supervised_head_on_labelled_items(demo_datalist, tmp_path):
    _run(["train.json", "smoke.json"], demo_datalist, tmp_path, "--num_classes", "3")
    records = _log(tmp_path)
    assert all("loss_sup" in r for r in records)
    assert sum(r["n_labelled"] for r in records) > 0
    for r in records:
        assert r["loss"] == pytest.approx(r["loss_ss"] + r["loss_sup"], rel=1e-4, abs=1e-5)


@pytest.mark.slow  # covered in the default suite by: export after a bundle run: test_export_encoder.py; SwAV inference.json: test_ssl_inference_embeddings.py
def test_export_encoder_and_inference(demo_datalist, tmp_path):
    run_dir = tmp_path / "run"
    _run(["train.json", "smoke.json"], demo_datalist, run_dir)
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("runs", "eval", "models"))
    (bundle / "models").mkdir()
    out = bundle / "models" / "model.pt"
    proc = run_cmd(
        [PYTHON, str(REPO / "tools" / "export_encoder.py"), "--bundle", str(bundle), "--checkpoint",
         str(run_dir / "ckpt"), "--out", str(out), "--config", "['configs/train.json','configs/smoke.json']"],
        cwd=bundle,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["spatial_dims"] == 2 and manifest["in_channels"] == 1

    from medssl.weights import build_encoder_from_manifest

    encoder = build_encoder_from_manifest(out.with_suffix(".json")).eval()
    trained = torch.load(run_dir / "ckpt" / "checkpoint_final.pt", map_location="cpu", weights_only=False)["method"]
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, trained[f"backbone.{name}"]), name

    proc = run_cmd(
        [PYTHON, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
         "--bundle_root", str(bundle), "--dataset_dir", str(demo_datalist.parent), "--section", "validation",
         "--image_size", "32", "--network_def#layers", "[1,1,1,1]", "--network_def#block_inplanes", "[8,16,32,64]"],
        cwd=bundle,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "model.pt" in proc.stdout + proc.stderr  # MONAI's CheckpointLoader reports what it restored
