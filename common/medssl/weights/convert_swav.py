"""Convert the published SwAV and DeepCluster-v2 ResNet checkpoints (facebookresearch/swav: ResNet-50, 50w2, 50w4,
50w5) into a medssl encoder file: ``medssl.networks.ResNetBackbone`` weights + the ``medssl-encoder/1`` manifest.

The reference trunk's keys are ours (``conv1``, ``bn1``, ``layer1.0.conv1``, ... ``layer4.2.bn3``: both follow
torchvision's ResNet), so the conversion is:

- ``module.`` prefixes (DistributedDataParallel) are removed; a ``state_dict`` entry (the training checkpoints) is
  read when present;
- the trunk goes to the encoder; the projection head (``projection_head.*``) and the prototypes (``prototypes.*``,
  DeepCluster-v2: ``prototypes.prototypes{i}.*``) are kept apart in ``<out>_head.pt`` (a plain state dict), never
  silently dropped;
- the width (1, 2, 4, 5) is read from ``conv1.weight`` (64 × width output channels);
- 2D kernels are transposed (``transpose_2d=True``, the default) because medssl's 2D images are column-first
  (MONAI's PNG / DICOM readers give (C, W, H)) while the reference was trained on (C, H, W) tensors: the converted
  encoder on a transposed image computes the reference's features on the image. ``transpose_2d=False`` for data
  loaded rows first.

The encoder expects RGB inputs normalised with the ImageNet mean and standard deviation (the manifest's
``preprocessing`` says so); grey medical images are repeated to three channels first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from medssl.networks.backbones import ResNetBackbone
from medssl.weights.convert_unimiss import load_published_checkpoint
from medssl.weights.export import _listing, _strip_wrappers, load_encoder_state_dict
from medssl.weights.published import IMAGENET_PREPROCESSING, write_converted_encoder

__all__ = ["convert_swav_checkpoint", "split_swav_state_dict", "SWAV_PREPROCESSING", "SOURCE_REPOSITORY"]

logger = logging.getLogger(__name__)

SOURCE_REPOSITORY = "https://github.com/facebookresearch/swav"
SWAV_PREPROCESSING = IMAGENET_PREPROCESSING  # the checkpoints' input convention (medssl.weights.published)
_HEAD_PREFIXES = ("projection_head.", "prototypes")


def split_swav_state_dict(checkpoint: Any, source: str = "checkpoint") -> tuple[dict, dict]:
    """(trunk, head) state dicts of a SwAV / DeepCluster-v2 checkpoint (``module.`` removed; ``state_dict`` entry
    read when present). A checkpoint without ResNet trunk keys is a one-line error."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{source}: not a state dict of tensors (a {type(checkpoint).__name__})")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        entries = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
        raise ValueError(
            f"{source}: no ResNet trunk: it holds entries {_listing(entries)} and no 'state_dict'; is it another "
            "family (tools/convert_weights.py unimiss for UniMiSS checkpoints)?"
        )
    trunk, head = {}, {}
    for key, value in state.items():
        key = _strip_wrappers(key, ("module.",))
        (head if key.startswith(_HEAD_PREFIXES) else trunk)[key] = value
    if "conv1.weight" not in trunk or not any(k.startswith("layer4.") for k in trunk):
        found = sorted({k.split(".")[0] for k in trunk})
        raise ValueError(
            f"{source}: no ResNet trunk (conv1.weight, layer1-4.*): its top-level names are {_listing(found)}; "
            "is it another family (tools/convert_weights.py unimiss for UniMiSS checkpoints)?"
        )
    return trunk, head


def convert_swav_checkpoint(
    checkpoint_path: str | Path,
    out_path: str | Path,
    transpose_2d: bool = True,
    trusted: bool = False,
) -> tuple[Path, Path, dict[str, Any]]:
    """Convert a SwAV / DeepCluster-v2 checkpoint (see the module docstring); returns (encoder file, manifest,
    report ``{"mapped": n, "width": w, "head_file": path or None, "head_keys": [...]}``)."""
    checkpoint_path, out_path = Path(checkpoint_path), Path(out_path)
    if out_path.suffix == ".json":
        raise ValueError(f"convert_swav: out_path {out_path} must be the weights file (e.g. encoder.pt)")
    source = str(checkpoint_path)
    trunk, head = split_swav_state_dict(load_published_checkpoint(checkpoint_path, trusted, "convert_swav"), source)
    stem = trunk["conv1.weight"]
    if stem.dim() != 4 or stem.shape[0] % 64:
        raise ValueError(
            f"{source}: conv1.weight has shape {tuple(stem.shape)}; a SwAV ResNet's is (64 × width, 3, 7, 7)"
        )
    width = stem.shape[0] // 64
    kwargs = {"spatial_dims": 2, "in_channels": int(stem.shape[1]), "width": width}
    with torch.device("meta"):
        expected = ResNetBackbone(**kwargs).state_dict()
    converted = {}
    for key, value in trunk.items():
        value = value.detach().to("cpu")
        if transpose_2d and value.dim() == 4:
            value = value.transpose(2, 3)
        converted[key] = value.contiguous().clone()
    missing = [k for k in expected if k not in converted]
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} ResNet-50{'w' + str(width) if width > 1 else ''} keys get no tensor: "
            f"{_listing(missing)}; is it a SwAV / DeepCluster-v2 ResNet-50 checkpoint?"
        )
    backbone = ResNetBackbone(**kwargs)
    load_encoder_state_dict(backbone, converted, f"{source} -> ResNetBackbone(**{kwargs})")
    method = f"SwAV / DeepCluster-v2 (published checkpoint, {SOURCE_REPOSITORY})"
    weights, manifest, head_file = write_converted_encoder(
        backbone, kwargs, out_path, checkpoint_path, method, head, transpose_2d, len(converted)
    )
    logger.info(f"convert_swav: {len(converted)} trunk tensors of {source} -> {weights} (width {width})")
    return weights, manifest, {"mapped": len(converted), "width": width, "head_file": head_file,
                               "head_keys": sorted(head)}
