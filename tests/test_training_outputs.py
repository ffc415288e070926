"""Issue 14 item 5: what a user expects to see from a run. A tqdm progress bar with ETA on an interactive terminal
(plain log lines otherwise), the epoch metrics (kNN accuracy, validation metrics) as TensorBoard scalars and in
metrics_log.jsonl, and a PNG of the loss / kNN / validation curves at the end of every run."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from medssl.engines.handlers import TrainingLogHandler, plot_training_curves
from medssl.engines.trainer import SSLTrainer

import toy_training


class FakeKNN:
    """Sets engine.state.metrics like KNNMonitorHandler does, at each epoch end (attached after the log handler);
    the validation metric only at epoch 1 (a monitor that runs every few epochs leaves its last value there)."""

    def attach(self, engine):
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.update)

    @staticmethod
    def update(engine):
        engine.state.metrics["knn_acc"] = 0.25 * engine.state.epoch
        if engine.state.epoch == 1:
            engine.state.metrics["val_dice"] = 0.5


def _run(out: Path, log_handler: TrainingLogHandler, epochs: int = 2) -> SSLTrainer:
    from monai.data import DataLoader

    from medssl.data.samplers import DistributedBatchSampler

    dataset = toy_training.make_dataset(16)
    loader = DataLoader(dataset, batch_sampler=DistributedBatchSampler(len(dataset), 4, seed=0, drop_last=True))
    method = toy_training.ToyMethod()
    optimizer = torch.optim.SGD(method.parameters(), lr=1e-2)
    trainer = SSLTrainer(device="cpu", max_epochs=epochs, data_loader=loader, method=method, optimizer=optimizer,
                         handlers=[log_handler, FakeKNN()])
    trainer.run()
    return trainer


def test_epoch_metrics_reach_tensorboard_metrics_log_and_the_curves_png(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(tmp_path, TrainingLogHandler(tmp_path, progress_bar=False))
    records = [json.loads(line) for line in (tmp_path / "metrics_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # written after FakeKNN although attached before it
    assert [r["knn_acc"] for r in records] == [0.25, 0.5] and records[0]["val_dice"] == 0.5
    assert "val_dice" not in records[1]  # not evaluated again at epoch 2: not logged again
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"metrics/knn_acc", "metrics/val_dice", "loss"} <= set(tags), tags
    assert [s.value for s in events.Scalars("metrics/knn_acc")] == [0.25, 0.5]
    png = tmp_path / "curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_without_matplotlib_are_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with caplog.at_level(logging.WARNING):
        _run(tmp_path, TrainingLogHandler(tmp_path, progress_bar=False, tensorboard=False), epochs=1)
    assert not (tmp_path / "curves.png").exists()
    assert "matplotlib is not installed" in caplog.text
    assert (tmp_path / "train_log.jsonl").is_file()


def test_plot_training_curves_needs_a_loss(tmp_path):
    (tmp_path / "train_log.jsonl").write_text(json.dumps({"epoch": 1, "iteration": 1, "loss": "nan"}) + "\n")
    assert plot_training_curves(tmp_path / "train_log.jsonl", None, tmp_path / "c.png") is None


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bar_on_a_terminal_log_lines_otherwise(tmp_path, monkeypatch, capsys, caplog, tty):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty, raising=False)
    handler = TrainingLogHandler(tmp_path, print_every=1, tensorboard=False, curves=False)
    assert handler.uses_progress_bar() is tty
    with caplog.at_level(logging.INFO, logger="medssl.engines.handlers"):
        _run(tmp_path, handler, epochs=1)
    err = capsys.readouterr().err
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/1 iter")]
    if tty:
        # tqdm: the iteration of the epoch, the loss, elapsed<remaining (the ETA)
        assert re.search(r"train: \[\d/4\]", err) and "loss=" in err and re.search(r"\[\d\d:\d\d<", err), err
        assert not lines
    else:
        assert "train: [" not in err
        assert len(lines) == 4 and "eta" in lines[-1]
    assert any("epoch 1/1 done: mean loss" in r.getMessage() for r in caplog.records)


def test_tensorboard_holds_loss_knn_and_health_scalars_side_by_side(tmp_path):
    """A pretraining run's TensorBoard folder: the step scalars, the kNN accuracy (metrics/) and the health
    diagnostics HealthMonitorHandler writes (health/)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medssl.evaluation import HealthMonitorHandler

    import test_health

    torch.manual_seed(0)
    handlers = [TrainingLogHandler(tmp_path, progress_bar=False, curves=False), FakeKNN(),
                HealthMonitorHandler(output_dir=tmp_path)]
    method = test_health._method("swav", test_health.RandomConvBackbone())
    test_health._train(method, test_health._batches(3, modalities=("CT",)), handlers)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "metrics/knn_acc", "health/eff_rank", "health/emb_std_sqrt_d"} <= tags, tags
