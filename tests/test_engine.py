"""SSLTrainer, its handlers and checkpoint files: schedules, accumulation, clipping, NaN stop, atomic saves, AMP."""

from __future__ import annotations

import json
import logging
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from ignite.engine import Engine, Events

from medssl.engines import checkpoint as ckpt_mod
from medssl.engines.checkpoint import (
    FINAL_CHECKPOINT_NAME,
    CheckpointHandler,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from medssl.engines.handlers import CosineScheduleHandler, TerminateOnNanHandler, TrainingLogHandler
from medssl.engines.trainer import SSLTrainer, StepOutput, to_device
from medssl.methods.base import SSLMethod
from medssl.utils.io import atomic_torch_save

import toy_training


def toy_args(tmp_path, *extra: str):
    return toy_training.parse_args(["--out", str(tmp_path), *extra])


def build_toy(tmp_path, *extra: str, accumulate: int = 1) -> SSLTrainer:
    return toy_training.build_trainer(toy_args(tmp_path, *extra), tmp_path, accumulate)


def plain_toy(
    tmp_path, batch_size: int, num_items: int, optimizer_fn, handlers=(), accumulate: int = 1, **trainer_kw
) -> SSLTrainer:
    """A toy trainer without schedules / log / checkpoint handlers (constant lr), dropout off, shuffled batches."""
    from monai.data import DataLoader
    from monai.utils import set_determinism

    from medssl.data.samplers import DistributedBatchSampler

    torch.set_num_threads(1)
    set_determinism(seed=0)
    dataset = toy_training.make_dataset(num_items)
    sampler = DistributedBatchSampler(num_items, batch_size, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=0)
    method = toy_training.ToyMethod()
    return SSLTrainer(
        "cpu",
        trainer_kw.pop("max_epochs", 1),
        loader,
        method,
        optimizer_fn(method),
        accumulate_grad_batches=accumulate,
        handlers=list(handlers),
        **trainer_kw,
    )


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------ schedules
def expected_cosine(step, total, start, end, warmup, warmup_start):
    """Independent statement of the documented schedule."""
    if step < warmup:
        return warmup_start + (start - warmup_start) * step / warmup
    t = min(1.0, (step - warmup) / (total - 1 - warmup))
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def test_cosine_schedule_handler_values_per_group_and_attributes():
    p_decay, p_nodecay, p_scaled = (nn.Parameter(torch.zeros(2, 2)) for _ in range(3))
    optimizer = torch.optim.SGD(
        [
            {"params": [p_decay], "lr_scale": 0.5, "weight_decay": 0.1},
            {"params": [p_nodecay], "weight_decay": 0.0},  # a no-decay group: must stay at 0
            {"params": [p_scaled], "weight_decay": 0.1, "wd_scale": 2.0},
        ],
        lr=1.0,
    )
    ema = SimpleNamespace(momentum=0.0)
    buffers = nn.Module()
    buffers.register_buffer("temperature", torch.tensor(1.0))
    temperature_tensor = buffers.temperature
    handlers = [
        CosineScheduleHandler(optimizer, 1.0, 0.1, warmup_epochs=1, warmup_start_value=0.2),
        CosineScheduleHandler(optimizer, 0.04, 0.4, param_name="weight_decay"),
        CosineScheduleHandler(ema, 0.996, 1.0, param_name="momentum"),
        CosineScheduleHandler(buffers, 0.1, 0.04, warmup_iters=3, warmup_start_value=0.04, param_name="temperature"),
    ]
    seen = []

    def step(engine, batch):
        g = optimizer.param_groups
        seen.append(
            (
                g[0]["lr"],
                g[1]["lr"],
                g[0]["weight_decay"],
                g[1]["weight_decay"],
                g[2]["weight_decay"],
                ema.momentum,
                float(buffers.temperature),
            )
        )

    engine = Engine(step)
    for h in handlers:
        h.attach(engine)
    engine.run(range(5), max_epochs=2)  # T = 10 iterations, warm-up of lr = 1 epoch = 5 iterations
    assert len(seen) == 10
    for i, (lr0, lr1, wd0, wd1, wd2, momentum, temperature) in enumerate(seen):
        lr = expected_cosine(i, 10, 1.0, 0.1, 5, 0.2)
        wd = expected_cosine(i, 10, 0.04, 0.4, 0, 0.0)
        assert lr0 == pytest.approx(0.5 * lr) and lr1 == pytest.approx(lr)
        assert wd0 == pytest.approx(wd) and wd1 == 0.0 and wd2 == pytest.approx(2 * wd)
        assert momentum == pytest.approx(expected_cosine(i, 10, 0.996, 1.0, 0, 0.0))
        assert temperature == pytest.approx(expected_cosine(i, 10, 0.1, 0.04, 3, 0.04), rel=1e-6)
    # anchors: warm-up start, end of warm-up, last iteration
    assert seen[0][1] == pytest.approx(0.2) and seen[5][1] == pytest.approx(1.0) and seen[9][1] == pytest.approx(0.1)
    assert seen[0][5] == pytest.approx(0.996) and seen[9][5] == pytest.approx(1.0)
    assert buffers.temperature is temperature_tensor  # a tensor attribute is filled in place
    assert engine.state.scheduled_values["momentum"] == pytest.approx(1.0)

    # a pure function of the iteration: an engine restored at iteration 7 continues with the same values
    seen_before = list(seen)
    seen.clear()
    resumed = Engine(step)
    for h in handlers:
        h.attach(resumed)
    resumed.load_state_dict({"iteration": 7, "epoch_length": 5, "max_epochs": 2})
    resumed.run(range(5))
    assert seen == seen_before[7:]


def test_cosine_schedule_handler_errors():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="warmup_iters .* or warmup_epochs"):
        CosineScheduleHandler(opt, 1.0, 0.0, warmup_iters=2, warmup_epochs=1)
    with pytest.raises(AttributeError, match="no attribute 'tau'"):
        CosineScheduleHandler(SimpleNamespace(momentum=0.1), 1.0, 0.0, param_name="tau")


def test_parameter_groups_exclude_bias_and_norm_from_weight_decay():
    method = toy_training.ToyMethod()
    groups = method.parameter_groups(base_lr=0.1, weight_decay=0.05)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    decay, no_decay = groups
    names = {id(p): n for n, p in method.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["encoder.1.weight", "encoder.4.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "encoder.1.bias",
        "encoder.4.bias",
        "norm.bias",
        "norm.weight",
    ]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0 and no_decay["wd_scale"] == 0.0
    assert decay["lr"] == no_decay["lr"] == 0.1
    single = method.parameter_groups(no_decay_bias_norm=False)
    assert len(single) == 1 and len(single[0]["params"]) == len(list(method.parameters()))
    # the weight-decay schedule leaves the no-decay group at 0
    opt = torch.optim.AdamW(groups, lr=0.1)
    handler = CosineScheduleHandler(opt, 0.04, 0.4, param_name="weight_decay", total_iters=10)
    handler.apply(0.3)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.3) and opt.param_groups[1]["weight_decay"] == 0.0


def test_ssl_method_is_abstract_and_forward_is_training_step():
    with pytest.raises(TypeError):
        SSLMethod()  # training_step is abstract
    method = toy_training.ToyMethod()
    batch = {"view1": torch.rand(2, 1, 8, 8), "view2": torch.rand(2, 1, 8, 8), "modality": ["CT", "MR"]}
    torch.manual_seed(0)
    a = method(batch)
    torch.manual_seed(0)
    b = method.training_step(batch)
    assert list(a)[0] == "loss" and torch.equal(a["loss"], b["loss"])


# ------------------------------------------------------------------------------------------------ trainer
def test_accumulation_equals_one_big_batch(tmp_path):
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=1.0)  # noqa: E731 - lr 1: the step is minus the gradient
    big = plain_toy(tmp_path, batch_size=8, num_items=8, optimizer_fn=sgd)
    start = params_of(big.method)
    big.run()
    small = plain_toy(tmp_path, batch_size=4, num_items=8, optimizer_fn=sgd, accumulate=2)
    stepped = []
    small.add_event_handler(Events.ITERATION_COMPLETED, lambda e: stepped.append(e.state.optimizer_stepped))
    small.run()
    assert big.state.iteration == 1 and small.state.iteration == 2 and stepped == [False, True]
    for k, v in params_of(small.method).items():
        assert not torch.equal(v, start[k])
        torch.testing.assert_close(v, params_of(big.method)[k], rtol=1e-5, atol=1e-6)


def test_accumulation_windows_restart_each_epoch(tmp_path):
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    trainer = plain_toy(tmp_path, batch_size=2, num_items=6, optimizer_fn=sgd, accumulate=2, max_epochs=2)
    stepped = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: stepped.append(e.state.optimizer_stepped))
    trainer.run()
    assert stepped == [False, True, True] * 2  # 3 batches per epoch: windows of 2 and 1
    assert [trainer._accumulation_window(i)[1] for i in range(1, 4)] == [2, 2, 1]


def test_gradient_clipping_caps_the_norm(tmp_path):
    clip = 1e-3
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=1.0)  # noqa: E731
    trainer = plain_toy(tmp_path, batch_size=4, num_items=4, optimizer_fn=sgd, clip_grad_norm=clip)
    # the unclipped gradient of the same first batch
    reference = toy_training.ToyMethod()
    reference.load_state_dict(trainer.method.state_dict())
    sampler = trainer.data_loader.batch_sampler
    sampler.set_epoch(0)
    batch = next(iter(trainer.data_loader))
    reference.training_step(batch)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    total_norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    assert total_norm > 10 * clip
    before = {n: p.detach().clone() for n, p in trainer.method.named_parameters()}
    stepped_grads = {}
    names = {id(p): n for n, p in trainer.method.named_parameters()}
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: stepped_grads.update(
            {names[id(p)]: p.grad.clone() for g in opt.param_groups for p in g["params"]}
        )
    )
    trainer.run()
    assert trainer.state.output["grad_norm"] == pytest.approx(float(total_norm), rel=1e-5)
    for n, g in stepped_grads.items():  # the gradient the optimiser used: the unclipped one scaled to the cap
        torch.testing.assert_close(g, grads[n] * clip / total_norm, rtol=1e-4, atol=1e-12)
    deltas = {n: p.detach() - before[n] for n, p in trainer.method.named_parameters()}
    delta_norm = torch.sqrt(sum((d**2).sum() for d in deltas.values()))
    assert float(delta_norm) == pytest.approx(clip, rel=1e-3)


def test_output_is_a_step_output_readable_by_monai_handlers(tmp_path, capsys):
    from monai.handlers import StatsHandler, from_engine

    trainer = build_toy(tmp_path, "--epochs", "1")
    StatsHandler(name="toy_stats", iteration_log=True).attach(trainer)  # MONAI's defaults read output[0]
    sampler_epochs, hooks = [], []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: sampler_epochs.append(e.data_loader.batch_sampler.epoch)
    )
    method = trainer.method
    method.on_train_start = lambda e: hooks.append(("train", e.state.iteration))
    method.on_epoch_start = lambda e: hooks.append(("epoch", e.state.epoch))
    trainer.run()
    output = trainer.state.output
    assert isinstance(output, StepOutput) and isinstance(output, list) and list(output[0])[0] == "loss"
    assert list(output[0]) == ["loss", "align", "reg"]
    assert all(isinstance(v, float) for v in output[0].values())
    assert output["loss"] == output[0]["loss"] == from_engine(["loss"], first=True)(output)
    assert "Iter: 6/6 -- align: " in capsys.readouterr().out  # StatsHandler printed the dict of scalars
    assert hooks == [("train", 0), ("epoch", 1)]
    assert sampler_epochs == [0] * 6
    assert set(method.modalities_seen) == {"CT", "MR"}  # the list of str reached training_step unchanged


def test_sampler_epoch_and_hooks_over_epochs(tmp_path):
    trainer = build_toy(tmp_path, "--epochs", "2", "--num-items", "8")
    epochs, starts = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: epochs.append(e.data_loader.batch_sampler.epoch))
    trainer.method.on_epoch_start = lambda e: starts.append(e.state.epoch)
    trainer.run()
    assert epochs == [0, 0, 1, 1] and starts == [1, 2]


def test_training_log_jsonl_and_tensorboard(tmp_path):
    trainer = build_toy(tmp_path, "--epochs", "1")
    log = TrainingLogHandler(tmp_path / "tb_run", tensorboard=True)
    log.attach(trainer)
    trainer.run()
    lines = [json.loads(x) for x in (tmp_path / "tb_run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(1, 7))
    first = lines[0]
    assert list(first)[:3] == ["epoch", "iteration", "loss"]
    assert {"align", "reg", "lr", "weight_decay", "temperature", "time"} <= set(first)
    assert lines[-1]["lr"] == pytest.approx(trainer.optimizer.param_groups[0]["lr"])
    events = list((tmp_path / "tb_run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_prepare_batch_moves_tensors_only():
    from monai.data import MetaTensor

    batch = {"view1": MetaTensor(torch.ones(2, 1, 4, 4)), "modality": ["CT", "MR"], "dim": 2, "nested": [torch.ones(1)]}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["modality"] == ["CT", "MR"] and moved["dim"] == 2
    assert isinstance(moved["view1"], MetaTensor) and isinstance(moved["nested"][0], torch.Tensor)


def test_trainer_errors(tmp_path):
    class NoLoss(SSLMethod):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def training_step(self, batch):
            return {"total": self.w.sum()}

    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    trainer = plain_toy(tmp_path, batch_size=2, num_items=4, optimizer_fn=sgd)
    method = NoLoss()
    trainer.method = trainer.network = method
    with pytest.raises(TypeError, match="NoLoss.training_step must return a dict with a 'loss'"):
        trainer.run()
    with pytest.raises(ValueError, match="epoch_length=5 is larger than the data loader's 2 batches"):
        plain_toy(tmp_path, batch_size=2, num_items=4, optimizer_fn=sgd, epoch_length=5)


def test_amp_on_cpu_is_turned_off_and_the_autocast_paths_run(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        trainer = build_toy(tmp_path / "off", "--epochs", "1", "--amp", "--device", "cpu")
    assert "amp=True ignored on device cpu" in caplog.text
    assert trainer.amp is False and trainer.scaler is None
    trainer.run()
    assert math.isfinite(trainer.state.output["loss"])

    # bf16 autocast (CPU autocast exists; the trainer only enables it on CUDA, so force it here)
    trainer = build_toy(tmp_path / "bf16", "--epochs", "1", "--device", "cpu")
    trainer.amp, trainer.amp_dtype = True, torch.bfloat16
    dtypes = []
    trainer.method.encoder[1].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    before = params_of(trainer.method)
    trainer.run()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    after = params_of(trainer.method)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in after)

    # fp16 with a GradScaler (CUDA in real runs; torch has a CPU scaler) + clipping (unscale first); the scaler state
    # goes into the checkpoint and comes back on resume
    trainer = build_toy(tmp_path / "fp16", "--epochs", "1", "--clip", "1.0", "--device", "cpu")
    trainer.amp, trainer.amp_dtype = True, torch.float16
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer.run()
    assert math.isfinite(trainer.state.output["loss"]) and math.isfinite(trainer.state.output["grad_norm"])
    saved = load_checkpoint(tmp_path / "fp16" / "ckpt" / FINAL_CHECKPOINT_NAME)
    assert saved["scaler"]["scale"] == trainer.scaler.get_scale()
    restored = build_toy(tmp_path / "fp16_restored", "--epochs", "1", "--device", "cpu")
    restored.scaler = torch.amp.GradScaler("cpu")
    CheckpointHandler(tmp_path / "unused").load(restored, tmp_path / "fp16" / "ckpt" / FINAL_CHECKPOINT_NAME)
    assert restored.scaler.get_scale() == trainer.scaler.get_scale() and restored.state.iteration == 6
    with caplog.at_level(logging.WARNING):  # amp off (CPU): the saved scaler state is reported and ignored
        resumed = build_toy(tmp_path / "fp16", "--epochs", "2", "--resume", "--device", "cpu")
    assert resumed.scaler is None and resumed.state.iteration == 6 and "has a GradScaler state" in caplog.text


# ------------------------------------------------------------------------------------------------ NaN / checkpoints
def test_terminate_on_nan_keeps_the_last_good_checkpoint(tmp_path, caplog):
    # save every iteration: the CheckpointHandler is attached before TerminateOnNanHandler, yet nothing is saved for
    # the NaN iteration
    trainer = build_toy(tmp_path, "--nan-at", "5", "--save-every-iters", "1")
    with caplog.at_level(logging.INFO):
        trainer.run()
    ckpt_dir = tmp_path / "ckpt"
    good = ckpt_dir / "checkpoint_00000004.pt"
    assert trainer.state.iteration == 5 and trainer.state.nonfinite_loss["iteration"] == 5
    assert [it for it, _ in list_checkpoints(ckpt_dir)] == [2, 3, 4]
    assert not (ckpt_dir / FINAL_CHECKPOINT_NAME).exists()
    assert find_latest_checkpoint(ckpt_dir) == good
    message = next(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert "non-finite loss (nan) at epoch 1 iteration 5" in message and str(good) in message
    saved = load_checkpoint(good)
    assert saved["engine"]["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in saved["method"].values())
    log = toy_training.read_log(tmp_path / "train_log.jsonl")
    assert log[5]["loss"] == "nan" and math.isfinite(log[4]["loss"])


def test_terminate_on_nan_can_raise():
    engine = Engine(lambda e, b: StepOutput([{"loss": float("inf")}]))
    TerminateOnNanHandler(raise_error=True).attach(engine)
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(inf\) at epoch 1 iteration 1.*none"):
        engine.run(range(3))


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_00000001.pt"
    atomic_torch_save({"value": 1}, path)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")  # the process "dies" part-way through the write
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"value": 2}, path)
    with pytest.raises(OSError):
        atomic_torch_save({"value": 3}, tmp_path / "checkpoint_00000002.pt")
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_00000001.pt"]  # no temp file, no partial checkpoint
    assert load_checkpoint(path) == {"value": 1}


def test_failed_save_during_training_and_leftover_temp_file(tmp_path, monkeypatch):
    real_save = torch.save

    def save_failing_at_4(obj, f, *args, **kwargs):
        if "00000004" in getattr(f, "name", ""):
            f.write(b"partial")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", save_failing_at_4)
    trainer = build_toy(tmp_path, "--save-every-iters", "2")
    with pytest.raises(OSError, match="disk full"):
        trainer.run()
    ckpt_dir = tmp_path / "ckpt"
    assert sorted(os.listdir(ckpt_dir)) == ["checkpoint_00000002.pt"]
    # a temp file left by a process killed while writing is ignored, then removed when the next run attaches
    leftover = ckpt_dir / ".checkpoint_00000006.pt.tmp.99999"
    leftover.write_bytes(b"garbage")
    assert find_latest_checkpoint(ckpt_dir) == ckpt_dir / "checkpoint_00000002.pt"
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    resumed = build_toy(tmp_path, "--save-every-iters", "2", "--resume")
    assert not leftover.exists() and resumed.state.iteration == 2


def test_keep_last(tmp_path):
    trainer = build_toy(tmp_path, "--epochs", "1", "--save-every-iters", "1", "--keep-last", "2")
    trainer.run()
    ckpt_dir = tmp_path / "ckpt"
    assert sorted(os.listdir(ckpt_dir)) == ["checkpoint_00000005.pt", "checkpoint_00000006.pt", FINAL_CHECKPOINT_NAME]
    final = load_checkpoint(ckpt_dir / FINAL_CHECKPOINT_NAME)
    assert final["engine"] == {"iteration": 6, "epoch": 1, "epoch_length": 6, "max_epochs": 1}
    assert set(final) >= {"method", "optimizer", "scaler", "sampler", "rng", "world_size", "format"}
    assert final["sampler"] == {"epoch": 0, "seed": 0} and len(final["rng"]) == 1


def test_checkpoint_handler_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        CheckpointHandler(tmp_path, objects={"engine": nn.Linear(1, 1)})
    with pytest.raises(TypeError, match=r"objects\['x'\] \(int\) has no state_dict"):
        CheckpointHandler(tmp_path, objects={"x": 3})


def test_mlflow_tracking_handler_logs_the_loss(tmp_path):
    """What `monai.bundle run --tracking mlflow` attaches to a trainer: MLFlowHandler reading
    from_engine(['loss'], first=True)."""
    mlflow = pytest.importorskip("mlflow", reason="the optional tracking extra (pip install -e '.[tracking]')")
    from monai.handlers import MLFlowHandler, from_engine
    from monai.utils import path_to_sqlite_uri

    trainer = build_toy(tmp_path, "--epochs", "1")
    uri = path_to_sqlite_uri(str(tmp_path / "mlruns.db"))
    handler = MLFlowHandler(
        tracking_uri=uri,
        experiment_name="toy",
        iteration_log=True,
        epoch_log=True,
        tag_name="train_loss",
        output_transform=from_engine(["loss"], first=True),
        close_on_complete=True,
    )
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
    handler.attach(trainer)
    trainer.run()
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("toy").experiment_id])[0]
    history = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]
    assert history == pytest.approx(losses)


def test_sync_batchnorm_converts_in_place_on_cuda_runs_only():
    """sync_batchnorm: in a distributed CUDA run every BatchNorm becomes a SyncBatchNorm holding the same parameter
    objects (the optimiser built before keeps stepping them); one process, or a CPU run, is left as it is."""
    from medssl.engines.trainer import sync_batchnorm_layers

    def method():
        net = torch.nn.Module()
        net.backbone = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        net.head = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        return net

    m = method()
    weight = m.backbone[1].weight
    assert sync_batchnorm_layers(m, True, torch.device("cpu"), distributed=True) == 0
    assert sync_batchnorm_layers(m, True, torch.device("cuda"), distributed=False) == 0
    assert sync_batchnorm_layers(m, False, torch.device("cuda"), distributed=True) == 0
    assert isinstance(m.backbone[1], torch.nn.BatchNorm2d)
    assert sync_batchnorm_layers(m, True, torch.device("cuda"), distributed=True) == 2  # conversion only: no forward
    assert isinstance(m.backbone[1], torch.nn.SyncBatchNorm) and isinstance(m.head[1], torch.nn.SyncBatchNorm)
    assert m.backbone[1].weight is weight


def test_a_checkpoint_holds_the_state_after_every_handler_of_its_iteration(tmp_path):
    """A handler attached after the CheckpointHandler (an EMA teacher's update, listed after it in a config) still
    runs before the save: the periodic checkpoint of iteration i holds the state after iteration i's update."""
    net = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(net.weight)
    trainer = Engine(lambda engine, batch: {"loss": torch.tensor(0.0)})
    CheckpointHandler(tmp_path, objects={"net": net}, save_every_iters=1).attach(trainer)

    @trainer.on(Events.ITERATION_COMPLETED)
    def update(engine):  # attached after the checkpoint handler
        with torch.no_grad():
            net.weight.add_(1.0)

    trainer.run([0, 0, 0], max_epochs=1)
    for iteration, path in list_checkpoints(tmp_path):
        assert load_checkpoint(path)["net"]["weight"].item() == float(iteration), path.name
    assert len(list_checkpoints(tmp_path)) >= 1
