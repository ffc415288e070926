"""Issue 14 item 4: the pretraining bundles' inference.json writes what it computes: one .npy embedding per item and
an index CSV (it used to exit 0 and write nothing)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import BUNDLES, PYTHON, run_cmd

# bundle: (dims of the items, extra command-line values for a quick CPU run, the embedding length)
CASES = {
    "ssl_swav_multimodal_pretrain": (2, ["--image_size", "64"], 2048),
    "ssl_unimiss_pretrain": (2, ["--image_size", "[64,64]"], None),
    "ssl_joint_image_volume_pretrain": (3, ["--image_size", "32", "--num_slices", "8"], 640),
}


@pytest.mark.parametrize("bundle", sorted(CASES))
def test_inference_writes_embeddings_and_index(bundle, demo_datalist, tmp_path):
    dim, extra, length = CASES[bundle]
    items = [dict(it, image=str(demo_datalist.parent / it["image"]))
             for it in json.loads(demo_datalist.read_text())["test"] + json.loads(demo_datalist.read_text())["training"]
             if it["dim"] == dim][:3]
    items = [{k: it[k] for k in ("image", "modality", "dim")} for it in items]
    cmd = [PYTHON, "-m", "monai.bundle", "run", "--config_file", str(BUNDLES / bundle / "configs" / "inference.json"),
           "--bundle_root", str(BUNDLES / bundle), "--output_dir", str(tmp_path), "--dataset#data", json.dumps(items),
           *extra]
    proc = run_cmd(cmd, cwd=BUNDLES / bundle, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    with open(tmp_path / "embeddings.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [it["image"] for it in items]
    assert [r["modality"] for r in rows] == [it["modality"] for it in items]
    for row in rows:
        embedding = np.load(tmp_path / row["embedding"])
        assert embedding.dtype == np.float32 and embedding.ndim == 1 and embedding.size == int(row["dim"])
        assert np.isfinite(embedding).all()
        if length is not None:
            assert embedding.size == length
    assert len({r["embedding"] for r in rows}) == len(rows)


def test_ckpt_export_builds_the_backbone_the_encoder_manifest_names(tmp_path):
    """The quick-start encoder is a smaller ResNet than inference.json's default ResNet-50: ckpt_export builds what
    models/model.json (written by tools/export_encoder.py) names."""
    import shutil

    import torch

    from medssl.networks import ResNetBackbone
    from medssl.weights.export import MANIFEST_FORMAT

    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLES / "ssl_swav_multimodal_pretrain", bundle,
                    ignore=shutil.ignore_patterns("runs", "eval", "models"))
    (bundle / "models").mkdir()
    kwargs = {"spatial_dims": 2, "in_channels": 1, "layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 32, 64]}
    torch.save(ResNetBackbone(**kwargs).state_dict(), bundle / "models" / "model.pt")
    (bundle / "models" / "model.json").write_text(json.dumps({
        "format": MANIFEST_FORMAT, "weights": "model.pt",
        "backbone": {"_target_": "medssl.networks.ResNetBackbone", "kwargs": kwargs},
    }))
    ts = tmp_path / "model.ts"
    cmd = [PYTHON, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
           "--ckpt_file", str(bundle / "models" / "model.pt"), "--meta_file", str(bundle / "configs" / "metadata.json"),
           "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
           "--use_trace", "True", "--input_shape", "[1,1,64,64]"]
    proc = run_cmd(cmd, cwd=bundle, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    exported = torch.jit.load(str(ts))  # the weights loaded strictly into it: the small ResNet, not a ResNet-50
    small = ResNetBackbone(**kwargs)
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in small.parameters())
