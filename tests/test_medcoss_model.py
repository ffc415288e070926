"""MedCoSS's model and objectives (issue #15 items 1-2): the ViT-B encoder's exact size, the tokenizers' shapes
(medssl's depth-last 3D crop), MAE masking, the normalised-pixel loss and BERT masking, and a tiny model that
overfits one fixed batch of each kind. Full-size models are built on the meta device (shapes only)."""

from __future__ import annotations

import pytest
import torch

from medssl.losses import IGNORE_LABEL, mlm_loss, mlm_mask, normalized_pixel_loss, patchify
from medssl.networks import MAEDecoder, MLMHead, MultiModalViT, random_masking
from medssl.networks.vit import _Block

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread

# the spec's numbers (MedCoSS, Ye et al.; the authors' model/Unimodel.py)
ENCODER_PARAMETERS = 85_072_896  # 12 x 7,087,872 + 18,432 LayerScale, no final norm
BLOCK_PARAMETERS = 7_087_872  # ViT-B block without LayerScale


@pytest.fixture(scope="module")
def meta_model():
    with torch.device("meta"):
        return MultiModalViT()


def test_encoder_is_vit_b_with_layer_scale_and_no_final_norm(meta_model):
    assert sum(p.numel() for p in meta_model.encoder_parameters()) == ENCODER_PARAMETERS
    block = meta_model.encoder.blocks[0]
    assert len(meta_model.encoder.blocks) == 12
    assert block.ls1.shape == block.ls2.shape == (768,)
    assert sum(p.numel() for n, p in block.named_parameters() if not n.startswith("ls")) == BLOCK_PARAMETERS
    assert [b.drop_path.p for b in meta_model.encoder.blocks] == [0.1] * 12
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in meta_model.encoder.children())
    # LayerScale is off by default in the DINO ViT the block comes from
    assert _Block(8, 2, 4.0, True, 1e-6, 0.0).ls1 is None


def test_full_size_shapes_on_meta(meta_model):
    b = 2
    tokens, mask, ids_restore = meta_model.forward_encoder(torch.empty(b, 3, 224, 224, device="meta"), "2d", 0.75)
    assert tokens.shape == (b, 50, 768) and mask.shape == ids_restore.shape == (b, 196)
    tokens3, mask3, restore3 = meta_model.forward_encoder(torch.empty(b, 1, 192, 192, 16, device="meta"), "3d", 0.75)
    assert tokens3.shape == (b, 37, 768) and mask3.shape == restore3.shape == (b, 144)
    assert meta_model.patch_geometry("3d") == ((16, 16, 16), 144, 4096)
    ids = torch.zeros(b, 112, dtype=torch.long, device="meta")
    text, none_mask, none_restore = meta_model.forward_encoder(ids, "text", attention_mask=torch.ones_like(ids))
    assert text.shape == (b, 112, 768) and none_mask is None and none_restore is None
    assert meta_model(torch.empty(b, 3, 224, 224, device="meta"), "2d").shape == (b, 197, 768)
    with torch.device("meta"):
        dec2, dec3 = MAEDecoder(patch_dim=768, num_patches=196), MAEDecoder(patch_dim=4096, num_patches=144)
        head = MLMHead()
    assert dec2(tokens, ids_restore).shape == (b, 196, 768)
    assert dec3(tokens3, restore3).shape == (b, 144, 4096)
    assert head(text).shape == (b, 112, 30522)
    with pytest.raises(ValueError, match="expected input"):
        meta_model.forward_encoder(torch.empty(b, 1, 16, 192, 192, device="meta"), "3d")  # depth first: refused
    with pytest.raises(ValueError, match="L <= 112"):
        meta_model.forward_encoder(torch.zeros(b, 113, dtype=torch.long, device="meta"), "text")


@pytest.mark.parametrize("n, keep", [(196, 49), (144, 36)])
def test_random_masking_keeps_a_quarter_and_ids_restore_unshuffles(n, keep):
    b, d = 3, 4
    tokens = torch.arange(b * n * d, dtype=torch.float32).reshape(b, n, d)
    kept, mask, ids_restore = random_masking(tokens, 0.75, torch.Generator().manual_seed(0))
    assert kept.shape == (b, keep, d)
    assert mask.sum(1).tolist() == [n - keep] * b
    # [kept, placeholders] put back in grid order: the kept tokens land where mask == 0, unchanged
    seq = torch.cat((kept, torch.full((b, n - keep, d), -1.0)), dim=1)
    restored = torch.gather(seq, 1, ids_restore[..., None].expand(-1, -1, d))
    assert torch.equal(restored[mask == 0], tokens[mask == 0])
    assert (restored[mask == 1] == -1).all()
    assert not torch.equal(mask[0], mask[1])  # per-sample masks


def test_patchify_order_matches_the_tokenizers():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 8, 12, generator=g)
    p = patchify(img, 4)
    assert p.shape == (2, 6, 48)
    assert torch.equal(p[1, 1 * 3 + 2], img[1, :, 4:8, 8:12].permute(1, 2, 0).flatten())
    vol = torch.rand(1, 1, 8, 4, 12, generator=g)
    pv = patchify(vol, 4)
    assert pv.shape == (1, 6, 64)
    assert torch.equal(pv[0, 1 * 3 + 2], vol[0, :, 4:8, 0:4, 8:12].permute(1, 2, 3, 0).flatten())
    # the patch-embedding convolution sees the same patch for the same token
    model = MultiModalViT(vocab_size=10, dim=8, depth=1, heads=2, text_len=4, text_positions=4, img_size_2d=(8, 12),
                          patch_2d=4, img_size_3d=(8, 4, 12), patch_3d=4)
    for kind, x, patches in (("2d", img, p), ("3d", vol, pv)):
        conv = model.tokenizers[kind].proj
        w = conv.weight.movedim(1, -1).reshape(conv.weight.shape[0], -1)
        expected = patches @ w.T + conv.bias
        assert torch.allclose(conv(x).flatten(2).transpose(1, 2), expected, atol=1e-5)


@pytest.mark.parametrize("n", [768, 4096])
def test_zero_prediction_scores_n_minus_one_over_n(n):
    g = torch.Generator().manual_seed(n)
    target = 100.0 * torch.randn(2, 8, n, generator=g, dtype=torch.float64)  # var >> eps
    loss = normalized_pixel_loss(torch.zeros_like(target), target, torch.ones(2, 8))
    assert loss.item() == pytest.approx((n - 1) / n, abs=1e-6)  # 0.998698 / 0.999756; biased variance: 1
    # pixels in [0, 1] (var 1/12): eps lowers it by var / (var + 1e-6) per patch
    pixels = torch.rand(2, 8, n, generator=g, dtype=torch.float64)
    var = pixels.var(-1)
    expected = ((n - 1) / n * var / (var + 1e-6)).mean()
    assert normalized_pixel_loss(torch.zeros_like(pixels), pixels, torch.ones(2, 8)).item() == pytest.approx(
        expected.item(), abs=1e-9
    )
    assert abs(expected.item() - (n - 1) / n * (1 / 12) / (1 / 12 + 1e-6)) < 1e-6  # 0.998686 for n = 768


def test_loss_counts_masked_patches_only():
    g = torch.Generator().manual_seed(1)
    target, pred = torch.rand(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.float32)
    loss = normalized_pixel_loss(pred, target, mask)
    changed = pred.clone()
    changed[mask == 0] += 5.0
    assert normalized_pixel_loss(changed, target, mask).item() == pytest.approx(loss.item(), abs=1e-7)
    changed[0, 0] += 1.0  # a masked patch
    assert normalized_pixel_loss(changed, target, mask).item() != pytest.approx(loss.item(), abs=1e-4)
    norm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (pred - norm).pow(2).mean(-1)
    assert loss.item() == pytest.approx(per_patch[mask == 1].mean().item(), abs=1e-6)


def test_mlm_mask_counts_and_never_padding():
    ids = torch.randint(5, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[1, 12:] = 0
    ids[1, 12:] = 0  # padding id
    inputs, labels = mlm_mask(ids, attention, 100, mask_token_id=3, generator=torch.Generator().manual_seed(0))
    chosen = labels != IGNORE_LABEL
    assert chosen.sum(1).tolist() == [3, 2]  # round(0.15 x 20), round(0.15 x 12)
    assert not chosen[attention == 0].any() and torch.equal(inputs[attention == 0], ids[attention == 0])
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    again = mlm_mask(ids, attention, 100, mask_token_id=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)
    _, special = mlm_mask(ids, attention, 100, 3, generator=torch.Generator().manual_seed(0), special_ids=(ids[0, 0],))
    assert special[0, 0] == IGNORE_LABEL


def test_mlm_mask_80_10_10_in_expectation():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 1000, (400, 100), generator=g)
    inputs, labels = mlm_mask(ids, torch.ones_like(ids), 1000, mask_token_id=3, generator=g)
    chosen = labels != IGNORE_LABEL
    assert chosen.sum().item() == 400 * 15
    masked = (inputs[chosen] == 3).float().mean().item()
    kept = (inputs[chosen] == ids[chosen]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / 1000, abs=0.015)
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.015)


def tiny_model() -> MultiModalViT:
    return MultiModalViT(vocab_size=50, dim=64, depth=2, heads=4, drop_path_rate=0.0, text_len=16, text_positions=16,
                         img_size_2d=32, patch_2d=8, img_size_3d=(16, 16, 8), patch_3d=8)


def test_text_padding_is_left_out_of_attention():
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 50, (2, 16), generator=g)
    attention = torch.ones_like(ids)
    attention[:, 10:] = 0
    other = ids.clone()
    other[:, 10:] = torch.randint(5, 50, (2, 6), generator=g)
    with torch.no_grad():
        a = model(ids, "text", attention_mask=attention)
        b = model(other, "text", attention_mask=attention)
        c = model(other, "text")
    assert a.shape == (2, 16, 64)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, :10], c[:, :10], atol=1e-4)


def _step_losses(kind: str, steps: int = 20) -> list[float]:
    torch.manual_seed(0)
    model = tiny_model()
    g = torch.Generator().manual_seed(4)
    if kind == "text":
        head = MLMHead(64, 50)
        ids = torch.randint(5, 50, (4, 16), generator=g)
        attention = torch.ones_like(ids)
        attention[2:, 12:] = 0
        inputs, labels = mlm_mask(ids, attention, 50, mask_token_id=3, prob=0.3, generator=g)
    else:
        x = torch.rand(4, 3, 32, 32, generator=g) if kind == "2d" else torch.rand(4, 1, 16, 16, 8, generator=g)
        patch, n, patch_dim = model.patch_geometry(kind)
        head = MAEDecoder(64, 32, 1, 4, patch_dim, n)
        target = patchify(x, patch)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(steps):
        if kind == "text":
            feats = model.forward_encoder(inputs, "text", attention_mask=attention)[0]
            loss = mlm_loss(head(feats), labels)
        else:  # the same mask every step: a fixed batch to overfit
            tokens, mask, ids_restore = model.forward_encoder(x, kind, 0.75, torch.Generator().manual_seed(5))
            loss = normalized_pixel_loss(head(tokens, ids_restore), target, mask)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.encoder_parameters())
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["text", "2d", "3d"])
def test_tiny_model_overfits_a_fixed_batch(kind):
    losses = _step_losses(kind)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.85 * losses[0], losses
