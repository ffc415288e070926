"""Resume continues the same trajectory: SIGKILL mid-epoch after a checkpoint, resume, compare with an uninterrupted
run iteration by iteration (train_log.jsonl, last line per iteration) and the final parameters (bit-exact, CPU,
deterministic algorithms). The toy method uses dropout (global torch RNG), so the RNG restore is checked too."""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from medssl.engines.checkpoint import FINAL_CHECKPOINT_NAME, list_checkpoints, load_checkpoint

import toy_training
from conftest import REPO, subprocess_env

TOY = str(REPO / "tests" / "toy_training.py")
# 3 epochs x 6 iterations; a checkpoint every 4 iterations and at each epoch end; dropout on
RUN_ARGS = ["--epochs", "3", "--num-items", "24", "--batch-size", "4", "--save-every-iters", "4", "--dropout", "0.1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run (in this process; the runs below are in other processes)."""
    out = tmp_path_factory.mktemp("reference")
    toy_training.run(["--out", str(out), *RUN_ARGS])
    return out


def assert_same_trajectory(reference: Path, run: Path) -> None:
    expected = toy_training.read_log(reference / "train_log.jsonl")
    got = toy_training.read_log(run / "train_log.jsonl")
    assert sorted(got) == sorted(expected) == list(range(1, 19))
    for iteration, rec in expected.items():
        for key in ("loss", "align", "reg", "lr", "weight_decay", "temperature"):
            assert got[iteration][key] == rec[key], f"iteration {iteration}: {key} {got[iteration][key]} != {rec[key]}"
    final_ref = load_checkpoint(reference / "ckpt" / FINAL_CHECKPOINT_NAME)
    final = load_checkpoint(run / "ckpt" / FINAL_CHECKPOINT_NAME)
    for name, value in final_ref["method"].items():
        assert torch.equal(final["method"][name], value), name
    assert final["engine"] == final_ref["engine"]


def start_and_kill(out: Path, stall_after: int, num_workers: int) -> None:
    """Run the toy training in a subprocess; it hangs after iteration ``stall_after`` (its checkpoint and log line
    written); SIGKILL it there."""
    cmd = [
        sys.executable,
        TOY,
        "--out",
        str(out),
        *RUN_ARGS,
        "--num-workers",
        str(num_workers),
        "--stall-after-iter",
        str(stall_after),
    ]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = out / "stalled"
    deadline = time.monotonic() + 240
    try:
        while not marker.exists():
            if proc.poll() is not None:
                output = proc.stdout.read()
                pytest.fail(f"toy run exited with {proc.returncode} before iteration {stall_after}:\n{output}")
            if time.monotonic() > deadline:
                pytest.fail("toy run did not reach the stall point in time")
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_after_sigkill_mid_epoch(reference, tmp_path, num_workers, caplog):
    out = tmp_path / "run"
    start_and_kill(out, stall_after=10, num_workers=num_workers)
    # killed in epoch 2 after iteration 10; the last checkpoint is iteration 8 (epoch 2, 2 of 6 batches done)
    assert [it for it, _ in list_checkpoints(out / "ckpt")] == [4, 6, 8]
    assert not (out / "ckpt" / FINAL_CHECKPOINT_NAME).exists()
    assert max(toy_training.read_log(out / "train_log.jsonl")) == 10  # iterations 9, 10 will be redone
    resume_args = ["--out", str(out), *RUN_ARGS, "--num-workers", str(num_workers), "--resume"]
    if num_workers == 0:  # resume in a fresh process, as a user would
        proc = subprocess.run(
            [sys.executable, TOY, *resume_args], env=subprocess_env(), capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        log_text = proc.stdout + proc.stderr
    else:  # and in this process (DataLoader workers forked from here)
        with caplog.at_level(logging.INFO):
            toy_training.run(resume_args)
        log_text = caplog.text
    checkpoint_8 = out / "ckpt" / "checkpoint_00000008.pt"
    assert f"resumed from {checkpoint_8} at epoch 2 iteration 8" in log_text
    assert_same_trajectory(reference, out)


def test_resume_at_an_epoch_boundary(reference, tmp_path):
    """A run stopped by engine.terminate() at the end of epoch 1 and resumed (RNG restored before epoch 2 starts)."""
    out = tmp_path / "run"
    trainer = toy_training.build_trainer(toy_training.parse_args(["--out", str(out), *RUN_ARGS]), out)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=6), lambda e: e.terminate())
    trainer.run()
    assert trainer.state.iteration == 6 and [it for it, _ in list_checkpoints(out / "ckpt")] == [4, 6]
    assert not (out / "ckpt" / FINAL_CHECKPOINT_NAME).exists()  # stopped early: no "final" checkpoint
    toy_training.run(["--out", str(out), *RUN_ARGS, "--resume"])
    assert_same_trajectory(reference, out)


def test_resume_flags(reference, tmp_path, caplog):
    # resume=True with no checkpoint: a fresh run, with a warning
    out = tmp_path / "fresh"
    with caplog.at_level(logging.WARNING):
        trainer = toy_training.build_trainer(toy_training.parse_args(["--out", str(out), *RUN_ARGS, "--resume"]), out)
    assert f"resume=True but {out / 'ckpt'} holds no checkpoint: starting a fresh run" in caplog.text
    assert trainer.state.iteration == 0

    # resume=False where checkpoints exist: refused, nothing mixed
    with pytest.raises(FileExistsError, match="already holds checkpoints of another run .*resume=True"):
        toy_training.build_trainer(toy_training.parse_args(["--out", str(reference), *RUN_ARGS]), reference)

    # resuming a completed run (latest = checkpoint_final.pt) does nothing
    log_before = (reference / "train_log.jsonl").read_text()
    with caplog.at_level(logging.INFO):
        done = toy_training.build_trainer(
            toy_training.parse_args(["--out", str(reference), *RUN_ARGS, "--resume"]), reference
        )
        done.run()
    assert done.state.iteration == 18 and "training already complete: iteration 18 of 18" in caplog.text
    assert (reference / "train_log.jsonl").read_text() == log_before

    # an explicit checkpoint path that does not exist is an error
    from medssl.engines.checkpoint import CheckpointHandler

    handler = CheckpointHandler(tmp_path / "c", resume=str(tmp_path / "missing.pt"))
    with pytest.raises(RuntimeError, match="missing.pt'?: no such checkpoint file"):
        handler.attach(trainer)

    # a checkpoint from a run with another epoch length cannot continue this one
    other = toy_training.build_trainer(
        toy_training.parse_args(["--out", str(tmp_path / "o"), "--num-items", "16"]), tmp_path / "o"
    )
    with pytest.raises(ValueError, match="written with epoch_length 6 but the engine now has 4 iterations per epoch"):
        CheckpointHandler(tmp_path / "c2").load(other, reference / "ckpt" / "checkpoint_00000016.pt")


def test_resume_falls_back_over_unreadable_newest_checkpoints(reference, tmp_path, caplog):
    """Issue 13 item 5: an empty checkpoint_final.pt and a truncated newest periodic checkpoint are skipped (a
    warning names each) and the run resumes from the newest readable one, on the same trajectory."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    ckpt = out / "ckpt"
    assert [it for it, _ in list_checkpoints(ckpt)] == [12, 16, 18]
    final, newest = ckpt / FINAL_CHECKPOINT_NAME, ckpt / "checkpoint_00000018.pt"
    final.write_bytes(b"")
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.INFO):
        trainer = toy_training.build_trainer(toy_training.parse_args(["--out", str(out), *RUN_ARGS, "--resume"]), out)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[0].startswith(f"skipping {final}: unreadable checkpoint: empty file (0 bytes)")
    assert warnings[1].startswith(f"skipping {newest}: unreadable checkpoint: truncated or corrupt")
    assert f"resumed from {ckpt / 'checkpoint_00000016.pt'} at epoch 3 iteration 16" in caplog.text
    trainer.run()
    assert_same_trajectory(reference, out)  # iterations 17, 18 redone; both bad files rewritten whole

    # nothing readable: one line listing every file and its problem
    for path in (final, *(p for _, p in list_checkpoints(ckpt))):
        path.write_bytes(path.read_bytes()[:100])
    final.write_bytes(b"")
    with pytest.raises(RuntimeError) as info:
        toy_training.build_trainer(toy_training.parse_args(["--out", str(out), *RUN_ARGS, "--resume"]), out)
    message = str(info.value)
    assert "\n" not in message and f"{ckpt}: no readable checkpoint: " in message
    assert f"{FINAL_CHECKPOINT_NAME} (unreadable checkpoint: empty file (0 bytes))" in message
    for name in ("checkpoint_00000012.pt", "checkpoint_00000016.pt", "checkpoint_00000018.pt"):
        assert f"{name} (unreadable checkpoint: truncated or corrupt (100 bytes; torch.load: " in message


def test_load_checkpoint_names_the_unreadable_file(tmp_path):
    from medssl.engines.checkpoint import CheckpointHandler, CheckpointReadError

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointReadError, match=rf"^{empty}: unreadable checkpoint: empty file \(0 bytes\)$"):
        load_checkpoint(empty)
    handler = CheckpointHandler(tmp_path / "c", resume=str(empty))  # an explicit path: no fallback, the file named
    with pytest.raises(CheckpointReadError, match=rf"^{empty}: unreadable"):
        handler.load(None, empty)
