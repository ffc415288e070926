"""The detection bundle's network takes a ResNet-50 encoder exported by ssl_swav_multimodal_pretrain
(tools/export_encoder.py on a checkpoint of the bundle's default 2D backbone) with every backbone tensor matched,
through the bundle's own ``network`` (medssl.downstream.prepare_network); a linear-mode step leaves it unchanged.
The smoke / two-process / verify_net_in_out runs of the bundle are in tests/test_bundle_runs.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from medssl.detection import ENCODER_PREFIX, DetectionTask, build_detector
from medssl.weights import load_pretrained_encoder

from conftest import BUNDLES, load_tool, run_bundle_in_process

SWAV = BUNDLES / "ssl_swav_multimodal_pretrain"
DETECTION = BUNDLES / "xray_lesion_detection"
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def swav_resnet50_encoder(tmp_path_factory) -> tuple[Path, dict]:
    """A checkpoint holding the SwAV bundle's default 2D backbone (ResNet-50, built from its train.json) under
    method.backbone, exported with tools/export_encoder.py; returns (encoder path, the backbone's state dict)."""
    root = tmp_path_factory.mktemp("swav_rn50")
    parser = ConfigParser()
    parser.read_config(str(SWAV / "configs" / "train.json"))
    parser["bundle_root"] = str(SWAV)
    torch.manual_seed(0)
    backbone = parser.get_parsed_content("backbone", instantiate=True)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    torch.save({"method": state, "iteration": 1, "epoch": 1}, root / "checkpoint_final.pt")
    tool = load_tool("export_encoder.py", "export_encoder_tool")
    out = root / "encoder.pt"
    tool.main(bundle=str(SWAV), checkpoint=str(root / "checkpoint_final.pt"), out=str(out),
              config=["configs/train.json"])
    assert out.is_file() and out.with_suffix(".json").is_file()
    return out, backbone.state_dict()


def _bundle_network(encoder: Path, mode: str):
    parser = ConfigParser()
    parser.read_config(str(DETECTION / "configs" / "train.json"))
    parser.update({"bundle_root": str(DETECTION), "pretrained_path": str(encoder), "finetune_mode": mode})
    return parser.get_parsed_content("network", instantiate=True)


def test_swav_resnet50_loads_with_every_backbone_tensor_matched(swav_resnet50_encoder, capsys):
    encoder, source = swav_resnet50_encoder
    network = _bundle_network(encoder, "finetune")  # the bundle's own loading (prints the report)
    target = network.feature_extractor.encoder.state_dict()
    assert set(target) == set(source)
    for key, value in source.items():
        assert torch.equal(target[key], value), key
    report = load_pretrained_encoder(network, str(encoder), encoder_prefix=ENCODER_PREFIX, spatial_dims=2,
                                     verbose=False)
    assert sorted(report.loaded) == sorted(source)  # every tensor of the ResNet-50 (318, BatchNorm buffers included)
    assert report.not_loaded == [] and report.ignored == []
    assert f"loaded {len(source)} tensors" in capsys.readouterr().out


def test_linear_mode_step_keeps_the_encoder(swav_resnet50_encoder):
    encoder, source = swav_resnet50_encoder
    network = _bundle_network(encoder, "linear")
    task = DetectionTask(build_detector(network), finetune_mode="linear")
    task.train()
    assert not network.feature_extractor.encoder.training  # frozen encoder stays in eval mode (BatchNorm fixed)
    groups = task.parameter_groups(base_lr=1e-3)
    optimizer = torch.optim.SGD(groups, lr=1e-3)
    items = [{"image": torch.rand(1, 64, 64), "boxes": torch.tensor([[10.0, 12.0, 30.0, 34.0]]),
              "labels": torch.tensor([1])},
             {"image": torch.rand(1, 64, 64), "boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}]
    out = task.training_step(items)
    out["loss"].backward()
    optimizer.step()
    assert torch.isfinite(out["loss"])
    after = network.feature_extractor.encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in source.items())
    assert all(not g["name"].startswith("encoder") for g in groups)


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tmp_path, capfd):
    """The smoke run with an absurd learning rate: the network diverges after the warm-up's first steps (MONAI's heads
    raise on non-finite outputs; DetectionTask turns that into a NaN loss), the run stops, and the log names the
    last checkpoint written before it (the issue's 'NaN at lr 1e-3' guard)."""
    from medssl.data.detection_demo import build_detection_set

    data = tmp_path / "data"
    build_detection_set(data, seed=0)
    out = tmp_path / "run"
    run_bundle_in_process(DETECTION, ["train.json", "smoke.json"], out=out, meta=True, dataset_dir=str(data), lr=1e30,
                          save_every_iters=1, clip_grad_norm=None)
    captured = capfd.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "non-finite loss" in line]
    assert lines, "no non-finite loss was reported"
    assert f"Last good checkpoint: {out / 'ckpt' / 'checkpoint_0000000'}" in lines[0], lines[0]


def test_mit_variant_loads_an_exported_unimiss_mit(tmp_path):
    """configs/mit.json (+ smoke_mit.json's MiT-tiny sizes): an exported UniMiSS-style MiT (both paths, decoder) loads
    into the detector's MiT with every tensor of its 2D encoder matched and the 3D path and decoder ignored; the
    inference network of the variant gives the metadata's 21 dense channels."""
    from medssl.networks.mit import mit_tiny
    from medssl.weights import write_encoder_files

    kwargs = {"dims": [8, 16, 32, 64], "decoder_dims": [32, 16, 8], "img_size_2d": 64}
    torch.manual_seed(0)
    source = mit_tiny(decoder=True, spatial_dims=(2, 3), **kwargs)
    record = {"format": "medssl-encoder/1", "weights": "mit.pt", "spatial_dims": None,
              "backbone": {"_target_": "medssl.networks.mit.mit_tiny", "kwargs": kwargs}}
    write_encoder_files(source.state_dict(), tmp_path / "mit.pt", record)

    parser = ConfigParser()
    parser.read_config([str(DETECTION / "configs" / c) for c in ("train.json", "mit.json", "smoke.json",
                                                                 "smoke_mit.json")])
    parser.update({"bundle_root": str(DETECTION), "finetune_mode": "finetune"})
    network = parser.get_parsed_content("network_def", instantiate=True)
    report = load_pretrained_encoder(network, str(tmp_path / "mit.pt"), encoder_prefix=ENCODER_PREFIX,
                                     spatial_dims=2, verbose=False)
    target = network.feature_extractor.encoder.state_dict()
    assert report.adapter == "mit" and sorted(report.loaded) == sorted(target) and not report.not_loaded
    assert any("3D path" in k for k in report.ignored) and any("decoder" in k for k in report.ignored)
    for key, value in target.items():
        assert torch.equal(value, source.state_dict()[key]), key
    task = DetectionTask(build_detector(network, parser.get_parsed_content("base_anchor_shapes")))
    out = task.training_step([{"image": torch.rand(1, 64, 64), "boxes": torch.tensor([[8.0, 8.0, 20.0, 24.0]]),
                               "labels": torch.tensor([2])}])
    assert torch.isfinite(out["loss"])

    inference = ConfigParser()
    inference.read_config([str(DETECTION / "configs" / c) for c in ("inference.json", "mit.json", "smoke_mit.json")])
    dense = inference.get_parsed_content("network_def", instantiate=True)
    assert tuple(dense(torch.rand(1, 1, 64, 64)).shape[:2]) == (1, 21)
