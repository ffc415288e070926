"""MedCoSS's image downstream (issue #15 item 6): the UNETR-style segmentation network on encoder layers 4 / 7 / 10 /
12 in 2D and 3D, the position table resampled to other input sizes, a stage's encoder.pt + encoder.json loading into
the downstream networks with only their tokenizer, and the bundles' configs/medcoss.json layers (2D segmentation
trained, evaluated and inferred from a stage encoder in-process; 3D classification trained from one; the other two
layers built and run on a batch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medssl.downstream import multimodal_vit_encoder, prepare_network
from medssl.engines.medcoss_stages import write_stage_encoder
from medssl.networks import MultiModalClassifier, MultiModalUNETR, MultiModalViT, MultiModalViTEmbedder
from medssl.weights.export import build_encoder_from_manifest

from conftest import BUNDLES, run_bundle_in_process

# a stage encoder as the chain writes it, 16-pixel patches (the UNETR head's four x2 up-samplings)
TINY = dict(vocab_size=50, dim=32, depth=4, heads=2, text_len=16, img_size_2d=64, patch_2d=16,
            img_size_3d=(64, 64, 16), patch_3d=16)


def _stage_encoder(tmp_path: Path, seed: int = 0) -> tuple[Path, MultiModalViT]:
    torch.manual_seed(seed)
    encoder = MultiModalViT(**TINY)
    return write_stage_encoder(encoder, tmp_path / "3_ct", "3_ct", "3d", TINY, ["1_reports", "2_xray", "3_ct"]), encoder


@pytest.mark.parametrize("kind, shape", [("2d", (2, 1, 64, 48)), ("3d", (1, 1, 32, 48, 32))])
def test_unetr_gives_full_resolution_logits_and_trains_every_used_parameter(kind, shape):
    encoder = MultiModalViTEmbedder(kind, **TINY)
    net = MultiModalUNETR(encoder, 3, in_channels=1, layers=(1, 2, 3, 4), feature_size=8)
    x = torch.randn(*shape)  # not the size the positions are stored for: resampled; grey repeated to 3 channels in 2D
    y = net(x)
    assert y.shape == (shape[0], 3, *shape[2:])
    y.square().mean().backward()
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert not any(n.startswith("encoder.tokenizers.text.") for n in trainable)  # the other kinds' stay frozen
    assert all(p.grad is not None for n, p in net.named_parameters() if n in trainable)
    # the decoder reads the asked-for blocks: with layers (1, 2, 3, 3) impossible, with a deeper last layer different
    with pytest.raises(ValueError, match="4 increasing blocks"):
        MultiModalUNETR(encoder, 3, layers=(1, 2, 3, 3))
    with pytest.raises(ValueError, match="in 1..4"):
        MultiModalUNETR(encoder, 3, layers=(4, 7, 10, 12))
    with pytest.raises(ValueError, match="must be 16"):
        MultiModalUNETR(MultiModalViTEmbedder(kind, **{**TINY, f"patch_{kind}": 8}), 3, layers=(1, 2, 3, 4))
    with pytest.raises(TypeError, match="kind text"):
        MultiModalUNETR(MultiModalViTEmbedder("text", **TINY), 3)


def test_encoder_layers_are_the_blocks_outputs_and_other_sizes_resample_the_positions():
    net = MultiModalViT(**TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    layers, grid = net.forward_layers(x, "2d", (2, 4))
    assert grid == (4, 4) and len(layers) == 2
    torch.testing.assert_close(layers[1], net(x, "2d"))  # the last block's output is the plain forward
    # the stored size keeps the stored table; another multiple of the patch resamples it (a 2x grid here)
    wider = net.tokenize(torch.randn(1, 3, 128, 64), "2d")
    assert wider.shape == (1, 32, 32)
    with pytest.raises(ValueError, match="multiple of the patch"):
        net.tokenize(torch.randn(1, 3, 72, 64), "2d")
    with pytest.raises(ValueError, match="built for"):
        MultiModalViT(**TINY, kinds=["2d"]).tokenize(torch.randn(1, 1, 64, 64, 16), "3d")


def test_stage_encoder_loads_into_downstream_networks_with_their_tokenizer_only(tmp_path, capsys):
    path, pretrained = _stage_encoder(tmp_path)
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["backbone"]["kwargs"]["dim"] == 32 and manifest["stage"] == "3_ct"
    # tools/probe.py / inference build the stage kind's embedder from it: mean token features of its input size
    embedder = build_encoder_from_manifest(path.with_suffix(".json"))
    assert embedder.kind == "3d" and manifest["in_channels"] == 1
    assert embedder(torch.rand(2, 1, *manifest["preprocessing"]["input_size_3d"])).shape == (2, 32)
    # the architecture comes from the manifest, whatever the config says; only the 3D tokenizer is built
    encoder = multimodal_vit_encoder(str(path), "3d", dim=768, depth=12)
    assert encoder.dim == 32 and list(encoder.tokenizers) == ["3d"]
    net = prepare_network(MultiModalClassifier(encoder, 2), str(path), finetune_mode="finetune", spatial_dims=3)
    printed = capsys.readouterr().out
    assert "text tokenizer" in printed and "2d tokenizer" in printed  # reported as ignored, not an error
    source = pretrained.state_dict()
    mine = net.encoder.state_dict()
    assert mine and all(torch.equal(v, source[k]) for k, v in mine.items())
    assert len(mine) == len(source) - sum(k.startswith(("tokenizers.text.", "tokenizers.2d.")) for k in source)
    # without a pretrained file: the config's settings
    assert multimodal_vit_encoder(None, "2d", **{**TINY, "dim": 16}).dim == 16


def _configs(bundle: Path, *names: str) -> list[str]:
    return [str(bundle / "configs" / n) for n in names]


@pytest.mark.parametrize("bundle, shape", [("xray_classification", (2, 3, 32, 32)),
                                           ("ct_mr_segmentation_3d", (1, 1, 64, 64, 16))])
def test_medcoss_layer_builds_the_bundle_network(bundle, shape):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(_configs(BUNDLES / bundle, "train.json", "medcoss.json", "smoke.json"))
    parser["bundle_root"] = str(BUNDLES / bundle)
    net = parser.get_parsed_content("network_def")
    assert isinstance(net.encoder, MultiModalViTEmbedder) and len(net.encoder.encoder.blocks) in (2, 4)
    out = net(torch.rand(*shape))
    assert out.shape == ((2, 3) if bundle == "xray_classification" else (1, 3, 64, 64, 16))


def test_segmentation_2d_and_classification_3d_bundles_from_a_stage_encoder(demo_datalist, tmp_path, capsys):
    path, pretrained = _stage_encoder(tmp_path)
    b2d = BUNDLES / "xray_segmentation_2d"
    def items(section: str, keys: str = "'image', 'label', 'modality', 'dim'") -> str:
        return (f"$medssl.data.load_items(@datalist, {section}, @dataset_dir, dims=[2], modalities=@modalities, "
                f"keys=[{keys}], labelled_only='mask', max_items=1)")

    common = dict(datalist=demo_datalist, pretrained_path=str(path))
    out = tmp_path / "seg"
    run_bundle_in_process(b2d, ["train.json", "medcoss.json", "smoke.json"], out=out, epochs=1,
                          finetune_mode="finetune",
                          **{"train#items": "$@train#all_items[:2]", "validate#items": items("'validation'")},
                          **common)
    assert "text tokenizer" in capsys.readouterr().out
    model = out / "models" / "model_final.pt"
    state = torch.load(model, weights_only=True)
    assert any(k.startswith("encoder.encoder.blocks.3.") for k in state) and any(k.startswith("up0.") for k in state)
    # evaluation and inference rebuild the same architecture from the same --pretrained_path
    run_bundle_in_process(b2d, ["train.json", "medcoss.json", "smoke.json", "evaluate.json"],
                          output_dir=str(tmp_path / "eval"), model_path=str(model),
                          **{"validate#items": items("@section")}, **common)
    assert (tmp_path / "eval" / "metrics_summary.json").is_file()
    run_bundle_in_process(b2d, ["inference.json", "medcoss.json"], output_dir=str(tmp_path / "infer"),
                          model_path=str(model), image_size=[64, 64], medcoss_layers=[1, 2, 3, 4],
                          medcoss_feature_size=8, items=items("@section", "'image', 'modality', 'dim'"), **common)
    assert len(list((tmp_path / "infer").glob("*_seg.nii.gz"))) == 1

    b3d = BUNDLES / "ct_volume_classification"
    out = tmp_path / "cls3d"
    run_bundle_in_process(b3d, ["train.json", "medcoss.json", "smoke.json"], out=out, datalist=demo_datalist, epochs=1,
                          finetune_mode="linear", pretrained_path=str(path), volume_size=[32, 32, 32],
                          max_train_items=8)
    state = torch.load(out / "models" / "model_final.pt", weights_only=True)
    for key, value in pretrained.state_dict().items():  # linear mode: the stage encoder as it was loaded, frozen
        if key.startswith(("encoder.", "tokenizers.3d.", "cls_token")):
            assert torch.equal(state[f"encoder.{key}"], value), key


TINY_SEG = {"medcoss_dim": 32, "medcoss_depth": 4, "medcoss_heads": 2, "medcoss_layers": [1, 2, 3, 4],
            "medcoss_feature_size": 8}


@pytest.mark.parametrize("bundle, size", [("xray_segmentation_2d", [64, 64]), ("ct_mr_segmentation_3d", [64, 64, 16])],
                         ids=["2d", "3d"])
def test_medcoss_segmentation_inference_contract(bundle, size, tmp_path, monkeypatch):
    """verify_net_in_out (one tensor, K channels, sizes multiples of 16) and TorchScript export by tracing of the
    MedCoSS segmentation variants (narrow encoder)."""
    from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

    root = BUNDLES / bundle
    monkeypatch.chdir(root)
    configs = _configs(root, "inference.json", "medcoss.json")
    meta = str(root / "configs" / "metadata.json")
    smoke = {**TINY_SEG, "medcoss_img_size": size, ("image_size" if len(size) == 2 else "patch_size"): size}
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=configs, device="cpu", n=2, any=16, **smoke)
    parser = ConfigParser()
    parser.read_config(configs)
    parser.update(smoke)
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), tmp_path / "model.pt")
    shape = [1, 1, *size]
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(tmp_path / "model.pt"),
                meta_file=meta, config_file=configs, use_trace=True, input_shape=shape, **smoke)
    x = torch.rand(*shape)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "model.ts"))(x), net.eval()(x), rtol=1e-4, atol=1e-5)
