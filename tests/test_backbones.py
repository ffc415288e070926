"""Backbones of Ghesu et al. 2022 (SwAV at scale): MONAI ResNet-50 / ResNet-50w2 trunks with multi-level features,
and the 3D dense network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medssl.networks.backbones import DenseNet3D, ResNetBackbone, resnet50_2d


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return resnet50_2d(in_channels=3).eval()


def test_resnet50_trunk_matches_reference(resnet50):
    # torchvision / SwAV ResNet-50 trunk without fc (spec: 23,508,032)
    assert n_params(resnet50) == 23_508_032
    assert resnet50.feature_dim == 2048
    shapes = {k: tuple(v.shape) for k, v in resnet50.state_dict().items()}
    # key names and shapes of SwAV's published checkpoint (specs/ssl_reference_keys.json)
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    assert shapes["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert shapes["layer3.5.conv2.weight"] == (256, 256, 3, 3)
    assert shapes["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert not any(k.startswith("fc") or k.endswith("downsample.0.bias") for k in shapes)


def test_resnet50_forward_and_input_check(resnet50):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = resnet50(x)
    assert out.shape == (2, 2048)
    with pytest.raises(ValueError, match=r"\(2, 1, 64, 64\)"):
        resnet50(torch.randn(2, 1, 64, 64))
    grey = resnet50_2d(in_channels=1).eval()
    assert grey.conv1.weight.shape == (64, 1, 7, 7)
    with torch.no_grad():
        assert grey(torch.randn(1, 1, 32, 32)).shape == (1, 2048)


def test_resnet50w2_shapes():
    torch.manual_seed(0)
    model = resnet50_2d(in_channels=3, width=2).eval()
    assert model.feature_dim == 4096
    # parameter count summed from the shapes of SwAV's resnet50w2 checkpoint (trunk only)
    assert n_params(model) == 93_907_072
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["conv1.weight"] == (128, 3, 7, 7)
    assert shapes["layer1.0.conv3.weight"] == (512, 128, 1, 1)
    assert shapes["layer4.2.conv1.weight"] == (1024, 4096, 1, 1)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4096)


def test_multi_level_features(resnet50):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = resnet50.forward_features(x, levels=5)
        maps = resnet50.forward_features(x, levels=("stem", "layer1", "layer2", "layer3", "layer4"), pooled=False)
        final = resnet50(x)
    assert list(pooled) == ["layer1", "layer2", "layer3", "layer4", "pool"]
    assert [tuple(v.shape) for v in pooled.values()] == [(2, 256), (2, 512), (2, 1024), (2, 2048), (2, 2048)]
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "stem": (2, 64, 32, 32),
        "layer1": (2, 256, 16, 16),
        "layer2": (2, 512, 8, 8),
        "layer3": (2, 1024, 4, 4),
        "layer4": (2, 2048, 2, 2),
    }
    torch.testing.assert_close(pooled["pool"], final)
    torch.testing.assert_close(pooled["layer2"], maps["layer2"].mean(dim=(2, 3)))
    torch.testing.assert_close(pooled["layer4"], final)  # global average pool of layer4 = the final feature
    with pytest.raises(ValueError, match="layer5"):
        resnet50.forward_features(x, levels=("layer5",))


def test_return_levels_concatenates_normalised_levels():
    torch.manual_seed(0)
    model = resnet50_2d(in_channels=3, return_levels=5, normalize_levels=True).eval()
    assert model.feature_dim == 256 + 512 + 1024 + 2048 + 2048 == 5888
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        levels = model.forward_features(x)  # defaults to return_levels
    assert out.shape == (2, 5888)
    parts = torch.split(out, [256, 512, 1024, 2048, 2048], dim=1)
    for part, level in zip(parts, levels.values()):
        torch.testing.assert_close(part.norm(dim=1), torch.ones(2))
        torch.testing.assert_close(part, F.normalize(level, dim=1))
    named = resnet50_2d(in_channels=3, return_levels=("layer3", "pool"))
    assert named.feature_dim == 1024 + 2048
    with pytest.raises(ValueError, match="return_levels=7"):
        resnet50_2d(return_levels=7)


def test_resnet_backbone_3d_through_spatial_dims():
    model = ResNetBackbone(spatial_dims=3, in_channels=1, layers=(1, 1, 1, 1), block="basic").eval()
    assert model.feature_dim == 512
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32, 16)).shape == (1, 512)


def test_densenet3d_shapes_and_layout():
    torch.manual_seed(0)
    model = DenseNet3D()
    print(f"\nDenseNet3D (1 input channel, out_dim 1024) parameters: {n_params(model):,}")
    x = torch.randn(2, 1, 64, 64, 16)  # (B, C, X, Y, Z), depth last
    out = model(x)
    assert out.shape == (2, 1024) and model.feature_dim == 1024
    out.sum().backward()
    assert model.stem.conv.weight.grad is not None and model.stem.conv.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        maps = model.forward_features(x, levels=7, pooled=False)
    # channels 16 + 7 · cumulative units; the first two blocks (and their transitions) keep the depth axis
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "stem": (2, 16, 64, 64, 16),
        "block1": (2, 23, 64, 64, 16),
        "block2": (2, 37, 32, 32, 16),
        "block3": (2, 58, 16, 16, 16),
        "block4": (2, 79, 8, 8, 8),
        "block5": (2, 100, 4, 4, 4),
        "pool": (2, 1024),
    }
    # in-plane kernels (the paper's (1,3,3) in (D,H,W)) are (3,3,1) in our depth-last layout
    assert model.stem.conv.weight.shape[2:] == (3, 3, 1)
    assert model.blocks[1].units[1].conv.weight.shape[2:] == (3, 3, 1)
    assert model.blocks[2].units[0].conv.weight.shape[2:] == (3, 3, 3)
    assert [len(block.units) for block in model.blocks] == [1, 2, 3, 3, 3]
    # final feature = [max-pool, avg-pool] of the 512-channel projection
    with torch.no_grad():
        projected = model.head(maps["block5"])
    torch.testing.assert_close(maps["pool"][:, :512], projected.amax(dim=(2, 3, 4)))
    torch.testing.assert_close(maps["pool"][:, 512:], projected.mean(dim=(2, 3, 4)))


def test_densenet3d_options_and_small_inputs():
    plain = DenseNet3D(out_dim=None).eval()
    assert plain.feature_dim == 200
    with torch.no_grad():
        assert plain(torch.randn(1, 1, 17, 9, 1)).shape == (1, 200)  # thin / odd volumes do not fail
    two_channel = DenseNet3D(in_channels=2, out_dim=256).eval()
    with torch.no_grad():
        assert two_channel(torch.randn(1, 2, 32, 32, 8)).shape == (1, 256)
    with pytest.raises(ValueError, match="even"):
        DenseNet3D(out_dim=1023)
    with pytest.raises(ValueError, match="depth last"):
        plain(torch.randn(1, 1, 32, 32))


def test_resnet_norm_reaches_every_residual_block():
    """MONAI's ResNet builds its blocks with BatchNorm whatever ``norm`` says; ResNetBackbone passes it on (a
    GroupNorm ResNet has no BatchNorm left, the same parameter count, and one sample's output does not depend on the
    rest of the batch)."""
    kw = dict(in_channels=1, layers=[1, 1, 1, 1], block_inplanes=[8, 16, 32, 64])
    group = ResNetBackbone(norm=("group", {"num_groups": 4}), **kw).train()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in group.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in group.modules()) > 5
    assert sum(p.numel() for p in group.parameters()) == sum(p.numel() for p in ResNetBackbone(**kw).parameters())
    x = torch.rand(4, 1, 32, 32)
    torch.testing.assert_close(group(x)[:1], group(x[:1]))


def test_resnet_instance_norm_builds_with_affine_weights():
    """``norm="instance"`` (InstanceNorm without affine weights by default) used to crash in MONAI's ResNet, which
    sets every norm layer's weight to 1: ResNetBackbone turns affine on, and says so when a spec turns it off."""
    kw = dict(in_channels=1, layers=[1, 1, 1, 1], block_inplanes=[8, 16, 32, 64])
    for norm in ("instance", ("instance", {"eps": 1e-3})):
        net = ResNetBackbone(norm=norm, **kw)
        norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
        assert len(norms) > 5 and all(m.affine for m in norms)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
        assert net(torch.rand(2, 1, 64, 64)).shape == (2, 256)
    with pytest.raises(ValueError, match="affine"):
        ResNetBackbone(norm=("instance", {"affine": False}), **kw)
