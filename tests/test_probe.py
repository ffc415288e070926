"""tools/probe.py: frozen-feature kNN / logistic-regression probes with a confidence interval over seeds."""

from __future__ import annotations

import json
import math

import fire
import pytest
import torch

from conftest import load_tool
from medssl.networks import ResNetBackbone
from medssl.weights import write_encoder_files

KWARGS = {"spatial_dims": 2, "in_channels": 1, "layers": [1, 1, 1, 1], "block": "basic", "block_inplanes": [4, 8, 8, 16]}


def _tool():
    return load_tool("probe.py", "probe_tool")


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    torch.manual_seed(0)
    backbone = ResNetBackbone(**KWARGS)
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    write_encoder_files(backbone.state_dict(), path, {
        "format": "medssl-encoder/1", "weights": "encoder.pt", "spatial_dims": 2, "in_channels": 1,
        "backbone": {"_target_": "medssl.networks.ResNetBackbone", "kwargs": KWARGS},
        "preprocessing": {"input_size": 32},
    })
    return path.with_suffix(".json")


def test_probe_knn_and_linear_with_ci_and_cache(encoder_file, demo_datalist, tmp_path, capsys):
    tool = _tool()
    kwargs = dict(encoder=str(encoder_file), datalist=str(demo_datalist), method="both", label_fraction=0.5,
                  seeds=2, k=5, cache_dir=str(tmp_path / "cache"))
    result = tool.run_probe(**kwargs)
    assert result["n_train"] > 0 and result["n_test"] > 0 and result["seeds"] == 2
    for method in ("knn", "linear"):
        acc = result["results"][method]["accuracy"]
        assert len(acc["values"]) == 2 and all(0.0 <= v <= 1.0 for v in acc["values"])
        assert acc["mean"] == pytest.approx(sum(acc["values"]) / 2)
        assert acc["ci95"] >= 0 and (acc["ci95"] > 0) == (len(set(acc["values"])) > 1)
    assert "computed" in capsys.readouterr().out
    again = tool.run_probe(**kwargs)  # embeddings come from the cache; same numbers
    assert "(cache," in capsys.readouterr().out
    assert again["results"]["knn"]["accuracy"]["values"] == result["results"]["knn"]["accuracy"]["values"]
    # the command line: random baseline of the same architecture, JSON output
    out = tmp_path / "probe.json"
    fire.Fire(tool.main, command=["--encoder", f"random:{encoder_file}", "--datalist", str(demo_datalist),
                                  "--method", "knn", "--seeds", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "knn" in printed and "accuracy" in printed and f"wrote {out}" in printed
    written = json.loads(out.read_text())
    assert written["results"]["knn"]["accuracy"]["ci95"] == 0.0
    assert not math.isnan(written["results"]["knn"]["accuracy"]["mean"])


def test_probe_errors(encoder_file, demo_datalist):
    tool = _tool()
    with pytest.raises(ValueError, match="--method"):
        tool.run_probe(encoder=str(encoder_file), datalist=str(demo_datalist), method="svm")
    with pytest.raises(ValueError, match="no 'nosuch' list in the datalist"):
        tool.run_probe(encoder=str(encoder_file), datalist=str(demo_datalist), test_section="nosuch")
    with pytest.raises(ValueError, match="needs 2 values"):
        tool.run_probe(encoder=str(encoder_file), datalist=str(demo_datalist), image_size=[8, 8, 8])


def test_recalibrate_bn_replaces_running_statistics_with_the_training_images(encoder_file, demo_datalist, tmp_path,
                                                                              monkeypatch):
    """--recalibrate-bn: the BatchNorm running statistics become the exact average over the probe's training images
    (the first BatchNorm sees the stem convolution of those images), so stale statistics no longer matter."""
    tool = _tool()
    module, manifest, _ = tool.build_probe_encoder(str(encoder_file))
    bn = next(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stem = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    items = tool.load_items(str(demo_datalist), "training", None, dims=2, keys=["image", "modality", "dim", "label"],
                            labelled_only="class")
    from monai.transforms import Compose, Resized
    transform = Compose(tool.loading_transforms(keys=["image"], channels=1) + [Resized(keys=["image"],
                                                                                       spatial_size=[32, 32])])
    bn.running_mean.fill_(5.0)
    tool.recalibrate_batchnorm(module, items, transform, batch_size=3)
    assert not module.training
    with torch.no_grad():
        images = torch.stack([torch.as_tensor(transform(dict(it))["image"]).float() for it in items])
        expected = stem(images).mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-4, atol=1e-5)
    # the probe with the flag: the cache key records it, so a recalibrated encoder never reads plain embeddings
    cache = str(tmp_path / "cache")
    plain = tool.embed_sections(str(encoder_file), str(demo_datalist), dims=2, cache_dir=cache)
    recal = tool.embed_sections(str(encoder_file), str(demo_datalist), dims=2, cache_dir=cache, recalibrate_bn="true")
    assert not recal["train"].from_cache
    assert not torch.allclose(plain["train"].features, recal["train"].features)
    # a cache hit needs no recalibration: the second run reads both sections without touching the statistics
    calls = []
    real = tool.recalibrate_batchnorm
    monkeypatch.setattr(tool, "recalibrate_batchnorm", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    again = tool.embed_sections(str(encoder_file), str(demo_datalist), dims=2, cache_dir=cache, recalibrate_bn="true")
    assert again["train"].from_cache and again["test"].from_cache and not calls
    torch.testing.assert_close(again["test"].features, recal["test"].features)
    fresh = tool.embed_sections(str(encoder_file), str(demo_datalist), dims=2, cache_dir=str(tmp_path / "c2"),
                                recalibrate_bn="true")  # both sections computed: recalibrated once
    assert len(calls) == 1 and not fresh["test"].from_cache
    torch.testing.assert_close(fresh["test"].features, recal["test"].features)
