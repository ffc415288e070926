"""medssl.evaluation: feature extraction (eval mode, order, distributed split + padding) and the kNN monitor."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from torch.utils.data import DataLoader, DistributedSampler

from medssl.data.samplers import DistributedBatchSampler, SeededDataset
from medssl.evaluation.features import extract_features, merge_rank_results, planned_indices
from medssl.evaluation.knn import KNNMonitorHandler, knn_accuracy, knn_classify, knn_evaluate, print_knn_summary

NUM_CLASSES = 4
SIDE = 4  # images are (1, SIDE, SIDE)


# ----------------------------------------------------------------------------------------------- data / encoders
def clustered_features(n_per_class: int, dim: int = 16, noise: float = 0.05, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(NUM_CLASSES, dim, generator=g)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    features = centres[labels] + noise * torch.randn(labels.numel(), dim, generator=g)
    order = torch.randperm(labels.numel(), generator=g)
    return features[order], labels[order]


def make_items(n: int, seed: int = 0, modalities=("CT", "MR")) -> list[dict]:
    """Labelled toy items {"image": (1, 4, 4), "label": class, "modality", "item": i}; images = class pattern +
    noise, so a random linear encoder keeps the classes apart."""
    rs = np.random.RandomState(seed)
    patterns = np.random.RandomState(123).randn(NUM_CLASSES, 1, SIDE, SIDE).astype(np.float32) * 3
    items = []
    for i in range(n):
        label = i % NUM_CLASSES
        image = patterns[label] + 0.1 * rs.randn(1, SIDE, SIDE).astype(np.float32)
        items.append({"image": torch.from_numpy(image), "label": label, "modality": modalities[i % len(modalities)],
                      "item": i})
    return items


def make_encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 8), nn.Dropout(0.5), nn.Linear(8, 8))


def reference_features(encoder: nn.Module, items: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(encoder).eval()(torch.stack([it["image"] for it in items]))


# ----------------------------------------------------------------------------------------------- kNN classifier
def test_knn_separable_features_are_classified_perfectly():
    train_f, train_y = clustered_features(30, seed=0)
    test_f, test_y = clustered_features(10, seed=0)  # same centres (seed), other noise draw order
    test_f = test_f + 0.01 * torch.randn(test_f.shape, generator=torch.Generator().manual_seed(5))
    assert knn_accuracy(train_f, train_y, test_f, test_y, k=20, temperature=0.07) == 1.0
    predictions = knn_classify(train_f, train_y, test_f)
    assert predictions.dtype == torch.long and torch.equal(predictions, test_y)


def test_knn_with_shuffled_labels_is_near_chance():
    train_f, train_y = clustered_features(100, seed=1)
    test_f, test_y = clustered_features(100, seed=1)
    shuffled = train_y[torch.randperm(train_y.numel(), generator=torch.Generator().manual_seed(2))]
    acc = knn_accuracy(train_f, shuffled, test_f, test_y, k=20)
    assert abs(acc - 1 / NUM_CLASSES) < 0.12, acc


def test_knn_vote_is_weighted_by_exp_similarity_over_temperature():
    # one very close neighbour of class 0, two less similar neighbours of class 1
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    # small τ: exp(s/τ) makes the closest neighbour dominate; large τ: weights ~equal, majority wins
    assert knn_classify(train, labels, query, k=3, temperature=0.07).item() == 0
    assert knn_classify(train, labels, query, k=3, temperature=100.0).item() == 1
    # the scores are the normalised vote totals sum_i exp(s_i / τ) per class
    _, scores = knn_classify(train, labels, query, k=3, temperature=0.5, num_classes=3, return_scores=True)
    sims = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    w = (sims[0] / 0.5).exp()
    expected = torch.stack([w[0], w[1] + w[2], torch.tensor(0.0)]) / w.sum()
    torch.testing.assert_close(scores[0], expected)
    # k larger than the training set is clamped; k = 1 is the nearest neighbour
    assert knn_classify(train, labels, query, k=50, temperature=100.0).item() == 1
    assert knn_classify(train, labels, query, k=1).item() == 0


def test_knn_input_errors():
    f = torch.randn(5, 3)
    with pytest.raises(ValueError, match="5 training features but 4 labels"):
        knn_classify(f, torch.zeros(4, dtype=torch.long), f)
    with pytest.raises(ValueError, match="feature sizes differ"):
        knn_classify(f, torch.zeros(5, dtype=torch.long), torch.randn(2, 4))
    with pytest.raises(ValueError, match="multi-label"):
        knn_classify(f, torch.zeros(5, 3), f)
    with pytest.raises(ValueError, match="num_classes"):
        knn_classify(f, torch.tensor([0, 1, 2, 3, 4]), f, num_classes=3)


# ----------------------------------------------------------------------------------------------- extraction
def test_extract_features_eval_mode_order_labels_and_restored_modes(caplog):
    items = make_items(10)
    encoder = make_encoder()
    encoder.train()
    encoder[2].eval()  # a sub-module deliberately in eval mode stays so
    loader = DataLoader(items, batch_size=3, shuffle=False)
    with caplog.at_level("INFO", logger="medssl.evaluation.features"):
        features, labels, extras = extract_features(encoder, loader, log_every=2, description="demo")
    assert "demo: batch 2/4 (6 items on 1 rank(s)" in caplog.text and "demo: batch 3/4" not in caplog.text
    assert "demo: embedded 10 items (D=8)" in caplog.text
    assert features.dtype == torch.float32 and features.shape == (10, 8)
    # eval mode: dropout off, so the rows equal the eval-mode forward, in item order
    torch.testing.assert_close(features, reference_features(encoder, items))
    assert labels.tolist() == [it["label"] for it in items]
    assert extras["indices"].tolist() == list(range(10))
    assert extras["modality"] == [it["modality"] for it in items]
    assert extras["num_batches"] == 4
    assert encoder.training and encoder[1].training and not encoder[2].training


def test_extract_features_uses_the_sampler_plan_and_batch_indices():
    items = make_items(9)
    encoder = make_encoder()
    expected = reference_features(encoder, items)
    # a shuffled medssl sampler (deterministic per epoch): rows come back in dataset order
    sampler = DistributedBatchSampler(9, batch_size=4, shuffle=True, seed=3, drop_last=False, rank=0, world_size=1)
    loader = DataLoader(SeededDataset(items), batch_sampler=sampler, collate_fn=None)
    plan = planned_indices(loader)
    assert sorted(set(plan)) == list(range(9)) and plan != sorted(plan) and len(plan) == 12  # shuffled, padded
    delivered = [i for batch in loader for i in batch["item"].tolist()]
    assert delivered == plan  # listing the plan did not advance it
    features, labels, extras = extract_features(encoder, loader)
    torch.testing.assert_close(features, expected)
    assert extras["indices"].tolist() == list(range(9)) and labels.tolist() == [it["label"] for it in items]
    # an explicit index in the batch wins (a torch RandomSampler has no usable plan)
    indexed = [dict(it, index=it["item"]) for it in items]
    g = torch.Generator().manual_seed(0)
    features, labels, extras = extract_features(encoder, DataLoader(indexed, batch_size=2, shuffle=True, generator=g))
    torch.testing.assert_close(features, expected)
    assert extras["indices"].tolist() == list(range(9))
    # neither: loader order, indices unknown
    loader = DataLoader(items, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(1))
    features, labels, extras = extract_features(encoder, loader)
    assert extras["indices"] is None and features.shape == (9, 8)
    rows = {tuple(r) for r in torch.round(features, decimals=4).tolist()}
    assert rows == {tuple(r) for r in torch.round(expected, decimals=4).tolist()}


def test_extract_features_rejects_a_loader_that_does_not_follow_its_sampler_plan():
    items = make_items(6)
    assert planned_indices(DataLoader(items, batch_size=2, sampler=list(range(6)))) == list(range(6))
    short = DataLoader(items[:4], batch_size=2)
    with pytest.raises(RuntimeError, match="delivered 4 items but its sampler plans 6"):
        extract_features(make_encoder(), _ShortPass(short, list(range(6))))


@pytest.mark.parametrize("kind", ["medssl", "torch"])
def test_two_rank_split_is_reassembled_in_dataset_order(kind):
    """The per-rank plans of a 2-rank split, merged, give every item once, in dataset order (padding dropped)."""
    n, world_size = 7, 2
    items = make_items(n)
    encoder = make_encoder()
    expected = reference_features(encoder, items)
    rank_indices, rank_rows = [], []
    for rank in range(world_size):
        if kind == "medssl":
            sampler = DistributedBatchSampler(n, 2, shuffle=True, seed=1, drop_last=False, rank=rank,
                                              world_size=world_size)
            loader = DataLoader(SeededDataset(items), batch_sampler=sampler)
        else:
            sampler = DistributedSampler(items, num_replicas=world_size, rank=rank, shuffle=False)
            loader = DataLoader(items, batch_size=2, sampler=sampler)
        plan = planned_indices(loader)
        images = torch.cat([b["image"] for b in loader])
        with torch.no_grad():
            rows = encoder.eval()(images)
        rank_indices.append(torch.tensor(plan))
        rank_rows.append(rows)
    all_plans = torch.cat(rank_indices)
    assert all_plans.numel() > n and set(all_plans.tolist()) == set(range(n))  # padded with duplicates
    unique, positions = merge_rank_results(rank_indices, rank_rows, num_items=n)
    assert unique.tolist() == list(range(n))
    torch.testing.assert_close(torch.cat(rank_rows)[positions], expected)


class _ShortPass:
    """A loader whose sampling plan (6 items) does not match what it delivers (4 items)."""

    def __init__(self, loader, plan):
        self.loader = loader
        self.batch_sampler = torch.utils.data.BatchSampler(plan, batch_size=2, drop_last=False)
        self.dataset = loader.dataset

    def __iter__(self):
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


def _gloo_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        items = make_items(11)
        encoder = make_encoder()
        sampler = DistributedBatchSampler(11, 2, shuffle=True, seed=0, drop_last=False, rank=rank,
                                          world_size=world_size)
        loader = DataLoader(SeededDataset(items), batch_sampler=sampler)
        features, labels, extras = extract_features(encoder, loader)
        torch_loader = DataLoader(items, batch_size=3,
                                  sampler=DistributedSampler(items, world_size, rank, shuffle=False))
        features2, _, extras2 = extract_features(encoder, torch_loader)
        train_loader = DataLoader(make_items(24, seed=1), batch_size=4,
                                  sampler=DistributedSampler(make_items(24, seed=1), world_size, rank, shuffle=False))
        result = knn_evaluate(encoder, train_loader, torch_loader, k=5)
        try:  # a random sampler's split cannot be undone: every rank gets the same clear error (no hang)
            extract_features(encoder, DataLoader(items, batch_size=3, shuffle=True))
            random_error = None
        except ValueError as e:
            random_error = str(e)
        torch.save({"random_error": random_error, "features": features, "labels": labels, "indices": extras["indices"],
                    "modality": extras["modality"], "features2": features2, "indices2": extras2["indices"],
                    "knn": result},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_extract_features_two_process_gloo(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=2, join=True)
    items = make_items(11)
    expected = reference_features(make_encoder(), items)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = knn_evaluate(make_encoder(), DataLoader(make_items(24, seed=1), batch_size=4),
                          DataLoader(items, batch_size=3), k=5)
    for res in results:  # every rank has all 11 items, once, in dataset order
        assert res["indices"].tolist() == list(range(11)) and res["indices2"].tolist() == list(range(11))
        torch.testing.assert_close(res["features"], expected)
        torch.testing.assert_close(res["features2"], expected)
        assert res["labels"].tolist() == [it["label"] for it in items]
        assert res["modality"] == [it["modality"] for it in items]
        assert {k: res["knn"][k] for k in ("acc", "n_train", "n_val", "k")} == {
            k: single[k] for k in ("acc", "n_train", "n_val", "k")}
        assert res["knn"]["n_val"] == 11 and res["knn"]["n_train"] == 24
        assert "cannot tell which dataset items each rank embedded" in res["random_error"]


# ----------------------------------------------------------------------------------------------- evaluate / handler
class ToyMethodWithBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = make_encoder()
        self.head = nn.Linear(8, 3)


def test_knn_evaluate_accuracy_and_unlabelled_items_left_out():
    encoder = make_encoder()
    train_items = make_items(40, seed=1)
    val_items = make_items(12, seed=2)
    val_items += [dict(it, label=-1) for it in make_items(4, seed=3)]  # unlabelled: left out
    result = knn_evaluate(encoder, DataLoader(train_items, batch_size=8), DataLoader(val_items, batch_size=8))
    assert result["acc"] == 1.0 and result["n_val"] == 12 and result["n_train"] == 40 and result["k"] == 20
    assert result["acc_per_modality"] == {"CT": 1.0, "MR": 1.0}
    # a constant encoder cannot separate anything: accuracy at chance level (all predicted as one class)
    result = knn_evaluate(lambda x: torch.ones(x.shape[0], 4), DataLoader(train_items, batch_size=8),
                          DataLoader(val_items, batch_size=8))
    assert result["acc"] == pytest.approx(1 / NUM_CLASSES)
    with pytest.raises(ValueError, match="no numeric 'label'"):
        knn_evaluate(encoder, DataLoader([{"image": it["image"]} for it in train_items], batch_size=8),
                     DataLoader(val_items, batch_size=8))


def _tiny_engine(method: nn.Module, max_epochs: int) -> Engine:
    engine = Engine(lambda e, b: {"loss": 0.0})
    engine.method = nn.DataParallel(method)  # a wrapper, as DDP would be: the attribute path is resolved inside
    return engine


def test_knn_monitor_handler_epochs_metrics_and_jsonl(tmp_path, caplog):
    method = ToyMethodWithBackbone()
    method.train()
    train_loader = DataLoader(make_items(24, seed=1), batch_size=8)
    val_loader = DataLoader(make_items(8, seed=2), batch_size=4)
    handler = KNNMonitorHandler("backbone", train_loader, val_loader, every_n_epochs=2, k=5, output_dir=tmp_path,
                                at_start=True)
    engine = _tiny_engine(method, 5)
    handler.attach(engine)
    seen = []

    @engine.on(Events.EPOCH_COMPLETED)
    def record(e):  # after the handler's own EPOCH_COMPLETED: the metric is there for other handlers
        seen.append((e.state.epoch, e.state.metrics.get("knn_acc")))

    with caplog.at_level("INFO", logger="medssl.evaluation.knn"):
        engine.run(range(2), max_epochs=5)
    lines = [json.loads(line) for line in (tmp_path / "knn.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["metric"]) for r in lines] == [(0, "knn_acc_init"), (2, "knn_acc"), (4, "knn_acc"),
                                                          (5, "knn_acc")]
    assert [r["iteration"] for r in lines] == [0, 4, 8, 10]
    assert all(r["n_val"] == 8 and r["n_train"] == 24 and r["k"] == 5 and 0 <= r["acc"] <= 1
               for r in lines)
    assert engine.state.metrics["knn_acc"] == lines[-1]["acc"] and "knn_acc_init" in engine.state.metrics
    assert engine.state.metrics["knn_acc_CT"] == lines[-1]["acc_per_modality"]["CT"]
    assert seen[0] == (1, None) and seen[1] == (2, lines[1]["acc"])
    assert "epoch 2: kNN accuracy (k=5) = " in caplog.text and "on 8 validation items" in caplog.text
    assert method.training and method.backbone.training  # modes restored after every evaluation
    assert handler._resolved is method.backbone

    # every_n_epochs=0: only at the end; a module given directly
    out2 = tmp_path / "end_only"
    handler = KNNMonitorHandler(method.backbone, train_loader, val_loader, every_n_epochs=0, k=5, output_dir=out2)
    engine = _tiny_engine(method, 3)
    handler.attach(engine)
    engine.run(range(2), max_epochs=3)
    assert [json.loads(line)["epoch"] for line in (out2 / "knn.jsonl").read_text().splitlines()] == [3]


def test_knn_monitor_baseline_of_another_encoder_writes_only_epoch_0(tmp_path, capsys, caplog):
    """at_end=False, every_n_epochs=0, at_start=True: a baseline encoder (e.g. a random copy) gives the epoch-0 record
    of the knn.jsonl that the trained encoder's monitor completes; the summary reads them as random -> pretrained."""
    method, baseline = ToyMethodWithBackbone(), ToyMethodWithBackbone()
    train_loader = DataLoader(make_items(24, seed=1), batch_size=8)
    val_loader = DataLoader(make_items(8, seed=2), batch_size=4)
    random_copy = KNNMonitorHandler(baseline.backbone, train_loader, val_loader, every_n_epochs=0, k=5, at_start=True,
                                    at_end=False, output_dir=tmp_path, name="knn_acc_random")
    trained = KNNMonitorHandler("backbone", train_loader, val_loader, every_n_epochs=0, k=5, output_dir=tmp_path)
    engine = _tiny_engine(method, 2)
    random_copy.attach(engine)
    trained.attach(engine)
    with caplog.at_level("INFO", logger="medssl.evaluation.knn"):
        engine.run(range(2), max_epochs=2)
    lines = [json.loads(line) for line in (tmp_path / "knn.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["metric"]) for r in lines] == [(0, "knn_acc_random_init"), (2, "knn_acc")]
    # the start line names the random copy (a stage run from pretrained weights must not read as their score)
    assert "at start (knn_acc_random_init): kNN accuracy (k=5) = " in caplog.text
    assert len(random_copy.history) == 1 and random_copy._resolved is baseline.backbone
    summary = print_knn_summary(tmp_path)
    assert (summary["random_init_acc"], summary["pretrained_acc"]) == (lines[0]["acc"], lines[1]["acc"])
    assert "random init" in capsys.readouterr().out


def test_knn_monitor_does_not_consume_the_global_rng():
    method = ToyMethodWithBackbone()
    loader = DataLoader(make_items(8, seed=1), batch_size=4)  # iterating a DataLoader draws from torch's RNG
    handler = KNNMonitorHandler(method.backbone, loader, loader, k=3)
    engine = _tiny_engine(method, 1)
    handler.attach(engine)
    torch.manual_seed(7)
    np.random.seed(7)
    handler.evaluate(engine)
    after = (torch.rand(3), np.random.rand(2))
    torch.manual_seed(7)
    np.random.seed(7)
    assert torch.equal(after[0], torch.rand(3)) and np.array_equal(after[1], np.random.rand(2))


def test_knn_monitor_bad_encoder_path():
    handler = KNNMonitorHandler("teacher.backbone", [], [])
    engine = _tiny_engine(ToyMethodWithBackbone(), 1)
    with pytest.raises(AttributeError, match="no attribute 'teacher'"):
        handler.attach(engine)


def test_knn_monitor_turns_itself_off_without_labelled_items(tmp_path, caplog):
    """Issue 13 item 8: a datalist without class labels stopped the pretraining bundles while their kNN loaders
    were built ("no item with ... labelled_only=class"); the loaders are now empty and the monitors turn themselves
    off with one log line."""
    from monai.data import Dataset

    from medssl.data import load_items

    from PIL import Image

    for k in range(3):
        Image.fromarray(np.full((8, 8), 40 * k, dtype=np.uint8)).save(tmp_path / f"xr{k}.png")
    unlabelled = [{"image": f"xr{k}.png", "modality": "XR", "dim": 2} for k in range(3)]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": unlabelled[:2], "validation": unlabelled[2:]}))
    with pytest.raises(ValueError, match="no item with .*labelled_only=class"):
        load_items(datalist, "training", labelled_only="class")
    assert load_items(datalist, "training", labelled_only="class", allow_empty=True) == []
    assert load_items(datalist, "test", labelled_only="class", allow_empty=True) == []  # no such section
    assert len(load_items(datalist, "training", allow_empty=True)) == 2

    method = ToyMethodWithBackbone()
    train_loader = DataLoader(Dataset(load_items(datalist, "training", labelled_only="class", allow_empty=True)))
    val_loader = DataLoader(Dataset(load_items(datalist, "validation", labelled_only="class", allow_empty=True)))
    baseline = KNNMonitorHandler(ToyMethodWithBackbone().backbone, train_loader, val_loader, every_n_epochs=0,
                                 at_start=True, at_end=False, output_dir=tmp_path, name="knn_acc_random")
    monitor = KNNMonitorHandler("backbone", train_loader, val_loader, every_n_epochs=1, at_start=True,
                                output_dir=tmp_path)
    engine = _tiny_engine(method, 2)
    with caplog.at_level("INFO", logger="medssl.evaluation.knn"):
        baseline.attach(engine)
        monitor.attach(engine)
        engine.run(range(2), max_epochs=2)
    # the monitor's own records (other loggers may reach caplog too, depending on what earlier tests configured)
    assert [r.getMessage() for r in caplog.records if r.name == "medssl.evaluation.knn"] == [
        "kNN monitor off: no labelled item in its train_loader (memory bank) and val_loader (queries) (a datalist "
        "without class labels); pretraining goes on without it"
    ]
    assert not baseline.enabled and not monitor.enabled and monitor.history == []
    assert not (tmp_path / "knn.jsonl").exists() and "knn_acc" not in engine.state.metrics

    # labelled memory bank, no labelled query: off too, and a monitor with items stays on
    labelled = DataLoader(make_items(8, seed=1), batch_size=4)
    caplog.clear()
    with caplog.at_level("INFO", logger="medssl.evaluation.knn"):
        KNNMonitorHandler("backbone", labelled, DataLoader(Dataset([]))).attach(_tiny_engine(method, 1))
    assert "no labelled item in its val_loader (queries)" in caplog.text
    on = KNNMonitorHandler("backbone", labelled, labelled, k=3)
    on.attach(_tiny_engine(method, 1))
    assert on.enabled
