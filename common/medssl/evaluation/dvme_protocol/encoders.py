"""The encoders of the DVME protocol (:mod:`medssl.evaluation.dvme_protocol`): the ``encoders`` entries of a
config (:class:`EncoderSpec`, checked by :func:`parse_encoder_specs`), the encoders they build (an exported file or
a randomly initialised ``backbone``, :func:`build_encoder`) and the embedding functions (:class:`EmbeddingFunction`,
:func:`mit_token_and_mean`)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medssl.utils.imports import locate
from medssl.weights.catalogue import is_catalogue_name
from medssl.weights.export import build_encoder_from_manifest, load_manifest
from medssl.weights.loading import resolve_pretrained_path


# ---------------------------------------------------------------------------------------------------------- encoders
@dataclass
class EncoderSpec:
    """One encoder of the meta-embedding: ``name`` (a key of the meta-embedding, no ``"."``), ``path`` (an exported
    encoder manifest ``.json`` or the weights ``.pt`` beside it, or a weights catalogue name such as
    ``swav_rn50_800ep``, fetched once by :func:`medssl.weights.catalogue.fetch_encoder`) or ``backbone`` (``{"_target_", "kwargs"}``, random
    initialisation), and ``embed_fn`` (dotted path of ``fn(encoder, images) -> (B, D)``; None = ``encoder(images)``)."""

    name: str
    path: str | None = None
    backbone: dict | None = None
    embed_fn: str | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in (("name", self.name), ("path", self.path), ("backbone", self.backbone),
                                  ("embed_fn", self.embed_fn)) if v is not None}


def parse_encoder_specs(
    encoders: Sequence[Mapping[str, Any] | EncoderSpec], where: str = "encoders"
) -> list[EncoderSpec]:
    """Check a config's ``encoders`` list; errors name the entry and the field."""
    if isinstance(encoders, (str, bytes)) or not isinstance(encoders, Sequence) or not encoders:
        raise ValueError(
            f"{where}: a non-empty list of {{name, path | backbone, embed_fn?}} is required, got {encoders!r}"
        )
    specs, names = [], set()
    for i, entry in enumerate(encoders):
        if isinstance(entry, EncoderSpec):
            entry = entry.as_dict()
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}[{i}]: must be an object {{name, path, embed_fn?}}, got {entry!r}")
        unknown = sorted(set(entry) - {"name", "path", "backbone", "embed_fn"})
        if unknown:
            raise ValueError(f"{where}[{i}]: unknown fields {unknown} (known: name, path, backbone, embed_fn)")
        name = entry.get("name")
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"{where}[{i}]: field 'name' must be a non-empty string without '.', got {name!r}")
        if name in names:
            raise ValueError(f"{where}[{i}]: encoder name {name!r} is used twice")
        names.add(name)
        path, backbone = entry.get("path"), entry.get("backbone")
        if (path is None) == (backbone is None):
            raise ValueError(f"{where}[{i}] ({name}): give exactly one of 'path' (exported encoder) or 'backbone'")
        if path is not None and not Path(str(path)).exists() and not is_catalogue_name(path):
            raise FileNotFoundError(
                f"{where}[{i}] ({name}): path {path}: no such encoder file (nor a weights catalogue name: "
                "tools/weights.py list)"
            )
        if backbone is not None and not (isinstance(backbone, Mapping) and isinstance(backbone.get("_target_"), str)):
            raise ValueError(f"{where}[{i}] ({name}): 'backbone' must be {{'_target_': 'pkg.Class', 'kwargs': {{}}}}")
        embed_fn = entry.get("embed_fn")
        if embed_fn is not None and not isinstance(embed_fn, str):
            raise ValueError(f"{where}[{i}] ({name}): 'embed_fn' must be a dotted path string, got {embed_fn!r}")
        specs.append(EncoderSpec(name, None if path is None else str(path), None if backbone is None else
                                 {"_target_": backbone["_target_"], "kwargs": dict(backbone.get("kwargs") or {})},
                                 embed_fn))
    return specs


def mit_token_and_mean(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """An ``embed_fn`` for :class:`medssl.networks.MiT`: the encoder's SSL token concatenated with the mean of its
    last-stage tokens, (B, 2·512) — a multi-part transformer embedding in the spirit of the paper's DINO feature
    (CLS tokens of the last blocks concatenated). ``images``: (B, C, H, W), or (B, C, X, Y, Z) depth last."""
    out = encoder.forward_features(images, decode=False)
    tokens = out["encoder_tokens"]  # (B, 1 + N, dim), SSL token first
    return torch.cat([out["encoder_token"], tokens[:, 1:].mean(dim=1)], dim=1)


class EmbeddingFunction(nn.Module):
    """``forward(images) = fn(encoder, images)``: an encoder with a chosen embedding function, as one module (so its
    state dict, and hence the embedding cache's fingerprint, is the encoder's, under ``encoder.``)."""

    def __init__(
        self,
        encoder: nn.Module,
        fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
        fn_name: str = "",
        channels: int | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.fn = fn
        self.fn_name = fn_name
        self.channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels and images.shape[1] == 1 and self.channels > 1:  # grey image, RGB-trained encoder
            images = images.expand(-1, self.channels, *images.shape[2:])
        return self.fn(self.encoder, images) if self.fn is not None else self.encoder(images)


def _expected_channels(encoder: nn.Module) -> int | None:
    """The 2D input channel count an encoder was built for (``in_channels``, or a MiT's ``in_channels_2d``)."""
    for name in ("in_channels", "in_channels_2d"):
        value = getattr(encoder, name, None)
        if isinstance(value, int):
            return value
    return None


def build_encoder(spec: EncoderSpec) -> nn.Module:
    """The encoder of ``spec`` (weights loaded strictly from the exported file, or randomly initialised from
    ``backbone``), wrapped in :class:`EmbeddingFunction` when ``embed_fn`` is set or when it takes more than one
    channel (grey images are then repeated). Returned in eval mode."""
    if spec.path is not None:
        encoder = build_encoder_from_manifest(load_manifest(resolve_pretrained_path(spec.path)))
    else:
        factory = locate(spec.backbone["_target_"], f"encoder {spec.name}: backbone")
        with torch.random.fork_rng(devices=[]):  # random init without touching the caller's global RNG
            torch.manual_seed(zlib.crc32(spec.name.encode()))
            encoder = factory(**spec.backbone.get("kwargs", {}))
    channels = _expected_channels(encoder)
    if spec.embed_fn:
        fn = locate(spec.embed_fn, f"encoder {spec.name}: embed_fn")
        encoder = EmbeddingFunction(encoder, fn, spec.embed_fn, channels=channels)
    elif channels and channels > 1:  # grey images are repeated to the encoder's channel count
        encoder = EmbeddingFunction(encoder, None, "", channels=channels)
    return encoder.eval()
