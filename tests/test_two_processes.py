"""tests/two_processes.py, the suite's shared pair of gloo ranks: results per rank, one pair reused across jobs, and a
failing job reported with its traceback and replaced by a fresh pair."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import two_processes
from two_processes import run_two_processes


def _sum_worker(rank, world_size, value):
    t = torch.tensor([float(value + rank)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world_size, "sum": t, "pid": os.getpid()}


def _failing_worker(rank, world_size):
    if rank == 1:
        raise ValueError("rank 1 refuses")
    return {}


@pytest.mark.distributed
def test_jobs_share_one_pair_and_a_failure_starts_a_fresh_one(tmp_path):
    first = run_two_processes(tmp_path / "a", _sum_worker, 3)
    assert [r["rank"] for r in first] == [0, 1] and all(r["world"] == 2 for r in first)
    assert all(r["sum"].item() == 3 + 4 for r in first)
    second = run_two_processes(tmp_path / "b", _sum_worker, 10)
    assert [r["pid"] for r in second] == [r["pid"] for r in first]  # the same two processes
    assert second[0]["sum"].item() == 21

    with pytest.raises(RuntimeError, match=r"_failing_worker failed on rank 1:[\s\S]*ValueError: rank 1 refuses"):
        run_two_processes(tmp_path / "c", _failing_worker)
    assert two_processes._pair is None  # torn down
    third = run_two_processes(tmp_path / "d", _sum_worker, 0)
    assert third[1]["sum"].item() == 1 and {r["pid"] for r in third}.isdisjoint(r["pid"] for r in first)
