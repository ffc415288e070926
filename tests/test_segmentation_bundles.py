"""The segmentation bundles end to end on the demo data: train (smoke sizes) -> evaluate -> inference, from scratch and
from an exported encoder (finetune and linear modes, ResNet-50-style trunk and UniMiSS MiT), the per-case CSV /
summary JSON / NIfTI outputs, the inference network contract (verify_net_in_out, TorchScript export) of the MiT
variants, and one 2-process torchrun run from an encoder. Workflows run in-process (monai.bundle.run) to keep the file
fast; the generic tests (test_bundle_runs.py, test_bundle_contract.py) cover the default configs as subprocesses."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.networks import MiT, ResNetBackbone
from medssl.weights import MANIFEST_FORMAT, write_encoder_files

from conftest import BUNDLES, PYTHON, run_bundle_in_process, run_cmd

B2D = BUNDLES / "xray_segmentation_2d"
B3D = BUNDLES / "ct_mr_segmentation_3d"
TINY_TRUNK = {"spatial_dims": 2, "in_channels": 1, "layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 32, 64]}
TINY_MIT = {"spatial_dims": [2, 3], "decoder": True, "img_size_2d": 64, "img_size_3d": [64, 64, 16],
            "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1], "dims": [8, 16, 32, 64], "decoder_dims": [32, 16, 8]}


def _configs(bundle: Path, *names: str) -> list[str]:
    return [str(bundle / "configs" / n) for n in names]


def _write_encoder(out: Path, module: torch.nn.Module, target: str, kwargs: dict, spatial_dims) -> Path:
    """An encoder file + manifest as tools/export_encoder.py writes them."""
    record = {
        "format": MANIFEST_FORMAT,
        "weights": out.name,
        "method": "tests",
        "backbone": {"_target_": target, "kwargs": kwargs},
        "spatial_dims": spatial_dims,
        "in_channels": 1,
        "preprocessing": {"channels": 1},
    }
    write_encoder_files(module.state_dict(), out, record)
    return out


def _train_overrides(out: Path, n_train: int, n_val: int, dims: int, **extra) -> dict:
    return {
        "output_dir": str(out),
        "ckpt_dir": str(out / "ckpt"),
        "epochs": 1,
        "train#items": f"$medssl.downstream.label_fraction_subset(@train#all_items, @label_fraction, @seed, stratify=False)[:{n_train}]",
        "validate#items": f"$medssl.data.load_items(@datalist, 'validation', @dataset_dir, dims=[{dims}], modalities=@modalities, keys=['image', 'label', 'modality', 'dim'], labelled_only='mask', max_items={n_val})",
        **extra,
    }


def _eval_overrides(out: Path, model: Path, dims: int, n: int) -> dict:
    return {
        "output_dir": str(out),
        "model_path": str(model),
        "validate#items": f"$medssl.data.load_items(@datalist, @section, @dataset_dir, dims=[{dims}], modalities=@modalities, keys=['image', 'label', 'modality', 'dim'], labelled_only='mask', max_items={n})",
    }


def _infer_overrides(out: Path, model: Path, dims: int, n: int, smoke: dict) -> dict:
    return {
        "output_dir": str(out),
        "model_path": str(model),
        "items": f"$medssl.data.load_items(@datalist, @section, @dataset_dir, dims=[{dims}], modalities=@modalities, keys=['image', 'modality', 'dim'], labelled_only='mask', max_items={n})",
        **smoke,
    }


SMOKE_2D = {"image_size": [64, 64], "resnet_layers": [1, 1, 1, 1], "resnet_block_inplanes": [8, 16, 32, 64],
            "decoder_channels": [32, 16, 16, 8, 8], "mit_variant": "tiny", "mit_dims": [8, 16, 32, 64],
            "mit_decoder_dims": [32, 16, 8], "mit_img_size": 64}
SMOKE_3D = {"patch_size": [64, 64, 16], "resnet_layers": [1, 1, 1, 1], "resnet_block_inplanes": [8, 16, 32, 64],
            "decoder_channels": [32, 16, 16, 8, 8], "mit_variant": "tiny", "mit_dims": [8, 16, 32, 64],
            "mit_decoder_dims": [32, 16, 8], "mit_img_size": [64, 64, 16], "sw_batch_size": 4}


def _check_metrics(out: Path, class_names: list[str], n_cases: int) -> list[dict]:
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == n_cases
    expected = ["case"] + [f"{m}/{c}" for c in class_names[1:] for m in ("dice", "iou")]
    expected += [f"hd95/{c}" for c in class_names[1:]] + ["dice_mean", "iou_mean", "hd95_mean"]
    assert list(rows[0]) == expected
    for row in rows:
        assert Path(row["case"]).is_file()
        assert all(0.0 <= float(row[f"dice/{c}"]) <= 1.0 for c in class_names[1:] if row[f"dice/{c}"] != "nan")
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["dice_mean"]["count"] >= 1 and 0.0 <= summary["dice_mean"]["mean"] <= 1.0
    return rows


def _check_masks(out: Path, datalist: Path, dims: int, n: int, num_classes: int) -> None:
    from medssl.data import load_items

    items = load_items(datalist, "test", datalist.parent, dims=[dims], modalities=None, keys=["image", "label"],
                       labelled_only="mask")
    items = [it for it in items if (out / (Path(it["image"]).name.split(".")[0] + "_seg.nii.gz")).is_file()]
    assert len(items) == n and len(list(out.glob("*_seg.nii.gz"))) == n
    for it in items:
        mask = nib.load(out / (Path(it["image"]).name.split(".")[0] + "_seg.nii.gz"))
        values = np.asarray(mask.dataobj)
        if dims == 3:  # the RAS demo volumes: same grid and world affine as the input
            image = nib.load(it["image"])
            assert values.shape == image.shape
            np.testing.assert_allclose(mask.affine, image.affine, atol=1e-4)
        else:  # the 2D prediction is resized back to the image's own size
            from PIL import Image

            width, height = Image.open(it["image"]).size
            assert sorted(values.shape[:2]) == sorted((height, width))
        assert values.min() >= 0 and values.max() < num_classes


def test_xray_2d_finetune_from_exported_resnet_encoder(demo_datalist, tmp_path, capsys):
    trunk = ResNetBackbone(**TINY_TRUNK)
    encoder = _write_encoder(tmp_path / "encoder.pt", trunk, "medssl.networks.ResNetBackbone", TINY_TRUNK, 2)
    out = tmp_path / "train"
    run_bundle_in_process(B2D, ["train.json", "smoke.json"], datalist=demo_datalist,
                          **_train_overrides(out, 2, 1, 2, finetune_mode="finetune", pretrained_path=str(encoder)))
    printed = capsys.readouterr().out
    assert f"{len(trunk.state_dict())}" in printed and "encoder.pt" in printed  # the load report
    model = out / "models" / "model_final.pt"
    assert model.is_file() and (out / "val_metrics.csv").is_file() and (out / "ckpt" / "checkpoint_final.pt").is_file()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log and all(math.isfinite(rec["loss"]) for rec in log)

    run_bundle_in_process(B2D, ["train.json", "smoke.json", "evaluate.json"], datalist=demo_datalist,
                          **_eval_overrides(tmp_path / "eval", model, 2, 1))
    _check_metrics(tmp_path / "eval", ["background", "lungs", "heart", "clavicles"], 1)

    run_bundle_in_process(B2D, ["inference.json"], datalist=demo_datalist,
                          **_infer_overrides(tmp_path / "infer", model, 2, 2, SMOKE_2D), modalities=["XR"])
    _check_masks(tmp_path / "infer", demo_datalist, 2, 2, 4)


def test_xray_2d_mit_from_scratch(demo_datalist, tmp_path):
    out = tmp_path / "train"
    run_bundle_in_process(B2D, ["train.json", "mit.json", "smoke.json"], datalist=demo_datalist,
                          **_train_overrides(out, 2, 1, 2))
    model = out / "models" / "model_final.pt"
    state = torch.load(model, weights_only=True)
    assert any(k.startswith("encoder.encoder.stem.2d.") for k in state) and not any(".3d." in k for k in state)
    run_bundle_in_process(B2D, ["train.json", "mit.json", "smoke.json", "evaluate.json"], datalist=demo_datalist,
                          **_eval_overrides(tmp_path / "eval", model, 2, 1))
    _check_metrics(tmp_path / "eval", ["background", "lungs", "heart", "clavicles"], 1)
    run_bundle_in_process(B2D, ["inference.json", "mit.json"], datalist=demo_datalist,
                          **_infer_overrides(tmp_path / "infer", model, 2, 1, SMOKE_2D))
    _check_masks(tmp_path / "infer", demo_datalist, 2, 1, 4)


def test_ct_mr_3d_slice_wise_linear_from_2d_encoder(demo_datalist, tmp_path):
    """linear mode: the 2D trunk is loaded slice-wise and stays frozen (its tensors, BatchNorm statistics included,
    are those of the file after training)."""
    trunk = ResNetBackbone(**TINY_TRUNK)
    for module in trunk.modules():  # non-trivial BatchNorm statistics, to see that they stay frozen
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
    encoder = _write_encoder(tmp_path / "encoder.pt", trunk, "medssl.networks.ResNetBackbone", TINY_TRUNK, 2)
    out = tmp_path / "train"
    run_bundle_in_process(B3D, ["train.json", "smoke.json"], datalist=demo_datalist,
                          **_train_overrides(out, 2, 1, 3, finetune_mode="linear", pretrained_path=str(encoder)))
    model = out / "models" / "model_final.pt"
    state = torch.load(model, weights_only=True)
    for key, value in trunk.state_dict().items():
        torch.testing.assert_close(state[f"encoder.{key}"], value, msg=f"encoder.{key} changed in linear mode")
    decoder = [k for k in state if k.startswith("decoder.")]
    assert decoder

    run_bundle_in_process(B3D, ["train.json", "smoke.json", "evaluate.json"], datalist=demo_datalist,
                          **_eval_overrides(tmp_path / "eval", model, 3, 1))
    _check_metrics(tmp_path / "eval", ["background", "organ", "lesion"], 1)
    run_bundle_in_process(B3D, ["inference.json"], datalist=demo_datalist,
                          **_infer_overrides(tmp_path / "infer", model, 3, 1, SMOKE_3D))
    _check_masks(tmp_path / "infer", demo_datalist, 3, 1, 3)


def test_ct_mr_3d_mit_finetune_from_unimiss_encoder(demo_datalist, tmp_path, capsys):
    mit = MiT(**TINY_MIT)
    encoder = _write_encoder(tmp_path / "mit.pt", mit, "medssl.networks.MiT", TINY_MIT, [2, 3])
    out = tmp_path / "train"
    run_bundle_in_process(B3D, ["train.json", "mit.json", "smoke.json"], datalist=demo_datalist,
                          **_train_overrides(out, 2, 1, 3, finetune_mode="finetune", pretrained_path=str(encoder)))
    printed = capsys.readouterr().out
    assert "2D path" in printed  # the unused 2D path is reported as ignored
    model = out / "models" / "model_final.pt"
    run_bundle_in_process(B3D, ["train.json", "mit.json", "smoke.json", "evaluate.json"], datalist=demo_datalist,
                          **_eval_overrides(tmp_path / "eval", model, 3, 1))
    rows = _check_metrics(tmp_path / "eval", ["background", "organ", "lesion"], 1)
    assert rows[0]["case"].endswith(".nii.gz") or Path(rows[0]["case"]).is_dir()
    run_bundle_in_process(B3D, ["inference.json", "mit.json"], datalist=demo_datalist,
                          **_infer_overrides(tmp_path / "infer", model, 3, 1, SMOKE_3D))
    _check_masks(tmp_path / "infer", demo_datalist, 3, 1, 3)


def test_wrong_dimension_encoder_fails_clearly(tmp_path):
    """The bundles load through medssl.downstream.prepare_network: a 2D-only MiT offered to the 3D MiT segmenter is
    an error naming the dimensions; scratch ignores the encoder."""
    from medssl.downstream import prepare_network
    from medssl.networks import MiTSegmenter

    kwargs = dict(TINY_MIT, spatial_dims=2)
    encoder = _write_encoder(tmp_path / "mit2d.pt", MiT(**kwargs), "medssl.networks.MiT", kwargs, 2)
    net3d = MiTSegmenter(3, spatial_dims=3, variant="tiny", img_size=(64, 64, 16), dims=(8, 16, 32, 64),
                         decoder_dims=(32, 16, 8))
    before = {k: v.clone() for k, v in net3d.state_dict().items()}
    with pytest.raises(ValueError, match="2D"):
        prepare_network(net3d, str(encoder), finetune_mode="finetune", spatial_dims=3)
    prepare_network(net3d, str(encoder), finetune_mode="scratch", spatial_dims=3)
    assert all(torch.equal(before[k], v) for k, v in net3d.state_dict().items())


@pytest.mark.parametrize("bundle, n", [(B2D, 2), (B3D, 2)], ids=["2d", "3d"])
def test_mit_variant_inference_contract(bundle, n, tmp_path, monkeypatch):
    """verify_net_in_out (one tensor, K channels) and TorchScript export (tracing) of the MiT variants (smoke widths;
    the generic test verifies the default networks at full size)."""
    from monai.bundle import ckpt_export, verify_net_in_out

    monkeypatch.chdir(bundle)
    configs = _configs(bundle, "inference.json", "mit.json")
    smoke = SMOKE_2D if bundle == B2D else SMOKE_3D
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"), config_file=configs,
                      device="cpu", n=n, any=16, **smoke)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(configs)
    parser.update(smoke)
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), tmp_path / "model.pt")
    shape = [1, 1, 64, 64] if bundle == B2D else [1, 1, 64, 64, 16]
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(tmp_path / "model.pt"),
                meta_file=str(bundle / "configs" / "metadata.json"), config_file=configs, use_trace=True,
                input_shape=shape, **smoke)
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.rand(*shape)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.distributed
def test_two_process_finetune_from_encoder(demo_datalist, tmp_path):
    encoder = _write_encoder(tmp_path / "encoder.pt", ResNetBackbone(**TINY_TRUNK), "medssl.networks.ResNetBackbone",
                             TINY_TRUNK, 2)
    out = tmp_path / "train"
    config_list = "[" + ",".join(f"'{c}'" for c in _configs(B2D, "train.json", "smoke.json", "multi_gpu_train.json")) + "]"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run",
           "--config_file", config_list, "--bundle_root", str(B2D), "--dataset_dir", str(demo_datalist.parent),
           "--datalist", str(demo_datalist), "--output_dir", str(out), "--ckpt_dir", str(out / "ckpt"),
           "--epochs", "1", "--finetune_mode", "finetune", "--pretrained_path", str(encoder),
           "--train#items", "$medssl.downstream.label_fraction_subset(@train#all_items, 1.0, @seed, stratify=False)[:4]",
           "--validate#items", "$medssl.data.load_items(@datalist, 'validation', @dataset_dir, dims=[2], modalities=@modalities, keys=['image', 'label', 'modality', 'dim'], labelled_only='mask', max_items=1)"]
    proc = run_cmd(cmd, cwd=B2D, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "ckpt" / "checkpoint_final.pt").is_file() and (out / "models" / "model_final.pt").is_file()
    assert (out / "val_metrics.csv").is_file()
