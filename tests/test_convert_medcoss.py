"""tools/convert_weights.py medcoss: the published MedCoSS checkpoints (yeerwen/MedCoSS, the pretraining
``Unified_Model``, weights under "model") in the reference's key layout (REFERENCE_KEYS below: every key and shape of
the ViT-B checkpoint) convert with every encoder tensor mapped, the 85,072,896 encoder parameters, and tokens equal to
a plain reference forward written here from the reference's formulas, for text, a 2D image and a 3D volume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import load_tool
from medssl.downstream import multimodal_vit_encoder, prepare_network
from medssl.engines.medcoss_stages import start_encoder
from medssl.networks import MultiModalClassifier, MultiModalViT, MultiModalViTEmbedder
from medssl.weights import MANIFEST_FORMAT
from medssl.weights.convert_medcoss import convert_medcoss_checkpoint, convert_medcoss_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


def reference_keys(dim=768, depth=12, vocab=49411, hidden=3072, positions=512, kernel_2d=(16, 16),
                   tokens_2d=196, kernel_3d=(16, 16, 16), tokens_3d=144, temporal=8) -> dict[str, tuple]:
    """The encoder part of the reference checkpoint, key -> shape (the defaults: the published ViT-B; 2D kernels
    (kH, kW) on rows-first images, 3D kernels (kD, kH, kW) on depth-first volumes)."""
    keys = {
        "cls_token": (1, 1, dim),
        "token_embed.embeddings.weight": (vocab, dim),
        "token_embed.embeddings_pos.position_embeddings.weight": (positions, dim),
        "token_embed.embeddings_token_type.weight": (2, dim),
        "token_embed.embeddings_norm.weight": (dim,),
        "token_embed.embeddings_norm.bias": (dim,),
        "video_embed.embeddings.weight": (dim, 3, *kernel_2d),
        "video_embed.embeddings.bias": (dim,),
        "video_embed.embeddings_3D.weight": (dim, 1, *kernel_3d),
        "video_embed.embeddings_3D.bias": (dim,),
        "video_embed.embeddings_st_pos_2D.spatial_pos_embed.weight": (tokens_2d, dim),
        "video_embed.embeddings_st_pos_2D.temporal_pos_embed.weight": (temporal, dim),
        "video_embed.embeddings_st_pos_3D.spatial_pos_embed.weight": (tokens_3d, dim),
        "video_embed.embeddings_st_pos_3D.temporal_pos_embed.weight": (temporal, dim),
        "video_embed.embeddings_norm.weight": (dim,),
        "video_embed.embeddings_norm.bias": (dim,),
    }
    for i in range(depth):
        p = f"fused_encoder.layers.{i}."
        keys.update({
            f"{p}self_attn.in_proj_weight": (3 * dim, dim), f"{p}self_attn.in_proj_bias": (3 * dim,),
            f"{p}self_attn.out_proj.weight": (dim, dim), f"{p}self_attn.out_proj.bias": (dim,),
            f"{p}linear1.weight": (hidden, dim), f"{p}linear1.bias": (hidden,),
            f"{p}linear2.weight": (dim, hidden), f"{p}linear2.bias": (dim,),
            f"{p}norm1.weight": (dim,), f"{p}norm1.bias": (dim,), f"{p}norm2.weight": (dim,), f"{p}norm2.bias": (dim,),
            f"{p}gamma_1": (dim,), f"{p}gamma_2": (dim,),
        })
    return keys


def other_keys(dim=768, vocab=49411) -> dict[str, tuple]:
    """Some of the checkpoint's keys that are not encoder (MAE decoder, mask token, MLM head)."""
    return {"mask_token": (1, 1, 512), "decoder_embed.weight": (512, dim), "decoder_embed.bias": (512,),
            "decoder_pos_embed_2D": (1, 197, 512), "decoder_blocks.0.norm1.weight": (512,),
            "decoder_pred.weight": (768, 512), "mlm_head.dense.weight": (dim, dim), "mlm_head.decoder.bias": (vocab,)}


# tiny: width 32, 2 layers, 4 heads; a 8 x 24 (H x W) image in 4 x 8 patches -> a (2, 3) grid; a 4 x 8 x 24
# (D x H x W) volume in 2 x 4 x 8 patches -> a (2, 2, 3) grid: every axis distinct, so a wrong order shows
TINY = dict(dim=32, depth=2, vocab=50, hidden=128, positions=16, kernel_2d=(4, 8), tokens_2d=6, kernel_3d=(2, 4, 8),
            tokens_3d=12)
TINY_SIZES = dict(heads=4, img_size_2d=(24, 8), img_size_3d=(24, 8, 4))  # ours: (X, Y) = (W, H), (X, Y, Z) = (W, H, D)


def random_state(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key.endswith("norm.weight"):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif "gamma" in key:
            state[key] = 0.5 + 0.1 * torch.randn(shape, generator=g)  # large enough that every layer counts
        elif len(shape) == 1:
            state[key] = 0.05 * torch.randn(shape, generator=g)
        elif key.endswith("weight") and len(shape) >= 2 and "embed" not in key:
            state[key] = torch.randn(shape, generator=g) / math.prod(shape[1:]) ** 0.5
        else:
            state[key] = 0.5 * torch.randn(shape, generator=g)
    return state


def reference_encode(state: dict, kind: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    """The reference Unified_Model's encoder in eval mode, from its formulas: text ids (B, L); images (B, 3, H, W)
    rows first; volumes (B, 1, D, H, W) depth first. Returns all tokens (images: class token first)."""
    dim = state["cls_token"].shape[-1]
    if kind == "text":
        t = "token_embed."
        tokens = (state[f"{t}embeddings.weight"][x] + state[f"{t}embeddings_pos.position_embeddings.weight"][
            : x.shape[1]] + state[f"{t}embeddings_token_type.weight"][0])
        tokens = F.layer_norm(tokens, (dim,), state[f"{t}embeddings_norm.weight"], state[f"{t}embeddings_norm.bias"])
    else:
        conv, pos, op = (("embeddings", "embeddings_st_pos_2D", F.conv2d) if kind == "2d"
                         else ("embeddings_3D", "embeddings_st_pos_3D", F.conv3d))
        kernel = state[f"video_embed.{conv}.weight"]
        tokens = op(x, kernel, state[f"video_embed.{conv}.bias"], stride=kernel.shape[2:]).flatten(2).transpose(1, 2)
        tokens = (tokens + state[f"video_embed.{pos}.spatial_pos_embed.weight"]
                  + state[f"video_embed.{pos}.temporal_pos_embed.weight"][0])
        tokens = F.layer_norm(tokens, (dim,), state["video_embed.embeddings_norm.weight"],
                              state["video_embed.embeddings_norm.bias"])
        tokens = torch.cat((state["cls_token"].expand(x.shape[0], -1, -1), tokens), dim=1)
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("fused_encoder.layers."))
    for i in range(depth):
        s = {k[len(f"fused_encoder.layers.{i}."):]: v for k, v in state.items()
             if k.startswith(f"fused_encoder.layers.{i}.")}
        y = F.layer_norm(tokens, (dim,), s["norm1.weight"], s["norm1.bias"], eps=1e-5).transpose(0, 1)  # (L, B, D)
        attn, _ = F.multi_head_attention_forward(
            y, y, y, dim, heads, s["self_attn.in_proj_weight"], s["self_attn.in_proj_bias"], None, None, False, 0.0,
            s["self_attn.out_proj.weight"], s["self_attn.out_proj.bias"], training=False, need_weights=False)
        tokens = tokens + s["gamma_1"] * attn.transpose(0, 1)
        y = F.layer_norm(tokens, (dim,), s["norm2.weight"], s["norm2.bias"], eps=1e-5)
        y = F.gelu(F.linear(y, s["linear1.weight"], s["linear1.bias"]))
        y = F.linear(y, s["linear2.weight"], s["linear2.bias"])
        tokens = tokens + s["gamma_2"] * y
    return tokens  # no final norm


def test_published_key_list_maps_every_encoder_key_with_the_vit_b_sizes():
    """The real key list and shapes (meta tensors: no memory): every encoder key maps, MultiModalViT(vocab 49,411,
    224, [192, 192, 16]) gets exactly its keys and shapes, 85,072,896 encoder parameters, the rest is listed."""
    shapes = {**reference_keys(), **other_keys()}
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    converted, kwargs, unused = convert_medcoss_state_dict(state, "published.pth")
    assert unused == sorted(other_keys())
    assert kwargs["vocab_size"] == 49411 and kwargs["dim"] == 768 and kwargs["depth"] == 12 and kwargs["heads"] == 12
    assert kwargs["img_size_2d"] == 224 and kwargs["img_size_3d"] == [192, 192, 16] and kwargs["patch_3d"] == 16
    assert kwargs["mlp_ratio"] == 4 and kwargs["text_positions"] == 512 and kwargs["text_len"] == 112
    with torch.device("meta"):
        model = MultiModalViT(**kwargs)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours
    assert sum(p.numel() for p in model.encoder_parameters()) == 85_072_896
    assert model.tokenizers["3d"].grid == (12, 12, 1) and model.tokenizers["2d"].grid == (14, 14)
    assert len(reference_keys()) == 184 and len(converted) == 183  # token type / temporal folded, image norm shared


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny reference checkpoint (weights under "model", as the authors save them) and its conversion."""
    tmp = tmp_path_factory.mktemp("medcoss")
    state = random_state({**reference_keys(**TINY), **other_keys(dim=32, vocab=50)})
    ckpt = tmp / "medcoss_pretrained.pth"
    torch.save({"model": state, "epoch": 299, "optimizer": {}}, ckpt)
    out = tmp / "converted" / "encoder.pt"
    out.parent.mkdir()
    weights, manifest, report = convert_medcoss_checkpoint(ckpt, out, **TINY_SIZES)
    return {"state": state, "ckpt": ckpt, "weights": weights, "manifest": manifest, "report": report, "tmp": tmp}


def _model(path, dtype=torch.float64) -> MultiModalViT:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = MultiModalViT(**saved["config"])
    model.load_state_dict(saved["state_dict"], strict=True)
    return model.eval().to(dtype)


def test_tiny_checkpoint_converts_to_the_stage_file_format(tiny):
    saved = torch.load(tiny["weights"], map_location="cpu", weights_only=True)
    assert set(saved) == {"state_dict", "stage", "kind", "config"} and saved["stage"] == "converted"
    assert saved["kind"] is None
    assert saved["config"]["heads"] == 4 and saved["config"]["patch_2d"] == [8, 4]
    assert saved["config"]["patch_3d"] == [8, 4, 2] and saved["config"]["img_size_3d"] == [24, 8, 4]
    manifest = json.loads(tiny["manifest"].read_text())
    assert manifest["source_checkpoint"] == "medcoss_pretrained.pth" and len(manifest["source_sha256"]) == 64
    assert manifest["num_mapped"] == tiny["report"]["mapped"] == len(reference_keys(**TINY)) == 44
    assert manifest["unused_keys"] == sorted(other_keys())
    # a MedCoSS stage starts from it as from a previous stage's folder
    encoder = start_encoder(MultiModalViT(**saved["config"]), str(tiny["weights"].parent))
    assert torch.equal(encoder.state_dict()["encoder.blocks.1.ls2"], tiny["state"]["fused_encoder.layers.1.gamma_2"])
    # and a downstream bundle's --pretrained_path loads it: the standard manifest, its 2D path into the classifier
    assert manifest["format"] == MANIFEST_FORMAT and manifest["backbone"]["_target_"].endswith("MultiModalViT")
    net = prepare_network(MultiModalClassifier(multimodal_vit_encoder(str(tiny["weights"]), "2d"), 3),
                          str(tiny["weights"]), spatial_dims=2)
    assert torch.equal(net.encoder.state_dict()["encoder.blocks.1.ls2"], encoder.state_dict()["encoder.blocks.1.ls2"])


def test_text_tokens_equal_the_reference(tiny):
    state64 = {k: v.double() for k, v in tiny["state"].items()}
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference_encode(state64, "text", ids, heads=4)
        ours = _model(tiny["weights"]).forward_encoder(ids, "text")[0]
    assert expected.std() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_2d_tokens_equal_the_reference_on_the_transposed_image(tiny):
    state64 = {k: v.double() for k, v in tiny["state"].items()}
    image = torch.randn(2, 3, 8, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64)  # (C, H, W)
    with torch.no_grad():
        expected = reference_encode(state64, "2d", image, heads=4)
        ours = _model(tiny["weights"]).forward_encoder(image.transpose(2, 3), "2d")[0]  # medssl: (C, W, H)
    # reference tokens run over (h, w), h slowest; ours over (x, y) = (w, h), w slowest
    grid = expected[:, 1:].reshape(2, 2, 3, -1).transpose(1, 2).reshape(2, 6, -1)
    torch.testing.assert_close(ours, torch.cat((expected[:, :1], grid), 1), rtol=1e-5, atol=1e-5)

    # rows-first data: no transpose, the reference's own layout and token order
    rows = tiny["tmp"] / "rows.pt"
    convert_medcoss_checkpoint(tiny["ckpt"], rows, transpose_2d=False, heads=4, img_size_2d=(8, 24),
                               img_size_3d=(24, 8, 4))
    with torch.no_grad():
        torch.testing.assert_close(_model(rows).forward_encoder(image, "2d")[0], expected, rtol=1e-5, atol=1e-5)


def test_3d_tokens_equal_the_reference_on_the_depth_last_volume(tiny):
    state64 = {k: v.double() for k, v in tiny["state"].items()}
    volume = torch.randn(2, 1, 4, 8, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # D, H, W
    with torch.no_grad():
        expected = reference_encode(state64, "3d", volume, heads=4)
        ours = _model(tiny["weights"]).forward_encoder(volume.permute(0, 1, 4, 3, 2), "3d")[0]  # (X, Y, Z)
    grid = expected[:, 1:].reshape(2, 2, 2, 3, -1).permute(0, 3, 2, 1, 4).reshape(2, 12, -1)  # (d, h, w) -> (x, y, z)
    assert expected.std() > 0.1
    torch.testing.assert_close(ours, torch.cat((expected[:, :1], grid), 1), rtol=1e-5, atol=1e-5)


def test_command_line_writes_a_file_the_embedder_loads(tiny, capsys):
    tool = load_tool("convert_weights.py", "convert_weights_tool")
    out = tiny["tmp"] / "cli" / "encoder.pt"
    tool.main(["medcoss", str(tiny["ckpt"]), "--out", str(out), "--heads", "4", "--img_size_2d", "[24,8]",
               "--img_size_3d", "[24,8,4]"])
    printed = capsys.readouterr().out
    assert "44 source tensors -> 43" in printed and "decoder_embed.bias" in printed
    saved = torch.load(out, map_location="cpu", weights_only=True)
    embedder = MultiModalViTEmbedder("2d", **saved["config"])
    embedder.load_state_dict(saved["state_dict"], strict=True)
    with torch.no_grad():
        assert embedder.eval()(torch.rand(2, 3, 24, 8)).shape == (2, 32)
    assert out.with_suffix(".json").is_file()


def test_wrong_files_and_cut_checkpoints_are_one_line_errors(tiny):
    tmp = tiny["tmp"]
    text = tmp / "notes.pth"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"^convert_medcoss: .*notes\.pth") as caught:
        convert_medcoss_checkpoint(text, tmp / "e.pt")
    assert "\n" not in str(caught.value)

    dino = tmp / "dino.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 8)}, "epoch": 1}, dino)
    with pytest.raises(ValueError, match=r"dino\.pth: no MedCoSS model: it holds entries epoch, teacher"):
        convert_medcoss_checkpoint(dino, tmp / "e.pt")

    cut = {k: v for k, v in tiny["state"].items() if not k.startswith("fused_encoder.layers.1.linear")}
    cut_file = tmp / "cut.pth"
    torch.save({"model": cut}, cut_file)
    with pytest.raises(ValueError) as caught:
        convert_medcoss_checkpoint(cut_file, tmp / "e.pt", **TINY_SIZES)
    message = str(caught.value)
    assert "cut.pth: 4 MedCoSS encoder keys get no tensor: fused_encoder.layers.1.linear1.weight" in message
    assert "\n" not in message

    wrong = dict(tiny["state"])
    wrong["video_embed.embeddings_st_pos_3D.spatial_pos_embed.weight"] = torch.zeros(144, 32)
    wrong_file = tmp / "wrong.pth"
    torch.save({"model": wrong}, wrong_file)
    with pytest.raises(ValueError, match=r"wrong\.pth: 1 tensors do not fit .*img_size_3d \[24, 8, 4\].*"
                       r"spatial_pos_embed\.weight: \(144, 32\) where it should be \(12, 32\)"):
        convert_medcoss_checkpoint(wrong_file, tmp / "e.pt", **TINY_SIZES)
    assert not (tmp / "e.pt").exists()
