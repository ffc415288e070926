"""BestModelState: the best-so-far record of MONAI's key-metric CheckpointSaver travels in medssl's resumable
checkpoint, so a resumed downstream run does not overwrite models/model.pt with a worse network at its first
validation (issue #18 item 4: the downstream bundles validate with MONAI's ValidationHandler + CheckpointSaver)."""

from __future__ import annotations

import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

from medssl.engines.checkpoint import BestModelState, CheckpointHandler, load_checkpoint


def _validation(net: nn.Module, out, score: float, best: BestModelState | None = None, state=None):
    """One 'validation' epoch of an evaluator whose key metric is ``score``; model.pt is saved when it is the best."""
    evaluator = Engine(lambda engine, batch: None)
    evaluator.state.key_metric_name = "val_acc"

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _metric(engine):
        engine.state.metrics["val_acc"] = score

    saver = CheckpointSaver(str(out), {"model": net}, save_key_metric=True, key_metric_filename="model.pt")
    saver.attach(evaluator)
    holder = BestModelState(saver, evaluator)
    if state is not None:
        holder.load_state_dict(state)
    evaluator.run([0], max_epochs=1)
    return holder


def _weights(out) -> torch.Tensor:
    return torch.load(out / "model.pt", weights_only=True)["weight"]


def test_a_resumed_run_keeps_the_best_network(tmp_path):
    net = nn.Linear(2, 1, bias=False)
    nn.init.constant_(net.weight, 1.0)
    first = _validation(net, tmp_path, 0.8)
    assert torch.equal(_weights(tmp_path), torch.ones(1, 2))
    state = first.state_dict()

    nn.init.constant_(net.weight, 2.0)  # training went on; the process died; a new process resumes with `state`
    _validation(net, tmp_path, 0.5, state=state)  # worse: model.pt keeps the 0.8 network
    assert torch.equal(_weights(tmp_path), torch.ones(1, 2))
    _validation(net, tmp_path, 0.9, state=state)  # better: replaced
    assert torch.equal(_weights(tmp_path), torch.full((1, 2), 2.0))

    nn.init.constant_(net.weight, 3.0)  # without the record (what MONAI's saver alone does) the worse one wins
    _validation(net, tmp_path, 0.5)
    assert torch.equal(_weights(tmp_path), torch.full((1, 2), 3.0))


def test_the_record_round_trips_through_a_medssl_checkpoint(tmp_path):
    net = nn.Linear(2, 1, bias=False)
    holder = _validation(net, tmp_path / "models", 0.7)
    handler = CheckpointHandler(tmp_path / "ckpt", objects={"best_model": holder, "net": net}, save_every_iters=1)
    trainer = Engine(lambda engine, batch: {"loss": torch.tensor(0.0)})
    handler.attach(trainer)
    trainer.run([0], max_epochs=1)
    saved = load_checkpoint(sorted((tmp_path / "ckpt").glob("*.pt"))[-1])
    assert saved["best_model"]["checkpoint"]["_saved"][0][0] == 0.7

    # an older checkpoint without the entry resumes with a warning instead of failing
    del saved["best_model"]
    older = tmp_path / "older.pt"
    torch.save(saved, older)
    fresh = CheckpointHandler(tmp_path / "ckpt2", objects={"best_model": holder, "net": net})
    fresh.load(trainer, older)
