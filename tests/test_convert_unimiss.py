"""Converter from the published UniMiSS checkpoints: reference key list, round trip, axis order, refusals, CLI."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from conftest import REPO, load_tool
from medssl.networks.mit import mit_small, mit_tiny
from medssl.weights.convert_unimiss import (
    convert_unimiss_checkpoint,
    convert_unimiss_state_dict,
    load_unimiss_checkpoint,
    medssl_key,
    reference_key,
    reference_state_dict_shapes,
    select_backbone_state_dict,
)
from medssl.utils.io import file_sha256
from medssl.weights.export import MANIFEST_FORMAT, build_encoder_from_manifest, load_manifest

# the reference MiT-small / DINO-head key list (key -> shape) of the authors' checkpoints, kept in the repository
SPEC_FILE = REPO / "tests" / "fixtures" / "unimiss_reference_keys.json"


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


def _reference_text() -> str:
    assert SPEC_FILE.is_file(), f"{SPEC_FILE} is missing (the reference key list of the UniMiSS checkpoints)"
    return SPEC_FILE.read_text()


def reference_keys() -> dict[str, dict[str, tuple[int, ...]]]:
    data = json.loads(_reference_text())
    return {part: {k: tuple(v) for k, v in data[part].items()} for part in ("mit_small", "dino_head")}


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}


def authors_checkpoint(backbone: dict[str, torch.Tensor], student_token: torch.Tensor | None = None) -> dict:
    """Nested as the authors' main.py saves it: the teacher (ModuleWrapper: backbone + head), the DDP-wrapped student,
    the optimiser, the epoch, the argparse arguments and the loss state. The student shares the teacher's tensors
    (torch.save writes a shared storage once) except, optionally, its SSL token."""
    head = {k: torch.zeros(1).expand(*shape) for k, shape in reference_keys()["dino_head"].items()}  # 1 float on disk
    teacher = {**{f"backbone.{k}": v for k, v in backbone.items()}, **{f"head.{k}": v for k, v in head.items()}}
    student = {f"module.{k}": v for k, v in teacher.items()}
    if student_token is not None:
        student["module.backbone.transformer.cls_tokens1"] = student_token
    args = argparse.Namespace(arch="model_small", out_dim=65536, img_size2D=224, img_size3D=[16, 96, 96], lr=0.0008)
    return {
        "student": student,
        "teacher": teacher,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.0008, "weight_decay": 0.04, "params": [0, 1]}]},
        "epoch": 200,
        "args": args,
        "loss": {"center": torch.zeros(1, 65536)},
    }


def test_reference_key_file_lists_mit_small_and_its_head():
    keys = reference_keys()
    assert len(keys["mit_small"]) == 473 and len(keys["dino_head"]) == 8


def test_reference_key_list_is_exactly_what_mit_small_expects():
    with torch.device("meta"):
        model = mit_small()
    expected = reference_state_dict_shapes(model)
    listed = reference_keys()["mit_small"]
    assert set(expected) == set(listed), (sorted(set(expected) - set(listed)), sorted(set(listed) - set(expected)))
    assert {k: v for k, v in expected.items() if listed[k] != v} == {}
    # the mapping is one-to-one and invertible; the DINO head's keys are no MiT keys
    mapped = {k: medssl_key(k) for k in listed}
    assert None not in mapped.values() and len(set(mapped.values())) == len(mapped)
    assert set(mapped.values()) == set(model.state_dict())
    assert all(reference_key(v) == k for k, v in mapped.items())
    assert all(medssl_key(k) is None for k in reference_keys()["dino_head"])
    assert mapped["transformer.cls_tokens1"] == "encoder.ssl_token"
    assert mapped["transformer.patch_embed3D0.conv.weight"] == "encoder.stem.3d.conv.weight"
    assert mapped["transformer.block2.1.attn.sr3D.weight"] == "encoder.stages.1.1.attn.sr.3d.weight"
    assert mapped["Decblock1.3.attn.norm.bias"] == "decoder.stages.1.3.attn.sr_norm.bias"
    assert mapped["cls_tokens0.weight"] == "decoder.ssl_token_proj.0.weight"


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    backbone = random_state_dict(reference_keys()["mit_small"], seed=0)
    path = tmp_path_factory.mktemp("unimiss") / "UniMiss_small.pth"
    torch.save(authors_checkpoint(backbone), path)
    return path, backbone


def test_authors_small_checkpoint_converts_and_loads_strictly(small_checkpoint, tmp_path):
    path, backbone = small_checkpoint
    weights, manifest_path, report = convert_unimiss_checkpoint(path, tmp_path / "encoder.pt")

    # every reference MiT key mapped; the head reported, nothing else left over
    assert len(report.mapped) == 473 and report.missing == []
    assert set(report.unused) == {"head"}
    assert sorted(report.unused["head"]) == sorted(f"head.{k}" for k in reference_keys()["dino_head"])
    assert (report.entry, report.variant, report.spatial_dims, report.decoder) == ("teacher", "small", (2, 3), True)

    state = torch.load(weights, weights_only=True)
    model = build_encoder_from_manifest(load_manifest(manifest_path)).eval()  # strict load + sha256 check
    assert list(state) == list(model.state_dict()) and len(state) == 473
    # values: shared tensors unchanged, 3D kernels (D, H, W) -> (H, W, D), 2D kernels transposed
    assert torch.equal(state["encoder.stages.2.3.mlp.fc1.weight"], backbone["transformer.block3.3.mlp.fc1.weight"])
    assert torch.equal(state["encoder.ssl_token"], backbone["transformer.cls_tokens1"])
    assert torch.equal(
        state["encoder.stem.3d.conv.weight"], backbone["transformer.patch_embed3D0.conv.weight"].permute(0, 1, 3, 4, 2)
    )
    assert torch.equal(
        state["decoder.upsample.3d.1.weight"], backbone["DecEmbed3D1.proj.weight"].permute(0, 1, 3, 4, 2)
    )
    assert torch.equal(state["encoder.stages.0.1.attn.sr.2d.weight"],
                       backbone["transformer.block1.1.attn.sr2D.weight"].transpose(2, 3))
    # 3D position embedding: our token (x, y, z) is the reference's token (d=z, h=x, w=y); the SSL entry first
    ours, theirs = state["encoder.pos_embed.3d.0"], backbone["transformer.pos_embed3D1"]
    assert torch.equal(ours[:, 0], theirs[:, 0])
    assert torch.equal(ours[0, 1:].reshape(24, 24, 8, 48)[5, 17, 3], theirs[0, 1:].reshape(8, 24, 24, 48)[3, 5, 17])
    ours, theirs = state["encoder.pos_embed.2d.1"], backbone["transformer.pos_embed2D2"]
    assert torch.equal(ours[0, 1:].reshape(28, 28, 128)[4, 9], theirs[0, 1:].reshape(28, 28, 128)[9, 4])

    manifest = json.loads(manifest_path.read_text())
    assert manifest["format"] == MANIFEST_FORMAT and manifest["weights"] == "encoder.pt"
    assert manifest["backbone"] == {
        "_target_": "medssl.networks.mit.mit_small", "kwargs": {"decoder": True, "spatial_dims": [2, 3]}
    }  # fmt: skip
    assert manifest["feature_dim"] == 48 and manifest["spatial_dims"] == [2, 3]
    assert manifest["num_params"] == 43_942_944 and manifest["num_tensors"] == 473
    assert manifest["source_sha256"] == file_sha256(path) and manifest["encoder_sha256"] == file_sha256(weights)
    assert manifest["source_epoch"] == 200 and manifest["encoder_key"] == "teacher.backbone"
    assert len(manifest["conversion"]["unused_source_keys"]["head"]) == 8
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 48)
        assert model(torch.randn(1, 1, 64, 64, 16)).shape == (1, 48)


def test_student_entry_encoder_only_and_one_path(tmp_path):
    with torch.device("meta"):
        shapes = dict(reference_state_dict_shapes(mit_tiny()))
    backbone = random_state_dict(shapes, seed=1)
    student_token = torch.full((1, 1, 48), 0.5)
    checkpoint = authors_checkpoint(backbone, student_token=student_token)

    state, left_out, entry = select_backbone_state_dict(checkpoint, "student", "ckpt.pth")
    assert entry == "student" and len(left_out["head"]) == 8 and set(state) == set(shapes)
    converted, report = convert_unimiss_state_dict(state, mit_tiny(), variant="tiny", entry=entry)
    assert torch.equal(converted["encoder.ssl_token"], student_token)

    # the encoder alone: every decoder key reported as not converted
    encoder = mit_tiny(decoder=False)
    converted, report = convert_unimiss_state_dict(state, encoder, variant="tiny")
    decoder_keys = sorted(k for k in shapes if not k.startswith("transformer."))
    assert sorted(report.unused["decoder"]) == decoder_keys and len(decoder_keys) > 0
    encoder.load_state_dict(converted, strict=True)

    # one path: the other path's keys reported, the model loads strictly and runs
    only3d = mit_tiny(spatial_dims=3)
    converted, report = convert_unimiss_state_dict(state, only3d, variant="tiny")
    assert sorted(report.unused["path 2D"]) == sorted(k for k in shapes if "2D" in k)
    only3d.load_state_dict(converted, strict=True)
    with torch.no_grad():
        assert only3d.eval()(torch.randn(1, 1, 64, 64, 16)).shape == (1, 48)


def test_wrong_shapes_missing_and_unknown_keys():
    with torch.device("meta"):
        shapes = dict(reference_state_dict_shapes(mit_tiny()))
    state = random_state_dict(shapes, seed=2)

    bad = dict(state, **{"transformer.block1.0.attn.sr2D.weight": torch.zeros(48, 48, 5, 5)})
    message = (
        r"bad\.pth \[state_dict\]: 1 shape mismatches against MiT: transformer\.block1\.0\.attn\.sr2D\.weight has "
        r"shape \(48, 48, 5, 5\) where MiT key encoder\.stages\.0\.0\.attn\.sr\.2d\.weight needs \(48, 48, 6, 6\)"
    )
    with pytest.raises(ValueError, match=message):
        convert_unimiss_state_dict(bad, mit_tiny(), source="bad.pth")
    bad = dict(state, **{"transformer.pos_embed3D1": torch.zeros(1, 2049, 48)})
    message = r"img_size.*pos_embed3D1 has shape \(1, 2049, 48\) where .* needs \(1, 4609, 48\)"
    with pytest.raises(ValueError, match=message):
        convert_unimiss_state_dict(bad, mit_tiny())

    missing = {k: v for k, v in state.items() if k != "transformer.block2.0.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"1 MiT keys get no tensor.*encoder\.stages\.1\.0\.mlp\.fc2\.bias "
                                         r"\(reference transformer\.block2\.0\.mlp\.fc2\.bias\)"):
        convert_unimiss_state_dict(missing, mit_tiny())

    unknown = dict(state, **{"transformer.extra_scale": torch.ones(1), "Decblock0.0.attn.gate.weight": torch.ones(2)})
    converted, report = convert_unimiss_state_dict(unknown, mit_tiny())
    assert sorted(report.unused["unknown"]) == ["Decblock0.0.attn.gate.weight", "transformer.extra_scale"]
    assert "transformer.extra_scale" in report.summary()
    mit_tiny().load_state_dict(converted, strict=True)

    # a small checkpoint read as tiny: the extra blocks are an error, not silently dropped
    with torch.device("meta"):
        small_shapes = dict(reference_state_dict_shapes(mit_small(decoder=False)))
    small_state = {k: torch.zeros(0).new_empty(v, device="meta") for k, v in small_shapes.items()}
    with pytest.raises(ValueError, match=r"map to no parameter of MiT-tiny.*transformer\.block1\.1\."):
        convert_unimiss_state_dict(small_state, mit_tiny(decoder=False), variant="tiny")


def _reference_layout_model(state: dict[str, torch.Tensor]):
    """Our MiT-tiny laid out as the reference's network: 3D inputs (D, H, W) with stem stride (1, 2, 2) and position
    grids (D, H, W), 2D inputs rows first; loaded with the reference tensors as they are (names mapped only)."""
    model = mit_tiny().eval()
    model.encoder.stem["3d"].conv.stride = (1, 2, 2)
    for grids in (model.encoder.pos_grids[3], model.decoder.pos_grids[3]):
        grids[:] = [(g[2], g[0], g[1]) for g in grids]
    model._check_input = lambda x: None  # its size checks assume depth last
    model.load_state_dict({medssl_key(k): v for k, v in state.items()}, strict=True)
    return model


def test_converted_network_computes_what_the_reference_layout_computes():
    """The conversion's permutations are right: the converted MiT on our (X, Y, Z) volume / column-first image gives
    the reference layout's outputs on its (D, H, W) = (Z, X, Y) volume / rows-first image."""
    torch.manual_seed(0)
    reference_state = {reference_key(k): v for k, v in mit_tiny().state_dict().items()}  # realistic init, any layout
    reference = _reference_layout_model(reference_state)
    converted, report = convert_unimiss_state_dict(reference_state, mit_tiny())
    ours = mit_tiny().eval()
    ours.load_state_dict(converted, strict=True)
    assert any("3D kernel" in note for note in report.axis_changes.values())

    volume_dhw = torch.randn(2, 1, 16, 64, 64)  # reference (B, C, D, H, W)
    volume_xyz = volume_dhw.permute(0, 1, 3, 4, 2)  # ours (B, C, X, Y, Z): X = H, Y = W, Z = D
    image_hw = torch.randn(2, 3, 64, 64)  # reference rows first
    image_wh = image_hw.transpose(2, 3)  # medssl's 2D loaders: column index first
    with torch.no_grad():
        ref3, our3 = reference.forward_features(volume_dhw), ours.forward_features(volume_xyz)
        ref2, our2 = reference.forward_features(image_hw), ours.forward_features(image_wh)
        renamed_only = mit_tiny().eval()
        renamed_only.load_state_dict({medssl_key(k): v for k, v in reference_state.items()})
        unpermuted = renamed_only(volume_xyz)
    torch.testing.assert_close(our3["ssl_token"], ref3["ssl_token"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(our3["encoder2"], ref3["encoder2"].permute(0, 1, 3, 4, 2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(our3["decoder3"], ref3["decoder3"].permute(0, 1, 3, 4, 2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(our2["ssl_token"], ref2["ssl_token"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(our2["encoder1"], ref2["encoder1"].transpose(2, 3), rtol=1e-4, atol=1e-5)
    # the check has teeth: the same weights without the permutation give another network
    assert not torch.allclose(unpermuted, ref3["ssl_token"], rtol=1e-3, atol=1e-4)


class _NotAllowed:  # a global that torch.load(weights_only=True) refuses
    pass


def test_untrusted_pickles_are_refused_unless_trusted(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"teacher": {}, "extra": _NotAllowed()}, path)
    message = r"odd\.pth cannot be read with torch\.load\(weights_only=True\).*_NotAllowed.*--trusted"
    with pytest.raises(ValueError, match=message):
        load_unimiss_checkpoint(path)
    assert isinstance(load_unimiss_checkpoint(path, trusted=True)["extra"], _NotAllowed)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_unimiss_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(KeyError, match=r"x\.pth: no entry 'teacher'.*has model, step"):
        select_backbone_state_dict({"model": {"a": 1}, "step": 3}, "teacher", "x.pth")


def _load_tool():
    return load_tool("convert_weights.py", "convert_weights_tool")


def test_command_line_tool(tmp_path, capsys):
    with torch.device("meta"):
        shapes = dict(reference_state_dict_shapes(mit_tiny()))
    backbone = random_state_dict(shapes, seed=3)
    checkpoint = authors_checkpoint(backbone)
    checkpoint["teacher"]["backbone.transformer.unexpected_gain"] = torch.ones(3)
    ckpt = tmp_path / "UniMiss_tiny.pth"
    torch.save(checkpoint, ckpt)
    tool = _load_tool()
    assert "unimiss" in tool.CONVERTERS

    # the documented command line, parsed by fire in-process (a subprocess would pay the imports again)
    out = tmp_path / "out" / "encoder.pt"
    tool.main(["unimiss", str(ckpt), "--out", str(out), "--decoder", "False"])
    printed = capsys.readouterr().out
    assert "MiT-tiny (2D+3D, encoder)" in printed and f"wrote {out}" in printed
    assert "not converted (unknown): 1 keys" in printed and "transformer.unexpected_gain" in printed
    assert "not converted (head): 8 keys" in printed and "head.last_layer.weight_v" in printed
    assert "not converted (decoder)" in printed
    manifest = load_manifest(out)
    assert manifest["backbone"]["kwargs"] == {"decoder": False, "spatial_dims": [2, 3]}
    assert manifest["feature_dim"] == 512 and manifest["num_params"] == 13_859_392
    encoder = build_encoder_from_manifest(manifest).eval()
    with torch.no_grad():
        assert encoder(torch.randn(1, 1, 64, 64, 16)).shape == (1, 512)

    # one path only, with the decoder: the other path's keys are listed
    out3d = tmp_path / "out" / "encoder3d.pt"
    tool.main(["unimiss", str(ckpt), "--out", str(out3d), "--spatial_dims", "3", "--quiet"])
    printed = capsys.readouterr().out
    assert "MiT-tiny (3D, encoder + decoder)" in printed and "not converted (path 2D)" in printed
    manifest = load_manifest(out3d)
    assert manifest["backbone"]["kwargs"] == {"decoder": True, "spatial_dims": 3}
    assert (manifest["spatial_dims"], manifest["in_channels"], manifest["num_params"]) == (3, 1, 16_305_728)
    assert list(manifest["preprocessing"]) == ["3d"]
    assert build_encoder_from_manifest(manifest).paths == (3,)

    # --strict refuses the unknown key; the one-line error (exit status 2) names it
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["unimiss", str(ckpt), "--out", str(tmp_path / "strict.pt"), "--strict"])
    assert exit_info.value.code == 2
    assert re.match(r"error: .*transformer\.unexpected_gain.*strict", capsys.readouterr().err)
    assert not (tmp_path / "strict.pt").exists()


def test_unreadable_files_get_one_line_saying_what_they_are(tmp_path):
    """An empty file, a text file and a truncated checkpoint each get their own one-line reason; none is told to pass
    --trusted, which only lifts the weights_only refusal of a global."""
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    text = tmp_path / "page.pth"
    text.write_text("<html><body>404 Not Found</body></html>\n")
    whole = tmp_path / "whole.pth"
    torch.save({"teacher": {"w": torch.zeros(64, 64)}}, whole)
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    cases = [(empty, r"empty\.pth is empty \(0 bytes\): not a checkpoint$"),
             (text, r"page\.pth is a text file \(it starts with '<html><body>404 Not Found</body></html>'\), not a checkpoint$"),
             (truncated, r"cut\.pth is truncated or corrupt \(.+\); download it again$")]
    for path, message in cases:
        with pytest.raises(ValueError, match=message) as caught:
            load_unimiss_checkpoint(path)
        assert "\n" not in str(caught.value) and "--trusted" not in str(caught.value)


def test_a_tiny_checkpoint_read_as_small_names_its_variant_and_long_key_lists_are_cut():
    with torch.device("meta"):
        shapes = dict(reference_state_dict_shapes(mit_tiny(decoder=False)))
    tiny_state = {k: torch.zeros(0).new_empty(v, device="meta") for k, v in shapes.items()}
    with pytest.raises(ValueError) as caught:
        convert_unimiss_state_dict(tiny_state, mit_small(decoder=False), variant="small")
    message = str(caught.value)
    assert message.endswith("the checkpoint is MiT-tiny (pass variant=None, or --variant tiny)")
    assert "build the model with the paths" not in message
    missing = int(re.search(r": (\d+) MiT-small keys get no tensor", message).group(1))
    assert missing > 10 and f"... and {missing - 10} more" in message
    assert message.count("(reference ") == 10
