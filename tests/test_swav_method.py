"""SwAV method (multi-crop, per-modality prototypes, hybrid head, queue) and its handlers, driven by SSLTrainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from torch.utils.data import DataLoader, Dataset

from medssl.data.samplers import DistributedBatchSampler, ModalityBatchSampler, SeededDataset
from medssl.engines.checkpoint import CheckpointHandler
from medssl.engines.clustering_handlers import FreezePrototypesHandler, SwAVQueueHandler
from medssl.engines.trainer import SSLTrainer
from medssl.losses import SwAVLoss
from medssl.methods.base import forward_multi_crop
from medssl.methods.swav import SwAV
from medssl.transforms import UNLABELLED, ClassLabeld

LARGE, SMALL = 12, 6


# ---------------------------------------------------------------------------------------------- shared helpers
class TinyBackbone(nn.Module):
    """Two convolutions + global average pool, no BatchNorm (a grouped forward equals per-crop forwards)."""

    def __init__(self, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.feature_dim = width
        self.calls: list[tuple[int, ...]] = []  # input shapes of every forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return self.conv2(F.relu(self.conv1(x))).mean(dim=(2, 3))


class CropDataset(Dataset):
    """Item i: 2 large crops (1, 12, 12) + 1 small (1, 6, 6) from RandomState(i), modality CT / MR alternating
    (or all ``modality``), label i % 3 for every ``label_every``-th item else −1 (0 = no label key), index i."""

    def __init__(self, n: int, label_every: int = 2, modality: str | None = None, n_small: int = 1):
        self.n, self.label_every, self.modality, self.n_small = n, label_every, modality, n_small

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rs = np.random.RandomState(i)
        base = rs.rand(1, LARGE, LARGE).astype(np.float32)
        crops = [torch.from_numpy(base + 0.1 * rs.randn(1, LARGE, LARGE).astype(np.float32)) for _ in range(2)]
        crops += [torch.from_numpy(base[:, ::2, ::2].copy()) for _ in range(self.n_small)]
        item = {"crops": crops, "modality": self.modality or ("CT", "MR")[i % 2], "index": i}
        if self.label_every:
            item["label"] = torch.tensor(i % 3 if i % self.label_every == 0 else UNLABELLED)
        return item


def make_batch(b: int = 4, seed: int = 0, n_small: int = 2, modalities=None, labels=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    crops = [torch.rand(b, 1, LARGE, LARGE, generator=g) for _ in range(2)]
    crops += [torch.rand(b, 1, SMALL, SMALL, generator=g) for _ in range(n_small)]
    batch = {"crops": crops, "modality": modalities or ["CT"] * b, "index": torch.arange(b)}
    if labels is not None:
        batch["label"] = labels
    return batch


def tiny_swav(**kw) -> SwAV:
    torch.manual_seed(kw.pop("seed", 0))
    kw.setdefault("feat_dim", 8)
    kw.setdefault("hidden_dim", 16)
    kw.setdefault("n_prototypes", 6)
    return SwAV(TinyBackbone(), **kw)


def loader_for(dataset: Dataset, batch_size: int = 4, sampler=None) -> DataLoader:
    sampler = sampler or DistributedBatchSampler(len(dataset), batch_size, shuffle=True, seed=0, drop_last=True)
    return DataLoader(SeededDataset(dataset), batch_sampler=sampler, num_workers=0)


def manual_embeddings(method: SwAV, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, z) recomputed crop by crop (train mode: BatchNorm on batch statistics, so the same values)."""
    features = torch.cat([method.backbone(c) for c in batch["crops"]])
    return features, method.head(features)


# ---------------------------------------------------------------------------------------------- the step
def test_training_step_loss_grad_and_multi_crop_groups():
    method = tiny_swav()
    batch = make_batch(b=4, n_small=3)
    out = method.training_step(batch)
    assert list(out)[0] == "loss" and set(out) == {"loss", "loss_ss", "health"}
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    # one backbone forward per size group: 2 large crops together, 3 small crops together
    assert method.backbone.calls == [(8, 1, LARGE, LARGE), (12, 1, SMALL, SMALL)]
    with torch.no_grad():  # grouped forwards, view-major: the same as crop by crop
        grouped = forward_multi_crop(method.backbone, batch["crops"])
        torch.testing.assert_close(grouped, torch.cat([method.backbone(c) for c in batch["crops"]]))
    # the same loss computed by hand from the losses module
    with torch.no_grad():
        _, z = manual_embeddings(method, batch)
        expected = SwAVLoss(0.1, 0.03, 3, (0, 1), n_crops=5)(method.prototypes(z), batch_size=4)
    torch.testing.assert_close(out["loss_ss"], expected, rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert method.prototypes.heads[0].weight.grad.abs().sum() > 0
    # 3D-style single assignment crop: codes from crop 0 only
    single = tiny_swav(crops_for_assign=(0,))
    assert torch.isfinite(single.training_step(make_batch())["loss"])
    with pytest.raises(ValueError, match="crops_for_assign"):
        tiny_swav(crops_for_assign=(0, 3)).training_step(make_batch(n_small=0))
    with pytest.raises(KeyError, match="'crops'"):
        method.training_step({"image": torch.zeros(2, 1, 4, 4)})


def test_prototypes_row_normalised_at_every_step():
    method = tiny_swav()
    with torch.no_grad():
        method.prototypes.heads[0].weight.mul_(3.0).add_(0.5)
    assert not torch.allclose(method.prototypes.heads[0].weight.norm(dim=1), torch.ones(6))
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    for step in range(2):
        out = method.training_step(make_batch(seed=step))
        norms = method.prototypes.heads[0].weight.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(6))
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    # the SGD step moved them off the sphere; the next step puts them back
    assert not torch.allclose(method.prototypes.heads[0].weight.norm(dim=1), torch.ones(6), atol=1e-4)


def test_parameter_groups_and_reference_parameter_count():
    method = tiny_swav(num_classes=3)
    groups = method.parameter_groups(base_lr=0.1, weight_decay=1e-6)
    names = [g["name"] for g in groups]
    assert names == [
        "backbone_decay",
        "backbone_no_decay",
        "head_decay",
        "head_no_decay",
        "prototypes_decay",
        "classifier_decay",
        "classifier_no_decay",
    ]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in method.parameters())  # each parameter exactly once
    assert method.embed(torch.zeros(2, 1, LARGE, LARGE)).shape == (2, 8)

    from medssl.networks import resnet50_2d

    count = sum(p.numel() for p in SwAV(resnet50_2d()).parameters())
    assert count == 28_354_752  # the reference ResNet-50 + head + 3000 prototypes (spec)
    with pytest.raises(ValueError, match="feature_dim"):
        SwAV(nn.Linear(3, 3))


# ---------------------------------------------------------------------------------------------- per modality
def test_per_modality_loss_is_sum_of_modalities_and_unknown_modality_error():
    method = tiny_swav(per_modality_prototypes=True, modalities=["MR", "CT"])
    assert method.modalities == ["CT", "MR"]
    batch = make_batch(b=6, modalities=["CT", "CT", "CT", "MR", "MR", "MR"])  # 2 equal single-modality parts
    out = method.training_step(batch)
    with torch.no_grad():
        _, z = manual_embeddings(method, batch)
        loss_fn = SwAVLoss(0.1, 0.03, 3, (0, 1), n_crops=4)
        per_crop = z.split(6)
        expected = {}
        for m, rows in (("CT", slice(0, 3)), ("MR", slice(3, 6))):
            scores = [method.prototypes[m](crop[rows]) for crop in per_crop]
            expected[m] = loss_fn(scores, batch_size=3)
    torch.testing.assert_close(out["loss_ss"], expected["CT"] + expected["MR"], rtol=1e-5, atol=1e-6)
    assert abs(expected["CT"] - expected["MR"]) > 1e-4  # two different problems, not one counted twice
    out["loss"].backward()
    assert method.prototypes["CT"].heads[0].weight.grad.abs().sum() > 0
    assert method.prototypes["MR"].heads[0].weight.grad.abs().sum() > 0

    with pytest.raises(ValueError, match=r"'US'.*\['CT', 'MR'\]"):
        method.training_step(make_batch(b=4, modalities=["CT", "CT", "US", "US"]))
    with pytest.raises(ValueError, match="modalities"):
        tiny_swav(per_modality_prototypes=True)


def test_per_modality_with_modality_sampler_and_trainer():
    """ModalityBatchSampler(parts=2) gives 2 equal single-modality parts per batch; SSLTrainer runs the per-modality
    loss on them."""
    dataset = CropDataset(16)
    modalities = [dataset[i]["modality"] for i in range(len(dataset))]
    sampler = ModalityBatchSampler(modalities, batch_size=4, parts=2, seed=0)
    method = tiny_swav(per_modality_prototypes=True, modalities=["CT", "MR"])
    optimizer = torch.optim.SGD(method.parameters(), 0.1)
    trainer = SSLTrainer("cpu", 1, loader_for(dataset, sampler=sampler), method, optimizer)
    seen = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append((e.state.batch["modality"], e.state.output["loss"]))
    )
    before = {m: method.prototypes[m].heads[0].weight.detach().clone() for m in ("CT", "MR")}
    trainer.run()
    assert len(seen) == len(sampler) == 4
    for mods, loss in seen:
        assert mods[0] == mods[1] and mods[2] == mods[3] and mods[0] != mods[2] and np.isfinite(loss)
    for m in ("CT", "MR"):
        assert (method.prototypes[m].heads[0].weight - before[m]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------- hybrid
def test_hybrid_supervised_term_from_labelled_items_only():
    method = tiny_swav(num_classes=3, alpha=0.7, beta=2.0)
    labels = torch.tensor([1, UNLABELLED, 0, UNLABELLED])
    batch = make_batch(b=4, labels=labels)
    out = method.training_step(batch)
    assert list(out) == ["loss", "loss_ss", "loss_sup", "n_labelled", "health"] and out["n_labelled"] == 2
    with torch.no_grad():
        features, _ = manual_embeddings(method, batch)
        large = torch.cat([features[:4][[0, 2]], features[4:8][[0, 2]]])  # labelled items of the 2 large crops
        expected_sup = F.cross_entropy(method.classifier(large), torch.tensor([1, 0, 1, 0]))
    torch.testing.assert_close(out["loss_sup"], expected_sup, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"].detach(), 0.7 * out["loss_ss"] + 2.0 * out["loss_sup"])

    # changing the labels of unlabelled items to other "unlabelled" encodings changes nothing
    other = make_batch(b=4, labels=torch.tensor([1, -5, 0, -1]))
    torch.testing.assert_close(method.training_step(other)["loss_sup"], out["loss_sup"])

    # no labelled item (all −1, or no label key): loss == α·L_ss, classifier gradient zero (still in the graph)
    for unlabelled in (make_batch(b=4, labels=torch.full((4,), UNLABELLED)), make_batch(b=4)):
        method.zero_grad()
        res = method.training_step(unlabelled)
        assert res["loss_sup"] == 0 and res["n_labelled"] == 0
        torch.testing.assert_close(res["loss"].detach(), 0.7 * res["loss_ss"])
        res["loss"].backward()
        assert method.classifier.weight.grad is not None and method.classifier.weight.grad.abs().sum() == 0

    # multi-label targets: rows of −1 are unlabelled, BCE over the labelled rows
    multi = tiny_swav(num_classes=3)
    targets = torch.tensor([[1.0, 0.0, 1.0], [-1.0, -1.0, -1.0], [0.0, 1.0, 0.0], [-1.0, -1.0, -1.0]])
    batch = make_batch(b=4, labels=targets)
    out = multi.training_step(batch)
    with torch.no_grad():
        features, _ = manual_embeddings(multi, batch)
        large = torch.cat([features[:4][[0, 2]], features[4:8][[0, 2]]])
        expected = F.binary_cross_entropy_with_logits(multi.classifier(large), targets[[0, 2, 0, 2]])
    torch.testing.assert_close(out["loss_sup"], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="ClassLabeld"):
        method.training_step(make_batch(b=4, labels=["a.nii.gz"] * 4))


def test_class_labeld_encodings_and_collation():
    t = ClassLabeld(num_classes=3)
    assert t({"label": 2})["label"].item() == 2 and t({"label": 2})["label"].dtype == torch.long
    assert t({"label": np.int64(1)})["label"].item() == 1
    assert t({"label": "masks/ct_1.nii.gz"})["label"].item() == UNLABELLED  # a segmentation mask is no class
    assert t({"image": "x.png"})["label"].item() == UNLABELLED  # missing key
    assert t({"label": None})["label"].item() == UNLABELLED
    with pytest.raises(ValueError, match=r"x\.png: 'label' = 3 is outside \[0, 3\)"):
        t({"image": "x.png", "label": 3})
    with pytest.raises(ValueError, match="multi_label"):
        t({"label": [0, 1, 1]})
    m = ClassLabeld(num_classes=3, multi_label=True)
    assert m({"label": [0, 1, 1]})["label"].tolist() == [0.0, 1.0, 1.0]
    assert m({"label": 2})["label"].tolist() == [0.0, 0.0, 1.0]
    assert m({"label": "seg.nii.gz"})["label"].tolist() == [-1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="vector of 3"):
        m({"label": [0, 1]})
    # mixed datalist labels collate once converted
    items = [t({"label": 1}), t({"label": "mask.nii.gz"}), t({}), t({"label": 0})]
    collated = torch.utils.data.default_collate(items)["label"]
    assert collated.tolist() == [1, -1, -1, 0]


# ---------------------------------------------------------------------------------------------- queue
def test_queue_used_only_when_full_and_matches_manual_computation():
    method = tiny_swav(queue_length=8)
    assert not method.queues and not method.queue_active
    assert method.start_queue() == 8 and method.queue_active
    queue = method.queues[""]
    assert queue.embeddings.shape == (2, 8, 8)
    used, n_filled = [], []
    for step in range(3):  # B = 4: the queue fills after two pushes, the third step uses it
        batch = make_batch(b=4, seed=step)
        before = queue.embeddings.clone()
        out = method.training_step(batch)
        used.append(method.last_step_used_queue)
        n_filled.append(queue.n_filled)
    assert used == [False, False, True] and n_filled == [4, 8, 8]
    with torch.no_grad():
        _, z = manual_embeddings(method, batch)
        scores = method.prototypes(z)
        loss_fn = SwAVLoss(0.1, 0.03, 3, (0, 1), n_crops=4)
        queue_scores = before @ method.prototypes.heads[0].weight.T  # (2, 8, K) with the current prototypes
        with_queue = loss_fn(scores, batch_size=4, queue_scores=list(queue_scores))
        without = loss_fn(scores, batch_size=4)
    torch.testing.assert_close(out["loss_ss"], with_queue, rtol=1e-5, atol=1e-6)
    assert abs(with_queue - without) > 1e-5
    # newest first: this batch's crop-0 / crop-1 embeddings at the front, the previous ones shifted back
    torch.testing.assert_close(queue.embeddings[0, :4], z[:4])
    torch.testing.assert_close(queue.embeddings[1, :4], z[4:8])
    torch.testing.assert_close(queue.embeddings[:, 4:], before[:, :4])


def test_queue_handler_starts_at_epoch_and_survives_resume(tmp_path):
    """start_epoch=1 (0-based): no queue in epoch 1, an empty queue at the start of epoch 2, used from its 3rd step
    (length 8, batch 4); a run resumed at the end of epoch 2 ends exactly as the uninterrupted run."""

    def build(max_epochs: int, ckpt_dir, resume: bool):
        torch.manual_seed(0)
        method = tiny_swav(queue_length=8)
        optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
        handlers = [
            CheckpointHandler(ckpt_dir, save_every_epochs=1, resume=resume),
            SwAVQueueHandler(start_epoch=1),
            FreezePrototypesHandler(freeze_iters=4),
        ]
        loader = loader_for(CropDataset(16, label_every=0), batch_size=4)
        trainer = SSLTrainer("cpu", max_epochs, loader, method, optimizer, handlers=handlers)
        log = []
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED,
            lambda e: log.append((e.state.epoch, e.state.iteration, method.queue_active, method.last_step_used_queue)),
        )
        return trainer, method, log

    trainer, method, log = build(3, tmp_path / "a", False)
    trainer.run()
    assert [row[2] for row in log] == [False] * 4 + [True] * 8  # active from epoch 2 (iteration 5)
    assert [row[3] for row in log] == [False] * 6 + [True] * 6  # full after 2 pushes, used from iteration 7
    final = {k: v.clone() for k, v in method.state_dict().items() if isinstance(v, torch.Tensor)}
    final_queue = method.queues[""].embeddings.clone()

    first, _, _ = build(2, tmp_path / "b", False)
    first.run()
    resumed, method_b, log_b = build(3, tmp_path / "b", True)
    assert method_b.queue_active and method_b.queues[""].is_full  # restored from the checkpoint's method state
    resumed.run()
    assert [row[1] for row in log_b] == [9, 10, 11, 12] and all(row[3] for row in log_b)
    for key, value in final.items():
        torch.testing.assert_close(method_b.state_dict()[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(method_b.queues[""].embeddings, final_queue, rtol=0, atol=0)
    with pytest.raises(ValueError, match="start_epoch"):
        SwAVQueueHandler(start_epoch=-1)


# ---------------------------------------------------------------------------------------------- freezing
def test_freeze_prototypes_handler_keeps_prototypes_for_n_iterations():
    method = tiny_swav()
    method.prototypes.normalize_()  # already on the sphere: the per-step normalisation alone changes ~nothing
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    freeze = FreezePrototypesHandler(method, freeze_iters=3)
    trainer = SSLTrainer("cpu", 2, loader_for(CropDataset(12, label_every=0)), method, optimizer, handlers=[freeze])
    snapshots, grads_dropped = [method.prototypes.heads[0].weight.detach().clone()], []
    backbone_before = method.backbone.conv1.weight.detach().clone()

    def after_backward(engine):
        grads_dropped.append(method.prototypes.heads[0].weight.grad is None)

    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, after_backward)  # runs after the freeze handler
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: snapshots.append(method.prototypes.heads[0].weight.detach().clone())
    )
    trainer.run()
    assert trainer.state.iteration == 6
    assert grads_dropped == [True, True, True, False, False, False]
    for i in range(1, 4):  # iterations 1..3: unchanged (up to the re-normalisation's rounding)
        torch.testing.assert_close(snapshots[i], snapshots[0], rtol=0, atol=1e-6)
    assert (snapshots[4] - snapshots[3]).abs().max() > 1e-3  # iteration 4 updates them
    assert (method.backbone.conv1.weight - backbone_before).abs().max() > 1e-4  # the rest trained all along

    class NoPrototypes(nn.Module):
        pass

    with pytest.raises(TypeError, match="prototypes"):
        FreezePrototypesHandler(NoPrototypes(), 3).attach(trainer)


# ---------------------------------------------------------------------------------------------- 2 processes
def _two_rank_worker(rank, world_size):
    """Per-modality + hybrid + queue + freezing under DDP (SSLTrainer wraps the method), 2 epochs."""
    method = tiny_swav(num_classes=3, per_modality_prototypes=True, modalities=["CT", "MR"], queue_length=8)
    dataset = CropDataset(32)
    sampler = ModalityBatchSampler([dataset[i]["modality"] for i in range(32)], batch_size=4, parts=2, seed=0)
    optimizer = torch.optim.SGD(method.parameter_groups(), lr=0.05, momentum=0.9)
    handlers = [SwAVQueueHandler(start_epoch=1), FreezePrototypesHandler(freeze_iters=2)]
    trainer = SSLTrainer("cpu", 2, loader_for(dataset, sampler=sampler), method, optimizer, handlers=handlers)
    outputs, used = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output["loss"]))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: used.append(method.last_step_used_queue))
    trainer.run()
    return {
        "params": [p.detach().clone() for p in method.parameters()],
        "losses": torch.tensor(outputs),
        "used": torch.tensor(used),
        "queue_rows": method.queues["CT"].embeddings.shape[1],
    }


@pytest.mark.distributed
def test_two_ranks_train_in_sync(tmp_path):
    from two_processes import run_two_processes

    r0, r1 = run_two_processes(tmp_path, _two_rank_worker)
    assert len(r0["losses"]) == 8 and torch.isfinite(r0["losses"]).all()
    assert torch.equal(r0["losses"], r1["losses"])  # the logged loss is the mean over the ranks
    assert r0["queue_rows"] == 4  # global length 8 over 2 ranks
    assert r0["used"][:4].sum() == 0 and r0["used"][-1]  # no queue in epoch 1, a full one by the end of epoch 2
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # DDP kept every parameter (prototypes of both modalities, classifier) in sync
