"""The SwAV bundle's opt-in batched data path (configs/batched_views.json, issue #12) trains on the demo data, its
views, hence its losses, do not depend on the number of DataLoader workers, and a run resumed from a mid-epoch
checkpoint continues the same loss sequence."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import BUNDLES, assert_resume_continues, bundle_train_log

BUNDLE = BUNDLES / "ssl_swav_multimodal_pretrain"


def _run(demo_datalist: Path, out: Path, num_workers: int, *extra: str) -> list[dict]:
    return bundle_train_log(BUNDLE, ["train.json", "smoke.json", "batched_views.json"], demo_datalist, out,
                            "--working_size", "64", "--num_workers", str(num_workers), *extra)


@pytest.mark.slow  # 30+ s; covered in the default suite by: the batched views in test_batched_augment.py and test_benchmark_loader.py
def test_batched_views_train_do_not_depend_on_workers_and_resume_exactly(demo_datalist, tmp_path):
    serial = _run(demo_datalist, tmp_path / "w0", 0)
    parallel = _run(demo_datalist, tmp_path / "w2", 2)
    assert len(serial) == len(parallel) > 0
    assert [r["loss"] for r in serial] == [r["loss"] for r in parallel]
    assert all(r["loss"] == r["loss"] for r in serial)  # finite, not NaN
    # resume from the checkpoint of iteration 6 (inside epoch 2 of 5-iteration epochs): the rest of the run again
    assert_resume_continues(lambda out, *extra: _run(demo_datalist, out, 0, *extra), serial, tmp_path / "w0",
                            tmp_path / "resumed", 6)


def _documented_batched_quick_start() -> tuple[list[str], dict]:
    """The config files and overrides of the docs' "quick start on the batched path" command, as the command line
    gives them to the configs (numbers parsed, '$None' kept)."""
    import ast
    import shlex

    line = next(ln for ln in (BUNDLE / "docs" / "README.md").read_text().splitlines()
                if ln.strip().startswith("python -m monai.bundle run") and "--batched_views#energy" in ln)
    args = shlex.split(line.strip())
    files = ast.literal_eval(args[args.index("--config_file") + 1])
    overrides = {}
    for key, value in zip(args, args[1:]):
        if key.startswith("--") and key not in ("--config_file",):
            try:
                overrides[key[2:]] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                overrides[key[2:]] = value
    return files, overrides


def test_the_documented_batched_quick_start_makes_demo_json_views():
    """docs/README.md's command that runs the quick start on the batched path: BatchedMultiCrop gets demo.json's
    crops, set A without energy bands and demo.json's per-view flip / blur / noise, with the same distributions as
    the per-item path's MONAI transforms."""
    from monai.bundle import ConfigParser

    files, overrides = _documented_batched_quick_start()
    assert [Path(f).name for f in files] == ["train.json", "demo.json", "batched_views.json"]
    parser = ConfigParser()
    parser.read_config([str(BUNDLE.parents[1] / f) for f in files])
    for key, value in overrides.items():
        if key not in ("bundle_root", "dataset_dir", "datalist"):
            parser[key] = value
    batched = parser.get_parsed_content("batched_views")
    set_a, nuisance = parser.get_parsed_content("train#multicrop#augment").transforms
    energy, gamma, linear = set_a.transforms
    flip, blur, noise = nuisance.transforms
    assert energy.prob == 0.0 and batched.energy is None
    assert batched.groups == [(2, 64), (4, 32)] and batched.scales == [(0.3, 1.0)] * 2
    assert (batched.gamma_prob, batched.gamma_range, batched.gamma_reciprocal_prob) == (
        gamma.prob, tuple(gamma.gamma_range), gamma.reciprocal_prob)
    assert (batched.linear_prob, batched.a_range, batched.b_fraction) == (
        linear.prob, tuple(linear.a_range), linear.b_fraction)
    assert batched.flip_prob == flip.prob and batched.flip_axes == (0,)
    assert (batched.blur_prob, batched.blur_sigma) == (blur.prob, tuple(blur.rand_smooth.sigma_x))
    assert (batched.noise_prob, batched.noise_std) == (noise.prob, noise.rand_gaussian_noise.std)
    assert noise.rand_gaussian_noise.sample_std  # both draw the noise std in [0, noise_std]
    assert parser.get_parsed_content("working_size") == 128  # the demo images' size: no resampling before the crops
