"""medssl.evaluation.metrics and medssl.evaluation.cache."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from medssl.evaluation.cache import cached_embeddings, encoder_fingerprint
from medssl.evaluation.metrics import classification_metrics, segmentation_case_metrics, write_metric_reports


def test_classification_metrics_against_definitions():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.1, 0.7, 0.2], [0.2, 0.6, 0.2], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    m = classification_metrics(probs, labels, class_names=["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # one-vs-rest AUC of class a: positives {0.8, 0.4} vs negatives {0.1, 0.2, 0.1, 0.5}: 7 of 8 pairs ordered
    assert m["auc/a"] == pytest.approx(7 / 8)
    assert m["auc_macro"] == pytest.approx(np.mean([m["auc/a"], m["auc/b"], m["auc/c"]]))
    # unweighted kappa from the confusion matrix: p_o = 4/6, p_e = sum(row * col) / 36
    pred = probs.argmax(1)
    p_e = sum((labels == k).sum() * (pred == k).sum() for k in range(3)) / 36
    assert m["kappa"] == pytest.approx((4 / 6 - p_e) / (1 - p_e))
    ordinal = classification_metrics(probs, labels, ordinal=True)
    assert ordinal["kappa"] != pytest.approx(m["kappa"])  # quadratic weights count the 2-grade error more


def test_binary_and_multilabel_and_errors():
    m = classification_metrics(torch.tensor([0.9, 0.2, 0.6, 0.3]), torch.tensor([1, 0, 0, 1]))
    assert m["auc_macro"] == pytest.approx(0.75) and m["accuracy"] == pytest.approx(0.5)
    ml = classification_metrics(np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.6]]), np.array([[1, 0], [0, 1], [1, 1]]),
                                multi_label=True)
    assert ml["accuracy"] == pytest.approx(1.0) and "kappa" not in ml
    assert math.isnan(ml["auc/0"]) is False
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        classification_metrics(np.full((2, 3), 1 / 3), np.array([0, 3]))
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        classification_metrics(np.full((3, 3), 1 / 3), np.array([0, 1]))


def test_segmentation_case_metrics():
    label = torch.zeros(1, 20, 20, dtype=torch.long)
    label[0, 2:8, 2:8] = 1
    pred = label.clone()
    pred[0, 2:8, 2:5] = 0  # half of class 1 predicted
    m = segmentation_case_metrics(pred, label, class_names=["background", "organ", "absent"])
    assert m["dice/organ"] == pytest.approx(2 * 18 / (18 + 36))
    assert m["iou/organ"] == pytest.approx(18 / 36)
    assert m["hd95/organ"] == pytest.approx(3.0)
    assert math.isnan(m["dice/absent"]) and math.isnan(m["hd95/absent"])
    assert m["dice_mean"] == pytest.approx(m["dice/organ"])  # NaN classes left out of the mean
    with pytest.raises(ValueError, match="must both be"):
        segmentation_case_metrics(torch.zeros(3, 4, 4), torch.zeros(3, 5, 5), class_names=["b", "x", "y"])


def test_write_metric_reports(tmp_path):
    rows = [{"case": "a", "dice": 0.5}, {"case": "b", "dice": float("nan"), "hd95": 2.0}]
    csv_path, json_path = write_metric_reports(rows, None, tmp_path, name="per_case")
    read = list(csv.DictReader(csv_path.open()))
    assert [r["case"] for r in read] == ["a", "b"] and read[0]["hd95"] == ""
    summary = json.loads(json_path.read_text())
    assert summary["dice"] == {"mean": 0.5, "std": 0.0, "median": 0.5, "count": 1}


class _Mean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([2.0]))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], 1) * self.scale


def test_cached_embeddings_second_call_reads_cache(tmp_path):
    items = [{"image": torch.full((1, 4, 4), float(i)), "label": i % 2, "modality": "XR"} for i in range(5)]
    for i, it in enumerate(items):
        it["image_id"] = f"img{i}"
    encoder = _Mean()
    kwargs = dict(cache_dir=tmp_path, encoder_id="mean", preprocessing={"size": 4}, batch_size=2)
    first = cached_embeddings(encoder, items, None, **kwargs)
    assert not first.from_cache and first.features.shape == (5, 2) and first.path.is_file()
    assert torch.equal(first.labels, torch.tensor([0, 1, 0, 1, 0]))
    calls = encoder.calls
    second = cached_embeddings(encoder, items, None, **kwargs)
    assert second.from_cache and encoder.calls == calls and torch.equal(second.features, first.features)
    # other preprocessing or other weights: another key, computed again
    third = cached_embeddings(encoder, items, None, **{**kwargs, "preprocessing": {"size": 8}})
    assert not third.from_cache and third.path != first.path
    fp = encoder_fingerprint(encoder)
    with torch.no_grad():
        encoder.scale.fill_(3.0)
    assert encoder_fingerprint(encoder) != fp
    fourth = cached_embeddings(encoder, items, None, **kwargs)
    assert not fourth.from_cache and torch.allclose(fourth.features, first.features * 1.5)


def test_fingerprint_handles_zero_dim_buffers():
    bn = nn.BatchNorm1d(3)  # num_batches_tracked is a 0-d tensor
    fp = encoder_fingerprint(bn)
    bn.num_batches_tracked += 1
    assert encoder_fingerprint(bn) != fp
