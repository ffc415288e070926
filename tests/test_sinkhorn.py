"""medssl.losses.sinkhorn_knopp: spec toy values, marginals, numerics, and 2-process (gloo) == 1-process codes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medssl.utils import dist as _dist
from medssl.losses.sinkhorn import sinkhorn_knopp

from two_processes import run_two_processes


def toy_scores() -> torch.Tensor:
    """The spec's toy problem (float64): z (8, 32), C (10, 32), rows L2-normalised, scores = z · Cᵀ."""

    def rows(n: int, d: int, a: float, b: float) -> torch.Tensor:
        i = torch.arange(n * d, dtype=torch.float64)
        return F.normalize((2 * torch.sin(a * i + b)).reshape(n, d), dim=1)

    return rows(8, 32, 0.11, 0.3) @ rows(10, 32, 0.07, 1.1).T


def reference_sinkhorn(scores: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """The spec's formula, literally, in the (K × B) layout, one process, no stabilisation."""
    q = torch.exp(scores.double() / eps).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(n_iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.T


@pytest.mark.parametrize("eps, expected", [(0.05, [0.711838, 0, 0, 0.279131]), (0.03, [0.763187, 0, 0, 0.236343])])
def test_spec_toy_values(eps, expected):
    codes = sinkhorn_knopp(toy_scores(), epsilon=eps, n_iters=3)
    assert codes.dtype == torch.float64
    assert codes.shape == (8, 10)
    torch.testing.assert_close(codes[0, :4], torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)


def test_matches_literal_formula_and_rows_sum_to_one():
    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(24, 16, generator=g, dtype=torch.float64), dim=1) @ F.normalize(
        torch.randn(7, 16, generator=g, dtype=torch.float64), dim=1
    ).T
    for eps, iters in [(0.05, 3), (0.03, 3), (0.1, 1), (0.05, 10)]:
        codes = sinkhorn_knopp(scores, epsilon=eps, n_iters=iters)
        torch.testing.assert_close(codes, reference_sinkhorn(scores, eps, iters), atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(codes.sum(dim=1), torch.ones(24, dtype=torch.float64), atol=1e-12, rtol=0)


def test_equal_partition_with_many_iterations():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(30, 5, generator=g, dtype=torch.float64) * 2 - 1
    codes = sinkhorn_knopp(scores, epsilon=0.05, n_iters=200)
    # every prototype receives B / K of the mass over the batch
    torch.testing.assert_close(codes.sum(dim=0), torch.full((5,), 30 / 5, dtype=torch.float64), atol=1e-6, rtol=0)


def test_no_grad_and_input_untouched():
    scores = toy_scores().float().requires_grad_(True)
    before = scores.detach().clone()
    codes = sinkhorn_knopp(scores, epsilon=0.05)
    assert not codes.requires_grad
    assert codes.dtype == torch.float32
    assert torch.equal(scores.detach(), before)


def test_large_scores_do_not_overflow():
    """Unnormalised scores: exp(50/0.03) overflows even float64 without the global-max shift."""
    scores = toy_scores() * 50
    codes = sinkhorn_knopp(scores, epsilon=0.03)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(8, dtype=torch.float64), atol=1e-9, rtol=0)
    # shift invariance: a constant added to every score gives the same codes
    torch.testing.assert_close(sinkhorn_knopp(scores - 7.0, epsilon=0.03), codes, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_under_autocast_give_float32(dtype):
    half_scores = toy_scores().to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = sinkhorn_knopp(half_scores, epsilon=0.03, n_iters=3)
    assert codes.dtype == torch.float32
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(8), atol=1e-5, rtol=0)
    # the same as running on the (rounded) scores in float64
    expected = reference_sinkhorn(half_scores.double(), 0.03, 3).float()
    torch.testing.assert_close(codes, expected, atol=1e-4, rtol=1e-3)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="scores must be"):
        sinkhorn_knopp(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="non-finite"):
        sinkhorn_knopp(torch.tensor([[0.0, float("nan")]]))


# ---------------------------------------------------------------------------------------------- 2 processes


def _sinkhorn_worker(rank, world_size, scores, splits):
    out = {"world_size": _dist.get_world_size(), "rank": _dist.get_rank()}
    for name, (n0, eps) in splits.items():
        local = scores[:n0] if rank == 0 else scores[n0:]
        out[name] = sinkhorn_knopp(local, epsilon=eps, n_iters=3)
    # helpers: variable-size gather, gather with autograd
    out["gathered"] = _dist.all_gather_cat(torch.arange(3 + rank, dtype=torch.float64))
    x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
    weights = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    (_dist.all_gather_with_grad(x) * weights).sum().backward()
    out["grad"] = x.grad
    return out


@pytest.mark.distributed
def test_two_processes_equal_one_process(tmp_path):
    g = torch.Generator().manual_seed(3)
    scores = F.normalize(torch.randn(12, 16, generator=g, dtype=torch.float64), dim=1) @ F.normalize(
        torch.randn(9, 16, generator=g, dtype=torch.float64), dim=1
    ).T
    splits = {"halves": (6, 0.05), "halves_eps003": (6, 0.03), "uneven": (7, 0.05), "rank1_empty": (12, 0.05)}
    results = run_two_processes(tmp_path, _sinkhorn_worker, scores, splits)
    assert [r["world_size"] for r in results] == [2, 2] and [r["rank"] for r in results] == [0, 1]
    for name, (n0, eps) in splits.items():
        whole = sinkhorn_knopp(scores, epsilon=eps, n_iters=3)
        torch.testing.assert_close(results[0][name], whole[:n0], atol=1e-12, rtol=1e-10, msg=name)
        torch.testing.assert_close(results[1][name], whole[n0:], atol=1e-12, rtol=1e-10, msg=name)
    expected_gather = torch.tensor([0, 1, 2, 0, 1, 2, 3], dtype=torch.float64)
    weights = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    for r, res in enumerate(results):
        assert torch.equal(res["gathered"], expected_gather)
        # both ranks compute the same loss on the gathered batch: this rank's slice gets world_size × its weights
        torch.testing.assert_close(res["grad"], 2 * weights[2 * r : 2 * r + 2])


def test_helpers_without_process_group():
    t = torch.arange(4.0)
    assert not _dist.is_distributed() and _dist.get_world_size() == 1 and _dist.get_rank() == 0
    assert _dist.all_gather_cat(t) is t and _dist.all_gather_with_grad(t) is t
    assert torch.equal(_dist.all_reduce_sum(t.clone()), t) and torch.equal(_dist.all_reduce_max(t.clone()), t)
