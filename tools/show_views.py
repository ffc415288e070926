"""Draw the augmented views a pretraining bundle makes of a few items, to see whether the class cue survives them.

Usage:
    python tools/show_views.py --bundle bundles/ssl_swav_multimodal_pretrain --dataset-dir DIR --out views.png \\
        [--config configs/demo.json ...] [--n-items 4] [--seed 0] [--datalist FILE] [--dims 2]

What it does:
1. parses the bundle's ``configs/train.json`` plus each ``--config`` (layered in that order, as ``monai.bundle run
   --config_file`` does; a path is taken as given, else relative to the bundle) with ``monai.bundle.ConfigParser``,
   with ``dataset_dir`` (and ``--datalist``) set and ``cache_rate`` 0 (nothing is cached for a few items);
2. reads the bundle's training items (``train#items``) and picks ``--n-items`` of them, one per (modality, dim,
   label) group in turn, so that several modalities and classes show (random within a group, ``--seed``);
3. builds the bundle's training dataset (``train#dataset``: its loading front, intensity preset and augmentations
   exactly as training runs them; the joint bundle's stage 1 cuts volumes into slices, the middle selected slice is
   shown) on those items only, and draws one sample of each with a seeded ``SampleKey``;
4. saves a PNG grid (matplotlib Agg): one row per item -- first the input as loaded (``loading_transforms``: reader,
   channels, modality preset), then every view / crop of the sample (``crops``) -- titled with the item's file
   (relative to the dataset directory), modality, dimensionality and label (class name from the datalist's
   ``classes``). 3D images and views show their middle slice along the last (depth) axis. Grey levels are drawn on
   the fixed range [0, 1] (values outside are clipped), so intensity augmentations show as such.

The joint bundle has one config per stage: ``--config configs/train_stage2.json`` (or stage 3) shows that stage's
volume views (stage 1 is ``train.json`` alone).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medssl.cli import DEBUG_FLAG, is_user_error, user_message


class ShowViewsError(ValueError):
    """A user-facing problem (bundle, config, data); its message is one line."""


def _config_files(bundle: Path, configs: Sequence[str]) -> list[Path]:
    files = []
    for entry in ["configs/train.json", *configs]:
        path = Path(entry)
        if not path.is_file() and (bundle / path).is_file():
            path = bundle / path
        if not path.is_file():
            raise ShowViewsError(f"--config {entry}: not found (as given, nor in {bundle})")
        if path not in files:
            files.append(path)
    return files


def _parser(bundle: Path, configs: Sequence[str], dataset_dir: str, datalist: str | None):
    from monai.bundle import ConfigParser

    if not (bundle / "configs" / "train.json").is_file():
        raise ShowViewsError(f"--bundle {bundle}: no configs/train.json (give a bundle folder, e.g. "
                             "bundles/ssl_swav_multimodal_pretrain)")
    parser = ConfigParser()
    meta = bundle / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(meta)
    parser.read_config([str(f) for f in _config_files(bundle, configs)])
    parser["bundle_root"] = str(bundle)
    parser["dataset_dir"] = str(dataset_dir)
    if datalist is not None:
        parser["datalist"] = str(datalist)
    if parser.get("cache_rate") is not None:
        parser["cache_rate"] = 0.0
    for key in ("train#items", "train#dataset"):
        if parser.get(key) is None:
            raise ShowViewsError(f"{bundle}: the config has no {key!r}; show_views needs a pretraining bundle's "
                                 "training pipeline")
    return parser


def _label_key(label: Any) -> tuple:
    """Sort key of a label: class labels (index / multi-label vector) first, then masks, then unlabelled."""
    if isinstance(label, (list, tuple)):
        return (0, repr(tuple(label)))
    if isinstance(label, str):
        return (1, "mask")
    if label is None:
        return (2, "")
    return (0, repr(int(label)))


def choose_items(items: Sequence[dict], n: int, seed: int = 0) -> list[int]:
    """Indices of ``n`` items: first the class-labelled ones (where a lost class cue shows), then the others; within
    each tier the (modality, dim) kinds take turns, each giving the next item of its next label group (random order
    within a group, ``seed``), so a few rows cover several modalities and classes."""
    rng = random.Random(seed)
    tiers: dict[int, dict[tuple, dict[tuple, list[int]]]] = {}
    for index, item in enumerate(items):
        key = _label_key(item.get("label"))
        kind = (str(item.get("modality", "")), int(item.get("dim", 0) or 0))
        tiers.setdefault(min(key[0], 1), {}).setdefault(kind, {}).setdefault(key, []).append(index)
    order: list[int] = []
    for tier in sorted(tiers):
        queues = []
        for kind in sorted(tiers[tier]):
            groups = [rng.sample(members, len(members)) for _, members in sorted(tiers[tier][kind].items())]
            queues.append([i for turn in itertools.zip_longest(*groups) for i in turn if i is not None])
        order += [i for turn in itertools.zip_longest(*queues) for i in turn if i is not None]
    return order[:n]


def _label_text(label: Any, classes: Sequence[str] | None) -> str:
    if label is None:
        return "unlabelled"
    if isinstance(label, str):
        return "segmentation mask"
    if isinstance(label, (list, tuple)):
        on = [i for i, v in enumerate(label) if v]
        names = [classes[i] if classes and i < len(classes) else str(i) for i in on]
        return "labels " + (", ".join(names) if names else "none")
    index = int(label)
    name = classes[index] if classes and 0 <= index < len(classes) else None
    return f"label {index}" + (f" {name}" if name else "")


def _display(image: Any) -> np.ndarray:
    """(C, X, Y[, Z]) channel-first medssl array -> (H, W) or (H, W, 3) for imshow: the middle depth slice of a
    volume; the column-index-first 2D layout transposed back; clipped to [0, 1]."""
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float32)
    if array.ndim == 4:
        array = array[..., array.shape[-1] // 2]
    if array.ndim != 3:
        raise ShowViewsError(f"a view of shape {array.shape}: expected (C, X, Y) or (C, X, Y, Z)")
    array = np.clip(array, 0.0, 1.0)
    if array.shape[0] == 1:
        return array[0].T
    return np.transpose(array[:3], (2, 1, 0))


def _shape_text(view: Any) -> str:
    spatial = tuple(int(s) for s in view.shape[1:])
    text = "×".join(map(str, spatial))
    return f"{text}, z={spatial[-1] // 2}" if len(spatial) == 3 else text


def _datalist_labels(datalist: str, dataset_dir: str) -> tuple[dict[str, Any], list[str] | None]:
    """{absolute image path: label} of the training section and the datalist's classes."""
    from medssl.data.datalist import load_datalist

    labels = {str(it["image"]): it.get("label") for it in load_datalist(datalist, "training", dataset_dir)}
    try:
        classes = json.loads(Path(datalist).read_text()).get("classes")
    except (OSError, ValueError, AttributeError):
        classes = None
    return labels, classes if isinstance(classes, list) else None


def show_views(
    bundle: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    out: str | os.PathLike,
    configs: Sequence[str] = (),
    n_items: int = 4,
    seed: int = 0,
    datalist: str | None = None,
    dims: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Make the grid (see the module docstring). Returns ``{"out", "rows": [{"image", "modality", "dim", "label",
    "views": [shape, ...]}]}``."""
    from matplotlib.figure import Figure
    from monai.transforms import Compose

    from medssl.data.pipeline import loading_transforms
    from medssl.data.samplers import SampleKey
    from medssl.evaluation.plots import save_figure

    if n_items < 1:
        raise ShowViewsError(f"--n-items {n_items}: must be >= 1")
    bundle = Path(bundle)
    parser = _parser(bundle, configs, str(dataset_dir), datalist)
    datalist_path = str(parser.get_parsed_content("datalist"))
    items = list(parser.get_parsed_content("train#items"))
    if dims:
        items = [it for it in items if int(it.get("dim", 0)) in {int(d) for d in dims}]
        if not items:
            raise ShowViewsError(f"{datalist_path}: no training item of dims {list(dims)} in this bundle's pipeline")
    labels, classes = _datalist_labels(datalist_path, str(dataset_dir))
    labelled = [{**it, "label": it.get("label", labels.get(str(it["image"])))} for it in items]
    chosen = [dict(items[i]) for i in choose_items(labelled, n_items, seed)]
    parser["train#items"] = chosen  # the dataset is built on the chosen items only
    dataset = parser.get_parsed_content("train#dataset")
    volume_ids = getattr(dataset, "volume_ids", None)
    slice_ids = getattr(dataset, "slice_ids", None)

    rows = []
    for r, item in enumerate(chosen):
        sample_index, slice_index = r, None
        if volume_ids is not None:  # several samples per item (slices of a volume): the middle one
            samples = np.flatnonzero(np.asarray(volume_ids) == r)
            if samples.size == 0:
                raise ShowViewsError(f"{item['image']}: the bundle's dataset made no sample of this item")
            sample_index = int(samples[samples.size // 2])
            slice_index = int(np.asarray(slice_ids)[sample_index]) if slice_ids is not None else None
        sample = dataset[SampleKey(sample_index, seed * 1000 + r)]
        views = sample.get("crops") if isinstance(sample, dict) else None
        if views is None:
            views = [sample["image"]] if isinstance(sample, dict) and "image" in sample else None
        if not views:
            raise ShowViewsError(f"{bundle}: train#dataset samples have no 'crops' (nor 'image') to draw")
        views = list(views) if isinstance(views, (list, tuple)) else [views[i] for i in range(len(views))]
        channels = int(views[0].shape[0])
        loaded = Compose(loading_transforms(channels=channels))({k: item[k] for k in ("image", "modality", "dim")
                                                                 if k in item})["image"]
        if slice_index is not None and slice_index >= 0 and loaded.ndim == 4:
            loaded = loaded[..., slice_index]
        label = item.get("label", labels.get(str(item["image"])))
        rows.append({"item": item, "input": loaded, "views": views, "label": label, "slice": slice_index})

    n_cols = 1 + max(len(row["views"]) for row in rows)
    fig = Figure(figsize=(1.9 * n_cols, 2.7 * len(rows)))
    for r, row in enumerate(rows):
        item = row["item"]
        try:
            name = Path(item["image"]).resolve().relative_to(Path(dataset_dir).resolve()).as_posix()
        except ValueError:
            name = Path(item["image"]).name
        where = f" slice {row['slice']}" if row["slice"] is not None and row["slice"] >= 0 else ""
        title = (f"{name}{where}\n{item.get('modality', '?')} {item.get('dim', '?')}D · "
                 f"{_label_text(row['label'], classes)}\ninput {_shape_text(row['input'])}")
        panels = [("input", row["input"])] + [(f"view {k + 1}", v) for k, v in enumerate(row["views"])]
        for c in range(n_cols):
            ax = fig.add_subplot(len(rows), n_cols, r * n_cols + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels):
                ax.axis("off")
                continue
            what, image = panels[c]
            shown = _display(image)
            ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(title if c == 0 else f"{what}\n{_shape_text(image)}", fontsize=7, loc="left" if c == 0
                         else "center")
    fig.suptitle(f"{bundle.name}: input and augmented views (seed {seed})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out)
    return {
        "out": str(out),
        "rows": [
            {"image": str(row["item"]["image"]), "modality": row["item"].get("modality"), "dim": row["item"].get("dim"),
             "label": row["label"], "views": [tuple(int(s) for s in v.shape) for v in row["views"]]}
            for row in rows
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    # argparse, not fire: --config repeats (fire keeps only the last of repeated flags)
    parser = argparse.ArgumentParser(prog="show_views.py", description="Grid of a pretraining bundle's augmented "
                                     "views of a few items (rows = items, columns = input + views).")
    parser.add_argument("--bundle", required=True, help="the bundle folder, e.g. bundles/ssl_swav_multimodal_pretrain")
    parser.add_argument("--dataset-dir", required=True, help="the data folder (its datalist.json unless --datalist)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--config", action="append", default=[], help="extra config layered on configs/train.json "
                        "(repeat; e.g. configs/demo.json, configs/train_stage3.json)")
    parser.add_argument("--n-items", type=int, default=4, help="number of items (rows)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the item choice and of the augmentations")
    parser.add_argument("--datalist", default=None, help="datalist file (default: the bundle's, DIR/datalist.json)")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="keep items of these dims (2 and / or 3)")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    args = parser.parse_args([a for a in argv if a != DEBUG_FLAG])
    try:
        result = show_views(args.bundle, args.dataset_dir, args.out, args.config, args.n_items, args.seed,
                            args.datalist, args.dims)
    except Exception as e:  # noqa: BLE001 - a user mistake is one line (medssl.cli's rule); a bug keeps its traceback
        if debug or not is_user_error(e):
            raise
        print(f"error: {user_message(e)} ({DEBUG_FLAG} shows the traceback)", file=sys.stderr)
        return 2
    for row in result["rows"]:
        print(f"{row['image']}: {row['modality']} {row['dim']}D, views {row['views']}")
    print(f"wrote {result['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
