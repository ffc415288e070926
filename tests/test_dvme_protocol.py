"""The DVME protocol (medssl.evaluation.dvme_protocol): seeded class-balanced folds with oversampling, regimes, the
training / selection / test loop on cached-style embeddings, the results table and CSV, the attention map and its
picture, the image-level network."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from medssl.evaluation.dvme_protocol import (
    DVMEImageClassifier,
    DVMEProtocol,
    FeatureSplit,
    SMOKE_BACKBONES,
    attention_map,
    balanced_sample,
    fold_samples,
    parse_encoder_specs,
    parse_regimes,
)
from medssl.networks import DVME


def test_balanced_sample_quota_and_oversampling():
    labels = np.array([0] * 40 + [1] * 12 + [2] * 3)
    idx = balanced_sample(labels, 30, np.random.RandomState(0))
    assert len(idx) == 30
    counts = np.bincount(labels[idx], minlength=3)
    assert counts.tolist() == [10, 10, 10]
    # classes 0 and 1 have enough items: no repeats; class 2 (3 items for a quota of 10) is oversampled
    for cls in (0, 1):
        members = idx[labels[idx] == cls]
        assert len(np.unique(members)) == len(members)
    small = idx[labels[idx] == 2]
    assert set(small.tolist()) == {52, 53, 54}  # every item of the small class is used, then repeated
    # a count not divisible by the number of classes: quotas differ by at most one
    counts = np.bincount(labels[balanced_sample(labels, 31, np.random.RandomState(1))], minlength=3)
    assert sorted(counts.tolist()) == [10, 10, 11]
    # None = as many as there are items
    assert len(balanced_sample(labels, None, np.random.RandomState(0))) == len(labels)


def test_fold_samples_are_seeded_and_differ_between_folds_and_regimes():
    labels = np.repeat(np.arange(3), 20)
    a = fold_samples(labels, 12, folds=5, seed=7, regime="small")
    b = fold_samples(labels, 12, folds=5, seed=7, regime="small")
    assert len(a) == 5 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len({tuple(sorted(f.tolist())) for f in a}) == 5  # five different samples
    c = fold_samples(labels, 12, folds=5, seed=8, regime="small")
    d = fold_samples(labels, 12, folds=5, seed=7, regime="medium")
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])
    assert all(np.bincount(labels[f], minlength=3).tolist() == [4, 4, 4] for f in a)


def test_regimes_and_encoder_specs_are_checked(tmp_path):
    assert parse_regimes({"small": 50, "medium": 500, "full": None}) == {"small": 50, "medium": 500, "full": None}
    assert parse_regimes({"full": "all"}) == {"full": None}
    with pytest.raises(ValueError, match=r"regimes\['small'\] = 0"):
        parse_regimes({"small": 0})
    with pytest.raises(ValueError, match="non-empty"):
        parse_regimes({})
    with pytest.raises(FileNotFoundError, match=r"encoders\[0\] \(a\): path .*missing.json"):
        parse_encoder_specs([{"name": "a", "path": str(tmp_path / "missing.json")}])
    with pytest.raises(ValueError, match="used twice"):
        twice = {"name": "a", "backbone": {"_target_": "x.Y"}}
        parse_encoder_specs([twice, dict(twice)])
    with pytest.raises(ValueError, match="unknown fields"):
        parse_encoder_specs([{"name": "a", "backbone": {"_target_": "x.Y"}, "weights": 1}])


def _separable_split(n_per: int, seed: int, dims: dict[str, int]) -> FeatureSplit:
    """Three classes; encoder "a" separates them, "b" is noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per)
    feats = {}
    for name, dim in dims.items():
        x = torch.randn(len(labels), dim, generator=g)
        if name == "a":
            x[:, :3] += 4.0 * torch.nn.functional.one_hot(labels, 3)
        feats[name] = x
    keys = [f"img_{seed}_{i}.png" for i in range(len(labels))]
    return FeatureSplit(feats, labels, keys, ["XR"] * len(labels))


def _protocol(tmp_path, **kwargs) -> DVMEProtocol:
    dims = {"a": 12, "b": 6}
    specs = [{"name": n, "backbone": {"_target_": "torch.nn.Identity"}} for n in dims]
    defaults = dict(regimes={"small": 9, "full": None}, folds=3, max_epochs=8, batch_size=8, proj_dim=4, lr=0.05,
                    class_names=["x", "y", "z"], seed=0)
    defaults.update(kwargs)
    protocol = DVMEProtocol(specs, tmp_path / "datalist.json", tmp_path / "out", tmp_path / "ckpt", transform=None,
                            **defaults)
    protocol.splits = {"training": _separable_split(14, 0, dims), "validation": _separable_split(6, 1, dims),
                       "test": _separable_split(8, 2, dims)}
    protocol.items = {"training": [], "validation": [], "test": []}
    protocol.num_classes = 3
    return protocol


def test_protocol_writes_csv_table_pictures_and_checkpoint(tmp_path):
    protocol = _protocol(tmp_path)
    outputs = protocol.run()
    names = ["dvme", "dvme_no_attention", "single:a", "single:b"]
    with open(outputs["results_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(names) * 2 * 3  # models x regimes x folds
    assert {(r["model"], r["regime"]) for r in rows} == {(m, r) for m in names for r in ("small", "full")}
    assert {r["n_train"] for r in rows if r["regime"] == "small"} == {"9"}
    assert {r["n_train"] for r in rows if r["regime"] == "full"} == {"42"}
    # exactly one best fold per (model, regime), the one with the highest validation AUC
    for m in names:
        for regime in ("small", "full"):
            group = [r for r in rows if r["model"] == m and r["regime"] == regime]
            best = [r for r in group if r["best_fold"] == "True"]
            assert len(best) == 1 and float(best[0]["val_auc"]) == max(float(r["val_auc"]) for r in group)
    # the informative encoder is learnt: DVME and encoder a's probe separate the test classes, encoder b does not
    full = {
        m: np.mean([float(r["test_auc"]) for r in rows if r["model"] == m and r["regime"] == "full"]) for m in names
    }
    assert full["dvme"] > 0.9 and full["single:a"] > 0.9 and full["single:b"] < 0.8
    table = outputs["results_md"].read_text()
    assert "| dvme |" in table and "±" in table and "Best fold" in table
    summary = json.loads(outputs["results_summary"].read_text())
    assert summary["results"]["dvme/full"]["test_auc"]["mean"] == pytest.approx(full["dvme"], abs=1e-6)
    log = [json.loads(line) for line in outputs["train_log"].read_text().splitlines()]
    assert [r["iteration"] for r in log] == list(range(1, len(names) * 2 * 3 * 8 + 1))
    assert all(np.isfinite(r["loss"]) for r in log)
    for picture in ("attention_map", "tsne"):
        assert outputs[picture].is_file() and outputs[picture].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    attn = json.loads((tmp_path / "out" / "attention_map.json").read_text())
    matrix = np.array(attn["map"])
    assert attn["encoders"] == ["a", "b"] and matrix.shape == (2, 2)
    np.testing.assert_allclose(matrix.sum(1), 1.0, atol=1e-5)
    ckpt = torch.load(outputs["checkpoint"], weights_only=True)
    assert ckpt["regime"] == "full" and ckpt["embed_dims"] == {"a": 12, "b": 6}
    dvme = DVME(ckpt["embed_dims"], proj_dim=4, num_classes=3)
    dvme.load_state_dict(ckpt["model"])
    best_full = next(r for r in rows if r["model"] == "dvme" and r["regime"] == "full" and r["best_fold"] == "True")
    assert ckpt["fold"] == int(best_full["fold"]) and ckpt["test_auc"] == pytest.approx(float(best_full["test_auc"]))


def test_protocol_is_reproducible(tmp_path):
    a = _protocol(tmp_path / "a", models=["dvme"], regimes={"small": 9}, folds=2, max_epochs=3)
    b = _protocol(tmp_path / "b", models=["dvme"], regimes={"small": 9}, folds=2, max_epochs=3)
    a.run(), b.run()
    assert [r["test_auc"] for r in a.rows] == [r["test_auc"] for r in b.rows]
    assert a.rows[0]["test_auc"] != a.rows[1]["test_auc"] or a.rows[0]["val_loss"] != a.rows[1]["val_loss"]


def test_attention_map_averages_over_samples():
    torch.manual_seed(0)
    model = DVME({"a": 5, "b": 7, "c": 3}, proj_dim=4, num_classes=2).eval()
    feats = {"a": torch.randn(10, 5), "b": torch.randn(10, 7), "c": torch.randn(10, 3)}
    m = attention_map(model, feats, batch_size=4)
    assert m.shape == (3, 3)
    torch.testing.assert_close(m.sum(1), torch.ones(3))
    model(feats)
    torch.testing.assert_close(m, model.last_sample_attention_maps.mean(0))
    with pytest.raises(ValueError, match="no attention"):
        attention_map(DVME({"a": 5}, proj_dim=4, attention="none"), {"a": torch.randn(3, 5)})


def test_image_classifier_from_random_encoders():
    specs = [{"name": n, "backbone": b} for n, b in SMOKE_BACKBONES.items() if n != "mit"]
    net = DVMEImageClassifier(specs, num_classes=3, proj_dim=8, probe_size=32)
    assert net.embed_dims == {"resnet_bottleneck": 256, "resnet_basic": 64}
    assert all(not p.requires_grad for p in net.encoders.parameters())
    net.train()
    assert not any(m.training for m in net.encoders.modules())  # frozen encoders stay in eval mode
    out = net(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in net.head.parameters() if p.requires_grad)


def test_finetune_mode_trains_the_encoders(demo_datalist, tmp_path):
    """mode='finetune' (smoke size): the encoders' parameters are trained with the head (counted as trainable) and
    the usual outputs are written."""
    import monai

    from medssl.data.pipeline import loading_transforms
    from medssl.evaluation.dvme_protocol import write_random_encoders

    backbones = {n: SMOKE_BACKBONES[n] for n in ("resnet_basic", "resnet_bottleneck")}
    specs = write_random_encoders(tmp_path / "enc", backbones)
    transform = monai.transforms.Compose(
        loading_transforms(channels=1) + [monai.transforms.Resized(keys="image", spatial_size=[32, 32])])
    protocol = DVMEProtocol(specs, demo_datalist, tmp_path / "out", tmp_path / "ckpt", transform, mode="finetune",
                            regimes={"small": 6}, folds=1, models=["dvme"], max_epochs=1, batch_size=6, proj_dim=4,
                            max_items=12, image_size=32, encoder_lr_scale=1.0, lr=0.01)
    protocol.embed()  # the pictures use the frozen embeddings
    outputs = protocol.run()
    assert outputs["results_csv"].is_file() and outputs["tsne"].is_file()
    assert protocol.rows[0]["mode"] == "finetune" and protocol.rows[0]["num_params"] > 10_000  # encoders trained
    job_state = protocol.best_states[("dvme", "small")]
    assert job_state and not any(k.startswith("encoders.") for k in job_state)  # the saved head only
