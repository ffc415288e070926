"""Configs MONAI tools can edit (issue #14 item 1): transforms are lists of ``_target_`` dicts, not long ``$`` strings,
so that one transform's parameter can be overridden from the command line."""

from __future__ import annotations

import json

import pytest

from conftest import REPO

BUNDLES = REPO / "bundles"
#: longest transform-related ``$`` expression allowed (model-zoo's spleen bundle's longest is 71)
MAX_EXPRESSION = 120


def _transform_expressions(config, path: str = ""):
    """(path, expression) of every transform-related ``$`` string in a parsed config file."""
    if isinstance(config, dict):
        for key, value in config.items():
            yield from _transform_expressions(value, f"{path}#{key}")
    elif isinstance(config, list):
        for index, value in enumerate(config):
            yield from _transform_expressions(value, f"{path}#{index}")
    elif isinstance(config, str) and config.startswith("$"):
        if any(word in path for word in ("transforms", "augmentation", "loading")) or "transforms." in config:
            yield path, config


CONFIG_FILES = sorted(BUNDLES.glob("*/configs/*.json"))


def test_every_bundle_config_is_checked():
    assert len({p.parent.parent.name for p in CONFIG_FILES}) >= 8, CONFIG_FILES


@pytest.mark.parametrize("config_file", CONFIG_FILES, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_no_long_transform_expression(config_file):
    config = json.loads(config_file.read_text(encoding="utf-8"))
    too_long = [f"{path} ({len(expr)} characters)" for path, expr in _transform_expressions(config)
                if len(expr) > MAX_EXPRESSION]
    assert not too_long, f"{config_file.relative_to(REPO)}: write these as lists of _target_ dicts: {too_long}"


def _segmentation_2d_parser(**overrides):
    from monai.bundle import ConfigParser

    configs = BUNDLES / "xray_segmentation_2d" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "smoke.json")])
    parser["bundle_root"] = str(BUNDLES / "xray_segmentation_2d")
    parser.update(overrides)  # what `python -m monai.bundle run --train#augmentation#0#prob 0.0` does
    return parser


def test_one_transform_parameter_is_overridden_from_the_command_line():
    from monai.transforms import RandAffined, Resized

    default = _segmentation_2d_parser().get_parsed_content("train#preprocessing")
    parser = _segmentation_2d_parser(**{"train#augmentation#0#prob": 0.0, "resize#0#spatial_size": [32, 48]})
    preprocessing = parser.get_parsed_content("train#preprocessing")

    def only(compose, kind):
        found = [t for t in compose.transforms if isinstance(t, kind)]
        assert len(found) == 1, compose.transforms
        return found[0]

    assert only(default, RandAffined).prob == 0.5
    assert only(preprocessing, RandAffined).prob == 0.0  # the instantiated transform, not the config text
    assert tuple(only(preprocessing, Resized).resizer.spatial_size) == (32, 48)
    # the same flat sequence of transforms either way (no nested Compose shifting the per-item seeds)
    assert [type(t) for t in preprocessing.transforms] == [type(t) for t in default.transforms]
    assert not any(type(t).__name__ == "Compose" for t in preprocessing.transforms)


def test_a_reference_to_a_list_of_target_dicts_is_a_list_of_transforms():
    from monai.transforms import MapTransform

    parser = _segmentation_2d_parser()
    loading = parser.get_parsed_content("loading")
    assert isinstance(loading, list) and loading and all(isinstance(t, MapTransform) for t in loading)
    train = parser.get_parsed_content("train#preprocessing").transforms
    validate = parser.get_parsed_content("validate#preprocessing").transforms
    assert [type(t) for t in train[: len(loading)]] == [type(t) for t in loading]
    assert [type(t) for t in validate] == [type(t) for t in loading] + [type(parser.get_parsed_content("resize#0"))]


def test_a_disabled_transform_is_left_out_and_enabled_by_its_option():
    """ct_mr_segmentation_3d's Spacingd is in the loading list only when pixdim is set."""
    from monai.bundle import ConfigParser
    from monai.transforms import Spacingd

    configs = BUNDLES / "ct_mr_segmentation_3d" / "configs"

    def loading(**overrides):
        parser = ConfigParser()
        parser.read_config([str(configs / "train.json"), str(configs / "smoke.json")])
        parser.update(overrides)
        return parser.get_parsed_content("loading")

    assert not any(isinstance(t, Spacingd) for t in loading())
    spacing = [t for t in loading(pixdim=[1.5, 1.5, 2.0]) if isinstance(t, Spacingd)]
    assert len(spacing) == 1
