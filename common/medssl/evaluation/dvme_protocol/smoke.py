"""Randomly initialised encoders written as exported-encoder files, for where no pretrained encoder is at hand: the
bundle's smoke config (``smoke.json``: :func:`smoke_encoders`), the inference network built before any training
(:func:`medssl.evaluation.dvme_protocol.encoders_from_checkpoint`'s default) and the tests. Not part of the
protocol itself."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medssl.utils.imports import locate
from medssl.utils.io import file_sha256
from medssl.weights.export import MANIFEST_FORMAT, load_manifest, write_encoder_files

from .encoders import parse_encoder_specs


def write_random_encoders(
    out_dir: str | Path,
    backbones: Mapping[str, Mapping[str, Any]],
    seed: int = 0,
    embed_fns: Mapping[str, str] | None = None,
    preprocessing: Mapping | None = None,
) -> list[dict]:
    """Write randomly initialised encoders as exported-encoder files (``<out_dir>/<name>.pt`` + ``.json``, through
    :func:`medssl.weights.write_encoder_files`), for smoke runs and tests where no pretrained encoder is at hand.

    Args:
        backbones: name → ``{"_target_": "medssl.networks.ResNetBackbone", "kwargs": {...}}``.
        seed: the weights are a pure function of (seed, name), so re-writing gives byte-identical files (and the
            embedding cache stays valid).
        embed_fns: name → ``embed_fn`` dotted path, copied into the returned specs.

    Returns the ``encoders`` list for :class:`DVMEProtocol`: ``[{"name", "path", "embed_fn"?}]``.
    """
    out_dir = Path(out_dir)
    specs = []
    for name, backbone in backbones.items():
        spec = parse_encoder_specs([{"name": name, "backbone": dict(backbone)}], "write_random_encoders")[0]
        path = out_dir / f"{name}.pt"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            module = locate(spec.backbone["_target_"], f"write_random_encoders: {name}")(**spec.backbone["kwargs"])
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        record = {
            "format": MANIFEST_FORMAT, "weights": path.name, "method": "random initialisation (no pretraining)",
            "backbone": spec.backbone, "spatial_dims": getattr(module, "spatial_dims", None),
            "in_channels": getattr(module, "in_channels", getattr(module, "in_channels_2d", None)),
            "feature_dim": getattr(module, "feature_dim", None), "preprocessing": dict(preprocessing or {}),
            "seed": seed,
        }
        manifest = path.with_suffix(".json")
        current = None
        if path.is_file() and manifest.is_file():
            try:
                current = load_manifest(manifest)
            except (OSError, ValueError):
                current = None
        # an identical earlier write is kept as is (a second run sees unchanged files)
        if not (current and current.get("backbone") == spec.backbone and current.get("seed") == seed
                and current.get("encoder_sha256") == file_sha256(path)):
            write_encoder_files(state, path, record, manifest)
        entry = {"name": name, "path": str(manifest)}
        if embed_fns and name in embed_fns:
            entry["embed_fn"] = embed_fns[name]
        specs.append(entry)
    return specs


#: tiny 2D architectures (randomly initialised) for smoke runs, tests and the inference fallback: a bottleneck ResNet
#: (256-d), a basic-block ResNet (64-d) and a small MiT (SSL token + mean token, 128-d, inputs of at least 64×64)
SMOKE_BACKBONES: dict[str, dict[str, Any]] = {
    "resnet_bottleneck": {"_target_": "medssl.networks.ResNetBackbone", "kwargs": {
        "spatial_dims": 2, "in_channels": 1, "layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 32, 64]}},
    "resnet_basic": {"_target_": "medssl.networks.ResNetBackbone", "kwargs": {
        "spatial_dims": 2, "in_channels": 1, "layers": [1, 1, 1, 1], "block": "basic",
        "block_inplanes": [8, 16, 32, 64]}},
    "mit": {"_target_": "medssl.networks.MiT", "kwargs": {
        "spatial_dims": 2, "decoder": False, "in_channels_2d": 1, "img_size_2d": 64, "dims": [8, 16, 32, 64],
        "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "stem_channels": 8}},
}
SMOKE_EMBED_FNS = {"mit": "medssl.evaluation.dvme_protocol.mit_token_and_mean"}


def smoke_encoders(out_dir: str | Path, seed: int = 0) -> list[dict]:
    """Write the three :data:`SMOKE_BACKBONES` as randomly initialised exported encoders in ``out_dir`` and return
    their ``encoders`` list (the bundle's ``smoke.json``)."""
    return write_random_encoders(out_dir, SMOKE_BACKBONES, seed=seed, embed_fns=SMOKE_EMBED_FNS,
                                 preprocessing={"note": "random weights, smoke runs only"})
