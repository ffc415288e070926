"""The MedCoSS bundle's five-stage chain (issue #15 items 4-5) through ``python -m monai.bundle run`` with smoke.json on
the demo data: every stage's outputs, the buffers and the stage table, the tokenizer handed on, the encoder file
loading into the inference network, and a chain killed inside stage 3 and resumed giving the same encoder and stage
table as an uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from medssl.downstream import multimodal_vit_encoder, prepare_network
from medssl.networks import MultiModalClassifier

from conftest import BUNDLES, PYTHON, run_cmd

BUNDLE = BUNDLES / "ssl_medcoss_continual_pretrain"
STAGES = ["1_reports", "2_xray", "3_ct", "4_mri", "5_pathology"]
KINDS = ["text", "2d", "3d", "3d", "2d"]


def _chain(demo_datalist: Path, out: Path, *extra: str, configs: tuple[str, ...] = ("train.json", "smoke.json")):
    cmd = [
        PYTHON, "-m", "monai.bundle", "run",
        "--config_file", "[" + ",".join(f"'{BUNDLE / 'configs' / c}'" for c in configs) + "]",
        "--bundle_root", str(BUNDLE), "--dataset_dir", str(demo_datalist.parent), "--datalist", str(demo_datalist),
        "--output_dir", str(out), "--ckpt_dir", str(out / "ckpt"), *extra,
    ]
    return run_cmd(cmd, cwd=BUNDLE, timeout=600, OMP_NUM_THREADS="1")


def _ok(proc):
    assert proc.returncode == 0, f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def chain(demo_datalist, tmp_path_factory):
    out = tmp_path_factory.mktemp("medcoss_chain")
    # booleans as the command line gives them (text), as test_bundle_runs.py's smoke run does for the other bundles
    proc = _ok(_chain(demo_datalist, out, "--amp", "false", "--find_unused_parameters", "false"))
    assert "amp=True ignored" not in proc.stdout + proc.stderr
    return out, proc


def test_every_stage_hands_on_its_encoder_tokenizer_buffer_and_table(chain):
    out, proc = chain
    for i, stage in enumerate(STAGES):
        folder = out / stage
        for name in ("stage_done.json", "encoder.pt", "heads.pt", "buffer.json", "buffers.json", "stage_table.json",
                     "stage_table.md", "train_log.jsonl", "tokenizer/tokenizer.json"):
            assert (folder / name).is_file(), f"{stage}: no {name}"
        assert (out / "ckpt" / stage / "checkpoint_final.pt").is_file()
        buffers = json.loads((folder / "buffers.json").read_text())
        assert [b["stage"] for b in buffers] == STAGES[: i + 1] and [b["kind"] for b in buffers] == KINDS[: i + 1]
        buffer = json.loads((folder / "buffer.json").read_text())
        assert buffer["stage"] == stage and 1 <= buffer["numTraining"] == len(buffer["training"])
        rows = json.loads((folder / "stage_table.json").read_text())["rows"]
        assert [r["stage"] for r in rows] == STAGES[: i + 1]
        # each row scores the stages seen so far (those with validation items in the demo datalist)
        assert all(set(r["losses"]) <= set(STAGES[: j + 1]) for j, r in enumerate(rows))
        assert "1_reports" in rows[-1]["losses"]
    # the same WordPiece vocabulary in every stage: trained once by the text stage
    vocab = {(out / s / "tokenizer" / "tokenizer.json").read_bytes() for s in STAGES}
    assert len(vocab) == 1
    # later stages rehearse every earlier one: distillation of each, finite
    log = [json.loads(line) for line in (out / "5_pathology" / "train_log.jsonl").read_text().splitlines()]
    for stage in STAGES[:4]:
        assert all(torch.isfinite(torch.tensor(r[f"loss_distill_{stage}"])) for r in log)
    assert "| after stage |" in proc.stdout  # the chain prints the last stage table


def test_stage_encoder_loads_into_the_inference_network(chain):
    from medssl.networks import MultiModalViTEmbedder

    out, _ = chain
    saved = torch.load(out / "5_pathology" / "encoder.pt", map_location="cpu", weights_only=True)
    assert saved["stage"] == "5_pathology" and saved["kind"] == "2d"
    net = MultiModalViTEmbedder("2d", **saved["config"])
    net.load_state_dict(saved["state_dict"], strict=True)
    net.eval()
    size = saved["config"]["img_size_2d"]
    assert net(torch.rand(2, 3, size, size)).shape == (2, saved["config"]["dim"])
    # a downstream bundle's --pretrained_path: the manifest beside it rebuilds and loads the 3D path of the CT stage
    ct = out / "3_ct" / "encoder.pt"
    clf = prepare_network(MultiModalClassifier(multimodal_vit_encoder(str(ct), "3d"), 2), str(ct), spatial_dims=3)
    ct_state = torch.load(ct, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(v, ct_state[k]) for k, v in clf.encoder.state_dict().items())


def test_chain_killed_inside_a_stage_resumes_to_the_same_encoder(chain, demo_datalist, tmp_path):
    """SIGKILL once stage 3 has written its first checkpoint, then --resume true: stages 1-2 are skipped, stage 3
    continues from its last checkpoint (teacher, decoder, optimiser, sampler and RNG state) and the chain ends with
    the uninterrupted run's encoder, tensor for tensor."""
    import os
    import signal
    import subprocess
    import time

    from conftest import subprocess_env

    full, _ = chain
    cmd = [
        PYTHON, "-m", "monai.bundle", "run",
        "--config_file", f"['{BUNDLE / 'configs' / 'train.json'}','{BUNDLE / 'configs' / 'smoke.json'}']",
        "--bundle_root", str(BUNDLE), "--dataset_dir", str(demo_datalist.parent), "--datalist", str(demo_datalist),
        "--output_dir", str(tmp_path), "--ckpt_dir", str(tmp_path / "ckpt"),
    ]
    proc = subprocess.Popen(cmd, cwd=BUNDLE, env=subprocess_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    stage3 = tmp_path / "ckpt" / "3_ct"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if stage3.is_dir() and any(stage3.glob("checkpoint_0*.pt")):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the chain ended before stage 3 could be killed"
    assert (tmp_path / "2_xray" / "stage_done.json").is_file() and not (tmp_path / "3_ct" / "stage_done.json").exists()
    assert not (stage3 / "checkpoint_final.pt").exists()
    # without --resume a finished stage is not run over: the chain stops, saying how to continue (checked in process)
    import medssl.engines.chain

    parser = ConfigParser(
        {"run": f"$medssl.engines.chain.run_stages({STAGES}, None, '{tmp_path}', '{tmp_path}', False)"},
        globals={"medssl": medssl},
    )
    with pytest.raises(RuntimeError) as error:
        parser.get_parsed_content("run")
    cause = error.value.__cause__
    while cause is not None and not isinstance(cause, FileExistsError):
        cause = cause.__cause__
    assert isinstance(cause, FileExistsError) and "--resume true" in str(cause)
    out = _ok(_chain(demo_datalist, tmp_path, "--resume", "true"))
    assert "stage 1_reports is done" in out.stdout + out.stderr
    a = torch.load(full / "5_pathology" / "encoder.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "5_pathology" / "encoder.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda root: json.loads((root / "5_pathology" / "stage_table.json").read_text())["rows"]  # noqa: E731
    assert rows(full) == rows(tmp_path)


def test_one_stage_config_runs_that_stage_alone(chain, demo_datalist, tmp_path):
    """configs/stages/5_pathology.json (run_only) in an output_dir holding stages 1-4: only stage 5 runs, and it ends
    with the whole chain's encoder and stage table."""
    full, _ = chain
    for stage in STAGES[:4]:
        shutil.copytree(full / stage, tmp_path / stage)
    out = _ok(_chain(demo_datalist, tmp_path, configs=("train.json", "stages/5_pathology.json", "smoke.json")))
    assert "stage 5_pathology (5 of 5)" in out.stdout + out.stderr and "(1 of 5)" not in out.stdout + out.stderr
    assert not (tmp_path / "ckpt" / "4_mri").exists()  # stages 1-4 were not run again
    a = torch.load(full / "5_pathology" / "encoder.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "5_pathology" / "encoder.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda root: json.loads((root / "5_pathology" / "stage_table.json").read_text())["rows"]  # noqa: E731
    assert rows(full) == rows(tmp_path)
