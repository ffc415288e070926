"""tools/benchmark.py loader: runs on the SwAV bundle's full train.json and prints today's and the new data path's
items/s side by side with their ratio (figures are not asserted: speed is a benchmark figure, not a test)."""

from __future__ import annotations


from conftest import REPO, load_tool


def _load_tool():
    return load_tool("benchmark.py", "medssl_benchmark_tool_loader")


def test_loader_prints_both_paths_and_the_ratio(demo_datalist, tmp_path, capsys):
    tool = _load_tool()
    result = tool.loader(
        bundle=str(REPO / "bundles" / "ssl_swav_multimodal_pretrain"), dataset_dir=str(demo_datalist.parent),
        datalist=str(demo_datalist), repeat=1, batch_size=8, num_workers=0, working_size=64,
        cache_dir=str(tmp_path / "cache"),
    )
    out = capsys.readouterr().out
    assert "| num_workers | augmentations | today (items/s) | new: cache + batched (items/s) | new / today |" in out
    assert [row["variant"] for row in result["rows"]] == ["set A", "set A without energy bands"]
    for row in result["rows"]:
        assert row["today"] > 0 and row["new"] > 0 and abs(row["ratio"] - row["new"] / row["today"]) < 1e-9
    assert any(tmp_path.joinpath("cache").glob("*.pt"))
