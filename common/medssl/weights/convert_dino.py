"""Convert the published DINO vision transformers (facebookresearch/dino: ViT-S/16, ViT-S/8, ViT-B/16, ViT-B/8) into a
medssl encoder file: ``medssl.networks.ViTBackbone`` weights + the ``medssl-encoder/1`` manifest, so that DVME and
the downstream bundles can use published DINO encoders.

The reference's backbone keys are ours (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.*``,
``norm``), so the conversion is:

- the hub files (``dino_deitsmall16_pretrain.pth``, ...) are plain backbone state dicts; a training checkpoint
  (``checkpoint.pth`` of ``main_dino.py``) holds ``teacher`` / ``student`` entries whose keys start with ``module.``
  and ``backbone.``: the ``entry`` chosen (teacher by default, the network DINO evaluates) is read, the prefixes
  removed, and the projection head (``head.*``) kept apart in ``<out>_head.pt``, never silently dropped;
- the architecture is read from the tensors: width from ``cls_token``, patch size from ``patch_embed.proj.weight``,
  depth from the block count, heads = width / 64 (every DINO ViT), the stored input size from ``pos_embed``;
- 2D kernels and the position grid are transposed (``transpose_2d=True``, the default) because medssl's 2D images are
  column-first (MONAI's PNG / DICOM readers give (C, W, H)) while DINO was trained on (C, H, W) tensors: the
  converted encoder on a transposed image computes the reference's class-token feature on the image.
  ``transpose_2d=False`` for data loaded rows first.

The encoder expects RGB inputs normalised with the ImageNet mean and standard deviation (the manifest's
``preprocessing`` says so); grey medical images are repeated to three channels first.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from medssl.networks.vit import ViTBackbone
from medssl.weights.convert_unimiss import load_published_checkpoint
from medssl.weights.export import _listing, _strip_wrappers, load_encoder_state_dict
from medssl.weights.published import write_converted_encoder

__all__ = ["convert_dino_checkpoint", "split_dino_state_dict", "dino_backbone_kwargs", "SOURCE_REPOSITORY"]

logger = logging.getLogger(__name__)

SOURCE_REPOSITORY = "https://github.com/facebookresearch/dino"
DINO_HEAD_WIDTH = 64  # every published DINO ViT uses 64-d attention heads (ViT-S: 6 heads, ViT-B: 12)
_PREFIXES = ("module.", "backbone.")


def split_dino_state_dict(checkpoint: Any, entry: str = "teacher", source: str = "checkpoint") -> tuple[dict, dict]:
    """(backbone, head) state dicts of a DINO checkpoint: a hub backbone file as is, or a training checkpoint's
    ``entry`` (``module.`` / ``backbone.`` removed, ``head.*`` apart). Another family is a one-line error."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{source}: not a state dict of tensors (a {type(checkpoint).__name__})")
    state = checkpoint
    if not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        if entry not in ("teacher", "student"):
            raise ValueError(f"convert_dino: entry must be 'teacher' or 'student', got {entry!r}")
        if not isinstance(checkpoint.get(entry), dict):
            entries = sorted(str(k) for k in checkpoint)
            raise ValueError(
                f"{source}: no ViT backbone: it holds entries {_listing(entries)} and no {entry!r}; is it another "
                "family (tools/convert_weights.py swav / unimiss)?"
            )
        state = checkpoint[entry]
    backbone, head = {}, {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = _strip_wrappers(key, _PREFIXES)
        (head if key.startswith("head.") else backbone)[key] = value
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    if any(k not in backbone for k in needed) or not any(k.startswith("blocks.") for k in backbone):
        found = sorted({k.split(".")[0] for k in backbone})
        raise ValueError(
            f"{source}: no DINO ViT backbone (cls_token, pos_embed, patch_embed.proj, blocks.*): its top-level names "
            f"are {_listing(found)}; is it another family (tools/convert_weights.py swav / unimiss)?"
        )
    return backbone, head


def dino_backbone_kwargs(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, Any]:
    """``ViTBackbone`` keyword arguments read from a DINO backbone state dict (reference layout)."""
    dim = int(state["cls_token"].shape[-1])
    kernel = state["patch_embed.proj.weight"]
    if kernel.dim() != 4 or kernel.shape[0] != dim or kernel.shape[2] != kernel.shape[3]:
        raise ValueError(f"{source}: patch_embed.proj.weight has shape {tuple(kernel.shape)}; a DINO ViT's is "
                         f"({dim}, 3, p, p)")
    patch = int(kernel.shape[-1])
    tokens = int(state["pos_embed"].shape[1]) - 1
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{source}: pos_embed has {tokens} patch entries, not a square grid")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    if dim % DINO_HEAD_WIDTH:
        raise ValueError(f"{source}: width {dim} is not a multiple of DINO's 64-d heads")
    hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0]) if "blocks.0.mlp.fc1.weight" in state else 4 * dim
    return {"spatial_dims": 2, "in_channels": int(kernel.shape[1]), "img_size": side * patch, "patch_size": patch,
            "embed_dim": dim, "depth": depth, "num_heads": dim // DINO_HEAD_WIDTH, "mlp_ratio": hidden / dim,
            "qkv_bias": "blocks.0.attn.qkv.bias" in state}


def _transposed(key: str, value: torch.Tensor, grid: int) -> torch.Tensor:
    """Reference (rows-first) tensor -> medssl's column-first 2D layout."""
    if key == "patch_embed.proj.weight":
        return value.transpose(2, 3)
    if key == "pos_embed":
        dim = value.shape[-1]
        patch = value[:, 1:].reshape(1, grid, grid, dim).transpose(1, 2).reshape(1, grid * grid, dim)
        return torch.cat((value[:, :1], patch), dim=1)
    return value


def convert_dino_checkpoint(
    checkpoint_path: str | Path,
    out_path: str | Path,
    transpose_2d: bool = True,
    trusted: bool = False,
    entry: str = "teacher",
) -> tuple[Path, Path, dict[str, Any]]:
    """Convert a DINO ViT checkpoint (see the module docstring); returns (encoder file, manifest, report
    ``{"mapped": n, "arch": "ViT-S/16", "kwargs": {...}, "head_file": path or None, "head_keys": [...]}``)."""
    checkpoint_path, out_path = Path(checkpoint_path), Path(out_path)
    if out_path.suffix == ".json":
        raise ValueError(f"convert_dino: out_path {out_path} must be the weights file (e.g. encoder.pt)")
    source = str(checkpoint_path)
    backbone_state, head = split_dino_state_dict(
        load_published_checkpoint(checkpoint_path, trusted, "convert_dino"), entry, source
    )
    kwargs = dino_backbone_kwargs(backbone_state, source)
    grid = kwargs["img_size"] // kwargs["patch_size"]
    with torch.device("meta"):
        expected = ViTBackbone(**kwargs).state_dict()
    converted = {}
    for key, value in backbone_state.items():
        value = value.detach().to("cpu")
        converted[key] = (_transposed(key, value, grid) if transpose_2d else value).contiguous().clone()
    missing = [k for k in expected if k not in converted]
    size = {384: "S", 768: "B"}.get(kwargs["embed_dim"], str(kwargs["embed_dim"]))
    arch = f"ViT-{size}/{kwargs['patch_size']}"
    if missing:
        raise ValueError(f"{source}: {len(missing)} {arch} keys get no tensor: {_listing(missing)}; is it a DINO ViT "
                         "backbone checkpoint?")
    backbone = ViTBackbone(**kwargs)
    load_encoder_state_dict(backbone, converted, f"{source} -> ViTBackbone(**{kwargs})")
    method = f"DINO (published checkpoint, {SOURCE_REPOSITORY})"
    weights, manifest, head_file = write_converted_encoder(
        backbone, kwargs, out_path, checkpoint_path, method, head, transpose_2d, len(converted), kwargs["img_size"]
    )
    logger.info(f"convert_dino: {len(converted)} tensors of {source} ({arch}) -> {weights}")
    return weights, manifest, {"mapped": len(converted), "arch": arch, "kwargs": kwargs, "head_file": head_file,
                               "head_keys": sorted(head)}
