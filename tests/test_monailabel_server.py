"""Issue 14: our segmentation bundles served and trained by a real MONAI Label 0.8.5 server (opt-in).

Needs the separate environment of ``tools/monailabel_env.sh`` (default ``~/.cache/medssl/monailabel-env``, or
``MEDSSL_MONAILABEL_ENV``); without it the test is skipped with that reason. Run it with
``python -m pytest -m monailabel tests/test_monailabel_server.py``.

For each segmentation bundle it lays out what the docs describe: the stock ``monaibundle`` app with a copy of the
bundle in ``model/<name>`` (smoke sizes merged into train.json and inference.json so that CPU is enough; MONAI
Label's retraining keys ``existing_checkpoints: overwrite`` and ``publish_model_path``), a studies folder of demo
images with their masks in ``labels/final``; it starts the server on 127.0.0.1, calls ``/info/``, ``/infer`` and
``/train/`` (one epoch) twice, checks the results (mask shape and dtype, labels, models/model.pt replaced), and stops
the server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import BUNDLES, subprocess_env

ENV = Path(os.environ.get("MEDSSL_MONAILABEL_ENV")
           or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medssl" / "monailabel-env")
SERVER = ENV / "bin" / "monailabel"

pytestmark = [
    pytest.mark.monailabel,
    pytest.mark.skipif(not SERVER.is_file(), reason=f"no MONAI Label environment at {ENV} (tools/monailabel_env.sh)"),
]

CASES = {  # bundle: (dims, modality, smoke values for inference.json, image suffix)
    "xray_segmentation_2d": (2, "XR", {"image_size": [64, 64]}, ".png"),
    "ct_mr_segmentation_3d": (3, "CT", {"patch_size": [64, 64, 16]}, ".nii.gz"),
}
SMOKE_NET = {"resnet_layers": [1, 1, 1, 1], "resnet_block_inplanes": [8, 16, 32, 64],
             "decoder_channels": [32, 16, 16, 8, 8]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layout(bundle: str, demo_datalist: Path, root: Path) -> tuple[Path, Path, list[str]]:
    """(the app folder, the studies folder, the image ids)."""
    import torch
    from monai.bundle import ConfigParser

    dims, modality, infer_smoke, suffix = CASES[bundle]
    app = root / "apps" / "monaibundle"
    sample = next(ENV.glob("monailabel/sample-apps/monaibundle"), None) or next(
        ENV.glob("lib/python*/site-packages/monailabel/sample-apps/monaibundle"))
    shutil.copytree(sample, app)
    target = app / "model" / bundle
    shutil.copytree(BUNDLES / bundle, target, ignore=shutil.ignore_patterns("runs", "eval", "models"))
    train = ConfigParser()
    train.read_config([str(target / "configs" / "train.json"), str(target / "configs" / "smoke.json")])
    config = train.config  # train.json with smoke.json merged in (MONAI Label reads train.json alone)
    config.update({"existing_checkpoints": "overwrite", "publish_model_path": "$@bundle_root + '/models/model.pt'",
                   "num_workers": 0, "device": "cpu"})
    ConfigParser.export_config_file(config, str(target / "configs" / "train.json"), indent=2)
    infer = json.loads((target / "configs" / "inference.json").read_text())
    infer.update({**SMOKE_NET, **infer_smoke, "device": "$torch.device('cpu')"})
    (target / "configs" / "inference.json").write_text(json.dumps(infer, indent=2))
    parser = ConfigParser()
    parser.read_config(str(target / "configs" / "inference.json"))
    parser["bundle_root"] = str(target)
    (target / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), target / "models" / "model.pt")

    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    ids = []
    for it in json.loads(demo_datalist.read_text())["training"]:
        if (it["dim"] == dims and it["modality"] == modality and isinstance(it.get("label"), str) and len(ids) < 6
                and it["image"].endswith(suffix) and it["label"].endswith(suffix)):  # files, not DICOM series
            name = f"case{len(ids)}"
            shutil.copy(demo_datalist.parent / it["image"], studies / f"{name}{suffix}")
            shutil.copy(demo_datalist.parent / it["label"], studies / "labels" / "final" / f"{name}{suffix}")
            ids.append(name)
    return app, studies, ids


@pytest.mark.parametrize("bundle", sorted(CASES))
def test_monailabel_serves_and_trains_the_bundle(bundle, demo_datalist, tmp_path):
    import requests

    dims = CASES[bundle][0]
    app, studies, ids = _layout(bundle, demo_datalist, tmp_path)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [str(SERVER), "start_server", "--app", str(app), "--studies", str(studies), "--conf", "models", bundle,
         "--conf", "zoo_source", "github", "--conf", "sam2", "false", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        env=subprocess_env(PATH=f"{ENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"),  # its script runs `python`
    )
    try:
        for _ in range(300):
            try:
                info = requests.get(f"{url}/info/", timeout=5).json()
                break
            except requests.ConnectionError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-5000:]
                time.sleep(1)
        else:
            pytest.fail("the server did not answer /info/ in 300 s:\n" + (tmp_path / "server.log").read_text()[-5000:])
        model = info["models"][bundle]
        assert model["dimension"] == dims
        assert set(model["labels"]) >= {"lungs", "heart"} if dims == 2 else set(model["labels"]) >= {"organ"}

        result = requests.post(f"{url}/infer/{bundle}", params={"image": ids[0], "output": "image"},
                               data={"params": json.dumps({"device": "cpu"})}, timeout=600)
        assert result.status_code == 200, result.text[-3000:]
        out = tmp_path / f"pred{CASES[bundle][3]}"
        out.write_bytes(result.content)
        from monai.transforms import LoadImage

        mask = LoadImage(image_only=True, dtype=None)(str(out))  # the file's own dtype
        image = LoadImage(image_only=True)(str(studies / f"{ids[0]}{CASES[bundle][3]}"))
        assert tuple(mask.shape) == tuple(image.shape)[:dims] and np.asarray(mask).max() < 4
        if dims == 2:
            assert np.asarray(mask).dtype == np.uint8

        model_pt = app / "model" / bundle / "models" / "model.pt"
        stamps = [model_pt.stat().st_mtime_ns]
        for attempt in range(2):
            train = requests.post(f"{url}/train/{bundle}", params={"run_sync": True},
                                  json={"max_epochs": 1, "device": "cpu", "multi_gpu": False, "val_split": 0.2},
                                  timeout=1800)
            assert train.status_code == 200, f"/train/ #{attempt + 1}: {train.text[-3000:]}"
            stamps.append(model_pt.stat().st_mtime_ns)
            assert stamps[-1] != stamps[-2], f"/train/ #{attempt + 1} did not replace models/model.pt\n" + (
                tmp_path / "server.log").read_text()[-5000:]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
