"""Two processes (torchrun, gloo, CPU) train to the same parameters as one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from medssl.utils import dist as distributed
from medssl.engines.checkpoint import FINAL_CHECKPOINT_NAME, load_checkpoint

import toy_training
from conftest import REPO, subprocess_env

TOY = str(REPO / "tests" / "toy_training.py")
# 16 items, 2 epochs; global batch 4 (one process x 4, or two x 2); runs without and with gradient accumulation
COMMON = ["--num-items", "16", "--epochs", "2", "--save-every-iters", "3", "--accumulate", "1", "2"]


@pytest.mark.distributed
def test_two_process_run_matches_one_process_run(tmp_path):
    ddp_out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        TOY,
        "--out",
        str(ddp_out),
        "--batch-size",
        "2",
        *COMMON,
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    for rank in (0, 1):  # ignite.distributed sees the process group init_distributed() created
        info = json.loads((ddp_out / f"dist_rank{rank}.json").read_text())
        assert info == {
            "rank": rank,
            "world_size": 2,
            "idist_rank": rank,
            "idist_world_size": 2,
            "idist_backend": "gloo",
        }

    single_out = tmp_path / "single"
    toy_training.run(["--out", str(single_out), "--batch-size", "4", *COMMON])

    for run in ("acc1", "acc2"):
        ddp_log = (ddp_out / run / "train_log.jsonl").read_text().splitlines()
        assert len(ddp_log) == 8  # rank 0 alone writes the log: one line per iteration (2 epochs x 4)
        ddp, single = (toy_training.read_log(out / run / "train_log.jsonl") for out in (ddp_out, single_out))
        assert sorted(ddp) == sorted(single) == list(range(1, 9))
        for it in single:  # the logged loss is the mean over the ranks = the loss of the global batch
            assert ddp[it]["loss"] == pytest.approx(single[it]["loss"], rel=1e-5, abs=1e-6), (run, it)
        ddp_final = load_checkpoint(ddp_out / run / "ckpt" / FINAL_CHECKPOINT_NAME)
        single_final = load_checkpoint(single_out / run / "ckpt" / FINAL_CHECKPOINT_NAME)
        assert ddp_final["world_size"] == 2 and len(ddp_final["rng"]) == 2 and single_final["world_size"] == 1
        assert ddp_final["engine"] == single_final["engine"]
        for name, value in single_final["method"].items():
            torch.testing.assert_close(ddp_final["method"][name], value, rtol=1e-5, atol=5e-6, msg=f"{run} {name}")
        start = toy_training.ToyMethod()  # and training did move the parameters
        assert any(
            v.shape == single_final["method"][k].shape and not torch.allclose(v, single_final["method"][k])
            for k, v in start.state_dict().items()
        )


def test_distributed_helpers_without_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_distributed() is False  # no-op without the torchrun environment
    assert not torch.distributed.is_initialized()
    assert distributed.local_device() == torch.device("cpu")
    assert distributed.is_main_process() and distributed.get_rank() == 0 and distributed.get_world_size() == 1
    distributed.destroy_distributed()  # no-op
    distributed.barrier()  # no-op
