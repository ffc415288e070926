"""Every bundle runs for real on the demo data: `python -m monai.bundle run` with its smoke override, the same under
`torchrun --nproc_per_node=2` (gloo) through multi_gpu_train.json, and its inference network passes MONAI's
`verify_net_in_out`. The test-fixture bundle (tests/fixtures/bundles/toy_ssl_pretrain) runs through the same tests
so the contract is exercised even before the method bundles exist; it also covers `--tracking mlflow` and resuming
through the bundle command line."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest

from medssl.bundle import find_bundles

from conftest import BUNDLES, PYTHON, REPO, run_cmd

FIXTURE_BUNDLES = REPO / "tests" / "fixtures" / "bundles"
RUN_BUNDLES = find_bundles(BUNDLES) + find_bundles(FIXTURE_BUNDLES)
IDS = [b.name for b in RUN_BUNDLES]


def _bundle_run(bundle: Path, configs: list[str], demo_datalist: Path, out: Path, *extra: str, torchrun: bool = False):
    config_list = "[" + ",".join(f"'{bundle / 'configs' / c}'" for c in configs) + "]"
    launcher = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [PYTHON]
    cmd = launcher + [
        "-m", "monai.bundle", "run",
        "--config_file", config_list,
        "--bundle_root", str(bundle),
        "--dataset_dir", str(demo_datalist.parent),
        "--datalist", str(demo_datalist),
        "--output_dir", str(out),
        "--ckpt_dir", str(out / "ckpt"),
        *extra,
    ]
    proc = run_cmd(cmd, cwd=bundle, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    return proc


# bundles whose run is a chain of stages, each in its own folder of output_dir / ckpt_dir: the last stage's is checked
STAGE_FOLDERS = {"ssl_medcoss_continual_pretrain": "5_pathology"}


def _run_folder(out: Path, bundle: Path) -> Path:
    return out / STAGE_FOLDERS[bundle.name] if bundle.name in STAGE_FOLDERS else out


def _final_checkpoint(out: Path, bundle: Path) -> Path:
    return out / "ckpt" / STAGE_FOLDERS.get(bundle.name, "") / "checkpoint_final.pt"


def _losses(out: Path) -> dict[int, float]:
    log = out / "train_log.jsonl"
    assert log.is_file(), f"no training log in {out}"
    losses = {}
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        losses[rec["iteration"]] = rec["loss"]
    return losses


def _boolean_flags_as_text(bundle: Path, configs: list[str]) -> list[str]:
    """``--key true|false`` for every top-level boolean of the merged configs, with its own value but as the text a
    user types (python-fire hands "true" / "false" to the config as strings; amp is always given as "false")."""
    merged: dict = {}
    for name in configs:
        merged.update(json.loads((bundle / "configs" / name).read_text()))
    flags = {k: v for k, v in merged.items() if isinstance(v, bool) and not k.startswith("_") and k != "resume"}
    flags["amp"] = False
    return [arg for k, v in sorted(flags.items()) for arg in (f"--{k}", str(v).lower())]


# bundles whose smoke run another default-suite test makes through monai.bundle run (booleans as text included);
# kept under -m slow to hold the suite under 15 min
SMOKE_COVERED = {
    "ssl_medcoss_continual_pretrain": "test_medcoss_bundle.py's chain fixture (train.json + smoke.json, --amp false)",
    "report_classification": "test_report_classification.py::test_trained_network_evaluates_and_classifies_sentences"
                             "_from_a_text_file (train.json + smoke.json, then evaluate and inference)",
}
SMOKE_PARAMS = [
    pytest.param(b, id=b.name, marks=[pytest.mark.slow] if b.name in SMOKE_COVERED else []) for b in RUN_BUNDLES
]


def _check_health_records(out: Path, bundle: Path, stdout: str) -> None:
    """The SwAV bundle's smoke run writes one health record and one console health line per epoch (issue 11 item 2)."""
    from monai.bundle import ConfigParser

    records = [json.loads(line) for line in (out / "health.jsonl").read_text().splitlines()]
    epochs = ConfigParser.load_config_file(str(bundle / "configs" / "smoke.json"))["epochs"]
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    for r in records:
        assert r["verdict"] in ("ok", "warning") and 0.0 < r["emb_std_sqrt_d"] and r["eff_rank"] >= 1.0
        assert set(r["prototype_usage"]) and r["knn"]["knn_acc"] >= 0.0  # per-modality prototypes; kNN every epoch
    health_lines = [line for line in stdout.splitlines() if " health: " in line]
    assert len(health_lines) == epochs and all("prototypes used" in line for line in health_lines)


@pytest.mark.parametrize("bundle", SMOKE_PARAMS)
def test_smoke_run_on_demo_data(bundle, demo_datalist, tmp_path):
    """The smoke run, with every boolean parameter given on the command line as text ("--amp false")."""
    flags = _boolean_flags_as_text(bundle, ["train.json", "smoke.json"])
    proc = _bundle_run(bundle, ["train.json", "smoke.json"], demo_datalist, tmp_path, *flags)
    assert "amp=True ignored" not in proc.stdout + proc.stderr, "--amp false was read as a true value"
    assert _final_checkpoint(tmp_path, bundle).is_file()
    losses = _losses(_run_folder(tmp_path, bundle))
    assert losses and all(math.isfinite(v) for v in losses.values())
    if bundle.name == "ssl_swav_multimodal_pretrain":
        _check_health_records(tmp_path, bundle, proc.stdout)


# bundles whose two-process path another default-suite test runs; kept under -m slow to hold the suite under 15 min
TWO_PROCESS_COVERED = {
    "toy_ssl_pretrain": "test_distributed_engine.py (the same engine, 2 processes = 1 process)",
    "xray_classification": "test_classification_bundles.py::test_xray_two_process_finetune_from_pretrained",
    "ct_volume_classification": "xray_classification's (the same trainer, validation and multi_gpu_train.json)",
    "xray_segmentation_2d": "test_segmentation_bundles.py::test_two_process_finetune_from_encoder",
    "ct_mr_segmentation_3d": "test_segmentation_bundles.py::test_two_process_finetune_from_encoder (the same "
                             "SupervisedTrainer, segmentation task and multi_gpu_train.json)",
    "report_classification": "xray_classification's (the same SupervisedTrainer, SupervisedTask, validation and "
                             "multi_gpu_train.json); the tokenizers DDP would find unused are frozen "
                             "(test_report_classification.py)",
    "ssl_swav_multimodal_pretrain": "test_swav_method.py::test_two_ranks_train_in_sync (DDP of the method: queue, "
                                    "per-modality prototypes, classifier), test_sinkhorn.py / test_swav_loss.py "
                                    "(2 processes = 1), test_distributed_engine.py; the bundle's own torchrun run: "
                                    "test_batched_distributed.py (slow)",
    "xray_lesion_detection": "xray_classification's (the same medssl.downstream.SupervisedTrainer wraps the task in "
                             "DDP, the same batch sampler and multi_gpu_train.json); the detection task's own "
                             "steps: test_detection*.py",
    "ssl_joint_image_volume_pretrain": "test_joint_volume_bundle.py::test_stages_2_and_3_under_torchrun (the bundle "
                                       "under torchrun, stages 2-3), test_swav_method.py::test_two_ranks_train_in_sync "
                                       "(stage 1's SwAV method under DDP)",
    "ssl_unimiss_pretrain": "test_unimiss_method.py::test_two_process_ddp_leaves_the_other_path_untouched, "
                            "test_teacher.py / test_dino_loss.py (2 processes = 1: EMA teacher, centre); the bundle's "
                            "own torchrun run: test_batched_unimiss.py (slow)",
}
TWO_PROCESS_PARAMS = [
    pytest.param(b, id=b.name, marks=[pytest.mark.slow] if b.name in TWO_PROCESS_COVERED else []) for b in RUN_BUNDLES
]


@pytest.mark.distributed
@pytest.mark.parametrize("bundle", TWO_PROCESS_PARAMS)
def test_two_process_run_through_multi_gpu_config(bundle, demo_datalist, tmp_path):
    _bundle_run(bundle, ["train.json", "smoke.json", "multi_gpu_train.json"], demo_datalist, tmp_path, torchrun=True)
    assert _final_checkpoint(tmp_path, bundle).is_file()
    assert _losses(_run_folder(tmp_path, bundle))  # rank 0 wrote the log


@pytest.mark.parametrize("bundle", RUN_BUNDLES, ids=IDS)
def test_inference_network_in_out(bundle, monkeypatch):
    from monai.bundle import verify_net_in_out

    monkeypatch.chdir(bundle)
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        device="cpu",
    )


TOY = FIXTURE_BUNDLES / "toy_ssl_pretrain"


def test_mlflow_tracking_records_the_loss(demo_datalist, tmp_path):
    pytest.importorskip("mlflow", reason="the optional tracking extra (pip install -e '.[tracking]')")
    _bundle_run(TOY, ["train.json", "smoke.json"], demo_datalist, tmp_path, "--tracking", "mlflow")
    db = tmp_path / "mlruns.db"
    assert db.is_file(), "MONAI's --tracking mlflow wrote no tracking database under output_dir"
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT key, value FROM metrics WHERE key = 'train_loss'").fetchall()
    assert rows and all(math.isfinite(v) for _, v in rows)


@pytest.mark.slow  # covered by test_resume.py (exact resume after SIGKILL, the same CheckpointHandler) and
# test_medcoss_bundle.py (--resume true through monai.bundle run)
def test_resume_through_the_bundle_command_line(demo_datalist, tmp_path):
    """A finished 2-epoch run resumed with --resume true --epochs 3 continues at iteration 9 instead of restarting."""
    _bundle_run(TOY, ["train.json", "smoke.json"], demo_datalist, tmp_path)
    first = _losses(tmp_path)
    proc = _bundle_run(TOY, ["train.json", "smoke.json"], demo_datalist, tmp_path, "--resume", "true", "--epochs", "3")
    assert "resumed from" in (proc.stdout + proc.stderr)
    after = _losses(tmp_path)
    assert sorted(after) == list(range(1, len(first) * 3 // 2 + 1))
    assert all(after[i] == first[i] for i in first)


def test_fresh_run_refuses_a_checkpoint_folder_in_use(demo_datalist, tmp_path):
    """A second fresh run into the same ckpt_dir stops, naming the folder (in this process: the smoke runs above run
    the same bundle as a command)."""
    from monai.bundle import run

    kwargs = dict(config_file=[str(TOY / "configs" / c) for c in ("train.json", "smoke.json")], bundle_root=str(TOY),
                  dataset_dir=str(demo_datalist.parent), datalist=str(demo_datalist), output_dir=str(tmp_path),
                  ckpt_dir=str(tmp_path / "ckpt"))
    run(**kwargs)
    assert (tmp_path / "ckpt" / "checkpoint_final.pt").is_file()
    with pytest.raises(Exception) as error:
        run(**kwargs)
    chain, cause = [], error.value
    while cause is not None:
        chain.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__ or cause.__context__
    assert any("FileExistsError" in c and str(tmp_path / "ckpt") in c for c in chain), chain
