"""tools/convert_weights.py swav: SwAV / DeepCluster-v2 ResNet checkpoints in the reference's exact key layout
(tests/fixtures/swav_reference_keys.json, copied from the published architectures) convert with every tensor mapped,
the head and prototypes kept apart, and features equal to a plain reference forward written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import load_tool
from medssl.networks import ResNetBackbone
from medssl.weights.convert_swav import convert_swav_checkpoint
from medssl.weights.export import build_encoder_from_manifest

KEYS = json.loads((Path(__file__).parent / "fixtures" / "swav_reference_keys.json").read_text())


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


def reference_state_dict(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the reference's shapes; batch-norm statistics positive, the counters integers."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("running_mean", "bias")):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # batch-norm weights
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:  # He-scaled weights keep the activations of 16 blocks finite and informative
            fan_in = torch.tensor(shape[1:]).prod().item()
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The facebookresearch/swav ResNet-50 trunk in eval mode, written out: 7x7/2 stem, 3x3/2 max-pool, bottlenecks
    (stride on the 3x3), 1x1 projection shortcuts, global average pool."""

    def bn(t, name):
        return F.batch_norm(t, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                            state[f"{name}.bias"], training=False, eps=1e-5)

    x = F.relu(bn(F.conv2d(x, state["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            stride = 2 if b == 0 and stage > 1 else 1
            out = F.relu(bn(F.conv2d(x, state[f"{p}.conv1.weight"]), f"{p}.bn1"))
            out = F.relu(bn(F.conv2d(out, state[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
            out = bn(F.conv2d(out, state[f"{p}.conv3.weight"]), f"{p}.bn3")
            shortcut = x
            if f"{p}.downsample.0.weight" in state:
                shortcut = bn(F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            x = F.relu(out + shortcut)
    return x.mean(dim=(2, 3))


def _save_training_checkpoint(state: dict, path: Path) -> Path:
    """The layout of main_swav.py's checkpoints: a ``state_dict`` entry with DistributedDataParallel's ``module.``."""
    torch.save({"epoch": 800, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


def test_resnet50_converts_every_tensor_and_computes_the_reference_features(tmp_path):
    shapes = KEYS["swav_resnet50_with_head_3000"]
    state = reference_state_dict(shapes)
    ckpt = _save_training_checkpoint(state, tmp_path / "swav_800ep_pretrain.pth.tar")
    weights, manifest_path, report = convert_swav_checkpoint(ckpt, tmp_path / "encoder.pt")

    trunk = [k for k in shapes if not k.startswith(("projection_head", "prototypes"))]
    assert report["mapped"] == len(trunk) == 318 and report["width"] == 1
    head = torch.load(report["head_file"], weights_only=True)
    assert sorted(head) == sorted(k for k in shapes if k not in trunk) and len(head) == 10  # kept apart, not dropped
    assert torch.equal(head["prototypes.weight"], state["prototypes.weight"])
    manifest = json.loads(manifest_path.read_text())
    assert manifest["backbone"] == {"_target_": "medssl.networks.ResNetBackbone",
                                    "kwargs": {"spatial_dims": 2, "in_channels": 3, "width": 1}}
    assert manifest["num_params"] == 23_508_032 and manifest["feature_dim"] == 2048

    # in float64 the two forwards agree to rounding: every tensor sits where the reference uses it
    encoder = build_encoder_from_manifest(manifest_path).eval().double()
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    state64 = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    with torch.no_grad():
        expected = reference_forward(state64, x)
        ours = encoder(x.transpose(2, 3))  # medssl's 2D images are column-first: (C, W, H)
    assert expected.abs().max() > 1e-3  # features that carry something
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-10)
    with torch.no_grad():  # float32, as it runs: 16 blocks of float32 sums, within 1e-3 of the features' scale
        ours32 = build_encoder_from_manifest(manifest_path).eval()(x.float().transpose(2, 3)).double()
    assert (ours32 - expected).abs().max() <= 1e-3 * expected.abs().max()

    # rows-first data: no transpose, the same image as the reference sees it
    weights, manifest_path, _ = convert_swav_checkpoint(ckpt, tmp_path / "rows.pt", transpose_2d=False)
    with torch.no_grad():
        ours = build_encoder_from_manifest(manifest_path).eval().double()(x)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-10)


def test_resnet50w2_key_layout_maps_onto_the_wide_backbone():
    shapes = KEYS["swav_resnet50w2_with_head_3000"]
    with torch.device("meta"):
        ours = ResNetBackbone(spatial_dims=2, in_channels=3, width=2).state_dict()
    trunk = {k: tuple(v) for k, v in shapes.items() if not k.startswith(("projection_head", "prototypes"))}
    assert trunk == {k: tuple(v.shape) for k, v in ours.items()}
    assert shapes["conv1.weight"][0] == 64 * 2  # the width the converter reads


def test_wrong_family_and_cut_checkpoints_are_one_line_errors(tmp_path):
    mit = tmp_path / "unimiss.pth"
    torch.save({"teacher": {"backbone.transformer.block1.0.attn.q.weight": torch.zeros(2, 2)}}, mit)
    message = r"unimiss\.pth: no ResNet trunk: it holds entries teacher .*convert_weights\.py unimiss"
    with pytest.raises(ValueError, match=message):
        convert_swav_checkpoint(mit, tmp_path / "e.pt")
    shapes = {k: v for k, v in KEYS["swav_resnet50_with_head_3000"].items() if not k.startswith("layer4.2")}
    partial = tmp_path / "partial.pth"
    torch.save(reference_state_dict(shapes), partial)
    with pytest.raises(ValueError) as caught:
        convert_swav_checkpoint(partial, tmp_path / "e.pt")
    assert "18 ResNet-50 keys get no tensor: layer4.2.conv1.weight" in str(caught.value)
    assert "... and 8 more" in str(caught.value) and "\n" not in str(caught.value)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"convert_swav: .*empty\.pth is empty \(0 bytes\)"):
        convert_swav_checkpoint(empty, tmp_path / "e.pt")
    assert not (tmp_path / "e.pt").exists()


def test_command_line(tmp_path, capsys):
    tool = load_tool("convert_weights.py", "convert_weights_tool")
    ckpt = _save_training_checkpoint(reference_state_dict(KEYS["swav_resnet50_with_head_3000"]), tmp_path / "c.pth")
    tool.main(["swav", str(ckpt), "--out", str(tmp_path / "encoder.pt")])
    out = capsys.readouterr().out
    assert "318 tensors, ResNet-50 width 1" in out and "encoder_head.pt" in out
    assert (tmp_path / "encoder.json").is_file() and (tmp_path / "encoder_head.pt").is_file()
