"""The weights catalogue (issue #17 item 3): medssl/weights/catalogue.json validates, tools/weights.py lists and
fetches entries through file:// mirrors of a synthetic SwAV checkpoint (hash checked, recorded when none is
published, cached once, one-line errors naming the URL), and --pretrained_path NAME resolves through it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import TOOLS, load_tool
from medssl.networks import ResNetBackbone
from medssl.utils.io import file_sha256
from medssl.weights import catalogue
from medssl.weights.catalogue import CATALOGUE_ENV, fetch_encoder, load_catalogue
from medssl.weights.export import build_encoder_from_manifest
from medssl.weights.loading import load_pretrained_encoder, resolve_pretrained_path


def _tool():
    return load_tool("weights.py", "medssl_weights_tool")


weights_tool = _tool()
SHIPPED = Path(catalogue.__file__).with_name("catalogue.json")


@pytest.fixture(scope="module")
def swav_checkpoint(tmp_path_factory):
    """A synthetic SwAV ResNet-50 training checkpoint (``state_dict`` with ``module.``, a projection head)."""
    torch.manual_seed(0)
    trunk = ResNetBackbone(spatial_dims=2, in_channels=3, width=1).state_dict()
    state = {f"module.{k}": v for k, v in trunk.items()}
    state["module.projection_head.0.weight"] = torch.randn(8, 2048)
    path = tmp_path_factory.mktemp("mirror") / "swav_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "state_dict": state}, path)
    return path, trunk


@pytest.fixture()
def mirror(tmp_path, monkeypatch, swav_checkpoint):
    """A catalogue whose swav_rn50_800ep URL is a file:// mirror (a copy of the synthetic checkpoint) and whose
    'gone' entry points at a missing file; $MEDSSL_CACHE and $MEDSSL_WEIGHTS_CATALOGUE point into tmp_path."""
    source, trunk = swav_checkpoint
    copy = tmp_path / "mirror" / source.name
    copy.parent.mkdir()
    copy.write_bytes(source.read_bytes())
    doc = json.loads(SHIPPED.read_text())
    for entry in doc["encoders"]:
        if entry["name"] == "swav_rn50_800ep":
            entry["url"] = copy.as_uri()
            gone = dict(entry, name="gone", url=(tmp_path / "nowhere" / "gone.pth").as_uri())
    doc["encoders"].append(gone)
    mirrored = tmp_path / "catalogue.json"
    mirrored.write_text(json.dumps(doc))
    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(CATALOGUE_ENV, str(mirrored))
    return {"file": copy, "url": copy.as_uri(), "sha256": file_sha256(copy), "trunk": trunk,
            "cache": tmp_path / "cache" / "weights", "catalogue": mirrored, "gone": gone["url"]}


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        weights_tool.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_shipped_catalogue_validates_and_lists_every_name(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path))
    monkeypatch.delenv(CATALOGUE_ENV, raising=False)
    entries = load_catalogue()
    assert {"swav_rn50_800ep", "deepclusterv2_rn50_800ep", "swav_rn50w2_400ep", "dino_vits16", "dino_vits8",
            "dino_vitb16", "unimiss_small"} <= set(entries)
    for entry in entries.values():  # no invented hashes: the authors publish none
        assert entry["sha256"] is None and entry["licence"] and entry["paper"]
        assert entry["url"] is None or entry["url"].startswith("https://dl.fbaipublicfiles.com/")
    weights_tool.main(["list"])
    out = capsys.readouterr().out
    assert all(name in out for name in entries) and "CC-BY-NC 4.0" in out and "Apache-2.0" in out
    err = _error(capsys, ["fetch", "unimiss_small"])  # Google Drive only: what to do, in one line
    assert "github.com/YtongXie/UniMiSS-code" in err and "convert_weights.py unimiss" in err


def test_bad_catalogue_entries_are_one_line_errors_naming_the_entry(tmp_path):
    entry = load_catalogue()["dino_vits16"]
    for change, message in (({"family": "moco"}, "dino_vits16.*unknown family 'moco'"),
                            ({"licence": ..., "paper": ...}, None), ({"sha256": "abc"}, "not a sha256")):
        bad = {k: v for k, v in {**entry, **change}.items() if v is not ...}  # ...: the field left out
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"encoders": [bad]}))
        with pytest.raises(ValueError, match=message or r"dino_vits16\): missing field\(s\) licence, paper"):
            load_catalogue(path)


def test_fetch_checks_the_hash_converts_and_reuses_the_cache(mirror, capsys):
    weights_tool.main(["fetch", "swav_rn50_800ep", "--sha256", mirror["sha256"]])
    out = capsys.readouterr().out.strip().splitlines()
    encoder = Path(out[-1])
    assert encoder == mirror["cache"] / "catalogue" / "swav_rn50_800ep" / "encoder.pt" and mirror["sha256"] in out[-2]
    manifest = json.loads(encoder.with_suffix(".json").read_text())
    assert manifest["catalogue"]["name"] == "swav_rn50_800ep" and manifest["catalogue"]["url"] == mirror["url"]
    assert manifest["catalogue"]["licence"] == "CC-BY-NC 4.0" and "SwAV" in manifest["catalogue"]["paper"]
    backbone = build_encoder_from_manifest(encoder.with_suffix(".json"))
    assert isinstance(backbone, ResNetBackbone)
    for key, value in mirror["trunk"].items():  # the trunk's tensors (2D kernels transposed to column-first)
        expected = value.transpose(2, 3) if value.dim() == 4 else value
        assert torch.equal(backbone.state_dict()[key], expected), key
    assert (encoder.parent / "encoder_head.pt").is_file()  # the projection head kept, not dropped

    mirror["file"].unlink()  # a second fetch does not download
    assert fetch_encoder("swav_rn50_800ep", sha256=mirror["sha256"]) == encoder
    weights_tool.main(["list"])
    assert any(line.startswith("swav_rn50_800ep") and line.endswith("yes") for line in
               capsys.readouterr().out.splitlines())


def test_hash_mismatch_and_missing_file_are_one_line_errors_naming_the_url(mirror, capsys):
    wrong = "0" * 64
    err = _error(capsys, ["fetch", "swav_rn50_800ep", "--sha256", wrong])
    assert mirror["url"] in err and mirror["sha256"] in err and wrong in err
    folder = mirror["cache"] / "catalogue" / "swav_rn50_800ep"
    assert not [p for p in folder.rglob("*") if p.is_file()]  # nothing cached
    err = _error(capsys, ["fetch", "gone"])
    assert mirror["gone"] in err and "download failed" in err and "No such file" in err
    err = _error(capsys, ["fetch", "swav_rn5O_800ep"])
    assert "not in the weights catalogue" in err and "swav_rn50_800ep" in err and "dino_vits16" in err


def test_null_hash_is_recorded_and_a_later_different_file_is_refused(mirror, caplog):
    with caplog.at_level("WARNING"):
        encoder = fetch_encoder("swav_rn50_800ep")
    folder = encoder.parent
    assert (folder / "source.sha256").read_text().split()[0] == mirror["sha256"]
    assert "not checked against a published hash" in caplog.text
    mirror["file"].write_bytes(b"another upload")
    with pytest.raises(ValueError, match=rf"{mirror['url']}: .*sha256 [0-9a-f]{{64}}, but the sha256 recorded by "
                                         rf"the first fetch .* is {mirror['sha256']}"):
        fetch_encoder("swav_rn50_800ep", force=True)
    assert encoder.is_file() and (folder / "source.sha256").read_text().split()[0] == mirror["sha256"]


def test_pretrained_path_resolves_a_catalogue_name(mirror, tmp_path):
    path = resolve_pretrained_path("swav_rn50_800ep", sha256=mirror["sha256"])
    assert path == mirror["cache"] / "catalogue" / "swav_rn50_800ep" / "encoder.pt" and path.is_file()
    backbone = ResNetBackbone(spatial_dims=2, in_channels=3, width=1)
    report = load_pretrained_encoder(backbone, "swav_rn50_800ep", encoder_prefix="", spatial_dims=2, verbose=False)
    assert len(report.loaded) == len(mirror["trunk"])
    other = tmp_path / "other_cache"
    assert resolve_pretrained_path("swav_rn50_800ep", cache_dir=other).is_relative_to(other)
    with pytest.raises(FileNotFoundError, match=r"no_such_encoder: no such file \(nor a weights catalogue name"):
        resolve_pretrained_path("no_such_encoder")


def test_dvme_encoders_take_a_catalogue_name(mirror):
    from medssl.evaluation.dvme_protocol.encoders import build_encoder, parse_encoder_specs

    specs = parse_encoder_specs([{"name": "swav", "path": "swav_rn50_800ep"}])
    encoder = build_encoder(specs[0])  # fetched here; grey images are repeated to the encoder's 3 channels
    assert encoder.channels == 3 and isinstance(encoder.encoder, ResNetBackbone)
    with pytest.raises(FileNotFoundError, match=r"path swav_rn5O: no such encoder file \(nor a weights catalogue"):
        parse_encoder_specs([{"name": "swav", "path": "swav_rn5O"}])


def test_downstream_bundle_docs_show_a_catalogue_name():
    names = "|".join(load_catalogue(SHIPPED))
    for bundle in ("xray_classification", "xray_segmentation_2d", "ct_volume_classification", "ct_mr_segmentation_3d",
                   "dvme_classification"):
        text = (TOOLS.parent / "bundles" / bundle / "docs" / "README.md").read_text()
        assert re.search(rf"(--pretrained_path|'path':) '?({names})\b", text), bundle
    assert "tools/weights.py fetch swav_rn50_800ep" in (TOOLS.parent / "README.md").read_text()
