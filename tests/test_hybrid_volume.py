"""HybridVolumeEncoder (Nguyen et al. 2023: f_intra + f_inter): shapes, slice fitting, [MASK], parameter count vs
the paper."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.networks.deformable_attention import volume_embedding
from medssl.networks.hybrid_volume import (
    REFERENCE_PARAMETER_COUNTS,
    HybridVolumeEncoder,
    crop_or_pad_slices,
    random_slice_mask,
)

PAPER_TOTAL = 31.16e6  # Nguyen et al. 2023, reported parameter count (prototypes excluded)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_hybrid(**kwargs) -> HybridVolumeEncoder:
    torch.manual_seed(0)
    options = dict(
        num_slices=8,
        embed_dim=24,
        layers=(1, 1, 1, 1),
        block_inplanes=(4, 8, 16, 32),
        chunk_size=5,
        num_layers=2,
        num_heads=6,
        head_dim=4,
        offset_groups=6,
        downsample=2,
        ffn_dim=30,
    )
    options.update(kwargs)
    return HybridVolumeEncoder(**options)


def test_volume_and_image_shapes():
    model = tiny_hybrid().eval()
    volume = torch.randn(2, 1, 32, 32, 8)  # (B, C, X, Y, Z), depth last
    z = model(volume)
    assert z.shape == (2, 24)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    slices = model.embed_slices(volume)
    assert slices.shape == (2, 8, 24)
    contextual = model.contextualize(slices)
    assert contextual.shape == (2, 8, 24)
    torch.testing.assert_close(z, volume_embedding(contextual))
    image = torch.randn(3, 1, 32, 32)
    assert model(image).shape == (3, 24)
    torch.testing.assert_close(model(image), model.slice_encoder(image))
    with pytest.raises(ValueError, match="slice mask was given for a 2D image"):
        model(image, mask=torch.zeros(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="depth last"):
        model.embed_slices(image)


def test_chunked_equals_unchunked():
    volume = torch.randn(2, 1, 32, 32, 8)
    reference = tiny_hybrid(chunk_size=None).eval()
    for chunk_size in (1, 3, 7):
        chunked = tiny_hybrid(chunk_size=chunk_size).eval()
        chunked.load_state_dict(reference.state_dict())
        torch.testing.assert_close(chunked(volume), reference(volume), rtol=1e-5, atol=1e-6)


def test_crop_or_pad_slices():
    volume = torch.arange(10.0).view(1, 1, 1, 10).expand(2, 3, 4, 10)  # (C, X, Y, Z), slice index as value
    assert torch.equal(crop_or_pad_slices(volume, 6)[0, 0, 0], torch.arange(2.0, 8.0))  # centred
    assert torch.equal(crop_or_pad_slices(volume, 6, start=4)[0, 0, 0], torch.arange(4.0, 10.0))
    padded = crop_or_pad_slices(volume, 15, pad_value=-1.0)
    assert padded.shape == (2, 3, 4, 15)
    assert torch.equal(padded[1, 2, 3], torch.tensor([-1.0, -1.0] + list(range(10)) + [-1.0, -1.0, -1.0]))
    assert crop_or_pad_slices(volume, 10) is volume
    with pytest.raises(ValueError, match="start=5 outside 0..4"):
        crop_or_pad_slices(volume, 6, start=5)


def test_volumes_are_fitted_to_num_slices():
    model = tiny_hybrid().eval()
    torch.manual_seed(1)
    long_volume = torch.randn(1, 1, 32, 32, 11)
    assert model.embed_slices(long_volume).shape == (1, 8, 24)
    torch.testing.assert_close(model(long_volume), model(long_volume[..., 1:9]))  # centred crop (11 - 8) // 2 = 1
    short_volume = torch.randn(1, 1, 32, 32, 5)
    padded = torch.cat([torch.zeros(1, 1, 32, 32, 1), short_volume, torch.zeros(1, 1, 32, 32, 2)], dim=-1)
    torch.testing.assert_close(model(short_volume), model(padded))
    model.fit_slices = False
    assert model.embed_slices(long_volume).shape == (1, 11, 24)


def test_mask_embedding_replaces_exactly_the_masked_slices():
    model = tiny_hybrid().eval()
    slices = torch.randn(2, 8, 24)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 3] = mask[1, 0] = mask[1, 7] = True
    masked = model.mask_slices(slices, mask)
    assert torch.equal(masked[~mask], slices[~mask])
    assert torch.equal(masked[mask], model.mask_embedding.detach().expand(3, 24))
    volume = torch.randn(2, 1, 32, 32, 8)
    torch.testing.assert_close(
        model(volume, mask=mask), model.pool(model.contextualize(model.mask_slices(model.embed_slices(volume), mask)))
    )
    assert not torch.allclose(model(volume, mask=mask), model(volume))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 7\)"):
        model.mask_slices(slices, mask[:, :7])


def test_stage2_gradients_reach_mask_embedding_and_f_inter_not_frozen_f_intra():
    model = tiny_hybrid().train()
    model.slice_encoder.requires_grad_(False)
    volume = torch.randn(2, 1, 32, 32, 8)
    with torch.no_grad():
        targets = model.embed_slices(volume)
    mask = random_slice_mask(2, 8, ratio=0.25, generator=torch.Generator().manual_seed(0))
    predicted = model.contextualize(model.mask_slices(targets, mask))
    ((predicted - targets)[mask] ** 2).sum().backward()
    assert model.mask_embedding.grad is not None and model.mask_embedding.grad.abs().sum() > 0
    offset_net = model.slice_transformer.layers[0].attention.offset_conv.weight
    assert offset_net.grad is not None and offset_net.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.slice_encoder.parameters())


def test_random_slice_mask_counts_and_seeding():
    mask = random_slice_mask(5, 64, ratio=0.1, generator=torch.Generator().manual_seed(3))
    assert mask.dtype == torch.bool and mask.shape == (5, 64)
    assert mask.sum(dim=1).tolist() == [math.ceil(6.4)] * 5  # 7 of 64 slices
    assert torch.equal(mask, random_slice_mask(5, 64, 0.1, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(mask, random_slice_mask(5, 64, 0.1, generator=torch.Generator().manual_seed(4)))
    assert random_slice_mask(2, 8, ratio=0.01, generator=torch.Generator().manual_seed(0)).sum(dim=1).tolist() == [1, 1]
    with pytest.raises(ValueError, match="ratio"):
        random_slice_mask(1, 8, ratio=1.5, generator=torch.Generator())
    with pytest.raises(TypeError, match="seeded torch.Generator"):
        random_slice_mask(1, 8, ratio=0.1, generator=None)


def test_parameter_count_against_the_paper(capsys):
    with torch.device("meta"):  # build only: no allocation, no forward
        model = HybridVolumeEncoder(num_slices=64, embed_dim=640)
    parts = model.parameter_breakdown()
    with capsys.disabled():
        print("\nNguyen et al. 2023 parameter count (F = 64, D = 640, prototypes excluded)")
        print(f"  {'part':<15}{'medssl':>14}{'authors':>14}")
        for name in ("trunk", "projection", "transformer", "mask_embedding", "total"):
            reference = REFERENCE_PARAMETER_COUNTS.get(name)
            reference = "-" if reference is None else f"{reference:,}"
            print(f"  {name:<15}{parts[name]:>14,}{reference:>14}")
        print(
            f"  paper: {PAPER_TOTAL / 1e6:.2f} M; medssl: {parts['total'] / 1e6:.2f} M "
            f"({100 * (parts['total'] / PAPER_TOTAL - 1):+.1f} %)"
        )
    assert parts["trunk"] == REFERENCE_PARAMETER_COUNTS["trunk"] == 23_508_032
    assert parts["projection"] == REFERENCE_PARAMETER_COUNTS["projection"] == 3_768_960
    assert parts["total"] == sum(p.numel() for p in model.parameters())
    assert 0.90 * PAPER_TOTAL <= parts["total"] <= 1.25 * PAPER_TOTAL
    # where the difference lives: 4 layers of deformable attention over slices (6 heads x 64, full projections)
    per_layer = sum(p.numel() for p in model.slice_transformer.layers[0].parameters())
    assert parts["transformer"] == 4 * per_layer
