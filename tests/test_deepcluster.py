"""DeepCluster-v2: global spherical k-means, memory bank, assignment table, loss, parameter count."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from two_processes import run_two_processes

from medssl.losses.deepcluster import (
    IGNORE_INDEX,
    DeepClusterV2Loss,
    MemoryBank,
    cluster_memory_bank,
    spherical_kmeans,
)
from medssl.networks.heads import ProjectionHead, SwAVPrototypes


def reference_kmeans(embeddings, k, n_iters, seed):
    """The spec's algorithm written naively (one process): same seeded init draw, Python loops."""
    chosen = torch.randperm(embeddings.shape[0], generator=torch.Generator().manual_seed(seed))[:k]
    centroids = embeddings[chosen].clone()
    for _ in range(n_iters):
        assign = (embeddings @ centroids.T).argmax(dim=1)
        for j in range(k):
            members = embeddings[assign == j]
            if len(members):
                centroids[j] = F.normalize(members.sum(dim=0), dim=0)
    return centroids, (embeddings @ centroids.T).argmax(dim=1)


def clustered_data(n_per_cluster=20, n_clusters=4, dim=8, seed=0, return_labels=False, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_clusters, dim, generator=g, dtype=torch.float64), dim=1)
    points = centres.repeat_interleave(n_per_cluster, 0) + noise * torch.randn(
        n_clusters * n_per_cluster, dim, generator=g, dtype=torch.float64
    )
    order = torch.randperm(points.shape[0], generator=g)
    data = F.normalize(points[order], dim=1)
    labels = torch.arange(n_clusters).repeat_interleave(n_per_cluster)[order]
    return (data, labels) if return_labels else data


def test_kmeans_matches_naive_reference_and_is_seeded():
    data = clustered_data()
    for k, seed in [(4, 0), (6, 1), (4, 7)]:
        centroids, assignments = spherical_kmeans(data, k, n_iters=10, seed=seed)
        ref_c, ref_a = reference_kmeans(data, k, 10, seed)
        torch.testing.assert_close(centroids, ref_c, atol=1e-10, rtol=0)
        assert torch.equal(assignments, ref_a)
        torch.testing.assert_close(centroids.norm(dim=1), torch.ones(k, dtype=torch.float64))
        assert torch.equal(assignments, (data @ centroids.T).argmax(dim=1))  # final E step
    a = spherical_kmeans(data, 5, seed=3)[0]
    assert torch.equal(a, spherical_kmeans(data, 5, seed=3)[0])
    assert not torch.equal(a, spherical_kmeans(data, 5, seed=4)[0])
    assert spherical_kmeans(data.float(), 4)[0].dtype == torch.float32


def test_kmeans_recovers_separated_clusters():
    data, labels = clustered_data(n_per_cluster=30, n_clusters=3, dim=16, seed=5, return_labels=True, noise=0.1)
    recovered = 0
    for seed in range(5):
        _, assignments = spherical_kmeans(data, 3, n_iters=10, seed=seed)
        # a perfect clustering: each true cluster maps to one k-means cluster, and vice versa
        pairs = set(zip(labels.tolist(), assignments.tolist()))
        recovered += len(pairs) == 3 and len({a for _, a in pairs}) == 3
    assert recovered >= 4  # an unlucky init (two seeds in one cluster) may stay in a local optimum


def test_kmeans_empty_cluster_keeps_previous_centroid():
    a = F.normalize(torch.tensor([1.0, 0.2, 0.0], dtype=torch.float64), dim=0)
    b = F.normalize(torch.tensor([0.0, 1.0, 0.3], dtype=torch.float64), dim=0)
    data = torch.stack([a, a, a, b, b, b])
    # 3 clusters over 2 distinct points: two initial centroids coincide, the later one never wins the argmax
    centroids, assignments = spherical_kmeans(data, 3, n_iters=5, seed=0)
    counts = torch.bincount(assignments, minlength=3)
    assert (counts == 0).sum() == 1
    empty = int(torch.nonzero(counts == 0)[0])
    assert torch.isfinite(centroids).all()
    assert min((centroids[empty] - a).abs().max(), (centroids[empty] - b).abs().max()) < 1e-12


def test_kmeans_errors():
    with pytest.raises(ValueError, match="n_clusters=5"):
        spherical_kmeans(torch.randn(4, 3), 5)
    with pytest.raises(ValueError, match="must be"):
        spherical_kmeans(torch.randn(4, 3, 2), 2)


def test_memory_bank_update_state_and_errors():
    bank = MemoryBank(size=6, feat_dim=3, n_crops=2)
    assert list(bank.buffers()) == []  # per-rank state: not a DDP-broadcast buffer
    bank.update(torch.tensor([10, 11]), [torch.ones(2, 3), 2 * torch.ones(2, 3)])
    bank.update([4, 5, 6], torch.full((6, 3), 3.0))  # (n_crops·B, D) stack
    indexes, embeddings = bank.filled()
    assert indexes.tolist() == [10, 11, 4, 5, 6]
    assert embeddings[:, :, 0].tolist() == [[1, 1, 3, 3, 3], [2, 2, 3, 3, 3]]
    with pytest.raises(ValueError, match="exceed the bank size 6"):
        bank.update([1, 2], torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="expected 2 crops"):
        bank.update([1], [torch.zeros(1, 3)])
    other = MemoryBank(6, 3, 2)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.filled()[0], indexes) and torch.equal(other.filled()[1], embeddings)
    bank.new_pass()
    assert bank.filled()[0].numel() == 0 and bank.n_filled == 0


def test_cluster_memory_bank_table_and_head_crops():
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(size=40, feat_dim=8, n_crops=2).double()
    idx = torch.randperm(50, generator=g)[:36]
    crops = [clustered_data(9, 4, 8, seed=1), clustered_data(9, 4, 8, seed=2)]
    bank.update(idx, crops)
    centroids, table = cluster_memory_bank(bank, (4, 3, 5), dataset_size=50, n_iters=10, seed=11)
    assert table.shape == (3, 50) and [c.shape for c in centroids] == [(4, 8), (3, 8), (5, 8)]
    missing = torch.ones(50, dtype=torch.bool)
    missing[idx] = False
    assert (table[:, missing] == IGNORE_INDEX).all()
    for h, k in enumerate((4, 3, 5)):  # head h clusters crop h mod 2 with seed + h
        ref_c, ref_a = spherical_kmeans(crops[h % 2], k, n_iters=10, seed=11 + h)
        torch.testing.assert_close(centroids[h], ref_c)
        assert torch.equal(table[h, idx], ref_a)
    prototypes = SwAVPrototypes(8, [4, 3, 5]).double()
    prototypes.set_weights_(centroids)
    assert torch.equal(prototypes.weights[2], centroids[2])


def test_deepcluster_loss():
    torch.manual_seed(0)
    b, n_crops = 4, 3
    scores = [torch.randn(n_crops * b, k, requires_grad=True) for k in (5, 5, 6)]
    targets = torch.tensor([[0, 1, IGNORE_INDEX, 4], [2, 2, 2, 2], [5, IGNORE_INDEX, 0, 1]])
    loss = DeepClusterV2Loss(temperature=0.1)(scores, targets)
    expected = 0.0
    for s, t in zip(scores, targets):
        logp = F.log_softmax(s / 0.1, dim=1)
        rows = [(c * b + i, int(t[i])) for c in range(n_crops) for i in range(b) if t[i] != IGNORE_INDEX]
        expected = expected - sum(logp[r, k] for r, k in rows) / len(rows)
    torch.testing.assert_close(loss, expected / 3)
    loss.backward()
    assert all(s.grad is not None for s in scores)

    none = torch.full((1, b), IGNORE_INDEX)
    single = torch.randn(2 * b, 5, requires_grad=True)
    zero = DeepClusterV2Loss()(single, none)
    assert zero.item() == 0.0 and zero.requires_grad  # all unassigned: zero, not NaN
    with pytest.raises(ValueError, match="heads"):
        DeepClusterV2Loss()(scores, targets[:2])


def test_resnet50_deepcluster_parameter_count():
    from monai.networks.nets import resnet50

    trunk = resnet50(spatial_dims=2, n_input_channels=3, conv1_t_stride=2, feed_forward=False, bias_downsample=False)
    counts = {
        "trunk": sum(p.numel() for p in trunk.parameters()),
        "head": sum(p.numel() for p in ProjectionHead(2048, 2048, 128).parameters()),
        "prototypes": sum(p.numel() for p in SwAVPrototypes(128, [3000, 3000, 3000]).parameters()),
    }
    total = sum(counts.values())
    print(f"DeepCluster-v2 ResNet-50 + head + 3x3000 prototypes: {counts} total {total:,} (reference 29,122,752)")
    assert abs(total - 29_122_752) <= 0.001 * 29_122_752
    assert isinstance(trunk, nn.Module)


# ---------------------------------------------------------------------------------------------- 2 processes


def _kmeans_worker(rank, world_size, data, n0, idx, k):
    local = data[:n0] if rank == 0 else data[n0:]
    centroids, assignments = spherical_kmeans(local, k, n_iters=10, seed=5)
    bank = MemoryBank(size=len(data), feat_dim=data.shape[1], n_crops=2).double()
    local_idx = idx[:n0] if rank == 0 else idx[n0:]
    bank.update(local_idx, [local, local.flip(1)])
    bank_centroids, table = cluster_memory_bank(bank, (k, k - 1, k), dataset_size=60, seed=9)
    return {"centroids": centroids, "assignments": assignments, "bank_centroids": bank_centroids, "table": table}


@pytest.mark.distributed
def test_kmeans_two_processes(tmp_path):
    data = clustered_data(n_per_cluster=12, n_clusters=4, dim=8, seed=3)
    idx = torch.randperm(60, generator=torch.Generator().manual_seed(1))[:48]
    n0, k = 29, 5  # uneven shares
    results = run_two_processes(tmp_path, _kmeans_worker, data, n0, idx, k)
    whole_c, whole_a = spherical_kmeans(data, k, n_iters=10, seed=5)
    assert torch.equal(results[0]["centroids"], results[1]["centroids"])  # identical on every rank
    torch.testing.assert_close(results[0]["centroids"], whole_c, atol=1e-12, rtol=0)
    assert torch.equal(torch.cat([results[0]["assignments"], results[1]["assignments"]]), whole_a)

    bank = MemoryBank(size=len(data), feat_dim=8, n_crops=2).double()
    bank.update(idx, [data, data.flip(1)])
    whole_bank_c, whole_table = cluster_memory_bank(bank, (k, k - 1, k), dataset_size=60, seed=9)
    assert torch.equal(results[0]["table"], results[1]["table"])
    assert torch.equal(results[0]["table"], whole_table)
    for h in range(3):
        assert torch.equal(results[0]["bank_centroids"][h], results[1]["bank_centroids"][h])
        torch.testing.assert_close(results[0]["bank_centroids"][h], whole_bank_c[h], atol=1e-12, rtol=0)
