"""Collapse and health diagnostics (medssl.evaluation.health): the numbers on inputs whose answer is known, a
collapsed (constant) encoder reported as collapsed through the real training step and engine while a random one is
not, the handler leaving the training untouched, and every pretraining bundle config listing the handler (the SwAV
bundle's smoke run writing the health records and lines is checked in test_bundle_runs.py)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn as nn
from monai.bundle import ConfigParser

from conftest import BUNDLES
from medssl.engines import DeepClusterEpochHandler, SSLTrainer
from medssl.evaluation import health as health_module
from medssl.evaluation.health import (
    HealthMonitorHandler,
    collapse_verdict,
    distribution_entropy,
    effective_rank,
    embedding_std,
    health_line,
    usage_entropy,
)
from medssl.methods import DeepClusterV2, SwAV, UniMiSS
from medssl.networks.heads import PerModalityPrototypes, prototype_assignments


# --------------------------------------------------------------------------------------------- the numbers
def test_orthogonal_rows_have_full_rank_and_spread():
    d = 16
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    for z in (torch.eye(d), q, 3.0 * q):  # the scale of a row does not matter: rows are L2-normalised
        assert effective_rank(z) == pytest.approx(d, rel=1e-9)
    # identity rows: each dimension holds one 1 among d rows -> unbiased variance 1/d
    assert embedding_std(torch.eye(d)) == pytest.approx(1 / math.sqrt(d))
    # rows spread uniformly over the sphere: std * sqrt(D) close to 1
    z = torch.randn(4000, 32, generator=torch.Generator().manual_seed(1))
    assert embedding_std(z) * math.sqrt(32) == pytest.approx(1.0, abs=0.03)


def test_constant_rows_have_rank_one_and_no_spread():
    z = torch.tensor([[0.3, -1.0, 2.0, 0.5]]).repeat(50, 1)
    assert embedding_std(z) == pytest.approx(0.0, abs=1e-12)
    assert effective_rank(z) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.zeros(5, 4)) == 0.0  # no direction at all
    # two directions used equally -> rank 2; unequally -> between 1 and 2
    two = torch.cat([torch.eye(4)[:1].repeat(5, 1), torch.eye(4)[1:2].repeat(5, 1)])
    assert effective_rank(two) == pytest.approx(2.0)
    uneven = torch.cat([torch.eye(4)[:1].repeat(9, 1), torch.eye(4)[1:2]])
    assert 1.0 < effective_rank(uneven) < 2.0


def test_usage_entropy_of_uniform_and_collapsed_assignments():
    assert usage_entropy(torch.arange(40) % 8, 8) == (pytest.approx(1.0), 8)
    assert usage_entropy(torch.zeros(40, dtype=torch.long), 8) == (0.0, 1)
    # fewer rows than prototypes: 5 rows on 5 different prototypes is as spread as they can be
    assert usage_entropy(torch.tensor([0, 3, 5, 7, 9]), 100) == (pytest.approx(1.0), 5)
    # scores (N, K): the argmax is the assignment
    scores = torch.eye(6)[[0, 1, 1, 1]]
    entropy, used = usage_entropy(scores)
    assert used == 2 and entropy == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(4))
    assert math.isnan(usage_entropy(torch.tensor([2]), 8)[0])  # one row: no spread possible


def test_distribution_entropy():
    assert distribution_entropy(torch.full((3, 8), 1 / 8)) == pytest.approx(1.0)
    assert distribution_entropy(torch.eye(8)) == pytest.approx(0.0, abs=1e-12)
    assert distribution_entropy(torch.tensor([0.5, 0.5, 0.0, 0.0])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="K >= 2"):
        distribution_entropy(torch.ones(3, 1))


def test_per_modality_assignments_use_each_modality_prototypes():
    prototypes = PerModalityPrototypes(["CT", "XR"], feat_dim=4, n_prototypes=3)
    with torch.no_grad():
        prototypes["CT"].heads[0].weight.copy_(torch.eye(4)[:3])
        prototypes["XR"].heads[0].weight.copy_(torch.eye(4)[[3, 2, 1]])
    z = torch.eye(4)[[0, 1, 3, 3]]
    out = prototype_assignments(z, prototypes, ["CT", "CT", "XR", "CT"])
    assert out["assignments"].tolist() == [0, 1, 0, 0] and out["n_prototypes"] == 3
    assert out["groups"] == ["CT", "CT", "XR", "CT"]


def test_prediction_probs_are_the_tempered_softmax_of_each_rows_own_prototypes():
    prototypes = PerModalityPrototypes(["CT", "XR"], feat_dim=4, n_prototypes=3)
    with torch.no_grad():
        prototypes["CT"].heads[0].weight.copy_(torch.eye(4)[:3])
        prototypes["XR"].heads[0].weight.copy_(torch.eye(4)[[3, 2, 1]])
    z = torch.eye(4)[[0, 3, 3]]
    out = prototype_assignments(z, prototypes, ["CT", "XR", "CT"], temperature=0.1)
    expected = torch.softmax(torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 0, 0]]) / 0.1, dim=1)
    assert torch.allclose(out["prediction_probs"], expected)
    assert "prediction_probs" not in prototype_assignments(z, prototypes, ["CT", "XR", "CT"])


def test_uniform_predictions_are_reported_collapsed_even_with_spread_embeddings():
    """SwAV's trivial solution: the embeddings still spread, but every prediction is uniform (loss = ln K)."""
    handler = HealthMonitorHandler()
    z = torch.nn.functional.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    for _ in range(3):
        handler.update({"embeddings": z, "assignments": torch.arange(64) % 8, "n_prototypes": 8,
                        "prediction_probs": torch.full((64, 8), 1 / 8)})
    record = handler.compute()
    assert record["emb_std_sqrt_d"] > 0.3 and record["prediction_entropy"] == pytest.approx(1.0)
    assert record["verdict"] == "collapsed" and "uniform prototype predictions" in record["reasons"][0]
    assert "prediction entropy 1.00" in health_line(dict(record, epoch=1, at="epoch"))
    handler = HealthMonitorHandler()
    sharp = torch.nn.functional.one_hot(torch.arange(64) % 8, 8).float() * 0.9 + 0.1 / 8
    handler.update({"embeddings": z, "assignments": torch.arange(64) % 8, "n_prototypes": 8, "prediction_probs": sharp})
    assert handler.compute()["verdict"] == "ok"


def test_verdict_thresholds():
    healthy = {"emb_std_sqrt_d": 0.8, "eff_rank": 40.0, "n_rows": 512, "dim": 128, "usage_entropy": 0.9}
    assert collapse_verdict(healthy) == ("ok", [])
    verdict, reasons = collapse_verdict(dict(healthy, emb_std_sqrt_d=0.05))
    assert verdict == "collapsed" and "std" in reasons[0]
    assert collapse_verdict(dict(healthy, eff_rank=1.3))[0] == "collapsed"
    assert collapse_verdict(dict(healthy, eff_rank=1.3, n_rows=4))[0] == "n/a"  # too few rows to judge a rank
    assert collapse_verdict(dict(healthy, emb_std_sqrt_d=0.2))[0] == "warning"
    assert collapse_verdict(dict(healthy, usage_entropy=0.1))[0] == "warning"
    assert collapse_verdict(dict(healthy, rank_bound=128))[0] == "ok"  # 40 of 128 directions
    verdict, reasons = collapse_verdict(dict(healthy, eff_rank=5.5, rank_bound=64))  # one direction per modality
    assert verdict == "warning" and reasons == ["effective rank 5.5 of 64: few directions used (dimensional collapse)"]
    usage = {"XR": {"used": 1, "n_prototypes": 30, "rows": 64}, "CT": {"used": 9, "n_prototypes": 30, "rows": 64}}
    verdict, reasons = collapse_verdict(dict(healthy, prototype_usage=usage))
    assert verdict == "collapsed" and reasons == ["one prototype takes all 64 rows of XR"]
    teacher = dict(healthy, teacher_dim=1000, teacher_entropy=0.5, teacher_mean_entropy=0.8)
    assert collapse_verdict(teacher)[0] == "ok"
    assert collapse_verdict(dict(teacher, teacher_entropy=0.999))[0] == "collapsed"  # uniform teacher output
    assert collapse_verdict(dict(teacher, teacher_mean_entropy=0.05))[0] == "collapsed"  # one dimension for all
    assert collapse_verdict(dict(healthy, prediction_entropy=0.8))[0] == "ok"
    verdict, reasons = collapse_verdict(dict(healthy, prediction_entropy=0.995))  # SwAV loss at ln K
    assert verdict == "collapsed" and reasons[0].startswith("uniform prototype predictions")
    assert collapse_verdict({"emb_std_sqrt_d": float("nan")})[0] == "ok"  # missing numbers are not judged
    verdict, reasons = collapse_verdict({"emb_std_sqrt_d": 0.01, "eff_rank": 1.0, "n_rows": 4, "dim": 128})
    assert verdict == "n/a" and "only 4 rows" in reasons[0]
    line = health_line(dict(healthy, epoch=3, at="epoch", verdict="collapsed", reasons=["x"], knn={"knn_acc": 0.5}))
    assert line.startswith("epoch 3 health: emb std*sqrt(D) 0.80, eff. rank 40.0/128") and "knn_acc 0.5000" in line
    assert line.endswith("-- COLLAPSED (x)")


# --------------------------------------------------------------------------------------------- through the engine
class ConstantBackbone(nn.Module):
    """A collapsed encoder: one learnable feature vector for every input, whatever the image."""

    paths = (2,)

    def __init__(self, feature_dim: int = 8) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.value = nn.Parameter(torch.randn(feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], -1)


class RandomConvBackbone(nn.Module):
    """A small randomly initialised encoder whose features depend on the image."""

    paths = (2,)

    def __init__(self, feature_dim: int = 8) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))


def _batches(n: int, b: int = 16, seed: int = 0, modalities: tuple[str, ...] = ("CT",)) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n):
        patterns = torch.rand(b, 1, 3, 3, generator=g)  # each image its own coarse pattern, two noisy views of it
        crops = [patterns.repeat_interleave(4, 2).repeat_interleave(4, 3) for _ in range(2)]
        crops = [c + 0.1 * torch.rand(c.shape, generator=g) for c in crops]
        modality = [modalities[j % len(modalities)] for j in range(b)]
        batches.append({"crops": crops, "modality": modality, "index": torch.arange(b) + i * b})
    return batches


def _method(name: str, backbone: nn.Module) -> nn.Module:
    if name == "swav":
        return SwAV(backbone, feat_dim=8, hidden_dim=16, n_prototypes=10, crops_for_assign=(0, 1))
    if name == "swav_per_modality":
        return SwAV(backbone, feat_dim=8, hidden_dim=16, n_prototypes=10, per_modality_prototypes=True,
                    modalities=["CT", "XR"])
    if name == "deepcluster":
        return DeepClusterV2(backbone, dataset_size=48, feat_dim=8, hidden_dim=16, n_prototypes=(10, 10))
    return UniMiSS(backbone, out_dim=32, hidden_dim=16, bottleneck_dim=8, slice_consistency=False)


def _train(method: nn.Module, batches: list[dict], handlers: list, epochs: int = 2) -> SSLTrainer:
    if isinstance(method, DeepClusterV2):
        handlers = [DeepClusterEpochHandler(n_iters=3), *handlers]  # k-means at each epoch start, bank emptied
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05)
    engine = SSLTrainer("cpu", epochs, batches, method, optimizer, handlers=handlers)
    engine.run()
    return engine


@pytest.mark.parametrize("name", ["swav", "swav_per_modality", "deepcluster", "unimiss"])
def test_constant_encoder_is_reported_collapsed_and_a_random_one_is_not(name, tmp_path, caplog):
    batches = _batches(3, modalities=("CT", "XR") if name == "swav_per_modality" else ("CT",))
    torch.manual_seed(0)
    collapsed = HealthMonitorHandler(output_dir=tmp_path / "collapsed")
    with caplog.at_level(logging.INFO, logger="medssl.evaluation.health"):
        _train(_method(name, ConstantBackbone()), batches, [collapsed])
    lines = [json.loads(x) for x in (tmp_path / "collapsed" / "health.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and [r["verdict"] for r in lines] == ["collapsed", "collapsed"]
    assert lines[-1]["emb_std_sqrt_d"] < 0.01 and lines[-1]["n_rows"] == 3 * 16  # one row per item
    assert lines[-1]["eff_rank"] == 0.0  # no spread in any direction
    assert sum("health:" in m and "COLLAPSED" in m for m in caplog.messages) == 2
    assert list((tmp_path / "collapsed" / "tensorboard").glob("events.out.tfevents.*"))

    torch.manual_seed(0)
    healthy = HealthMonitorHandler(output_dir=tmp_path / "healthy")
    engine = _train(_method(name, RandomConvBackbone()), batches, [healthy])
    record = engine.state.health
    assert record["verdict"] != "collapsed", record
    assert record["emb_std_sqrt_d"] > 0.3 and record["eff_rank"] > 2.0
    if name == "unimiss":
        assert {"teacher_entropy", "teacher_mean_entropy", "center_entropy"} <= set(record)
        assert 0.0 <= record["teacher_entropy"] <= 1.0 and record["teacher_dim"] == 32
    else:
        assert record["protos_used"] >= 2 and record["assigned_rows"] == 3 * 16
        assert 0.0 < record["prediction_entropy"] <= 1.0
        if name == "swav_per_modality":
            assert set(record["prototype_usage"]) == {"CT", "XR"} and record["n_prototypes"] == 20


def test_the_handler_changes_nothing_in_training(tmp_path):
    """No random numbers drawn, no state touched: the same run with and without the handler gives the same
    parameters bit for bit (what a resumed run's exactness relies on)."""
    finals = []
    for handlers in ([], [HealthMonitorHandler(output_dir=tmp_path, every_n_iters=2)]):
        torch.manual_seed(0)
        method = _method("swav", RandomConvBackbone())
        _train(method, _batches(3), handlers)
        finals.append({k: v.clone() for k, v in method.state_dict().items() if isinstance(v, torch.Tensor)})
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    records = [json.loads(x) for x in (tmp_path / "health.jsonl").read_text().splitlines()]
    reports = [(r["at"], r["iteration"]) for r in records]
    assert reports == [("iteration", 2), ("epoch", 3), ("iteration", 4), ("epoch", 6)]


def test_rows_are_bounded_and_other_ranks_do_nothing(monkeypatch):
    handler = HealthMonitorHandler(max_rows=50)
    for _ in range(3):
        handler.update({"embeddings": torch.randn(100, 4)})
    # drift between steps is not spread: three steps of identical rows, each step at another point
    drifting = HealthMonitorHandler()
    for step in range(3):
        drifting.update({"embeddings": torch.eye(4)[step].repeat(10, 1)})
    assert drifting.compute()["emb_std_sqrt_d"] == 0.0 and drifting.compute()["verdict"] == "collapsed"
    record = handler.compute()
    assert record["n_rows"] == 300 and record["rank_bound"] == 4 and record["steps"] == 3
    assert sum(d.shape[0] for d in handler._deviations) == 50
    monkeypatch.setattr(health_module, "is_main_process", lambda: False)
    engine = SSLTrainer("cpu", 1, _batches(1), _method("swav", RandomConvBackbone()),
                        torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))
    before = {event: len(engine._event_handlers[event]) for event in list(engine._event_handlers)}
    HealthMonitorHandler().attach(engine)
    assert {event: len(engine._event_handlers[event]) for event in list(engine._event_handlers)} == before


# --------------------------------------------------------------------------------------------- the bundles
PRETRAIN_CONFIGS = [
    ("ssl_swav_multimodal_pretrain", ["train.json"]),
    ("ssl_swav_multimodal_pretrain", ["train.json", "train_3d.json"]),
    ("ssl_swav_multimodal_pretrain", ["train.json", "deepcluster_v2.json"]),
    ("ssl_swav_multimodal_pretrain", ["train.json", "demo.json"]),
    ("ssl_unimiss_pretrain", ["train.json"]),
    ("ssl_unimiss_pretrain", ["train.json", "demo.json"]),
    ("ssl_joint_image_volume_pretrain", ["train.json"]),
    ("ssl_joint_image_volume_pretrain", ["train.json", "deepcluster_v2.json"]),
    ("ssl_joint_image_volume_pretrain", ["train.json", "demo.json"]),
    ("ssl_joint_image_volume_pretrain", ["train.json", "train_stage1.json"]),
    ("ssl_joint_image_volume_pretrain", ["train.json", "train_stage2.json"]),
    ("ssl_joint_image_volume_pretrain", ["train.json", "train_stage3.json"]),
]


@pytest.mark.parametrize("bundle, configs", PRETRAIN_CONFIGS, ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_every_pretraining_config_lists_the_health_monitor(bundle, configs):
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / c) for c in configs])
    handlers = parser.get("train#handlers")
    targets = [h.get("_target_") for h in handlers if isinstance(h, dict)]
    assert "medssl.evaluation.HealthMonitorHandler" in targets, targets
    # after the kNN monitor, so that this epoch's kNN accuracy joins the health line
    assert targets.index("medssl.evaluation.HealthMonitorHandler") > max(
        i for i, h in enumerate(handlers) if isinstance(h, dict) and h.get("handlers") == "@knn#handlers"
    )
