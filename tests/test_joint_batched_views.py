"""The joint image-volume bundle's opt-in batched data path for stage 1 (configs/batched_views.json, issue #12): it
trains through ``monai.bundle``, it configures the per-item path's views (sizes, counts, scale range, set A), a
slice's views do not depend on the batch or the DataLoader workers, a run resumed from a mid-epoch checkpoint
continues the straight run's losses, and (slow) 2 processes train as 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from torch.utils.data import DataLoader

from medssl.data import make_slice_batch_sampler
from medssl.engines.trainer import AugmentOnDevice
from medssl.transforms import EnergyBandAugmentd, RandGammad, RandLinearIntensityd
from medssl.transforms.batched import BatchedMultiCrop, BatchedViewsCollate

from conftest import (BUNDLES, PYTHON, assert_resume_continues, bundle_train_log, run_bundle_in_process, run_cmd,
                      train_log_records)

BUNDLE = BUNDLES / "ssl_joint_image_volume_pretrain"
CONFIGS = ["train.json", "smoke.json", "batched_views.json"]
WORKING_SIZE = 64

pytestmark = pytest.mark.usefixtures("single_thread")


def _parser(demo_datalist: Path, out: Path, configs: list[str] = CONFIGS, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in configs])
    settings = {"bundle_root": str(BUNDLE), "dataset_dir": str(demo_datalist.parent), "datalist": str(demo_datalist),
                "output_dir": str(out), "ckpt_dir": str(out / "ckpt"), "working_size": WORKING_SIZE,
                "num_workers": 0, "device": "cpu", **overrides}
    for key, value in settings.items():
        parser[key] = value
    return parser


def _bundle_run(demo_datalist: Path, out: Path, *extra: str) -> list[dict]:
    """``monai.bundle.run`` (what ``python -m monai.bundle run`` calls) of train.json + smoke.json +
    batched_views.json in this process, one torch thread, 0 DataLoader workers (``extra``: ``--key value`` pairs,
    e.g. ``--resume true``): the records of its train_log.jsonl. 2 epochs of 5 iterations, checkpoints every 2."""
    overrides = {key.lstrip("-"): json.loads(value) for key, value in zip(extra[::2], extra[1::2])}
    run_bundle_in_process(BUNDLE, CONFIGS, out=out, datalist=demo_datalist, threads=1, logging_file=False,
                          working_size=WORKING_SIZE, num_workers=0, **overrides)
    return train_log_records(out)


@pytest.fixture(scope="module")
def straight_run(demo_datalist, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The straight bundle run: its output folder and train-log records."""
    out = tmp_path_factory.mktemp("joint_batched") / "straight"
    return out, _bundle_run(demo_datalist, out)


def test_stage1_trains_through_monai_bundle_with_batched_views(straight_run):
    _, records = straight_run
    assert [r["iteration"] for r in records] == list(range(1, 11))
    assert all(np.isfinite(r["loss"]) for r in records) and len({r["loss"] for r in records}) > 1


def test_the_batched_views_are_the_per_item_views_configuration(demo_datalist, tmp_path):
    """The batched views are train.json's multi-crop views of a slice: the same crop sizes, counts and scale range,
    and set A as multicrop_views makes it per item (energy bands on every crop with per-image statistics, gamma,
    linear; no flip, blur or noise); the GPU arrangement makes them in prepare_batch; stages 2-3 refuse the file."""
    parser = _parser(demo_datalist, tmp_path)
    batched = parser.get_parsed_content("batched_views")
    multicrop = parser.get_parsed_content("train#multicrop")
    assert isinstance(batched, BatchedMultiCrop)
    assert batched.crop_sizes(2) == [tuple(size) for count, size, _ in multicrop.groups_for(2) for _ in range(count)]
    assert batched.scales == [tuple(scale) for _, _, scale in multicrop.groups_for(2)]
    energy, gamma, linear = multicrop.augment.transforms
    assert isinstance(energy, EnergyBandAugmentd) and isinstance(batched.energy, EnergyBandAugmentd)
    for name in ("reference", "sigmas", "prob", "sample_range_sigma", "fallback_std_fraction", "sigma_unit", "mode",
                 "truncate"):
        assert getattr(batched.energy, name) == getattr(energy, name), name
    assert isinstance(gamma, RandGammad) and isinstance(linear, RandLinearIntensityd)
    assert (batched.gamma_prob, batched.gamma_range, batched.gamma_reciprocal_prob) == (
        gamma.prob, tuple(gamma.gamma_range), gamma.reciprocal_prob)
    assert (batched.linear_prob, batched.a_range, batched.b_fraction) == (
        linear.prob, tuple(linear.a_range), linear.b_fraction)
    assert batched.flip_prob == batched.blur_prob == batched.noise_prob == 0.0 and batched.ratio is None
    assert isinstance(parser.get_parsed_content("train#dataloader#collate_fn"), BatchedViewsCollate)

    on_device = _parser(demo_datalist, tmp_path, on_cpu=False)
    assert isinstance(on_device.get_parsed_content("train#trainer#prepare_batch"), AugmentOnDevice)
    assert not isinstance(on_device.get_parsed_content("train#dataloader#collate_fn"), BatchedViewsCollate)

    stage2 = _parser(demo_datalist, tmp_path, ["train.json", "train_stage2.json", "smoke.json", "batched_views.json"])
    with pytest.raises(RuntimeError) as refused:
        stage2.get_parsed_content("train#dataloader")
    cause = refused.value.__cause__
    assert isinstance(cause, ValueError) and "makes the views of stage 1" in str(cause)


def _views_by_index(dataset, batch_size: int, num_workers: int, collate) -> dict[int, list[torch.Tensor]]:
    """Every sample's views in one epoch of ``dataset`` batched by the bundle's slice sampler: index -> crops."""
    sampler = make_slice_batch_sampler(dataset, batch_size, seed=0)
    sampler.set_epoch(0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate)
    views = {}
    for batch in loader:
        for row, index in enumerate(batch["index"].tolist()):
            views[index] = [crop[row] for crop in batch["crops"]]
    return views


def test_a_slice_gets_the_same_views_in_any_batch_and_with_any_workers(demo_datalist, tmp_path):
    """Batches of 4 in the main process, of 4 in 2 DataLoader workers and of 3: each slice / image (dataset index)
    gets the same crops, bit for bit (its views come from its SampleKey seed alone)."""
    parser = _parser(demo_datalist, tmp_path)  # smoke.json: 16 items, 3 slices per volume
    dataset = parser.get_parsed_content("train#dataset")
    collate = parser.get_parsed_content("train#dataloader#collate_fn")
    slice_ids = np.asarray(dataset.slice_ids)
    assert (slice_ids < 0).any() and (slice_ids >= 0).any()  # 2D images and slices of volumes
    reference = _views_by_index(dataset, 4, 0, collate)
    assert len(reference) == len(dataset)
    for batch_size, workers in ((4, 2), (3, 0)):
        other = _views_by_index(dataset, batch_size, workers, collate)
        assert other.keys() <= reference.keys() and len(other) > len(reference) - batch_size  # the sampler drops a rest
        for index, crops in other.items():
            assert all(torch.equal(a, b) for a, b in zip(crops, reference[index])), (batch_size, workers, index)
    # the views are random: a sample's two large crops differ
    first = next(iter(reference.values()))
    assert not torch.equal(first[0], first[1])


def test_resumed_run_continues_the_straight_runs_losses(straight_run, demo_datalist, tmp_path):
    """From the straight run's checkpoint of iteration 6 (inside epoch 2), a resumed run logs iterations 7-10 with
    the straight run's losses, bit for bit."""
    out, records = straight_run
    assert_resume_continues(lambda resumed, *extra: _bundle_run(demo_datalist, resumed, *extra), records, out,
                            tmp_path / "resumed", 6)


# ------------------------------------------------------------------------------------------------ 2 processes
def _no_batch_statistics(out: Path) -> Path:
    """A config layered last (written in ``out``): the smoke ResNet trunk without batch statistics (BatchNorm ->
    GroupNorm(1), the helper of tests/test_batched_distributed.py) and a one-layer projection head (hidden_dim 0: no
    BatchNorm1d). BatchNorm normalises over each rank's local batch, so with it 2 processes cannot train as 1."""
    path = out / "no_batch_statistics.json"
    imports = json.loads((BUNDLE / "configs" / "train.json").read_text())["imports"]  # a list is replaced
    path.write_text(json.dumps({
        "imports": imports + ["$import test_batched_distributed"],
        "backbone": "$test_batched_distributed.without_batch_statistics(@trunk)",
        "hidden_dim": 0,
    }))
    return path


# about 30 s (two bundle runs, one under torchrun); the default suite covers the parts: the views' independence of the
# batch and the workers (above) and the engine's 2 processes = 1 process (tests/test_distributed_engine.py)
@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_batched_views_run_equals_one_process_run(demo_datalist, tmp_path):
    """train.json + smoke.json + batched_views.json, 2 epochs with the SwAV queue from epoch 1: 1 process x batch 4
    against 2 processes x batch 2 (gloo, + multi_gpu_train.json): the same losses and final weights (tolerance of
    tests/test_batched_distributed.py: sums in another order across ranks)."""
    from medssl.engines.checkpoint import FINAL_CHECKPOINT_NAME, load_checkpoint

    overlay = _no_batch_statistics(tmp_path)
    common = ("--working_size", str(WORKING_SIZE), "--num_workers", "0")
    single = bundle_train_log(BUNDLE, CONFIGS + [str(overlay)], demo_datalist, tmp_path / "single", *common,
                              "--batch_size", "4")
    files = [str(BUNDLE / "configs" / c) for c in CONFIGS + ["multi_gpu_train.json"]] + [str(overlay)]
    out = tmp_path / "ddp"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run",
           "--config_file", "[" + ",".join(f"'{f}'" for f in files) + "]", "--bundle_root", str(BUNDLE),
           "--dataset_dir", str(demo_datalist.parent), "--datalist", str(demo_datalist), "--output_dir", str(out),
           "--ckpt_dir", str(out / "ckpt"), *common, "--batch_size", "2"]
    proc = run_cmd(cmd, cwd=BUNDLE, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    double = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(single) > 0 and [r["iteration"] for r in double] == [r["iteration"] for r in single]
    for a, b in zip(double, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a["iteration"], a["loss"], b["loss"])
    final = {name: load_checkpoint(tmp_path / name / "ckpt" / FINAL_CHECKPOINT_NAME) for name in ("single", "ddp")}
    assert final["ddp"]["world_size"] == 2 and final["single"]["world_size"] == 1
    weights = {k: v for k, v in final["single"]["method"].items() if isinstance(v, torch.Tensor)}  # queues: per rank
    assert any(k.startswith("backbone.") for k in weights) and any(k.startswith("prototypes.") for k in weights)
    for name, value in weights.items():
        if value.is_floating_point() and not name.startswith("queue"):
            torch.testing.assert_close(final["ddp"]["method"][name], value, rtol=1e-5, atol=5e-6, msg=name)


def test_loader_benchmark_measures_the_joint_bundle(demo_datalist, tmp_path, capsys):
    """tools/benchmark.py loader on the joint bundle's full train.json (stage 1, Table I crops) over 4 2D images and
    1 volume: both paths per variant, the ratio printed (figures are not asserted: speed is a benchmark figure)."""

    from conftest import load_tool

    datalist = json.loads(demo_datalist.read_text())
    images = [it for it in datalist["training"] if it.get("dim") == 2][:4]
    volumes = [it for it in datalist["training"] if it.get("dim") == 3][:1]
    small = tmp_path / "datalist_small.json"
    small.write_text(json.dumps({**datalist, "training": images + volumes}))
    tool = load_tool("benchmark.py", "medssl_benchmark_tool_joint")
    result = tool.loader(bundle=str(BUNDLE), dataset_dir=str(demo_datalist.parent), datalist=str(small), repeat=1,
                         batch_size=8, num_workers=0, working_size=64)
    out = capsys.readouterr().out
    assert "| num_workers | augmentations | today (items/s) | new: batched (items/s) | new / today |" in out
    assert [row["variant"] for row in result["rows"]] == ["set A", "set A without energy bands"]
    assert result["items"] > len(images) + len(volumes)  # the volume is cut into its slices
    for row in result["rows"]:
        assert min(row["today"], row["new"]) > 0 and abs(row["ratio"] - row["new"] / row["today"]) < 1e-9
