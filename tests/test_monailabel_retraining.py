"""Issue 14 item 2: MONAI Label's retraining convention. Every ``/train/`` retrains into the same bundle folder and
MONAI Label loads ``<bundle_root>/models/model.pt``: CheckpointHandler's ``existing_checkpoints`` says what a fresh
run does with the checkpoints already there, and PublishModelHandler copies the run's model to that file."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from medssl.engines.checkpoint import FINAL_CHECKPOINT_NAME, CheckpointHandler, list_checkpoints, load_checkpoint
from medssl.engines.handlers import PublishModelHandler, TrainingLogHandler
from medssl.engines.trainer import SSLTrainer

import toy_training
from conftest import BUNDLES, PYTHON, run_cmd


def _toy_run(out: Path, existing_checkpoints: str = "refuse", seed: int = 0) -> SSLTrainer:
    """Two epochs of the toy method (6 iterations each, a checkpoint every 4) into ``out``."""
    from monai.data import DataLoader
    from monai.utils import set_determinism

    from medssl.data.samplers import DistributedBatchSampler

    set_determinism(seed=seed)
    dataset = toy_training.make_dataset(24)
    loader = DataLoader(dataset, batch_sampler=DistributedBatchSampler(len(dataset), 4, seed=seed, drop_last=True))
    method = toy_training.ToyMethod()
    optimizer = torch.optim.AdamW(method.parameter_groups(base_lr=1e-2, weight_decay=0.0), lr=1e-2)
    handlers = [
        TrainingLogHandler(out, tensorboard=False),
        CheckpointHandler(out / "ckpt", objects={"method": method, "optimizer": optimizer}, save_every_iters=4,
                          existing_checkpoints=existing_checkpoints),
    ]
    trainer = SSLTrainer(device="cpu", max_epochs=2, data_loader=loader, method=method, optimizer=optimizer,
                         handlers=handlers)
    trainer.run()
    return trainer


def test_existing_checkpoints_refuse_overwrite_resume(tmp_path):
    _toy_run(tmp_path)
    first = load_checkpoint(tmp_path / "ckpt" / FINAL_CHECKPOINT_NAME)
    with pytest.raises(FileExistsError, match="already holds checkpoints.*existing_checkpoints='overwrite'"):
        _toy_run(tmp_path)  # the default: refuse

    # overwrite: a fresh run from iteration 0 over the old checkpoints (another seed: other weights)
    trainer = _toy_run(tmp_path, "overwrite", seed=1)
    assert trainer.state.iteration == 12
    second = load_checkpoint(tmp_path / "ckpt" / FINAL_CHECKPOINT_NAME)
    assert any(not torch.equal(second["method"][k], v) for k, v in first["method"].items())
    assert [i for i, _ in list_checkpoints(tmp_path / "ckpt")][-1] <= 12

    # resume: continues the latest checkpoint (here the final one: nothing left to do)
    trainer = _toy_run(tmp_path, "resume")
    assert trainer.state.iteration == 12
    with pytest.raises(ValueError, match="existing_checkpoints"):
        CheckpointHandler(tmp_path / "x", existing_checkpoints="keep")


def test_publish_model_handler_copies_the_first_existing_source(tmp_path):
    final = tmp_path / "runs" / "models" / "model_final.pt"
    final.parent.mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, final)
    target = tmp_path / "bundle" / "models" / "model.pt"
    handler = PublishModelHandler(target, [tmp_path / "runs" / "models" / "model.pt", final])
    assert handler.publish() == target and handler.published == final
    assert torch.equal(torch.load(target)["w"], torch.ones(2))
    assert not list(target.parent.glob(".*tmp*"))
    PublishModelHandler(None).attach(None)  # no target: nothing to do, nothing attached
    with pytest.raises(FileNotFoundError, match="no model to copy"):
        PublishModelHandler(target, [tmp_path / "missing.pt"]).publish()


# What MONAI Label's BundleTrainTask (monailabel 0.8, single GPU) does for /train/: monai.bundle.run with these
# overrides; from the second /train/ on, a CheckpointLoader of <bundle_root>/models/model.pt heads train#handlers.
MONAI_LABEL_TRAIN = textwrap.dedent('''
    import json, os, sys
    import monai.bundle
    from monai.bundle import ConfigParser
    bundle, configs, data, run_dir = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    parser = ConfigParser()
    parser.read_config(configs)
    handlers = parser.get("train#handlers", [])
    model = os.path.join(bundle, "models", "model.pt")
    if os.path.exists(model):
        handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": model, "load_dict": {"model": "$@network"},
                            "strict": False})
    monai.bundle.run(run_id="run", init_id=None, final_id=None, config_file=configs,
                     meta_file=os.path.join(bundle, "configs", "metadata.json"), **{
        "bundle_root": bundle, "train#trainer#max_epochs": 1, "train#dataset#data": data["train"],
        "validate#dataset#data": data["val"], "device": "cpu", "train#handlers": handlers,
        "output_dir": run_dir, "ckpt_dir": run_dir + "/ckpt",
        "existing_checkpoints": "overwrite", "publish_model_path": "$@bundle_root + '/models/model.pt'",
    })
''')


def test_monailabel_style_train_twice_writes_models_model_pt(demo_datalist, tmp_path):
    """/train/ twice in a row on a copy of xray_segmentation_2d (smoke sizes): the second run retrains over the
    first's checkpoints, starts from the published model, and replaces models/model.pt."""
    import shutil

    bundle = tmp_path / "xray_segmentation_2d"
    shutil.copytree(BUNDLES / "xray_segmentation_2d", bundle, ignore=shutil.ignore_patterns("runs", "models"))
    items = [it for it in json.loads(demo_datalist.read_text())["training"]
             if it["modality"] == "XR" and isinstance(it.get("label"), str)][:6]
    items = [{"image": str(demo_datalist.parent / it["image"]), "label": str(demo_datalist.parent / it["label"])}
             for it in items]
    data = {"train": items[:4], "val": items[4:]}
    configs = [str(bundle / "configs" / c) for c in ("train.json", "smoke.json")]
    script = tmp_path / "monailabel_train.py"
    script.write_text(MONAI_LABEL_TRAIN)
    model = bundle / "models" / "model.pt"
    stamps = []
    for attempt in range(2):
        proc = run_cmd([PYTHON, str(script), str(bundle), json.dumps(configs), json.dumps(data),
                        str(bundle / "runs")], cwd=bundle, timeout=900)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"/train/ #{attempt + 1}\n{out[-6000:]}"
        assert model.is_file(), out[-3000:]
        stamps.append((model.stat().st_mtime_ns, model.read_bytes()))
        assert "4 of 4 items had no 'modality'" in out
    assert "deleting the" in out and "checkpoint(s) of the previous run" in out  # the second run overwrote
    assert stamps[1][0] != stamps[0][0]
