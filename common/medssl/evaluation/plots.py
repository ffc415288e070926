"""Embedding and attention pictures: t-SNE / UMAP of embeddings, scatter plots (one or several panels), heat maps.

Used by the DVME protocol (Truong et al., ML4H 2021, Appendix F: t-SNE of each encoder's embedding beside the DVME
embedding, and the encoder-to-encoder attention map) and by ``tools/plot_embeddings.py``.

Matplotlib is used through :class:`matplotlib.figure.Figure` and its Agg canvas only (never ``pyplot``), so no global
backend is selected and nothing needs a display. PNG files are written atomically (temp file in the same folder, then
renamed), so a reader never sees half a picture.

Randomness: t-SNE / UMAP take an explicit ``seed`` (their own ``random_state``); the global RNG is not used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medssl.utils.io import atomic_write
from medssl.utils.tensors import as_plain_tensor

__all__ = [
    "EmbeddingPanel",
    "tsne_embedding",
    "umap_embedding",
    "reduce_to_2d",
    "plot_embedding",
    "plot_embedding_panels",
    "plot_attention_map",
    "save_figure",
]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def _as_numpy(values: Any, dtype=None) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor (MetaTensor included)
        values = as_plain_tensor(values.detach().cpu()).numpy()
    return np.asarray(values, dtype=dtype)


def _check_features(features: Any, where: str) -> np.ndarray:
    x = _as_numpy(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{where}: features must be (N, D), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{where}: features contain NaN or inf")
    return x


def tsne_embedding(features: Any, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """t-SNE (scikit-learn, PCA initialisation) of ``features`` (N, D) to (N, 2) float32 points.

    ``perplexity`` is clipped to ``(N - 1) / 3`` (and at least 1) so that small sets work: t-SNE needs a perplexity
    below N. N = 1 gives the origin; N = 2 two points on the x axis (t-SNE is undefined there).
    """
    x = _check_features(features, "tsne_embedding")
    n = x.shape[0]
    if n <= 2:
        return np.array([[float(i), 0.0] for i in range(n)], dtype=np.float32).reshape(n, 2)
    from sklearn.manifold import TSNE

    perplexity = float(max(1.0, min(perplexity, (n - 1) / 3.0)))
    init = "pca" if min(x.shape) >= 2 else "random"
    points = TSNE(n_components=2, perplexity=perplexity, init=init, learning_rate="auto", random_state=seed)
    return points.fit_transform(x).astype(np.float32)


def umap_embedding(features: Any, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """UMAP of ``features`` (N, D) to (N, 2); needs the optional ``umap-learn`` package (ImportError otherwise).
    ``n_neighbors`` is clipped to N - 1."""
    import umap  # optional dependency

    x = _check_features(features, "umap_embedding")
    n = x.shape[0]
    if n <= 3:
        return tsne_embedding(x, seed=seed)
    reducer = umap.UMAP(n_components=2, n_neighbors=int(max(2, min(n_neighbors, n - 1))), random_state=seed)
    return np.asarray(reducer.fit_transform(x), dtype=np.float32)


def reduce_to_2d(features: Any, seed: int = 0, method: str = "tsne") -> tuple[np.ndarray, str]:
    """``(points (N, 2), method used)``: ``method`` is ``"tsne"``, ``"umap"`` (ImportError when umap-learn is not
    installed) or ``"auto"`` (UMAP when importable, else t-SNE)."""
    if method not in ("tsne", "umap", "auto"):
        raise ValueError(f"reduce_to_2d: method must be 'tsne', 'umap' or 'auto', got {method!r}")
    if method in ("umap", "auto"):
        try:
            return umap_embedding(features, seed=seed), "umap"
        except ImportError:
            if method == "umap":
                raise ImportError("reduce_to_2d: method='umap' needs the umap-learn package (pip install umap-learn)")
    return tsne_embedding(features, seed=seed), "tsne"


@dataclass
class EmbeddingPanel:
    """One scatter panel: ``points`` (N, 2), ``labels`` (N,) colour groups (ints or strings), optional
    ``label_names`` (int label → name: a sequence indexed by the label or a mapping) and ``markers`` (N,) a second
    grouping shown by marker shape (e.g. the modality)."""

    title: str
    points: Any
    labels: Any
    label_names: Sequence[str] | Mapping[Any, str] | None = None
    markers: Any = None


def _label_text(value: Any, names: Sequence[str] | Mapping[Any, str] | None) -> str:
    if names is None:
        return str(value)
    if isinstance(names, Mapping):
        return str(names.get(value, value))
    if isinstance(value, (int, np.integer)) and 0 <= int(value) < len(names):
        return str(names[int(value)])
    return str(value)


def _sorted_groups(values: np.ndarray) -> list:
    groups = list(dict.fromkeys(values.tolist()))
    try:
        return sorted(groups)
    except TypeError:
        return groups


def save_figure(fig: Any, out_path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib ``Figure`` as a PNG atomically (parent folders created). Returns the path."""
    return atomic_write(out_path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))


def _draw_panel(ax: Any, panel: EmbeddingPanel) -> None:
    points = _as_numpy(panel.points, dtype=np.float64)
    labels = _as_numpy(panel.labels)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"panel {panel.title!r}: points must be (N, 2), got shape {points.shape}")
    if labels.shape[:1] != points.shape[:1]:
        raise ValueError(f"panel {panel.title!r}: {points.shape[0]} points but {labels.shape[0]} labels")
    markers = None if panel.markers is None else _as_numpy(panel.markers)
    if markers is not None and markers.shape[:1] != points.shape[:1]:
        raise ValueError(f"panel {panel.title!r}: {points.shape[0]} points but {markers.shape[0]} markers")
    from matplotlib import colormaps

    label_groups = _sorted_groups(labels)
    marker_groups = _sorted_groups(markers) if markers is not None else [None]
    cmap = colormaps["tab10" if len(label_groups) <= 10 else "tab20"]
    for li, label in enumerate(label_groups):
        for mi, marker in enumerate(marker_groups):
            mask = labels == label
            if markers is not None:
                mask = mask & (markers == marker)
            if not mask.any():
                continue
            text = _label_text(label, panel.label_names)
            if markers is not None and len(marker_groups) > 1:
                text = f"{text} / {marker}"
            ax.scatter(
                points[mask, 0], points[mask, 1], s=14, color=cmap(li % cmap.N), marker=_MARKERS[mi % len(_MARKERS)],
                label=text, alpha=0.85, linewidths=0,
            )
    ax.set_title(panel.title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="best", markerscale=1.2, frameon=False)


def plot_embedding_panels(
    panels: Sequence[EmbeddingPanel], *, out_path: str | Path, title: str | None = None, ncols: int | None = None
) -> Path:
    """Several scatter panels side by side (e.g. one per encoder plus the DVME embedding) in one PNG."""
    from matplotlib.figure import Figure

    panels = list(panels)
    if not panels:
        raise ValueError("plot_embedding_panels: no panels")
    ncols = min(len(panels), ncols or 4)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 4.0 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(panels):
            _draw_panel(ax, panels[i])
        else:
            ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_path)


def plot_embedding(
    points: Any,
    labels: Any,
    *,
    title: str,
    out_path: str | Path,
    label_names: Sequence[str] | Mapping[Any, str] | None = None,
    markers: Any = None,
) -> Path:
    """One scatter plot of 2D ``points`` (N, 2) coloured by ``labels`` (N,), marker shape by ``markers`` (N,)."""
    return plot_embedding_panels(
        [EmbeddingPanel(title, points, labels, label_names, markers)], out_path=out_path, ncols=1
    )


def plot_attention_map(
    matrix: Any,
    names: Sequence[str],
    out_path: str | Path,
    *,
    title: str = "encoder-to-encoder attention",
    fixed_scale: bool = False,
) -> Path:
    """Heat map of an (E, E) attention map: row i = the query encoder, column j = the key encoder; entry [i, j] the
    share of attention encoder i's tokens put on encoder j's (DVME's ``last_attention_map``). The colour scale spans
    the matrix's own range (so small differences show), and the colour bar's label states that range, so two maps are
    not compared by colour alone; ``fixed_scale=True``: the scale is 0-1 for every map. The values are printed in
    the cells."""
    from matplotlib.figure import Figure

    m = _as_numpy(matrix, dtype=np.float64)
    names = [str(n) for n in names]
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(names):
        raise ValueError(f"plot_attention_map: matrix must be ({len(names)}, {len(names)}) for {names}, got {m.shape}")
    size = 1.2 + 1.1 * len(names)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.subplots()
    low, high = (0.0, 1.0) if fixed_scale else (float(m.min()), float(m.max()))
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5  # a flat map: one colour, values still printed
    image = ax.imshow(m, cmap="viridis", vmin=low, vmax=high)
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), labels=names)
    ax.set_xlabel("attended encoder (keys)")
    ax.set_ylabel("attending encoder (queries)")
    threshold = (low + high) / 2  # viridis is dark below the middle: white text there
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", fontsize=8,
                    color="black" if m[i, j] > threshold else "white")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    scale = "fixed scale 0-1" if fixed_scale else f"this map's range {float(m.min()):.3f}-{float(m.max()):.3f}"
    bar.set_label(f"share of attention ({scale})", fontsize=8)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, out_path)
