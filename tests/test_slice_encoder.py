"""f_intra (joint image-volume SSL, Nguyen et al. 2023): slice-wise 2D ResNet with multi-level features, chunking,
checkpointing, 2D input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medssl.networks.slice_encoder import SliceEncoder, volume_to_slices

TINY = dict(layers=(1, 1, 1, 1), block_inplanes=(4, 8, 16, 32), embed_dim=24)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_encoder(**kwargs) -> SliceEncoder:
    torch.manual_seed(0)
    options = dict(TINY)
    options.update(kwargs)
    return SliceEncoder(**options)


def bn_buffers(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def test_shapes_for_volumes_and_images():
    encoder = tiny_encoder(chunk_size=5).eval()
    # multi-level feature of the last 5 levels: layer1..layer4 + pool = 16 + 32 + 64 + 128 + 128
    assert encoder.feature_dim == 368
    volume = torch.randn(2, 1, 32, 28, 7)  # (B, C, X, Y, Z), depth last
    assert encoder(volume).shape == (2, 7, 24)
    assert encoder.forward_features(volume).shape == (2, 7, 368)
    assert encoder(torch.randn(3, 1, 32, 32)).shape == (3, 24)
    assert encoder(torch.randn(3, 3, 32, 32)).shape == (3, 24)
    assert encoder.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 368)


def test_slices_are_taken_along_the_last_axis_and_levels_are_normalised():
    encoder = tiny_encoder(chunk_size=4).eval()
    torch.manual_seed(1)
    volume = torch.randn(2, 3, 32, 28, 5)
    per_slice = encoder(volume)
    for z in (0, 2, 4):
        torch.testing.assert_close(per_slice[:, z], encoder(volume[..., z]), rtol=1e-5, atol=1e-6)
    assert torch.equal(volume_to_slices(volume)[1 * 5 + 3], volume[1, :, :, :, 3])
    features = encoder.forward_features(volume[..., 0])
    start = 0
    for dim in (16, 32, 64, 128, 128):  # each level is unit-norm
        torch.testing.assert_close(features[:, start : start + dim].norm(dim=1), torch.ones(2))
        start += dim


def test_grey_level_input_is_repeated_to_three_channels():
    encoder = tiny_encoder().eval()
    grey = torch.randn(2, 1, 32, 32, 3)
    torch.testing.assert_close(encoder(grey), encoder(grey.repeat(1, 3, 1, 1, 1)))
    single = tiny_encoder(in_channels=1).eval()
    assert single(grey).shape == (2, 3, 24)
    with pytest.raises(ValueError, match="has 2 channels; the trunk takes 3"):
        encoder(torch.randn(1, 2, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, X, Y, Z\) with the depth \(slice\) axis last"):
        encoder(torch.randn(2, 32, 32))


@pytest.mark.parametrize("chunk_size", [1, 3, 6, None])
def test_chunked_equals_unchunked_in_eval(chunk_size):
    torch.manual_seed(2)
    volume = torch.randn(2, 1, 32, 32, 6)
    reference = tiny_encoder(chunk_size=None).eval()
    chunked = tiny_encoder(chunk_size=chunk_size).eval()
    chunked.load_state_dict(reference.state_dict())
    torch.testing.assert_close(chunked(volume), reference(volume), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(chunked(volume), reference(volume), rtol=1e-5, atol=1e-6)


def test_checkpointed_training_matches_plain_and_updates_bn_once():
    torch.manual_seed(3)
    volume = torch.randn(2, 1, 32, 32, 5)
    plain = tiny_encoder(chunk_size=4, checkpoint=False).train()
    checkpointed = tiny_encoder(chunk_size=4, checkpoint=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    before = bn_buffers(plain)
    outputs = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        out = model(volume)
        (out * torch.linspace(-1, 1, 24)).square().sum().backward()
        outputs[name] = out
    torch.testing.assert_close(outputs["checkpointed"], outputs["plain"])
    for (name, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    after_plain, after_checkpointed = bn_buffers(plain), bn_buffers(checkpointed)
    for key in after_plain:
        torch.testing.assert_close(after_checkpointed[key], after_plain[key], msg=key)
    # 10 slices in chunks of at most 4 (4, 3, 3): three forwards, each counted once (not again during the recomputation)
    assert int(after_plain["backbone.bn1.num_batches_tracked"]) == int(before["backbone.bn1.num_batches_tracked"]) + 3
    assert not torch.equal(after_plain["backbone.bn1.running_mean"], before["backbone.bn1.running_mean"])


def test_gradients_reach_trunk_and_projection_with_near_equal_chunks():
    encoder = tiny_encoder(chunk_size=3).train()
    sizes = []
    encoder.backbone.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    # 4 slices in chunks of at most 3 -> 2 + 2 (a lone slice would break training-mode BatchNorm at 1x1 maps)
    encoder(torch.randn(1, 1, 32, 32, 4)).sum().backward()
    assert sizes == [2, 2]
    assert encoder.backbone.conv1.weight.grad.abs().sum() > 0
    assert encoder.projection.weight.grad.abs().sum() > 0


def test_full_size_slice_encoder_parameters():
    with torch.device("meta"):
        encoder = SliceEncoder()  # ResNet-50, 5 levels, D = 640
    assert encoder.feature_dim == 256 + 512 + 1024 + 2048 + 2048 == 5888
    assert sum(p.numel() for p in encoder.backbone.parameters()) == 23_508_032
    assert sum(p.numel() for p in encoder.projection.parameters()) == 5888 * 640 + 640 == 3_768_960


def test_invalid_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        tiny_encoder(chunk_size=-2)


def test_normalised_level_features_are_not_the_plain_pool():
    """Sanity: the multi-level feature is the concatenation of normalised pooled levels (not just 'pool')."""
    encoder = tiny_encoder().eval()
    image = torch.randn(2, 3, 32, 32)
    levels = encoder.backbone.forward_features(image, levels=5)
    expected = torch.cat([F.normalize(v, dim=1) for v in levels.values()], dim=1)
    torch.testing.assert_close(encoder.forward_features(image), expected)
    torch.testing.assert_close(encoder(image), encoder.projection(expected))
