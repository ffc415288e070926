"""tools/convert_weights.py dino: DINO ViT checkpoints in the reference's exact key layout
(tests/fixtures/dino_reference_keys.json, copied from the published architectures) convert with every tensor mapped,
a training checkpoint's head kept apart, and class-token features equal to a plain reference forward written here
(DINO's vision_transformer.py: explicit attention matrix, its interpolate_pos_encoding at other input sizes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import load_tool
from medssl.evaluation.dvme_protocol import EncoderSpec, build_encoder
from medssl.networks import ViTBackbone, vit_base, vit_small
from medssl.weights.convert_dino import convert_dino_checkpoint
from medssl.weights.export import build_encoder_from_manifest

KEYS = json.loads((Path(__file__).parent / "fixtures" / "dino_reference_keys.json").read_text())


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


def vit_s16_shapes() -> dict:
    """ViT-S/16: the ViT-S/8 layout with 16-pixel patches (14² + 1 position entries)."""
    shapes = dict(KEYS["dino_vit_small_patch8"])
    shapes["patch_embed.proj.weight"] = [384, 3, 16, 16]
    shapes["pos_embed"] = [1, 197, 384]
    return shapes


def reference_state_dict(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key == "norm.weight":
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            state[key] = 0.05 * torch.randn(shape, generator=g)
        elif key in ("cls_token", "pos_embed"):
            state[key] = 0.5 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=g) / fan_in ** 0.5
    return state


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """DINO's VisionTransformer in eval mode, written out; x is (B, C, H, W) rows first."""
    kernel = state["patch_embed.proj.weight"]
    p, dim = kernel.shape[-1], kernel.shape[0]
    tokens = F.conv2d(x, kernel, state["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    b, n, _ = tokens.shape
    tokens = torch.cat((state["cls_token"].expand(b, -1, -1), tokens), dim=1)
    pos = state["pos_embed"]
    big_n = pos.shape[1] - 1
    h0, w0 = x.shape[2] // p, x.shape[3] // p
    if not (n == big_n and h0 == w0):  # interpolate_pos_encoding, as in the reference
        side = int(math.sqrt(big_n))
        grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side), mode="bicubic")
        pos = torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)
    tokens = tokens + pos
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        s = {k[len(f"blocks.{i}."):]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        y = F.layer_norm(tokens, (dim,), s["norm1.weight"], s["norm1.bias"], eps=1e-6)
        qkv = F.linear(y, s["attn.qkv.weight"], s["attn.qkv.bias"]).reshape(b, -1, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, -1, dim)
        tokens = tokens + F.linear(y, s["attn.proj.weight"], s["attn.proj.bias"])
        y = F.layer_norm(tokens, (dim,), s["norm2.weight"], s["norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, s["mlp.fc1.weight"], s["mlp.fc1.bias"])), s["mlp.fc2.weight"],
                     s["mlp.fc2.bias"])
        tokens = tokens + y
    return F.layer_norm(tokens, (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6)[:, 0]


@pytest.mark.parametrize(
    "name, shapes, heads, arch, size",
    [
        ("vit_s8", KEYS["dino_vit_small_patch8"], 6, "ViT-S/8", (48, 64)),  # 6x8 patches: grid resampled
        ("vit_s16", vit_s16_shapes(), 6, "ViT-S/16", (224, 224)),  # the stored grid
        ("vit_b16", KEYS["dino_vit_base_patch16"], 12, "ViT-B/16", (96, 160)),
    ],
)
def test_dino_converts_every_tensor_and_computes_the_reference_features(tmp_path, name, shapes, heads, arch, size):
    state = reference_state_dict(shapes)
    ckpt = tmp_path / f"dino_{name}_pretrain.pth"
    torch.save(state, ckpt)  # the hub files are plain backbone state dicts
    weights, manifest_path, report = convert_dino_checkpoint(ckpt, tmp_path / "encoder.pt")
    assert report["mapped"] == len(shapes) == 150 and report["arch"] == arch and report["head_file"] is None
    manifest = json.loads(manifest_path.read_text())
    assert manifest["backbone"]["_target_"] == "medssl.networks.ViTBackbone"
    assert manifest["backbone"]["kwargs"]["num_heads"] == heads and manifest["backbone"]["kwargs"]["img_size"] == 224
    assert manifest["num_params"] == sum(math.prod(s) for s in shapes.values())

    # float64: the two forwards agree to rounding; medssl's 2D images are column-first, (C, W, H)
    encoder = build_encoder_from_manifest(manifest_path).eval().double()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    state64 = {k: v.double() for k, v in state.items()}
    with torch.no_grad():
        expected = reference_forward(state64, x, heads)
        ours = encoder(x.transpose(2, 3))
    assert expected.std() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-10)

    if name == "vit_s8":  # rows-first data: no transpose, the reference's own layout
        _, rows_manifest, _ = convert_dino_checkpoint(ckpt, tmp_path / "rows.pt", transpose_2d=False)
        with torch.no_grad():
            rows = build_encoder_from_manifest(rows_manifest).eval().double()(x)
        torch.testing.assert_close(rows, expected, rtol=1e-9, atol=1e-10)


def test_variant_builders_match_the_published_parameter_counts():
    with torch.device("meta"):
        small8, base16 = vit_small(patch_size=8), vit_base(patch_size=16)
    for model, key in ((small8, "dino_vit_small_patch8"), (base16, "dino_vit_base_patch16")):
        assert {k: list(v.shape) for k, v in model.state_dict().items()} == KEYS[key]
    assert sum(p.numel() for p in base16.parameters()) == 85_798_656  # ViT-B/16 backbone, DINO's README: 85M


def test_training_checkpoint_teacher_and_head_and_dvme(tmp_path):
    shapes = vit_s16_shapes()
    teacher, student = reference_state_dict(shapes, seed=1), reference_state_dict(shapes, seed=2)
    head = {"head.mlp.0.weight": torch.randn(8, 384), "head.last_layer.weight_g": torch.ones(16, 1)}
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 100, "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, **head},
                "student": {f"module.backbone.{k}": v for k, v in student.items()}}, ckpt)
    _, manifest_path, report = convert_dino_checkpoint(ckpt, tmp_path / "teacher.pt")
    assert report["mapped"] == 150 and report["head_keys"] == sorted(head)
    kept = torch.load(report["head_file"], weights_only=True)
    assert torch.equal(kept["head.mlp.0.weight"], head["head.mlp.0.weight"])
    encoder = build_encoder_from_manifest(manifest_path)
    assert torch.equal(encoder.state_dict()["blocks.3.mlp.fc1.weight"], teacher["blocks.3.mlp.fc1.weight"])
    _, student_manifest, _ = convert_dino_checkpoint(ckpt, tmp_path / "student.pt", entry="student")
    student_encoder = build_encoder_from_manifest(student_manifest)
    assert torch.equal(student_encoder.state_dict()["norm.bias"], student["norm.bias"])

    # DVME uses it as any exported encoder: grey images are repeated to RGB, a (B, 384) embedding per image
    dvme_encoder = build_encoder(EncoderSpec("dino", path=str(manifest_path)))
    with torch.no_grad():
        assert dvme_encoder(torch.rand(2, 1, 64, 64)).shape == (2, 384)


def test_wrong_family_and_cut_checkpoints_are_one_line_errors(tmp_path):
    swav = tmp_path / "swav.pth"
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(64, 3, 7, 7)}, "epoch": 1}, swav)
    with pytest.raises(ValueError, match=r"swav\.pth: no ViT backbone: it holds entries epoch, state_dict .*swav"):
        convert_dino_checkpoint(swav, tmp_path / "e.pt")
    shapes = {k: v for k, v in vit_s16_shapes().items() if not k.startswith("blocks.11.")}
    state = reference_state_dict(shapes)
    state["blocks.11.norm1.weight"] = torch.ones(384)  # depth 12 read, the rest of block 11 missing
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    with pytest.raises(ValueError) as caught:
        convert_dino_checkpoint(partial, tmp_path / "e.pt")
    message = str(caught.value)
    assert "11 ViT-S/16 keys get no tensor: blocks.11.norm1.bias" in message
    assert "... and 1 more" in message and "\n" not in message
    with pytest.raises(ValueError, match="entry must be 'teacher' or 'student'"):
        torch.save({"teacher": {}, "epoch": 1}, tmp_path / "t.pth")
        convert_dino_checkpoint(tmp_path / "t.pth", tmp_path / "e.pt", entry="ema")
    assert not (tmp_path / "e.pt").exists()


def test_vit_backbone_3d_and_input_checks():
    model = ViTBackbone(spatial_dims=3, in_channels=1, img_size=(32, 32, 16), patch_size=(16, 16, 8), embed_dim=64,
                        depth=2, num_heads=4)
    out = model.forward_features(torch.rand(2, 1, 48, 32, 16))  # another size: the grid is resampled
    assert out["cls"].shape == (2, 64) and out["grid"] == (3, 2, 2) and out["tokens"].shape == (2, 12, 64)
    with pytest.raises(ValueError, match=r"expected \(B, 1, X, Y, Z\) input, got shape \(2, 1, 32, 32\)"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        ViTBackbone(img_size=100, patch_size=16)


def test_command_line(tmp_path, capsys):
    tool = load_tool("convert_weights.py", "convert_weights_tool")
    ckpt = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(reference_state_dict(vit_s16_shapes()), ckpt)
    tool.main(["dino", str(ckpt), "--out", str(tmp_path / "encoder.pt")])
    assert "150 tensors, ViT-S/16" in capsys.readouterr().out
    assert (tmp_path / "encoder.json").is_file()


def test_xray_classification_linear_probe_on_a_converted_dino_encoder(demo_datalist, tmp_path, capfd):
    """configs/vit.json: a converted DINO ViT-S/16 loads tensor for tensor into the classifier's encoder, frozen."""
    from conftest import BUNDLES, run_bundle_in_process

    ckpt = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(reference_state_dict(vit_s16_shapes()), ckpt)
    weights, _, _ = convert_dino_checkpoint(ckpt, tmp_path / "encoder.pt")
    bundle, out = BUNDLES / "xray_classification", tmp_path / "run"
    run_bundle_in_process(bundle, ["train.json", "vit.json", "smoke.json"], out=out, datalist=demo_datalist, meta=True,
                          finetune_mode="linear", pretrained_path=str(weights), epochs=1)
    assert "loaded 150 tensors from" in capfd.readouterr().out
    model = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    exported = torch.load(weights, map_location="cpu", weights_only=True)
    assert all(torch.equal(model[f"encoder.{k}"], t) for k, t in exported.items())


def test_catalogue_fetch_of_a_dino_entry_through_a_file_mirror(tmp_path, monkeypatch):
    """tools/weights.py fetch dino_vits16 with the entry's URL on a file:// mirror: downloaded, converted by the dino
    converter, cached; --pretrained_path dino_vits16 then resolves to that encoder."""
    from medssl.utils.io import file_sha256
    from medssl.weights.catalogue import CATALOGUE_ENV, fetch_encoder
    from medssl.weights.loading import resolve_pretrained_path

    state = reference_state_dict(vit_s16_shapes())
    mirror = tmp_path / "mirror" / "dino_deitsmall16_pretrain.pth"
    mirror.parent.mkdir()
    torch.save(state, mirror)
    shipped = Path(__file__).parents[1] / "common" / "medssl" / "weights" / "catalogue.json"
    doc = json.loads(shipped.read_text())
    (entry,) = [e for e in doc["encoders"] if e["name"] == "dino_vits16"]
    entry["url"] = mirror.as_uri()
    (tmp_path / "catalogue.json").write_text(json.dumps(doc))
    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(CATALOGUE_ENV, str(tmp_path / "catalogue.json"))

    encoder_file = fetch_encoder("dino_vits16", sha256=file_sha256(mirror))
    manifest = json.loads(encoder_file.with_suffix(".json").read_text())
    assert manifest["backbone"]["_target_"] == "medssl.networks.ViTBackbone"
    assert manifest["catalogue"]["name"] == "dino_vits16" and manifest["num_tensors"] == 150
    encoder = build_encoder_from_manifest(encoder_file.with_suffix(".json"))
    assert torch.equal(encoder.state_dict()["blocks.5.attn.qkv.weight"], state["blocks.5.attn.qkv.weight"])
    mirror.unlink()  # cached: no second download
    assert resolve_pretrained_path("dino_vits16") == encoder_file
