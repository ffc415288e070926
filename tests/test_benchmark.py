"""tools/benchmark.py and medssl.engines.profiling.StepTimeProfiler.

The profiler is checked on behaviour (which iterations it records, where a known delay is charged), never on speed;
the benchmark commands are checked to run and print their figures next to their baseline."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from medssl.engines.profiling import StepTimeProfiler, batch_size_of

from conftest import PYTHON, REPO, TOOLS, load_tool, run_cmd

TOY_BUNDLE = REPO / "tests" / "fixtures" / "bundles" / "toy_ssl_pretrain"

DATA_SLEEP = 0.02  # per item, in the dataset's __getitem__
MODEL_SLEEP = 0.2  # per step, in the method's training_step
HANDLER_SLEEP = 0.05  # per iteration, in an ITERATION_COMPLETED handler attached after the profiler


def _load_tool():
    return load_tool("benchmark.py", "medssl_benchmark_tool")


class SleepyDataset(torch.utils.data.Dataset):
    """Any dataset, each item delayed by a known time."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key):
        time.sleep(self.delay)
        return self.inner[key]


class SleepAtIterationCompleted:
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: time.sleep(self.delay))


def test_profiler_on_ssl_trainer_records_non_warmup_iterations_and_charges_delays_where_they_happen():
    from monai.data import DataLoader

    import toy_training
    from medssl.data.samplers import DistributedBatchSampler
    from medssl.engines import SSLTrainer

    class SlowToyMethod(toy_training.ToyMethod):
        def training_step(self, batch):
            time.sleep(MODEL_SLEEP)
            return super().training_step(batch)

    torch.manual_seed(0)
    dataset = SleepyDataset(toy_training.make_dataset(8), DATA_SLEEP)
    sampler = DistributedBatchSampler(len(dataset), batch_size=2, seed=0, rank=0, world_size=1)  # 4 per epoch
    method = SlowToyMethod()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01)
    profiler = StepTimeProfiler(warmup_iters=2, log_summary=False)
    trainer = SSLTrainer(
        device="cpu",
        max_epochs=2,
        data_loader=DataLoader(dataset, batch_sampler=sampler, num_workers=0),
        method=method,
        optimizer=optimizer,
        handlers=[profiler, SleepAtIterationCompleted(HANDLER_SLEEP)],  # a handler after the profiler
    )
    started = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - started

    records = profiler.records
    assert [r["iteration"] for r in records] == [3, 4, 5, 6, 7, 8]  # the 2 warm-up iterations are not recorded
    assert [r["epoch"] for r in records] == [1, 1, 2, 2, 2, 2]
    for r in records:
        # 2 items x DATA_SLEEP in the loader: data wait, also at iteration 5 where epoch 2's loader pass starts
        assert r["data_wait"] >= 2 * DATA_SLEEP, r
        assert r["data_wait"] < MODEL_SLEEP, r  # the step's own delay is not charged to the data
        assert r["model"] >= MODEL_SLEEP, r
        assert r["handlers"] >= HANDLER_SLEEP, r  # the later-attached handler still counts in this iteration
        assert r["compute"] == pytest.approx(r["model"] + r["handlers"], abs=1e-9)
        assert r["total"] == pytest.approx(r["data_wait"] + r["compute"], abs=1e-9)
        assert r["items"] == 2
    assert records[0]["between"] is not None and records[0]["between"] >= 0
    measured = sum(r["total"] + r["between"] for r in records)
    assert 6 * (2 * DATA_SLEEP + MODEL_SLEEP + HANDLER_SLEEP) <= measured <= wall

    summary = profiler.summary()
    total = sum(r["total"] for r in records)
    assert summary["iterations"] == 6 and summary["warmup_iters"] == 2
    assert summary["data_wait_fraction"] == pytest.approx(sum(r["data_wait"] for r in records) / total)
    assert summary["items_per_iteration"] == 2
    assert summary["items_per_s"] == pytest.approx(12 / total)
    assert summary["data_wait"]["median"] == pytest.approx(np.median([r["data_wait"] for r in records]))
    text = profiler.format_summary()
    for label in ("data wait", "compute", "model step", "handlers", "total", "data wait fraction", "items/s"):
        assert label in text


def test_profiler_on_a_plain_ignite_engine_stops_after_the_measured_iterations():
    batches = [{"x": torch.zeros(3, 2), "name": ["a", "b", "c"]} for _ in range(10)]
    engine = Engine(lambda engine, batch: time.sleep(0.01))
    profiler = StepTimeProfiler(warmup_iters=1, stop_after=3, log_summary=False)
    assert profiler.summary()["iterations"] == 0
    assert "no iteration measured" in profiler.format_summary()
    profiler.attach(engine)
    engine.run(batches, max_epochs=1)

    assert engine.state.iteration == 4  # 1 warm-up + 3 measured, then terminate()
    assert [r["iteration"] for r in profiler.records] == [2, 3, 4]
    assert all(r["model"] is None and r["compute"] >= 0.01 for r in profiler.records)
    summary = profiler.summary()
    assert summary["model"] is None and summary["items_per_iteration"] == 3
    assert "model step" not in profiler.format_summary()


def test_batch_size_of_finds_the_first_tensor():
    assert batch_size_of({"modality": ["CT", "MR"], "views": [torch.zeros(5, 1, 4, 4)]}) == 5
    assert batch_size_of(np.zeros((7, 2))) == 7
    assert batch_size_of({"modality": ["CT"]}) is None


def test_profiler_added_to_a_bundle_through_an_override_file(demo_datalist, tmp_path):
    """The documented way to profile one's own bundle run: an override file appending to train#handlers."""
    from monai.bundle import ConfigWorkflow

    summary_file = tmp_path / "out" / "step_times.json"
    override = tmp_path / "profile.json"
    override.write_text(
        json.dumps(
            {
                "+train#handlers": [
                    {
                        "_target_": "medssl.engines.profiling.StepTimeProfiler",
                        "warmup_iters": 2,
                        "output_file": "$@output_dir + '/step_times.json'",
                    }
                ]
            }
        )
    )
    configs = [str(TOY_BUNDLE / "configs" / name) for name in ("train.json", "smoke.json")] + [str(override)]
    workflow = ConfigWorkflow(
        config_file=configs,
        meta_file=str(TOY_BUNDLE / "configs" / "metadata.json"),
        logging_file=False,
        bundle_root=str(TOY_BUNDLE),
        dataset_dir=str(demo_datalist.parent),
        datalist=str(demo_datalist),
        output_dir=str(tmp_path / "out"),
        ckpt_dir=str(tmp_path / "out" / "ckpt"),
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    written = json.loads(summary_file.read_text())
    assert written["iterations"] == 2 * 4 - 2  # smoke: 8 items, batch 2, 2 epochs; minus the warm-up
    assert written["items_per_iteration"] == 2
    assert 0.0 <= written["data_wait_fraction"] <= 1.0


def test_energy_command_prints_both_implementations_and_agreement(capsys):
    tool = _load_tool()
    result = tool.main(["energy", "--size", "64", "--repeats", "2"])
    out = capsys.readouterr().out
    for text in (
        "== energy-band decomposition: 64x64",
        "medssl.transforms.energy_bands",
        "scipy.ndimage.gaussian_filter cascade",
        "speed-up:",
        "max |difference| of the bands:",
        "EnergyBandAugmentd",
        "images/s",
    ):
        assert text in out
    assert result["max_abs_diff"] < 1e-4  # the two implementations compute the same bands
    assert result["goal_met"] == (result["speedup"] >= 3.0)
    assert ("goal >= 3x: met" in out) == result["goal_met"]
    assert result["ours_ms"] > 0 and result["scipy_ms"] > 0 and result["augment_images_per_s"] > 0


def test_scipy_baseline_is_an_energy_band_decomposition():
    tool = _load_tool()
    image = np.random.RandomState(0).rand(2, 20, 24).astype(np.float64)
    bands = tool.scipy_energy_bands(image, (1.0, 2.0), mode="reflect")
    assert bands.shape == (3, 2, 20, 24)
    np.testing.assert_allclose(bands.sum(0), image, atol=1e-12)
    single = tool.scipy_energy_bands(image[:1], (1.0, 2.0), mode="reflect")
    np.testing.assert_allclose(single[:, 0], bands[:, 0], atol=1e-12)  # channels are filtered independently


def test_step_command_on_the_toy_bundle_compares_worker_counts(demo_datalist, capsys):
    tool = _load_tool()
    result = tool.main(
        [
            "step",
            "--bundle", str(TOY_BUNDLE),
            "--dataset-dir", str(demo_datalist.parent),
            "--iters", "3",
            "--warmup", "1",
            "--num-workers", "0,1",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "== training step breakdown: bundle tests/fixtures/bundles/toy_ssl_pretrain" in out
    assert "train.json + smoke.json" in out  # --override auto picked the bundle's smoke.json
    assert out.count("3 iterations measured after 1 warm-up") == 2
    for text in ("data wait", "compute", "model step", "data wait fraction", "num_workers comparison"):
        assert text in out
    assert [run["num_workers"] for run in result["runs"]] == [0, 1]
    assert all(run["summary"]["iterations"] == 3 for run in result["runs"])
    assert result["device"] == "cpu"


@pytest.mark.slow  # covered in the default suite by: each benchmark runs on its own in the tests above
def test_cli_without_a_command_runs_both_benchmarks(demo_datalist):
    cmd = [
        PYTHON, str(TOOLS / "benchmark.py"),
        "--size", "32", "--repeats", "1",
        "--bundle", str(TOY_BUNDLE), "--dataset-dir", str(demo_datalist.parent),
        "--iters", "2", "--warmup", "1", "--num-workers", "0", "--threads", "1",
    ]  # fmt: skip
    proc = run_cmd(cmd, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== energy-band decomposition: 32x32" in proc.stdout
    assert "speed-up:" in proc.stdout
    assert "== training step breakdown" in proc.stdout
    assert "2 iterations measured after 1 warm-up" in proc.stdout
    assert "torch threads 1" in proc.stdout


def test_mit_benchmark_compares_sdpa_with_explicit_attention_on_2d_and_3d(capsys):
    tool = load_tool("benchmark.py", "benchmark_tool")
    result = tool.mit(variant="tiny", batch_2d=1, batch_3d=1, size_2d=64, size_3d=(64, 64, 16), repeats=1)
    out = capsys.readouterr().out
    assert [(r["input"][:2], r["attention"]) for r in result["rows"]] == [
        ("2D", "sdpa"), ("2D", "explicit"), ("3D", "sdpa"), ("3D", "explicit")
    ]
    assert all(r["ms"] > 0 for r in result["rows"]) and result["speedup_2d"] > 0 and result["speedup_3d"] > 0
    assert "SDPA is" in out and "MiT-tiny forward + backward" in out


def test_step_without_knn_monitors_skips_the_bundles_knn(demo_datalist, tmp_path, capsys):
    """``--knn false`` empties a pretraining bundle's knn#handlers: no kNN embedding before or after the measured
    iterations (with them, the SwAV smoke run prints its random-init -> pretrained kNN summary at the end)."""
    tool = _load_tool()
    result = tool.main(["step", "--bundle", str(REPO / "bundles" / "ssl_swav_multimodal_pretrain"), "--override",
                        "smoke.json", "--dataset-dir", str(demo_datalist.parent), "--iters", "1", "--warmup", "1",
                        "--num-workers", "0", "--knn", "false"])
    out = capsys.readouterr().out
    assert result["runs"][0]["summary"]["iterations"] == 1
    assert "1 iterations measured after 1 warm-up" in out and "kNN accuracy" not in out
