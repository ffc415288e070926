"""Joint image-volume SSL (Nguyen et al. 2023) stages 2 and 3 (medssl.methods.joint_volume): masked slice-embedding
prediction with f_intra frozen, 3D cluster agreement through SwAV on the hybrid volume backbone, and the
pretrained-checkpoint loader."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from medssl.losses import masked_embedding_loss
from medssl.methods.joint_volume import MaskedSliceEmbeddingPrediction
from medssl.networks import HybridVolumeBackbone
from medssl.methods.swav import SwAV
from medssl.networks.backbones import ResNetBackbone
from medssl.weights.stages import load_stage_weights as load_pretrained

# volumes are (B, C, X, Y, Z), depth (slice) axis last
F_SLICES, DIM = 10, 16


def _encoder(seed: int = 0) -> HybridVolumeBackbone:
    torch.manual_seed(seed)
    return HybridVolumeBackbone(
        num_slices=F_SLICES, embed_dim=DIM, in_channels=1, feature_levels=2, layers=(1, 1, 1, 1),
        block_inplanes=(4, 8, 8, 16), chunk_size=16, num_layers=1, num_heads=2, head_dim=4, offset_groups=2,
        downsample=2, ffn_dim=20, dropout=0.0,
    )


def _volumes(batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, 16, 16, F_SLICES, generator=g)


def test_masked_loss_counts_only_masked_slices():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 6, 4, generator=g)
    prediction = torch.randn(2, 6, 4, generator=g, requires_grad=True)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1] = mask[1, 4] = True
    loss = masked_embedding_loss(prediction, target, mask)
    expected = ((prediction[0, 1] - target[0, 1]) ** 2).sum() + ((prediction[1, 4] - target[1, 4]) ** 2).sum()
    assert torch.allclose(loss, expected / 2)
    loss.backward()
    assert torch.all(prediction.grad[~mask] == 0)
    assert torch.all(prediction.grad[mask].abs().sum(-1) > 0)
    # changing the prediction of an unmasked slice does not change the loss
    changed = prediction.detach().clone()
    changed[0, 0] += 100.0
    assert torch.allclose(masked_embedding_loss(changed, target, mask), loss.detach())
    with pytest.raises(ValueError, match="no slice"):
        masked_embedding_loss(prediction, target, torch.zeros(2, 6, dtype=torch.bool))


def test_stage2_freezes_f_intra_and_trains_the_rest():
    method = MaskedSliceEmbeddingPrediction(_encoder(), mask_ratio=0.1, seed=3)
    method.train()
    assert not method.encoder.slice_encoder.training  # frozen BatchNorm statistics
    before = {k: v.clone() for k, v in method.encoder.slice_encoder.state_dict().items()}
    trainable = {id(p) for g in method.parameter_groups() for p in g["params"]}
    assert not trainable & {id(p) for p in method.encoder.slice_encoder.parameters()}
    assert id(method.encoder.mask_embedding) in trainable and id(method.decoder.weight) in trainable

    optimizer = torch.optim.SGD(method.parameter_groups(), lr=0.5)
    for step in range(2):
        method.on_iteration_start(SimpleNamespace(state=SimpleNamespace(iteration=step + 1)))
        out = method({"crops": [_volumes(seed=step)]})
        assert list(out)[0] == "loss" and math.isfinite(float(out["loss"].detach()))
        assert out["n_masked"] == 3 * math.ceil(0.1 * F_SLICES)
        optimizer.zero_grad()
        out["loss"].backward()
        assert all(p.grad is None for p in method.encoder.slice_encoder.parameters())
        assert method.encoder.mask_embedding.grad is not None and method.encoder.mask_embedding.grad.abs().sum() > 0
        assert method.decoder.weight.grad.abs().sum() > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.encoder.slice_transformer.parameters())
        optimizer.step()
    after = method.encoder.slice_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and running statistics unchanged


def test_stage2_masks_follow_the_iteration_seed():
    method = MaskedSliceEmbeddingPrediction(_encoder(), seed=5).eval()
    volumes = _volumes()
    engine = SimpleNamespace(state=SimpleNamespace(iteration=7))
    method.on_iteration_start(engine)
    first = method({"image": volumes})["loss"]
    method.on_iteration_start(engine)
    again = method({"image": volumes})["loss"]
    assert torch.equal(first, again)


def test_stage2_rejects_2d_input():
    method = MaskedSliceEmbeddingPrediction(_encoder())
    with pytest.raises(ValueError, match="depth axis last"):
        method({"image": torch.rand(2, 1, 16, 16)})


def test_stage3_cluster_agreement_trains_f_intra_and_f_inter_jointly():
    encoder = _encoder()
    assert encoder.feature_dim == DIM
    method = SwAV(encoder, feat_dim=DIM, hidden_dim=0, n_prototypes=6, epsilon=0.05, crops_for_assign=(0, 1))
    method.train()
    view_s, view_t = _volumes(4, seed=1), _volumes(4, seed=2)
    out = method({"crops": [view_s, view_t]})
    assert math.isfinite(float(out["loss"].detach()))
    out["loss"].backward()
    intra = [p.grad for p in encoder.slice_encoder.parameters()]
    inter = [p.grad for p in encoder.slice_transformer.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in intra), "f_intra gets no gradient"
    assert any(g is not None and g.abs().sum() > 0 for g in inter), "f_inter gets no gradient"
    # every trainable parameter is used (DistributedDataParallel fails otherwise); [MASK] is not trainable here
    assert not encoder.mask_embedding.requires_grad
    unused = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


def test_load_pretrained_chains_stage_checkpoints(tmp_path):
    # stage 1: the SwAV trunk is the same module as SliceEncoder.backbone
    trunk = ResNetBackbone(spatial_dims=2, in_channels=1, layers=(1, 1, 1, 1), block_inplanes=(4, 8, 8, 16),
                           return_levels=2, normalize_levels=True)
    stage1 = SwAV(trunk, feat_dim=8, hidden_dim=0, n_prototypes=4)
    with torch.no_grad():
        for p in trunk.parameters():
            p.add_(1.0)
    ckpt_dir = tmp_path / "stage1"
    ckpt_dir.mkdir()
    torch.save({"method": stage1.state_dict(), "engine": {"iteration": 4}}, ckpt_dir / "checkpoint_final.pt")
    encoder = load_pretrained(_encoder(1), ckpt_dir, "backbone", "slice_encoder.backbone")
    for key, value in trunk.state_dict().items():
        assert torch.equal(encoder.slice_encoder.backbone.state_dict()[key], value)

    # stage 2 -> stage 3: the whole encoder
    stage2 = MaskedSliceEmbeddingPrediction(encoder)
    torch.save({"method": stage2.state_dict()}, tmp_path / "stage2.pt")
    stage3 = load_pretrained(_encoder(2), tmp_path / "stage2.pt", "encoder", "")
    for key, value in encoder.state_dict().items():
        assert torch.equal(stage3.state_dict()[key], value)

    assert load_pretrained(encoder, None) is encoder
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_pretrained(_encoder(), tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_pretrained(_encoder(), tmp_path / "stage2.pt", "encoder", "slice_encoder.backbone")
