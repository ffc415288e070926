"""DINOLoss (spec toy values, naive double loop, centring, temperatures, 2-process centre) and the DINO head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Engine
from two_processes import run_two_processes

from medssl.engines.handlers import CosineScheduleHandler
from medssl.losses.dino import DINOLoss
from medssl.networks.dino_head import DINOHead, WeightNormLinear


def spec_toy() -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's toy inputs: i = 0..127 reshaped (8, 16); rows 0..3 view 1, rows 4..7 view 2."""
    i = torch.arange(128, dtype=torch.float64)
    s = (2 * torch.sin(0.37 * i + 0.1)).reshape(8, 16)
    t = (2 * torch.sin(0.23 * i + 0.7)).reshape(8, 16)
    return s, t


def naive_dino_loss(student, teacher, center, n_views, n_teacher_views, student_temp, teacher_temp):
    """Independent statement: loop over teacher views t, student views v ≠ t, samples b, and classes k."""
    batch = student.shape[0] // n_views
    total, terms = 0.0, 0
    for t in range(n_teacher_views):
        for v in range(n_views):
            if t == v:
                continue
            pair = 0.0
            for b in range(batch):
                q = torch.softmax((teacher[t * batch + b] - center[0]) / teacher_temp, dim=0)
                log_p = torch.log_softmax(student[v * batch + b] / student_temp, dim=0)
                pair = pair + sum(-q[k] * log_p[k] for k in range(student.shape[1]))
            total = total + pair / batch
            terms += 1
    return total / terms


# ---------------------------------------------------------------------------------------------- spec values
def test_spec_toy_values():
    s, t = spec_toy()
    loss_fn = DINOLoss(16, student_temp=0.1, teacher_temp=0.04, center_momentum=0.9, n_views=2).double()
    assert torch.count_nonzero(loss_fn.center) == 0
    first = loss_fn(s, t)
    assert abs(first.item() - 22.777508) < 1e-5
    # after the call: C = 0.1 · mean over the rows of t
    torch.testing.assert_close(loss_fn.center, 0.1 * t.mean(dim=0, keepdim=True), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        loss_fn.center[0, :3], torch.tensor([0.018378, 0.020504, 0.021550], dtype=torch.float64), atol=1e-6, rtol=0
    )
    second = loss_fn(s, t)
    assert abs(second.item() - 22.782098) < 1e-5


def test_equals_naive_double_loop_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    for n_views, n_teacher_views in ((2, 2), (4, 2), (3, 3)):
        batch, k = 3, 7
        student = torch.randn(n_views * batch, k, generator=g, dtype=torch.float64, requires_grad=True)
        teacher = torch.randn(n_teacher_views * batch, k, generator=g, dtype=torch.float64, requires_grad=True)
        center = torch.randn(1, k, generator=g, dtype=torch.float64)
        loss_fn = DINOLoss(k, 0.2, 0.05, 0.8, n_views=n_views, n_teacher_views=n_teacher_views).double()
        loss_fn.center.copy_(center)
        loss = loss_fn(student, teacher, update_center=False)
        assert loss_fn.n_loss_terms == n_views * n_teacher_views - min(n_views, n_teacher_views)

        student_ref = student.detach().clone().requires_grad_(True)
        expected = naive_dino_loss(student_ref, teacher.detach(), center, n_views, n_teacher_views, 0.2, 0.05)
        torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-12)
        loss.backward()
        expected.backward()
        torch.testing.assert_close(student.grad, student_ref.grad, atol=1e-12, rtol=1e-10)
        assert teacher.grad is None  # no gradient through the teacher
        torch.testing.assert_close(loss_fn.center, center)  # update_center=False


def test_center_update_formula_and_state_dict():
    g = torch.Generator().manual_seed(1)
    loss_fn = DINOLoss(5, center_momentum=0.7).double()
    c0 = torch.randn(1, 5, generator=g, dtype=torch.float64)
    loss_fn.center.copy_(c0)
    center_tensor = loss_fn.center
    teacher = torch.randn(6, 5, generator=g, dtype=torch.float64)
    student = torch.randn(6, 5, generator=g, dtype=torch.float64)
    loss_fn(student, teacher)
    expected = 0.7 * c0 + 0.3 * teacher.mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected, atol=1e-12, rtol=0)
    assert loss_fn.center is center_tensor  # updated in place (DDP keeps references to buffers)
    # the loss of a call uses the centre from before that call's update
    before = loss_fn.center.clone()
    value = loss_fn(student, teacher)
    manual = naive_dino_loss(student, teacher, before, 2, 2, loss_fn.student_temp, loss_fn.teacher_temp)
    torch.testing.assert_close(value, manual, atol=1e-12, rtol=1e-12)
    # the centre is saved and restored with the state dict (resume)
    restored = DINOLoss(5, center_momentum=0.7).double()
    restored.load_state_dict(loss_fn.state_dict())
    assert list(loss_fn.state_dict()) == ["center"]
    torch.testing.assert_close(restored.center, loss_fn.center)


def test_teacher_temperature_attribute_and_scheduled_warmup():
    s, t = spec_toy()
    loss_fn = DINOLoss(16).double()
    for temp in (0.04, 0.07):
        loss_fn.teacher_temp = temp
        value = loss_fn(s, t, update_center=False)
        expected = naive_dino_loss(s, t, loss_fn.center, 2, 2, 0.1, temp)
        torch.testing.assert_close(value, expected, atol=1e-10, rtol=1e-10)

    # DINO's warm-up 0.04 -> 0.07 (linear over the first epochs, then constant) with the cosine handler:
    # start_value = end_value = 0.07, warmup_start_value = 0.04
    loss_fn = DINOLoss(16).double()
    schedule = CosineScheduleHandler(
        loss_fn, 0.07, 0.07, warmup_epochs=2, warmup_start_value=0.04, param_name="teacher_temp"
    )
    epoch_length, max_epochs = 4, 4
    seen: list[tuple[float, float]] = []

    def step(engine, _):
        value = loss_fn(s, t, update_center=False)
        seen.append((loss_fn.teacher_temp, value.item()))

    engine = Engine(step)
    schedule.attach(engine)
    engine.run(range(epoch_length), max_epochs=max_epochs)
    warmup = 2 * epoch_length
    temps = [temp for temp, _ in seen]
    expected_temps = [0.04 + 0.03 * i / warmup if i < warmup else 0.07 for i in range(epoch_length * max_epochs)]
    assert temps == pytest.approx(expected_temps, abs=1e-12)
    assert engine.state.scheduled_values["teacher_temp"] == pytest.approx(0.07)
    # the loss used the scheduled temperature at every step
    for temp, value in seen[:: epoch_length - 1]:
        expected = naive_dino_loss(s, t, loss_fn.center, 2, 2, 0.1, temp).item()
        assert value == pytest.approx(expected, abs=1e-9)


def test_half_precision_inputs_empty_batch_and_errors():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(8, 16, generator=g).bfloat16().requires_grad_(True)
    teacher = torch.randn(8, 16, generator=g).bfloat16()
    loss_fn = DINOLoss(16)
    loss = loss_fn(student, teacher)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss_fn.center.dtype == torch.float32
    expected = naive_dino_loss(student.float(), teacher.float(), torch.zeros(1, 16), 2, 2, 0.1, 0.04)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad.float()).all()

    empty = torch.zeros(0, 16, requires_grad=True)
    before = loss_fn.center.clone()
    zero = loss_fn(empty, torch.zeros(0, 16))
    assert zero.item() == 0.0 and zero.requires_grad
    torch.testing.assert_close(loss_fn.center, before)  # no row anywhere: the centre is unchanged

    with pytest.raises(ValueError, match="teacher_out needs"):
        loss_fn(torch.zeros(8, 16), torch.zeros(6, 16))
    with pytest.raises(ValueError, match="not a multiple"):
        loss_fn(torch.zeros(7, 16), torch.zeros(8, 16))
    with pytest.raises(ValueError, match=r"\(n_views·B, 16\)"):
        loss_fn(torch.zeros(8, 15), torch.zeros(8, 16))
    with pytest.raises(ValueError, match="no pair"):
        DINOLoss(16, n_views=1)
    with pytest.raises(ValueError, match="temperatures"):
        DINOLoss(16, teacher_temp=0.0)


# ---------------------------------------------------------------------------------------------- 2 processes
def _center_worker(rank, world_size, student, teacher, rows_per_rank):
    out = {}
    for name, rows in rows_per_rank.items():
        loss_fn = DINOLoss(16).double()
        views_s, views_t = student.reshape(2, 8, 16), teacher.reshape(2, 8, 16)
        mine = rows[rank]
        local_s = views_s[:, mine].reshape(-1, 16)
        local_t = views_t[:, mine].reshape(-1, 16)
        first = loss_fn(local_s, local_t)
        second = loss_fn(local_s, local_t)
        out[name] = {"center": loss_fn.center.clone(), "first": first.detach(), "second": second.detach()}
    return out


@pytest.mark.distributed
def test_two_process_center_equals_one_process_center(tmp_path):
    g = torch.Generator().manual_seed(3)
    student = torch.randn(16, 16, generator=g, dtype=torch.float64)  # 2 views x B=8
    teacher = 3 * torch.randn(16, 16, generator=g, dtype=torch.float64)
    rows_per_rank = {"equal": [list(range(4)), list(range(4, 8))], "uneven": [[0, 1, 2], [3, 4, 5, 6, 7]]}
    results = run_two_processes(tmp_path, _center_worker, student, teacher, rows_per_rank)

    whole = DINOLoss(16).double()
    first = whole(student, teacher)
    second = whole(student, teacher)
    for name in rows_per_rank:
        for r in range(2):
            torch.testing.assert_close(results[r][name]["center"], whole.center, atol=1e-12, rtol=1e-12, msg=name)
    # equal shares: the mean of the ranks' losses is the one-process loss (first call and after one centre update)
    for key, expected in (("first", first), ("second", second)):
        mean = (results[0]["equal"][key] + results[1]["equal"][key]) / 2
        torch.testing.assert_close(mean, expected.detach(), atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------- DINO head
# The reference head's state-dict keys and shapes (spec unimiss_reference_keys.json, "dino_head")
REFERENCE_HEAD = {
    "mlp.0.weight": (2048, 48),
    "mlp.0.bias": (2048,),
    "mlp.2.weight": (2048, 2048),
    "mlp.2.bias": (2048,),
    "mlp.4.weight": (256, 2048),
    "mlp.4.bias": (256,),
    "last_layer.weight_g": (65536, 1),
    "last_layer.weight_v": (65536, 256),
}


def test_dino_head_parameter_counts_and_reference_keys():
    head = DINOHead(48)  # UniMiSS: 48 -> 2048 -> 2048 -> 256 -> 65536
    assert sum(p.numel() for p in head.parameters()) == 21_664_000
    assert sum(p.numel() for p in head.parameters() if p.requires_grad) == 21_598_464
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == REFERENCE_HEAD
    assert not head.last_layer.weight_g.requires_grad
    torch.testing.assert_close(head.last_layer.weight_g, torch.ones(65536, 1))
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    assert all(torch.count_nonzero(head.mlp[i].bias) == 0 for i in (0, 2, 4))
    assert head.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)  # truncated normal, std 0.02


def test_dino_head_forward_and_fixed_gain():
    torch.manual_seed(0)
    head = DINOHead(6, out_dim=10, hidden_dim=12, bottleneck_dim=4).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    # manual: MLP (Linear, GELU, Linear, GELU, Linear), L2 normalise, W = v / ||v|| (rows)
    h = head.mlp[4](F.gelu(head.mlp[2](F.gelu(head.mlp[0](x)))))
    z = h / h.norm(dim=1, keepdim=True)
    v = head.last_layer.weight_v
    expected = z @ (v / v.norm(dim=1, keepdim=True)).T
    out = head(x)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert out.abs().max() <= 1 + 1e-12  # cosine similarities
    # leading dimensions (N, m, in_dim): the m slices of volumes
    torch.testing.assert_close(head(x.reshape(5, 1, 6)).reshape(5, 10), out, atol=1e-12, rtol=1e-12)

    # training v changes W but its rows stay unit-norm (gain fixed at 1); g gets no update
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.5)
    head(x).pow(2).sum().backward()
    assert head.last_layer.weight_v.grad is not None and head.last_layer.weight_g.grad is None
    w_before = head.last_layer.weight.detach().clone()
    optimizer.step()
    w_after = head.last_layer.weight.detach()
    assert not torch.allclose(w_before, w_after)
    torch.testing.assert_close(w_after.norm(dim=1), torch.ones(10, dtype=torch.float64), atol=1e-12, rtol=0)

    free = WeightNormLinear(4, 3, fix_gain=False)
    assert free.weight_g.requires_grad
    free(torch.randn(2, 4)).sum().backward()
    assert free.weight_g.grad is not None
    assert DINOHead(6, out_dim=10, norm_last_layer=False).last_layer.weight_g.requires_grad

    single = DINOHead(6, out_dim=10, bottleneck_dim=4, n_layers=1)
    assert [type(m) for m in single.mlp] == [nn.Linear] and single(torch.randn(3, 6)).shape == (3, 10)
    with pytest.raises(ValueError, match=r"features \(\.\.\., 6\)"):
        head(torch.randn(5, 7, dtype=torch.float64))


def test_dino_head_with_batchnorm_on_slices():
    head = DINOHead(6, out_dim=10, hidden_dim=12, bottleneck_dim=4, use_bn=True)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == 2
    x = torch.randn(3, 4, 6)  # (N, m slices, in_dim): BatchNorm over the N·m rows
    out = head(x)
    assert out.shape == (3, 4, 10)
    torch.testing.assert_close(out.reshape(12, 10), head(x.reshape(12, 6)))
    assert math.isfinite(out.sum().item())
