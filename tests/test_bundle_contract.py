"""The bundle contract: the checker catches violations, and every bundle under bundles/ passes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import medssl
from medssl.bundle import OFFICIAL_SCHEMA_URL, TRAIN_TOP_LEVEL_KEYS, find_bundles, verify_bundle

from conftest import BUNDLES, REPO, load_tool

# the real bundles plus the test fixture (so the contract test runs before the first method bundle exists)
ALL_BUNDLES = find_bundles(BUNDLES) + find_bundles(REPO / "tests" / "fixtures" / "bundles")


def _metadata(name: str) -> dict:
    tensor = {
        "type": "image",
        "format": "magnitude",
        "modality": "CT",
        "num_channels": 1,
        "spatial_shape": [64, 64],
        "dtype": "float32",
        "value_range": [0, 1],
        "is_patch_data": False,
        "channel_def": {"0": "image"},
    }
    return {
        "schema": OFFICIAL_SCHEMA_URL,
        "name": name,
        "version": "0.1.0",
        "changelog": {"0.1.0": "first"},
        "monai_version": "1.6.1",
        "pytorch_version": "2.13.0",
        "numpy_version": "2.0",
        "required_packages_version": {"medssl": medssl.__version__},
        "task": "test",
        "description": "test bundle",
        "authors": "medssl",
        "copyright": "medssl",
        "network_data_format": {"inputs": {"image": tensor}, "outputs": {"pred": dict(tensor, format="latent")}},
    }


def _make_bundle(root: Path, name: str = "toy_test_bundle") -> Path:
    b = root / name
    (b / "configs").mkdir(parents=True)
    (b / "docs").mkdir()
    (b / "LICENSE").write_text("Apache-2.0")
    (b / "docs" / "README.md").write_text("python -m monai.bundle run --config_file configs/train.json\n")
    (b / "docs" / "data_license.txt").write_text("synthetic")
    (b / "large_files.yml").write_text("large_files: []\n")
    (b / "configs" / "logging.conf").write_text((REPO / "tests" / "fixtures" / "logging.conf").read_text())
    (b / "configs" / "metadata.json").write_text(json.dumps(_metadata(name)))
    train = {k: None for k in TRAIN_TOP_LEVEL_KEYS}
    train.update(
        {
            "bundle_root": ".",
            "device": "$torch.device('cpu')",
            "dataset_dir": ".",
            "train": {"trainer": {"max_epochs": 1}, "dataset": [], "inferer": {"_target_": "SimpleInferer"}},
        }
    )
    (b / "configs" / "train.json").write_text(json.dumps(train))
    (b / "configs" / "smoke.json").write_text(json.dumps({"epochs": 1}))
    (b / "configs" / "multi_gpu_train.json").write_text(json.dumps({"device": "$torch.device('cpu')"}))
    infer = {
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "dataset_dir": ".",
        "dataset": [],
        "evaluator": {},
        "network_def": {"_target_": "torch.nn.Identity"},
        "inferer": {"_target_": "SimpleInferer"},
    }
    (b / "configs" / "inference.json").write_text(json.dumps(infer))
    return b


def test_checker_accepts_a_conforming_bundle(tmp_path):
    report = verify_bundle(_make_bundle(tmp_path))
    assert report.ok, str(report)


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda b: (b / "LICENSE").unlink(), "LICENSE: required file is missing"),
        (lambda b: (b / "configs" / "smoke.json").unlink(), "smoke.json: required override file is missing"),
        (lambda b: _edit(b, "metadata.json", lambda m: m.pop("copyright")), "'copyright' is a required property"),
        (lambda b: _edit(b, "metadata.json", lambda m: m.update(version="0.2.0")), "not listed in the changelog"),
        (lambda b: _edit(b, "metadata.json", lambda m: m.update(name="other")), "differs from the folder name"),
        (
            lambda b: _edit(b, "metadata.json", lambda m: m["required_packages_version"].pop("medssl")),
            "does not pin medssl",
        ),
        (
            lambda b: _edit(b, "metadata.json", lambda m: m["network_data_format"]["outputs"].pop("pred")),
            "'pred' is a required property",
        ),
        (lambda b: _edit(b, "train.json", lambda m: m.pop("resume")), "missing top-level keys ['resume']"),
        (lambda b: _edit(b, "train.json", lambda m: m["train"].pop("inferer")), "misses required properties"),
        (lambda b: _edit(b, "inference.json", lambda m: m.pop("network_def")), "misses required properties"),
        (lambda b: (b / "configs" / "train.json").write_text("{not json"), "train.json: not valid JSON"),
        (lambda b: (b / "large_files.yml").write_text("large_files: [{path: x}]"), "missing ['url', 'hash_val'"),
        (lambda b: (b / "docs" / "README.md").write_text("no commands"), "python -m monai.bundle run"),
    ],
)
def test_checker_reports_each_violation(tmp_path, breakage, expected):
    b = _make_bundle(tmp_path)
    breakage(b)
    report = verify_bundle(b)
    assert not report.ok
    assert any(expected in p for p in report.problems), str(report)


def _edit(bundle: Path, config: str, fn) -> None:
    path = bundle / "configs" / config
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_check_bundle_tool_exit_codes(tmp_path, capsys):
    """The tool's command through medssl.cli.run in this process (as its __main__ does): no exit for good bundles,
    exit status 1 and the fault named for a bad one."""

    from medssl.cli import run

    good = _make_bundle(tmp_path, "good_bundle")
    bad = _make_bundle(tmp_path, "bad_bundle")
    (bad / "LICENSE").unlink()
    tool = load_tool("check_bundle.py", "check_bundle_tool")
    run(tool.main, argv=[str(good)])
    assert "1 bundle(s) OK, 0 with problems" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        run(tool.main, argv=[str(good), str(bad)])
    assert exit_info.value.code == 1
    assert "bad_bundle/LICENSE: required file is missing" in capsys.readouterr().out


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=[b.name for b in ALL_BUNDLES])
def test_every_bundle_follows_the_contract(bundle):
    report = verify_bundle(bundle)
    assert report.ok, str(report)
