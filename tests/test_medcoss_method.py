"""MedCoSS's training step (issue #15 item 4, the method part): the stage's own objective per kind, the frozen
teacher, rehearsal distillation with the same masking noise for teacher and student, intra-modal mixup, and which
tokenizers train. A tiny MultiModalViT keeps every test well under a second."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medssl.methods import MedCoSS, intra_modal_mixup
from medssl.networks import MultiModalViT

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread

VOCAB = 50


def tiny_vit(drop_path_rate: float = 0.0) -> MultiModalViT:
    return MultiModalViT(
        vocab_size=VOCAB, dim=32, depth=2, heads=2, drop_path_rate=drop_path_rate, text_len=16, text_positions=16,
        img_size_2d=32, patch_2d=8, img_size_3d=(16, 16, 8), patch_3d=8,
    )


def text_batch(b: int = 4, length: int = 16) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (b, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    attn = torch.ones(b, length, dtype=torch.long)
    attn[0, 10:] = 0  # a padded sequence
    return {"input_ids": ids, "attention_mask": attn}


def image_batch(kind: str, b: int = 4) -> dict:
    g = torch.Generator().manual_seed(2)
    shape = (b, 3, 32, 32) if kind == "2d" else (b, 1, 16, 16, 8)
    return {"image": torch.rand(shape, generator=g)}


@pytest.mark.parametrize("kind", ["text", "2d", "3d"])
def test_first_stage_trains_its_own_objective_only(kind):
    torch.manual_seed(0)
    method = MedCoSS(tiny_vit(), kind)
    batch = text_batch() if kind == "text" else image_batch(kind)
    out = method.training_step(batch)
    assert list(out)[0] == "loss" and torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, tok in method.encoder.tokenizers.items():
        grads = [p.grad for p in tok.parameters()]
        if name == kind:
            assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        else:
            assert not any(p.requires_grad for p in tok.parameters()), f"{name} trains in a {kind} stage"
    assert (method.mlm_head is not None) == (kind == "text") and (method.decoder is not None) == (kind != "text")
    assert method.teacher is None


def test_rehearsal_needs_a_teacher():
    with pytest.raises(ValueError, match="teacher"):
        MedCoSS(tiny_vit(), "2d", rehearsal_kinds=["text"])
    with pytest.raises(ValueError, match="kind must be"):
        MedCoSS(tiny_vit(), "1d")


@pytest.mark.parametrize("kind", ["text", "2d", "3d"])
def test_distillation_uses_the_same_masking_noise_for_teacher_and_student(kind):
    """The teacher is a frozen copy of the stage's starting encoder, so before any update the student's masked
    features equal the teacher's exactly: only possible when both see the same mask (MAE shuffle or masked ids)."""
    torch.manual_seed(0)
    stage_kind = "3d" if kind != "3d" else "2d"
    method = MedCoSS(tiny_vit(), stage_kind, teacher="copy", rehearsal_kinds=[kind]).train()
    sub = text_batch() if kind == "text" else image_batch(kind)
    assert method.distillation_loss(sub, kind).item() == 0.0
    # a different shuffle for the teacher would not give zero
    if kind != "text":
        x = sub["image"]
        a = method.encoder.forward_encoder(x, kind, 0.75, torch.Generator().manual_seed(1))[0]
        b = method.teacher.forward_encoder(x, kind, 0.75, torch.Generator().manual_seed(2))[0]
        assert torch.nn.functional.mse_loss(a, b).item() > 0


def test_teacher_is_frozen_and_stays_in_eval_mode():
    method = MedCoSS(tiny_vit(drop_path_rate=0.1), "2d", teacher="copy", rehearsal_kinds=["text"])
    method.train()
    assert not method.teacher.training and method.encoder.training
    assert not any(p.requires_grad for p in method.teacher.parameters())
    names = {n for n, _ in method.named_parameters() if _.requires_grad}
    assert not any(n.startswith("teacher.") for n in names)
    assert any(n.startswith("encoder.tokenizers.text.") for n in names)  # the rehearsed kind trains
    assert not any(n.startswith("encoder.tokenizers.3d.") for n in names)


def test_step_with_rehearsal_distils_and_falls():
    """Stage 2 (2D) with a text buffer: the distillation term is finite, and some steps on the buffer batch alone
    pull the student back towards the teacher after the encoder was perturbed."""
    torch.manual_seed(0)
    method = MedCoSS(tiny_vit(), "2d", teacher="copy", rehearsal_kinds=["text"]).train()
    with torch.no_grad():
        for p in method.encoder.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = {**image_batch("2d"), "buffer": [{**text_batch(), "kind": ["text"] * 4, "name": "reports"}]}
    out = method.training_step(batch)
    assert {"loss", "loss_rec", "loss_distill", "loss_distill_reports"} <= set(out)
    assert torch.isfinite(out["loss"]) and out["loss_distill"] > 0
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    sub = batch["buffer"][0]
    first = None
    for _ in range(15):
        torch.manual_seed(3)  # the same mixup and masks each step: the fall is the optimisation's
        loss = method.distillation_loss(sub, "text")
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    with pytest.raises(ValueError, match="rehearses"):
        method.training_step({**image_batch("2d"), "buffer": [{**image_batch("3d"), "kind": "3d"}]})


def test_intra_modal_mixup():
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.full((1, 4, 4), float(i)) for i in range(6)])
    mixed = intra_modal_mixup({"image": x, "other": 1}, "2d", g)["image"]
    assert mixed.shape == x.shape and mixed.min() >= 0 and mixed.max() <= 5
    # every image is a convex combination of itself and one other image: constant within the image
    assert torch.allclose(mixed.amax(dim=(1, 2, 3)), mixed.amin(dim=(1, 2, 3)))
    ids = torch.arange(6)[:, None].expand(6, 20) * 10
    attn = torch.ones(6, 20, dtype=torch.long)
    out = intra_modal_mixup({"input_ids": ids, "attention_mask": attn}, "text", torch.Generator().manual_seed(0))
    for row in range(6):
        values = set(out["input_ids"][row].tolist())
        assert len(values) <= 2 and values <= {10 * i for i in range(6)}  # its own ids and one partner's
    assert not torch.equal(out["input_ids"], ids)


@pytest.mark.parametrize("n", [150, 720, 2160, 37])
def test_rehearsal_buffer_keeps_five_percent(n, tmp_path):
    """int(0.01 N) k-means clusters, int(0.05 N / clusters) nearest members each: 5 % of N up to rounding."""
    from medssl.data.rehearsal import buffer_sizes, select_rehearsal_items, write_rehearsal_datalist

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(max(1, n // 100), 8)) * 5
    feats = centres[rng.integers(len(centres), size=n)] + rng.normal(size=(n, 8))
    idx, clusters, dist = select_rehearsal_items(feats)
    n_clusters, per_cluster = buffer_sizes(n)
    assert n_clusters == max(1, int(0.01 * n)) and per_cluster == max(1, int(0.05 * n / n_clusters))
    assert len(set(idx.tolist())) == len(idx) <= n_clusters * per_cluster
    assert abs(len(idx) - 0.05 * n) <= n_clusters + 1  # 5 % up to the per-cluster rounding
    # ordered by cluster, then by distance to the centroid
    for c in set(clusters.tolist()):
        assert (np.diff(dist[clusters == c]) >= 0).all()
    items = [{"image": f"img_{i}.png", "modality": "XR", "dim": 2} for i in range(n)]
    path = write_rehearsal_datalist(tmp_path / "buffer.json", items, idx, clusters, dist, stage="xr")
    doc = json.loads(path.read_text())
    assert doc["stage"] == "xr" and doc["numTraining"] == len(idx)
    assert [it["image"] for it in doc["training"]] == [f"img_{i}.png" for i in idx]
