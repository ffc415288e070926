"""tools/gpu_figures.sh, the one prepared script for a lent GPU (issue #12): valid bash, checks filtered by ONLY, and
(slow) every check passes in its QUICK mode on a CPU, so a short GPU lease is not spent on a broken script."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO

SCRIPT = REPO / "tools" / "gpu_figures.sh"


def _run(tmp_path, data, **env):
    full_env = dict(os.environ, OUT=str(tmp_path / "out"), DATA=str(data), QUICK="1", OMP_NUM_THREADS="1", **env)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return (tmp_path / "out" / "summary.txt").read_text()


def test_script_is_valid_bash_and_only_runs_the_named_checks(tmp_path, demo_datalist):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    summary = _run(tmp_path, demo_datalist.parent, ONLY="no_such_check")
    assert "torch" in summary and "exit" not in summary


@pytest.mark.slow  # about 2 minutes: every check of the script in its QUICK sizes, the demo data built first
def test_every_check_passes_in_quick_mode(tmp_path, demo_datalist):
    summary = _run(tmp_path, tmp_path / "demo")
    names = ["demo_data", "tests_cuda", "swav_step", "step_swav", "step_swav_batched", "step_unimiss",
             "step_unimiss_batched", "step_swav_3d", "mit"]
    for name in names:
        assert f"{name}: exit 0" in summary, summary
