"""medssl.weights.load_pretrained_encoder: one loader for every downstream bundle."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from medssl.networks import ResNetBackbone
from medssl.networks.mit import mit_tiny
from medssl.utils.io import file_sha256
from medssl.weights import load_pretrained_encoder, pretrained_preprocessing, write_encoder_files

TINY = {"layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 8, 16], "in_channels": 1}


def _export(module: nn.Module, path: Path, target: str, kwargs: dict, **extra) -> Path:
    record = {
        "format": "medssl-encoder/1",
        "weights": path.name,
        "backbone": {"_target_": target, "kwargs": kwargs},
        "spatial_dims": extra.pop("spatial_dims", getattr(module, "spatial_dims", None)),
        "preprocessing": extra.pop("preprocessing", {"ct_window": [-1000, 1000], "spatial_size": [64, 64]}),
        **extra,
    }
    write_encoder_files(module.state_dict(), path, record)
    return path


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int = 3) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, num_classes)


def _resnet(spatial_dims: int = 2, seed: int = 0) -> ResNetBackbone:
    torch.manual_seed(seed)
    return ResNetBackbone(spatial_dims=spatial_dims, **TINY)


def test_exported_resnet_loads_every_tensor(tmp_path, capsys):
    source = _resnet(seed=1)
    path = _export(source, tmp_path / "enc.pt", "medssl.networks.ResNetBackbone", {"spatial_dims": 2, **TINY})
    net = Classifier(_resnet(seed=2), source.feature_dim)
    report = load_pretrained_encoder(net, tmp_path / "enc.json", spatial_dims=2)
    assert len(report.loaded) == len(source.state_dict()) and not report.not_loaded and not report.ignored
    for k, v in source.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[k], v)
    assert f"loaded {len(report.loaded)} tensors" in capsys.readouterr().out
    # the .pt path works the same (its manifest is found beside it)
    assert load_pretrained_encoder(net, path, spatial_dims=2, verbose=False).adapter == "resnet"


def test_scratch_loads_nothing():
    net = Classifier(_resnet(), 16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = load_pretrained_encoder(net, "", spatial_dims=2, verbose=False)
    assert report.source == "" and not report.loaded
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_2d_encoder_for_3d_head_is_an_error_unless_slice_wise(tmp_path):
    source = _resnet(2)
    _export(source, tmp_path / "enc2d.pt", "medssl.networks.ResNetBackbone", {"spatial_dims": 2, **TINY})
    net3d = Classifier(_resnet(3), source.feature_dim)
    with pytest.raises(ValueError, match=r"2D encoder .* 3D task.*Mismatched keys: .*conv1\.weight"):
        load_pretrained_encoder(net3d, tmp_path / "enc2d.json", spatial_dims=3, verbose=False)
    # slice-wise use of a 2D encoder in a 3D task is fine
    net2d = Classifier(_resnet(2), source.feature_dim)
    report = load_pretrained_encoder(net2d, tmp_path / "enc2d.json", spatial_dims=3, slice_wise=True, verbose=False)
    assert len(report.loaded) == len(source.state_dict())


def test_wrong_architecture_names_keys(tmp_path):
    source = _resnet()
    _export(source, tmp_path / "enc.pt", "medssl.networks.ResNetBackbone", {"spatial_dims": 2, **TINY})
    wider = ResNetBackbone(spatial_dims=2, layers=[1, 1, 1, 1], block_inplanes=[8, 8, 8, 16], in_channels=1)
    with pytest.raises(ValueError, match=r"shape mismatches.*conv1\.weight"):
        load_pretrained_encoder(Classifier(wider, 16), tmp_path / "enc.json", spatial_dims=2, verbose=False)
    deeper = ResNetBackbone(spatial_dims=2, layers=[1, 2, 1, 1], block_inplanes=[4, 8, 8, 16], in_channels=1)
    with pytest.raises(ValueError, match=r"not in the file \(layer2\.1\."):
        load_pretrained_encoder(Classifier(deeper, 16), tmp_path / "enc.json", spatial_dims=2, verbose=False)
    mit = mit_tiny(decoder=False, spatial_dims=2, in_channels_2d=1)
    with pytest.raises(ValueError, match=r"ResNetBackbone .*cannot be loaded into .*MiT.*Keys that differ"):
        load_pretrained_encoder(Classifier(mit, 16), tmp_path / "enc.json", spatial_dims=2, verbose=False)


def test_mit_unused_path_and_decoder_are_listed_as_ignored(tmp_path):
    torch.manual_seed(0)
    source = mit_tiny(decoder=True, spatial_dims=(2, 3), in_channels_2d=1)
    _export(source, tmp_path / "mit.pt", "medssl.networks.mit.mit_tiny", {"in_channels_2d": 1}, spatial_dims=None)
    target = mit_tiny(decoder=False, spatial_dims=2, in_channels_2d=1)
    report = load_pretrained_encoder(Classifier(target, 16), tmp_path / "mit.json", spatial_dims=2, verbose=False)
    assert report.adapter == "mit" and len(report.loaded) == len(target.state_dict())
    assert any("3D path" in k for k in report.ignored) and any("decoder" in k for k in report.ignored)
    assert not any(k.startswith("encoder.") and ".2d." in k.split(" ")[0] for k in report.ignored)
    for k, v in target.state_dict().items():
        assert torch.equal(v, source.state_dict()[k])


def test_hybrid_volume_trunk_serves_a_2d_resnet(tmp_path):
    from medssl.networks import HybridVolumeEncoder

    kwargs = dict(num_slices=4, embed_dim=12, in_channels=1, num_layers=1, num_heads=2, head_dim=4,
                  offset_groups=2, ffn_dim=16, **{k: v for k, v in TINY.items() if k != "in_channels"})
    torch.manual_seed(0)
    source = HybridVolumeEncoder(**kwargs)
    _export(source, tmp_path / "hv.pt", "medssl.networks.HybridVolumeEncoder", kwargs, spatial_dims=3)
    trunk = _resnet(2)
    report = load_pretrained_encoder(Classifier(trunk, 16), tmp_path / "hv.json", spatial_dims=2, verbose=False)
    assert report.adapter == "hybrid_volume_trunk" and len(report.loaded) == len(trunk.state_dict())
    assert any("slice_transformer" in k for k in report.ignored)
    assert torch.equal(trunk.conv1.weight, source.slice_encoder.backbone.conv1.weight)
    # the whole volume encoder into a volume task
    full = HybridVolumeEncoder(**kwargs)
    report = load_pretrained_encoder(full, tmp_path / "hv.json", encoder_prefix="", spatial_dims=3, verbose=False)
    assert len(report.loaded) == len(full.state_dict()) and not report.ignored


def test_file_url_downloads_once_with_hash_check(tmp_path):
    source = _resnet(seed=3)
    path = _export(source, tmp_path / "pub" / "enc.pt", "medssl.networks.ResNetBackbone", {"spatial_dims": 2, **TINY})
    digest = file_sha256(path)
    cache = tmp_path / "cache"
    net = Classifier(_resnet(seed=4), 16)
    report = load_pretrained_encoder(net, path.as_uri(), sha256=digest, cache_dir=cache, spatial_dims=2, verbose=False)
    cached = Path(report.source)
    assert cached.is_file() and cache in cached.parents and cached.with_suffix(".json").is_file()
    assert torch.equal(net.encoder.conv1.weight, source.conv1.weight)
    path.unlink()  # the second load uses the cache
    load_pretrained_encoder(net, path.as_uri(), sha256=digest, cache_dir=cache, spatial_dims=2, verbose=False)
    wrong = "0" * 64
    _export(source, path, "medssl.networks.ResNetBackbone", {"spatial_dims": 2, **TINY})
    with pytest.raises(ValueError, match=rf"sha256 {digest}.*pretrained_sha256 is {wrong}"):
        load_pretrained_encoder(net, path.as_uri(), sha256=wrong, cache_dir=tmp_path / "c2", verbose=False)
    with pytest.raises(ValueError, match="needs pretrained_sha256"):
        load_pretrained_encoder(net, "https://example.org/enc.pt", cache_dir=cache, verbose=False)


def test_checkpoints_are_read_weights_only(tmp_path):
    source = _resnet()
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"method": {"backbone." + k: v for k, v in source.state_dict().items()}, "rng": object()}, ckpt)
    with pytest.raises(ValueError, match=r"weights_only=True.*export_encoder\.py"):
        load_pretrained_encoder(Classifier(_resnet(), 16), ckpt, verbose=False)
    torch.save({"method": {"backbone." + k: v for k, v in source.state_dict().items()}}, ckpt)
    with pytest.raises(ValueError, match="training checkpoint"):
        load_pretrained_encoder(Classifier(_resnet(), 16), ckpt, verbose=False)


def test_plain_state_dict_loads_by_name_and_tampered_file_fails(tmp_path, caplog):
    source = _resnet(seed=5)
    plain = tmp_path / "plain.pt"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, plain)
    net = Classifier(_resnet(seed=6), 16)
    with caplog.at_level(logging.WARNING):
        report = load_pretrained_encoder(net, plain, verbose=False)
    assert len(report.loaded) == len(source.state_dict()) and "no manifest" in caplog.text
    path = _export(source, tmp_path / "enc.pt", "medssl.networks.ResNetBackbone", {"spatial_dims": 2, **TINY})
    torch.save({k: v + 1 for k, v in source.state_dict().items()}, path)
    with pytest.raises(ValueError, match="differs from encoder_sha256"):
        load_pretrained_encoder(net, path, verbose=False)


def test_preprocessing_mismatch_warns_and_manifest_values_apply(tmp_path, caplog):
    source = _resnet()
    _export(source, tmp_path / "enc.pt", "medssl.networks.ResNetBackbone", {"spatial_dims": 2, **TINY},
            preprocessing={"ct_window": [-1000, 1000], "spatial_size": [64, 64]})
    bundle = {"ct_window": [-200, 300], "spatial_size": [64, 64], "other": 1}
    with caplog.at_level(logging.WARNING):
        load_pretrained_encoder(Classifier(_resnet(), 16), tmp_path / "enc.json", preprocessing=bundle, verbose=False)
    assert "ct_window: pretrained [-1000, 1000] vs bundle [-200, 300]" in caplog.text
    assert "spatial_size" not in caplog.text.split("Pretrained:")[0]
    merged = pretrained_preprocessing(tmp_path / "enc.json", bundle)
    assert merged == {"ct_window": [-1000, 1000], "spatial_size": [64, 64], "other": 1}
    assert pretrained_preprocessing("", bundle) == bundle
