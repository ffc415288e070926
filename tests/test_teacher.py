"""Teacher-student handlers: EMA teacher (momentum schedule, EMA math, resume, DDP), last-layer freezing,
per-parameter clipping, and the DINO weight-decay schedule with the existing CosineScheduleHandler."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from ignite.engine import Events
from two_processes import run_two_processes

from medssl.engines.checkpoint import CheckpointHandler
from medssl.engines.handlers import CosineScheduleHandler
from medssl.engines.teacher import (
    EMATeacherHandler,
    FreezeLastLayerHandler,
    PerParameterGradClipHandler,
    clip_gradients_per_parameter,
    ema_update_,
)
from medssl.engines.trainer import SSLTrainer
from medssl.losses.dino import DINOLoss
from medssl.methods.base import SSLMethod, build_param_groups
from medssl.networks.dino_head import DINOHead

IN_DIM, OUT_DIM = 4, 16


def make_network() -> nn.Module:
    return nn.Sequential(
        nn.Linear(IN_DIM, 8), nn.GELU(), DINOHead(8, OUT_DIM, hidden_dim=8, bottleneck_dim=4, n_layers=2)
    )


class ToyDistillation(SSLMethod):
    """Student and teacher (independently initialised) on two views; DINO loss; no BatchNorm (DDP == 1 process)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.student = make_network()
        self.teacher = make_network()
        self.loss = DINOLoss(OUT_DIM, teacher_temp=0.07)

    def training_step(self, batch):
        views = batch["views"]  # (B, 2, IN_DIM)
        stack = views.transpose(0, 1).reshape(-1, IN_DIM)  # view-major (2B, IN_DIM)
        with torch.no_grad():
            teacher_out = self.teacher(stack)
        return {"loss": self.loss(self.student(stack), teacher_out)}

    def parameter_groups(self, base_lr=None, weight_decay=None, no_decay_bias_norm=True):
        return build_param_groups(self.student.named_parameters(), base_lr, weight_decay, no_decay_bias_norm)


def make_batches(n: int, batch_size: int = 4, seed: int = 5) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"views": torch.randn(batch_size, 2, IN_DIM, generator=g, dtype=torch.float64)} for _ in range(n)]


def make_trainer(method, batches, handlers, max_epochs, optimizer=None, **kw) -> SSLTrainer:
    if optimizer is None:
        optimizer = torch.optim.AdamW(method.parameter_groups(weight_decay=0.04), lr=0.05)
    return SSLTrainer("cpu", max_epochs, batches, method, optimizer, handlers=handlers, **kw)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def expected_momentum(step: int, total: int, start: float = 0.996, end: float = 1.0) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * step / (total - 1))) / 2


# ---------------------------------------------------------------------------------------------- EMA teacher
def test_momentum_schedule_values():
    torch.set_num_threads(1)
    method = ToyDistillation().double()
    ema = EMATeacherHandler(method.student, method.teacher)
    trainer = make_trainer(method, make_batches(4), [ema], max_epochs=3)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(ema.momentum))
    trainer.run()
    total = 12
    assert seen == pytest.approx([expected_momentum(i, total) for i in range(total)], abs=1e-12)
    assert seen[0] == pytest.approx(0.996, abs=1e-12) and seen[-1] == pytest.approx(1.0, abs=1e-12)
    assert all(a < b for a, b in zip(seen, seen[1:]))
    assert trainer.state.scheduled_values["ema_momentum"] == pytest.approx(1.0)
    assert ema.updates == total
    # explicit total_iters: the schedule no longer depends on the run's length
    assert EMATeacherHandler(method.student, method.teacher, 0.9, 0.99, total_iters=3).schedule.total_iters == 3


def test_ema_math_after_k_steps_matches_manual():
    torch.set_num_threads(1)
    method = ToyDistillation().double()
    teacher_init, student_init = snapshot(method.teacher), snapshot(method.student)
    assert any(not torch.equal(teacher_init[k], student_init[k]) for k in student_init)
    ema = EMATeacherHandler(method.student, method.teacher, momentum_start=0.9, momentum_end=0.99)
    assert all(not p.requires_grad for p in method.teacher.parameters())
    trainer = make_trainer(method, make_batches(3), [ema], max_epochs=2)
    # fresh run: the teacher starts as a copy of the student
    assert all(torch.equal(method.teacher.get_parameter(k), v) for k, v in student_init.items())
    students, momenta = [], []

    def record(engine):
        students.append(snapshot(method.student))
        momenta.append(ema.momentum)

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    assert momenta == pytest.approx([expected_momentum(i, 6, 0.9, 0.99) for i in range(6)], abs=1e-12)
    manual = {k: v.clone() for k, v in student_init.items()}
    for m, student in zip(momenta, students):
        manual = {k: m * manual[k] + (1 - m) * student[k] for k in manual}
    teacher = snapshot(method.teacher)
    for k in manual:
        torch.testing.assert_close(teacher[k], manual[k], atol=1e-12, rtol=1e-12, msg=k)
        assert not torch.equal(teacher[k], students[-1][k]) or k.endswith("weight_g")  # lags behind the student
    assert all(p.grad is None for p in method.teacher.parameters())
    # the teacher is not optimised
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in method.teacher.parameters()}


def test_ema_only_after_optimizer_steps_with_accumulation():
    torch.set_num_threads(1)
    method = ToyDistillation().double()
    ema = EMATeacherHandler(method.student, method.teacher)
    trainer = make_trainer(method, make_batches(4), [ema], max_epochs=1, accumulate_grad_batches=2)
    updates = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: updates.append(ema.updates))
    trainer.run()
    assert updates == [0, 1, 1, 2]


def test_ema_update_function_and_validation():
    teacher = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])]
    student = [torch.tensor([3.0, 6.0]), torch.tensor([[0.0]])]
    ema_update_(teacher, student, 0.75)
    torch.testing.assert_close(teacher[0], torch.tensor([1.5, 3.0]))
    torch.testing.assert_close(teacher[1], torch.tensor([[3.0]]))
    with pytest.raises(ValueError, match="different parameters"):
        EMATeacherHandler(nn.Linear(2, 2), nn.Linear(2, 2, bias=False))
    with pytest.raises(ValueError, match="shape"):
        EMATeacherHandler(nn.Linear(2, 2), nn.Linear(2, 3))
    with pytest.raises(ValueError, match="momentum_start"):
        EMATeacherHandler(nn.Linear(2, 2), nn.Linear(2, 2), momentum_start=1.5)
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="same module"):
        EMATeacherHandler(nn.DataParallel(net), net)


def test_ema_unwraps_a_wrapped_student_and_saves_the_teacher():
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    ema = EMATeacherHandler(nn.DataParallel(student), teacher)
    assert ema.student is student
    before = snapshot(teacher)
    ema.update(0.5)
    for k, v in snapshot(teacher).items():
        torch.testing.assert_close(v, 0.5 * before[k] + 0.5 * student.get_parameter(k).detach())
    other = nn.Linear(3, 2)
    EMATeacherHandler(nn.Linear(3, 2), other).load_state_dict(ema.state_dict())
    assert torch.equal(other.weight, teacher.weight)


@pytest.mark.parametrize("ema_first", [True, False])
def test_resume_gives_the_same_teacher(tmp_path, ema_first):
    torch.set_num_threads(1)
    batches = make_batches(3)

    def run(ckpt_dir, resume, stop_after_epoch=None):
        method = ToyDistillation().double()
        ema = EMATeacherHandler(method.student, method.teacher)
        optimizer = torch.optim.AdamW(method.parameter_groups(weight_decay=0.04), lr=0.05)
        ckpt = CheckpointHandler(ckpt_dir, {"method": method, "optimizer": optimizer}, resume=resume)
        # EMA first: on a resume it copies the student at attach (iteration still 0), then the checkpoint overwrites
        # the teacher; checkpoint first: the iteration is already restored and the EMA handler copies nothing
        handlers = [ema, ckpt] if ema_first else [ckpt, ema]
        trainer = make_trainer(method, batches, handlers, max_epochs=4, optimizer=optimizer)
        if stop_after_epoch:
            trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after_epoch), lambda e: e.terminate())
        trainer.run()
        return method, trainer, ckpt

    straight, _, _ = run(tmp_path / "straight", False)
    first, t1, _ = run(tmp_path / "resumed", False, stop_after_epoch=2)
    assert t1.state.iteration == 6
    resumed, t2, ckpt = run(tmp_path / "resumed", True)
    assert ckpt.resumed_from is not None and t2.state.iteration == 12
    for k, v in snapshot(straight.teacher).items():
        torch.testing.assert_close(resumed.teacher.get_parameter(k), v, atol=1e-12, rtol=1e-12, msg=k)
    torch.testing.assert_close(resumed.loss.center, straight.loss.center, atol=1e-12, rtol=1e-12)
    assert not torch.equal(first.teacher.get_parameter("0.weight"), straight.teacher.get_parameter("0.weight"))


def _ddp_worker(rank, world_size, batches):
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    local = [{"views": b["views"][2 * rank : 2 * rank + 2]} for b in batches]  # this rank's half of each batch
    method = ToyDistillation().double()
    ema = EMATeacherHandler(method.student, method.teacher)
    trainer = make_trainer(method, local, [ema, FreezeLastLayerHandler("last_layer")], max_epochs=2)
    assert isinstance(trainer.network, DistributedDataParallel)
    trainer.run()
    out = {"teacher": snapshot(method.teacher), "student": snapshot(method.student), "center": method.loss.center}
    # a DDP-wrapped student given to the handler is unwrapped
    torch.manual_seed(1)
    net, teacher = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    handler = EMATeacherHandler(DistributedDataParallel(net), teacher)
    before = snapshot(teacher)
    handler.update(0.25)
    ema_ok = all(
        torch.allclose(teacher.get_parameter(k), 0.25 * v + 0.75 * net.get_parameter(k)) for k, v in before.items()
    )
    out["wrapped_ok"] = torch.tensor(handler.student is net and ema_ok)
    return out


@pytest.mark.distributed
def test_two_process_teacher_equals_one_process_teacher(tmp_path):
    batches = make_batches(3)
    results = run_two_processes(tmp_path, _ddp_worker, batches)
    method = ToyDistillation().double()
    ema = EMATeacherHandler(method.student, method.teacher)
    make_trainer(method, batches, [ema, FreezeLastLayerHandler("last_layer")], max_epochs=2).run()
    for r, res in enumerate(results):
        assert bool(res["wrapped_ok"])
        for name, module in (("teacher", method.teacher), ("student", method.student)):
            for k, v in snapshot(module).items():
                torch.testing.assert_close(res[name][k], v, atol=1e-10, rtol=1e-8, msg=f"rank {r} {name} {k}")
        torch.testing.assert_close(res["center"], method.loss.center, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------------------------- freeze last layer
@pytest.mark.parametrize("target", ["last_layer", "student.2.last_layer", "module"])
def test_freeze_last_layer_during_first_epoch(target):
    torch.set_num_threads(1)
    method = ToyDistillation().double()
    last = method.student[2].last_layer
    layer = last if target == "module" else target
    freeze = FreezeLastLayerHandler(layer, n_epochs=1)
    trainer = make_trainer(method, make_batches(3), [freeze], max_epochs=2)
    expected = [last.weight_g, last.weight_v]
    if target == "last_layer":  # as the reference's substring test: the teacher's last layer too (it has no grads)
        expected += [method.teacher[2].last_layer.weight_g, method.teacher[2].last_layer.weight_v]
        assert freeze.param_names == [
            "student.2.last_layer.weight_g",
            "student.2.last_layer.weight_v",
            "teacher.2.last_layer.weight_g",
            "teacher.2.last_layer.weight_v",
        ]
    assert [id(p) for p in freeze.params] == [id(p) for p in expected]
    initial = last.weight_v.detach().clone()
    other_initial = method.student[0].weight.detach().clone()
    history = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: history.append((e.state.epoch, last.weight_v.detach().clone(), freeze.dropped_last)),
    )
    trainer.run()
    for epoch, weight_v, dropped in history:
        if epoch == 1:
            assert dropped and torch.equal(weight_v, initial)  # no update, no weight decay during epoch 1
        else:
            assert not dropped
    assert not torch.equal(history[3][1], initial)  # the first step of epoch 2 updates it
    assert not torch.equal(history[4][1], history[3][1])
    assert not torch.equal(method.student[0].weight, other_initial)  # the rest trained all along


def test_freeze_last_layer_errors():
    method = ToyDistillation()
    trainer = make_trainer(method, make_batches(2), [], max_epochs=1)
    with pytest.raises(ValueError, match="matches 'prototypes'"):
        FreezeLastLayerHandler("prototypes").attach(trainer)
    with pytest.raises(ValueError, match="matches 'layer'"):  # whole dotted components only
        FreezeLastLayerHandler("layer").attach(trainer)
    with pytest.raises(ValueError, match="n_epochs"):
        FreezeLastLayerHandler("last_layer", n_epochs=-1)
    assert FreezeLastLayerHandler("last_layer", n_epochs=0).frozen(1) is False
    from ignite.engine import Engine

    with pytest.raises(ValueError, match="BACKWARD_COMPLETED"):
        FreezeLastLayerHandler("last_layer", method=method).attach(Engine(lambda e, b: None))


# ---------------------------------------------------------------------------------------------- clipping
def test_clip_gradients_per_parameter():
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(2))
    c = nn.Parameter(torch.zeros(2))  # no gradient
    a.grad = torch.tensor([3.0, 0.0, 4.0])  # norm 5 -> clipped to 0.3
    b.grad = torch.tensor([0.1, 0.1])  # norm 0.141 -> unchanged
    norms = clip_gradients_per_parameter([a, b, c], 0.3)
    torch.testing.assert_close(norms, torch.tensor([5.0, math.sqrt(0.02)]))
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 0.0, 4.0]) * 0.3 / (5.0 + 1e-6))
    torch.testing.assert_close(b.grad, torch.tensor([0.1, 0.1]))
    assert c.grad is None


def test_per_parameter_clip_handler_in_the_trainer():
    torch.set_num_threads(1)
    method = ToyDistillation().double()
    clip = PerParameterGradClipHandler(1e-3)
    trainer = make_trainer(method, make_batches(4), [clip], max_epochs=1, accumulate_grad_batches=2)
    norms_after = []

    def check(engine):  # runs after the handler (attached later), before the optimiser step
        if clip.last_norms is not None and engine.state.iteration % 2 == 0:
            norms_after.append(max(p.grad.norm().item() for p in clip.params if p.grad is not None))

    from monai.engines.utils import IterationEvents

    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, check)
    calls = []
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, lambda e: calls.append(clip.last_norms))
    trainer.run()
    assert calls[0] is None  # the first batch of an accumulation window is not clipped
    assert len(norms_after) == 2 and max(norms_after) <= 1e-3 * (1 + 1e-9)
    assert clip.last_norms.max().item() > 1e-3  # there was something to clip
    with pytest.raises(ValueError, match="clip_grad_norm"):
        make_trainer(ToyDistillation(), make_batches(2), [PerParameterGradClipHandler(0.3)], 1, clip_grad_norm=1.0)


# ---------------------------------------------------------------------------------------------- weight decay
def test_dino_weight_decay_cosine_with_the_existing_handler():
    """The DINO / UniMiSS recipe's weight decay 0.04 -> 0.4 (cosine, per iteration) is CosineScheduleHandler on the
    optimiser with param_name="weight_decay": the decayed group follows it, the no-decay group stays at 0."""
    torch.set_num_threads(1)
    method = ToyDistillation().double()
    optimizer = torch.optim.AdamW(method.parameter_groups(base_lr=0.01, weight_decay=0.04))
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay"]
    wd = CosineScheduleHandler(optimizer, 0.04, 0.4, param_name="weight_decay")
    trainer = make_trainer(method, make_batches(3), [wd], max_epochs=3, optimizer=optimizer)
    seen = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append([g["weight_decay"] for g in optimizer.param_groups])
    )
    trainer.run()
    total = 9
    expected = [0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi * i / (total - 1))) / 2 for i in range(total)]
    assert [d for d, _ in seen] == pytest.approx(expected, abs=1e-12)
    assert seen[0][0] == pytest.approx(0.04) and seen[-1][0] == pytest.approx(0.4)
    assert all(n == 0.0 for _, n in seen)
    # the fixed weight-norm gain of the DINO head is in no group (not trainable)
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(method.student[2].last_layer.weight_g) not in grouped
