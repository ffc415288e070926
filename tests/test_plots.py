"""Embedding / attention pictures (medssl.evaluation.plots): t-SNE on small sets, PNG files written atomically."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

import medssl.evaluation.plots as plots_module
from medssl.evaluation.plots import (
    EmbeddingPanel,
    plot_attention_map,
    plot_embedding,
    plot_embedding_panels,
    reduce_to_2d,
    tsne_embedding,
)


def _clusters(n_per: int = 12, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    centres = rng.normal(scale=20.0, size=(3, dim))
    x = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(3), n_per)


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_tsne_is_seeded_and_keeps_clusters_apart():
    x, y = _clusters()
    a = tsne_embedding(torch.from_numpy(x), seed=3)
    b = tsne_embedding(x, seed=3)
    assert a.shape == (36, 2) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    # every point's nearest 2D neighbour belongs to its own cluster
    d = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (y[d.argmin(1)] == y).all()


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_tsne_small_sets_clip_the_perplexity(n):
    x = np.random.RandomState(n).normal(size=(n, 8))
    points = tsne_embedding(x, seed=0, perplexity=30.0)
    assert points.shape == (n, 2) and np.isfinite(points).all()


def test_tsne_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        tsne_embedding(np.zeros((4, 2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        tsne_embedding(np.full((4, 3), np.nan))


def test_reduce_to_2d_falls_back_to_tsne_without_umap(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # makes `import umap` raise ImportError
    x, _ = _clusters(n_per=4)
    points, method = reduce_to_2d(x, seed=0, method="auto")
    assert method == "tsne" and points.shape == (12, 2)
    with pytest.raises(ImportError, match="umap-learn"):
        reduce_to_2d(x, method="umap")
    with pytest.raises(ValueError, match="method"):
        reduce_to_2d(x, method="pca")


def test_plot_embedding_writes_a_png_atomically(tmp_path):
    x, y = _clusters(n_per=5)
    points = tsne_embedding(x, seed=0)
    out = tmp_path / "new" / "folder" / "emb.png"
    modality = np.array(["XR", "CT"] * 7 + ["XR"])
    path = plot_embedding(points, y, title="t", out_path=out, label_names=["a", "b", "c"], markers=modality)
    assert path == out and out.is_file()
    w, h = _png_size(out)
    assert w > 100 and h > 100
    assert [p.name for p in out.parent.iterdir()] == ["emb.png"]  # no temp file left


def test_panels_side_by_side_and_errors_leave_no_file(tmp_path):
    x, y = _clusters(n_per=4)
    points = tsne_embedding(x, seed=0)
    panels = [EmbeddingPanel(f"encoder {i}", points + i, y) for i in range(3)]
    panels.append(EmbeddingPanel("by name", points, np.array(["u", "v", "w"] * 4)))
    out = plot_embedding_panels(panels, out_path=tmp_path / "panels.png", title="four")
    w, h = _png_size(out)
    assert w > 2.5 * h  # four panels in one row
    with pytest.raises(ValueError, match="12 points but 11 labels"):
        plot_embedding_panels([EmbeddingPanel("bad", points, y[:-1])], out_path=tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plot_embedding(x, y, title="not 2D", out_path=tmp_path / "bad2.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["panels.png"]


def test_attention_map_png_and_shape_check(tmp_path):
    m = torch.softmax(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    out = plot_attention_map(m, ["simclr", "swav", "dino"], tmp_path / "attn.png")
    w, h = _png_size(out)
    assert w > 100 and h > 100
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        plot_attention_map(m, ["a", "b"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_attention_map_colour_bar_states_its_range(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots_module, "save_figure", lambda fig, out_path: figures.append(fig) or out_path)
    m = np.array([[0.6, 0.4], [0.3, 0.7]])
    plot_attention_map(m, ["a", "b"], tmp_path / "own.png")
    plot_attention_map(m, ["a", "b"], tmp_path / "fixed.png", fixed_scale=True)
    labels = [fig.axes[-1].get_ylabel() for fig in figures]  # the colour bar's axis
    assert labels == ["share of attention (this map's range 0.300-0.700)", "share of attention (fixed scale 0-1)"]
    assert figures[1].axes[0].images[0].get_clim() == (0.0, 1.0)
    assert figures[0].axes[0].images[0].get_clim() == (0.3, 0.7)


@pytest.mark.slow  # covered in the default suite by: the tool also runs in test_plot_embeddings_mixed_channels.py
def test_plot_embeddings_tool(demo_datalist, tmp_path):
    """tools/plot_embeddings.py on an exported (random) encoder: a two-panel PNG; a bad encoder path exits 2."""
    import subprocess

    from medssl.evaluation.dvme_protocol import SMOKE_BACKBONES, write_random_encoders

    from conftest import PYTHON, TOOLS, subprocess_env

    spec = write_random_encoders(tmp_path / "enc", {"tiny": SMOKE_BACKBONES["resnet_basic"]})[0]
    out = tmp_path / "fig.png"
    cmd = [PYTHON, str(TOOLS / "plot_embeddings.py"), "--encoder", spec["path"], "--datalist", str(demo_datalist),
           "--out", str(out), "--section", "test", "--max-items", "14", "--image-size", "32",
           "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "computed" in proc.stdout and f"wrote {out}" in proc.stdout
    w, h = _png_size(out)
    assert w > 1.5 * h  # two panels side by side
    assert list((tmp_path / "cache").glob("tiny-*.pt"))
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "missing.json")] + cmd[4:], env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing.json" in bad.stderr
