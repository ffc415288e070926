"""medssl.downstream: SupervisedTask's fine-tuning modes, label-fraction subsets, evaluation helpers."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter

import pytest
import torch
import torch.nn as nn

from medssl.downstream import (
    ClassificationMetric,
    ClassProbabilityWriter,
    SupervisedTask,
    SupervisedTrainer,
    evaluate_classification,
    label_fraction_subset,
    load_network_weights,
    training_dataset,
)
from medssl.networks import ResNetBackbone
from medssl.networks.classification import ClassificationHead, EncoderClassifier


def _classifier(num_classes: int = 3, hidden=()) -> EncoderClassifier:
    torch.manual_seed(0)
    encoder = ResNetBackbone(
        spatial_dims=2, in_channels=1, layers=[1, 1, 1, 1], block="basic", block_inplanes=[4, 8, 8, 8]
    )
    return EncoderClassifier(encoder, num_classes, hidden_dims=hidden)


def _batch(n: int = 4, num_classes: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(n, 1, 32, 32, generator=g), "label": torch.arange(n) % num_classes}


def _names(groups) -> dict:
    return {g["name"]: g for g in groups}


# ------------------------------------------------------------------------------------------------ SupervisedTask
def test_linear_mode_freezes_the_encoder_and_keeps_it_in_eval_mode():
    net = _classifier()
    task = SupervisedTask(net, nn.CrossEntropyLoss(), finetune_mode="linear")
    assert all(not p.requires_grad for p in net.encoder.parameters())
    assert all(p.requires_grad for p in net.head.parameters())
    task.train()
    assert task.training and net.head.training
    assert not any(m.training for m in net.encoder.modules())
    groups = task.parameter_groups(base_lr=0.1)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in net.head.parameters()}
    assert all(g["name"].startswith("head") for g in groups)
    # a step changes the head only, and the BatchNorm running statistics stay as they were
    running = net.encoder.bn1.running_mean.clone()
    encoder_before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    head_before = [p.clone() for p in net.head.parameters()]
    opt = torch.optim.SGD(groups, lr=0.1)
    out = task(_batch())
    assert list(out)[0] == "loss" and out["loss"].requires_grad
    out["loss"].backward()
    opt.step()
    assert torch.equal(net.encoder.bn1.running_mean, running)
    assert all(torch.equal(v, net.encoder.state_dict()[k]) for k, v in encoder_before.items())
    assert any(not torch.equal(a, b) for a, b in zip(head_before, net.head.parameters()))


def test_finetune_groups_scale_the_encoder_learning_rate():
    net = _classifier()
    task = SupervisedTask(net, nn.CrossEntropyLoss(), finetune_mode="finetune", encoder_lr_scale=0.25)
    groups = _names(task.parameter_groups(base_lr=0.4, weight_decay=0.01))
    assert set(groups) == {"encoder_decay", "encoder_no_decay", "head_decay", "head_no_decay"}
    assert groups["encoder_decay"]["lr_scale"] == 0.25 and groups["encoder_decay"]["lr"] == pytest.approx(0.1)
    assert groups["head_decay"]["lr_scale"] == 1.0 and groups["head_decay"]["lr"] == pytest.approx(0.4)
    assert groups["encoder_no_decay"]["weight_decay"] == 0.0 and groups["encoder_decay"]["weight_decay"] == 0.01
    encoder_ids = {id(p) for p in net.encoder.parameters()}
    assert {id(p) for g in ("encoder_decay", "encoder_no_decay") for p in groups[g]["params"]} == encoder_ids
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == len(list(net.parameters()))
    task.train()
    assert net.encoder.training


def test_scratch_mode_trains_everything_at_the_base_rate():
    task = SupervisedTask(_classifier(), nn.CrossEntropyLoss(), finetune_mode="scratch", encoder_lr_scale=0.1)
    assert {g["lr_scale"] for g in task.parameter_groups()} == {1.0}


def test_unknown_mode_and_missing_encoder_are_clear_errors():
    with pytest.raises(ValueError, match="finetune_mode='frozen'.*linear"):
        SupervisedTask(_classifier(), nn.CrossEntropyLoss(), finetune_mode="frozen")
    with pytest.raises(ValueError, match="no sub-module 'backbone'"):
        SupervisedTask(_classifier(), nn.CrossEntropyLoss(), encoder_prefix="backbone")


def test_training_step_logs_accuracy_and_uses_the_label_transform():
    net = _classifier(num_classes=2)
    task = SupervisedTask(net, nn.BCEWithLogitsLoss(), label_transform=lambda y: y.float())
    batch = {"image": torch.randn(3, 1, 32, 32), "label": torch.tensor([[1, 0], [0, 1], [1, 1]])}
    out = task(batch)
    assert "accuracy" not in out  # multi-label: no single-label accuracy
    logits = net(batch["image"])
    expected = nn.functional.binary_cross_entropy_with_logits(logits, batch["label"].float())
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    ce_task = SupervisedTask(net, nn.CrossEntropyLoss())
    b = _batch(num_classes=2)
    acc = (net(b["image"]).argmax(1) == b["label"]).float().mean()
    assert ce_task(b)["accuracy"].item() == pytest.approx(acc.item())


def test_cached_features_feed_the_head_only_in_linear_mode():
    net = _classifier()
    task = SupervisedTask(net, nn.CrossEntropyLoss(), finetune_mode="linear")
    features = torch.randn(4, net.feature_dim)
    out = task({"features": features, "label": torch.tensor([0, 1, 2, 0])})
    expected = nn.functional.cross_entropy(net.head(features), torch.tensor([0, 1, 2, 0]))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    finetune = SupervisedTask(net, nn.CrossEntropyLoss(), finetune_mode="finetune")
    with pytest.raises(ValueError, match="cached encoder features"):
        finetune({"features": features, "label": torch.tensor([0, 1, 2, 0])})


def test_supervised_trainer_takes_monai_argument_names_and_trains():
    """SupervisedTrainer: a plain network + loss_function (wrapped as a scratch SupervisedTask) or a SupervisedTask;
    one epoch moves the head; in linear mode the encoder stays as it was."""
    batches = [_batch(4) for _ in range(3)]
    network = _classifier()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    trainer = SupervisedTrainer("cpu", 1, batches, network, optimizer, loss_function=nn.CrossEntropyLoss())
    trainer.run()
    assert isinstance(trainer.task, SupervisedTask) and trainer.task is trainer.method
    assert trainer.task.finetune_mode == "scratch" and trainer.state.iteration == 3
    assert not torch.equal(network.state_dict()["head.layers.0.weight"], before["head.layers.0.weight"])

    task = SupervisedTask(_classifier(), nn.CrossEntropyLoss(), finetune_mode="linear")
    frozen = {k: v.clone() for k, v in task.encoder.state_dict().items()}
    optimizer = torch.optim.SGD(task.parameter_groups(base_lr=0.1), lr=0.1)
    SupervisedTrainer("cpu", 1, batches, task, optimizer).run()
    assert all(torch.equal(v, frozen[k]) for k, v in task.encoder.state_dict().items())  # linear: encoder frozen
    with pytest.raises(ValueError, match="give loss_function"):
        SupervisedTrainer("cpu", 1, batches, _classifier(), optimizer)
    with pytest.raises(ValueError, match="already has its loss"):
        SupervisedTrainer("cpu", 1, batches, task, optimizer, loss_function=nn.CrossEntropyLoss())


def test_head_and_classifier_shapes():
    net = _classifier(num_classes=4, hidden=[7])
    assert [type(m).__name__ for m in net.head.layers] == ["Linear", "ReLU", "Linear"]
    assert net.head.layers[0].out_features == 7
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match=r"expected \(B, 5\)"):
        ClassificationHead(5, 2)(torch.randn(2, 6))


# ------------------------------------------------------------------------------------------------ label fractions
def _items(counts: dict[int, int]) -> list[dict]:
    items = []
    for cls, n in counts.items():
        items += [{"image": f"img_{cls}_{i}.png", "label": cls} for i in range(n)]
    return items


def test_label_fraction_is_stratified_seeded_and_keeps_every_class():
    items = _items({0: 50, 1: 20, 2: 3})
    subset = label_fraction_subset(items, 0.2, seed=3)
    counts = Counter(it["label"] for it in subset)
    assert counts == {0: 10, 1: 4, 2: 1}  # round(0.2 n_c), at least one per class
    assert subset == label_fraction_subset(items, 0.2, seed=3)
    assert subset != label_fraction_subset(items, 0.2, seed=4)
    positions = [items.index(it) for it in subset]
    assert positions == sorted(positions)  # original order kept
    tiny = label_fraction_subset(_items({0: 10, 1: 1}), 0.01, seed=0)
    assert Counter(it["label"] for it in tiny) == {0: 1, 1: 1}


def test_label_fraction_multi_label_strata_and_full_set():
    items = [{"image": f"{i}", "label": [0, 1, 0] if i % 3 else [1, 0, 1]} for i in range(30)]
    items += [{"image": "neg", "label": [0, 0, 0]}]
    subset = label_fraction_subset(items, 0.4, seed=0)
    strata = Counter(tuple(it["label"]) for it in subset)
    assert strata == {(0, 1, 0): 8, (1, 0, 1): 4, (0, 0, 0): 1}
    assert label_fraction_subset(items, 1.0, seed=5) == items


def test_label_fraction_without_stratification_and_errors():
    items = [{"image": f"ct_{i}.nii.gz", "label": f"ct_{i}_seg.nii.gz"} for i in range(10)]
    subset = label_fraction_subset(items, 0.3, seed=1, stratify=False)
    assert len(subset) == 3 and subset == label_fraction_subset(items, 0.3, seed=1, stratify=False)
    with pytest.raises(ValueError, match="stratify=False"):
        label_fraction_subset(items, 0.3, seed=1)
    for bad in (0.0, -0.1, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match=r"label_fraction=.*\(0, 1\]"):
            label_fraction_subset(_items({0: 4}), bad, seed=0)
    with pytest.raises(ValueError, match="item 1 .* has no 'label'"):
        label_fraction_subset([{"image": "a", "label": 0}, {"image": "b"}], 0.5, seed=0)


# ------------------------------------------------------------------------------------------------ evaluation helpers
class _FixedLogits(nn.Module):
    """A 'network' whose logits are stored per image value (image[..., 0, 0] holds the case index)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].long()]


def _loader(n: int, labels: torch.Tensor):
    data = [
        {"image": torch.full((1, 4, 4), float(i)), "label": labels[i], "case": f"case_{i}", "index": i}
        for i in range(n)
    ]
    return torch.utils.data.DataLoader(data, batch_size=3, shuffle=False)


def test_evaluate_classification_writes_per_case_csv_and_summary(tmp_path):
    from medssl.evaluation.metrics import classification_metrics

    labels = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    logits = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    net = _FixedLogits(logits)
    metrics = evaluate_classification(net, _loader(7, labels), output_dir=tmp_path, class_names=["a", "b", "c"])
    expected = classification_metrics(torch.softmax(logits, 1), labels, class_names=["a", "b", "c"])
    assert metrics == pytest.approx(expected, nan_ok=True)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["case"] for r in rows] == [f"case_{i}" for i in range(7)]
    assert [int(r["label"]) for r in rows] == labels.tolist()
    assert [r["predicted"] for r in rows] == [["a", "b", "c"][i] for i in logits.argmax(1).tolist()]
    assert sum(float(rows[0][f"prob/{c}"]) for c in "abc") == pytest.approx(1.0, abs=1e-5)
    summary = json.loads((tmp_path / "metrics_summary.json").read_text())
    assert summary["accuracy"] == pytest.approx(expected["accuracy"]) and summary["class_names"] == ["a", "b", "c"]


def test_classification_metric_on_hand_made_probabilities():
    from sklearn.metrics import cohen_kappa_score

    # multi-class, fed as decollated per-item lists in two updates: AUC one-vs-rest 1, 3/4, 2.5/3; 3 of 4 correct
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.3, 0.4, 0.3]])
    labels = torch.tensor([0, 1, 2, 1])
    metric = ClassificationMetric(class_names=["a", "b", "c"])
    metric.update((list(probs[:2]), list(labels[:2])))
    metric.update((probs[2:], labels[2:]))
    auc = [1.0, 0.75, 2.5 / 3]
    assert metric.compute() == pytest.approx(sum(auc) / 3)
    assert [metric.results[f"auc/{c}"] for c in "abc"] == pytest.approx(auc)
    assert metric.results["accuracy"] == 0.75 and metric.results["num_cases"] == 4
    metric.reset()
    with pytest.raises(ValueError, match="no validation items"):
        metric.compute()

    # multi-label: AUC per label 1 and 3/4; accuracy = mean per-label accuracy at 0.5 = (1 + 0.5) / 2
    multi = ClassificationMetric(class_names=["x", "y"], multi_label=True, key="accuracy")
    multi.update((torch.tensor([[0.9, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.6]]),
                  torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.float32)))
    assert multi.compute() == 0.75 and multi.results["auc_macro"] == pytest.approx(0.875)

    # ordinal grades: quadratic-weighted kappa as the key metric
    grades = torch.tensor([0, 1, 2, 2])
    ordinal = ClassificationMetric(ordinal=True, key="kappa")
    ordinal.update((torch.eye(3)[[0, 2, 2, 1]] * 0.8 + 0.2 / 3, grades))
    assert ordinal.compute() == pytest.approx(cohen_kappa_score([0, 1, 2, 2], [0, 2, 2, 1], weights="quadratic"))

    # an undefined key metric (AUC on a single-class set) ranks below every defined one
    single = ClassificationMetric()
    single.update((torch.tensor([[0.6, 0.4], [0.3, 0.7]]), torch.tensor([0, 0])))
    assert single.compute() == -float("inf") and math.isnan(single.results["auc_macro"])
    with pytest.raises(KeyError, match="key 'dice'"):
        bad = ClassificationMetric(key="dice")
        bad.update((probs, labels))
        bad.compute()


def test_classification_metric_with_monai_validation_keeps_the_best_network(tmp_path):
    """MONAI's ValidationHandler + SupervisedEvaluator + CheckpointSaver with ClassificationMetric as the key metric:
    the best epoch's network is the one saved; the padding item of a distributed sampler counts once."""
    from ignite.engine import Engine, Events
    from monai.engines import SupervisedEvaluator
    from monai.handlers import CheckpointSaver, ValidationHandler
    from monai.transforms import Activationsd

    net = nn.Linear(2, 2, bias=False)
    x, y = torch.eye(2)[[0, 1, 0, 1]], [0, 1, 0, 1]
    data = [{"image": x[i], "label": torch.tensor(y[i]), "index": i} for i in [0, 1, 2, 3, 0]]  # last: padding
    metric = ClassificationMetric(class_names=["a", "b"], output_dir=tmp_path)
    saver = CheckpointSaver(save_dir=str(tmp_path / "m"), save_dict={"model": net}, save_key_metric=True,
                            key_metric_filename="model.pt")
    evaluator = SupervisedEvaluator(
        device="cpu", val_data_loader=torch.utils.data.DataLoader(data, batch_size=2), network=net,
        postprocessing=Activationsd("pred", softmax=True), key_val_metric={"val_auc_macro": metric},
        val_handlers=[saver],
    )
    weights = [torch.zeros(2, 2), torch.eye(2), -torch.eye(2)]  # AUC 0.5, 1.0, 0.0
    trainer = Engine(lambda e, b: None)

    @trainer.on(Events.EPOCH_STARTED)
    def _set_weights(e):
        with torch.no_grad():
            net.weight.copy_(weights[e.state.epoch - 1])

    ValidationHandler(interval=1, validator=evaluator, epoch_level=True).attach(trainer)
    trainer.run([0], max_epochs=3)
    assert evaluator.state.best_metric == 1.0 and evaluator.state.best_metric_epoch == 2
    assert evaluator.state.metrics["val_auc_macro"] == 0.0 and evaluator.state.metrics["val_accuracy"] == 0.0
    log = [json.loads(line) for line in (tmp_path / "val_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and [r["best"] for r in log] == [True, True, False]
    assert [r["auc_macro"] for r in log] == [0.5, 1.0, 0.0] and all(r["num_cases"] == 4 for r in log)
    saved = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert torch.equal(saved["weight"], torch.eye(2))
    other = nn.Linear(2, 2, bias=False)
    load_network_weights(other, tmp_path / "m" / "model.pt")
    assert torch.equal(other.weight, torch.eye(2))
    with pytest.raises(RuntimeError, match="does not fit"):
        load_network_weights(nn.Linear(3, 2), tmp_path / "m" / "model.pt")


def test_probability_writer_rows(tmp_path):
    from ignite.engine import Engine

    outputs = [[{"pred": torch.tensor([0.2, 0.8]), "case": "x"}, {"pred": torch.tensor([0.9, 0.1]), "case": "y"}]]
    engine = Engine(lambda e, b: outputs[0])
    writer = ClassProbabilityWriter(tmp_path, ["neg", "pos"])
    writer.attach(engine)
    engine.run([0], max_epochs=1)
    rows = list(csv.DictReader(open(tmp_path / "probabilities.csv")))
    assert [(r["case"], r["predicted"], float(r["prob/pos"])) for r in rows] == [("x", "pos", 0.8), ("y", "neg", 0.1)]


def test_training_dataset_caches_frozen_features(tmp_path, monkeypatch):
    from monai.transforms import Lambdad

    net = _classifier()
    items = [{"image": f"img{i}", "label": i % 3} for i in range(5)]
    images = {f"img{i}": torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(5)}
    transform = Lambdad(keys="image", func=lambda path: images[path])
    ds = training_dataset(
        items, None, finetune_mode="linear", network=net, feature_transform=transform, cache_dir=tmp_path,
        encoder_id="toy", preprocessing={"size": 32}, batch_size=2,
    )
    assert len(ds) == 5 and list(tmp_path.glob("toy-*.pt"))
    net.encoder.eval()
    with torch.no_grad():
        expected = net.encoder(torch.stack([images[f"img{i}"] for i in range(5)]))
    got = torch.stack([ds[i]["features"] for i in range(5)])
    assert torch.allclose(got, expected, atol=1e-5)
    assert [int(ds[i]["label"]) for i in range(5)] == [0, 1, 2, 0, 1]
    image_ds = training_dataset(items, transform, finetune_mode="finetune", network=net)
    assert torch.equal(image_ds[2]["image"], images["img2"])
