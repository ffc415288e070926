"""SwAV loss, queue, prototypes, per-modality clustering (Ghesu et al. 2022, Eq. 4) and the ResNet-50 parameter
count."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_sinkhorn import reference_sinkhorn, toy_scores
from two_processes import run_two_processes

from medssl.losses.sinkhorn import sinkhorn_knopp
from medssl.losses.swav import (
    PerModalityPrototypes,
    SwAVLoss,
    SwAVPrototypes,
    SwAVQueue,
    cancel_prototype_grads,
    per_modality_swav_loss,
)
from medssl.networks.heads import ProjectionHead


def reference_swav_loss(crops, crops_for_assign, eps, temperature=0.1, iters=3, queue=None):
    """Direct transcription of the spec (per-crop list, float64)."""
    n_crops, b = len(crops), crops[0].shape[0]
    total = 0.0
    for i, c in enumerate(crops_for_assign):
        s = crops[c] if queue is None else torch.cat([queue[i], crops[c]])
        q = reference_sinkhorn(s, eps, iters)[-b:]
        sub = 0.0
        for v in range(n_crops):
            if v != c:
                sub = sub - (q * F.log_softmax(crops[v].double() / temperature, dim=1)).sum(dim=1).mean()
        total = total + sub / (n_crops - 1)
    return total / len(crops_for_assign)


def random_scores(n_rows, k, seed, dim=16):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n_rows, dim, generator=g, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(k, dim, generator=g, dtype=torch.float64), dim=1)
    return z @ c.T


@pytest.mark.parametrize("eps, expected_sum", [(0.05, 18.501624), (0.03, 18.593315)])
def test_spec_toy_swapped_loss(eps, expected_sum):
    """Spec toy: crop0 = rows 0..3, crop1 = rows 4..7, each crop's own Sinkhorn, τ = 0.1.

    The spec's number is the SUM of the two swapped terms ℓ(crop1 | q0) + ℓ(crop0 | q1); the reference loss
    (facebookresearch/swav main_swav.py) averages over the assignment crops, i.e. half of it."""
    scores = toy_scores()
    loss_fn = SwAVLoss(temperature=0.1, epsilon=eps, sinkhorn_iters=3, crops_for_assign=(0, 1), n_crops=2)
    loss = loss_fn(scores, batch_size=4)
    assert abs(2 * loss.item() - expected_sum) < 1e-5
    # the two swapped terms, composed by hand from the codes
    q0, q1 = sinkhorn_knopp(scores[:4], eps), sinkhorn_knopp(scores[4:], eps)
    term_a = -(q0 * F.log_softmax(scores[4:] / 0.1, dim=1)).sum(dim=1).mean()
    term_b = -(q1 * F.log_softmax(scores[:4] / 0.1, dim=1)).sum(dim=1).mean()
    assert abs((term_a + term_b).item() - expected_sum) < 1e-5


def test_multicrop_matches_spec_and_list_equals_stack():
    b, k, n_crops = 5, 7, 4
    stack = random_scores(n_crops * b, k, seed=0)
    crops = list(stack.split(b))
    loss_fn = SwAVLoss(epsilon=0.05, crops_for_assign=(0, 1), n_crops=n_crops)
    expected = reference_swav_loss(crops, (0, 1), 0.05)
    torch.testing.assert_close(loss_fn(stack, batch_size=b).double(), expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(loss_fn(crops), loss_fn(stack))
    with pytest.raises(ValueError):
        loss_fn(stack[:-1])  # not divisible into 4 crops
    with pytest.raises(ValueError):
        loss_fn(crops[:3])  # wrong number of crops


def test_queue_scores_are_prepended_and_only_batch_rows_kept():
    b, k, length = 4, 6, 10
    stack = random_scores(3 * b, k, seed=1)
    crops = list(stack.split(b))
    queue = [random_scores(length, k, seed=2), random_scores(length, k, seed=3)]
    loss_fn = SwAVLoss(epsilon=0.05, crops_for_assign=(0, 1), n_crops=3)
    with_queue = loss_fn(stack, b, queue_scores=queue)
    torch.testing.assert_close(
        with_queue.double(), reference_swav_loss(crops, (0, 1), 0.05, queue=queue), atol=1e-5, rtol=1e-6
    )
    assert abs(with_queue.item() - loss_fn(stack, b).item()) > 1e-4  # the queue changes the codes
    torch.testing.assert_close(loss_fn(stack, b, queue_scores=torch.stack(queue)), with_queue)


def test_codes_are_detached_and_small_crops_only_predicted():
    b, k = 4, 5
    scores = random_scores(3 * b, k, seed=4).float().requires_grad_(True)
    loss = SwAVLoss(crops_for_assign=(0,), n_crops=3)(scores, b)
    loss.backward()
    # crop 0 produces codes (no gradient through Sinkhorn) and is never predicted: no gradient at all
    assert torch.count_nonzero(scores.grad[:b]) == 0
    assert torch.count_nonzero(scores.grad[b:]) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_scores_under_autocast(dtype):
    scores = toy_scores().to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SwAVLoss(epsilon=0.03, n_crops=2)(scores, 4)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(2 * loss.item() - 18.593315) < 0.1  # half-precision rounding of the scores only
    loss.backward()
    assert torch.isfinite(scores.grad.float()).all()


def test_empty_local_batch_gives_connected_zero():
    scores = torch.zeros(0, 5, requires_grad=True)
    loss = SwAVLoss(n_crops=2)(scores, 0)
    assert loss.item() == 0.0 and loss.requires_grad


def test_prototypes_single_and_multi_head():
    protos = SwAVPrototypes(feat_dim=8, n_prototypes=5)
    assert protos(torch.randn(3, 8)).shape == (3, 5)
    assert sum(p.numel() for p in protos.parameters()) == 40
    with torch.no_grad():
        protos.heads[0].weight.mul_(3.0)
    protos.normalize_()
    torch.testing.assert_close(protos.heads[0].weight.norm(dim=1), torch.ones(5))
    multi = SwAVPrototypes(feat_dim=8, n_prototypes=[5, 3])
    out = multi(torch.randn(2, 8))
    assert isinstance(out, list) and [o.shape for o in out] == [(2, 5), (2, 3)]
    assert multi.n_prototypes == (5, 3)
    new = [F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(3, 8), dim=1)]
    multi.set_weights_(new)
    assert all(torch.equal(w, n) for w, n in zip(multi.weights, new))
    with pytest.raises(ValueError, match="head 1"):
        multi.set_weights_([new[0], torch.zeros(4, 8)])


def test_projection_head():
    head = ProjectionHead(in_dim=16, hidden_dim=32, out_dim=8)
    z = head(torch.randn(4, 16))
    assert z.shape == (4, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert [type(m) for m in ProjectionHead(16, 0, 8).mlp] == [nn.Linear]


def test_queue_push_full_scores_and_state():
    queue = SwAVQueue(n_assign_crops=2, length_per_rank=5, feat_dim=3)
    assert list(queue.buffers()) == []  # per-rank state: not a DDP-broadcast buffer
    queue.push(torch.ones(2, 2, 3))
    assert queue.n_filled == 0 and not queue.is_full  # inactive until start()
    queue.start()
    batches = [torch.full((2, 2, 3), float(i + 1)) for i in range(3)]
    for i, batch in enumerate(batches[:2]):
        queue.push(batch)
        assert not queue.is_full
    queue.push(list(batches[2]))  # list of per-crop tensors
    assert queue.is_full and queue.n_filled == 5
    # newest first, oldest dropped
    assert queue.embeddings[:, :, 0].tolist() == [[3, 3, 2, 2, 1]] * 2
    queue.push(torch.full((4, 3), 9.0))  # (n_assign·B, D) view-major stack, B = 2
    assert queue.embeddings[:, :, 0].tolist() == [[9, 9, 3, 3, 2]] * 2

    protos = SwAVPrototypes(feat_dim=3, n_prototypes=4)
    s = queue.scores(protos)
    assert s.shape == (2, 5, 4) and not s.requires_grad
    torch.testing.assert_close(s, queue.embeddings @ protos.heads[0].weight.detach().T)
    torch.testing.assert_close(queue.scores(protos.heads[0].weight), s)

    state = queue.state_dict()
    other = SwAVQueue(2, 5, 3)
    other.load_state_dict(state)
    assert other.is_full and torch.equal(other.embeddings, queue.embeddings)
    other.to(torch.float64)
    assert other.embeddings.dtype == torch.float64
    with pytest.raises(ValueError, match="shape"):
        SwAVQueue(2, 4, 3).load_state_dict(state)


def test_cancel_prototype_grads():
    protos = SwAVPrototypes(feat_dim=4, n_prototypes=3)
    protos(torch.randn(2, 4)).sum().backward()
    assert not cancel_prototype_grads(protos, iteration=10, freeze_iters=10)
    assert protos.heads[0].weight.grad is not None
    assert cancel_prototype_grads(protos, iteration=9, freeze_iters=10)
    assert protos.heads[0].weight.grad is None


def _split_by_modality(embeddings, modalities, prototypes, loss_fn, b):
    crops = list(embeddings.split(b))
    total = 0.0
    for m in sorted(set(modalities)):
        idx = torch.tensor([i for i, x in enumerate(modalities) if x == m])
        total = total + loss_fn([prototypes[m](c[idx]) for c in crops], len(idx))
    return total


def test_per_modality_loss_sums_modalities_and_rejects_unknown():
    torch.manual_seed(0)
    b, n_crops = 6, 3
    prototypes = PerModalityPrototypes(["MR", "CT", "XR"], feat_dim=8, n_prototypes=4)
    assert prototypes.modalities == ["CT", "MR", "XR"]
    embeddings = F.normalize(torch.randn(n_crops * b, 8), dim=1).requires_grad_(True)
    modalities = ["CT", "MR", "CT", "MR", "CT", "MR"]
    loss_fn = SwAVLoss(epsilon=0.05, crops_for_assign=(0, 1), n_crops=n_crops)
    total, parts = per_modality_swav_loss(embeddings, modalities, prototypes, loss_fn, return_per_modality=True)
    assert sorted(parts) == ["CT", "MR"]
    torch.testing.assert_close(total, parts["CT"] + parts["MR"])
    torch.testing.assert_close(total, _split_by_modality(embeddings, modalities, prototypes, loss_fn, b))
    # one Sinkhorn per modality: differs from clustering the mixed batch with one prototype matrix
    mixed = loss_fn([prototypes["CT"](c) for c in embeddings.split(b)], b)
    assert abs(mixed.item() - parts["CT"].item()) > 1e-4
    total.backward()
    assert prototypes["CT"].heads[0].weight.grad.abs().sum() > 0
    assert prototypes["XR"].heads[0].weight.grad is not None  # absent modality kept in the graph (zero grad)
    assert torch.count_nonzero(prototypes["XR"].heads[0].weight.grad) == 0

    with pytest.raises(ValueError, match=r"'US'.*\['CT', 'MR', 'XR'\]"):
        per_modality_swav_loss(embeddings, ["CT", "US", "CT", "MR", "CT", "MR"], prototypes, loss_fn)


def test_per_modality_queues():
    torch.manual_seed(1)
    b = 4
    prototypes = PerModalityPrototypes(["CT", "MR"], feat_dim=8, n_prototypes=5)
    queues = {m: SwAVQueue(2, 4, 8) for m in ["CT", "MR"]}
    for q in queues.values():
        q.start()
    loss_fn = SwAVLoss(n_crops=2)
    modalities = ["CT", "CT", "MR", "MR"]
    first = F.normalize(torch.randn(2 * b, 8), dim=1)
    per_modality_swav_loss(first, modalities, prototypes, loss_fn, queues=queues)
    assert all(q.n_filled == 2 and not q.is_full for q in queues.values())
    torch.testing.assert_close(queues["CT"].embeddings[0, :2], first[:2])  # crop 0's CT rows, newest first
    torch.testing.assert_close(queues["MR"].embeddings[1, :2], first[b + 2 : b + 4])  # crop 1's MR rows
    per_modality_swav_loss(F.normalize(torch.randn(2 * b, 8), dim=1), modalities, prototypes, loss_fn, queues=queues)
    assert all(q.is_full for q in queues.values())
    third = F.normalize(torch.randn(2 * b, 8), dim=1)
    queue_scores = {m: queues[m].scores(prototypes[m]) for m in queues}
    got = per_modality_swav_loss(third, modalities, prototypes, loss_fn, queues=queues)
    crops = list(third.split(b))
    expected = sum(
        loss_fn([prototypes[m](c[idx]) for c in crops], 2, queue_scores=queue_scores[m])
        for m, idx in [("CT", torch.tensor([0, 1])), ("MR", torch.tensor([2, 3]))]
    )
    torch.testing.assert_close(got, expected)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("n_prototypes, expected", [(3000, 28_354_752), (1500, 28_162_752)])
def test_resnet50_head_prototypes_parameter_count(n_prototypes, expected):
    from monai.networks.nets import resnet50

    # MONAI's ResNet-50 as a 2-D trunk: no fc (feed_forward=False), no bias in the downsample convolutions
    # (torchvision's layout); conv1_t_stride=2 as in the reference stem (does not change the count).
    trunk = resnet50(spatial_dims=2, n_input_channels=3, conv1_t_stride=2, feed_forward=False, bias_downsample=False)
    head = ProjectionHead(2048, 2048, 128)
    prototypes = SwAVPrototypes(128, n_prototypes)
    counts = {"trunk": _n_params(trunk), "head": _n_params(head), "prototypes": _n_params(prototypes)}
    total = sum(counts.values())
    print(f"ResNet-50 + head + {n_prototypes} prototypes: {counts} total {total:,} (reference {expected:,})")
    assert counts["trunk"] == 23_508_032
    assert counts["head"] == 4_462_720
    assert counts["prototypes"] == 128 * n_prototypes
    assert abs(total - expected) <= 0.001 * expected
    assert trunk.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 2048)


# ---------------------------------------------------------------------------------------------- 2 processes


def _per_modality_worker(rank, world_size, embeddings, layouts, state, b, n_crops):
    prototypes = PerModalityPrototypes(["CT", "MR", "XR"], feat_dim=8, n_prototypes=4).double()
    prototypes.load_state_dict(state)
    loss_fn = SwAVLoss(epsilon=0.05, crops_for_assign=(0, 1), n_crops=n_crops)
    crops = embeddings.reshape(n_crops, 2 * b, -1)
    out = {}
    for name, (modalities, rows_per_rank) in layouts.items():
        rows = rows_per_rank[rank]
        local = crops[:, rows].reshape(-1, crops.shape[-1])
        total, parts = per_modality_swav_loss(
            local, [modalities[i] for i in rows], prototypes, loss_fn, return_per_modality=True
        )
        out[name] = {"total": total.detach(), "parts": {m: v.detach() for m, v in parts.items()}}
    return out


@pytest.mark.distributed
def test_per_modality_two_processes(tmp_path):
    torch.manual_seed(2)
    b, n_crops = 4, 3
    prototypes = PerModalityPrototypes(["CT", "MR", "XR"], feat_dim=8, n_prototypes=4).double()
    embeddings = F.normalize(torch.randn(n_crops * 2 * b, 8, dtype=torch.float64), dim=1)
    layouts = {
        # the same modality layout on both ranks (as the batch sampler guarantees)
        "same": (["CT", "CT", "MR", "MR", "CT", "CT", "MR", "MR"], [[0, 1, 2, 3], [4, 5, 6, 7]]),
        # rank 0 holds CT and MR samples, rank 1 XR and CT: the collectives must still match (no deadlock)
        "uneven": (["CT", "MR", "CT", "XR", "XR", "CT", "XR", "CT"], [[0, 1, 2], [3, 4, 5, 6, 7]]),
    }
    state = prototypes.state_dict()
    results = run_two_processes(tmp_path, _per_modality_worker, embeddings, layouts, state, b, n_crops)
    loss_fn = SwAVLoss(epsilon=0.05, crops_for_assign=(0, 1), n_crops=n_crops)
    whole = per_modality_swav_loss(embeddings, layouts["same"][0], prototypes, loss_fn)
    # equal per-rank shares: the mean of the ranks' losses is the one-process loss on the concatenated batch
    same = [r["same"]["total"].double() for r in results]
    torch.testing.assert_close((same[0] + same[1]) / 2, whole.detach().double())

    uneven = [r["uneven"] for r in results]
    assert sorted(uneven[0]["parts"]) == ["CT", "MR", "XR"] == sorted(uneven[1]["parts"])
    assert uneven[1]["parts"]["MR"].item() == 0.0  # a modality present globally but not on this rank
    assert uneven[0]["parts"]["XR"].item() == 0.0
    assert all(torch.isfinite(r["total"]) for r in uneven)
    # Sinkhorn per modality is global: the sample-weighted mean of the ranks' losses is the one-process loss
    modalities, rows_per_rank = layouts["uneven"]
    _, whole_parts = per_modality_swav_loss(embeddings, modalities, prototypes, loss_fn, return_per_modality=True)
    for m, whole_loss in whole_parts.items():
        counts = [sum(modalities[i] == m for i in rows) for rows in rows_per_rank]
        weighted = sum(n * r["parts"][m].double() for n, r in zip(counts, uneven)) / sum(counts)
        torch.testing.assert_close(weighted, whole_loss.detach().double(), msg=m)
