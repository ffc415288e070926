"""UniMiSS (Xie et al. 2022): the cross-dimensional self-distillation step, its volume-slice terms (Eq. 6), the gradient
routing of the 2D / 3D phases, the EMA teacher, and the paper's 2D / 3D views."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from medssl.methods.unimiss import UniMiSS, match_channels, volume_slices
from medssl.networks import mit_tiny
from medssl.transforms.unimiss_views import ByDimensiond, unimiss_views


class TwoPathStub(nn.Module):
    """A tiny 2D / 3D backbone: per-path conv + pooling, a shared linear layer (like MiT's shared blocks)."""

    paths = (2, 3)
    in_channels_2d, in_channels_3d = 3, 1
    feature_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(3, 5, 3, padding=1)
        self.conv3d = nn.Conv3d(1, 5, 3, padding=1)
        self.shared = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2d(x) if x.dim() == 4 else self.conv3d(x)
        return self.shared(torch.tanh(h).flatten(2).mean(-1))


def tiny_mit():
    return mit_tiny(dims=(8, 16, 32, 64), decoder_dims=(32, 16, 8), img_size_2d=64, img_size_3d=(64, 64, 16))


def naive_dino_pair(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, tau_s, tau_t):
    """½ (H(t₁, s₂) + H(t₂, s₁)) written out sample by sample; two views stacked view-major."""
    b = student.shape[0] // 2
    total = 0.0
    for t_view, s_view in ((0, 1), (1, 0)):
        for i in range(b):
            p_t = F.softmax((teacher[t_view * b + i] - center[0]) / tau_t, dim=-1)
            log_p_s = F.log_softmax(student[s_view * b + i] / tau_s, dim=-1)
            total = total + (-(p_t * log_p_s).sum()) / b
    return total / 2


def test_eight_cross_terms_equal_a_naive_computation():
    torch.manual_seed(0)
    method = UniMiSS(TwoPathStub(), out_dim=7, hidden_dim=8, bottleneck_dim=4).double()
    with torch.no_grad():  # a teacher different from the student, so that the terms differ
        for p in method.teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    views = [torch.randn(3, 1, 4, 5, 6, dtype=torch.float64) for _ in range(2)]
    out = method({"crops": views})

    stacked = torch.cat(views)
    with torch.no_grad():
        s_vol, t_vol = method.student(stacked), method.teacher(stacked)

        def slice_mean(net):  # every axial slice z (depth last), grey repeated to 3 channels, head outputs averaged
            outs = [net(stacked[..., z].repeat(1, 3, 1, 1)) for z in range(stacked.shape[-1])]
            return torch.stack(outs).mean(0)

        s_sl, t_sl = slice_mean(method.student), slice_mean(method.teacher)
        center = torch.zeros(1, 7, dtype=torch.float64)
        expected, terms = 0.0, []
        for a_s, b_t in ((s_vol, t_vol), (s_sl, t_vol), (s_vol, t_sl), (s_sl, t_sl)):
            term = naive_dino_pair(a_s, b_t, center, 0.1, 0.04)
            terms.append(float(term))
            expected = expected + term
            center = 0.9 * center + 0.1 * b_t.mean(0, keepdim=True)
    assert len(set(round(t, 6) for t in terms)) == 4  # the four pairs are different numbers
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-10)
    assert float(out["loss_volume"]) == pytest.approx(terms[0], rel=1e-10)
    assert float(out["loss_volume_slice"]) == pytest.approx(terms[1] + terms[2], rel=1e-10)
    assert float(out["loss_slice"]) == pytest.approx(terms[3], rel=1e-10)
    torch.testing.assert_close(method.loss.center, center)  # four centre updates, in the reference's order


def test_2d_step_is_the_symmetric_dino_loss_and_leaves_the_centre_updated_once():
    torch.manual_seed(1)
    method = UniMiSS(TwoPathStub(), out_dim=5, hidden_dim=8, bottleneck_dim=4).double()
    views = [torch.rand(4, 1, 6, 6, dtype=torch.float64) for _ in range(2)]
    out = method({"crops": views})
    stacked = torch.cat(views).repeat(1, 3, 1, 1)
    with torch.no_grad():
        s, t = method.student(stacked), method.teacher(stacked)
    expected = naive_dino_pair(s, t, torch.zeros(1, 5, dtype=torch.float64), 0.1, 0.04)
    assert list(out)[0] == "loss" and out["dim"] == 2.0
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-10)
    torch.testing.assert_close(method.loss.center, 0.1 * t.mean(0, keepdim=True))


@pytest.fixture(scope="module")
def mit_method():
    torch.manual_seed(0)
    return UniMiSS(tiny_mit(), out_dim=16, hidden_dim=16, bottleneck_dim=8, max_slices=3)


def _grads(method):
    return {n: p.grad for n, p in method.student.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dim", [2, 3])
def test_loss_finite_with_grads_and_the_other_path_gets_none(mit_method, dim):
    method = mit_method
    method.zero_grad(set_to_none=True)
    shape = (2, 1, 64, 64) if dim == 2 else (2, 1, 64, 64, 16)
    out = method({"crops": [torch.rand(shape), torch.rand(shape)]})
    assert math.isfinite(out["loss"].detach().item()) and out["loss"].requires_grad
    out["loss"].backward()
    grads = _grads(method)
    path = method.backbone.path_of
    for name, grad in grads.items():
        owner = path(name.removeprefix("backbone."))
        if dim == 2 and owner == 3:
            assert grad is None, f"3D-only parameter {name} got a gradient in a 2D step"
        else:  # shared, own path, head; in a 3D step the 2D path too (the slices)
            assert grad is not None and torch.isfinite(grad).all(), name
    assert any(path(n.removeprefix("backbone.")) == 3 for n in grads)
    assert all(p.grad is None for p in method.teacher.parameters())


def test_3d_only_step_without_slices_leaves_the_2d_path_without_gradient():
    torch.manual_seed(0)
    method = UniMiSS(tiny_mit(), out_dim=16, hidden_dim=16, bottleneck_dim=8, slice_consistency=False)
    shape = (1, 1, 64, 64, 16)
    out = method({"crops": [torch.rand(shape), torch.rand(shape)]})
    out["loss"].backward()
    owners = {n: method.backbone.path_of(n.removeprefix("backbone.")) for n in _grads(method)}
    assert all((g is None) == (owners[n] == 2) for n, g in _grads(method).items())


def test_ema_teacher_follows_the_student_through_the_trainer():
    from medssl.engines import EMATeacherHandler, SSLTrainer

    torch.manual_seed(0)
    method = UniMiSS(TwoPathStub(), out_dim=5, hidden_dim=8, bottleneck_dim=4)
    batches = [{"crops": [torch.rand(2, 1, 6, 6), torch.rand(2, 1, 6, 6)]}, {"crops": [torch.rand(2, 1, 4, 4, 4)] * 2}]
    optimizer = torch.optim.SGD(method.parameter_groups(), lr=0.5)
    ema = EMATeacherHandler(method.student, method.teacher, momentum_start=0.9, momentum_end=0.9)
    snapshots = []

    class Snapshot:
        def attach(self, engine):
            from ignite.engine import Events

            engine.add_event_handler(Events.ITERATION_STARTED, lambda e: snapshots.append(_state(method)))

    trainer = SSLTrainer("cpu", max_epochs=1, data_loader=batches, method=method, optimizer=optimizer,
                         handlers=[Snapshot(), ema])
    with torch.no_grad():  # the handler copies the student into the teacher at the start of a fresh run
        for p in method.teacher.parameters():
            p.add_(1.0)
    trainer.run()
    student, teacher = _state(method)
    s0, t0 = snapshots[-1]
    assert ema.updates == 2
    for name in student:
        torch.testing.assert_close(teacher[name], 0.9 * t0[name] + 0.1 * student[name])
    moved = [n for n in student if not torch.equal(student[n], s0[n])]
    assert moved, "the optimiser did not move the student"
    assert any(not torch.equal(teacher[n], student[n]) for n in moved)
    assert not any(p.requires_grad for p in method.teacher.parameters())
    assert all(id(p) not in {id(q) for q in method.teacher.parameters()} for g in optimizer.param_groups
               for p in g["params"])


def _state(method):
    return (
        {n: p.detach().clone() for n, p in method.student.named_parameters()},
        {n: p.detach().clone() for n, p in method.teacher.named_parameters()},
    )


def test_errors_name_the_problem():
    method = UniMiSS(TwoPathStub(), out_dim=5, hidden_dim=8, bottleneck_dim=4)
    with pytest.raises(ValueError, match="one dimension"):
        method({"crops": [torch.rand(2, 1, 6), torch.rand(2, 1, 6)]})
    with pytest.raises(ValueError, match="3 views"):
        method({"crops": [torch.rand(2, 1, 6, 6)] * 3})
    with pytest.raises(ValueError, match="2 channels"):
        method({"crops": [torch.rand(2, 2, 6, 6)] * 2})
    stub3d = TwoPathStub()
    stub3d.paths = (3,)
    with pytest.raises(ValueError, match="2D path"):
        UniMiSS(stub3d)



def test_head_batchnorm_option_reaches_student_and_teacher():
    """``use_bn`` (DINO's head option, off in UniMiSS) puts BatchNorm1d after the head's hidden layers of both networks;
    the command line's strings are read as booleans ("false" is off)."""
    def head_norms(method):
        nets = (method.student, method.teacher)
        return [sum(isinstance(m, nn.BatchNorm1d) for m in net.head.modules()) for net in nets]

    assert head_norms(UniMiSS(TwoPathStub(), out_dim=5, hidden_dim=8, bottleneck_dim=4)) == [0, 0]
    assert head_norms(UniMiSS(TwoPathStub(), out_dim=5, hidden_dim=8, bottleneck_dim=4, use_bn="false")) == [0, 0]
    method = UniMiSS(TwoPathStub(), out_dim=5, hidden_dim=8, bottleneck_dim=4, use_bn="true")
    assert head_norms(method) == [2, 2]
    out = method({"crops": [torch.rand(4, 1, 6, 6), torch.rand(4, 1, 6, 6)]})
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="use_bn"):
        UniMiSS(TwoPathStub(), out_dim=5, hidden_dim=8, bottleneck_dim=4, use_bn="maybe")

def test_volume_slices_and_channel_repeat():
    vol = torch.arange(2 * 1 * 2 * 3 * 5, dtype=torch.float32).reshape(2, 1, 2, 3, 5)
    slices, m = volume_slices(vol)
    assert m == 5 and slices.shape == (10, 1, 2, 3)
    torch.testing.assert_close(slices[1 * 5 + 3], vol[1, :, :, :, 3])
    picked, m = volume_slices(vol, max_slices=3)
    assert m == 3
    torch.testing.assert_close(picked[2], vol[0, :, :, :, 4])
    assert match_channels(torch.rand(2, 1, 4, 4), 3, "x").shape == (2, 3, 4, 4)


def test_views_2d_and_3d_shapes_and_reproducible():
    views = unimiss_views(n_views=2, size_2d=32, size_3d=(24, 24, 8))
    rng = torch.Generator().manual_seed(0)
    image = {"image": torch.rand(1, 50, 40, generator=rng), "modality": "XR"}
    volume = {"image": torch.rand(1, 30, 20, 12, generator=rng), "modality": "CT"}
    out2 = views.set_random_state(seed=5)(dict(image))["crops"]
    out3 = views(dict(volume))["crops"]
    assert [tuple(v.shape) for v in out2] == [(1, 32, 32)] * 2
    assert [tuple(v.shape) for v in out3] == [(1, 24, 24, 8)] * 2  # depth last, padded where the volume is smaller
    assert not torch.equal(out2[0], out2[1])
    again = views.set_random_state(seed=5)(dict(image))["crops"]
    assert all(torch.equal(a, b) for a, b in zip(out2, again))
    with pytest.raises(ValueError, match="2D"):
        ByDimensiond({3: lambda d: d})({"image": torch.rand(1, 4, 4)})


# ---------------------------------------------------------------------------------------------- 2 processes
def _ddp_worker(rank, world_size):
    torch.manual_seed(0)  # same initial weights on both ranks
    method = UniMiSS(TwoPathStub(), out_dim=5, hidden_dim=8, bottleneck_dim=4)
    ddp = nn.parallel.DistributedDataParallel(method, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(method.parameter_groups(), lr=0.1, weight_decay=0.5)
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own batch
    conv3d_before = method.student.backbone.conv3d.weight.detach().clone()
    out = {}
    for step, shape in enumerate([(2, 1, 6, 6), (2, 1, 4, 4, 4)]):
        optimizer.zero_grad(set_to_none=True)
        ddp({"crops": [torch.rand(shape, generator=g), torch.rand(shape, generator=g)]})["loss"].backward()
        out[f"grads{step}"] = {
            n: (None if p.grad is None else p.grad.clone()) for n, p in method.student.named_parameters()
        }
        optimizer.step()
        if step == 0:
            out["conv3d_after_2d"] = method.student.backbone.conv3d.weight.detach().clone()
    out["conv3d_before"] = conv3d_before
    return out


@pytest.mark.distributed
def test_two_process_ddp_leaves_the_other_path_untouched(tmp_path):
    from two_processes import run_two_processes

    results = run_two_processes(tmp_path, _ddp_worker)
    for res in results:
        grads_2d = res["grads0"]
        assert grads_2d["backbone.conv3d.weight"] is None and grads_2d["backbone.conv3d.bias"] is None
        assert grads_2d["backbone.conv2d.weight"] is not None and grads_2d["backbone.shared.weight"] is not None
        # AdamW's decoupled weight decay skips a parameter without a gradient: the 3D path is unchanged
        torch.testing.assert_close(res["conv3d_after_2d"], res["conv3d_before"], rtol=0, atol=0)
        assert res["grads1"]["backbone.conv3d.weight"] is not None  # 3D step: both paths (volume and slices)
    for step in ("grads0", "grads1"):  # DDP averaged: both ranks hold the same gradients
        for name, grad in results[0][step].items():
            other = results[1][step][name]
            assert (grad is None) == (other is None), name
            if grad is not None:
                torch.testing.assert_close(grad, other, msg=name)
