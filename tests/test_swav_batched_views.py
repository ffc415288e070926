"""The SwAV bundle's opt-in batched data path (configs/batched_views.json, issue #12) trains on the demo data, its
views, hence its losses, do not depend on the number of DataLoader workers, and a run resumed from a mid-epoch
checkpoint continues the same loss sequence."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import BUNDLES, assert_resume_continues, bundle_train_log

BUNDLE = BUNDLES / "ssl_swav_multimodal_pretrain"


def _run(demo_datalist: Path, out: Path, num_workers: int, *extra: str) -> list[dict]:
    return bundle_train_log(BUNDLE, ["train.json", "smoke.json", "batched_views.json"], demo_datalist, out,
                            "--working_size", "64", "--num_workers", str(num_workers), *extra)


@pytest.mark.slow  # 30+ s; covered in the default suite by: the batched views in test_batched_augment.py and test_benchmark_loader.py
def test_batched_views_train_do_not_depend_on_workers_and_resume_exactly(demo_datalist, tmp_path):
    serial = _run(demo_datalist, tmp_path / "w0", 0)
    parallel = _run(demo_datalist, tmp_path / "w2", 2)
    assert len(serial) == len(parallel) > 0
    assert [r["loss"] for r in serial] == [r["loss"] for r in parallel]
    assert all(r["loss"] == r["loss"] for r in serial)  # finite, not NaN
    # resume from the checkpoint of iteration 6 (inside epoch 2 of 5-iteration epochs): the rest of the run again
    assert_resume_continues(lambda out, *extra: _run(demo_datalist, out, 0, *extra), serial, tmp_path / "w0",
                            tmp_path / "resumed", 6)
