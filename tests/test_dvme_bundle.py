"""bundles/dvme_classification end to end on the demo data: the smoke run writes the results table and both pictures,
a second run reads every embedding from the cache, and evaluate.json on the kept checkpoint reproduces (image in,
probabilities out) the test AUC the protocol measured on cached embeddings."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import BUNDLES, PYTHON, run_cmd

BUNDLE = BUNDLES / "dvme_classification"


def _run(configs: list[str], demo_datalist, out, *extra: str):
    config_list = "[" + ",".join(f"'{BUNDLE / 'configs' / c}'" for c in configs) + "]"
    cmd = [PYTHON, "-m", "monai.bundle", "run", "--config_file", config_list, "--bundle_root", str(BUNDLE),
           "--dataset_dir", str(demo_datalist.parent), "--datalist", str(demo_datalist), "--output_dir", str(out),
           "--ckpt_dir", str(out / "ckpt"), *extra]
    proc = run_cmd(cmd, cwd=BUNDLE, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow  # 30+ s; covered in the default suite by: the DVME bundle also runs in test_bundle_runs.py (smoke, 2 processes) and test_bundle_dataset_data.py; its protocol in test_dvme_protocol.py
def test_smoke_twice_reuses_the_cache_and_evaluate_matches(demo_datalist, tmp_path):
    out = tmp_path / "run"
    first = _run(["train.json", "smoke.json"], demo_datalist, out)
    for name in ("results.csv", "results.md", "results_summary.json", "attention_map.png", "tsne.png",
                 "train_log.jsonl"):
        assert (out / name).is_file(), f"{name} missing; output:\n{first[-2000:]}"
    table = (out / "results.md").read_text()
    assert "| dvme |" in table and "| dvme_no_attention |" in table and "single:mit" in table and "±" in table
    # 3 encoders x 3 sections, all computed the first time
    assert len(re.findall(r"/\w+: \(\d+, \d+\) computed", first)) == 9
    cache = sorted((out / "embedding_cache").glob("*.pt"))
    assert len(cache) == 9
    stamps = {p: p.stat().st_mtime_ns for p in cache}

    second = _run(["train.json", "smoke.json"], demo_datalist, out)
    assert len(re.findall(r"read from cache", second)) >= 9 and " computed (" not in second
    assert {p: p.stat().st_mtime_ns for p in sorted((out / "embedding_cache").glob("*.pt"))} == stamps

    ckpt_path = out / "ckpt" / "checkpoint_final.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert [e["name"] for e in ckpt["encoders"]] == ["resnet_bottleneck", "resnet_basic", "mit"]
    _run(["train.json", "smoke.json", "evaluate.json"], demo_datalist, out, "--model_path", str(ckpt_path))
    summary = json.loads((out / "eval" / "metrics_summary.json").read_text())
    assert summary["num_cases"] == 30
    assert summary["auc_macro"] == pytest.approx(ckpt["test_auc"], abs=1e-4)
