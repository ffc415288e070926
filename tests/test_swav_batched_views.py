"""The SwAV bundle's opt-in batched data path (configs/batched_views.json, issue #12) trains on the demo data, its
views, hence its losses, do not depend on the number of DataLoader workers, and a run resumed from a mid-epoch
checkpoint continues the same loss sequence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import BUNDLES, PYTHON, run_cmd

BUNDLE = BUNDLES / "ssl_swav_multimodal_pretrain"


def _run(demo_datalist: Path, out: Path, num_workers: int, *extra: str) -> list[dict]:
    configs = "[" + ",".join(f"'{BUNDLE / 'configs' / c}'" for c in ("train.json", "smoke.json",
                                                                      "batched_views.json")) + "]"
    cmd = [
        PYTHON, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(BUNDLE),
        "--dataset_dir", str(demo_datalist.parent), "--datalist", str(demo_datalist), "--output_dir", str(out),
        "--ckpt_dir", str(out / "ckpt"), "--working_size", "64", "--num_workers", str(num_workers), *extra,
    ]
    proc = run_cmd(cmd, cwd=BUNDLE, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 30+ s; covered in the default suite by: the batched views in test_batched_augment.py and test_benchmark_loader.py
def test_batched_views_train_do_not_depend_on_workers_and_resume_exactly(demo_datalist, tmp_path):
    serial = _run(demo_datalist, tmp_path / "w0", 0)
    parallel = _run(demo_datalist, tmp_path / "w2", 2)
    assert len(serial) == len(parallel) > 0
    assert [r["loss"] for r in serial] == [r["loss"] for r in parallel]
    assert all(r["loss"] == r["loss"] for r in serial)  # finite, not NaN
    # resume from the checkpoint of iteration 6 (inside epoch 2 of 5-iteration epochs): the rest of the run again
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "ckpt").mkdir(parents=True)
    shutil.copy(tmp_path / "w0" / "ckpt" / "checkpoint_00000006.pt", resumed_dir / "ckpt")
    resumed = _run(demo_datalist, resumed_dir, 0, "--resume", "true")
    tail = {r["iteration"]: r["loss"] for r in resumed}
    assert sorted(tail) == [r["iteration"] for r in serial if r["iteration"] > 6]
    assert [tail[i] for i in sorted(tail)] == [r["loss"] for r in serial if r["iteration"] > 6]
