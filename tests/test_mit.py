"""MiT (UniMiSS, Xie et al. 2022): parameter counts against the reference, output shapes, path switching, SRA,
resampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medssl.networks.mit import MiT, mit_small, mit_tiny, resample_position_embedding


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Intra-op threads on a shared CPU spin against each other; these small forwards are fastest on one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# specs/unimiss.md, "Parameter counts of the reference (InstanceNorm + LeakyReLU, both 2D and 3D modules present)"
SPEC_COUNTS = {
    # (variant, paths): (encoder, encoder + decoder)
    ("small", (2, 3)): (28_523_888, 43_942_944),
    ("small", (2,)): (17_321_312, 23_804_704),
    ("small", (3,)): (24_644_064, 36_996_000),
    ("tiny", (2, 3)): (13_859_392, 20_380_336),
    ("tiny", (2,)): (6_825_568, 9_601_472),
    ("tiny", (3,)): (11_374_304, 16_305_728),
}
FACTORIES = {"small": mit_small, "tiny": mit_tiny}


def test_parameter_counts_equal_the_reference_table():
    rows, wrong = [], []
    for (variant, paths), spec in SPEC_COUNTS.items():
        ours = []
        for decoder in (False, True):
            with torch.device("meta"):  # shapes only: no memory, no initialisation cost
                model = FACTORIES[variant](decoder=decoder, spatial_dims=paths)
            ours.append(n_params(model))
            # the dual-path model's parameters used by one path = the one-path model's parameters
            if len(paths) == 1:
                with torch.device("meta"):
                    dual = FACTORIES[variant](decoder=decoder)
                used = sum(p.numel() for _, p in dual.named_path_parameters(paths[0]))
                assert used == ours[-1], (variant, paths, decoder, used, ours[-1])
        label = f"{variant}, {'+'.join(f'{d}D' for d in paths)}"
        rows.append(f"{label:<14} {ours[0]:>12,} {spec[0]:>12,} {ours[1]:>12,} {spec[1]:>12,}")
        if tuple(ours) != spec:
            wrong.append(label)
    header = f"{'model':<14} {'encoder':>12} {'spec':>12} {'enc+dec':>12} {'spec':>12}"
    print("\n" + "\n".join([header, *rows]))
    assert not wrong, f"parameter counts differ from specs/unimiss.md for {wrong}"


def test_output_shapes_at_the_reference_sizes():
    # shapes do not depend on the depths: the tiny variant keeps this fast (spec: small, same shapes)
    torch.manual_seed(0)
    model = mit_tiny().eval()
    with torch.no_grad():
        out2d = model.forward_features(torch.randn(1, 3, 224, 224))
        # the reference's (B, 1, 16, 96, 96) D x H x W crop is (B, 1, 96, 96, 16) here: depth last
        out3d = model.forward_features(torch.randn(1, 1, 96, 96, 16))
    expected2d = {
        "stem": (1, 32, 112, 112),
        "encoder1": (1, 48, 56, 56),
        "encoder2": (1, 128, 28, 28),
        "encoder3": (1, 256, 14, 14),
        "encoder4": (1, 512, 7, 7),
        "encoder_tokens": (1, 50, 512),
        "encoder_token": (1, 512),
        "decoder1": (1, 256, 14, 14),
        "decoder2": (1, 128, 28, 28),
        "decoder3": (1, 48, 56, 56),
        "decoder_token": (1, 48),
        "ssl_token": (1, 48),
    }
    expected3d = {
        "stem": (1, 32, 48, 48, 16),
        "encoder1": (1, 48, 24, 24, 8),
        "encoder2": (1, 128, 12, 12, 4),
        "encoder3": (1, 256, 6, 6, 2),
        "encoder4": (1, 512, 3, 3, 1),
        "encoder_tokens": (1, 10, 512),
        "encoder_token": (1, 512),
        "decoder1": (1, 256, 6, 6, 2),
        "decoder2": (1, 128, 12, 12, 4),
        "decoder3": (1, 48, 24, 24, 8),
        "decoder_token": (1, 48),
        "ssl_token": (1, 48),
    }
    assert {k: tuple(v.shape) for k, v in out2d.items()} == expected2d
    assert {k: tuple(v.shape) for k, v in out3d.items()} == expected3d
    for out in (out2d, out3d):
        # the tokens are the SSL token followed by the last map's patches; the pretraining output is the decoder's
        assert torch.equal(out["encoder_tokens"][:, 0], out["encoder_token"])
        assert torch.equal(out["encoder_tokens"][:, 1:].transpose(1, 2).flatten(), out["encoder4"].flatten())
        assert torch.equal(out["ssl_token"], out["decoder_token"])
    assert model.feature_channels == {
        "stem": 32, "encoder1": 48, "encoder2": 128, "encoder3": 256, "encoder4": 512,
        "decoder1": 256, "decoder2": 128, "decoder3": 48,
    }  # fmt: skip


def test_mit_small_forward_both_paths_and_encoder_only():
    torch.manual_seed(0)
    model = mit_small().eval()
    assert model.feature_dim == 48 and model.paths == (2, 3) and model.spatial_dims is None
    x2, x3 = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 64, 64, 16)
    with torch.no_grad():
        y2, y3 = model(x2), model(x3)
        encoder_only = model.forward_features(x2, decode=False)
    assert y2.shape == (2, 48) and y3.shape == (2, 48)
    assert torch.isfinite(y2).all() and torch.isfinite(y3).all()
    assert "decoder1" not in encoder_only and torch.equal(encoder_only["ssl_token"], encoder_only["encoder_token"])

    encoder = mit_small(decoder=False).eval()
    assert encoder.decoder is None and encoder.feature_dim == 512
    assert not any(k.startswith("decoder.") for k in encoder.state_dict())
    # the encoder alone has exactly the encoder keys of the full model
    assert set(encoder.state_dict()) == {k for k in model.state_dict() if k.startswith("encoder.")}
    with torch.no_grad():
        assert encoder(x3).shape == (2, 512)
        # no decoder: sizes need not be multiples of 32
        assert encoder(torch.randn(1, 3, 80, 72)).shape == (1, 512)


def test_one_path_variants_build_only_their_modules():
    model2d = mit_tiny(spatial_dims=2).eval()
    model3d = mit_tiny(spatial_dims=3).eval()
    keys2d, keys3d = set(model2d.state_dict()), set(model3d.state_dict())
    assert not any(".3d." in k for k in keys2d) and any(".2d." in k for k in keys2d)
    assert not any(".2d." in k for k in keys3d) and any(".3d." in k for k in keys3d)
    assert model2d.spatial_dims == 2 and model2d.in_channels == 3
    assert model3d.spatial_dims == 3 and model3d.in_channels == 1
    with torch.no_grad():
        assert model2d(torch.randn(1, 3, 64, 64)).shape == (1, 48)
        assert model3d(torch.randn(1, 1, 64, 64, 16)).shape == (1, 48)
    with pytest.raises(ValueError, match=r"2D path.*\(1, 1, 64, 64, 16\)"):
        model2d(torch.randn(1, 1, 64, 64, 16))
    with pytest.raises(ValueError, match=r"3D path.*\(1, 3, 64, 64\)"):
        model3d(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="spatial_dims"):
        MiT(spatial_dims=(1,))


def test_each_path_trains_only_its_own_and_the_shared_parameters():
    torch.manual_seed(0)
    model = mit_tiny()
    for d, x in ((2, torch.randn(2, 3, 64, 64)), (3, torch.randn(2, 1, 64, 64, 16))):
        model.zero_grad(set_to_none=True)
        model(x).pow(2).sum().backward()
        used = {name for name, _ in model.named_path_parameters(d)}
        for name, param in model.named_parameters():
            if name in used:
                assert param.grad is not None, f"{d}D pass: {name} got no gradient"
            else:
                assert model.path_of(name) == 5 - d and param.grad is None, f"{d}D pass: {name} got a gradient"
    assert model.path_of("encoder.stages.0.0.attn.sr.3d.weight") == 3
    assert model.path_of("encoder.pos_embed.2d.1") == 2
    assert model.path_of("encoder.stages.0.0.attn.q.weight") is None


def test_sdpa_equals_explicit_attention_and_attention_switch():
    torch.manual_seed(0)
    model = mit_tiny().eval()
    x2, x3 = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 64, 64, 16)
    with torch.no_grad():
        sdpa = (model(x2), model(x3))
        model.set_attention("explicit")
        explicit = (model(x2), model(x3))
    assert all(m.attention == "explicit" for m in model.modules() if hasattr(m, "sr_ratio"))
    for a, b in zip(sdpa, explicit):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="attention"):
        model.set_attention("flash")


def test_position_embedding_resampling():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 6 * 6, 4)
    assert resample_position_embedding(pos, (6, 6), (6, 6)) is pos  # the reference size: untouched
    up = resample_position_embedding(pos, (6, 6), (9, 12))
    assert up.shape == (1, 1 + 9 * 12, 4) and torch.equal(up[:, 0], pos[:, 0])
    # a grid that is constant per channel stays constant (bicubic / trilinear keep constants)
    flat3d = torch.cat((torch.zeros(1, 1, 3), torch.arange(3.0).expand(1, 4 * 4 * 2, 3)), dim=1)
    out = resample_position_embedding(flat3d, (4, 4, 2), (8, 6, 3))
    assert out.shape == (1, 1 + 8 * 6 * 3, 3)
    torch.testing.assert_close(out[:, 1:], torch.arange(3.0).expand(1, 8 * 6 * 3, 3))
    # a linear ramp along the last (depth) axis stays a ramp along that axis only: axis order preserved
    ramp = torch.arange(2.0).view(1, 1, 1, 2, 1).expand(1, 4, 4, 2, 1).reshape(1, 32, 1)
    out = resample_position_embedding(torch.cat((torch.zeros(1, 1, 1), ramp), dim=1), (4, 4, 2), (4, 4, 4))
    grid = out[0, 1:, 0].reshape(4, 4, 4)
    assert torch.allclose(grid, grid[:1, :1, :].expand(4, 4, 4)) and grid[0, 0, -1] > grid[0, 0, 0]

    # the model's embeddings are sized for the reference inputs and resampled for others
    model = mit_tiny(decoder=False)
    assert model.encoder.pos_embed["2d"][0].shape == (1, 3137, 48)
    assert model.encoder.pos_embed["3d"][0].shape == (1, 4609, 48)
    assert model.encoder.pos_grids[3][0] == (24, 24, 8)  # (X, Y, Z): depth last
    custom = mit_tiny(img_size_2d=64, img_size_3d=(64, 64, 16))
    assert custom.encoder.pos_embed["2d"][0].shape == (1, 1 + 16 * 16, 48)
    assert custom.decoder.pos_embed["3d"][2].shape == (1, 1 + 16 * 16 * 8, 48)


def test_input_checks_name_the_problem():
    model = mit_tiny().eval()
    with pytest.raises(ValueError, match=r"\(1, 1, 64, 64\) has 1 channels; expected 3"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"too small.*stage"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"too small \(volumes are \(B, C, X, Y, Z\), depth last\)"):
        model(torch.randn(1, 1, 64, 64, 4))
    # issue 13 item 10: the reference's depth-first (B, C, D, H, W) crop said only "too small"
    with pytest.raises(ValueError) as info:
        model(torch.randn(1, 1, 16, 96, 96))
    assert str(info.value).startswith(
        "MiT 3D path: input of shape (1, 1, 16, 96, 96) looks depth-first: volumes are (B, C, X, Y, Z), depth last"
    )
    assert "too small" not in str(info.value)
    with pytest.raises(ValueError, match=r"expected \(B, C, H, W\) or \(B, C, X, Y, Z\) with depth last"):
        model(torch.randn(3, 64, 64))
    # with the decoder, the skips must line up: 80 -> 40, 20, 10, 5, 3 does not up-sample back to 5
    with pytest.raises(ValueError, match=r"multiples of 32"):
        model(torch.randn(1, 3, 80, 80))


def test_stochastic_depth_only_in_training():
    torch.manual_seed(0)
    model = mit_tiny(drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        model.train()
        a, b = model(x), model(x)
        model.eval()
        c, d = model(x), model(x)
    assert not torch.allclose(a, b)
    assert torch.equal(c, d)


REFERENCE = Path(__file__).parent / "fixtures" / "mit_pos_embed_reference.pt"


@pytest.mark.parametrize("size", ["2d_96", "2d_256", "3d_16x128x128"])
def test_position_embeddings_are_resized_as_the_authors_do(size):
    """The UniMiSS authors' resize of each stage's embedding, stored once by tests/fixtures/
    make_mit_pos_embed_reference.py in their layout (2D (H, W), 3D (D, H, W)): ours equals it to 1e-5 of the
    embedding's scale in float32, and to float32 rounding when it runs in float64 (the axes are scaled one by one,
    so their order does not matter). interpolate(size=...) does not: the check has teeth."""
    reference = torch.load(REFERENCE, weights_only=True)
    kind = size[:2]
    for source, grid, target, expected in zip(reference["sources"][kind], reference["source_grids"][kind],
                                              reference["targets"][size], reference["results"][size]):
        scale = float(expected.abs().max())
        ours = resample_position_embedding(source, tuple(grid), tuple(target))  # float32, as the model runs
        assert float((ours - expected).abs().max()) <= 1e-5 * scale
        exact = resample_position_embedding(source.double(), tuple(grid), tuple(target))  # the same sums in float64
        assert float((exact.float() - expected).abs().max()) <= 1e-7 * scale
    source, grid, target, expected = (reference["sources"][kind][0], reference["source_grids"][kind][0],
                                      reference["targets"][size][0], reference["results"][size][0])
    patch = source[:, 1:].reshape(1, *grid, -1).movedim(-1, 1)
    by_size = torch.nn.functional.interpolate(patch, size=tuple(target), mode="bicubic" if kind == "2d" else "trilinear")
    assert not torch.allclose(by_size.flatten(2).transpose(1, 2), expected[:, 1:], rtol=1e-3, atol=1e-4)
