"""Issue 14 item 5: tools/plot_embeddings.py on a datalist that mixes grey (1-channel) and RGB (3-channel) images,
as the demo datalist's training section does (fundus and histology are RGB); it failed with "stack expects each
tensor to be equal size"."""

from __future__ import annotations

import json
import subprocess

from conftest import PYTHON, TOOLS, subprocess_env


def test_plot_embeddings_on_mixed_channel_items(demo_datalist, tmp_path):
    from medssl.data import load_medical_image
    from medssl.evaluation.dvme_protocol import SMOKE_BACKBONES, write_random_encoders

    items = [it for it in json.loads(demo_datalist.read_text())["training"] if it["dim"] == 2]
    channels = {int(load_medical_image(str(demo_datalist.parent / it["image"])).shape[0]) for it in items
                if it["modality"] in ("FUNDUS", "PATH", "XR")}
    assert {1, 3} <= channels, channels  # the case of the issue is there
    spec = write_random_encoders(tmp_path / "enc", {"tiny": SMOKE_BACKBONES["resnet_basic"]})[0]
    out = tmp_path / "fig.png"
    cmd = [PYTHON, str(TOOLS / "plot_embeddings.py"), "--encoder", spec["path"], "--datalist", str(demo_datalist),
           "--out", str(out), "--section", "training", "--image-size", "32"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"{len(items)} 2D items of 'training'" in proc.stdout
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
