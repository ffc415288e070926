"""Shared fixtures: one demo dataset per test session, repo paths, subprocess helpers, in-process bundle runs."""

from __future__ import annotations

import json

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
TOOLS = REPO / "tools"


@pytest.fixture(scope="session")
def demo_datalist(tmp_path_factory) -> Path:
    """The embedded demo dataset (tools/demo_data.py), built once per session; returns its datalist.json."""
    from medssl.data.demo import build_demo_dataset

    out = tmp_path_factory.mktemp("demo_data")
    return Path(build_demo_dataset(out, seed=0, learn=False))  # the learnability set: tests/test_demo_data.py


@pytest.fixture
def single_thread():
    """One intra-op thread for the test (tiny forwards on a shared CPU are fastest on one, and float rounding does
    not depend on the machine's core count); modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def subprocess_env(**extra: str) -> dict:
    """Environment for child processes: repo's tests importable, single-threaded BLAS, no GPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO / "common"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


def run_cmd(cmd: list[str], cwd: Path | None = None, timeout: float = 600, **env_extra: str):
    """Run a command, return the CompletedProcess; on failure the assertion shows the output tail."""
    proc = subprocess.run(
        cmd, cwd=cwd, env=subprocess_env(**env_extra), capture_output=True, text=True, timeout=timeout
    )
    return proc


PYTHON = sys.executable


def load_tool(filename: str, module_name: str):
    """Import ``tools/<filename>`` as a module registered under ``module_name`` (dataclasses and worker processes
    look it up by name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name, TOOLS / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config, items):
    """GPU tests are deselected (not skipped) on machines without CUDA, so a CPU run reports no skips."""
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def write_unlabelled_datalist(demo_datalist: Path, out: Path) -> Path:
    """The demo datalist with every ``label`` removed (a datalist without class labels), written to ``out``."""
    datalist = json.loads(Path(demo_datalist).read_text())
    for section in ("training", "validation", "test"):
        for item in datalist[section]:
            item.pop("label", None)
    out.write_text(json.dumps(datalist))
    return out


def bundle_train_log(bundle: Path, configs: list[str], demo_datalist: Path, out: Path, *extra: str) -> list[dict]:
    """``python -m monai.bundle run`` of ``bundle``'s ``configs`` on the demo data into ``out`` (its ckpt_dir inside);
    the records of its train_log.jsonl."""
    config_list = "[" + ",".join(f"'{bundle / 'configs' / c}'" for c in configs) + "]"
    cmd = [
        PYTHON, "-m", "monai.bundle", "run", "--config_file", config_list, "--bundle_root", str(bundle),
        "--dataset_dir", str(demo_datalist.parent), "--datalist", str(demo_datalist), "--output_dir", str(out),
        "--ckpt_dir", str(out / "ckpt"), *extra,
    ]
    proc = run_cmd(cmd, cwd=bundle, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return train_log_records(out)


def train_log_records(out: Path) -> list[dict]:
    """The records of a bundle run's ``out/train_log.jsonl``."""
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def run_bundle_in_process(bundle: Path, configs: list[str], *, out: Path | None = None,
                          datalist: Path | None = None, meta: bool = False, threads: int | None = None,
                          **overrides) -> None:
    """``monai.bundle.run`` (the function ``python -m monai.bundle run`` calls) of ``bundle``'s ``configs`` in this
    process: no interpreter start-up per run, unlike bundle_train_log above (the command in a subprocess).

    Adds over ``monai.bundle.run``: config names resolved in ``bundle/configs``, the common overrides, a thread count.
    bundle_root is ``bundle``; ``datalist`` gives datalist and dataset_dir (its folder); ``out`` gives output_dir and
    ckpt_dir (``out/ckpt``); ``meta`` adds meta_file (the bundle's configs/metadata.json); ``threads`` runs with that
    many torch intra-op threads and restores the previous count. ``overrides`` (e.g. ``epochs=1``,
    ``**{"knn#handlers": []}``) come last and win. Other global state (RNG, torch settings) stays as the run left
    it."""
    import torch
    from monai.bundle import run

    args = {"bundle_root": str(bundle)}
    if datalist is not None:
        args.update(dataset_dir=str(datalist.parent), datalist=str(datalist))
    if out is not None:
        args.update(output_dir=str(out), ckpt_dir=str(out / "ckpt"))
    if meta:
        args["meta_file"] = str(bundle / "configs" / "metadata.json")
    args.update(overrides)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        run(config_file=[str(bundle / "configs" / c) for c in configs], **args)
    finally:
        if threads is not None:
            torch.set_num_threads(previous)


def assert_resume_continues(run, serial: list[dict], serial_dir: Path, resumed_dir: Path, iteration: int) -> None:
    """A run resumed (``run(resumed_dir, "--resume", "true")``) from ``serial_dir``'s checkpoint of ``iteration`` logs
    the rest of the straight run's losses, bit for bit."""
    (resumed_dir / "ckpt").mkdir(parents=True)
    shutil.copy(serial_dir / "ckpt" / f"checkpoint_{iteration:08d}.pt", resumed_dir / "ckpt")
    tail = {r["iteration"]: r["loss"] for r in run(resumed_dir, "--resume", "true")}
    assert sorted(tail) == [r["iteration"] for r in serial if r["iteration"] > iteration]
    assert [tail[i] for i in sorted(tail)] == [r["loss"] for r in serial if r["iteration"] > iteration]
