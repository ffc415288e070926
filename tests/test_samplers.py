"""medssl.data.samplers: seeds, SeededDataset with MONAI datasets / DataLoader workers, batch samplers (rank layout,
single-modality parts, 2D/3D alternation, resume)."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, Dataset
from monai.data import DataLoader as MonaiDataLoader
from monai.transforms import Compose, MapTransform, RandFlipd, RandGaussianNoised, RandScaleIntensityd
from torch.utils.data import DataLoader

from medssl.data.samplers import (
    DimensionAlternatingBatchSampler,
    DistributedBatchSampler,
    ModalityBatchSampler,
    SampleKey,
    SeededDataset,
    VolumeGroupedBatchSampler,
    item_seed,
    item_seeds,
)

# ----------------------------------------------------------------------------------------------- helpers


class MakeImaged(MapTransform):
    """Deterministic 'loader': builds a (1, 6, 6) image from item["value"]; counts its calls (per process)."""

    calls = 0

    def __init__(self):
        super().__init__(keys=["image"])

    def __call__(self, data):
        type(self).calls += 1
        d = dict(data)
        d["image"] = torch.arange(36, dtype=torch.float32).reshape(1, 6, 6) + 100.0 * d["value"]
        return d


def _transform():
    return Compose(
        [
            MakeImaged(),
            RandGaussianNoised(keys="image", prob=1.0, std=1.0),
            RandFlipd(keys="image", prob=0.5, spatial_axis=0),
            RandScaleIntensityd(keys="image", factors=0.5, prob=1.0),
        ]
    )


def _items(n):
    return [{"value": i, "modality": "CT"} for i in range(n)]


def _local(sampler):
    return list(sampler)


# ----------------------------------------------------------------------------------------------- item seeds


def test_item_seed_is_pure_uint32_and_well_mixed():
    seeds = item_seeds(7, 3, np.arange(4096))
    assert seeds.dtype == np.uint32
    assert [item_seed(7, 3, i) for i in range(0, 4096, 511)] == seeds[::511].tolist()
    assert len(set(seeds.tolist())) == 4096  # no collision among neighbouring indices
    u = seeds.astype(np.float64) / 2**32
    assert 0.45 < u.mean() < 0.55 and 0.07 < u.var() < 0.097  # uniform(0,1): mean 0.5, var 1/12
    low_bits = (seeds & 1).mean()
    assert 0.45 < low_bits < 0.55
    # every argument matters, and a repeat of an item within the epoch gets another seed
    base = item_seed(7, 3, 11)
    assert len({base, item_seed(8, 3, 11), item_seed(7, 4, 11), item_seed(7, 3, 12), item_seed(7, 3, 11, 1)}) == 5
    assert item_seed(7, 3, 11, 0) == base
    assert 0 <= item_seed(-5, -1, 2**40) < 2**32


# ----------------------------------------------------------------------------------------------- SeededDataset


def test_seeded_dataset_cachedataset_reseeds_post_cache_transforms():
    items = _items(5)
    MakeImaged.calls = 0
    cached = SeededDataset(CacheDataset(items, _transform(), cache_rate=1.0, progress=False))
    assert MakeImaged.calls == 5  # the deterministic prefix ran once per item, at caching
    plain = SeededDataset(Dataset(items, _transform()))
    assert len(cached) == 5 and cached.data is items and isinstance(cached.transform, Compose)
    for index, seed in [(0, 1), (3, 123456), (4, 2**32 - 1)]:
        key = SampleKey(index, seed)
        a, b, c = cached[key], cached[key], plain[key]
        assert torch.equal(a["image"], b["image"])  # same key -> same augmentation
        assert torch.equal(a["image"], c["image"])  # cached prefix + reseeded suffix == full uncached pipeline
        assert not torch.equal(a["image"], cached[SampleKey(index, seed + 1)]["image"])
    assert MakeImaged.calls == 5 + 3  # cache used for every cached[...] call, the plain dataset ran it 3 times
    # a plain int index still works (no reseeding: two calls differ because the noise stream advances)
    assert cached[2]["image"].shape == (1, 6, 6)
    assert not torch.equal(cached[2]["image"], cached[2]["image"])


def _run_loader(loader_cls, num_workers, persistent, epochs=(0, 1), skip=0):
    ds = SeededDataset(CacheDataset(_items(10), _transform(), cache_rate=1.0, progress=False))
    sampler = DistributedBatchSampler(10, 3, seed=5, drop_last=False, rank=0, world_size=1)
    kwargs = dict(persistent_workers=persistent) if num_workers else {}
    loader = loader_cls(ds, batch_sampler=sampler, num_workers=num_workers, **kwargs)
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        if skip:
            sampler.skip_batches(skip)
        out += [torch.as_tensor(batch["image"]) for batch in loader]
    return torch.cat(out)


def test_seeded_dataset_same_results_whatever_the_workers():
    reference = _run_loader(DataLoader, 0, False)
    assert reference.shape == (2 * 12, 1, 6, 6)  # 2 epochs x ceil(10/3)=4 batches of 3
    assert torch.equal(reference, _run_loader(DataLoader, 2, False))
    assert torch.equal(reference, _run_loader(DataLoader, 2, True))
    assert torch.equal(reference, _run_loader(MonaiDataLoader, 2, True))  # MONAI's worker_init_fn does not interfere
    # a resumed epoch (skip 2 of its 4 batches) gives exactly its remaining items, also with workers
    resumed = _run_loader(DataLoader, 2, False, epochs=(1,), skip=2)
    assert torch.equal(resumed, reference[12 + 6 :])


def test_seeded_dataset_pickles_without_lock_issues():
    import pickle

    ds = SeededDataset(Dataset(_items(2), _transform()))
    clone = pickle.loads(pickle.dumps(ds))
    key = SampleKey(1, 9)
    assert torch.equal(clone[key]["image"], ds[key]["image"])
    assert not hasattr(ds, "__getitems__")  # never delegated: it would bypass the reseeding


# ----------------------------------------------------------------------------------------------- plain sampler


@pytest.mark.parametrize("num_items,drop_last", [(24, True), (26, True), (26, False)])
def test_distributed_batch_sampler_world_size_invariance(num_items, drop_last):
    single = DistributedBatchSampler(num_items, 4, seed=3, drop_last=drop_last, rank=0, world_size=1)
    ranks = [
        DistributedBatchSampler(num_items, 2, seed=3, drop_last=drop_last, rank=r, world_size=2) for r in (0, 1)
    ]
    for epoch in (0, 5):
        for s in [single, *ranks]:
            s.set_epoch(epoch)
        expected = _local(single)
        assert len(expected) == len(single) == len(ranks[0]) == len(ranks[1])
        local0, local1 = _local(ranks[0]), _local(ranks[1])
        assert [a + b for a, b in zip(local0, local1)] == expected  # keys (indices AND seeds) identical
        assert ranks[0].global_batches() == expected == single.global_batches()
        for a, b in zip(local0, local1):
            assert len(a) == len(b) == 2 and not {k.index for k in a} & {k.index for k in b}


def test_distributed_batch_sampler_epoch_coverage_and_drop_last():
    s = DistributedBatchSampler(10, 2, seed=1, drop_last=True, rank=0, world_size=2)
    assert len(s) == 2  # 10 // 4
    idx = [k.index for b in s.global_batches() for k in b]
    assert len(idx) == len(set(idx)) == 8
    s = DistributedBatchSampler(10, 2, seed=1, drop_last=False, rank=1, world_size=2)
    assert len(s) == 3
    batches = s.global_batches()
    assert all(len(b) == 4 for b in batches)
    assert set(k.index for b in batches for k in b) == set(range(10))  # every item; 2 padded from the next pass
    padded = batches[-1][2:]
    assert all(k.seed == item_seed(1, 0, k.index, 1) for k in padded)
    # epochs differ, the same epoch is reproducible, shuffle=False is the identity order
    a = DistributedBatchSampler(12, 3, seed=1, rank=0, world_size=1)
    e0, e0b = _local(a), _local(a)
    a.set_epoch(1)
    assert e0 == e0b and _local(a) != e0
    plain = DistributedBatchSampler(6, 3, shuffle=False, seed=1, rank=0, world_size=1)
    assert [[k.index for k in b] for b in plain] == [[0, 1, 2], [3, 4, 5]]
    assert all(k.seed == item_seed(1, 0, k.index) for b in plain for k in b)
    with pytest.raises(ValueError, match="no batch"):
        DistributedBatchSampler(3, 2, drop_last=True, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank=2"):
        DistributedBatchSampler(3, 2, rank=2, world_size=2)


def test_distributed_defaults_from_ignite_without_process_group():
    s = DistributedBatchSampler(8, 2)
    assert (s.rank, s.world_size) == (0, 1)


# ----------------------------------------------------------------------------------------------- ModalityBatchSampler

MODS = ["CT"] * 40 + ["MR"] * 24 + ["XR"] * 17 + ["US"] * 9


def test_modality_sampler_single_modality_batches_and_rank_agreement():
    ranks = [ModalityBatchSampler(MODS, 4, parts=1, seed=2, rank=r, world_size=2) for r in (0, 1)]
    part = 8
    assert ranks[0].global_part_size == part
    # weighted by size: over the epoch each modality gives exactly n_m // part batches
    assert Counter(g[0] for g in ranks[0].step_groups()) == {"CT": 5, "MR": 3, "XR": 2, "US": 1}
    assert len(ranks[0]) == 11 and ranks[0].step_groups() == ranks[1].step_groups()
    seen = []
    for groups, b0, b1 in zip(ranks[0].step_groups(), *map(_local, ranks)):
        assert len(b0) == len(b1) == 4
        assert {MODS[k.index] for k in b0 + b1} == {groups[0]}
        seen += [k.index for k in b0 + b1]
    assert len(seen) == len(set(seen))  # no item twice in the epoch
    # the modality order changes with the epoch (same counts)
    orders = set()
    for epoch in range(4):
        ranks[0].set_epoch(epoch)
        orders.add(tuple(ranks[0].step_groups()))
    assert len(orders) > 1


def test_modality_sampler_parts_layout_and_world_size_invariance():
    single = ModalityBatchSampler(MODS, 8, parts=2, seed=4, rank=0, world_size=1)
    ranks = [ModalityBatchSampler(MODS, 4, parts=2, seed=4, rank=r, world_size=2) for r in (0, 1)]
    assert single.global_batches() == ranks[0].global_batches() == ranks[1].global_batches()
    assert ranks[0].parts_layout == [slice(0, 2), slice(2, 4)]
    steps = ranks[0].step_groups()
    # parts of a batch come from distinct modalities while two modalities have chunks left: all but the tail
    assert sum(g[0] != g[1] for g in steps) >= len(steps) - 1
    local0, local1, local_single = _local(ranks[0]), _local(ranks[1]), _local(single)
    for groups, b0, b1, bs, gb in zip(steps, local0, local1, local_single, single.global_batches()):
        for p, sl in enumerate(ranks[0].parts_layout):
            assert {MODS[k.index] for k in b0[sl] + b1[sl]} == {groups[p]}  # every part single-modality
        # rank r holds the r-th contiguous slice of every part; together the ranks hold the global batch
        assert b0 == gb[0:2] + gb[4:6] and b1 == gb[2:4] + gb[6:8]
        assert sorted(b0 + b1) == sorted(bs) == sorted(gb)
    with pytest.raises(ValueError, match="multiple of parts"):
        ModalityBatchSampler(MODS, 5, parts=2, rank=0, world_size=1)


def test_modality_sampler_small_modalities():
    mods = ["CT"] * 20 + ["NM"] * 3
    with pytest.warns(UserWarning, match="NM.*skipped"):
        s = ModalityBatchSampler(mods, 4, parts=1, seed=0, drop_last=True, rank=0, world_size=1)
    assert {g[0] for g in s.step_groups()} == {"CT"} and len(s) == 5
    with pytest.warns(UserWarning, match="NM.*cycled"):  # part = 8 / 2 = 4 > 3 NM items
        s = ModalityBatchSampler(mods, 8, parts=2, seed=0, drop_last=False, rank=0, world_size=1)
    batches = s.global_batches()
    assert len(batches) == 3 and all(len(b) == 8 for b in batches)  # CT: ceil(20/4)=5 parts, NM: 1 part
    nm_keys = [k for b in batches for k in b if mods[k.index] == "NM"]
    assert {k.index for k in nm_keys} == {20, 21, 22}
    assert len(nm_keys) == 4 and len(set(nm_keys)) == 4  # one NM item repeated in the part, with another seed
    # drop_last=False: every item at least once
    assert {k.index for b in batches for k in b} == set(range(23))


# ----------------------------------------------------------------------------------------------- 2D / 3D alternation

DIMS = [2] * 30 + [3] * 11


def test_dimension_alternation_pattern_and_epoch_end():
    s = DimensionAlternatingBatchSampler(DIMS, 4, 2, v=2, seed=1, rank=0, world_size=1)
    # 2D pool: 30 // 4 = 7 batches, 3D pool: 11 // 2 = 5 batches. Blocks 2,2,3,3,2,2,3,3,2,2,3 use all 5 3D batches;
    # step 11 is a 3D turn with no 3D batch left, so the epoch ends there (2 of the 2D batches stay unused)
    steps = [g[0] for g in s.step_groups()]
    assert steps == [2, 2, 3, 3, 2, 2, 3, 3, 2, 2, 3]
    assert len(s) == 11
    for dim, batch in zip(steps, s):
        assert {DIMS[k.index] for k in batch} == {dim}
        assert len(batch) == (4 if dim == 2 else 2)


def test_dimension_alternation_fixed_length_world_size_and_missing_dim():
    single = DimensionAlternatingBatchSampler(DIMS, 4, 2, v=(1, 2), num_batches=30, seed=3, rank=0, world_size=1)
    ranks = [
        DimensionAlternatingBatchSampler(DIMS, 2, 1, v=(1, 2), num_batches=30, seed=3, rank=r, world_size=2)
        for r in (0, 1)
    ]
    assert len(single) == len(ranks[0]) == 30
    assert [g[0] for g in single.step_groups()][:6] == [2, 3, 3, 2, 3, 3]
    assert [a + b for a, b in zip(_local(ranks[0]), _local(ranks[1]))] == _local(single)
    keys3d = [k for b in single.global_batches() for k in b if DIMS[k.index] == 3]
    assert len(keys3d) == 40 and len(set(keys3d)) == 40  # 3D pool cycled ~4 times: repeats get new seeds
    with pytest.warns(UserWarning, match="no 3D batches"):
        only2d = DimensionAlternatingBatchSampler([2] * 9 + [3], 2, 2, seed=0, rank=0, world_size=1)
    assert [g[0] for g in only2d.step_groups()] == [2] * 4


# ----------------------------------------------------------------------------------------------- grouping


def test_volume_grouped_sampler_keeps_volumes_together():
    groups = np.repeat(np.arange(6), [5, 3, 7, 4, 6, 5])
    s = VolumeGroupedBatchSampler(groups, 3, seed=2, drop_last=False, rank=0, world_size=1)
    order = [groups[k.index] for b in s.global_batches() for k in b][: len(groups)]
    switches = sum(a != b for a, b in zip(order, order[1:]))
    assert switches == 5 and sorted(order) == sorted(groups.tolist())
    s.set_epoch(1)
    order1 = [groups[k.index] for b in s.global_batches() for k in b][: len(groups)]
    assert order1 != order


# ----------------------------------------------------------------------------------------------- resume


def _samplers(rank, world_size):
    return [
        DistributedBatchSampler(50, 3, seed=9, drop_last=False, rank=rank, world_size=world_size),
        VolumeGroupedBatchSampler(np.arange(50) // 7, 3, seed=9, rank=rank, world_size=world_size),
        ModalityBatchSampler(MODS, 4, parts=2, seed=9, rank=rank, world_size=world_size),
        DimensionAlternatingBatchSampler(DIMS, 2, 1, v=2, seed=9, rank=rank, world_size=world_size),
    ]


@pytest.mark.parametrize("which", range(4))
def test_resume_skip_batches_yields_the_rest_of_the_epoch(which):
    sampler = _samplers(1, 2)[which]
    sampler.set_epoch(3)
    full = _local(sampler)
    state = sampler.state_dict()
    assert state == {"epoch": 3, "seed": 9}
    for n in (0, 1, len(full) // 2, len(full)):
        fresh = _samplers(1, 2)[which]
        fresh.load_state_dict(state)
        fresh.skip_batches(n)
        assert _local(fresh) == full[n:]
        assert _local(fresh) == full  # the skip applies to one pass only
    with pytest.raises(KeyError, match="seed"):
        fresh.load_state_dict({"epoch": 1})


# ----------------------------------------------------------------------------------------------- real 2-process run


_DIST_SCRIPT = """
import sys, torch, torch.distributed as dist
from medssl.data.samplers import DistributedBatchSampler, ModalityBatchSampler
rank, init_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
mods = {mods!r}
batches = {{
    "plain": list(DistributedBatchSampler(26, 2, seed=3, drop_last=False)),  # rank / world size from ignite
    "modality": list(ModalityBatchSampler(mods, 4, parts=2, seed=4)),
}}
dist.barrier()
torch.save([[tuple(k) for k in b] for b in batches["plain"]], out + "_plain.pt")
torch.save([[tuple(k) for k in b] for b in batches["modality"]], out + "_modality.pt")
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_two_gloo_processes_default_rank_from_ignite(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    common = str(Path(__file__).resolve().parents[1] / "common")
    env["PYTHONPATH"] = os.pathsep.join([common, env.get("PYTHONPATH", "")])
    script = _DIST_SCRIPT.format(mods=MODS)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(r), str(tmp_path / "init"), str(tmp_path / f"rank{r}")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in (0, 1)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]
    for rank in (0, 1):
        plain = torch.load(tmp_path / f"rank{rank}_plain.pt")
        modality = torch.load(tmp_path / f"rank{rank}_modality.pt")
        expected_plain = DistributedBatchSampler(26, 2, seed=3, drop_last=False, rank=rank, world_size=2)
        expected_modality = ModalityBatchSampler(MODS, 4, parts=2, seed=4, rank=rank, world_size=2)
        assert plain == [[tuple(k) for k in b] for b in expected_plain]
        assert modality == [[tuple(k) for k in b] for b in expected_modality]
