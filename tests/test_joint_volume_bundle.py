"""bundles/ssl_joint_image_volume_pretrain: the three stages chained on the demo data through `pretrained_path`
(`python -m monai.bundle run` with smoke.json), the stage-3 kNN monitor on the labelled 3D split (random copy vs the
trained encoder), stage 1's bad-item wrapper, the DeepCluster-v2 variant by one override, the export of
f_intra + f_inter and of f_intra's trunk, and the same chain under torchrun (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import BUNDLES, PYTHON, load_tool, run_bundle_in_process, run_cmd

BUNDLE = BUNDLES / "ssl_joint_image_volume_pretrain"


def _configs(configs: list[str]) -> list[str]:
    return [str(BUNDLE / "configs" / c) for c in configs]


def _check_outputs(out: Path) -> None:
    assert (out / "ckpt" / "checkpoint_final.pt").is_file()
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(v) for v in losses)
    health = [json.loads(line) for line in (out / "health.jsonl").read_text().splitlines()]  # one line per epoch
    assert health and all(r["emb_std_sqrt_d"] >= 0.0 and r["verdict"] for r in health)


def _run(configs: list[str], demo_datalist: Path, out: Path, **overrides) -> None:
    """``python -m monai.bundle run`` in this process (``monai.bundle.run``, the function the command calls): the
    import cost is paid once, so the chain of stages stays fast; the command line itself is exercised by
    tests/test_bundle_runs.py and by the torchrun test below."""
    # one torch thread as the subprocess runs (conftest: OMP_NUM_THREADS=1); tiny nets on a shared machine
    run_bundle_in_process(BUNDLE, configs, out=out, datalist=demo_datalist, meta=True, threads=1, **overrides)
    _check_outputs(out)


def _torchrun(configs: list[str], demo_datalist: Path, out: Path, *extra: str) -> None:
    config_list = "[" + ",".join(f"'{c}'" for c in _configs(configs)) + "]"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run",
           "--config_file", config_list, "--bundle_root", str(BUNDLE), "--dataset_dir", str(demo_datalist.parent),
           "--datalist", str(demo_datalist), "--output_dir", str(out), "--ckpt_dir", str(out / "ckpt"), *extra]
    proc = run_cmd(cmd, cwd=BUNDLE, timeout=600)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    )
    _check_outputs(out)


def _method_state(out: Path) -> dict:
    return torch.load(out / "ckpt" / "checkpoint_final.pt", map_location="cpu", weights_only=False)["method"]


@pytest.fixture(scope="module")
def swav_chain(demo_datalist, tmp_path_factory):
    """Stage 1 -> 2 -> 3 (SwAV), each stage loading the previous stage's ckpt_dir."""
    root = tmp_path_factory.mktemp("joint_chain")
    _run(["train.json", "train_stage1.json", "smoke.json"], demo_datalist, root / "stage1")
    _run(["train.json", "train_stage2.json", "smoke.json"], demo_datalist, root / "stage2",
         pretrained_path=str(root / "stage1" / "ckpt"))
    _run(["train.json", "train_stage3.json", "smoke.json"], demo_datalist, root / "stage3",
         pretrained_path=str(root / "stage2" / "ckpt"))
    return root


def test_three_stages_chain_through_pretrained_path(swav_chain):
    root = swav_chain
    stage1, stage2, stage3 = (_method_state(root / f"stage{k}") for k in (1, 2, 3))
    # stage 2 starts from the stage-1 trunk and keeps it frozen: identical tensors (weights and BN statistics)
    trunk1 = {k[len("backbone."):]: v for k, v in stage1.items() if k.startswith("backbone.")}
    for key, value in trunk1.items():
        assert torch.equal(stage2[f"encoder.slice_encoder.backbone.{key}"], value), key
    # stage 3 starts from stage 2 and trains f_intra and f_inter jointly: both moved
    moved_intra = any(
        not torch.equal(stage3[f"backbone.slice_encoder.{k[len('encoder.slice_encoder.'):]}"], v)
        for k, v in stage2.items() if k.startswith("encoder.slice_encoder.") and v.is_floating_point()
    )
    moved_inter = any(
        not torch.equal(stage3[f"backbone.slice_transformer.{k[len('encoder.slice_transformer.'):]}"], v)
        for k, v in stage2.items() if k.startswith("encoder.slice_transformer.") and v.is_floating_point()
    )
    assert moved_intra and moved_inter


def test_stage3_knn_on_the_labelled_3d_split_against_a_random_copy(swav_chain, demo_datalist, capsys):
    from medssl.data import load_items
    from medssl.evaluation.knn import print_knn_summary

    out = swav_chain / "stage3"
    records = [json.loads(line) for line in (out / "knn.jsonl").read_text().splitlines()]
    # epoch 0: the randomly initialised copy of f_intra + f_inter; then the stage-3 encoder at the end (epoch 2)
    assert [(r["epoch"], r["metric"]) for r in records] == [(0, "knn_acc_random_init"), (2, "knn_acc")]
    n_train = len(load_items(demo_datalist, "training", dims=[3], labelled_only="class"))
    n_query = sum(len(load_items(demo_datalist, s, dims=[3], labelled_only="class")) for s in ("validation", "test"))
    for record in records:
        assert (record["n_train"], record["n_val"], record["num_classes"]) == (n_train, n_query, 2), record
        assert set(record["acc_per_modality"]) == {"CT"} and 0.0 <= record["acc"] <= 1.0  # only the CT volumes
        assert record["acc"] * n_query == pytest.approx(round(record["acc"] * n_query), abs=1e-4)
    summary = print_knn_summary(out)
    printed = capsys.readouterr().out
    assert summary["random_init_acc"] == records[0]["acc"] and summary["pretrained_acc"] == records[1]["acc"]
    assert f"random init {records[0]['acc']:.4f} -> pretrained {records[1]['acc']:.4f}" in printed


def test_stage1_dataset_reports_and_skips_bad_volumes_by_datalist_item(demo_datalist):
    """Stage 1 wraps its slice dataset in SafeDataset: a failing slice names its volume's datalist item and file; with
    on_bad_item='skip' it is replaced by a slice of another volume of the same modality and dimension."""
    from monai.bundle import ConfigParser

    from medssl.data import SafeDataset, SampleKey
    from medssl.data.robust import BadItemError

    parser = ConfigParser()
    parser.read_config(_configs(["train.json", "train_stage1.json", "smoke.json"]))
    parser.update(
        {"bundle_root": str(BUNDLE), "dataset_dir": str(demo_datalist.parent), "datalist": str(demo_datalist)}
    )
    dataset = parser.get_parsed_content("train#dataset")
    assert isinstance(dataset, SafeDataset)
    slices = parser.get_parsed_content("train#slices")
    items = slices.items
    bad_volume = next(i for i, it in enumerate(items) if it["dim"] == 3 and slices.num_slices[i] > 1)
    transform = slices.slice_transform

    def failing(sample):
        if sample["volume_index"] == bad_volume:
            raise RuntimeError("broken augmentation")
        return transform(sample)

    slices.slice_transform = failing
    bad_samples = [j for j in range(len(slices)) if slices.locate(j)[0] == bad_volume]
    with pytest.raises(BadItemError, match=rf"item {bad_volume}: .*{Path(items[bad_volume]['image']).name}") as error:
        dataset[SampleKey(bad_samples[-1], 3)]
    assert error.value.index == bad_volume
    dataset.on_error = "skip"
    for j in bad_samples:
        sample = dataset[SampleKey(j, 3)]
        replacement = items[sample["volume_index"]]
        assert sample["volume_index"] != bad_volume
        assert (replacement["modality"], replacement["dim"]) == (items[bad_volume]["modality"], 3)
    assert list(dataset.bad_items) == [bad_volume]  # one bad datalist item, however many of its slices were asked


def _absolute_datalist(demo_datalist: Path) -> dict:
    """The demo datalist with absolute image paths (a copy of it may be written anywhere)."""
    datalist = json.loads(demo_datalist.read_text())
    for section in ("training", "validation", "test"):
        for it in datalist[section]:
            it["image"] = str(demo_datalist.parent / it["image"])
    return datalist


def _datalist_with_truncated_volume(demo_datalist: Path, tmp_path: Path) -> tuple[Path, str]:
    """The demo datalist with, first in its training list, a copy of its first 3D volume cut in half."""
    datalist = _absolute_datalist(demo_datalist)
    volume = next(it for it in datalist["training"] if it["dim"] == 3)
    source = Path(volume["image"])
    cut = tmp_path / f"cut_{source.name}"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    datalist["training"].insert(0, {**volume, "image": str(cut)})
    path = tmp_path / "datalist_cut.json"
    path.write_text(json.dumps(datalist))
    return path, str(cut)


def test_stage1_truncated_volume_is_named_and_skipped(demo_datalist, tmp_path, capsys):
    """Issue 13 item 6: a truncated volume stopped stage 1 while VolumeSliceDataset was built, whatever
    on_bad_item said; now 'raise' names its datalist item and file, 'skip' leaves it out with a warning."""
    from monai.bundle import ConfigParser

    from medssl.data.robust import BadItemError

    datalist, cut = _datalist_with_truncated_volume(demo_datalist, tmp_path)
    parser = ConfigParser()
    parser.read_config(_configs(["train.json", "train_stage1.json", "smoke.json"]))
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(demo_datalist.parent), "datalist": str(datalist)})
    with pytest.raises(RuntimeError) as info:  # MONAI wraps it: "Failed to instantiate component ..."
        parser.get_parsed_content("train#slices")
    error = info.value.__cause__
    assert isinstance(error, BadItemError) and error.index == 0 and error.path == cut
    assert str(error).startswith(f"{datalist} item 0: {cut}: ") and "EOFError" in str(error)

    out = tmp_path / "run"
    _run(["train.json", "train_stage1.json", "smoke.json"], datalist, out, on_bad_item="skip")
    printed = capsys.readouterr().out
    assert f"{datalist} item 0: {cut}: " in printed and "skipped (1 bad item(s) so far, at most 10)" in printed
    assert "EOFError" in printed


def test_stage3_knn_monitors_turn_off_without_class_labels(demo_datalist, tmp_path, capsys):
    """Issue 13 item 8: stage 3's kNN monitors (random copy and trained encoder) on a datalist without class labels
    turn themselves off with one line; the stage trains."""
    datalist = _absolute_datalist(demo_datalist)
    for section in ("training", "validation", "test"):
        for it in datalist[section]:
            it.pop("label", None)
    path = tmp_path / "unlabelled.json"
    path.write_text(json.dumps(datalist))
    out = tmp_path / "stage3"
    _run(["train.json", "train_stage3.json", "smoke.json"], path, out, epochs=1, pretrained_path="")
    lines = [line for line in capsys.readouterr().out.splitlines() if "kNN monitor off" in line]
    assert len(lines) == 1 and "no labelled item in its train_loader (memory bank) and val_loader" in lines[0]
    assert not (out / "knn.jsonl").exists()


@pytest.mark.parametrize("stage", [1, 3])
def test_deepcluster_v2_variant_by_one_override(swav_chain, demo_datalist, tmp_path, stage):
    extra = {"pretrained_path": str(swav_chain / "stage2" / "ckpt")} if stage == 3 else {}
    _run(["train.json", f"train_stage{stage}.json", "deepcluster_v2.json", "smoke.json"], demo_datalist, tmp_path,
         **extra)
    state = _method_state(tmp_path)
    assert "memory_bank._extra_state" in state and "prototypes.heads.1.weight" in state  # DeepCluster-v2, 2 heads
    if stage == 3:  # the stage-2 encoder was loaded, then trained
        stage2 = _method_state(swav_chain / "stage2")
        assert state["backbone.mask_embedding"].equal(stage2["encoder.mask_embedding"])


def test_export_volume_encoder_and_trunk(swav_chain, tmp_path):
    from medssl.weights import build_encoder_from_manifest

    root = swav_chain
    tool = load_tool("export_encoder.py", "export_encoder_tool")
    configs = "configs/train.json,configs/train_stage3.json,configs/smoke.json"
    for name, encoder_id, encoder_key in (("volume", "encoder", "backbone"),
                                          ("trunk", "trunk", "backbone.slice_encoder.backbone")):
        tool.main(str(BUNDLE), str(root / "stage3" / "ckpt"), str(tmp_path / f"{name}.pt"), config=configs,
                  encoder_id=encoder_id, encoder_key=encoder_key)
    state = _method_state(root / "stage3")
    volume = build_encoder_from_manifest(tmp_path / "volume.json").eval()
    for key, value in volume.state_dict().items():
        assert torch.equal(value, state[f"backbone.{key}"]), key
    with torch.no_grad():
        assert volume(torch.rand(2, 1, 32, 32, 8)).shape == (2, volume.embed_dim)  # volume -> Z
        assert volume(torch.rand(2, 1, 32, 32)).shape == (2, volume.embed_dim)  # 2D image -> slice embedding
    trunk = build_encoder_from_manifest(tmp_path / "trunk.json").eval()
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, state[f"backbone.slice_encoder.backbone.{key}"])


@pytest.mark.slow
@pytest.mark.distributed
def test_stages_2_and_3_under_torchrun(swav_chain, demo_datalist, tmp_path):
    _torchrun(["train.json", "train_stage2.json", "smoke.json", "multi_gpu_train.json"], demo_datalist, tmp_path / "s2",
              "--pretrained_path", str(swav_chain / "stage1" / "ckpt"))
    _torchrun(["train.json", "train_stage3.json", "smoke.json", "multi_gpu_train.json"], demo_datalist, tmp_path / "s3",
              "--pretrained_path", str(tmp_path / "s2" / "ckpt"))


def test_exported_stage3_encoder_loads_into_downstream_networks(swav_chain, tmp_path):
    """The downstream loader takes the stage-3 export whole (3D tasks) and its f_intra trunk (2D / slice-wise)."""
    from medssl.networks import ResNetBackbone
    from medssl.networks.classification import EncoderClassifier
    from medssl.weights import load_manifest, load_pretrained_encoder
    from medssl.weights.export import _instantiate

    tool = load_tool("export_encoder.py", "export_encoder_tool")
    tool.main(str(BUNDLE), str(swav_chain / "stage3" / "ckpt"), str(tmp_path / "volume.pt"),
              config="configs/train.json,configs/train_stage3.json,configs/smoke.json", encoder_id="encoder")
    manifest = load_manifest(tmp_path / "volume.json")
    volume_net = EncoderClassifier(_instantiate(manifest, "test"), num_classes=2)
    report = load_pretrained_encoder(volume_net, tmp_path / "volume.json", spatial_dims=3, verbose=False)
    assert len(report.loaded) == len(volume_net.encoder.state_dict()) and not report.not_loaded
    trunk_kwargs = dict(manifest["backbone"]["kwargs"].get("backbone_kwargs") or {})
    kwargs = manifest["backbone"]["kwargs"]
    trunk = ResNetBackbone(spatial_dims=2, in_channels=kwargs.get("in_channels", 3), layers=kwargs["layers"],
                           block_inplanes=kwargs["block_inplanes"], **trunk_kwargs)
    report = load_pretrained_encoder(EncoderClassifier(trunk, num_classes=2), tmp_path / "volume.json",
                                     spatial_dims=3, slice_wise=True, verbose=False)
    assert report.adapter == "hybrid_volume_trunk" and len(report.loaded) == len(trunk.state_dict())
