"""medssl.transforms.batched_unimiss (issue #12): UniMiSS's views made on a batch equal the per-item transforms for
fixed parameters, have their parameter distributions over many draws, and do not depend on the batch an item is
in. CPU only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import AdjustContrast, Flip, GaussianSmooth, ScaleIntensity, ScaleIntensityFixedMean
from scipy import stats

from conftest import BUNDLES, PYTHON, assert_resume_continues, bundle_train_log, load_tool, run_cmd

from medssl.transforms.batched_unimiss import (
    BatchedUniMiSSViews,
    UniMiSSViewParams,
    UniMiSSViewsCollate,
    UniMiSSWorkingSized,
    contrast_about_mean,
    plain_crops,
)
from medssl.engines import UniMiSSAugmentOnDevice
from medssl.transforms.batched import resized_crops
from medssl.transforms.unimiss_views import unimiss_augmentations_2d, unimiss_augmentations_3d, unimiss_views

N_DRAWS = 2000
SEEDS = np.arange(N_DRAWS) * 7919 + 11


def rand(*shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def params(size, **values):
    b = len(values["start"])
    dims = len(size)
    defaults = {"region": [list(size)] * b, "flip": np.zeros((b, dims), bool), "brightness": np.ones(b),
                "contrast": np.ones(b), "gamma": np.ones(b), "blur_sigma": np.zeros((b, dims)),
                "noise_std": np.zeros(b), "noise_seed": np.zeros(b, int)}
    defaults.update(values)
    return UniMiSSViewParams(size=tuple(size), **{k: np.asarray(v) for k, v in defaults.items()})


# ------------------------------------------------------------------------------------------------ fixed parameters
def test_plain_crops_equal_multicropd_extract_with_min_padding():
    multicrop = unimiss_views(size_3d=(8, 8, 4))
    small = rand(1, 6, 10, 3, seed=1) + 0.5  # smaller than the crop on X and Z: padded with its minimum
    large = rand(1, 12, 9, 7, seed=2)
    starts = [[-1, 2, 0], [3, 1, 2]]
    out = plain_crops([small, large], starts, (8, 8, 4))
    for b, item in enumerate((small, large)):
        expected = multicrop.extract(item, starts[b], (8, 8, 4), (8, 8, 4))
        assert torch.equal(out[b], torch.as_tensor(expected))


def test_3d_view_equals_the_per_item_monai_chain():
    vols = rand(2, 1, 10, 12, 8, seed=3)
    p = params((6, 6, 4), start=[[1, 2, 3], [4, 0, 1]], flip=[[True, False, True], [False, True, False]],
               blur_sigma=[[0.6, 0.9, 0.7], [0.0, 0.0, 0.0]], brightness=[1.2, 0.8], contrast=[0.8, 1.2],
               gamma=[1.4, 0.75])
    out = BatchedUniMiSSViews().apply(vols, p)
    for b in range(2):
        x = vols[b, :, p.start[b, 0]:p.start[b, 0] + 6, p.start[b, 1]:p.start[b, 1] + 6, p.start[b, 2]:p.start[b, 2] + 4]
        axes = [a for a in range(3) if p.flip[b, a]]
        x = Flip(spatial_axis=axes)(x)
        if p.blur_sigma[b].any():
            x = GaussianSmooth(sigma=p.blur_sigma[b].tolist())(x)
        x = ScaleIntensity(minv=None, maxv=None, factor=p.brightness[b] - 1.0)(x)
        x = ScaleIntensityFixedMean(factor=p.contrast[b] - 1.0, fixed_mean=True, preserve_range=True)(x)
        x = AdjustContrast(gamma=p.gamma[b])(x)
        torch.testing.assert_close(out[b], torch.as_tensor(x), atol=2e-6, rtol=1e-5)


def test_2d_view_equals_the_per_item_monai_chain_inside_the_extent():
    images = torch.zeros(2, 1, 40, 40)
    content = rand(2, 1, 40, 28, seed=4)
    images[..., :28] = content  # padded working images: extent (40, 28)
    p = params((16, 16), start=[[2.0, 1.5], [10.0, 4.0]], region=[[20.0, 20.0], [24.0, 24.0]],
               flip=[[True, False], [False, False]], brightness=[1.3, 1.0], contrast=[0.7, 1.1],
               blur_sigma=[[1.2, 0.4], [0.0, 0.0]])
    out = BatchedUniMiSSViews().apply(images, p)
    for b in range(2):
        x = resized_crops(content[b:b + 1], p.start[b:b + 1], p.region[b:b + 1], (16, 16), p.flip[b:b + 1])[0]
        x = ScaleIntensity(minv=None, maxv=None, factor=p.brightness[b] - 1.0)(x)
        x = ScaleIntensityFixedMean(factor=p.contrast[b] - 1.0, fixed_mean=True)(x)
        if p.blur_sigma[b].any():
            x = GaussianSmooth(sigma=p.blur_sigma[b].tolist())(x)
        torch.testing.assert_close(out[b], torch.as_tensor(x), atol=2e-6, rtol=1e-5)


def test_unit_factors_leave_samples_exactly_unchanged():
    x = rand(3, 2, 9, 9, seed=5)
    out = contrast_about_mean(x, [1.0, 1.5, 1.0], preserve_range=True)
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2]) and not torch.equal(out[1], x[1])
    assert out[1].min() >= x[1].min() and out[1].max() <= x[1].max()


# ------------------------------------------------------------------------------------------------ distributions
def per_item_values(transform, attr, n=N_DRAWS):
    """``n`` draws of the inner MONAI transform's parameter ``attr`` (factor, gamma_value, ...)."""
    transform.set_random_state(0)
    values = []
    for _ in range(n):
        transform.randomize(torch.zeros(1, 4, 4))
        values.append(float(getattr(transform, attr)))
    return np.asarray(values)


def assert_rate(flags, prob):
    flags = np.asarray(flags, dtype=bool).ravel()
    assert stats.binomtest(int(flags.sum()), len(flags), prob).pvalue > 1e-3, (flags.mean(), prob)


def assert_same_distribution(ours, theirs):
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3


@pytest.fixture(scope="module")
def draws_2d():
    return BatchedUniMiSSViews().draw(SEEDS, [[200.0, 120.0]] * N_DRAWS)


@pytest.fixture(scope="module")
def draws_3d():
    return BatchedUniMiSSViews(size_3d=(96, 96, 16)).draw(SEEDS, [[120.0, 90.0, 40.0]] * N_DRAWS)


def test_2d_crop_region_matches_multicropd(draws_2d):
    extent = np.array([200.0, 120.0])
    multicrop = unimiss_views()
    multicrop.set_random_state(0)
    theirs = np.asarray([multicrop.draw_region(tuple(int(v) for v in extent), (224, 224), (0.14, 1.0))[1]
                         for _ in range(N_DRAWS)], dtype=float)
    for view in draws_2d:
        assert np.all(view.region >= 1) and np.all(view.region <= extent + 1e-9)
        assert np.all(view.start >= 0) and np.all(view.start + view.region <= extent + 1e-9)
        assert np.allclose(view.region[:, 1], np.minimum(view.region[:, 0], extent[1]))  # square unless clipped
        for axis in range(2):  # MultiCropd rounds the region to whole pixels
            assert_same_distribution(np.round(view.region[:, axis]), theirs[:, axis])
        free = extent - view.region
        inside = free[:, 0] > 1
        assert stats.kstest(view.start[inside, 0] / free[inside, 0], "uniform").pvalue > 1e-3
    # area fraction s ~ U(0.14, 1); the square side sqrt(s * 200 * 120) is clipped to 120 where s > 0.6
    fraction = np.prod(draws_2d[0].region, axis=1) / np.prod(extent)
    unclipped = draws_2d[0].region[:, 0] < extent[1] - 1e-9
    assert abs(unclipped.mean() - (0.6 - 0.14) / 0.86) < 0.03
    assert stats.kstest(fraction[unclipped], stats.uniform(0.14, 0.6 - 0.14).cdf).pvalue > 1e-3


def test_2d_flip_jitter_and_blur_match_the_per_item_transforms(draws_2d):
    flip, brightness, contrast, blur = unimiss_augmentations_2d().transforms
    view = np.concatenate  # both views together
    assert_rate(view([v.flip[:, 0] for v in draws_2d]), flip.prob)
    assert not any(v.flip[:, 1].any() for v in draws_2d)  # left-right only
    b = view([v.brightness for v in draws_2d])
    assert_rate(b != 1.0, brightness.prob)
    assert_same_distribution(b[b != 1.0] - 1.0, per_item_values(brightness.scaler, "factor"))
    c = view([v.contrast for v in draws_2d])
    assert_rate(c != 1.0, contrast.prob)
    assert_same_distribution(c[c != 1.0] - 1.0, per_item_values(contrast.scaler, "factor"))
    assert abs(np.corrcoef(b[(b != 1) & (c != 1)], c[(b != 1) & (c != 1)])[0, 1]) < 0.1  # independent draws
    sigma = np.concatenate([v.blur_sigma for v in draws_2d])
    assert_rate(sigma[:, 0] > 0, blur.prob)
    blurred = sigma[sigma[:, 0] > 0]
    lo, hi = blur.rand_smooth.sigma_x
    for axis in range(2):
        assert stats.kstest(blurred[:, axis], stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    assert all(np.all(v.gamma == 1.0) and np.all(v.noise_std == 0.0) for v in draws_2d)  # 3D-only steps


def test_3d_crop_start_matches_multicropd(draws_3d):
    multicrop = unimiss_views(size_3d=(96, 96, 16))
    multicrop.set_random_state(0)
    theirs = np.asarray([multicrop.draw_region((120, 90, 40), (96, 96, 16), None)[0] for _ in range(N_DRAWS)])
    for view in draws_3d:
        assert np.array_equal(view.start, np.round(view.start)) and np.all(view.region == [96, 96, 16])
        for axis in range(3):
            ours, ref = view.start[:, axis], theirs[:, axis]
            assert ours.min() == ref.min() and ours.max() == ref.max()  # [min(0, n - c), max(0, n - c)]
            assert_same_distribution(ours, ref)


def test_3d_augmentation_parameters_match_the_per_item_transforms(draws_3d):
    fx, fy, fz, noise, blur, brightness, contrast, gamma = unimiss_augmentations_3d().transforms
    flips = np.concatenate([v.flip for v in draws_3d])
    for axis, t in enumerate((fx, fy, fz)):
        assert_rate(flips[:, axis], t.prob)
    assert abs(np.corrcoef(flips[:, 0], flips[:, 1])[0, 1]) < 0.1
    std = np.concatenate([v.noise_std for v in draws_3d])
    assert_rate(std > 0, noise.prob)
    assert stats.kstest(std[std > 0], stats.uniform(0, noise.rand_gaussian_noise.std).cdf).pvalue > 1e-3
    sigma = np.concatenate([v.blur_sigma for v in draws_3d])
    assert_rate(sigma[:, 0] > 0, blur.prob)
    lo, hi = blur.rand_smooth.sigma_z
    assert stats.kstest(sigma[sigma[:, 2] > 0, 2], stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    for values, t, inner, attr in ((np.concatenate([v.brightness for v in draws_3d]) - 1, brightness, "scaler",
                                    "factor"),
                                   (np.concatenate([v.contrast for v in draws_3d]) - 1, contrast, "scaler", "factor")):
        assert_rate(values != 0, t.prob)
        assert_same_distribution(values[values != 0], per_item_values(getattr(t, inner), attr))
    g = np.concatenate([v.gamma for v in draws_3d])
    assert_rate(g != 1.0, gamma.prob)
    assert_same_distribution(g[g != 1.0], per_item_values(gamma.adjuster, "gamma_value"))


# ------------------------------------------------------------------------------------------------ determinism
def test_a_2d_item_gets_the_same_views_alone_or_in_any_batch():
    augment = BatchedUniMiSSViews(size_2d=32, blur_prob_2d=1.0)
    images, extents, seeds = rand(4, 1, 48, 48, seed=6), [[48, 30], [40, 48], [48, 48], [20, 48]], [5, 6, 7, 8]
    batch = augment(images, seeds, extents)
    order = [2, 0, 3, 1]
    shuffled = augment(images[order], [seeds[i] for i in order], [extents[i] for i in order])
    for i in range(4):
        alone = augment(images[i:i + 1], seeds[i:i + 1], extents[i:i + 1])
        for v in range(2):
            assert torch.equal(alone[v][0], batch[v][i]) and torch.equal(shuffled[v][order.index(i)], batch[v][i])
    assert not torch.equal(batch[0][0], batch[1][0])  # two different views


def test_a_3d_item_gets_the_same_views_alone_or_in_any_batch():
    augment = BatchedUniMiSSViews(size_3d=(12, 12, 6), noise_prob=1.0, blur_prob_3d=1.0, gamma_prob=1.0)
    vols = [rand(1, 16, 14, 8, seed=7), rand(1, 10, 20, 5, seed=8), rand(1, 16, 14, 8, seed=9)]
    batch = augment(vols, torch.tensor([1, 2, 3]))
    for i in range(3):
        alone = augment([vols[i]], [i + 1])
        for v in range(2):
            assert torch.equal(alone[v][0], batch[v][i])
    stacked = augment(torch.stack([vols[2], vols[0]]), [3, 1])  # same-shape volumes as one tensor: same views
    assert all(torch.equal(stacked[v][0], batch[v][2]) and torch.equal(stacked[v][1], batch[v][0]) for v in range(2))


def test_partly_blurred_batches_give_each_item_its_views_alone():
    """Blur applied to the blurred samples only: the batch's other items and the blurred ones equal their views alone."""
    augment = BatchedUniMiSSViews(size_3d=(10, 10, 6), blur_prob_3d=0.5)
    vols, seeds = list(rand(6, 1, 12, 12, 8, seed=13)), list(range(20, 26))
    sigma = np.stack([v.blur_sigma for v in augment.draw(seeds, [[12, 12, 8]] * 6)])  # (views, items, 3)
    assert np.any(sigma[0].max(axis=1) > 0) and np.any(sigma[0].max(axis=1) == 0)  # a mixed batch
    batch = augment(vols, seeds)
    for i in range(6):
        alone = augment([vols[i]], [seeds[i]])
        assert all(torch.equal(alone[v][0], batch[v][i]) for v in range(2))


def test_collate_makes_the_views_of_the_working_size_items():
    front = UniMiSSWorkingSized(working_size=40)
    items = [front({"image": rand(1, 60, 30, seed=10), "seed": 3, "modality": "XR"}),
             front({"image": rand(1, 40, 40, seed=11), "seed": 4, "modality": "XR"})]
    assert items[0]["image"].shape == (1, 40, 40) and items[0]["extent"].tolist() == [40, 20]
    augment = BatchedUniMiSSViews(size_2d=24)
    batch = UniMiSSViewsCollate(augment)(items)
    assert "image" not in batch and "extent" not in batch and batch["modality"] == ["XR", "XR"]
    stacked = torch.stack([torch.as_tensor(it["image"]) for it in items])
    expected = augment(stacked, [3, 4], [[40, 20], [40, 40]])
    assert all(torch.equal(a, b) for a, b in zip(batch["crops"], expected))
    vol = front({"image": rand(1, 20, 18, 9, seed=12), "seed": 5})
    assert vol["extent"].tolist() == [20, 18, 9] and vol["image"].shape == (1, 20, 18, 9)  # 3D left as it is
    with pytest.raises(ValueError, match="mixes 2D and 3D"):
        UniMiSSViewsCollate(augment)([items[0], vol])


def test_on_device_path_gives_the_collate_views():
    """UniMiSSAugmentOnDevice (GPU arrangement; here on the CPU) on a batch collated without views = the views the
    CPU collate makes, for 2D working-size items and 3D volumes of different shapes."""
    augment = BatchedUniMiSSViews(size_2d=16, size_3d=(8, 8, 4), noise_prob=1.0, blur_prob_3d=0.5)
    front = UniMiSSWorkingSized(working_size=24)
    batches = [[front({"image": rand(1, 30, 18, seed=14), "seed": 1}), front({"image": rand(1, 24, 24, seed=15),
                                                                             "seed": 2})],
               [front({"image": rand(1, 12, 10, 6, seed=16), "seed": 3}), front({"image": rand(1, 7, 9, 5, seed=17),
                                                                                "seed": 4})]]
    for items in batches:
        on_cpu = UniMiSSViewsCollate(augment)(items)
        on_device = UniMiSSAugmentOnDevice(augment)(UniMiSSViewsCollate()(items), "cpu")
        assert "image" not in on_device and "extent" not in on_device
        assert all(torch.equal(a, b) for a, b in zip(on_cpu["crops"], on_device["crops"]))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="n_views"):
        BatchedUniMiSSViews(n_views=1)
    with pytest.raises(ValueError, match="scale_2d"):
        BatchedUniMiSSViews(scale_2d=(0.5, 1.5))
    with pytest.raises(ValueError, match="jitter_prob"):
        BatchedUniMiSSViews(jitter_prob=2.0)
    augment = BatchedUniMiSSViews(size_2d=8)
    with pytest.raises(ValueError, match="seeds"):
        augment(rand(2, 1, 16, 16), [1])
    with pytest.raises(ValueError, match="extents"):
        augment(rand(1, 1, 16, 16), [1], [[20, 16]])
    with pytest.raises(ValueError, match="3D volumes"):
        augment([rand(1, 16, 16)], [1])


# ------------------------------------------------------------------------------------------------ the bundle
BUNDLE_CONFIGS = [str(BUNDLES / "ssl_unimiss_pretrain" / "configs" / c)
                  for c in ("train.json", "smoke.json", "batched_views.json")]


def _bundle_parser(demo_datalist: Path, out: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(BUNDLE_CONFIGS)
    settings = {"bundle_root": str(Path(BUNDLE_CONFIGS[0]).parents[1]), "dataset_dir": str(demo_datalist.parent),
                "datalist": str(demo_datalist), "output_dir": str(out), "ckpt_dir": str(out / "ckpt"),
                "working_size": 64, "device": "cpu", **overrides}
    for key, value in settings.items():
        parser[key] = value
    return parser


def test_the_bundle_trains_in_process_with_batched_views(demo_datalist, tmp_path):
    """train.json + smoke.json + batched_views.json, one 2D and one 3D step in this process (no kNN monitor)."""
    parser = _bundle_parser(demo_datalist, tmp_path, epochs=1, **{"train#sampler#num_batches": 2, "knn#handlers": []})
    parser.get_parsed_content("initialize")
    parser_gpu = _bundle_parser(demo_datalist, tmp_path, on_cpu=False)  # the GPU arrangement: views in prepare_batch
    assert parser_gpu.get_parsed_content("train#dataloader#collate_fn").augment is None
    assert isinstance(parser_gpu.get_parsed_content("train#trainer#prepare_batch"), UniMiSSAugmentOnDevice)
    loader = parser.get_parsed_content("train#dataloader")
    assert isinstance(loader.collate_fn, UniMiSSViewsCollate) and loader.collate_fn.augment is not None
    batches = list(loader)
    shapes = [[tuple(v.shape) for v in b["crops"]] for b in batches]
    assert shapes == [[(2, 1, 64, 64)] * 2, [(1, 1, 64, 64, 16)] * 2]  # smoke.json: 2 images, then 1 volume
    parser.get_parsed_content("train#trainer").run()
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [int(r["dim"]) for r in records] == [2, 3]
    assert all(np.isfinite(r["loss"]) for r in records) and "loss_slice" in records[1]


def _run(demo_datalist: Path, out: Path, num_workers: int, *extra: str) -> list[dict]:
    return bundle_train_log(BUNDLES / "ssl_unimiss_pretrain", [Path(c).name for c in BUNDLE_CONFIGS], demo_datalist,
                            out, "--working_size", "64", "--num_workers", str(num_workers), *extra)


@pytest.mark.slow  # 25 s (two bundle runs); covered in the default suite by the in-process run and the batch-independence tests above
def test_batched_views_train_do_not_depend_on_workers(demo_datalist, tmp_path):
    """The UniMiSS bundle with batched_views.json: 0 and 2 DataLoader workers give the same losses, bit for bit, in
    its 2D and 3D steps."""
    serial = _run(demo_datalist, tmp_path / "w0", 0)
    parallel = _run(demo_datalist, tmp_path / "w2", 2)
    assert len(serial) == len(parallel) > 0 and {int(r["dim"]) for r in serial} == {2, 3}
    assert [r["loss"] for r in serial] == [r["loss"] for r in parallel]
    assert all(np.isfinite(r["loss"]) for r in serial)


@pytest.mark.slow  # 25 s (two bundle runs)
def test_batched_views_resume_exactly(demo_datalist, tmp_path):
    """A run with batched_views.json resumed from the mid-epoch checkpoint of iteration 6 continues the same
    losses (the EMA teacher included: the checkpoint is saved after every handler of the iteration)."""
    serial = _run(demo_datalist, tmp_path / "w0", 0)
    assert_resume_continues(lambda out, *extra: _run(demo_datalist, out, 0, *extra), serial, tmp_path / "w0",
                            tmp_path / "resumed", 6)


@pytest.mark.slow  # 10 s (the full train.json's per-item views of the demo items, three times per dimension); the default suite runs the SwAV branch of the same command (test_benchmark_loader.py)
def test_loader_benchmark_measures_the_unimiss_bundle_per_dimension(demo_datalist, tmp_path, capsys):
    """tools/benchmark.py loader on UniMiSS's full train.json: one row per dimension, three paths, the ratio printed
    (figures are not asserted: speed is a benchmark figure)."""


    tool = load_tool("benchmark.py", "medssl_benchmark_tool_unimiss")
    result = tool.loader(bundle=str(BUNDLES / "ssl_unimiss_pretrain"), dataset_dir=str(demo_datalist.parent),
                         datalist=str(demo_datalist), repeat=1, batch_size=8, num_workers=0, working_size=64,
                         cache_dir=str(tmp_path / "cache"))
    out = capsys.readouterr().out
    assert "| num_workers | items | today (items/s) | cache + per-item views (items/s) |" in out
    assert [row["variant"] for row in result["rows"]] == ["2D", "3D"]
    for row in result["rows"]:
        assert min(row["today"], row["cached"], row["new"]) > 0 and abs(row["ratio"] - row["new"] / row["today"]) < 1e-9
    assert any((tmp_path / "cache").rglob("*.pt"))


@pytest.mark.slow  # about 60 s (two bundle runs, one under torchrun); the default suite covers the parts: the views' independence of the batch (above) and the engine's 2 processes = 1 process (test_distributed_engine.py)
@pytest.mark.distributed
def test_two_process_batched_views_run_equals_one_process_run(demo_datalist, tmp_path):
    """train.json + smoke.json + batched_views.json: 1 process with batches of 4 images / 2 volumes against 2
    processes (gloo, + multi_gpu_train.json) with 2 / 1 per rank: the same losses (MiT and DINO head have no batch
    statistics; tolerance as the SwAV bundle's test: sums in another order across ranks)."""
    from medssl.engines.checkpoint import FINAL_CHECKPOINT_NAME, load_checkpoint

    torchrun = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    multi_gpu = str(BUNDLES / "ssl_unimiss_pretrain" / "configs" / "multi_gpu_train.json")

    def run(out: Path, launcher: list[str], configs: list[str], b2: int, b3: int) -> list[dict]:
        bundle = BUNDLES / "ssl_unimiss_pretrain"
        cmd = launcher + [
            "-m", "monai.bundle", "run", "--config_file", "[" + ",".join(f"'{c}'" for c in configs) + "]",
            "--bundle_root", str(bundle), "--dataset_dir", str(demo_datalist.parent), "--datalist",
            str(demo_datalist), "--output_dir", str(out), "--ckpt_dir", str(out / "ckpt"), "--working_size", "64",
            "--num_workers", "0", "--batch_size", str(b2), "--batch_size_3d", str(b3),
        ]
        proc = run_cmd(cmd, cwd=bundle, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]

    single = run(tmp_path / "single", [PYTHON], BUNDLE_CONFIGS, 4, 2)
    double = run(tmp_path / "ddp", torchrun, BUNDLE_CONFIGS + [multi_gpu], 2, 1)
    assert len(single) > 0 and [r["iteration"] for r in double] == [r["iteration"] for r in single]
    assert {int(r["dim"]) for r in single} == {2, 3}
    for a, b in zip(double, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a["iteration"], a["dim"], a["loss"], b["loss"])
    final = {name: load_checkpoint(tmp_path / name / "ckpt" / FINAL_CHECKPOINT_NAME) for name in ("single", "ddp")}
    assert final["ddp"]["world_size"] == 2 and final["single"]["world_size"] == 1
    for name, value in final["single"]["method"].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(final["ddp"]["method"][name], value, rtol=1e-5, atol=5e-6, msg=name)
