"""tools/benchmark.py swav-step: the plain-PyTorch reference step written in the benchmark computes SwAV's objective
(its Sinkhorn and swapped loss equal medssl's on the same scores), and the command prints every mode's images/s with
its ratio to the plain step (figures are not asserted: speed is a benchmark figure, not a test)."""

from __future__ import annotations


import pytest
import torch

from conftest import load_tool
from medssl.losses.sinkhorn import sinkhorn_knopp
from medssl.losses.swav import SwAVLoss


def _load_tool():
    return load_tool("benchmark.py", "medssl_benchmark_tool_swav_step")


def test_plain_reference_computes_the_same_codes_and_loss_as_medssl():
    tool = _load_tool()
    generator = torch.Generator().manual_seed(0)
    batch, n_crops, k = 6, 4, 30
    scores = torch.nn.functional.normalize(torch.randn(n_crops * batch, 8, generator=generator), dim=1)
    scores = scores @ torch.nn.functional.normalize(torch.randn(k, 8, generator=generator), dim=1).t()
    torch.testing.assert_close(tool._plain_sinkhorn(scores[:batch], 0.05, 3), sinkhorn_knopp(scores[:batch], 0.05, 3))
    ours = SwAVLoss(temperature=0.1, epsilon=0.05, sinkhorn_iters=3, crops_for_assign=(0, 1), n_crops=n_crops)
    torch.testing.assert_close(tool._plain_swapped_loss(scores, batch, n_crops, 0.1, 0.05, 3),
                               ours(scores, batch_size=batch))


def test_plain_reference_network_is_the_resnet_of_the_same_size():
    """The written-out ResNet-50 has torchvision's (and medssl's ResNetBackbone's) 23,508,032 trunk parameters."""
    tool = _load_tool()
    model = tool._plain_swav_model(*tool.SWAV_ARCHS["resnet50"], in_channels=3, hidden_dim=2048, feat_dim=128,
                                   n_prototypes=3000)
    assert sum(p.numel() for p in model.trunk.parameters()) == 23_508_032


def test_swav_step_prints_every_mode_against_the_plain_step(capsys):
    tool = _load_tool()
    result = tool.swav_step(arch="tiny", batch_size=4, large=32, small=16, n_large=2, n_small=2, iters=1, warmup=1,
                            modes="plain,eager,channels_last", threads=1)
    out = capsys.readouterr().out
    assert [row["mode"] for row in result["rows"]] == ["plain", "eager", "channels_last"]
    for row in result["rows"]:
        assert row["images_per_s"] > 0 and torch.isfinite(torch.tensor(row["loss"]))
        assert abs(row["vs_plain"] - result["rows"][0]["ms"] / row["ms"]) < 1e-9
        assert f"{row['vs_plain']:.2f}x the plain step" in out
    with pytest.raises(ValueError, match="modes"):
        tool.swav_step(arch="tiny", modes="fast")
