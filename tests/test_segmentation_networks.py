"""Segmentation networks: output shapes (2D, slice-wise 3D, MiT 2D / 3D), slice-wise stacking equals the 2D network
on each axial slice (depth last), the ``encoder`` sub-module has exactly the pretraining backbone's state-dict keys
(so an exported encoder loads one-to-one through medssl.weights.load_pretrained_encoder), TorchScript tracing."""

from __future__ import annotations

import warnings

import pytest
import torch

from medssl.networks import MiT, MiTSegmenter, ResNetBackbone, ResNetUNet, SliceWiseResNetUNet

TINY_RESNET = dict(layers=(1, 1, 1, 1), block_inplanes=(8, 16, 32, 64), decoder_channels=(32, 16, 16, 8, 8))
TINY_MIT = dict(variant="tiny", dims=(8, 16, 32, 64), decoder_dims=(32, 16, 8))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_resnet_unet_2d_shapes_and_skip_levels():
    net = ResNetUNet(4, in_channels=1, **TINY_RESNET).eval()
    out = net(torch.rand(2, 1, 64, 96))
    assert out.shape == (2, 4, 64, 96)
    skips = net.encode(torch.rand(1, 1, 64, 64))
    assert [s.shape[-1] for s in skips] == [32, 16, 8, 4, 2]  # strides 2, 4, 8, 16, 32
    assert [s.shape[1] for s in skips] == [8, 32, 64, 128, 256]  # bottleneck expansion 4
    with pytest.raises(ValueError, match=r"expected \(B, C, H, W\)"):
        net(torch.rand(1, 1, 32, 32, 4))


def test_grey_input_repeated_for_an_rgb_encoder():
    net = ResNetUNet(3, in_channels=1, encoder_in_channels=3, **TINY_RESNET).eval()
    x = torch.rand(1, 1, 32, 32)
    assert torch.allclose(net(x), net(x.expand(-1, 3, -1, -1)))
    with pytest.raises(ValueError, match="2 channels"):
        net(torch.rand(1, 2, 32, 32))


def test_slice_wise_equals_the_2d_network_on_each_axial_slice():
    net = SliceWiseResNetUNet(3, **TINY_RESNET, slices_per_pass=3).eval()
    volume = torch.rand(2, 1, 32, 64, 5)  # (B, C, X, Y, Z), depth last
    with torch.no_grad():
        out = net(volume)
        per_slice = torch.stack([net.forward_2d(volume[..., z]) for z in range(volume.shape[-1])], dim=-1)
    assert out.shape == (2, 3, 32, 64, 5)
    torch.testing.assert_close(out, per_slice, rtol=1e-5, atol=1e-5)
    # a perturbation of slice z only changes the prediction of slice z
    moved = volume.clone()
    moved[..., 2] += 1.0
    with torch.no_grad():
        changed = (net(moved) - out).abs().amax(dim=(0, 1, 2, 3))
    assert changed[2] > 0 and torch.all(changed[[0, 1, 3, 4]] == 0)
    assert net(torch.rand(1, 1, 32, 32)).shape == (1, 3, 32, 32)  # a 2D batch stays 2D


def test_resnet_encoder_keys_equal_the_pretraining_backbone():
    backbone = ResNetBackbone(spatial_dims=2, in_channels=1, layers=(1, 1, 1, 1), block_inplanes=(8, 16, 32, 64))
    for cls in (ResNetUNet, SliceWiseResNetUNet):
        net = cls(2, **TINY_RESNET)
        assert isinstance(net.encoder, ResNetBackbone)
        target = net.encoder.state_dict()
        source = backbone.state_dict()
        assert list(target) == list(source)
        assert all(target[k].shape == source[k].shape for k in source)
        net.encoder.load_state_dict(source, strict=True)
        torch.testing.assert_close(net.encoder.conv1.weight, backbone.conv1.weight)
    # the full-size network is built on the ResNet-50 trunk of the pretraining bundles (23,508,032 params with RGB)
    full = ResNetUNet(2, in_channels=3)
    assert sum(p.numel() for p in full.encoder.parameters()) == 23_508_032


@pytest.mark.parametrize("dims, shape", [(2, (1, 1, 64, 64)), (3, (1, 1, 64, 64, 32))])
def test_mit_segmenter_shapes(dims, shape):
    net = MiTSegmenter(3, spatial_dims=dims, img_size=64 if dims == 2 else (64, 64, 16), **TINY_MIT).eval()
    out = net(torch.rand(*shape))
    assert out.shape == (shape[0], 3, *shape[2:])
    assert net.encoder.paths == (dims,)
    with pytest.raises(ValueError, match="expected"):
        net(torch.rand(1, 1, 64, 64, 16) if dims == 2 else torch.rand(1, 1, 64, 64))


def test_mit_encoder_loads_the_pretraining_mit_of_both_paths():
    """The UniMiSS pretraining MiT (2D and 3D paths, decoder) holds every tensor of the one-path encoder, same
    shapes; what is left over is exactly the other path's modules."""
    pretrained = MiT(spatial_dims=(2, 3), decoder=True, img_size_2d=64, img_size_3d=(64, 64, 16), depths=(1, 1, 1, 1),
                     decoder_depths=(1, 1, 1), dims=(8, 16, 32, 64), decoder_dims=(32, 16, 8))
    source = pretrained.state_dict()
    for dims, other in ((3, "2d"), (2, "3d")):
        net = MiTSegmenter(2, spatial_dims=dims, img_size=64 if dims == 2 else (64, 64, 16), **TINY_MIT)
        target = net.encoder.state_dict()
        assert set(target) <= set(source)
        assert all(target[k].shape == source[k].shape for k in target)
        leftover = set(source) - set(target)
        assert leftover and all(other in k.split(".") for k in leftover)
        net.encoder.load_state_dict({k: source[k] for k in target}, strict=True)


def test_head_is_the_seed_001_layout():
    net = MiTSegmenter(5, spatial_dims=3, img_size=(64, 64, 16), **TINY_MIT)
    layers = [type(m).__name__ for m in net.head.modules()]
    assert "ConvTranspose3d" in layers and "InstanceNorm3d" in layers and "LeakyReLU" in layers
    assert net.head.classifier.conv.kernel_size == (1, 1, 1) and net.head.classifier.conv.out_channels == 5


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: ResNetUNet(3, **TINY_RESNET), (1, 1, 64, 64)),
        (lambda: SliceWiseResNetUNet(3, **TINY_RESNET), (1, 1, 32, 32, 4)),
        (lambda: MiTSegmenter(3, spatial_dims=3, img_size=(64, 64, 16), **TINY_MIT), (1, 1, 64, 64, 16)),
    ],
    ids=["resnet_unet", "slice_wise", "mit_3d"],
)
def test_torchscript_trace_matches_eager(make, shape, tmp_path):
    net = make().eval()
    x = torch.rand(*shape)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks (constant for one input size)
        traced = torch.jit.trace(net, x)
    path = tmp_path / "net.ts"
    traced.save(str(path))
    loaded = torch.jit.load(str(path))
    y = torch.rand(*shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded(y), net(y), rtol=1e-4, atol=1e-5)


def test_resnet_unet_takes_sizes_that_are_not_multiples_of_32():
    from medssl.networks import ResNetUNet

    torch.manual_seed(0)
    net = ResNetUNet(out_channels=3, layers=(1, 1, 1, 1), block_inplanes=(4, 8, 8, 16),
                     decoder_channels=(16, 8, 8, 8, 4)).eval()
    x = torch.rand(1, 1, 48, 40)
    with torch.no_grad():
        out = net(x)
        padded = net(torch.nn.functional.pad(x, (0, 24, 0, 16)))
    assert out.shape == (1, 3, 48, 40)
    assert torch.allclose(out, padded[..., :48, :40], atol=1e-5)  # = the padded input's logits, cropped
