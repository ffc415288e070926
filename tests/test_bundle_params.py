"""Boolean bundle parameters given on the command line (`--amp true`) reach the configs as text; every bundle reads
them through medssl.bundle.as_bool, and the bundle contract flags a config that does not."""

from __future__ import annotations

import json
import shutil

import pytest
from monai.bundle import ConfigParser

from medssl.bundle import as_bool, find_bundles, require, verify_bundle

from conftest import BUNDLES, PYTHON, run_cmd

ALL_BUNDLES = find_bundles(BUNDLES)


@pytest.mark.parametrize(
    "text, expected",
    [("true", True), ("True", True), ("TRUE", True), (" yes ", True), ("on", True), ("1", True), (1, True), (True, True),
     ("false", False), ("False", False), ("no", False), ("off", False), ("0", False), (0, False), (False, False)],
)
def test_as_bool_spellings(text, expected):
    assert as_bool(text, "amp") is expected


@pytest.mark.parametrize("bad", ["maybe", "", "2", 2, None, 0.5, "ture"])
def test_as_bool_rejects_anything_else_naming_the_key(bad):
    with pytest.raises(ValueError, match=r"^bundle parameter 'amp': .* is not a boolean; give one of true / false"):
        as_bool(bad, "amp")


def _boolean_uses(bundle):
    """(config id, key) of every value that is exactly `$medssl.bundle.as_bool(@key, 'key')` in train.json."""
    train = json.loads((bundle / "configs" / "train.json").read_text())
    flags = {k for k, v in train.items() if isinstance(v, bool) and not k.startswith("_") and k != "resume"}

    def walk(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{where}#{k}" if where else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{where}#{i}")
        elif isinstance(node, str):
            for key in flags:
                if node == f"$medssl.bundle.as_bool(@{key}, '{key}')":
                    yield where, key

    return flags, list(walk(train, ""))


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=[b.name for b in ALL_BUNDLES])
def test_every_boolean_parameter_of_the_bundle_takes_text(bundle):
    flags, uses = _boolean_uses(bundle)
    assert "amp" in flags and any(key == "amp" for _, key in uses), f"{bundle.name}: amp is not read through as_bool"
    for where, key in uses:
        for text, expected in (("true", True), ("False", False), ("0", False)):
            parser = ConfigParser()
            parser.read_config(str(bundle / "configs" / "train.json"))
            parser[key] = text
            assert parser.get_parsed_content(where, instantiate=False) is expected, (bundle.name, where, text)
        parser[key] = "maybe"
        with pytest.raises(Exception) as raised:  # MONAI wraps the expression's error in a RuntimeError
            parser.get_parsed_content(where, instantiate=False)
        chain = f"{raised.value} {raised.value.__cause__}"
        assert f"bundle parameter '{key}': 'maybe' is not a boolean" in chain, chain


def test_the_contract_flags_a_boolean_read_directly(tmp_path):
    bundle = tmp_path / "ssl_swav_multimodal_pretrain"
    shutil.copytree(BUNDLES / "ssl_swav_multimodal_pretrain", bundle, ignore=shutil.ignore_patterns("runs"))
    assert verify_bundle(bundle, check_workflows=False).ok
    train = bundle / "configs" / "train.json"
    train.write_text(train.read_text().replace("$medssl.bundle.as_bool(@amp, 'amp')", "@amp"))
    report = verify_bundle(bundle, check_workflows=False)
    assert any("uses the boolean parameter @amp directly" in p for p in map(str, report.problems)), str(report)


def test_a_bad_boolean_on_the_command_line_stops_the_run_naming_the_key(demo_datalist, tmp_path):
    bundle = BUNDLES / "ssl_swav_multimodal_pretrain"
    configs = "[" + ",".join(f"'{bundle / 'configs' / c}'" for c in ("train.json", "smoke.json")) + "]"
    cmd = [PYTHON, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(bundle),
           "--dataset_dir", str(demo_datalist.parent), "--output_dir", str(tmp_path), "--amp", "maybe"]
    proc = run_cmd(cmd, cwd=bundle, timeout=300)
    assert proc.returncode != 0
    assert "bundle parameter 'amp': 'maybe' is not a boolean" in proc.stdout + proc.stderr
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_require_passes_or_stops_with_the_reason():
    assert require(1 == 1, "never shown") is True
    with pytest.raises(ValueError, match="^stage 2 does not take this file$"):
        require(2 == 1, "stage 2 does not take this file")
