"""Is the learnability set learnable at all? kNN accuracy of raw pixels and of randomly initialised encoders.

The learnability set (:mod:`medssl.data.learnability`, demo data v3) is meant to be not trivially separable: a
randomly initialised encoder of the pretraining bundles' demo runs, or the raw pixels, should stay near chance (1/3
within a modality), so that a gain after pretraining is the pretraining's. :func:`random_init_knn` measures it (cosine
kNN, :func:`medssl.evaluation.knn.knn_accuracy`); ``python tools/demo_data.py --out DIR --check`` or
``python -m medssl.evaluation.random_init DIR`` prints the table of ``DEMO_DATA.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose

import medssl.networks as networks
from medssl.data.learnability import LABEL_OFFSETS, LEARN_CLASSES, LEARN_DIMS
from medssl.data.pipeline import load_items, loading_transforms
from medssl.evaluation.knn import knn_accuracy
from medssl.networks.hybrid_volume import HybridVolumeBackbone

__all__ = ["RANDOM_INIT_ENCODERS", "random_init_knn"]

_MIT_DEMO = {  # ssl_unimiss_pretrain configs/smoke.json (+ demo.json): a narrow MiT-tiny on 64^2 / 64 x 64 x 16
    "decoder": True,
    "spatial_dims": [2, 3],
    "img_size_2d": 64,
    "img_size_3d": [64, 64, 16],
    "dims": [8, 16, 32, 64],
    "decoder_dims": [32, 16, 8],
}
_RESNET_DEMO = {"in_channels": 1, "layers": [1, 1, 1, 1], "block_inplanes": [16, 32, 64, 128]}
#: The encoders whose random initialisation :func:`random_init_knn` measures, as the pretraining bundles' demo runs
#: build them: name -> (dims, input size, input channels (grey repeated), constructor, keyword arguments).
RANDOM_INIT_ENCODERS: dict[str, tuple[int, tuple[int, ...], int, str, dict[str, Any]]] = {
    # SwAV / DeepCluster-v2 quick start (ssl_swav_multimodal_pretrain configs/demo.json): 64-px crops
    "resnet_small_2d": (2, (64, 64), 1, "ResNetBackbone", {"spatial_dims": 2, **_RESNET_DEMO}),
    # joint image-volume stage 1 (ssl_joint_image_volume_pretrain configs/demo.json): the trunk's 5 pooled levels
    "resnet_trunk_5levels_2d": (
        2, (48, 48), 1, "ResNetBackbone",
        {"spatial_dims": 2, **_RESNET_DEMO, "return_levels": 5, "normalize_levels": True},
    ),
    # UniMiSS (ssl_unimiss_pretrain): its 2D path takes grey repeated to 3 channels, its 3D path 1 channel
    "mit_tiny_narrow_2d": (2, (64, 64), 3, "mit_tiny", _MIT_DEMO),
    "mit_tiny_narrow_3d": (3, (64, 64, 16), 1, "mit_tiny", _MIT_DEMO),
    # a 3D ResNet of the quick start's widths
    "resnet_small_3d": (3, (64, 64, 64), 1, "ResNetBackbone", {"spatial_dims": 3, **_RESNET_DEMO}),
    # SwAV 3D (ssl_swav_multimodal_pretrain configs/train.json backbone_3d): Ghesu et al.'s dense network
    "densenet3d": (
        3, (64, 64, 64), 1, "DenseNet3D",
        {"in_channels": 1, "block_units": [1, 2, 3, 3, 3], "init_features": 16, "growth_rate": 7,
         "inplane_only_blocks": 2, "out_dim": 1024},
    ),  # fmt: skip
    # joint image-volume stage 3 (configs/demo.json): slice trunk + 2 deformable slice-attention layers, 48 x 48 x 16
    "hybrid_volume_3d": (
        3, (48, 48, 16), 1, "HybridVolumeBackbone",
        {"num_slices": 16, "embed_dim": 64, "feature_levels": 5, **_RESNET_DEMO, "chunk_size": 64, "num_layers": 2,
         "num_heads": 4, "head_dim": 16, "offset_groups": 2, "ffn_dim": 128},
    ),  # fmt: skip
}
_RAW_SIZE = {2: (64, 64), 3: (32, 32, 32)}


def _build_encoder(name: str):
    _, _, _, constructor, kwargs = RANDOM_INIT_ENCODERS[name]
    factory = HybridVolumeBackbone if constructor == "HybridVolumeBackbone" else getattr(networks, constructor)
    return factory(**kwargs)


def _load_tensors(datalist: Path, section: str, modality: str):
    """(images (N, 1, *spatial) float32 as the bundles load them -- grey, modality intensity preset --, labels (N,))."""
    items = load_items(datalist, section, modalities=[modality], keys=["image", "modality", "dim", "label"],
                       labelled_only="class")
    load = Compose(loading_transforms(keys=["image"], channels=1))
    images = torch.stack([torch.as_tensor(load(dict(item))["image"]).float() for item in items])
    labels = torch.tensor([int(item["label"]) - LABEL_OFFSETS[modality] for item in items])
    return images, labels


def random_init_knn(
    datalist: str | os.PathLike,
    modalities: Sequence[str] | None = None,
    encoders: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    k: int = 10,
    train_section: str = "training",
    eval_section: str = "validation",
    batch_size: int = 32,
) -> dict[str, dict[str, dict[str, Any]]]:
    """kNN accuracy (cosine, weighted vote, ``k`` neighbours; :func:`medssl.evaluation.knn.knn_accuracy`) of raw pixels
    and of randomly initialised encoders (:data:`RANDOM_INIT_ENCODERS`, ``len(seeds)`` initialisations each), from
    ``train_section`` to ``eval_section``, within each modality (chance 1/3).

    Images are loaded as the bundles load them (``loading_transforms(channels=1)``: grey, CT window, MR / XR
    percentiles, RGB / 255) and area-resized to each encoder's input size; raw pixels at 64^2 / 32^3. Encoders run
    in eval mode (random BatchNorm statistics are the identity).

    Returns:
        ``{modality: {"raw_pixels" | encoder: {"accuracy": mean over seeds, "per_seed": [...], "input": size}}}``.
    """
    datalist = Path(datalist)
    modalities = list(modalities) if modalities else [m for m in LEARN_CLASSES]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for modality in modalities:
        dim = LEARN_DIMS[modality]
        train_x, train_y = _load_tensors(datalist, train_section, modality)
        eval_x, eval_y = _load_tensors(datalist, eval_section, modality)

        def resized(x, size):
            return x if tuple(x.shape[2:]) == tuple(size) else F.interpolate(x, size=size, mode="area")

        raw = {}
        size = _RAW_SIZE[dim]
        raw["accuracy"] = knn_accuracy(resized(train_x, size).flatten(1), train_y, resized(eval_x, size).flatten(1),
                                       eval_y, k=k, num_classes=3)
        raw.update(per_seed=[raw["accuracy"]], input="x".join(map(str, size)))
        results[modality] = {"raw_pixels": raw}
        for name, (encoder_dim, size, channels, _, _) in RANDOM_INIT_ENCODERS.items():
            if encoder_dim != dim or (encoders is not None and name not in encoders):
                continue
            accuracies = []
            for seed in seeds:
                torch.manual_seed(int(seed))
                encoder = _build_encoder(name).eval()
                with torch.no_grad():
                    features = [
                        torch.cat([encoder(resized(x[i : i + batch_size], size).repeat_interleave(channels, 1))
                                   for i in range(0, len(x), batch_size)]).flatten(1)
                        for x in (train_x, eval_x)
                    ]
                accuracies.append(knn_accuracy(features[0], train_y, features[1], eval_y, k=k, num_classes=3))
            results[modality][name] = {
                "accuracy": float(np.mean(accuracies)),
                "per_seed": [round(a, 4) for a in accuracies],
                "input": "x".join(map(str, size)),
            }
    return results


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m medssl.evaluation.random_init",
        description="Random-init and raw-pixel kNN accuracy on the learnability set of a demo dataset directory.",
    )
    parser.add_argument("dataset_dir", help="directory built by tools/demo_data.py (holds datalist_learn.json)")
    parser.add_argument("--modalities", nargs="*", default=None, help=f"subset of {list(LEARN_CLASSES)}")
    parser.add_argument("--encoders", nargs="*", default=None, help=f"subset of {list(RANDOM_INIT_ENCODERS)}")
    parser.add_argument("--seeds", type=int, default=3, help="random initialisations per encoder (3)")
    parser.add_argument("--k", type=int, default=10, help="neighbours (10)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    datalist = Path(args.dataset_dir) / "datalist_learn.json"
    if not datalist.is_file():
        raise SystemExit(f"error: {datalist}: not found; build it: python tools/demo_data.py --out {args.dataset_dir}")
    start = time.perf_counter()
    results = random_init_knn(datalist, args.modalities, args.encoders, seeds=range(args.seeds), k=args.k)
    print(f"kNN accuracy (k={args.k}, cosine; training -> validation; chance 0.333; random-init: mean of {args.seeds} "
          f"initialisations) in {time.perf_counter() - start:.0f} s")
    print("| modality | encoder | input | accuracy | per initialisation |")
    print("|---|---|---|---|---|")
    for modality, rows in results.items():
        for name, row in rows.items():
            per_seed = ", ".join(f"{a:.3f}" for a in row["per_seed"])
            print(f"| {modality} | {name} | {row['input']} | {row['accuracy']:.3f} | {per_seed} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    _main()
