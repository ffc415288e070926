"""Two gloo processes shared by the suite's 2-process tests: started once, then each test's worker runs on both ranks.

Spawning two fresh interpreters (torch, MONAI and the test module imported in each) cost a test 9-18 s of which the
work was often under a second; with seven such tests that was over a minute of a suite held under 15 minutes. What
``torch.multiprocessing.spawn`` lacks is reuse: here the two ranks stay up between tests, each job runs
``worker(rank, world_size, *args)`` on both and its results come back as the spawned version's did (one
``torch.save`` file per rank). A job that fails, hangs or kills a rank tears the pair down (the next job starts a
fresh one), so one broken test cannot leave the next with a half-finished collective.
"""

from __future__ import annotations

import atexit
import os
import queue
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
JOB_TIMEOUT_S = 300.0


def _rank_loop(rank: int, world_size: int, store: str, jobs, results) -> None:
    """One rank: join the gloo group once, then run jobs until told to stop (None)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        while True:
            job = jobs.get()
            if job is None:
                break
            worker, args, out = job
            torch.set_num_threads(1)
            try:
                torch.save(worker(rank, world_size, *args), os.path.join(out, f"rank{rank}.pt"))
                # both ranks done before the next job: a rank tearing gloo down while the other still talks to it
                # aborted once ("terminate called without an active exception", SIGABRT) in a full-suite run
                dist.barrier()
            except BaseException:  # noqa: BLE001 - reported to the test, which fails with this traceback
                results.put((rank, traceback.format_exc()))
                return
            results.put((rank, None))
    finally:
        dist.destroy_process_group()


class _Pair:
    """The two ranks, their job queues and the shared result queue."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.folder = tempfile.mkdtemp(prefix="medssl_two_processes_")
        store = os.path.join(self.folder, "store")
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(WORLD_SIZE)]
        self.procs = [
            ctx.Process(target=_rank_loop, args=(r, WORLD_SIZE, store, self.jobs[r], self.results), daemon=True)
            for r in range(WORLD_SIZE)
        ]
        for p in self.procs:
            p.start()

    def run(self, worker, args: tuple, out: str) -> None:
        for q in self.jobs:
            q.put((worker, args, out))
        pending = set(range(WORLD_SIZE))
        while pending:
            try:
                rank, error = self.results.get(timeout=JOB_TIMEOUT_S)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                raise RuntimeError(
                    f"{worker.__name__}: no result within {JOB_TIMEOUT_S:.0f} s"
                    + (f" (rank(s) {dead} died, exit codes {[self.procs[r].exitcode for r in dead]})" if dead else "")
                ) from None
            if error is not None:
                raise RuntimeError(f"{worker.__name__} failed on rank {rank}:\n{error}")
            pending.discard(rank)

    def stop(self) -> None:
        for q, p in zip(self.jobs, self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


_pair: _Pair | None = None


def _stop() -> None:
    global _pair
    if _pair is not None:
        _pair.stop()
        _pair = None


atexit.register(_stop)


def run_two_processes(tmp_path, worker, *args) -> list:
    """``worker(rank, 2, *args)`` on two gloo ranks (one torch thread each); the two ranks' return values.

    ``worker`` must be a module-level function (it is pickled by name) that leaves no process group or global
    state behind that the next test's worker would trip on."""
    global _pair
    if _pair is None or not all(p.is_alive() for p in _pair.procs):
        _stop()
        _pair = _Pair()
    out = Path(tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    try:
        _pair.run(worker, args, str(out))
    except BaseException:
        _stop()  # a failed or hung job leaves the pair in an unknown state: the next test starts a fresh one
        raise
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
