"""Plot the embeddings of a datalist by an exported encoder: t-SNE (UMAP when umap-learn is installed) in two panels,
coloured by class label and by modality.

Usage:
    python tools/plot_embeddings.py --encoder encoder.json --datalist datalist.json --out fig.png \\
        [--dataset-dir DIR] [--section training] [--max-items 500] [--image-size 224] [--cache-dir DIR] \\
        [--method auto|tsne|umap] [--seed 0] [--batch-size 8] [--embed-fn pkg.module.fn]

ENCODER is an encoder exported by tools/export_encoder.py / tools/convert_weights.py: its manifest (.json) or the
weights file (.pt) with the manifest beside it. The items of SECTION whose spatial dimension matches the encoder's
(``spatial_dims`` of the manifest) are read with medssl's loading transforms (modality intensity presets, the
manifest's ``in_channels``) and resized to IMAGE_SIZE (default: the manifest's ``preprocessing.input_size`` when it
is a number, else 224; volumes to IMAGE_SIZE × IMAGE_SIZE × IMAGE_SIZE/4). Embeddings go through
``medssl.evaluation.cache.cached_embeddings`` (cached in CACHE_DIR when given). Items without a class label are shown
as "unlabelled".
"""

from __future__ import annotations

import time
from pathlib import Path

from medssl.cli import run


def plot_embeddings(
    encoder: str,
    datalist: str,
    out: str,
    dataset_dir: str | None = None,
    section: str = "training",
    max_items: int | None = None,
    image_size: int | None = None,
    cache_dir: str | None = None,
    method: str = "auto",
    seed: int = 0,
    batch_size: int = 8,
    embed_fn: str | None = None,
) -> str:
    """Embed SECTION of DATALIST with ENCODER and write a two-panel PNG to OUT; returns OUT."""
    import json

    import monai
    import numpy as np

    from medssl.data.pipeline import load_items, loading_transforms
    from medssl.evaluation.cache import cached_embeddings, encoder_fingerprint
    from medssl.evaluation.dvme_protocol import build_encoder, parse_encoder_specs
    from medssl.evaluation.plots import EmbeddingPanel, plot_embedding_panels, reduce_to_2d
    from medssl.weights.export import load_manifest

    start = time.time()
    path = Path(encoder)
    if not path.exists():
        raise FileNotFoundError(f"--encoder {encoder}: no such file")
    manifest = load_manifest(path)  # errors name the file and the field
    dims = int(manifest.get("spatial_dims") or 2)
    channels = int(manifest.get("in_channels") or 1)
    preprocessing = manifest.get("preprocessing") or {}
    if image_size is None:
        size = preprocessing.get("input_size") if isinstance(preprocessing, dict) else None
        image_size = int(size) if isinstance(size, (int, float)) and not isinstance(size, bool) else 224
    spatial = [image_size, image_size] if dims == 2 else [image_size, image_size, max(1, image_size // 4)]

    items = load_items(datalist, section, dataset_dir, dims=[dims], keys=["image", "modality", "dim", "label"],
                       max_items=max_items)
    if not items:
        raise ValueError(f"--datalist {datalist}: section {section!r} has no {dims}D items for this {dims}D encoder")
    try:
        classes = json.loads(Path(datalist).read_text()).get("classes") or []
    except (OSError, ValueError):
        classes = []
    for it in items:  # class index or -1; masks / multi-label vectors are not colours
        label = it.get("label")
        it["label"] = label if isinstance(label, int) and not isinstance(label, bool) else -1
    print(f"[plot_embeddings] {len(items)} {dims}D items of {section!r}; encoder {manifest['_manifest_path']}; "
          f"input {channels}x{'x'.join(map(str, spatial))}", flush=True)

    spec = parse_encoder_specs([{"name": path.stem, "path": str(path), **({"embed_fn": embed_fn} if embed_fn else {})}],
                               "--encoder")[0]
    module = build_encoder(spec)
    # plain tensors (track_meta=False): the readers' metadata of grey and RGB files differs in shape, and collating it
    # failed on mixed-channel datalists ("stack expects each tensor to be equal size", [2] vs [3]); the channel count
    # of the images themselves is made uniform by loading_transforms
    transform = monai.transforms.Compose(
        loading_transforms(channels=channels)
        + [monai.transforms.Resized(keys="image", spatial_size=spatial),
           monai.transforms.EnsureTyped(keys="image", track_meta=False)]
    )
    record = {"manifest_preprocessing": preprocessing, "channels": channels, "spatial_size": spatial,
              "embed_fn": embed_fn, "tool": "plot_embeddings"}
    emb = cached_embeddings(module, items, transform, cache_dir=cache_dir, encoder_id=path.stem,
                            preprocessing=record, batch_size=batch_size,
                            fingerprint=encoder_fingerprint(manifest_path=manifest["_manifest_path"]))
    print(f"[plot_embeddings] embeddings {tuple(emb.features.shape)} "
          f"{'read from cache' if emb.from_cache else 'computed'} ({time.time() - start:.1f} s)", flush=True)

    points, used = reduce_to_2d(emb.features, seed=seed, method=method)
    labels = np.array([it["label"] for it in items])
    names = {i: str(c) for i, c in enumerate(classes)}
    names[-1] = "unlabelled"
    modalities = np.array([str(it.get("modality", "?")) for it in items])
    title = f"{path.stem}: {used.upper()} of {len(items)} {section} items"
    written = plot_embedding_panels(
        [EmbeddingPanel("by label", points, labels, names), EmbeddingPanel("by modality", points, modalities)],
        out_path=out, title=title)
    print(f"[plot_embeddings] wrote {written} ({time.time() - start:.1f} s)", flush=True)
    return str(written)


def main() -> None:
    run(plot_embeddings)


if __name__ == "__main__":
    main()
