"""medssl.weights.export and tools/export_encoder.py: encoder export from a training checkpoint, manifest, rebuild."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import fire
import pytest
import torch
import torch.nn as nn
from ignite.engine import Engine

from conftest import TOOLS, load_tool
from medssl.engines.checkpoint import CheckpointHandler, checkpoint_name
from medssl.networks import DenseNet3D, ResNetBackbone
from medssl.utils.io import file_sha256
from medssl.weights.export import (
    MANIFEST_FORMAT,
    build_encoder_from_manifest,
    export_encoder,
    load_manifest,
)

# a tiny 2D ResNet as a bundle's train.json would define it (with an @ reference and a $ expression)
RESNET_CONFIG = {
    "_target_": "medssl.networks.ResNetBackbone",
    "spatial_dims": 2,
    "in_channels": "@in_channels",
    "layers": [1, 1, 1, 1],
    "block": "basic",
    "block_inplanes": "$[4, 8, 8, 16]",
}
RESNET_KWARGS = dict(spatial_dims=2, in_channels=1, layers=[1, 1, 1, 1], block="basic", block_inplanes=[4, 8, 8, 16])
DENSE_KWARGS = dict(in_channels=1, block_units=[1, 1], init_features=4, growth_rate=2, inplane_only_blocks=1, out_dim=8)
PREPROCESSING = {"modality_preset": "CT", "spatial_size": [32, 32], "intensity": "window [-1000, 1000] -> [0, 1]"}


class ToyMethod(nn.Module):
    """A method holding its encoder as ``.backbone`` next to other parts (a head, a teacher copy)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, 3)
        self.prototypes = nn.Parameter(torch.randn(5, 3))


def _trained(backbone: nn.Module, shape) -> nn.Module:
    """Give the backbone non-default weights and BatchNorm statistics (a few train-mode forwards)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
        backbone.train()
        for _ in range(2):
            backbone(torch.randn(*shape))
    return backbone.eval()


def _save_checkpoint(method: nn.Module, ckpt_dir, iteration: int = 4):
    """A checkpoint written by medssl.engines.checkpoint's saving code (the layout export reads)."""
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    handler = CheckpointHandler(ckpt_dir, objects={"method": nn.DataParallel(method), "optimizer": optimizer})
    engine = Engine(lambda e, b: None)
    engine.state.iteration, engine.state.epoch, engine.state.epoch_length, engine.state.max_epochs = iteration, 2, 2, 2
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / checkpoint_name(iteration)
    handler.save(engine, path)
    return path


def _fake_bundle(root, backbone_config=RESNET_CONFIG):
    configs = root / "configs"
    configs.mkdir(parents=True)
    (configs / "metadata.json").write_text(json.dumps({"name": "ssl_fake_pretrain", "version": "0.0.1"}))
    train = {
        "bundle_root": ".",
        "in_channels": 1,
        "backbone": backbone_config,
        "method": {"_target_": "test_export_encoder.ToyMethod", "backbone": "@backbone"},
        "preprocessing_spec": PREPROCESSING,
    }
    (configs / "train.json").write_text(json.dumps(train, indent=2))
    return root


def _load_tool():
    return load_tool("export_encoder.py", "export_encoder_tool")


def test_tool_round_trip_rebuilds_identical_encoder(tmp_path, capsys):
    backbone = _trained(ResNetBackbone(**RESNET_KWARGS), (2, 1, 32, 32))
    checkpoint = _save_checkpoint(ToyMethod(backbone), tmp_path / "ckpt")
    bundle = _fake_bundle(tmp_path / "bundle")
    out = tmp_path / "export" / "encoder.pt"
    # the command line, parsed by fire in-process (a subprocess would pay MONAI's import time again);
    # --checkpoint is the ckpt_dir: its latest checkpoint is used
    fire.Fire(_load_tool().main, command=["--bundle", str(bundle), "--checkpoint", str(tmp_path / "ckpt"),
                                          "--out", str(out), "--encoder-id", "backbone"])
    assert f"wrote {out}" in capsys.readouterr().out

    manifest = json.loads((tmp_path / "export" / "encoder.json").read_text())
    assert manifest["format"] == MANIFEST_FORMAT and manifest["weights"] == "encoder.pt"
    assert manifest["backbone"] == {"_target_": "medssl.networks.ResNetBackbone", "kwargs": RESNET_KWARGS}
    assert manifest["method"] == "test_export_encoder.ToyMethod"
    assert manifest["preprocessing"] == PREPROCESSING
    assert (manifest["spatial_dims"], manifest["in_channels"], manifest["feature_dim"]) == (2, 1, backbone.feature_dim)
    assert manifest["num_tensors"] == len(backbone.state_dict())
    assert manifest["num_params"] == sum(p.numel() for p in backbone.parameters())
    assert manifest["source_checkpoint"] == checkpoint.name and manifest["source_sha256"] == file_sha256(checkpoint)
    assert manifest["source_iteration"] == 4 and manifest["encoder_sha256"] == file_sha256(out)
    assert manifest["source_epoch"] == 2
    provenance = manifest["provenance"]
    assert re.fullmatch(r"[0-9a-f]{64}", provenance["config_sha256"]) and provenance["datalist"] is None
    assert manifest["bundle"]["name"] == "ssl_fake_pretrain" and manifest["bundle"]["version"] == "0.0.1"

    state = torch.load(out, weights_only=True)  # a plain state dict, exactly the backbone's keys
    assert list(state) == list(backbone.state_dict())
    rebuilt = build_encoder_from_manifest(load_manifest(out)).eval()
    assert isinstance(rebuilt, ResNetBackbone)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), backbone(x))


def test_export_3d_dense_net_and_ddp_prefixes(tmp_path):
    backbone = _trained(DenseNet3D(**DENSE_KWARGS), (2, 1, 8, 8, 4))
    method = ToyMethod(backbone)
    # a raw state dict saved from a DDP-wrapped method: "module." prefixes are stripped
    ckpt = tmp_path / "ddp_state.pt"
    torch.save({"method": {f"module.{k}": v for k, v in method.state_dict().items()}, "engine": {"iteration": 7}}, ckpt)
    manifest = {"method": "toy", "backbone": {"_target_": "medssl.networks.DenseNet3D", "kwargs": DENSE_KWARGS},
                "preprocessing": None, "notes": ("a", "tuple")}
    weights, manifest_path = export_encoder(ckpt, tmp_path / "dense.pt", manifest=manifest)
    assert manifest_path == tmp_path / "dense.json"
    written = load_manifest(manifest_path)
    assert written["spatial_dims"] == 3 and written["feature_dim"] == 8 and written["notes"] == ["a", "tuple"]
    rebuilt = build_encoder_from_manifest(manifest_path).eval()
    x = torch.randn(2, 1, 8, 8, 4)  # (B, C, X, Y, Z), depth last
    with torch.no_grad():
        assert torch.equal(rebuilt(x), backbone(x))


def test_mismatches_and_corruption_are_clear_errors(tmp_path):
    backbone = _trained(ResNetBackbone(**RESNET_KWARGS), (2, 1, 32, 32))
    checkpoint = _save_checkpoint(ToyMethod(backbone), tmp_path / "ckpt")
    good = {"backbone": {"_target_": "medssl.networks.ResNetBackbone", "kwargs": RESNET_KWARGS}}

    # a prefix that is not in the method: the error lists what is there
    with pytest.raises(KeyError, match=r"no tensor under 'teacher.backbone'.*backbone, head, prototypes"):
        export_encoder(checkpoint, tmp_path / "x.pt", encoder_key="teacher.backbone", manifest=good)
    # a backbone definition that does not fit the checkpoint: nothing is written, shapes are named
    wrong = {"backbone": {"_target_": "medssl.networks.ResNetBackbone",
                          "kwargs": dict(RESNET_KWARGS, block_inplanes=[4, 8, 8, 32])}}
    with pytest.raises(ValueError, match=r"checkpoint_00000004.pt.*shape mismatches \(layer4\.0\.conv1\.weight"):
        export_encoder(checkpoint, tmp_path / "x.pt", manifest=wrong)
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.json").exists()
    with pytest.raises(ValueError, match="manifest in_channels=3 but the backbone .* has in_channels=1"):
        export_encoder(checkpoint, tmp_path / "x.pt", manifest=dict(good, in_channels=3))
    with pytest.raises(TypeError, match=r"manifest\['preprocessing'\]\['fn'\]: builtin_function_or_method"):
        export_encoder(checkpoint, tmp_path / "x.pt", manifest=dict(good, preprocessing={"fn": len}))

    weights, manifest_path = export_encoder(checkpoint, tmp_path / "enc.pt", manifest=good)
    # the manifest edited to another architecture: strict load names the file and the missing / unexpected keys
    manifest = load_manifest(manifest_path)
    manifest["backbone"]["kwargs"]["layers"] = [1, 1, 2, 1]
    with pytest.raises(ValueError, match=r"enc.pt: .* missing keys \(layer3\.1\."):
        build_encoder_from_manifest(manifest)
    # corrupted weights: the hash check names the file
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"enc.pt: sha256 .* differs from encoder_sha256"):
        build_encoder_from_manifest(manifest_path)
    weights.write_bytes(bytes(data[: len(data) // 3]))  # truncated
    with pytest.raises(ValueError, match=r"enc.pt: cannot be read as a state dict"):
        build_encoder_from_manifest(manifest_path, check_hash=False)
    # manifest format checks
    manifest_path.write_text(json.dumps({"format": "other/9", "weights": "enc.pt", "backbone": good["backbone"]}))
    with pytest.raises(ValueError, match=r"enc.json: field 'format' is 'other/9'"):
        load_manifest(manifest_path)
    # a checkpoint without the method entry
    torch.save({"engine": {}, "optimizer": {"state": {}}}, tmp_path / "bad.pt")
    with pytest.raises(KeyError, match=r"bad.pt: no method state dict under 'method'.*engine, optimizer"):
        export_encoder(tmp_path / "bad.pt", tmp_path / "y.pt", manifest=good)


def test_tool_config_errors(tmp_path):
    tool = _load_tool()
    bundle = _fake_bundle(tmp_path / "bundle")
    with pytest.raises(KeyError, match="no config id 'network_def'"):
        tool.build_manifest(bundle, encoder_id="network_def")
    with pytest.raises(ValueError, match="'in_channels' is not a component definition"):
        tool.build_manifest(bundle, encoder_id="in_channels")
    bad = _fake_bundle(tmp_path / "bad", dict(RESNET_CONFIG, act="$torch.nn.ReLU"))
    with pytest.raises(TypeError, match=r"backbone::act evaluates to a type"):
        tool.build_manifest(bad)
    manifest = tool.build_manifest(bundle, config="configs/train.json", preprocessing_id="absent")
    assert manifest["preprocessing"] is None and manifest["backbone"]["kwargs"]["block_inplanes"] == [4, 8, 8, 16]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_publish_url_lists_encoder_in_large_files_and_monai_downloads_it(tmp_path, capsys):
    """--publish-url writes large_files.yml entries; MONAI's download_large_files fetches them (file:// URL); the
    downstream loader then loads the downloaded encoder, and by URL + sha256 as well."""
    from monai.bundle import download_large_files

    from medssl.weights import load_pretrained_encoder

    backbone = _trained(ResNetBackbone(**RESNET_KWARGS), (2, 1, 32, 32))
    _save_checkpoint(ToyMethod(backbone), tmp_path / "ckpt")
    bundle = _fake_bundle(tmp_path / "bundle")
    (bundle / "large_files.yml").write_text("# published encoders\nlarge_files: []\n")
    upload = tmp_path / "upload"
    fire.Fire(_load_tool().main, command=["--bundle", str(bundle), "--checkpoint", str(tmp_path / "ckpt"),
                                          "--out", str(upload / "encoder.pt"), "--publish-url", upload.as_uri()])
    assert "large_files.yml" in capsys.readouterr().out
    import yaml

    text = (bundle / "large_files.yml").read_text()
    assert text.startswith("# published encoders")
    entries = {e["path"]: e for e in yaml.safe_load(text)["large_files"]}
    assert set(entries) == {"models/encoder.pt", "models/encoder.json"}
    assert entries["models/encoder.pt"]["hash_val"] == file_sha256(upload / "encoder.pt")
    assert entries["models/encoder.pt"]["url"] == (upload / "encoder.pt").as_uri()

    download_large_files(bundle_path=str(bundle))
    downloaded = bundle / "models" / "encoder.pt"
    assert file_sha256(downloaded) == file_sha256(upload / "encoder.pt")
    target = ResNetBackbone(**RESNET_KWARGS)
    report = load_pretrained_encoder(target, downloaded, encoder_prefix="", spatial_dims=2, verbose=False)
    assert len(report.loaded) == len(backbone.state_dict())
    assert torch.equal(target.conv1.weight, backbone.conv1.weight)
    by_url = load_pretrained_encoder(
        ResNetBackbone(**RESNET_KWARGS), entries["models/encoder.pt"]["url"], encoder_prefix="",
        sha256=entries["models/encoder.pt"]["hash_val"], cache_dir=tmp_path / "cache", verbose=False,
    )
    assert len(by_url.loaded) == len(report.loaded) and by_url.manifest["encoder_sha256"] == file_sha256(downloaded)


def test_export_after_a_bundle_run_reads_the_run_config(demo_datalist, tmp_path, capsys):
    """Issue 13 item 10: the README's export command (no --config) after a run with override files failed with
    "216 missing keys": it parsed configs/train.json alone. The run now saves its merged config in its run folder
    and the export reads it there. The datalist has no class labels: the swav bundle's kNN monitor turns itself off
    (item 8)."""
    from conftest import BUNDLES, PYTHON, run_cmd, write_unlabelled_datalist
    from medssl.engines import RUN_CONFIG_NAME

    bundle = BUNDLES / "ssl_swav_multimodal_pretrain"
    unlabelled = write_unlabelled_datalist(demo_datalist, tmp_path / "unlabelled.json")
    run = tmp_path / "run"
    configs = "[" + ",".join(f"'{bundle / 'configs' / c}'" for c in ("train.json", "smoke.json")) + "]"
    proc = run_cmd(
        [PYTHON, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(bundle),
         "--dataset_dir", str(demo_datalist.parent), "--datalist", str(unlabelled), "--output_dir", str(run),
         "--epochs", "1", "--backbone_2d#block_inplanes", "[4,8,8,16]"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sum("kNN monitor off" in line for line in (proc.stdout + proc.stderr).splitlines()) == 1
    saved = json.loads((run / RUN_CONFIG_NAME).read_text())
    assert saved["backbone_2d"]["block_inplanes"] == [4, 8, 8, 16] and saved["epochs"] == 1  # the overrides

    export = [PYTHON, str(TOOLS / "export_encoder.py"), "--bundle", str(bundle), "--checkpoint", str(run / "ckpt"),
              "--out", str(tmp_path / "encoder.pt")]
    proc = run_cmd(export, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"parsing the run's config {run / RUN_CONFIG_NAME}" in proc.stderr
    manifest = json.loads((tmp_path / "encoder.json").read_text())
    assert manifest["bundle"]["configs"] == [RUN_CONFIG_NAME]
    assert manifest["backbone"]["kwargs"]["block_inplanes"] == [4, 8, 8, 16]
    items = json.loads(unlabelled.read_text())["training"]
    counts = {m: sum(it["modality"] == m for it in items) for m in {it["modality"] for it in items}}
    assert manifest["provenance"]["datalist"] == {"name": "unlabelled.json", "training_items_per_modality": counts}
    head = subprocess.run(["git", "-C", str(bundle), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert manifest["provenance"]["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert manifest["source_epoch"] == 1 and manifest["source_iteration"] > 0
    trained = torch.load(run / "ckpt" / "checkpoint_final.pt", map_location="cpu", weights_only=False)["method"]
    encoder = build_encoder_from_manifest(tmp_path / "encoder.json")
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, trained[f"backbone.{name}"]), name

    # a run folder without it (an older run): configs/train.json, as before, and a note saying so
    (run / RUN_CONFIG_NAME).unlink()
    capsys.readouterr()
    with pytest.raises(Exception, match="missing"):
        _load_tool().main(str(bundle), str(run / "ckpt"), str(tmp_path / "old.pt"))
    assert f"no {RUN_CONFIG_NAME} beside {run / 'ckpt'}" in capsys.readouterr().err


def test_config_hash_does_not_depend_on_where_the_bundle_lies(tmp_path):
    """provenance's config_sha256: the same config read from two checkouts hashes the same (bundle_root left out);
    any training setting changes it."""
    from monai.bundle import ConfigParser

    tool = _load_tool()

    def sha(root, **overrides):
        parser = ConfigParser({"epochs": 2, "lr": 0.1, "bundle_root": str(root), "_meta_": {"version": "1"}})
        parser.update(overrides)
        return tool.provenance(parser, Path(root))["config_sha256"]

    assert sha(tmp_path / "a") == sha(tmp_path / "b")
    assert sha(tmp_path / "a") != sha(tmp_path / "a", lr=0.2)
