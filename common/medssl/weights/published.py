"""What the converters of published checkpoints share (``convert_swav``, ``convert_dino``): the ImageNet input
convention of those checkpoints and the writer of a converted encoder (state dict + ``medssl-encoder/1`` manifest,
the source's head kept apart in ``<out>_head.pt``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import medssl
from medssl.utils.io import file_sha256
from medssl.weights.export import MANIFEST_FORMAT, write_encoder_files

__all__ = ["IMAGENET_PREPROCESSING", "ROWS_FIRST_LAYOUT", "write_converted_encoder"]

IMAGENET_PREPROCESSING = {
    "channels": "RGB (a grey image repeated to 3 channels)",
    "intensity": "scaled to [0, 1], then normalised per channel with the ImageNet mean (0.485, 0.456, 0.406) and "
    "std (0.229, 0.224, 0.225)",
    "input_size": 224,
    "layout_2d": "column-first (C, W, H), medssl's 2D layout (transpose_2d=True)",
}
ROWS_FIRST_LAYOUT = "rows first (C, H, W), as the reference (transpose_2d=False)"


def write_converted_encoder(
    backbone: nn.Module,
    kwargs: dict[str, Any],
    out_path: Path,
    checkpoint_path: Path,
    method: str,
    head: dict[str, torch.Tensor],
    transpose_2d: bool,
    num_tensors: int,
    input_size: int = 224,
) -> tuple[Path, Path, Path | None]:
    """Write ``backbone`` (already loaded with the converted tensors) to ``out_path`` with its manifest, and the
    source's head / prototypes to ``<out>_head.pt`` (never silently dropped); returns (weights, manifest, head file
    or None)."""
    head_file = None
    if head:
        head_file = out_path.with_name(f"{out_path.stem}_head.pt")
        torch.save({k: v.detach().to("cpu").clone() for k, v in head.items()}, head_file)
    layout = IMAGENET_PREPROCESSING["layout_2d"] if transpose_2d else ROWS_FIRST_LAYOUT
    record = {
        "format": MANIFEST_FORMAT,
        "weights": out_path.name,
        "method": method,
        "backbone": {"_target_": f"medssl.networks.{type(backbone).__name__}", "kwargs": kwargs},
        "spatial_dims": 2,
        "in_channels": kwargs["in_channels"],
        "feature_dim": backbone.feature_dim,
        "preprocessing": dict(IMAGENET_PREPROCESSING, input_size=input_size, layout_2d=layout),
        "encoder_key": "",
        "source_checkpoint": checkpoint_path.name,
        "source_sha256": file_sha256(checkpoint_path),
        "medssl_version": medssl.__version__,
        "num_tensors": num_tensors,
        "num_params": sum(p.numel() for p in backbone.parameters()),
        "head_file": head_file.name if head_file else None,
        "head_keys": sorted(head),
    }
    weights, manifest = write_encoder_files(backbone.state_dict(), out_path, record)
    return weights, manifest, head_file
