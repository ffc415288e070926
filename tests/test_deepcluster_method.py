"""DeepCluster-v2 method + DeepClusterEpochHandler: memory bank, k-means prototypes at epoch start, ignore index,
init pass, resume, and identical centroids on 2 gloo ranks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from two_processes import run_two_processes
from test_swav_method import CropDataset, TinyBackbone, loader_for, make_batch

from medssl.engines.checkpoint import CheckpointHandler
from medssl.engines.clustering_handlers import DeepClusterEpochHandler
from medssl.engines.trainer import SSLTrainer
from medssl.losses import IGNORE_INDEX, MemoryBank, cluster_memory_bank
from medssl.methods.deepcluster import DeepClusterV2

N_ITEMS = 18  # batch 4, drop_last: 16 items seen per epoch, 2 unseen


def tiny_deepcluster(dataset_size: int = N_ITEMS, seed: int = 0, **kw) -> DeepClusterV2:
    torch.manual_seed(seed)
    kw.setdefault("feat_dim", 8)
    kw.setdefault("hidden_dim", 16)
    kw.setdefault("n_prototypes", (4, 3, 5))
    return DeepClusterV2(TinyBackbone(), dataset_size, **kw)


def build_trainer(method, max_epochs=2, handlers=(), n_items=N_ITEMS):
    optimizer = torch.optim.SGD(method.parameter_groups(), lr=0.05, momentum=0.9)
    loader = loader_for(CropDataset(n_items, label_every=0), batch_size=4)
    return SSLTrainer("cpu", max_epochs, loader, method, optimizer, handlers=list(handlers))


def snapshot_bank(bank: MemoryBank) -> MemoryBank:
    copy_ = MemoryBank(bank.size, bank.embeddings.shape[2], bank.n_crops)
    copy_.load_state_dict(copy.deepcopy(bank.state_dict()))
    return copy_


def test_step_prototypes_not_trained_and_bank_filled():
    method = tiny_deepcluster()
    assert not any(p.requires_grad for p in method.prototypes.parameters())
    grouped = {id(p) for g in method.parameter_groups() for p in g["params"]}
    assert grouped == {id(p) for p in method.parameters() if p.requires_grad}
    assert not grouped & {id(p) for p in method.prototypes.parameters()}
    batch = make_batch(b=4, n_small=2)
    batch["index"] = torch.tensor([3, 7, 1, 12])
    out = method.training_step(batch)
    assert list(out) == ["loss", "assigned", "health"] and out["assigned"] == 0.0
    assert out["loss"].item() == 0.0 and out["loss"].requires_grad  # no assignment yet: zero, not NaN
    indexes, embeddings = method.memory_bank.filled()
    assert indexes.tolist() == [3, 7, 1, 12] and embeddings.shape == (2, 4, 8)
    torch.testing.assert_close(embeddings.norm(dim=2), torch.ones(2, 4))  # the L2-normalised z of crops 0 and 1
    with pytest.raises(KeyError, match="'index'"):
        method.training_step({k: v for k, v in batch.items() if k != "index"})
    with pytest.raises(ValueError, match="outside"):
        method.training_step(dict(batch, index=torch.tensor([0, 1, 2, N_ITEMS])))

    from medssl.networks import resnet50_2d

    assert sum(p.numel() for p in DeepClusterV2(resnet50_2d(), 3000).parameters()) == 29_122_752  # spec


def test_epoch_handler_sets_centroids_and_ignore_index_for_unseen_items():
    method = tiny_deepcluster()
    handler = DeepClusterEpochHandler(n_iters=10, seed=5)
    trainer = build_trainer(method, max_epochs=2, handlers=[handler])
    record = {"outputs": [], "batches": []}

    @trainer.on(Events.EPOCH_COMPLETED)
    def keep_bank(engine):
        record[f"bank{engine.state.epoch}"] = snapshot_bank(method.memory_bank)

    @trainer.on(Events.ITERATION_STARTED)
    def keep_state(engine):  # the model before the step, to recompute the loss by hand
        if engine.state.iteration == 5:
            record["model"] = copy.deepcopy(method)

    @trainer.on(Events.ITERATION_COMPLETED)
    def keep_outputs(engine):
        record["outputs"].append(engine.state.output.as_dict())
        record["batches"].append(engine.state.batch)

    trainer.run()
    # epoch 1: empty bank at its start, everything ignored (loss 0), bank filled with the 16 items seen
    assert all(o["loss"] == 0.0 and o["assigned"] == 0.0 for o in record["outputs"][:4])
    bank1 = record["bank1"]
    seen = bank1.filled()[0]
    assert sorted(seen.tolist()) == sorted(set(seen.tolist())) and len(seen) == 16
    # epoch 2 start: prototypes = k-means centroids of that bank (seed of epoch 2), unseen items ignored
    centroids, table = cluster_memory_bank(bank1, (4, 3, 5), N_ITEMS, n_iters=10, seed=handler.epoch_seed(2))
    assert handler.epoch_seed(2) != handler.epoch_seed(1)
    for h in range(3):
        torch.testing.assert_close(method.prototypes.weights[h], centroids[h], rtol=0, atol=0)
    assert torch.equal(method.assignments.table, table) and method.assignments.epoch == 2
    unseen = sorted(set(range(N_ITEMS)) - set(seen.tolist()))
    assert len(unseen) == 2 and (table[:, unseen] == IGNORE_INDEX).all()
    assert (table[:, seen] >= 0).all()
    for o, b in zip(record["outputs"][4:], record["batches"][4:]):
        assert o["assigned"] == sum(int(i) in set(seen.tolist()) for i in b["index"]) / 4 and o["loss"] > 0
    assert any(o["assigned"] < 1 for o in record["outputs"][4:])  # this seed's epoch 2 draws an unseen item
    assert method.memory_bank.n_filled == 16  # refilled during epoch 2

    # the loss of iteration 5 by hand: CE(z · C_hᵀ / τ, a_h) over every crop, averaged over the heads
    model, batch = record["model"], record["batches"][4]
    with torch.no_grad():
        z = model.head(torch.cat([model.backbone(c) for c in batch["crops"]]))
        targets = table[:, batch["index"]]
        expected = sum(
            F.cross_entropy(z @ centroids[h].T / 0.1, targets[h].repeat(3), ignore_index=IGNORE_INDEX)
            for h in range(3)
        ) / 3
    assert abs(record["outputs"][4]["loss"] - expected.item()) < 1e-5


def test_ignore_index_for_unassigned_items_in_a_batch():
    method = tiny_deepcluster()
    table = torch.full((3, N_ITEMS), IGNORE_INDEX)
    table[:, [0, 2]] = torch.tensor([[1, 3], [0, 2], [4, 4]])
    method.assignments.table = table
    batch = make_batch(b=4, n_small=1)
    batch["index"] = torch.tensor([0, 1, 2, 3])  # items 1 and 3 have no assignment
    out = method.training_step(batch)
    assert out["assigned"] == 0.5
    with torch.no_grad():
        z = method.head(torch.cat([method.backbone(c) for c in batch["crops"]]))
        expected = 0.0
        for h in range(3):
            logits = z @ method.prototypes.weights[h].T / 0.1
            rows = [c * 4 + i for c in range(3) for i in (0, 2)]
            expected += F.cross_entropy(logits[rows], table[h, [0, 2]].repeat(3)) / 3
    torch.testing.assert_close(out["loss"].detach(), expected, rtol=1e-5, atol=1e-6)


def test_init_memory_pass_gives_targets_from_the_first_epoch():
    method = tiny_deepcluster()
    outputs = []
    trainer = build_trainer(method, max_epochs=1, handlers=[DeepClusterEpochHandler(seed=1, init_memory_pass=True)])
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output.as_dict()))
    trainer.run()
    assert method.assignments.epoch == 1
    assert all(o["assigned"] == 1.0 and o["loss"] > 0 for o in outputs)
    assert (method.assignments.table >= 0).sum(dim=1).tolist() == [16, 16, 16]


def test_too_few_embeddings_for_the_prototypes():
    method = tiny_deepcluster(n_prototypes=(6,))
    batch = make_batch(b=4, n_small=0)
    method.training_step(batch)
    with pytest.raises(ValueError, match="holds 4 embeddings .* fewer than the 6 prototypes"):
        method.cluster_memory()
    with pytest.raises(ValueError, match="exceed the dataset size"):
        tiny_deepcluster(dataset_size=5, n_prototypes=(6,))
    small = tiny_deepcluster(n_prototypes=(2,), memory_bank_size=6)
    small.training_step(batch)
    with pytest.raises(ValueError, match="memory bank .6 rows. is full after 4 rows.*memory_bank_size"):
        small.training_step(batch)


def test_resume_mid_run_equals_uninterrupted(tmp_path):
    """Epoch boundary resume: bank, table and prototypes come back through the method's state."""

    def run(max_epochs, ckpt_dir, resume):
        method = tiny_deepcluster(seed=3)
        handlers = [CheckpointHandler(ckpt_dir, save_every_epochs=1, resume=resume), DeepClusterEpochHandler(seed=2)]
        build_trainer(method, max_epochs, handlers).run()
        return method

    full = run(3, tmp_path / "a", False)
    run(2, tmp_path / "b", False)
    resumed = run(3, tmp_path / "b", True)
    assert resumed.assignments.epoch == full.assignments.epoch == 3
    assert torch.equal(resumed.assignments.table, full.assignments.table)
    for key, value in full.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(resumed.memory_bank.embeddings, full.memory_bank.embeddings, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- 2 processes


def _two_rank_worker(rank, world_size, n_items):
    """SSLTrainer (DDP, DistributedBatchSampler) for 2 epochs on each rank; the bank after epoch 1 is returned to
    check the clustering against one process."""
    method = tiny_deepcluster(dataset_size=n_items, seed=0)
    handler = DeepClusterEpochHandler(seed=4)
    trainer = build_trainer(method, max_epochs=2, handlers=[handler], n_items=n_items)
    banks = {}
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: banks.setdefault(e.state.epoch, snapshot_bank(method.memory_bank))
    )
    trainer.run()
    indexes, embeddings = banks[1].filled()
    return {
        "prototypes": [w.detach().clone() for w in method.prototypes.weights],
        "table": method.assignments.table.clone(),
        "bank_indexes": indexes.clone(),
        "bank_embeddings": embeddings.clone(),
        "seed": handler.epoch_seed(2),
    }


@pytest.mark.distributed
def test_two_ranks_have_identical_centroids(tmp_path):
    results = run_two_processes(tmp_path, _two_rank_worker, 20)
    r0, r1 = results
    assert set(r0["bank_indexes"].tolist()).isdisjoint(r1["bank_indexes"].tolist())  # each rank its own share
    assert len(r0["bank_indexes"]) == len(r1["bank_indexes"]) == 8  # global batch 8 (4 per rank), 2 steps
    for h in range(3):
        assert torch.equal(r0["prototypes"][h], r1["prototypes"][h])
    assert torch.equal(r0["table"], r1["table"])
    # the same as one process clustering the concatenated (rank-ordered) bank
    bank = MemoryBank(16, 8, 2)
    bank.update(
        torch.cat([r0["bank_indexes"], r1["bank_indexes"]]),
        torch.cat([r0["bank_embeddings"], r1["bank_embeddings"]], dim=1),
    )
    centroids, table = cluster_memory_bank(bank, (4, 3, 5), 20, n_iters=10, seed=r0["seed"])
    assert torch.equal(r0["table"], table)
    for h in range(3):
        torch.testing.assert_close(r0["prototypes"][h], centroids[h], rtol=0, atol=1e-6)
